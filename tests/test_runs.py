"""Run directories: atomic checkpoints that round-trip exactly, flushed metrics, clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from agpo_lab.training.checkpoints import find_latest_checkpoint, load_checkpoint, save_checkpoint
from agpo_lab.training.run_dir import RunDir, load_metrics, load_samples


def _optimizer_with_state():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, betas=(0.8, 0.9))
    layer(torch.randn(4, 3)).sum().backward()
    opt.step()
    return layer, opt


def test_checkpoint_round_trip_is_exact(tmp_path):
    layer, opt = _optimizer_with_state()
    gen = torch.Generator().manual_seed(5)
    torch.rand(3, generator=gen)
    state = {"step": 7, "optimizer": opt.state_dict(), "rng": gen.get_state(), "pair": (1, "a")}
    path = save_checkpoint(
        tmp_path / "ck" / "step_000007.safetensors", dict(layer.named_parameters()), state
    )
    assert path.exists() and not list(path.parent.glob("*.tmp"))

    weights, loaded = load_checkpoint(path)
    assert all(torch.equal(weights[n], p) for n, p in layer.named_parameters())
    assert loaded["step"] == 7 and loaded["pair"] == (1, "a")
    layer2, opt2 = _optimizer_with_state()
    opt2.load_state_dict(loaded["optimizer"])  # int keys of the optimizer state survive
    assert opt2.param_groups[0]["betas"] == (0.8, 0.9)
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(
            a["exp_avg_sq"], b["exp_avg_sq"]
        )
    gen2 = torch.Generator()
    gen2.set_state(loaded["rng"])
    assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=gen2))


def test_corrupt_or_missing_checkpoint_errors_and_is_kept(tmp_path):
    bad = tmp_path / "checkpoints" / "step_000002.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError) as info:
        load_checkpoint(bad)
    assert "unreadable" in str(info.value) and "\n" not in str(info.value)
    assert bad.read_bytes() == b"\x00garbage"  # never destroyed
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_find_latest_checkpoint(tmp_path):
    assert find_latest_checkpoint(tmp_path) is None
    run = RunDir(tmp_path)
    for step in (2, 10, 4):
        save_checkpoint(run.checkpoint_path(step), {"w": torch.zeros(1)}, {"step": step})
    (run.checkpoint_dir / "step_000099.safetensors.tmp").write_bytes(b"half")  # a crashed write
    assert find_latest_checkpoint(tmp_path) == run.checkpoint_path(10)


def test_metrics_append_load_and_truncate(tmp_path):
    run = RunDir(tmp_path / "r")
    for step in (1, 2, 3):
        run.log_metrics({"step": step, "reward/mean": step / 10, "length/mean_correct": math.nan})
    frame = load_metrics(run.path)
    assert list(frame["step"]) == [1, 2, 3] and frame["reward/mean"].iloc[2] == 0.3
    assert frame["length/mean_correct"].isna().all()  # NaN is written as null

    run.log_samples([{"step": s, "completion": f"ans:{s}"} for s in (1, 1, 2, 3)])
    assert run.roll_back(1) == 2 + 2  # every log: metrics of steps 2, 3 and their samples
    assert list(load_metrics(run.path)["step"]) == [1]
    assert load_samples(run.path)["completion"].tolist() == ["ans:1", "ans:1"]
    orphaned = (run.path / "metrics.orphaned.jsonl").read_text().splitlines()
    assert len(orphaned) == 2  # moved aside, not deleted
    assert len((run.path / "samples.orphaned.jsonl").read_text().splitlines()) == 2


def test_damaged_metrics_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        load_metrics(tmp_path)
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "rew')  # torn last line: a crash mid-write
    with pytest.warns(UserWarning, match="incomplete last line"):
        assert list(load_metrics(tmp_path)["step"]) == [1]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_metrics(tmp_path)
