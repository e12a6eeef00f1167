"""Policy loss: hand-computed surrogate, clipping, KL, aggregations, gradients and extreme inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agpo_lab.algorithms.loss import AGGREGATIONS, aggregate, kl_penalty, loss_rows, policy_loss

T = torch.tensor
LOG_1_5 = math.log(1.5)
LOG_0_5 = math.log(0.5)


def one_token(log_ratio: float, advantage: float, **kwargs) -> float:
    """Loss of a single token with the given log-ratio and advantage."""
    loss, _ = policy_loss(T([[log_ratio]]), T([[0.0]]), T([advantage]), T([[1]]), **kwargs)
    return loss.item()


# ---------------------------------------------------------------- hand-computed examples


def test_on_policy_loss_is_minus_mean_advantage():
    lp = T([[-1.0, -2.0], [-0.5, -3.0]])
    loss, d = policy_loss(lp, lp.clone(), T([2.0, -1.0]), torch.ones(2, 2))
    assert loss.item() == pytest.approx(-0.5)
    assert d["ratio_mean"] == d["ratio_min"] == d["ratio_max"] == 1.0
    assert d["clip_frac_low"] == d["clip_frac_high"] == 0.0 and d["kl_loss"] == 0.0


def test_clipping_takes_the_pessimistic_branch():
    # ratio 1.5, A > 0: clipped to 1.2 -> -1.2 A;   ratio 1.5, A < 0: unclipped (worse) -> -1.5 A
    assert one_token(LOG_1_5, 2.0) == pytest.approx(-2.4)
    assert one_token(LOG_1_5, -2.0) == pytest.approx(3.0)
    # ratio 0.5, A < 0: clipped to 0.8 -> 1.6;   ratio 0.5, A > 0: unclipped -> -1.0
    assert one_token(LOG_0_5, -2.0) == pytest.approx(1.6)
    assert one_token(LOG_0_5, 2.0) == pytest.approx(-1.0)
    # clip-higher (DAPO): the upper bound moves to 1.28
    assert one_token(LOG_1_5, 2.0, clip_high=0.28) == pytest.approx(-2.56)


def test_clip_fractions_count_tokens_whose_gradient_is_clipped():
    lp = T([[LOG_1_5, LOG_0_5, LOG_1_5, 0.0]])
    adv = T([[1.0, -1.0, -1.0, 1.0]])  # per-token advantages
    _, d = policy_loss(lp, torch.zeros(1, 4), adv, torch.ones(1, 4))
    assert d["clip_frac_high"] == 0.25  # token 0 only (token 2 has A < 0: not clipped)
    assert d["clip_frac_low"] == 0.25  # token 1
    assert d["ratio_min"] == pytest.approx(0.5) and d["ratio_max"] == pytest.approx(1.5)


def test_gradient_is_zero_where_clipped_and_minus_a_over_n_otherwise():
    lp = T([[LOG_1_5, 0.0, 0.1]], requires_grad=True)
    loss, _ = policy_loss(lp, torch.zeros(1, 3), T([1.0]), torch.ones(1, 3))
    loss.backward()
    # d/dlp of -exp(lp) A / 3 = -ratio * A / 3; the clipped token has no gradient
    assert torch.allclose(lp.grad, T([[0.0, -1 / 3, -math.exp(0.1) / 3]]))


def test_aggregations_hand_values():
    per_token, mask = T([[1.0, 3.0], [2.0, 0.0]]), T([[1, 1], [1, 0]])
    assert aggregate(per_token, mask, "seq_mean_token_mean").item() == 2.0
    assert aggregate(per_token, mask, "token_mean").item() == 2.0
    assert aggregate(per_token, mask, "seq_mean_token_sum_norm", max_len=4).item() == 0.75
    # where they differ: rows of different lengths with different per-token values
    per_token, mask = (
        T([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]]),
        T([[1, 1, 1, 1], [1, 0, 0, 0]]),
    )
    assert aggregate(per_token, mask, "seq_mean_token_mean").item() == 3.0  # (1 + 5) / 2
    assert aggregate(per_token, mask, "token_mean").item() == pytest.approx(1.8)  # 9 / 5
    assert aggregate(
        per_token, mask, "seq_mean_token_sum_norm", max_len=10
    ).item() == pytest.approx(0.45)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_dropped_rows_do_not_dilute_the_loss(aggregation):
    # the "drop" zero-variance policy zeroes whole rows of the mask: the loss must equal the loss
    # of the remaining rows alone (token_mean normalises by the remaining tokens)
    torch.manual_seed(0)
    lp, old = torch.randn(6, 5) * 0.1 - 1, torch.randn(6, 5) * 0.1 - 1
    adv, mask = torch.randn(6), torch.ones(6, 5)
    mask[0, 3:] = 0
    keep = T([True, False, True, True, False, True])
    dropped_mask = mask * keep[:, None]
    full, _ = policy_loss(lp, old, adv, dropped_mask, aggregation=aggregation, max_len=5)
    sub, _ = policy_loss(
        lp[keep], old[keep], adv[keep], mask[keep], aggregation=aggregation, max_len=5
    )
    assert full.item() == pytest.approx(sub.item(), abs=1e-7)


def test_kl_estimators_hand_values():
    lp, ref = T([[-1.0]]), T([[-1.5]])  # d = ref - lp = -0.5
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(0.125)
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(math.exp(-0.5) + 0.5 - 1)
    assert kl_penalty(lp, lp, "k3").item() == 0.0


def test_kl_term_adds_beta_times_aggregated_kl():
    lp, old = T([[-1.0, -2.0]]), T([[-1.0, -2.0]])
    ref = T([[-1.5, -2.0]])
    k3 = math.exp(-0.5) + 0.5 - 1
    loss, d = policy_loss(lp, old, T([1.0]), torch.ones(1, 2), ref, beta=0.1)
    assert loss.item() == pytest.approx(-1.0 + 0.1 * k3 / 2)
    assert d["policy_loss"] == pytest.approx(-1.0)
    assert d["kl_loss"] == pytest.approx(0.1 * k3 / 2)
    assert d["kl_mean"] == pytest.approx(k3 / 2)
    # beta = 0 with a reference: KL still reported, not added
    loss, d = policy_loss(lp, old, T([1.0]), torch.ones(1, 2), ref)
    assert loss.item() == pytest.approx(-1.0) and d["kl_mean"] == pytest.approx(k3 / 2)


def test_kl_bias_correction_weights_the_kl_by_the_ratio():
    old, ref = T([[-1.0]]), T([[-1.5]])
    lp = T([[-1.0]], requires_grad=True)
    k3 = math.exp(-0.5) + 0.5 - 1
    # on-policy (rho = 1) the value is the same, the gradient is not: d(rho * k3)/dlp adds k3
    plain, _ = policy_loss(lp, old, T([0.0]), T([[1]]), ref, beta=1.0)
    (g_plain,) = torch.autograd.grad(plain, lp)
    corrected, _ = policy_loss(lp, old, T([0.0]), T([[1]]), ref, beta=1.0, kl_bias_correction=True)
    (g_corr,) = torch.autograd.grad(corrected, lp)
    assert plain.item() == pytest.approx(corrected.item()) == pytest.approx(k3)
    assert g_corr.item() == pytest.approx(g_plain.item() + k3)
    # off-policy the value is multiplied by rho
    off, d = policy_loss(
        lp + LOG_1_5, old, T([0.0]), T([[1]]), ref, beta=1.0, kl_bias_correction=True
    )
    k3_off = math.exp(-0.5 - LOG_1_5) + 0.5 + LOG_1_5 - 1
    assert off.item() == pytest.approx(1.5 * k3_off)
    assert d["kl_mean"] == pytest.approx(k3_off)  # the diagnostic stays the plain estimate


def test_per_token_advantages_equal_broadcast_sequence_advantages():
    torch.manual_seed(1)
    lp, old, mask = torch.randn(4, 3), torch.randn(4, 3), (torch.rand(4, 3) > 0.3).float()
    adv = torch.randn(4)
    a, _ = policy_loss(lp, old, adv, mask)
    b, _ = policy_loss(lp, old, adv[:, None].expand(4, 3), mask)
    assert a.item() == b.item()


def test_padding_values_are_ignored_even_nan():
    lp = T([[-1.0, math.nan]], requires_grad=True)
    old = T([[-1.2, -math.inf]])
    loss, d = policy_loss(lp, old, T([1.0]), T([[1, 0]]), T([[-1.1, math.nan]]), beta=0.1)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(lp.grad).all() and lp.grad[0, 1] == 0
    assert math.isfinite(d["kl_mean"]) and d["ratio_max"] == pytest.approx(math.exp(0.2))


def test_empty_mask_gives_zero_loss_attached_to_the_graph():
    lp = torch.zeros(2, 3, requires_grad=True)
    loss, d = policy_loss(lp, torch.zeros(2, 3), T([1.0, -1.0]), torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(lp.grad, torch.zeros(2, 3))
    assert math.isnan(d["ratio_mean"]) and d["clip_frac_low"] == 0.0


def test_half_precision_inputs_are_computed_in_float32():
    lp = T([[-1.0, -2.0]], dtype=torch.bfloat16)
    loss, _ = policy_loss(lp, lp - 0.01, T([1.0]), torch.ones(1, 2))
    assert loss.dtype == torch.float32


# ---------------------------------------------------------------- validation errors


def _args(**over):
    args = {
        "logprobs": torch.zeros(2, 3),
        "old_logprobs": torch.zeros(2, 3),
        "advantages": torch.zeros(2),
        "mask": torch.ones(2, 3),
    }
    args.update(over)
    return args


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (_args(old_logprobs=torch.zeros(2, 4)), {}, "old_logprobs shape (2, 4)"),
        (_args(mask=torch.ones(3, 3)), {}, "mask shape"),
        (_args(advantages=torch.zeros(3)), {}, "advantages must be shaped [B] or [B, T]"),
        (_args(advantages=T([0.0, math.nan])), {}, "advantages contain NaN"),
        (_args(logprobs=torch.zeros(6), old_logprobs=torch.zeros(6)), {}, "[B, T]"),
        (_args(mask=torch.full((2, 3), 0.5)), {}, "mask must be bool or 0/1"),
        (_args(), {"beta": 0.1}, "beta > 0 needs ref_logprobs"),
        (_args(), {"beta": -0.1}, "beta must be"),
        (_args(), {"clip_low": 1.0}, "clip_low < 1"),
        (_args(), {"aggregation": "sum"}, "valid: seq_mean_token_mean, token_mean"),
        (_args(), {"kl_estimator": "k4"}, "valid: k1, k2, k3"),
        (_args(), {"aggregation": "seq_mean_token_sum_norm"}, "needs max_len"),
        (_args(ref_logprobs=torch.zeros(2, 2)), {}, "ref_logprobs shape"),
    ],
)
def test_bad_input_gives_one_line_error(args, kwargs, message):
    with pytest.raises(ValueError) as info:
        policy_loss(**args, **kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- properties (hypothesis)


@st.composite
def batches(draw):
    b, t = draw(st.integers(1, 6)), draw(st.integers(1, 8))
    scale = draw(st.sampled_from([0.01, 1.0, 50.0, 1e4]))  # 1e4: absurd log-ratios
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, t, generator=g) * 10
    old = lp + torch.randn(b, t, generator=g) * scale
    ref = lp + torch.randn(b, t, generator=g) * scale
    adv = torch.randn(b, generator=g) * draw(st.sampled_from([1.0, 100.0]))
    mask = torch.rand(b, t, generator=g) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    return lp, old, ref, adv, mask


@settings(max_examples=400, deadline=None)
@given(
    batches(),
    st.sampled_from(AGGREGATIONS),
    st.sampled_from(["k1", "k2", "k3"]),
    st.sampled_from([0.0, 0.04, 1.0]),
)
def test_property_loss_and_gradient_finite_for_extreme_ratios(batch, aggregation, kl, beta):
    lp, old, ref, adv, mask = batch
    lp = lp.clone().requires_grad_(True)
    loss, d = policy_loss(
        lp, old, adv, mask, ref, beta=beta, kl_estimator=kl, aggregation=aggregation, max_len=8
    )
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(lp.grad).all()
    assert (lp.grad[~mask] == 0).all()
    assert 0 <= d["clip_frac_low"] <= 1 and 0 <= d["clip_frac_high"] <= 1
    assert d["clip_frac_low"] + d["clip_frac_high"] <= 1
    assert loss.item() == pytest.approx(d["policy_loss"] + d["kl_loss"], rel=1e-5, abs=1e-5)


@settings(max_examples=300, deadline=None)
@given(batches(), st.sampled_from(AGGREGATIONS), st.integers(1, 4))
def test_property_extra_padding_columns_change_nothing(batch, aggregation, pad):
    lp, old, ref, adv, mask = batch
    padded = [torch.cat([x, torch.full((x.shape[0], pad), -7.0)], dim=1) for x in (lp, old, ref)]
    mask_p = torch.cat([mask, torch.zeros(mask.shape[0], pad, dtype=torch.bool)], dim=1)
    kw = {"aggregation": aggregation, "max_len": 16, "beta": 0.1}
    a, _ = policy_loss(lp, old, adv, mask, ref, **kw)
    b, _ = policy_loss(*padded[:2], adv, mask_p, padded[2], **kw)
    # float32 sums over another width round differently: within a few ulps of the largest term
    # (advantages reach +/-200 here; a fresh Hypothesis database once found a 4e-6 difference)
    scale = 1.0 + adv.abs().max().item()
    assert a.item() == pytest.approx(b.item(), rel=1e-6, abs=1e-6 * scale)


@settings(max_examples=300, deadline=None)
@given(batches())
def test_property_the_surrogate_never_exceeds_the_unclipped_objective(batch):
    # PPO's clipped objective is a pessimistic (lower) bound of rho * A, token by token
    lp, old, _, adv, mask = batch
    mask = torch.ones_like(mask)
    loss, _ = policy_loss(lp, old, adv, mask, aggregation="token_mean")
    ratio = torch.exp((lp - old).clamp(-20, 20))
    unclipped = -(ratio * adv[:, None]).mean()
    assert loss.item() >= unclipped.item() - 1e-4 * max(1.0, abs(unclipped.item()))


def test_loss_rows_worked_example_and_shapes():
    group_mask = torch.tensor([True, False])
    truncated = torch.tensor([[False, True], [False, False]])
    assert loss_rows(group_mask, truncated).tolist() == [True, True, False, False]
    assert loss_rows(group_mask, truncated, True).tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="num_groups"):
        loss_rows(group_mask, truncated.reshape(-1))
