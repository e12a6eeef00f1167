"""Tokenizer, model loading, tiny models from a config, and the SFT that makes the embedded model."""

from pathlib import Path

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parents[2] / "data" / "embedded"
"""Where the shipped tiny model and tokenizer live (a folder loadable with `from_pretrained`)."""

__all__ = ["EMBEDDED_MODEL_DIR"]
