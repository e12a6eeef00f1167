"""Tokenizer, model loading and the SFT script that makes the embedded checkpoint."""

from pathlib import Path

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parents[2] / "data" / "embedded"
"""Where the shipped tiny model and tokenizer live (a folder loadable with `from_pretrained`)."""

__all__ = ["EMBEDDED_MODEL_DIR"]
