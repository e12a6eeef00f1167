"""Fault injection: kills at seeded failpoints, SIGTERM, torn and corrupted files, a full disk, a
read-only folder, a second writer, an interrupted reproduce, and hostile settings.

Each test checks the two promises of a run directory: nothing already written is lost (earlier
checkpoints and log rows survive, or are moved aside, never deleted), and a resumed run continues
exactly: its metrics and samples equal those of the same run done in one go.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch
import yaml

from agpo_lab.config import SECTIONS, TrainConfig, load_config
from agpo_lab.errors import ConfigError, RunDirError
from agpo_lab.training.checkpoints import load_checkpoint
from agpo_lab.training.run_dir import RunDirWarning, load_metrics, run_state
from agpo_lab.training.trainer import Trainer
from tests.conftest import ParityTask, comparable, make_config

AGPO_LAB = Path(sys.executable).with_name("agpo-lab")
PER_STEP_FAILPOINTS = (
    "step.start",
    "step.rollout",
    "update.optimizer_step",
    "log.half_written",
    "log.appended",
    "checkpoint.written",
    "checkpoint.replaced",
)
"""Failpoints passed at least once per step; config.written and export.written once per process."""
STEPS = 4


@pytest.fixture(scope="module")
def run_config(tmp_path_factory) -> Path:
    """A YAML config that trains a tiny Qwen2 for STEPS steps on the embedded task, saving, logging
    samples and checkpointing at every step (so every write path is exercised)."""
    from agpo_lab.models.tiny import build_tiny_causal_lm
    from agpo_lab.models.tokenizer import build_char_tokenizer

    root = tmp_path_factory.mktemp("faults")
    tok = build_char_tokenizer()
    model = build_tiny_causal_lm(tok, hidden_size=32, num_layers=1, num_heads=2,
                                 intermediate_size=64, max_position_embeddings=128)  # fmt: skip
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    config = {
        "model": {"name_or_path": str(root / "model")},
        "task": {"name": "arithmetic", "n_train": 20, "n_eval": 10, "levels": [1, 2]},
        "rollout": {"group_size": 2, "max_new_tokens": 8},
        "optim": {"lr": 1e-3},
        "run": {"steps": STEPS, "prompts_per_step": 2, "device": "cpu", "save_every": 1,
                "log_samples_every": 1, "num_samples": 2, "out_dir": str(root / "runs")},
    }  # fmt: skip
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def agpo_lab(*args: str, fault: str | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run the `agpo-lab` command; `fault` arms one failpoint (AGPO_LAB_FAULT)."""
    env = {**os.environ, "AGPO_LAB_FAULT": fault or ""}
    return subprocess.run([str(AGPO_LAB), *args], capture_output=True, text=True, env=env, **kwargs)


def train(config: Path, out_dir: Path, name: str, *extra: str, fault: str | None = None):
    return agpo_lab("train", str(config), f"run.out_dir={out_dir}", f"run.name={name}", *extra,
                    "--quiet", fault=fault)  # fmt: skip


