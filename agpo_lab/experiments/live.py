"""Training from a notebook: a progress bar with an ETA, a live figure and a status line that stay
put while the figure redraws, and a clean stop on Kernel > Interrupt.

    live = LiveTraining()
    display(live)                                   # the status line, the bars, the figure
    outcome = live.run(config, label="AGPO", seed=0)  # -> RunOutcome(state="finished", ...)

Kernel > Interrupt (SIGINT) asks the trainer to stop after its current step: it saves its
checkpoint, marks the run interrupted (resumable: `agpo-lab train RUN_DIR`, or `live.run` with
run.resume=true) and `run` returns with state "interrupted", so a loop over runs can stop there.
A second interrupt stops at once, still without a traceback. The figure keeps every run trained
through this object, so the runs of a session can be compared while they train.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import ipywidgets as widgets
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display
from tqdm.auto import tqdm

from agpo_lab.config import TrainConfig
from agpo_lab.experiments.plots import TRAINING_PANELS, plot_training_curves
from agpo_lab.training.run_dir import run_state
from agpo_lab.training.trainer import Trainer


@dataclass
class RunOutcome:
    """How a run trained through `LiveTraining.run` ended."""

    path: Path | None
    """Its run directory (None when it stopped before the directory was made)."""
    state: str
    """finished, interrupted (resumable) or failed (see status.json)."""
    steps: int
    """RL steps completed."""
    seconds: float
    """Wall time of the call, evaluations included."""


class LiveTraining:
    """A notebook view of training runs (see the module docstring)."""

    def __init__(
        self,
        redraw_every: int = 2,
        fontsize: float = 12,
        panels=TRAINING_PANELS,
        rows: list[dict] | None = None,
    ) -> None:
        """`rows`: share another LiveTraining's rows, so that both figures show every run."""
        self.redraw_every, self.fontsize, self.panels = redraw_every, fontsize, panels
        self.rows: list[dict] = [] if rows is None else rows
        """Every logged step of every run trained here, with method and seed columns."""
        self.lines: list[str] = []
        self.status = widgets.HTML()
        self.progress = widgets.Output()
        self.figure = widgets.Output()
        self.view = widgets.VBox([self.status, self.progress, self.figure])

    def _ipython_display_(self) -> None:
        display(self.view)

    def run(self, config: TrainConfig, label: str, seed: int = 0) -> RunOutcome:
        """Build a Trainer for `config` and train it with the live view; never raises on an
        interrupt (the outcome says "interrupted")."""
        started, trainer = time.perf_counter(), None
        self._say(f"<b>{label}</b>, seed {seed}: loading the model…")
        try:
            with self.progress:
                trainer = Trainer(config)
                total = config.run.steps
                if config.run.eval_at_start and config.run.eval_every and trainer.step == 0:
                    problems = config.eval.n_problems or "all"
                    self._say(f"<b>{label}</b>, seed {seed}: evaluating the starting checkpoint"
                              f" on {problems} held-out problems, then {total} RL steps…")  # fmt: skip
                else:
                    self._say(f"<b>{label}</b>, seed {seed}: {total} RL steps…")
                bar = tqdm(total=total, initial=trainer.step, desc=f"{label} seed {seed}",
                           unit="step")  # fmt: skip

                def on_step(step: int, metrics: dict) -> None:
                    self.rows.append({**metrics, "method": label, "seed": seed})
                    bar.update(1)
                    bar.set_postfix(acc=f"{metrics.get('reward/accuracy', float('nan')):.2f}")
                    if step % self.redraw_every == 0 or step == total:
                        self.draw(f"{label}, seed {seed}: step {step}/{total}")

                trainer.train(callback=on_step)
                bar.close()
        except KeyboardInterrupt:  # outside the training loop (e.g. while the model loaded)
            pass
        seconds = time.perf_counter() - started
        if trainer is None:
            self._finish(f"{label}, seed {seed}: interrupted before training started")
            return RunOutcome(None, "interrupted", 0, seconds)
        path = trainer.run_dir.path
        state = run_state(path)
        state = "interrupted" if state in ("stopped", "running") else state
        done = f"{trainer.step}/{config.run.steps} steps in {seconds:.0f} s"
        if state == "finished":
            self._finish(f"{label}, seed {seed}: finished, {done} -> {path}")
        else:
            self._finish(f"{label}, seed {seed}: <b>{state}</b> after {done}; saved, resume "
                         f"with <code>agpo-lab train {path}</code>")  # fmt: skip
        self.draw(f"{label}, seed {seed}: {state} at step {trainer.step}")
        return RunOutcome(path, state, trainer.step, seconds)

    def draw(self, status: str) -> None:
        """Redraw the figure of every run so far (replacing the previous drawing)."""
        if not self.rows:
            return
        fig = plot_training_curves(
            pd.DataFrame(self.rows),
            self.panels,
            smooth=1,
            title=f"Live training curves ({status})",
            fontsize=self.fontsize,
        )
        with self.figure:
            self.figure.clear_output(wait=True)
            display(fig)
        plt.close(fig)  # displayed once; the inline backend must not show it again

    def _say(self, html: str) -> None:
        self.status.value = "<br>".join([*self.lines, html])

    def _finish(self, line: str) -> None:
        self.lines.append(line)
        self.status.value = "<br>".join(self.lines)
