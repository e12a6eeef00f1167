"""run.report_to: the same namespaced metrics and the config reach an experiment tracker
(TensorBoard here, read back from its event files); metrics.jsonl stays the record."""

from __future__ import annotations

import importlib.util

import pytest

from agpo_lab.errors import ConfigError
from agpo_lab.training.run_dir import load_metrics
from agpo_lab.training.tracking import check_trackers, flat_config
from agpo_lab.training.trainer import Trainer
from tests.conftest import ParityTask, make_config


def test_tensorboard_receives_every_step_of_metrics_jsonl_and_the_config(tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_config(tiny_model_dir, tmp_path, "run.steps=3", "run.report_to=[tensorboard]")
    Trainer(cfg, task=ParityTask()).train()
    run = tmp_path / "run"
    events = EventAccumulator(str(run / "tensorboard" / "run"))
    events.Reload()
    metrics = load_metrics(run)
    for key in ("reward/accuracy", "zero_var/frac", "length/mean", "loss/policy", "optim/lr"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == metrics["step"].tolist(), key
        assert [s.value for s in scalars] == pytest.approx(metrics[key].tolist(), rel=1e-6), key
    hparams = next((run / "tensorboard" / "run").glob("*/hparams.yml")).read_text()
    assert "optim.lr: 0.003" in hparams and "rollout.group_size: 4" in hparams


def test_a_tracker_without_its_package_is_a_one_line_error_before_any_work(tmp_path):
    missing = next(
        (name for name in ("wandb", "mlflow", "trackio") if importlib.util.find_spec(name) is None),
        None,
    )
    if missing is None:
        pytest.skip("every tracker package is installed here")
    with pytest.raises(ConfigError, match=f"pip install {missing}") as info:
        check_trackers([missing])
    assert "\n" not in str(info.value)


def test_flat_config_is_what_trackers_accept():
    flat = flat_config({"optim": {"lr": 1e-4, "betas": [0.9, 0.99]}, "run": {"name": None}})
    assert flat == {"optim.lr": 1e-4, "optim.betas": "[0.9, 0.99]", "run.name": "None"}
