"""agpo_lab.rollout.fast_decode: the lean decode step computes what the transformers forward computes."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from agpo_lab.config import RolloutConfig
from agpo_lab.rollout import fast_decode, generate
from agpo_lab.rollout.fast_decode import FastDecoder
from tests.conftest import decode_both_ways

SIZES = dict(
    vocab_size=58,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
ARCHS = {
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SIZES)),  # q/k/v biases
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SIZES, tie_word_embeddings=False)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SIZES, head_dim=16)),  # per-head q/k norms
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SIZES, sliding_window=None)),
    "llama_mha": lambda: LlamaForCausalLM(LlamaConfig(**{**SIZES, "num_key_value_heads": 4})),
}


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ARCHS[arch]().eval()
    with torch.no_grad():  # norm weights other than 1, so that folding them in is checked
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.3)
    return model


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 58, (5, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[3, :1] = 0
    return ids, mask


def _decode_both(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per step (transformers logits, FastDecoder logits); row 1 leaves the batch at step 2."""
    return decode_both_ways(model, *_prompts(), steps=4, drop_row_at=(2, 1))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fast_step_matches_transformers_forward(arch):
    model = _model(arch)
    assert fast_decode.supported(model)
    assert all(f is not None for f in FastDecoder(model).fused)  # plain Linear: fused path
    for expected, got in _decode_both(model):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _lora_model() -> torch.nn.Module:
    peft = pytest.importorskip("peft")
    model = _model("qwen2")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    model = peft.get_peft_model(model, config).eval()
    for layer in model.get_base_model().model.layers:  # make the adapters matter
        torch.nn.init.normal_(layer.self_attn.q_proj.lora_B["default"].weight, std=0.5)
        torch.nn.init.normal_(layer.mlp.up_proj.lora_B["default"].weight, std=0.5)
    return model


def test_lora_model_decodes_with_its_adapters_merged_and_matches():
    model = _lora_model()
    assert fast_decode.supported(model)
    fused = FastDecoder(model).fused
    layer = model.get_base_model().model.layers[0]
    q_proj, norm = layer.self_attn.q_proj, layer.input_layernorm
    merged_q = q_proj.base_layer.weight + q_proj.get_delta_weight("default")
    folded = norm.weight * norm.weight.shape[0] ** 0.5  # the input norm's weight, times sqrt(D)
    assert torch.equal(fused[0].qkv_weight[: merged_q.shape[0]], merged_q * folded)
    for expected, got in _decode_both(model):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():  # the KL reference's view: base weights only
        assert torch.equal(
            FastDecoder(model).fused[0].qkv_weight[: merged_q.shape[0]],
            q_proj.base_layer.weight * folded,
        )


def test_bfloat16_model_with_float32_adapters_decodes_in_bfloat16_and_matches():
    # peft keeps a bfloat16 model's adapters in float32: the merged weight (base + delta) comes
    # out float32, and the fused copy must still be the model's bfloat16
    peft = pytest.importorskip("peft")
    model = _model("qwen2").to(torch.bfloat16)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    model = peft.get_peft_model(model, config).eval()
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    torch.nn.init.normal_(q_proj.lora_B["default"].weight, std=0.5)
    assert q_proj.lora_B["default"].weight.dtype == torch.float32
    assert FastDecoder(model).fused[0].qkv_weight.dtype == torch.bfloat16
    for expected, got in _decode_both(model):
        assert got.dtype == expected.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), expected.float(), atol=0.1, rtol=0.05)


def test_lora_model_above_the_merging_size_uses_its_modules_and_matches(monkeypatch):
    model = _lora_model()
    monkeypatch.setattr(fast_decode, "MERGE_MAX_BYTES", 1024)
    assert FastDecoder(model).fused == [None, None]
    for expected, got in _decode_both(model):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_unsupported_models_fall_back():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=58, n_embd=32, n_layer=1, n_head=2))
    windowed = MistralForCausalLM(MistralConfig(**SIZES, sliding_window=16))
    gelu = LlamaForCausalLM(LlamaConfig(**SIZES, hidden_act="gelu"))
    odd = _model("qwen2")  # a family member laid out differently (no shared rotary module)
    del odd.model.rotary_emb
    assert not any(fast_decode.supported(m) for m in (gpt2, windowed, gelu, odd))
    assert fast_decode.supported(_model("qwen2"))


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_generate_is_identical_with_and_without_the_fast_step(arch, char_tokenizer):
    model = _model(arch)
    prompts = ["12+34=", "7*8=", "(5+6)*2=", "1+1="]
    runs = []
    for fast in (True, False):
        cfg = RolloutConfig(max_new_tokens=12, temperature=1.0, fast_decode=fast)
        gen = torch.Generator().manual_seed(3)
        runs.append(generate(model, char_tokenizer, prompts, cfg, generator=gen))
    assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)
    torch.testing.assert_close(runs[0].logprobs, runs[1].logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(runs[0].entropy, runs[1].entropy, atol=1e-5, rtol=0)


def test_models_above_the_fusing_size_use_their_modules_and_match(monkeypatch):
    model = _model("qwen3")
    monkeypatch.setattr(fast_decode, "FUSE_MAX_BYTES", 1024)
    assert FastDecoder(model).fused == [None, None]
    for expected, got in _decode_both(model):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_folded_rmsnorm_equals_the_models_rmsnorm():
    norm = _model("qwen2").model.layers[0].input_layernorm  # weights drawn around 1 by _model
    weight, sum_eps = fast_decode._norm_parts(norm)
    x = torch.randn(5, SIZES["hidden_size"])
    torch.testing.assert_close(fast_decode._unit_scale(x, sum_eps) * weight, norm(x))
    unit = fast_decode._unit_scale(torch.tensor([[3.0, 4.0]]), 0.0)  # the docstring's example
    torch.testing.assert_close(unit, torch.tensor([[0.6, 0.8]]))


@torch.inference_mode()
def _decode_with(decoder: FastDecoder, fused_attention: bool, steps: int = 5) -> list[torch.Tensor]:
    """The decoder's logits after the prefill and each greedy step, with SDPA's fused attention or
    the two batched products; row 1 leaves the batch (the cache is compacted) at step 2."""
    from agpo_lab.rollout.inputs import positions_from_mask

    decoder.fused_attention = fused_attention
    ids, mask = _prompts()
    position = positions_from_mask(mask)
    logits, cache = decoder.prefill(ids, mask, position, steps)
    out, tokens, position = [logits], logits.argmax(-1), position[:, -1]
    for step in range(steps):
        if step == 2:
            keep = torch.tensor([0, 2, 3, 4])
            cache.batch_select_indices(keep)
            tokens, position, mask = tokens[keep], position[keep], mask[keep]
        position, mask = position + 1, torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        logits = decoder.step(cache, tokens, position, mask)
        out.append(logits)
        tokens = logits.argmax(-1)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3", "llama_mha"])
def test_bfloat16_fused_attention_equals_the_batched_products(arch):
    decoder = FastDecoder(_model(arch), dtype=torch.bfloat16)
    assert decoder.fused_attention  # bfloat16 on a CPU
    assert not FastDecoder(_model(arch)).fused_attention  # float32: the products take the views
    fused, products = _decode_with(decoder, True), _decode_with(decoder, False)
    for got, expected in zip(fused, products, strict=True):
        # the same attention, rounded in another order (bfloat16 keeps 8 significant bits)
        torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)
