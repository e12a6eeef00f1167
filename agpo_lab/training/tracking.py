"""Experiment trackers (run.report_to): the run's metrics and config, also in TensorBoard, W&B,
MLflow or trackio, through accelerate's tracker classes.

metrics.jsonl stays the record (pandas reads it; a resume rolls it back); a tracker is a view of
the same namespaced metrics (`reward/*`, `zero_var/*`, `length/*`, `loss/*`, ...) that logs each
step as it happens, so a resumed run logs the replayed steps again there. Every tracker writes
inside the run directory where it can: tensorboard/, wandb/ (offline unless WANDB_MODE is set),
mlruns/.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

from agpo_lab.errors import ConfigError

PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "trackio": "trackio",
}
"""The package each tracker needs (pip install it to use the tracker)."""


def check_trackers(names: list[str]) -> None:
    """Raise a one-line ConfigError for a tracker whose package is not installed."""
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(
                f"run.report_to={names}: {name} needs the {PACKAGES[name]} package; "
                f"pip install {PACKAGES[name]} (or remove it from run.report_to)"
            )


class Trackers:
    """The trackers of one run; `log` sends a metrics row to each, `finish` closes them."""

    def __init__(self, names: list[str], run_dir: Path, run_name: str, config: dict) -> None:
        from accelerate import tracking

        check_trackers(names)
        self.trackers = []
        for name in names:
            if name == "tensorboard":
                tracker = tracking.TensorBoardTracker(run_name, run_dir / "tensorboard")
            elif name == "wandb":
                os.environ.setdefault("WANDB_MODE", "offline")
                os.environ.setdefault("WANDB_DIR", str(run_dir))
                tracker = tracking.WandBTracker(run_name)
            elif name == "mlflow":
                uri = (run_dir / "mlruns").resolve().as_uri()
                tracker = tracking.MLflowTracker(run_name, logging_dir=uri, run_name=run_name)
            else:
                tracker = tracking.TrackioTracker(run_name)
            tracker.start()
            tracker.store_init_configuration(flat_config(config))
            self.trackers.append(tracker)

    def log(self, metrics: dict[str, Any]) -> None:
        """One row of metrics.jsonl (its "step" is the x axis; None and NaN are left out)."""
        step = int(metrics["step"])
        values = {
            k: v
            for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)
        }
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def finish(self) -> None:
        """Flush and close every tracker."""
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def flat_config(config: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{"optim": {"lr": 1e-4}} -> {"optim.lr": 1e-4}; None, lists and mappings as text (trackers
    take numbers, strings and booleans)."""
    return {
        f"{section}.{key}": value if isinstance(value, (bool, int, float, str)) else str(value)
        for section, values in config.items()
        for key, value in values.items()
    }
