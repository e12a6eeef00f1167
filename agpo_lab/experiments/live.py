"""Training from a notebook: a progress bar with an ETA, a live figure and a status line that stay
put while the figure redraws, and a clean stop on Kernel > Interrupt.

    live = LiveTraining()
    display(live)                                   # the status line, the bars, the figure
    outcome = live.run(config, label="AGPO", seed=0)  # -> RunOutcome(state="finished", ...)

Kernel > Interrupt (SIGINT) stops the run within seconds: an evaluation or a step's rollout is
dropped at once, an update is finished first (see `agpo_lab.training.interrupts`). The trainer
saves its checkpoint and marks the run interrupted, and `run` returns with state "interrupted";
`outcome.check()` then ends the cell with one line (and stops Run All). With `resume=True` the
next `run` of the same settings continues that run, and one that finished is shown instead of
trained again; the figure then holds the run's earlier steps too, read from its directory. The
figure keeps every run shown through this object, so the runs of a session can be compared while
they train.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ipywidgets as widgets
import pandas as pd
from IPython.display import display
from tqdm.auto import tqdm

from agpo_lab.config import TrainConfig, load_config
from agpo_lab.errors import AgpoLabError
from agpo_lab.experiments.notebook import CellStop, Interrupted, show_figure
from agpo_lab.experiments.plots import TRAINING_PANELS, plot_training_curves
from agpo_lab.training.run_dir import load_metrics, run_state
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
    label: str = ""
    """The run's label in the live view."""

    def check(self) -> None:
        """Raise a one-line `Interrupted` (or `CellStop` for a failed run) unless the run finished:
        the cell ends there, and Run All with it."""
        if self.state == "interrupted" and self.path is None:
            raise Interrupted(f"{self.label} stopped before training started; run this cell "
                              "again to start it")  # fmt: skip
        if self.state == "interrupted":
            raise Interrupted(f"{self.label} stopped after {self.steps} steps, saved in "
                              f"{self.path}; run this cell again to resume it")  # fmt: skip
        if self.state != "finished":
            raise CellStop(f"{self.label} {self.state} after {self.steps} steps in {self.path} "
                           "(its status.json says why)")  # fmt: skip


_SAME_RUN_IGNORES = (("run", "name"), ("run", "resume"))
"""Config keys two runs may differ in and still be the same run (see `run_with_same_settings`)."""


def _settings(config: TrainConfig) -> dict:
    data = config.to_dict()
    for section, key in _SAME_RUN_IGNORES:
        data[section].pop(key, None)
    return data


