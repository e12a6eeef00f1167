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
import re
import shutil
import signal
import subprocess
import sys
import threading
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
    assert child.returncode == 130 and "Traceback" not in err, err[-2000:]
    state = json.loads((run / "status.json").read_text())
    assert state["state"] == "interrupted" and state["step"] < STEPS
    assert (run / "checkpoints" / f"step_{state['step']:06d}.safetensors").is_file()
    done = agpo_lab("train", str(run), "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    metrics, samples = logs(tmp_path / "whole")
    # A signal that lands in a step's evaluation drops that evaluation (Trainer's
    # _evaluate_unless_stopped: stop within seconds, keep the step); the rest is exact.
    dropped = re.search(r"stopped the evaluation after step (\d+)", err)
    if dropped:
        step = metrics[int(dropped.group(1)) - 1]
        for key in [k for k in step if k.startswith("eval/")]:
            del step[key]
    assert_intact(run, (metrics, samples))


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
    args = ["reproduce", "--name", "small", "--no-docs", "--methods", "grpo", "--seeds", "0",
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
    stopped = root / "runs" / "grpo" / "seed0"  # after 2 or 3 of its 4 steps
    assert run_state(stopped) != "finished" and not (stopped / "result.json").exists()
    rerun = agpo_lab(*args, "--out-dir", str(tmp_path / "a"))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    whole = agpo_lab(*args, "--out-dir", str(tmp_path / "b"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    a, b = (tmp_path / x / "small" / "runs" / "grpo" / "seed0" for x in "ab")
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


# ---- bounds from the machine, the model and the task -------------------------------------------


def forbid_model_loading(monkeypatch) -> None:
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the bounds were checked")

    monkeypatch.setattr("agpo_lab.training.trainer.load_policy", never)


@pytest.mark.parametrize(
    ("override", "start", "limit"),
    [
        ("rollout.max_new_tokens=1e12", "rollout.max_new_tokens=1000000000000: ", "GiB, more than"),
        ("rollout.group_size=1e9", "rollout.group_size=1000000000: ", "GiB, more than"),
        ("run.prompts_per_step=1e9", "run.prompts_per_step=1000000000: ", "GiB, more than"),
        (
            "eval.max_new_tokens=1e12 run.eval_every=1",
            "eval.max_new_tokens=1000000000000: ",
            "GiB, more than",
        ),
        ("eval.k=1e9 run.eval_at_start=true", "eval.k=1000000000: ", "GiB, more than"),
        ("task.n_train=1e10", "task.n_train=10000000000: ", "distinct questions"),
        ("task.n_eval=1e10 run.eval_every=1", "task.n_eval=10000000000: ", "distinct questions"),
        ("run.seed=-9e18", "run.seed=-9000000000000000000: ", "must lie in"),
    ],
)
def test_sizes_beyond_the_machine_or_the_task_are_one_line_before_anything_loads(
    tiny_model_dir, tmp_path, monkeypatch, override, start, limit
):
    forbid_model_loading(monkeypatch)
    with pytest.raises(ConfigError) as info:
        Trainer(make_config(tiny_model_dir, tmp_path, *override.split()), task=ParityTask())
    message = str(info.value)
    assert message.startswith(start) and limit in message and "\n" not in message, message
    assert not (tmp_path / "run").exists()  # not even an empty run folder


def test_the_commands_refuse_a_rollout_that_cannot_fit_in_one_line(run_config, tmp_path):
    done = train(run_config, tmp_path, "big", "rollout.max_new_tokens=1e12")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "rollout.max_new_tokens=1000000000000: " in done.stderr
    assert done.stderr.strip().count("\n") == 0 and not (tmp_path / "big").exists()
    done = agpo_lab("eval", "embedded", "eval.max_new_tokens=1e12", "--quiet")
    assert done.returncode == 2 and "eval.max_new_tokens=1000000000000: " in done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr[-2000:]


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["optim.lr=1e300"], "optim.lr=1e+300: must be 0 or between"),
        (["optim.lr=1e38"], "optim.lr=1e+38: AdamW's first step"),
        (["algorithm.length_reward=agpo", "algorithm.length_weight=1e308"],
         "algorithm.length_weight=1e+308: must be 0 or between"),
        (["algorithm.length_reward=agpo", "algorithm.length_weight=1e19"],
         "algorithm.length_weight=1e+19: must be <="),
        (["optim.lr=1e20", "optim.weight_decay=1e20"], "optim.weight_decay=1e+20: lr * weight_decay"),
        (["rollout.temperature=1e-300"], "rollout.temperature=1e-300: must be 0 or between"),
        (["rollout.max_new_tokens=1e30"], "must fit in 64 bits"),
        (["optim.lr=" + "9" * 400], "must fit in 64 bits"),
    ],
)  # fmt: skip
def test_numbers_beyond_float32_or_64_bits_are_one_line_errors(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert fragment in message and "\n" not in message and len(message) < 300, message


def test_reproduce_checks_every_run_against_the_machine_before_starting_one(tmp_path):
    from agpo_lab.config import ReproduceConfig
    from agpo_lab.experiments.reproduce import reproduce

    cfg = ReproduceConfig(name="big", out_dir=str(tmp_path), methods=("grpo",), seeds=(0,),
                          docs=False, overrides=["rollout.max_new_tokens=1e12"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"^rollout\.max_new_tokens=1000000000000: .* GiB"):
        reproduce(cfg, progress=False)
    assert list(tmp_path.iterdir()) == []  # no results folder, no run started


# ---- names and config files ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["..", ".", "a/b", "/tmp/x", "..\\x", "a b", "-x", "\udcff",
                                  "x\x00", "é" * 128])  # fmt: skip
def test_a_run_name_is_one_safe_folder_name(name):
    from agpo_lab.config import ReproduceConfig, StudyConfig

    with pytest.raises(ConfigError, match=r"^run\.name=") as info:
        load_config(None, [f"run.name={name}"])
    assert "\n" not in str(info.value)
    for cls in (ReproduceConfig, StudyConfig):
        with pytest.raises(ConfigError, match=r"^name="):
            cls(name=name)
    assert load_config(None, ["run.name=agpo_seed-0.lr=1e-4"]).run.name == "agpo_seed-0.lr=1e-4"


def test_a_bad_run_name_on_the_command_line_writes_nothing(run_config, tmp_path):
    out = tmp_path / "out"
    for name in ("run.name=..", b"run.name=\xff"):  # the bytes are not UTF-8
        args = [str(AGPO_LAB), "train", str(run_config), f"run.out_dir={out}", name, "--quiet"]
        done = subprocess.run(args, capture_output=True)
        stderr = done.stderr.decode(errors="replace")
        assert done.returncode == 2 and stderr.startswith("agpo-lab train: run.name="), stderr
        assert stderr.strip().count("\n") == 0
    assert list(tmp_path.iterdir()) == []  # neither out_dir nor its parent got anything


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (bytes(range(256)) * 64, "not UTF-8 text (byte 0x80 at offset 128)"),
        ("run:\n  steps: 3\n".encode("utf-16"), "not UTF-8 text (byte 0xff at offset 0)"),
        (b"[" * 50_000, "nested deeper than 16 levels"),
        (b"run:\n  steps: 3\n" + b"#" * (1 << 20), "too large for a config"),
        (b"a: &x [1]\nrun: {steps: *x}\n", "aliases (*name) are not supported"),
    ],
    ids=["binary", "utf16", "deep", "large", "alias"],
)
def test_config_files_that_are_not_small_utf8_yaml_are_one_line_errors(tmp_path, content, fragment):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)[:500]