def logs(run: Path) -> tuple[list, list]:
    """(metrics without timings, samples) of a run directory, as written (null stays None)."""

    def rows(name: str) -> list[dict]:
        path = run / name
        return (
            [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        )

    assert (run / "metrics.jsonl").is_file(), f"no metrics in {run}"
    return comparable(rows("metrics.jsonl")), rows("samples.jsonl")


@pytest.fixture(scope="module")
def reference(run_config, tmp_path_factory) -> tuple[list, list]:
    """The logs of the run done in one go, in a subprocess like the faulty ones."""
    out = tmp_path_factory.mktemp("reference")
    done = train(run_config, out, "ref")
    assert done.returncode == 0, done.stderr[-2000:]
    assert run_state(out / "ref") == "finished"
    return logs(out / "ref")


def assert_intact(run: Path, reference: tuple[list, list]) -> None:
    """A finished run equals the reference, with no duplicate step, no temporary file, and every
    checkpoint readable and verified."""
    metrics, samples = logs(run)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert (metrics, samples) == reference
    assert not list(run.rglob("*.tmp"))
    for checkpoint in (run / "checkpoints").glob("*.safetensors"):
        load_checkpoint(checkpoint)  # raises on a bad checksum
    assert run_state(run) == "finished" and (run / "final" / "config.json").is_file()


# ---- kills at failpoints ------------------------------------------------------------------------


@pytest.mark.slow
def test_kills_at_seeded_failpoints_then_resume_equal_the_uninterrupted_run(
    run_config, reference, tmp_path
):
    chain = random.Random(2026)  # fixed seed: the same kills every time
    kills = [(chain.choice(PER_STEP_FAILPOINTS), chain.choice((1, 1, 2))) for _ in range(6)]
    kills += [("config.written", 1), ("export.written", 1)]  # every kill lands: the run is short
    run, killed = tmp_path / "chain", []
    target = [str(run_config), f"run.out_dir={tmp_path}", "run.name=chain"]
    for point, count in kills:
        done = agpo_lab("train", *target, "--quiet", fault=f"{point}:{count}")
        if done.returncode == -signal.SIGKILL:
            killed.append(point)
            assert run_state(run) in ("stopped", "unknown")  # killed while running
        else:
            assert done.returncode == 0, done.stderr[-2000:]  # the run ended before the point
        target = [str(run)]  # from now on: resume the run directory
    done = agpo_lab("train", str(run), "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(killed) == len(kills), f"a kill did not land: {kills}, {killed}"
    assert_intact(run, reference)


@pytest.mark.slow
def test_kill_inside_a_checkpoint_write_keeps_the_earlier_ones(run_config, reference, tmp_path):
    done = train(run_config, tmp_path, "ck", fault="checkpoint.written:2")
    assert done.returncode == -signal.SIGKILL
    run = tmp_path / "ck"
    assert (run / "checkpoints" / "step_000002.safetensors.tmp").is_file()  # the torn write
    weights, state = load_checkpoint(run / "checkpoints" / "step_000001.safetensors")
    assert state["step"] == 1 and weights
    assert not (run / "checkpoints" / "step_000002.safetensors").exists()
    done = agpo_lab("train", str(run), "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    assert_intact(run, reference)  # the temporary file is gone, the run equals the reference


# ---- signals ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_saves_marks_interrupted_and_resumes_exactly(run_config, tmp_path):
    # evaluation at every step makes a step long enough for the signal to land inside the run
    slow = ["run.eval_every=1", "eval.n_problems=4", "eval.k=2"]
    whole = train(run_config, tmp_path, "whole", *slow)
    assert whole.returncode == 0, whole.stderr[-2000:]
    run = tmp_path / "term"
    args = ["train", str(run_config), *slow, f"run.out_dir={tmp_path}", "run.name=term", "--quiet"]
    child = subprocess.Popen([str(AGPO_LAB), *args], stderr=subprocess.PIPE, text=True)
    while not (run / "metrics.jsonl").is_file() and child.poll() is None:
        time.sleep(0.02)  # wait for the first logged step
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate()
    assert child.returncode == 0 and "Traceback" not in err, err[-2000:]
    state = json.loads((run / "status.json").read_text())
    assert state["state"] == "interrupted" and state["step"] < STEPS
    assert (run / "checkpoints" / f"step_{state['step']:06d}.safetensors").is_file()
    done = agpo_lab("train", str(run), "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    assert_intact(run, logs(tmp_path / "whole"))


# ---- torn, stale and corrupted files (in-process) --------------------------------------------


def test_torn_log_lines_are_dropped_on_resume_and_logs_roll_back(tiny_model_dir, tmp_path):
    full = Trainer(make_config(tiny_model_dir, tmp_path / "a", "run.steps=3"), task=ParityTask())
    full.train()
    expected = logs(tmp_path / "a" / "run")

    Trainer(make_config(tiny_model_dir, tmp_path / "b", "run.steps=2"), task=ParityTask()).train()
    run = tmp_path / "b" / "run"
    with open(run / "metrics.jsonl", "a") as f:  # a crash (or a full disk) mid-append
        f.write('{"step": 3, "reward/me')
    with open(run / "samples.jsonl", "a") as f:  # samples of a step whose checkpoint never came
        f.write(json.dumps({"step": 3, "completion": "orphan"}) + "\n")
    resumed = make_config(tiny_model_dir, tmp_path / "b", "run.steps=3", "run.resume=true")
    with pytest.warns(RunDirWarning, match="partial last line"):
        Trainer(resumed, task=ParityTask()).train()
    assert logs(run) == expected
    assert (run / "metrics.jsonl.torn").read_text() == '{"step": 3, "reward/me\n'
    orphans = (run / "samples.orphaned.jsonl").read_text()
    assert "orphan" in orphans  # moved aside, not deleted


def test_a_flipped_checkpoint_byte_falls_back_to_the_previous_one(tiny_model_dir, tmp_path):
    extra = ("run.save_every=1",)
    Trainer(make_config(tiny_model_dir, tmp_path / "a", *extra, "run.steps=3"),
            task=ParityTask()).train()  # fmt: skip
    Trainer(make_config(tiny_model_dir, tmp_path / "b", *extra, "run.steps=2"),
            task=ParityTask()).train()  # fmt: skip
    run = tmp_path / "b" / "run"
    latest = run / "checkpoints" / "step_000002.safetensors"
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of the optimizer state or weights
    latest.write_bytes(bytes(data))
    resumed = make_config(tiny_model_dir, tmp_path / "b", *extra, "run.steps=3", "run.resume=true")
    with pytest.warns(RunDirWarning, match="failed its checksum"):
        trainer = Trainer(resumed, task=ParityTask())
    assert trainer.step == 1  # the previous good checkpoint
    assert (run / "checkpoints" / "step_000002.safetensors.corrupt").is_file()  # kept aside
    trainer.train()
    assert logs(run) == logs(tmp_path / "a" / "run")


def test_every_checkpoint_corrupt_starts_over_with_a_warning(tiny_model_dir, tmp_path):
    Trainer(make_config(tiny_model_dir, tmp_path, "run.steps=1"), task=ParityTask()).train()
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000001.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])  # a torn copy
    cfg = make_config(tiny_model_dir, tmp_path, "run.steps=1", "run.resume=true")
    with pytest.warns(RunDirWarning, match="unreadable"):
        trainer = Trainer(cfg, task=ParityTask())
    assert trainer.step == 0
    trainer.train()
    assert list(load_metrics(tmp_path / "run")["step"]) == [1]  # the old row moved aside
    assert (tmp_path / "run" / "metrics.orphaned.jsonl").is_file()


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        ("config.yaml", "not valid YAML"),
        ("metrics.jsonl", "line 1 is not valid JSON"),
    ],
)
def test_corrupt_run_files_are_one_line_errors(run_config, tiny_model_dir, tmp_path, damage,
                                                fragment):  # fmt: skip
    Trainer(make_config(tiny_model_dir, tmp_path, "run.steps=1"), task=ParityTask()).train()
    run = tmp_path / "run"
    (run / damage).write_text("{{{ not: [valid\nstill bad\n")
    done = agpo_lab("train", str(run), "run.steps=2", "--quiet")
    assert done.returncode == 2, done.stderr[-2000:]
    assert fragment in done.stderr and done.stderr.strip().count("\n") == 0


