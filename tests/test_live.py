"""Training from a notebook (`agpo_lab.experiments.live`): an interrupt (the kernel's SIGINT) stops
a run cleanly, marked interrupted and resumable, and comparisons leave such runs out."""

from __future__ import annotations

import os
import signal

from agpo_lab.experiments.live import LiveTraining
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
