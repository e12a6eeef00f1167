"""Tests of agpo_lab.training.lowered_weights: frozen weights cast once give bitwise what autocast's
cast in every pass gives, and the float32 weights come back after the block."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
from peft import LoraConfig, get_peft_model

from agpo_lab.errors import ConfigError
from agpo_lab.rollout.logprobs import completion_logprobs
from agpo_lab.rollout.precision import autocast_to
from agpo_lab.training import lowered_weights
from agpo_lab.training.lowered_weights import (
    LoweredFrozenWeights,
    frozen_linear_tensors,
    frozen_norm_tensors,
)
from agpo_lab.training.trainer import Trainer
from tests.conftest import ParityTask, comparable, make_config


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    )
    for name, p in peft_model.named_parameters():  # B starts at 0: give the adapters an effect
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return peft_model


def _inputs():
    g = torch.Generator().manual_seed(3)
    prompt_ids = torch.randint(3, 40, (4, 6), generator=g)
    prompt_mask = torch.ones(4, 6, dtype=torch.long)
    prompt_mask[0, :2] = 0
    completion_ids = torch.randint(3, 40, (4, 5), generator=g)
    completion_mask = torch.ones(4, 5)
    completion_mask[1, 3:] = 0
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def _two_steps(model_dir, out_dir, *overrides: str) -> list[dict]:
    """The comparable metrics of two training steps on the tiny model with these overrides."""
    trainer = Trainer(make_config(model_dir, out_dir, *overrides), task=ParityTask())
    try:
        return comparable([trainer.train_step() for _ in range(2)])
    finally:
        trainer.close()


def test_frozen_linear_tensors_are_the_frozen_base_layers_not_the_adapters_or_a_tied_head(
    tiny_qwen2,
):
    model = _lora(tiny_qwen2)
    found = {id(p) for p in frozen_linear_tensors(model)}
    names = [n for n, p in model.named_parameters() if id(p) in found]
    assert names and all("base_layer" in n for n in names)  # weights and q/k/v biases
    assert any(n.endswith("bias") for n in names)
    embed = model.get_input_embeddings().weight
    assert id(embed) not in found and not any("lora_" in n for n in names)


def test_passes_with_the_cast_once_weights_equal_autocast_bitwise_forward_and_backward(tiny_qwen2):
    model = _lora(tiny_qwen2).train()
    inputs = _inputs()
    frozen = frozen_linear_tensors(model)
    originals = [p.data for p in frozen]

    def logprobs_and_grads():
        model.zero_grad(set_to_none=True)
        with autocast_to("cpu", torch.bfloat16):
            logps = completion_logprobs(model, *inputs, share_prompts=True)
        logps.sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return logps.detach(), grads

    plain, plain_grads = logprobs_and_grads()
    lowered = LoweredFrozenWeights(torch.bfloat16)
    copies = []
    for _ in range(2):  # the second block reuses the copies
        with lowered.applied(model, model):  # the reference may be the same network
            assert all(p.dtype == torch.bfloat16 for p in frozen)
            copies.append([p.data_ptr() for p in frozen])
            # the tied head gets its own bfloat16 weight; the embedding keeps the float32 one
            assert model.get_output_embeddings().weight.dtype == torch.bfloat16
            assert model.get_input_embeddings().weight.dtype == torch.float32
            ours, ours_grads = logprobs_and_grads()
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert torch.equal(ours, plain)
        assert all(torch.equal(a, b) for a, b in zip(ours_grads, plain_grads, strict=True))
        # the very float32 tensors are back
        back = zip(frozen, originals, strict=True)
        assert all(p.dtype == torch.float32 and p.data_ptr() == o.data_ptr() for p, o in back)
    assert copies[0] == copies[1] and len(lowered._copies) == len(frozen) + 1  # + the tied head


def test_a_weight_changed_in_place_is_cast_again_and_an_error_restores_the_weights(tiny_qwen2):
    model = _lora(tiny_qwen2)
    lowered = LoweredFrozenWeights(torch.bfloat16)
    weight = frozen_linear_tensors(model)[0]
    with lowered.applied(model):
        first = weight.data.clone()
    with torch.no_grad():
        weight.add_(1.0)  # what loading a checkpoint into the frozen weights does
    changed = weight.data
    with pytest.raises(RuntimeError, match="inside"), lowered.applied(model):
        assert torch.equal(weight.data, changed.to(torch.bfloat16))
        assert not torch.equal(weight.data, first)
        raise RuntimeError("inside")
    assert weight.dtype == torch.float32 and weight.data_ptr() == changed.data_ptr()
    with LoweredFrozenWeights(None).applied(model):  # the update in the weights' own precision
        assert weight.dtype == torch.float32


def test_a_bfloat16_lora_run_gives_the_same_metrics_with_and_without_the_cast_once_weights(
    tiny_model_dir, tmp_path, monkeypatch
):
    overrides = ["model.lora=true", "optim.precision=bfloat16", "algorithm.beta=0.04"]

    def run(name: str) -> list[dict]:
        return _two_steps(tiny_model_dir, tmp_path / name, *overrides)

    with_copies = run("copies")
    calls = []
    original = lowered_weights.LoweredFrozenWeights._copy
    monkeypatch.setattr(
        lowered_weights.LoweredFrozenWeights,
        "_copy",
        lambda self, p: calls.append(1) or original(self, p),
    )
    assert run("copies_counted") == with_copies and calls  # the copies were in use
    monkeypatch.setattr(
        lowered_weights.LoweredFrozenWeights, "applied", lambda self, *models: nullcontext()
    )
    assert run("autocast_only") == with_copies


def test_a_full_fine_tuning_reference_keeps_only_its_bfloat16_weights_and_the_metrics_stay(
    tiny_model_dir, tmp_path, monkeypatch
):
    overrides = ["optim.precision=bfloat16", "algorithm.beta=0.04"]

    def run(name: str) -> tuple[list[dict], Trainer]:
        trainer = Trainer(
            make_config(tiny_model_dir, tmp_path / name, *overrides), task=ParityTask()
        )
        try:
            return comparable([trainer.train_step() for _ in range(2)]), trainer
        finally:
            trainer.close()

    lowered, trainer = run("lowered")
    reference = trainer.reference.model
    linear = [m for m in reference.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(m.weight.dtype == torch.bfloat16 for m in linear)  # the head too
    assert reference.get_input_embeddings().weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in trainer.policy.parameters())
    monkeypatch.setattr(lowered_weights.LoweredFrozenWeights, "lower_for_good", lambda s, m: None)
    kept, trainer = run("float32_kept")
    assert trainer.reference.model.get_output_embeddings().weight.dtype == torch.float32
    assert kept == lowered


def test_lowered_activations_carry_the_residual_stream_in_bfloat16_then_restore_everything(
    tiny_qwen2,
):
    model = _lora(tiny_qwen2).train()
    inputs = _inputs()
    norms = frozen_norm_tensors(model)
    assert norms and all(p.dtype == torch.float32 for p in norms)
    layer_inputs: list[torch.dtype] = []
    first_layer = model.get_base_model().model.layers[0]
    hook = first_layer.register_forward_pre_hook(
        lambda module, args, kwargs: layer_inputs.append(
            kwargs.get("hidden_states", *args[:1]).dtype
        ),
        with_kwargs=True,
    )

    def logprobs(lowered: LoweredFrozenWeights) -> torch.Tensor:
        with lowered.applied(model), autocast_to("cpu", torch.bfloat16):
            return completion_logprobs(model, *inputs, share_prompts=True).detach()

    autocast_only = logprobs(LoweredFrozenWeights(torch.bfloat16))
    assert layer_inputs[-1] == torch.float32  # autocast: the residual stream stays float32
    lowered = LoweredFrozenWeights(torch.bfloat16, activations=True)
    with lowered.applied(model):
        assert all(p.dtype == torch.bfloat16 for p in norms)
    both = logprobs(lowered)
    assert layer_inputs[-1] == torch.bfloat16
    hook.remove()
    # after the block: float32 norms, and the embedding's output is float32 again (hook removed)
    assert all(p.dtype == torch.float32 for p in norms)
    assert model.get_input_embeddings()(inputs[0]).dtype == torch.float32
    # another rounding of the same network: close to autocast's log-probs, not the same bits
    assert not torch.equal(both, autocast_only)
    torch.testing.assert_close(both, autocast_only, atol=0.1, rtol=0.0)


def test_a_bfloat16_lora_run_with_lowered_activations_starts_at_kl_zero_and_repeats_exactly(
    tiny_model_dir, tmp_path
):
    overrides = [
        "model.lora=true", "optim.precision=bfloat16", "optim.lowered_activations=true",
        "algorithm.beta=0.04",
    ]  # fmt: skip

    def run(name: str, *extra: str) -> list[dict]:
        return _two_steps(tiny_model_dir, tmp_path / name, *overrides, *extra)

    first = run("a")
    assert run("autocast_only", "optim.lowered_activations=false") != first  # it is in use
    # LoRA's B starts at 0, so the policy is its reference at step 1, and both sides of the KL
    # are computed the same way: exactly 0, as without lowered activations
    assert first[0]["loss/kl_mean"] == 0.0 and first[1]["loss/kl_mean"] != 0.0
    assert all(math.isfinite(v) for row in first for v in row.values() if isinstance(v, float))
    assert run("b") == first


def test_lowered_activations_need_a_lowered_precision(tiny_model_dir, tmp_path):
    with pytest.raises(
        ConfigError, match=r"optim\.lowered_activations=True: needs optim\.precision=bfloat16"
    ):
        make_config(tiny_model_dir, tmp_path, "optim.lowered_activations=true")
