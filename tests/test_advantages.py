"""Advantage estimators: hand-computed cases, validation errors and hypothesis properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agpo_lab.algorithms.advantages import (
    ESTIMATORS,
    agpo_advantage,
    compute_advantages,
    dr_grpo_advantage,
    group_stats,
    grpo_advantage,
    is_homogeneous,
    reinforce_pp_baseline_advantage,
    rloo_advantage,
)

T = torch.tensor
BOUNDS = {"r_min": 0.0, "r_max": 1.0}
ALL_CORRECT, ALL_WRONG, MIXED = [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]


def close(a: torch.Tensor, b, atol: float = 1e-4) -> bool:
    return torch.allclose(a, torch.as_tensor(b, dtype=a.dtype), atol=atol, rtol=0)


# ---------------------------------------------------------------- hand-computed examples


def test_grpo_mixed_group_bessel_and_population():
    # mean 0.25; bessel var = 0.75 / 3 = 0.25 (std 0.5); population var = 0.75 / 4 (std 0.4330)
    r = T([MIXED])
    assert close(grpo_advantage(r, std="bessel", eps=0.0), [[1.5, -0.5, -0.5, -0.5]])
    pop = 0.75 / math.sqrt(0.1875)
    assert close(
        grpo_advantage(r, std="population", eps=0.0), [[pop, -pop / 3, -pop / 3, -pop / 3]]
    )
    # the default is TRL's convention: bessel, eps 1e-4
    assert close(
        grpo_advantage(r), [[0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001]], 1e-6
    )


def test_grpo_homogeneous_groups_give_exactly_zero():
    r = T([ALL_CORRECT, ALL_WRONG, [0.3, 0.3, 0.3, 0.3]])
    assert torch.equal(grpo_advantage(r), torch.zeros(3, 4))


def test_grpo_group_of_two():
    # G=2: bessel std of {1, 0} is 1/sqrt(2), population std is 1/2
    r = T([[1.0, 0.0]])
    assert close(grpo_advantage(r, eps=0.0), [[math.sqrt(0.5), -math.sqrt(0.5)]])
    assert close(grpo_advantage(r, std="population", eps=0.0), [[1.0, -1.0]])


def test_agpo_all_correct_all_wrong_mixed():
    r = T([ALL_CORRECT, ALL_WRONG, MIXED])
    a = agpo_advantage(r, **BOUNDS)
    assert torch.equal(a[0], torch.ones(4))
    assert torch.equal(a[1], -torch.ones(4))
    assert torch.equal(a[2], grpo_advantage(r)[2])


def test_agpo_group_of_two():
    a = agpo_advantage(T([[1.0, 1.0], [0.0, 0.0], [0.0, 1.0]]), **BOUNDS)
    s = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert close(a, [[1.0, 1.0], [-1.0, -1.0], [-s, s]], 1e-6)


def test_agpo_uses_the_reward_bounds_not_the_group_extremes():
    # rewards in [-1, 2]: a group all at 1.0 is neither the top nor the bottom of the range
    r = T([[2.0, 2.0], [-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]])
    zero = agpo_advantage(r, r_min=-1.0, r_max=2.0)
    assert torch.equal(zero, T([[1.0, 1.0], [-1.0, -1.0], [0.0, 0.0], [0.0, 0.0]]))
    # midpoint 0.5: 1.0 is above (+1), 0.0 below (-1)
    sign = agpo_advantage(r, r_min=-1.0, r_max=2.0, intermediate="midpoint_sign")
    assert torch.equal(sign, T([[1.0, 1.0], [-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]]))
    at_mid = agpo_advantage(T([[0.5, 0.5]]), **BOUNDS, intermediate="midpoint_sign")
    assert torch.equal(at_mid, torch.zeros(1, 2))


def test_agpo_group_lifted_above_r_max_by_shaping_stays_all_max():
    # a length bonus of 0.1 applied inside an all-correct group with equal lengths: all 1.1
    assert torch.equal(agpo_advantage(T([[1.1, 1.1, 1.1]]), **BOUNDS), torch.ones(1, 3))


def test_dr_grpo_and_rloo_hand_values():
    r = T([MIXED, ALL_CORRECT])
    assert close(dr_grpo_advantage(r), [[0.75, -0.25, -0.25, -0.25], [0, 0, 0, 0]], 1e-7)
    assert close(rloo_advantage(r), [[1.0, -1 / 3, -1 / 3, -1 / 3], [0, 0, 0, 0]], 1e-6)
    assert close(rloo_advantage(T([[1.0, 0.0]])), [[1.0, -1.0]], 1e-7)


def test_reinforce_pp_uses_the_batch_std_of_centred_rewards():
    # centred: [.5, -.5, 0, 0]; bessel std over the 4 values = sqrt(0.5 / 3)
    r = T([[1.0, 0.0], [1.0, 1.0]])
    s = 0.5 / (math.sqrt(0.5 / 3) + 1e-4)
    assert close(reinforce_pp_baseline_advantage(r), [[s, -s], [0.0, 0.0]], 1e-6)
    # unlike GRPO, two groups with different spreads keep their relative scale
    a = reinforce_pp_baseline_advantage(T([[1.0, 0.0], [0.6, 0.4]]), eps=0.0)
    assert close(a[0] / a[1], [5.0, 5.0], 1e-5)
    assert torch.equal(
        reinforce_pp_baseline_advantage(T([ALL_WRONG, ALL_CORRECT])), torch.zeros(2, 4)
    )


def test_group_stats_classification_and_fractions():
    s = group_stats(T([[1.0, 1.0], [0.0, 0.0], [0.5, 0.5], [1.0, 0.0]]), 0.0, 1.0)
    assert s["all_max"].tolist() == [True, False, False, False]
    assert s["all_min"].tolist() == [False, True, False, False]
    assert s["other_homogeneous"].tolist() == [False, False, True, False]
    assert s["mixed"].tolist() == [False, False, False, True]
    assert (s["frac_zero_var"], s["frac_all_max"], s["frac_all_min"], s["frac_other"]) == (
        0.75,
        0.25,
        0.25,
        0.25,
    )
    assert all(isinstance(s[k], float) for k in ("frac_zero_var", "frac_all_max"))


def test_is_homogeneous_tolerance():
    r = T([[1.0, 1.0 + 1e-8], [1.0, 1.001]], dtype=torch.float64)
    assert is_homogeneous(r).tolist() == [True, False]


def test_compute_advantages_zero_variance_policies():
    r = T([ALL_CORRECT, ALL_WRONG, MIXED])
    keep, mask = compute_advantages(r, "grpo")
    assert torch.equal(keep, grpo_advantage(r)) and mask.all()
    agpo, mask = compute_advantages(r, "grpo", zero_variance="agpo", **BOUNDS)
    assert torch.equal(agpo, agpo_advantage(r, **BOUNDS)) and mask.all()
    drop, mask = compute_advantages(r, "grpo", zero_variance="drop")
    assert mask.tolist() == [False, False, True]
    assert torch.equal(drop[:2], torch.zeros(2, 4)) and torch.equal(drop[2], keep[2])


def test_compute_advantages_agpo_estimator_and_rule_on_other_estimators():
    r = T([ALL_CORRECT, MIXED])
    a, _ = compute_advantages(r, "agpo", **BOUNDS)
    assert torch.equal(a, agpo_advantage(r, **BOUNDS))
    # agpo's +/-1 on top of Dr.GRPO: the mixed group keeps r - mean
    a, _ = compute_advantages(r, "dr_grpo", zero_variance="agpo", **BOUNDS)
    assert torch.equal(a[0], torch.ones(4)) and close(a[1], [0.75, -0.25, -0.25, -0.25], 1e-7)
    # options reach the estimator
    a, _ = compute_advantages(r, "grpo", std="population", eps=0.0)
    assert torch.equal(a, grpo_advantage(r, std="population", eps=0.0))
    a, _ = compute_advantages(
        T([[0.5, 0.5]]), "agpo", intermediate="midpoint_sign", r_min=0, r_max=0.6
    )
    assert torch.equal(a, torch.ones(1, 2))


def test_inputs_can_be_ints_or_lists():
    assert close(
        grpo_advantage(torch.tensor([[1, 0]]), eps=0.0), [[math.sqrt(0.5), -math.sqrt(0.5)]]
    )
    assert close(dr_grpo_advantage([[1.0, 0.0]]), [[0.5, -0.5]])


# ---------------------------------------------------------------- validation errors


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: grpo_advantage(T([[1.0], [0.0]])), "G=1 < 2"),
        (lambda: grpo_advantage(T([1.0, 0.0])), "must be shaped [num_groups, G]"),
        (lambda: grpo_advantage(T([[1.0, math.nan]])), "NaN"),
        (lambda: rloo_advantage(T([[1.0, math.inf]])), "infinite"),
        (lambda: grpo_advantage(T([[1.0, 0.0]]), std="sample"), "valid: population, bessel"),
        (lambda: grpo_advantage(T([[1.0, 0.0]]), eps=-1.0), "eps must be"),
        (lambda: agpo_advantage(T([[1.0, 0.0]]), r_min=1.0, r_max=1.0), "r_min must be < r_max"),
        (
            lambda: agpo_advantage(T([[1.0, 0.0]]), r_min=0, r_max=1, intermediate="x"),
            "midpoint_sign",
        ),
        (lambda: group_stats(T([[1.0, 0.0]]), 2.0, 1.0), "r_min must be < r_max"),
        (lambda: compute_advantages(T([[1.0, 0.0]]), "ppo"), "valid: grpo, agpo, dr_grpo, rloo"),
        (lambda: compute_advantages(T([[1.0, 0.0]]), "agpo"), "r_min and r_max are required"),
        (lambda: compute_advantages(T([[1.0, 0.0]]), "grpo", zero_variance="agpo"), "required"),
        (
            lambda: compute_advantages(T([[1.0, 0.0]]), "grpo", zero_variance="x"),
            "keep, agpo, drop",
        ),
        (lambda: compute_advantages(T([[1.0, 0.0]]), "rloo", eps=0.1), "unknown option(s) ['eps']"),
    ],
)
def test_bad_input_gives_one_line_error(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- properties (hypothesis)


@st.composite
def reward_batches(draw, max_groups: int = 6, max_g: int = 16) -> torch.Tensor:
    """[num_groups, G] rewards in [0, 1]: binary, from {0, .5, 1}, or continuous (many homogeneous)."""
    n = draw(st.integers(1, max_groups))
    g = draw(st.integers(2, max_g))
    kind = draw(st.sampled_from(["binary", "three", "continuous", "constant_rows"]))
    if kind == "binary":
        values = st.sampled_from([0.0, 1.0])
    elif kind == "three":
        values = st.sampled_from([0.0, 0.5, 1.0])
    else:
        values = st.floats(0.0, 1.0, allow_nan=False, width=32)
    rows = []
    for _ in range(n):
        if kind == "constant_rows" or draw(st.booleans()) and kind != "continuous":
            rows.append([draw(values)] * g)  # force plenty of zero-variance groups
        else:
            rows.append([draw(values) for _ in range(g)])
    return torch.tensor(rows)


def all_estimates(r: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for name in ESTIMATORS:
        for policy in ("keep", "agpo", "drop"):
            out[f"{name}/{policy}"] = compute_advantages(r, name, zero_variance=policy, **BOUNDS)[0]
    out["grpo/population/eps0"] = grpo_advantage(r, std="population", eps=0.0)
    out["reinforce_pp/eps0"] = reinforce_pp_baseline_advantage(r, eps=0.0)
    return out


@settings(max_examples=400, deadline=None)
@given(reward_batches())
def test_property_every_estimator_is_finite(r):
    for name, a in all_estimates(r).items():
        assert a.shape == r.shape, name
        assert torch.isfinite(a).all(), name


@settings(max_examples=400, deadline=None)
@given(reward_batches(), st.sampled_from(["population", "bessel"]))
def test_property_agpo_equals_grpo_on_mixed_groups_and_pm1_at_the_bounds(r, std):
    a = agpo_advantage(r, **BOUNDS, std=std)
    g = grpo_advantage(r, std=std)
    s = group_stats(r, **BOUNDS)
    assert torch.equal(a[s["mixed"]], g[s["mixed"]])
    assert (a[s["all_max"]] == 1.0).all()
    assert (a[s["all_min"]] == -1.0).all()
    assert (a[s["other_homogeneous"]] == 0.0).all()
    n = (
        s["all_max"].long()
        + s["all_min"].long()
        + s["other_homogeneous"].long()
        + s["mixed"].long()
    )
    assert (n == 1).all()  # exactly one kind per group
    assert s["frac_zero_var"] == pytest.approx(
        s["frac_all_max"] + s["frac_all_min"] + s["frac_other"]
    )


@settings(max_examples=300, deadline=None)
@given(reward_batches(), st.randoms(use_true_random=False))
def test_property_permuting_completions_permutes_advantages(r, rnd):
    perm = torch.stack([torch.tensor(rnd.sample(range(r.shape[1]), r.shape[1])) for _ in r])
    permuted = torch.gather(r, 1, perm)
    before, after = all_estimates(r), all_estimates(permuted)
    for name in before:
        assert torch.allclose(torch.gather(before[name], 1, perm), after[name], atol=1e-5), name


@settings(max_examples=300, deadline=None)
@given(reward_batches())
def test_property_centred_estimators_sum_to_zero_and_rloo_is_leave_one_out(r):
    for a in (grpo_advantage(r), dr_grpo_advantage(r), rloo_advantage(r)):
        assert torch.allclose(a.sum(dim=1), torch.zeros(r.shape[0]), atol=1e-3)
    g = r.shape[1]
    loo = r - (r.sum(dim=1, keepdim=True) - r) / (g - 1)
    assert torch.allclose(rloo_advantage(r), loo, atol=1e-5)
    # population-std GRPO has unit population std on every mixed group (eps = 0)
    a = grpo_advantage(r.double(), std="population", eps=0.0)
    mixed = ~is_homogeneous(r.double())
    if mixed.any():
        assert torch.allclose(
            a[mixed].std(dim=1, correction=0), torch.ones(int(mixed.sum())).double()
        )


@settings(max_examples=300, deadline=None)
@given(reward_batches())
def test_property_drop_masks_exactly_the_zero_variance_groups(r):
    for name in ESTIMATORS:
        a, mask = compute_advantages(r, name, zero_variance="drop", **BOUNDS)
        assert torch.equal(mask, group_stats(r, **BOUNDS)["mixed"])
        assert (a[~mask] == 0).all()
        keep, _ = compute_advantages(r, name, **BOUNDS)
        assert torch.equal(a[mask], keep[mask])
