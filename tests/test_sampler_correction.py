"""A rollout in another precision than the update: the bfloat16 decode, the sampler correction
(truncated importance sampling) and the trainer that applies it."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from agpo_lab.algorithms.loss import policy_loss
from agpo_lab.algorithms.sampler_correction import mismatch_metrics, sampler_weights
from agpo_lab.config import RolloutConfig
from agpo_lab.rollout import completion_logprobs, generate
from agpo_lab.rollout.fast_decode import CannotLower, FastDecoder
from agpo_lab.rollout.precision import autocast_to, lower_dtype
from agpo_lab.training.trainer import Trainer
from tests.conftest import ParityTask, decode_both_ways, make_config
from tests.test_fast_decode import ARCHS, _lora_model, _model, _prompts

# ---- the weights -----------------------------------------------------------------------------


def test_weights_are_exactly_one_when_sampler_and_trainer_agree():
    logps = -torch.rand(3, 5) * 4
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        weights = sampler_weights(logps, logps.clone(), mask, mode, cap=2.0)
        assert torch.equal(weights, mask.float())


def test_weights_follow_the_docstring_example():
    trainer, sampler = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.0, -3.0]])
    mask = torch.ones(1, 2)
    expected = {
        "token_truncate": [[1.0, 2.0]],
        "token_mask": [[1.0, 0.0]],
        "sequence_truncate": [[2.0, 2.0]],
        "sequence_mask": [[0.0, 0.0]],
    }
    for mode, want in expected.items():
        got = sampler_weights(trainer, sampler, mask, mode, cap=2.0)
        torch.testing.assert_close(got, torch.tensor(want))
    below_cap = sampler_weights(trainer, sampler, mask, "token_truncate", cap=3.0)
    torch.testing.assert_close(below_cap, torch.tensor([[1.0, math.e]]))


def test_weights_ignore_padding_even_when_it_is_nan():
    trainer = torch.tensor([[-1.0, float("nan")]])
    sampler = torch.tensor([[-1.5, -1e30]])
    weights = sampler_weights(trainer, sampler, torch.tensor([[1, 0]]), "sequence_truncate", 2.0)
    torch.testing.assert_close(weights, torch.tensor([[math.exp(0.5), 0.0]]))


def test_bad_mode_or_cap_is_a_one_line_error():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="mode must be one of"):
        sampler_weights(x, x, x, "clip")
    with pytest.raises(ValueError, match="cap must be >= 1"):
        sampler_weights(x, x, x, cap=0.5)


def test_loss_with_weights_of_one_is_the_plain_loss_and_weights_scale_the_surrogate_only():
    torch.manual_seed(0)
    logps = (-torch.rand(4, 6) * 3).requires_grad_()
    old, ref = logps.detach() + 0.05 * torch.randn(4, 6), logps.detach() - 0.1
    adv, mask = torch.tensor([1.0, -1.0, 0.5, 2.0]), torch.ones(4, 6)
    args = dict(beta=0.04, aggregation="token_mean")
    plain, plain_diag = policy_loss(logps, old, adv, mask, ref, **args)
    ones, _ = policy_loss(logps, old, adv, mask, ref, token_weights=torch.ones(4, 6), **args)
    assert torch.equal(plain, ones)
    halves, diag = policy_loss(
        logps, old, adv, mask, ref, token_weights=torch.full((4, 6), 0.5), **args
    )
    assert diag["policy_loss"] == pytest.approx(plain_diag["policy_loss"] / 2, rel=1e-6)
    assert diag["kl_loss"] == pytest.approx(plain_diag["kl_loss"], rel=1e-6)  # KL unweighted
    with pytest.raises(ValueError, match="token_weights must have"):
        policy_loss(logps, old, adv, mask, token_weights=torch.ones(4, 5))


def test_mismatch_metrics():
    trainer, sampler = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.0, -2.1]])
    weights = sampler_weights(trainer, sampler, torch.ones(1, 2))
    found = mismatch_metrics(trainer, sampler, torch.ones(1, 2), weights)
    assert found["sampler/abs_logprob_diff"] == pytest.approx(0.05)
    assert found["sampler/token_ratio_max"] == pytest.approx(math.exp(0.1))
    assert found["sampler/kl"] == pytest.approx((math.exp(0.1) - 0.1 - 1) / 2, rel=1e-4)
    agree = mismatch_metrics(trainer, trainer, torch.ones(1, 2), torch.ones(1, 2))
    assert agree["sampler/kl"] == 0.0 and agree["sampler/weight_mean"] == 1.0
    assert math.isnan(mismatch_metrics(trainer, sampler, torch.zeros(1, 2), weights)["sampler/kl"])


# ---- the bfloat16 rollout ------------------------------------------------------------------


def test_lower_dtype():
    model = torch.nn.Linear(2, 2)
    assert lower_dtype(model, "model") is None
    assert lower_dtype(model, "bfloat16") is torch.bfloat16
    assert lower_dtype(model.to(torch.bfloat16), "bfloat16") is None


def test_the_cpu_bfloat16_context_can_be_entered_again_and_runs_math_attention():
    lowered = autocast_to("cpu", torch.bfloat16)
    for _ in range(2):  # the trainer enters one context for every pass
        with lowered:
            assert torch.is_autocast_enabled("cpu")
            assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
            assert not torch.backends.cuda.flash_sdp_enabled()  # the flags CPU SDPA reads too
            assert torch.backends.cuda.math_sdp_enabled()
        assert not torch.is_autocast_enabled("cpu") and torch.backends.cuda.flash_sdp_enabled()
    with autocast_to("cpu", None):
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_bfloat16_fast_step_is_within_bfloat16_rounding_of_the_float32_forward(arch):
    model = _model(arch)
    decoder = FastDecoder(model, dtype=torch.bfloat16)
    assert decoder.dtype is torch.bfloat16
    assert all(f.qkv_weight.dtype is torch.bfloat16 for f in decoder.fused)
    pairs = decode_both_ways(model, *_prompts(), steps=4, drop_row_at=(2, 1), dtype=torch.bfloat16)
    for expected, got in pairs:
        assert got.dtype is torch.bfloat16
        # bfloat16 keeps 8 significant bits: a relative error of a few 2^-8 through two layers
        torch.testing.assert_close(got.float(), expected, atol=0.05, rtol=0.03)
    worst = max((got.float() - expected).abs().max().item() for expected, got in pairs)
    assert worst > 1e-5  # it really computed in bfloat16


def test_bfloat16_fast_step_of_a_lora_model_merges_its_adapters():
    model = _lora_model()
    for expected, got in decode_both_ways(model, *_prompts(), steps=3, dtype=torch.bfloat16):
        torch.testing.assert_close(got.float(), expected, atol=0.05, rtol=0.03)


def test_models_the_fast_decode_cannot_copy_refuse_to_lower():
    model = _model("qwen2")
    model.model.norm = torch.nn.LayerNorm(model.config.hidden_size)  # not an RMSNorm
    with pytest.raises(CannotLower):
        FastDecoder(model, dtype=torch.bfloat16)
    FastDecoder(model)  # its own precision still works


def _rollout_vs_recomputed(model, tokenizer, precision: str, fast: bool = True):
    cfg = RolloutConfig(max_new_tokens=10, temperature=1.0, precision=precision, fast_decode=fast)
    out = generate(model, tokenizer, ["12+34=", "7*8=", "(5+6)*2=", "1+1="], cfg,
                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        recomputed = completion_logprobs(
            model, out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask
        )
    mask = out.completion_mask > 0
    return (out.logprobs[mask] - recomputed[mask]).abs()


def test_bfloat16_rollout_log_probs_are_close_to_the_float32_ones(tiny_qwen2, char_tokenizer):
    same = _rollout_vs_recomputed(tiny_qwen2, char_tokenizer, "model")
    lowered = _rollout_vs_recomputed(tiny_qwen2, char_tokenizer, "bfloat16")
    assert same.max() < 1e-4
    assert lowered.max() > 1e-4 and lowered.mean() < 0.05


def test_models_outside_the_fast_decode_lower_through_autocast(char_tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(char_tokenizer), n_embd=32, n_layer=1, n_head=2,
                        eos_token_id=char_tokenizer.eos_token_id)  # fmt: skip
    gpt2 = GPT2LMHeadModel(config).eval()
    same = _rollout_vs_recomputed(gpt2, char_tokenizer, "model")
    lowered = _rollout_vs_recomputed(gpt2, char_tokenizer, "bfloat16")
    assert same.max() < 1e-4
    assert lowered.max() > 1e-4 and lowered.mean() < 0.05


# ---- the trainer ---------------------------------------------------------------------------


def _run(model_dir, out_dir, *overrides) -> list[dict]:
    trainer = Trainer(make_config(model_dir, out_dir, *overrides), task=ParityTask())
    try:
        return trainer.train()
    finally:
        trainer.close()


def test_trainer_in_the_models_precision_logs_no_sampler_metrics(tiny_model_dir, tmp_path):
    rows = _run(tiny_model_dir, tmp_path)
    assert not any(key.startswith("sampler/") for row in rows for key in row)


@pytest.mark.parametrize(
    "overrides",
    [
        ["rollout.precision=bfloat16"],
        ["rollout.precision=bfloat16", "optim.precision=bfloat16", "algorithm.beta=0.04"],
        ["rollout.precision=bfloat16", "optim.mini_batch_size=8"],  # two optimizer steps
    ],
    ids=["rollout", "rollout+update+kl", "two-steps"],
)
def test_trainer_corrects_a_bfloat16_rollout(tiny_model_dir, tmp_path, overrides):
    rows = [r for r in _run(tiny_model_dir, tmp_path, *overrides) if "loss/total" in r]
    assert len(rows) == 2
    for row in rows:
        if math.isnan(row["sampler/kl"]):  # every group homogeneous at beta 0: no row computed
            assert row["zero_var/frac"] == 1.0 and "kl" not in "".join(overrides)
            continue
        assert 0 <= row["sampler/kl"] < 0.01
        assert 0 < row["sampler/abs_logprob_diff"] < 0.05
        assert 0.9 < row["sampler/weight_mean"] <= 2.0
        assert math.isfinite(row["loss/total"])
        # old log-probs are the trained policy's: the first pass's ratio is 1, not the mismatch
        assert row["policy/ratio_first_epoch_max_dev"] < 1e-3


def test_bfloat16_rollout_is_deterministic(tiny_model_dir, tmp_path):
    first = _run(tiny_model_dir, tmp_path / "a", "rollout.precision=bfloat16")
    second = _run(tiny_model_dir, tmp_path / "b", "rollout.precision=bfloat16")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]  # noqa: E731
    assert strip(first) == strip(second)
