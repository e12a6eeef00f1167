"""Training from a notebook (`agpo_lab.experiments.live`): an interrupt (the kernel's SIGINT) stops
a run cleanly, marked interrupted and resumable, and comparisons leave such runs out."""

from __future__ import annotations

import os
import signal

import pytest

from agpo_lab.experiments.live import LiveTraining
from agpo_lab.experiments.notebook import Interrupted
from agpo_lab.experiments.results import training_runs
from agpo_lab.training.checkpoints import find_latest_checkpoint
from agpo_lab.training.run_dir import run_state
from tests.conftest import make_config


def test_a_run_that_finishes_is_drawn_and_reported(tiny_model_dir, tmp_path):
    live, drawn = LiveTraining(redraw_every=1), []
    original_draw = live.draw
    live.draw = lambda status: (drawn.append(status), original_draw(status))
    outcome = live.run(make_config(tiny_model_dir, tmp_path, "run.steps=2"), "GRPO", seed=0)
    assert (outcome.state, outcome.steps, outcome.path) == ("finished", 2, tmp_path / "run")
    assert [row["step"] for row in live.rows] == [1, 2]
    assert "finished" in live.status.value
    assert drawn[-1] == "GRPO, seed 0: finished at step 2"


def test_kernel_interrupt_stops_after_the_step_saves_and_marks_the_run(tiny_model_dir, tmp_path):
    live = LiveTraining(redraw_every=1)
    config = make_config(tiny_model_dir, tmp_path, "run.steps=5")
    original_draw, sent = live.draw, []

    def draw_then_interrupt(status: str) -> None:
        original_draw(status)
        if len(live.rows) == 2 and not sent:  # lands while step 2's figure is drawn
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)  # what Kernel > Interrupt sends

    live.draw = draw_then_interrupt
    outcome = live.run(config, "AGPO", seed=0)  # returns, no KeyboardInterrupt escapes
    assert outcome.state == "interrupted" and outcome.steps == 2
    assert run_state(outcome.path) == "interrupted"
    assert find_latest_checkpoint(outcome.path).name == "step_000002.safetensors"
    assert "interrupted" in live.status.value and "agpo-lab train" in live.status.value
    assert not (outcome.path / "final").exists()  # not called finished

    finished = make_config(tiny_model_dir, tmp_path, "run.steps=2", "run.name=other")
    LiveTraining().run(finished, "GRPO", seed=0)
    kept, left_out = training_runs(tmp_path)
    assert [p.name for p in kept] == ["other"] and [p.name for p in left_out] == ["run"]
    assert [p.name for p in training_runs(tmp_path, include_partial=True)[0]] == ["run", "other"]

    resumed = make_config(tiny_model_dir, tmp_path, "run.steps=5", "run.resume=true")
    again = LiveTraining().run(resumed, "AGPO", seed=0)
    assert (again.state, again.steps) == ("finished", 5)


def test_an_interrupt_before_training_starts_is_reported_not_raised(tiny_model_dir, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    def interrupted_while_loading(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("agpo_lab.experiments.live.Trainer", interrupted_while_loading)
    outcome = LiveTraining().run(make_config(tiny_model_dir, tmp_path), "GRPO")
    assert outcome.state == "interrupted" and outcome.path is None


def test_the_same_settings_resume_the_interrupted_run_with_its_earlier_steps(tiny_model_dir,
                                                                              tmp_path):  # fmt: skip
    def config(name: str):  # a fresh name each time, as notebook 02's timestamped names
        return make_config(tiny_model_dir, tmp_path, "run.steps=4", f"run.name={name}")

    first, sent = LiveTraining(redraw_every=1), []

    def interrupt_at_step_2(status: str) -> None:
        if len(first.rows) == 2 and not sent:
            sent.append(os.kill(os.getpid(), signal.SIGINT))  # Kernel > Interrupt

    first.draw = interrupt_at_step_2
    stopped = first.run(config("first"), "AGPO", seed=0, resume=True)
    assert (stopped.state, stopped.steps) == ("interrupted", 2)
    with pytest.raises(Interrupted, match="run this cell again to resume") as raised:
        stopped.check()
    assert len(raised.value._render_traceback_()) == 1  # one line in the notebook, no traceback

    again = LiveTraining(redraw_every=1)  # the cell run again: a new view
    resumed = again.run(config("second"), "AGPO", seed=0, resume=True)
    assert (resumed.path, resumed.state, resumed.steps) == (stopped.path, "finished", 4)
    assert [row["step"] for row in again.rows] == [1, 2, 3, 4]  # the whole run in the figure
    assert not (tmp_path / "second").exists()
    resumed.check()  # a finished run: nothing raised

    shown = LiveTraining()
    same = shown.run(config("third"), "AGPO", seed=0, resume=True)
    assert (same.path, same.state, same.seconds) == (stopped.path, "finished", 0.0)
    assert [row["step"] for row in shown.rows] == [
        1,
        2,
        3,
        4,
    ] and "trained before" in shown.status.value
    other = LiveTraining().run(
        make_config(tiny_model_dir, tmp_path, "run.steps=1", "run.name=fourth"), "AGPO", resume=True
    )
    assert other.path == tmp_path / "fourth"  # other settings: a run of its own


def test_an_error_while_loading_is_raised_not_reported_as_an_interrupt(tiny_model_dir, tmp_path):
    config = make_config(tiny_model_dir, tmp_path, f"model.name_or_path={tmp_path / 'missing'}")
    with pytest.raises(OSError):
        LiveTraining().run(config, "GRPO")
