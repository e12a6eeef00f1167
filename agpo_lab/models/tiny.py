"""Tiny random causal LMs built in-process from a config: no hub download, same seed = same weights.

The one place that turns "a tokenizer and a few sizes" into a Qwen2 or Llama model. The tests, the
benchmarks and the SFT script that makes the embedded checkpoint (`agpo_lab.experiments.pretrain`) all
build their models here, so an architecture detail (tied embeddings, grouped KV heads, the special
token ids) is decided once.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ARCHITECTURES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
}
"""arch name -> (config class, causal-LM class); both take the same config fields used here."""


def build_tiny_causal_lm(
    tokenizer: Any,
    *,
    arch: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised causal LM sized by the arguments, with the tokenizer's vocabulary.

    The vocabulary size and the pad / bos / eos ids come from `tokenizer`. Weights are drawn right
    after ``torch.manual_seed(seed)``; that seeds torch's global generator (on purpose, as a plain
    ``manual_seed`` + constructor would), so code running after this call sees the same random
    stream every time. The model comes back in training mode, as its constructor leaves it: call
    ``.eval()`` before generating.

    Example (the default: a 2-layer Qwen2 of width 64 with grouped KV heads, tied embeddings)::

        >>> tok = build_char_tokenizer()               # 58 tokens
        >>> model = build_tiny_causal_lm(tok).eval()
        >>> sum(p.numel() for p in model.parameters())
        78016
        >>> build_tiny_causal_lm(tok, arch="llama", num_layers=1).config.model_type
        'llama'
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHITECTURES)}")
    sizes = {
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
    }
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"need hidden_size ({hidden_size}) divisible by num_heads ({num_heads}) and num_heads "
            f"divisible by num_kv_heads ({num_kv_heads})"
        )
    config_class, model_class = ARCHITECTURES[arch]
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return model_class(config)