@pytest.mark.parametrize(
    ("filename", "content", "fragment"),
    [
        ("model.safetensors", b"\x00" * 64, "model.safetensors is unreadable"),
        ("config.json", b"{nope", "config.json is not valid JSON"),
        ("tokenizer.json", b"[1, 2", "tokenizer.json is not valid JSON"),
    ],
    ids=["weights", "config", "tokenizer"],
)
def test_a_broken_model_folder_names_the_file(
    tiny_model_dir, tmp_path, filename, content, fragment
):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / filename).write_bytes(content)
    done = agpo_lab("eval", str(folder), "eval.n_problems=1")
    assert done.returncode == 2 and fragment in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr


# ---- a second writer ----------------------------------------------------------------------------


def test_a_second_writer_gets_one_line_naming_the_holder(run_config, tiny_model_dir, tmp_path):
    holder = Trainer(make_config(tiny_model_dir, tmp_path, "run.steps=1"), task=ParityTask())
    try:
        done = agpo_lab("train", str(run_config), f"run.out_dir={tmp_path}", "run.name=run")
        assert done.returncode == 2
        assert f"in use by pid {os.getpid()}" in done.stderr
        assert done.stderr.strip().count("\n") == 0
        with pytest.raises(RunDirError, match="this process"):
            Trainer(make_config(tiny_model_dir, tmp_path, "run.resume=true"), task=ParityTask())
    finally:
        holder.close()
    Trainer(make_config(tiny_model_dir, tmp_path, "run.resume=true"), task=ParityTask()).train()