def run_with_same_settings(config: TrainConfig) -> Path | None:
    """The newest run directory in `config.run.out_dir` whose config equals `config` up to the run
    name (None if there is none): the run that `LiveTraining.run(..., resume=True)` continues."""
    wanted, found = _settings(config), []
    for path in Path(config.run.out_dir).glob("*/config.yaml"):
        try:
            same = _settings(load_config(path)) == wanted
        except (AgpoLabError, OSError, ValueError):  # not a config this code reads: not ours
            same = False
        if same:
            found.append(path.parent)
    return max(found, key=lambda p: (p / "config.yaml").stat().st_mtime, default=None)


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

    def run(
        self, config: TrainConfig, label: str, seed: int = 0, resume: bool = False
    ) -> RunOutcome:
        """Build a Trainer for `config` and train it with the live view; never raises on an
        interrupt (the outcome says "interrupted"; `outcome.check()` turns that into a one-line
        error). `resume`: continue an interrupted run with the same settings, and show a finished
        one instead of training it again (see `run_with_same_settings`)."""
        started, trainer, name = time.perf_counter(), None, f"<b>{label}</b>, seed {seed}"
        previous = run_with_same_settings(config) if resume else None
        if previous is not None and run_state(previous) == "finished":
            self._show_saved(previous, label, seed)
            steps = int(load_metrics(previous)["step"].max())
            self._finish(f"{label}, seed {seed}: trained before with these settings, shown "
                         f"from {previous}")  # fmt: skip
            self.draw(f"{label}, seed {seed}: finished at step {steps}")
            return RunOutcome(previous, "finished", steps, 0.0, label)
        if previous is not None:
            data = config.to_dict()
            data["run"].update(name=previous.name, resume=True)
            config = TrainConfig.from_dict(data)
        self._say(f"{name}: loading the model…")
        try:
            with self._into(self.progress):
                trainer = Trainer(config)
                total = config.run.steps
                run_key = str(trainer.run_dir.path)
                if trainer.step > 0:  # resumed: its earlier steps belong in the figure
                    self._show_saved(trainer.run_dir.path, label, seed)
                    self.draw(f"{label}, seed {seed}: resumed at step {trainer.step}")
                every = config.run.eval_every
                evaluations = f"; held-out evaluation every {every} steps" if every else ""
                if config.run.eval_at_start and every and trainer.step == 0:
                    problems = config.eval.n_problems or "all"
                    self._say(f"{name}: evaluating the starting checkpoint on {problems} "
                              f"held-out problems, then {total} RL steps{evaluations}…")  # fmt: skip
                else:
                    resumed = f"resumed at step {trainer.step}, " if trainer.step else ""
                    self._say(f"{name}: {resumed}{total} RL steps{evaluations}…")
                bar = tqdm(total=total, initial=trainer.step, desc=f"{label} seed {seed}",
                           unit="step")  # fmt: skip

                def on_step(step: int, metrics: dict) -> None:
                    self.rows.append({**metrics, "method": label, "seed": seed, "run": run_key})
                    bar.update(1)
                    bar.set_postfix(acc=f"{metrics.get('reward/accuracy', float('nan')):.2f}")
                    self._say(f"{name}: training, step {step}/{total} done{evaluations}…")
                    if step % self.redraw_every == 0 or step == total:
                        self.draw(f"{label}, seed {seed}: step {step}/{total}")

                trainer.train(callback=on_step)
                bar.close()
        except KeyboardInterrupt:  # outside the training loop (e.g. while the model loaded)
            pass
        seconds = time.perf_counter() - started
        if trainer is None:
            self._finish(f"{label}, seed {seed}: interrupted before training started")
            return RunOutcome(None, "interrupted", 0, seconds, label)
        path = trainer.run_dir.path
        state = run_state(path)
        state = "interrupted" if state in ("stopped", "running") else state
        done = f"{trainer.step}/{config.run.steps} steps in {seconds:.0f} s"
        if state == "finished":
            self._finish(f"{label}, seed {seed}: finished, {done} -> {path}")
        else:
            self._finish(f"{label}, seed {seed}: <b>{state}</b> after {done}; saved, run the "
                         f"cell again to resume it (or <code>agpo-lab train {path}</code>)")  # fmt: skip
        self.draw(f"{label}, seed {seed}: {state} at step {trainer.step}")
        return RunOutcome(path, state, trainer.step, seconds, label)

    @staticmethod
    @contextlib.contextmanager
    def _into(output: widgets.Output) -> Iterator[None]:
        """Send what the block prints and displays to `output`, letting exceptions through.

        (`with output:` would show an exception as a traceback inside the widget and swallow it.)
        """
        output.__enter__()
        try:
            yield
        finally:
            output.__exit__(None, None, None)

    def _show_saved(self, path: Path, label: str, seed: int) -> None:
        """Put the steps saved in run directory `path` into the figure's rows (replacing any
        rows of that run already there)."""
        key = str(path)
        saved = load_metrics(path)
        saved = saved[saved["step"] > 0]  # step 0 holds only the evaluation before training
        self.rows[:] = [row for row in self.rows if row.get("run") != key]
        self.rows.extend(
            {**row, "method": label, "seed": seed, "run": key} for row in saved.to_dict("records")
        )

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
            show_figure(fig)  # closes it: the inline backend must not show it again

    def _say(self, html: str) -> None:
        self.status.value = "<br>".join([*self.lines, html])

    def _finish(self, line: str) -> None:
        self.lines.append(line)
        self.status.value = "<br>".join(self.lines)
