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
    """A ~78k-parameter Qwen2 causal LM built from a config (no hub), seed 0, in eval mode."""
    from agpo_lab.models.tiny import build_tiny_causal_lm

    return build_tiny_causal_lm(char_tokenizer).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A ~78k-parameter Qwen2 (seed 0) and the char tokenizer saved as a `from_pretrained` folder."""
    from agpo_lab.models.tiny import build_tiny_causal_lm
    from agpo_lab.models.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    model = build_tiny_causal_lm(tok)
    path = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