def test_a_binary_or_deep_config_on_the_command_line_is_one_line(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_bytes(b"[" * 50_000)  # a RecursionError and 2,999 lines of stderr before
    for config in (deep, Path(shutil.which("ls") or sys.executable)):
        done = agpo_lab("train", str(config), "--quiet")
        assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr[-2000:]
        assert str(config) in done.stderr and "Traceback" not in done.stderr


# ---- checkpoints of another shape, the lost last row ---------------------------------------------


def test_a_checkpoint_of_another_shape_is_one_line_in_train_and_eval(tiny_model_dir, tmp_path):
    from agpo_lab.errors import CheckpointError
    from agpo_lab.training.checkpoints import save_checkpoint

    Trainer(make_config(tiny_model_dir, tmp_path, "run.steps=1"), task=ParityTask()).train()
    run, name = tmp_path / "run", "model.layers.0.mlp.up_proj.weight"
    path = run / "checkpoints" / "step_000001.safetensors"
    tensors, state = load_checkpoint(path)
    shape = list(tensors[name].shape)
    tensors[name] = torch.zeros(shape[0] + 1, shape[1])
    path.unlink()
    save_checkpoint(path, tensors, state)  # a valid checksum and the same names
    fragment = f"tensor {name} has shape {[shape[0] + 1, shape[1]]} but the model's is {shape}"
    resumed = make_config(tiny_model_dir, tmp_path, "run.steps=2", "run.resume=true")
    with pytest.raises(CheckpointError, match=re.escape(fragment)):
        Trainer(resumed, task=ParityTask())
    for command in (
        ["train", str(run), "--quiet"],
        ["eval", str(run), "eval.n_problems=1", "--quiet"],
    ):
        done = agpo_lab(*command)
        assert done.returncode == 2 and fragment in done.stderr, done.stderr[-2000:]
        assert done.stderr.strip().count("\n") == 0
    assert run_state(run) == "finished" and load_checkpoint(path)  # nothing was lost


def test_a_torn_last_row_of_a_checkpointed_step_is_restored_not_dropped(tiny_model_dir, tmp_path):
    extra = ("run.save_every=1",)
    Trainer(make_config(tiny_model_dir, tmp_path / "a", *extra, "run.steps=3"),
            task=ParityTask()).train()  # fmt: skip
    Trainer(make_config(tiny_model_dir, tmp_path / "b", *extra, "run.steps=2"),
            task=ParityTask()).train()  # fmt: skip
    run = tmp_path / "b" / "run"
    whole = logs(run)
    for name in ("metrics.jsonl", "samples.jsonl"):  # step 2's last line cut after 10 bytes
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[: data.rfind(b"\n", 0, len(data) - 1) + 11])
    resumed = make_config(tiny_model_dir, tmp_path / "b", *extra, "run.steps=2", "run.resume=true")
    with pytest.warns(RunDirWarning, match="restored the rows of step 2 from its checkpoint"):
        trainer = Trainer(resumed, task=ParityTask())
    trainer.train()
    assert logs(run) == whole and run_state(run) == "finished"  # ends at its last checkpoint
    longer = make_config(tiny_model_dir, tmp_path / "b", *extra, "run.steps=3", "run.resume=true")
    Trainer(longer, task=ParityTask()).train()
    assert logs(run) == logs(tmp_path / "a" / "run")


