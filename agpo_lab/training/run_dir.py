"""Run directories: config, metrics, sample completions and checkpoints, readable with pandas.

    runs/<name>/
      config.yaml                 the full TrainConfig of the run
      metrics.jsonl               one JSON object per step, namespaced keys ("reward/mean", ...)
      samples.jsonl               sample completions with their rewards and advantages
      checkpoints/step_000050.safetensors   trainable weights + optimizer/scheduler/RNG state
      final/                      the trained policy as a plain `from_pretrained` folder

Every write either appends a flushed line or replaces a whole file atomically (write a temporary
file, then `os.replace`), so a crash never leaves a half-written file and never destroys one that
exists. Unreadable files give a one-line error naming the file. The checkpoint file format is in
`agpo_lab.training.checkpoints`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import pandas as pd


class RunDir:
    """Paths and writers of one run directory (created on first write)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config_path = self.path / "config.yaml"
        self.metrics_path = self.path / "metrics.jsonl"
        self.samples_path = self.path / "samples.jsonl"
        self.checkpoint_dir = self.path / "checkpoints"
        self.final_dir = self.path / "final"

    def write_config(self, text: str) -> None:
        """Write config.yaml (atomically)."""
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.config_path, text)

    def log_metrics(self, row: dict[str, Any]) -> None:
        """Append one step's metrics as a JSON line and flush (NaN / inf become null)."""
        _append_jsonl(self.metrics_path, [row])

    def log_samples(self, rows: list[dict[str, Any]]) -> None:
        """Append sample completions, one JSON line each."""
        _append_jsonl(self.samples_path, rows)

    def truncate_metrics(self, last_step: int) -> int:
        """Keep metrics rows with step <= last_step (a resume re-runs the later steps).

        The removed rows are appended to metrics.orphaned.jsonl rather than deleted. Returns how
        many rows were moved.
        """
        if not self.metrics_path.exists():
            return 0
        rows = _read_jsonl(self.metrics_path)
        keep = [r for r in rows if r.get("step", 0) <= last_step]
        moved = [r for r in rows if r.get("step", 0) > last_step]
        if moved:
            _append_jsonl(self.path / "metrics.orphaned.jsonl", moved)
            _atomic_write_text(self.metrics_path, "".join(_json_line(r) for r in keep))
        return len(moved)

    def checkpoint_path(self, step: int) -> Path:
        """Where the checkpoint after `step` completed steps lives."""
        return self.checkpoint_dir / f"step_{step:06d}.safetensors"


def load_metrics(run_dir: str | Path) -> pd.DataFrame:
    """metrics.jsonl as a DataFrame (one row per logged step; null values read as NaN).

    Example: ``load_metrics("runs/agpo-seed0").plot(x="step", y="reward/accuracy")``.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}; is it a run directory?")
    return pd.DataFrame(_read_jsonl(path))


def load_samples(run_dir: str | Path) -> pd.DataFrame:
    """samples.jsonl as a DataFrame (empty if no samples were logged)."""
    path = Path(run_dir) / "samples.jsonl"
    return pd.DataFrame(_read_jsonl(path)) if path.is_file() else pd.DataFrame()


# ---- helpers ---------------------------------------------------------------------------------


def _json_line(row: dict[str, Any]) -> str:
    clean = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()
    }
    return json.dumps(clean) + "\n"


def _append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("".join(_json_line(r) for r in rows))
        f.flush()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parse a JSONL file; a torn last line (a crash mid-write) is skipped with a warning."""
    text = path.read_text()
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1 and not text.endswith("\n"):
                warnings.warn(f"{path}: ignoring an incomplete last line", stacklevel=3)
                continue
            raise ValueError(f"{path}: line {i + 1} is not valid JSON; fix or remove it") from None
    return rows


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
