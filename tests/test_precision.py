"""agpo_lab.training.precision: a learning rate too small for the trained weights' precision."""

from __future__ import annotations

import pytest
import torch

from agpo_lab.training.precision import lost_update_warning, rounded_away_above


def test_rounded_away_above_worked_example_from_its_docstring():
    assert rounded_away_above(1e-6, torch.bfloat16) == pytest.approx(5.12e-4)
    assert rounded_away_above(1e-6, torch.float32) == pytest.approx(33.55, rel=1e-3)


def test_the_threshold_is_where_an_adamw_step_stops_moving_bfloat16_weights():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4096, dtype=torch.bfloat16) * 0.02)
    start = weight.detach().clone()
    optimizer = torch.optim.AdamW([weight], lr=1e-6, weight_decay=0.0)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    moved = weight.detach() != start
    limit = rounded_away_above(1e-6, torch.bfloat16)
    assert not moved[start.abs() > limit].any()  # every larger weight kept its value
    assert moved[start.abs() < limit / 2].all()  # and every weight below half of it moved


def test_full_fine_tuning_in_bfloat16_at_rl_learning_rates_is_warned_about():
    torch.manual_seed(0)
    weights = [torch.randn(256, 256) * 0.02, torch.randn(256) * 0.02]
    message = lost_update_warning([w.bfloat16() for w in weights], lr=1e-6)
    assert message is not None and "optim.lr=1e-06 with bfloat16 weights" in message
    assert "model.dtype=float32" in message and message.count("\n") == 0
    assert lost_update_warning(weights, lr=1e-6) is None  # float32
    assert lost_update_warning([w.bfloat16() for w in weights], lr=1e-2) is None  # lr large enough
    assert lost_update_warning([w.half() for w in weights], lr=1e-7) is not None
    assert lost_update_warning([], lr=1e-6) is None


def test_the_trainer_warns_once_at_start_and_not_for_float32(tiny_model_dir, tmp_path, capsys):
    from agpo_lab.training.trainer import Trainer
    from tests.conftest import ParityTask, make_config

    low = make_config(tiny_model_dir, tmp_path / "bf16", "model.dtype=bfloat16", "optim.lr=1e-6")
    Trainer(low, task=ParityTask()).close()
    assert "optim.lr=1e-06 with bfloat16 weights" in capsys.readouterr().err
    plain = make_config(tiny_model_dir, tmp_path / "fp32", "optim.lr=1e-6")
    Trainer(plain, task=ParityTask()).close()
    assert "rounds away" not in capsys.readouterr().err
