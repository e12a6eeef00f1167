"""Shared test fixtures: tiny in-process models, the shared benchmark data, and the gpu marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
os.environ.setdefault("MPLBACKEND", "Agg")  # tests never open windows


def shared_data_dir() -> Path:
    """The read-only benchmark data beside the repo (../shared/data); skip the test when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark data not found at {SHARED_DATA} (only present on project machines)")
    return SHARED_DATA


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; torch.cuda.is_available() is False here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def char_tokenizer():
    """The embedded character tokenizer (left padding, one token per character)."""
    from agpo_lab.models.tokenizer import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture
def tiny_qwen2(char_tokenizer):
    """A ~50k-parameter Qwen2 causal LM built from a config (no hub), fixed seed."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(char_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=char_tokenizer.pad_token_id,
        bos_token_id=char_tokenizer.bos_token_id,
        eos_token_id=char_tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()
