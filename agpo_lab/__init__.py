"""agpo_lab: GRPO and AGPO on language models, readable and reproducible."""

__version__ = "0.1.0"
