"""Models: loading any causal LM (+ LoRA), the character tokenizer, tiny models from a config, and
the GPU-memory estimate of a recipe."""

from agpo_lab.paths import EMBEDDED_MODEL_DIR

__all__ = ["EMBEDDED_MODEL_DIR"]