# ---- non-finite values mid-run ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "problem", "setting"),
    [
        (["algorithm.beta=3e38"], "the loss's gradient norm is inf", "algorithm.beta=3e+38"),
        (["algorithm.zero_variance=rl_zvp", "algorithm.zvp_alpha=3e38"],
         "the advantages include inf", "algorithm.zvp_alpha=3e+38"),
    ],
)  # fmt: skip
def test_a_loss_or_advantage_that_overflows_stops_in_one_line_keeping_the_last_checkpoint(
    tiny_model_dir, tmp_path, overrides, problem, setting
):
    from agpo_lab.errors import NonFiniteError

    cfg = make_config(tiny_model_dir, tmp_path, *overrides, "run.steps=3", "run.save_every=1")
    with pytest.raises(NonFiniteError) as info:
        Trainer(cfg, task=ParityTask()).train()
    message, run = str(info.value), tmp_path / "run"
    step = int(re.match(r"step (\d+): ", message).group(1))
    assert problem in message and setting in message and "\n" not in message, message
    assert run_state(run) == "failed"
    saved = sorted((run / "checkpoints").glob("*.safetensors"))
    assert [load_checkpoint(p)[1]["step"] for p in saved] == list(range(1, step))  # kept, intact
    rows = load_metrics(run) if (run / "metrics.jsonl").is_file() else None
    assert rows is None or list(rows["step"]) == list(range(1, step))


