"""agpo_lab.models.tiny.build_tiny_causal_lm: sizes, token ids, seeding, one-line errors."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from agpo_lab.models.tiny import build_tiny_causal_lm
from agpo_lab.models.tokenizer import build_char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_config_takes_the_sizes_and_the_tokenizer_ids(tok):
    model = build_tiny_causal_lm(
        tok, hidden_size=32, num_layers=3, num_heads=2, num_kv_heads=1, intermediate_size=48,
        max_position_embeddings=100,
    )  # fmt: skip
    c = model.config
    assert isinstance(model, Qwen2ForCausalLM) and model.training
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers) == (len(tok), 32, 3)
    assert (c.num_attention_heads, c.num_key_value_heads) == (2, 1)
    assert (c.intermediate_size, c.max_position_embeddings) == (48, 100)
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (
        tok.pad_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
    )
    assert len(model.model.layers) == 3
    assert model.get_input_embeddings().weight.shape == (len(tok), 32)


def test_default_is_the_78k_parameter_tied_qwen2_of_the_docstring(tok):
    model = build_tiny_causal_lm(tok)
    assert sum(p.numel() for p in model.parameters()) == 78016
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_untied_output_layer_has_its_own_weights(tok):
    model = build_tiny_causal_lm(tok, tie_word_embeddings=False)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert sum(p.numel() for p in model.parameters()) == 78016 + len(tok) * 64


def test_llama_arch_builds_a_llama(tok):
    model = build_tiny_causal_lm(tok, arch="llama", num_layers=1)
    assert isinstance(model, LlamaForCausalLM) and model.config.model_type == "llama"
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, len(tok))


def test_same_seed_same_weights_other_seed_other_weights(tok):
    assert same_weights(build_tiny_causal_lm(tok, seed=3), build_tiny_causal_lm(tok, seed=3))
    assert not same_weights(build_tiny_causal_lm(tok, seed=3), build_tiny_causal_lm(tok, seed=4))


def test_equals_manual_seed_then_constructor_including_the_rng_stream_after(tok):
    """The recipe the tests and the embedded checkpoint were built with before this function."""
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(5)
    reference = Qwen2ForCausalLM(config)
    draw_after_reference = torch.rand(4)
    ours = build_tiny_causal_lm(tok, seed=5)
    assert same_weights(ours, reference)
    assert ours.config.to_dict() == reference.config.to_dict()
    assert torch.equal(torch.rand(4), draw_after_reference)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"arch": "gpt2"}, "unknown arch 'gpt2'; valid: qwen2, llama"),
        ({"num_layers": 0}, "num_layers must be >= 1, got 0"),
        ({"hidden_size": 30}, "hidden_size (30) divisible by num_heads (4)"),
        ({"num_kv_heads": 3}, "num_heads divisible by num_kv_heads (3)"),
    ],
)
def test_bad_arguments_give_one_line_errors(tok, kwargs, message):
    with pytest.raises(ValueError) as info:
        build_tiny_causal_lm(tok, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)
