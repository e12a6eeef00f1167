"""CUDA checks: bf16 rollouts and a LoRA step of a Qwen2.5-0.5B-sized model built from a config.

Skipped (with the reason) on machines without CUDA. No hub access: the model is random-init.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from agpo_lab.config import ModelConfig, RolloutConfig
from agpo_lab.models.loading import load_policy
from agpo_lab.models.tokenizer import build_char_tokenizer
from agpo_lab.rollout import completion_logprobs, generate
from agpo_lab.training.reference import load_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU on this machine)"),
]
PROMPTS = ["12+34=", "7*8=", "(5+6)*2=", "99-45="]


def qwen25_05b_config(tok, **overrides) -> Qwen2Config:
    """Qwen2.5-0.5B's dimensions written out (about 494M parameters), char-tokenizer special ids."""
    dims = dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    dims.update(overrides)
    return Qwen2Config(
        **dims,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


def save_random_model(folder, config: Qwen2Config, tok) -> None:
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)


def rollout_and_recompute(model, tok, device: str):
    """A sampled rollout and the one-pass recomputation of its log-probs (both in eval mode)."""
    prompts = [p for p in PROMPTS for _ in range(4)]  # 4 prompts x G = 4
    generator = torch.Generator(device).manual_seed(0)
    rollout = generate(model, tok, prompts, RolloutConfig(max_new_tokens=24), generator=generator)
    model.eval()
    with torch.no_grad():
        recomputed = completion_logprobs(
            model,
            rollout.prompt_ids,
            rollout.prompt_mask,
            rollout.completion_ids,
            rollout.completion_mask,
        )
    return rollout, recomputed


def check_bf16_agreement(folder, device: str) -> None:
    model, tok = load_policy(ModelConfig(name_or_path=str(folder), dtype="bfloat16"), device)
    rollout, recomputed = rollout_and_recompute(model, tok, device)
    assert rollout.logprobs.dtype == torch.float32 and rollout.completion_ids.device.type == device
    mask = rollout.completion_mask.bool()
    diff = (recomputed - rollout.logprobs)[mask].abs()
    # bf16 cached decoding and a full forward round differently; they must still agree closely.
    assert diff.mean() < 0.05 and diff.max() < 0.5, (diff.mean().item(), diff.max().item())
    assert (recomputed[~mask] == 0).all()


def check_lora_step(folder, device: str) -> None:
    cfg = ModelConfig(name_or_path=str(folder), lora=True, lora_r=8, gradient_checkpointing=True)
    policy, tok = load_policy(cfg, device)
    reference = load_reference(policy, cfg, beta=0.04)
    rollout, _ = rollout_and_recompute(policy, tok, device)
    args = (
        rollout.prompt_ids,
        rollout.prompt_mask,
        rollout.completion_ids,
        rollout.completion_mask,
    )
    ref_before = reference.logprobs(*args)
    lora_params = [p for p in policy.parameters() if p.requires_grad]
    frozen = next(p for n, p in policy.named_parameters() if "embed_tokens" in n)
    lora_before = [p.detach().clone() for p in lora_params]
    frozen_before = frozen.detach().clone()
    optimizer = torch.optim.AdamW(lora_params, lr=1e-3)

    policy.train()
    logprobs = completion_logprobs(policy, *args)
    advantages = torch.linspace(-1, 1, logprobs.shape[0], device=device)[:, None]
    ratio = torch.exp(logprobs - rollout.logprobs)
    kl = torch.exp(ref_before - logprobs) - (ref_before - logprobs) - 1
    per_token = -(ratio * advantages) + 0.04 * kl
    loss = (per_token * rollout.completion_mask).sum() / rollout.completion_mask.sum()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(lora_params, 1.0)
    optimizer.step()

    assert torch.isfinite(loss) and torch.isfinite(grad_norm) and grad_norm > 0
    assert any(not torch.equal(p, b) for p, b in zip(lora_params, lora_before))
    assert torch.equal(frozen, frozen_before)
    # The reference is the base model: the LoRA step must not move it.
    torch.testing.assert_close(reference.logprobs(*args), ref_before, atol=1e-2, rtol=0)


def test_bf16_rollout_logprobs_agree_on_cuda(tmp_path):
    tok = build_char_tokenizer()
    # The agreement check needs the real widths, not all 24 layers.
    save_random_model(tmp_path, qwen25_05b_config(tok, num_hidden_layers=4), tok)
    check_bf16_agreement(tmp_path, "cuda")


def test_lora_step_of_qwen25_05b_sized_model_on_cuda(tmp_path):
    tok = build_char_tokenizer()
    save_random_model(tmp_path, qwen25_05b_config(tok), tok)
    check_lora_step(tmp_path, "cuda")