@pytest.mark.slow
def test_two_writers_started_together_one_wins_and_nothing_is_duplicated(run_config, tmp_path):
    args = ["train", str(run_config), f"run.out_dir={tmp_path}", "run.name=race", "--quiet"]
    children = [subprocess.Popen([str(AGPO_LAB), *args], stderr=subprocess.PIPE, text=True)
                for _ in range(2)]  # fmt: skip
    codes = sorted(child.wait() for child in children)
    errors = [child.stderr.read() for child in children]
    assert codes == [0, 2], errors
    assert any("in use by" in e or "already holds a run" in e for e in errors)
    assert [m["step"] for m in load_metrics(tmp_path / "race").to_dict("records")] == [1, 2, 3, 4]


# ---- a full disk, a read-only folder, a path that is a file --------------------------------------


@contextlib.contextmanager
def mounted(tmp_path: Path, tmpfs_bytes: int | None = None, read_only: Path | None = None):
    """A small tmpfs (`tmpfs_bytes`) or a read-only view of a folder, mounted at a fresh folder;
    the test is skipped with the reason where mounting is not allowed (it needs root)."""
    target = tmp_path / "mount"
    target.mkdir()
    if tmpfs_bytes is not None:
        commands = [["mount", "-t", "tmpfs", "-o", f"size={tmpfs_bytes}", "tmpfs", str(target)]]
    else:
        commands = [["mount", "--bind", str(read_only), str(target)],
                    ["mount", "-o", "remount,bind,ro", str(target)]]  # fmt: skip
    for i, command in enumerate(commands):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            if i:
                subprocess.run(["umount", str(target)], check=False)
            pytest.skip(f"cannot mount here ({done.stderr.strip() or 'mount failed'}); needs root")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.mark.slow
def test_a_full_disk_stops_with_one_line_and_the_run_resumes_elsewhere(
    run_config, reference, tmp_path
):
    probe = train(run_config, tmp_path, "probe", "run.steps=1")
    assert probe.returncode == 0, probe.stderr[-2000:]
    checkpoint = (tmp_path / "probe" / "checkpoints" / "step_000001.safetensors").stat().st_size
    room = 2 * checkpoint + 64 * 1024  # two checkpoints and the logs fit, the third does not
    with mounted(tmp_path, tmpfs_bytes=room) as disk:
        done = train(run_config, disk, "full")
        assert done.returncode == 2, done.stderr[-2000:]
        assert "No space left on device" in done.stderr and "Traceback" not in done.stderr
        assert done.stderr.strip().count("\n") == 0
        run = disk / "full"
        assert not list(run.rglob("*.tmp"))
        saved = sorted((run / "checkpoints").glob("*.safetensors"))
        assert saved and all(load_checkpoint(p) for p in saved)  # every earlier one intact
        assert run_state(run) == "failed"
        shutil.copytree(run, tmp_path / "full", ignore=shutil.ignore_patterns(".lock"))
    done = agpo_lab("train", str(tmp_path / "full"), "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    assert_intact(tmp_path / "full", reference)


def test_a_failed_checkpoint_write_is_one_error_and_leaves_no_temporary(
    tiny_model_dir, tmp_path, monkeypatch
):
    from agpo_lab.training import checkpoints

    real_save, calls = checkpoints.save_file, []

    def save_file_then_fill_the_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoints, "save_file", save_file_then_fill_the_disk)
    trainer = Trainer(make_config(tiny_model_dir, tmp_path, "run.steps=3", "run.save_every=1"),
                      task=ParityTask())  # fmt: skip
    with pytest.raises(RunDirError, match="No space left on device") as info:
        trainer.train()
    assert "\n" not in str(info.value)
    run = tmp_path / "run"
    assert not list(run.rglob("*.tmp")) and run_state(run) == "failed"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000001.safetensors"]


