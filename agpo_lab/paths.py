"""Where the repository's own files live: the shipped model, the configs, the benchmarks.

The bottom of the package: it imports nothing, so every layer (config included) may use it.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
"""The repository checkout that holds this package (configs/, data/, benchmarks/, docs/)."""
EMBEDDED_MODEL_DIR = REPO_ROOT / "data" / "embedded"
"""The shipped tiny model and tokenizer (a folder loadable with `from_pretrained`)."""
CONFIGS_DIR = REPO_ROOT / "configs"
"""The YAML recipes: embedded CPU runs, the reproduce budget, GPU recipes."""
BENCHMARKS_DIR = REPO_ROOT / "benchmarks"
"""The benchmark scripts that `agpo-lab bench NAME` runs."""
DOCS_RESULTS_DIR = REPO_ROOT / "docs" / "results"
"""Where a full `reproduce` copies its table and main figures for the README."""