# ---- exit status 130 ---------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_train_stopped_by_a_signal_exits_130_and_resumes(run_config, tmp_path, signum):
    run = tmp_path / "stop"
    args = ["train", str(run_config), f"run.out_dir={tmp_path}", "run.name=stop",
            "run.steps=100000", "--quiet"]  # fmt: skip
    child = subprocess.Popen([str(AGPO_LAB), *args], stderr=subprocess.PIPE, text=True)
    while not (run / "metrics.jsonl").is_file() and child.poll() is None:
        time.sleep(0.02)  # wait for the first logged step
    child.send_signal(signum)
    _, err = child.communicate()
    assert child.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("agpo-lab train: interrupted after step")
    state = json.loads((run / "status.json").read_text())
    assert state["state"] == "interrupted"
    assert (run / "checkpoints" / f"step_{state['step']:06d}.safetensors").is_file()


def test_an_eval_stopped_by_sigterm_exits_130(tmp_path):
    args = [str(AGPO_LAB), "eval", "embedded", "eval.n_problems=200", "--out", str(tmp_path / "e")]
    child = subprocess.Popen(args, stderr=subprocess.PIPE)
    seen = b""
    while b"evaluation:" not in seen and child.poll() is None:  # its progress bar: evaluating
        seen += os.read(child.stderr.fileno(), 4096)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate()
    text = (seen + err).decode(errors="replace")
    assert child.returncode == 130, text[:1500] + "\n...\n" + text[-1500:]
    assert err.decode().strip().splitlines()[-1] == "agpo-lab eval: interrupted"
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("library", ["converts", "swallows"])
def test_an_interrupt_that_library_code_catches_still_ends_the_command_with_130(
    tmp_path, monkeypatch, capsys, library
):
    # transformers turns a KeyboardInterrupt inside a model load into another error (seen: "trying
    # to pop from empty mode stack"), which read as a broken model folder; code that swallows one
    # would go on and write results from a cut-short load.
    import agpo_lab.training.checkpoints as checkpoints
    from agpo_lab.cli import main
    from agpo_lab.errors import ModelLoadError

    assert threading.current_thread() is threading.main_thread()  # where handlers live
    real_load = checkpoints.load_run_policy

    def interrupted_load(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs here
        except KeyboardInterrupt:
            if library == "converts":
                raise ModelLoadError(
                    "cannot load model folder x: RuntimeError: mode stack"
                ) from None
        return real_load(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "load_run_policy", interrupted_load)
    before = signal.getsignal(signal.SIGTERM)
    status = main(
        ["eval", "embedded", "eval.n_problems=2", "--quiet", "--out", str(tmp_path / "e")]
    )
    assert status == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "agpo-lab eval: interrupted"
    assert not (tmp_path / "e").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # put back


@pytest.mark.parametrize("verb", ["train", "eval", "reproduce", "study", None])
def test_help_documents_exit_status_130(verb, capsys):
    from agpo_lab.cli import main

    assert main([verb, "--help"] if verb else ["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "130 stopped by Ctrl-C or SIGTERM" in out and "2 a bad setting" in out


# ---- every key, any value: accepted and run, or one line ------------------------------------------

PROPERTY_BASE = {
    "task": {"name": "arithmetic", "n_train": 10, "n_eval": 5, "levels": [1]},
    "rollout": {"group_size": 2, "max_new_tokens": 8},
    "optim": {"lr": 1e-4},
    "run": {"steps": 2, "prompts_per_step": 2, "device": "cpu", "save_every": 1,
            "log_samples_every": 1, "num_samples": 2, "name": "run"},
    "eval": {"n_problems": 2, "k": 2, "max_new_tokens": 8},
}  # fmt: skip
"""The embedded model with tiny settings: 2 steps of 2 prompts x G=2, 8 tokens, a checkpoint each."""
ALL_KEYS = [
    f"{section}.{key}"
    for section in SECTIONS
    for key in typing.get_type_hints(type(getattr(TrainConfig(), section)))
]
CHOICES = sorted(
    {
        str(choice)
        for section in SECTIONS
        for hint in typing.get_type_hints(type(getattr(TrainConfig(), section))).values()
        for arg in (hint, *typing.get_args(hint))
        if typing.get_origin(arg) is typing.Literal
        for choice in typing.get_args(arg)
    }
)
"""Every named choice of every setting (estimators, tasks, dtypes, ...), so that valid ones come up."""
RUN_BUDGET = 4096
"""The test runs an accepted config when its first steps sample and evaluate at most this many
tokens (rows x max_new_tokens x epochs x rounds): a value that only multiplies the work of a step
(mu, group_size, eval sizes) fails, if ever, the same way at every size, and slow is not hung."""


def any_value():
    """Values of every YAML type and magnitude, and the settings' own choices; plausible ones
    (small sizes, fractions, choices) often, so that many examples pass and run."""
    from hypothesis import strategies as st

    magnitude = st.builds(lambda m, e: m * 10.0**e, st.floats(-10, 10), st.integers(-330, 308))
    scalar = st.one_of(
        st.none(), st.booleans(), st.integers(-3, 64), magnitude,
        st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12), st.sampled_from(CHOICES),
    )  # fmt: skip
    plausible = st.one_of(st.integers(0, 16), st.floats(0, 2), st.sampled_from(CHOICES))
    nested = st.one_of(
        st.lists(scalar, max_size=4), st.dictionaries(st.text(max_size=4), scalar, max_size=2)
    )
    return st.one_of(plausible, plausible, scalar, scalar, nested)


def first_steps_work(cfg: TrainConfig) -> int:
    """Tokens the first two steps sample and evaluate, at most (see RUN_BUDGET)."""
    a, r, e = cfg.algorithm, cfg.rollout, cfg.eval
    rows = cfg.run.prompts_per_step * r.group_size
    work = rows * r.max_new_tokens * a.mu * (1 + a.max_resample_rounds)
    if cfg.run.eval_at_start or 1 <= cfg.run.eval_every <= 2:
        n = min(e.n_problems or cfg.task.n_eval, cfg.task.n_eval)
        work += n * (e.k + e.greedy) * e.max_new_tokens
    return work + cfg.task.n_train + cfg.task.n_eval


def test_every_key_with_any_value_is_accepted_and_runs_or_is_one_line(tmp_path, monkeypatch):
    """Random values of every type and magnitude for one or two keys at once go through
    `load_config`; a rejected one is one ConfigError line naming the section, an accepted one runs
    the first two RL steps on the embedded model with tiny settings: it finishes, or stops with
    one line (an AgpoLabError), never a traceback; a run that stops keeps its earlier
    checkpoints readable."""
    import copy

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from agpo_lab.errors import AgpoLabError
    from agpo_lab.models.loading import load_policy

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a random model name never waits for the hub
    monkeypatch.chdir(tmp_path)  # a random relative out_dir lands here
    embedded, tokenizer = load_policy(TrainConfig().model, "cpu")
    counter = iter(range(10**6))

    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])  # fmt: skip
    @given(st.dictionaries(st.sampled_from(ALL_KEYS), any_value(), min_size=1, max_size=2))
    def check(changes: dict):
        data = copy.deepcopy(PROPERTY_BASE)
        data["run"]["out_dir"] = str(tmp_path / f"runs{next(counter)}")
        for key, value in changes.items():
            section, name = key.split(".")
            data.setdefault(section, {})[name] = value
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(data))
        try:
            cfg = load_config(path)
        except ConfigError as err:
            message = str(err)
            assert "\n" not in message, (changes, message)
            assert any(key.split(".")[0] in message for key in changes), (changes, message)
            return
        out = Path(cfg.run.out_dir).resolve()
        if first_steps_work(cfg) > RUN_BUDGET or not out.is_relative_to(tmp_path):
            return  # accepted; too much work for a unit test, or a folder outside this test's
        own_model = any(key.startswith("model.") for key in changes)
        model = None if own_model else copy.deepcopy(embedded)
        try:
            trainer = Trainer(cfg, model=model, tokenizer=None if own_model else tokenizer)
            trainer.train(callback=lambda step, metrics: step >= 2)
        except AgpoLabError as err:
            message = str(err)
            assert "\n" not in message, (changes, message)
            run = Path(cfg.run.out_dir) / cfg.run.name
            for checkpoint in (run / "checkpoints").glob("*.safetensors"):
                load_checkpoint(checkpoint)  # every kept checkpoint is intact

    check()