@pytest.mark.slow
def test_a_read_only_run_directory_fails_before_any_work(run_config, tmp_path):
    assert train(run_config, tmp_path / "ro_src", "ro", "run.steps=1").returncode == 0
    with mounted(tmp_path, read_only=tmp_path / "ro_src") as read_only:
        run = read_only / "ro"
        done = agpo_lab("eval", str(run), "eval.n_problems=2")
        assert done.returncode == 2 and "Read-only file system" in done.stderr
        assert "eval/pass@1" not in done.stdout  # it failed before evaluating
        done = agpo_lab("train", str(run), "run.steps=2", "--quiet")
        assert done.returncode == 2 and "Read-only file system" in done.stderr
        elsewhere = tmp_path / "eval.json"
        done = agpo_lab("eval", str(run), "eval.n_problems=2", "eval.k=1", "--out", str(elsewhere))
        assert done.returncode == 0 and elsewhere.is_file()


def test_out_dir_that_is_a_file_fails_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the run directory was checked")

    monkeypatch.setattr("agpo_lab.training.trainer.load_policy", never)
    (tmp_path / "file").write_text("x")
    cfg = make_config(tiny_model_dir, tmp_path / "file", "run.steps=1")
    with pytest.raises(RunDirError, match="Not a directory"):
        Trainer(cfg, task=ParityTask())


# ---- an interrupted reproduce -----------------------------------------------------------------


@pytest.mark.slow
def test_reproduce_interrupted_marks_no_short_run_complete_and_a_rerun_finishes(tmp_path):
    args = ["reproduce", "--name", "small", "--no-docs", "--methods", "grpo", "--seeds", "0", "1",
            "run.steps=4", "run.save_every=2", "run.prompts_per_step=2", "eval.n_problems=4",
            "eval.k=1"]  # fmt: skip
    root = tmp_path / "a" / "small"
    child = subprocess.Popen([str(AGPO_LAB), *args, "--out-dir", str(tmp_path / "a")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = root / "runs" / "grpo" / "seed0" / "metrics.jsonl"
    while child.poll() is None and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate()
    assert child.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        "agpo-lab reproduce: interrupted:"
    )
    for run in (root / "runs" / "grpo").iterdir():
        if run_state(run) != "finished":  # stopped mid-way: never marked complete
            assert not (run / "result.json").exists()
    rerun = agpo_lab(*args, "--out-dir", str(tmp_path / "a"))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    whole = agpo_lab(*args, "--out-dir", str(tmp_path / "b"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    for seed in ("seed0", "seed1"):
        a, b = (tmp_path / x / "small" / "runs" / "grpo" / seed for x in "ab")
        assert logs(a) == logs(b)
        drop = ("wall_seconds",)
        ra, rb = (json.loads((r / "result.json").read_text()) for r in (a, b))
        assert {k: v for k, v in ra.items() if k not in drop} == {
            k: v for k, v in rb.items() if k not in drop
        }


# ---- hostile settings ---------------------------------------------------------------------------

HOSTILE = [".nan", ".inf", "-.inf", "1e400", "-1", "0", "-99999999999", "[1, 2]", "{a: 1}",
           "abc", "''", "null", "true", "2.5"]  # fmt: skip


@pytest.mark.parametrize("section", SECTIONS)
def test_every_hostile_value_is_accepted_or_one_line_naming_the_key(section):
    hints = typing.get_type_hints(type(getattr(TrainConfig(), section)))
    for key in hints:
        for raw in HOSTILE:
            try:
                cfg = load_config(None, [f"{section}.{key}={raw}"])
            except ConfigError as err:
                message = str(err)
                assert "\n" not in message, (key, raw, message)
                assert f"{section}.{key}" in message or section in message, (key, raw, message)
                continue
            value = getattr(getattr(cfg, section), key)  # accepted: a sane, finite value
            numbers = value if isinstance(value, (list, tuple)) else [value]
            assert all(math.isfinite(v) for v in numbers if isinstance(v, float)), (key, raw)


def test_non_finite_numbers_are_rejected_even_when_built_in_python():
    from agpo_lab.config import AlgorithmConfig, OptimizerConfig

    with pytest.raises(ConfigError, match="optim.lr=inf: must be a finite number"):
        OptimizerConfig(lr=float("inf"))
    with pytest.raises(ConfigError, match="algorithm.eps"):
        AlgorithmConfig(eps=float("nan"))
    with pytest.raises(ConfigError, match="optim.betas"):
        OptimizerConfig(betas=(0.9, float("nan")))
    assert torch.isfinite(torch.tensor(OptimizerConfig().lr))
