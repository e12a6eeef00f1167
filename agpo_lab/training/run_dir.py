"""Run directories: what a run writes, kept consistent through crashes, full disks and a second writer.

    runs/<name>/
      config.yaml                 the full TrainConfig of the run
      metrics.jsonl               one JSON object per step, namespaced keys ("reward/mean", ...)
      samples.jsonl               sample completions with their rewards and advantages
      checkpoints/step_000050.safetensors   trainable weights + optimizer/scheduler/RNG state
      final/                      the trained policy as a plain `from_pretrained` folder
      status.json                 running / interrupted / finished / failed, and the step reached
      .lock                       held by the one process writing the run (names it)

A run directory behaves like a small database:

- **One writer.** `RunDir.open` takes an exclusive lock (flock on .lock); a second process gets a
  one-line error naming the holder. The operating system drops the lock when the holder dies,
  even on kill -9, so a lock is never stale.
- **Atomic files.** Whole files (config, status, checkpoints) are written to a temporary file,
  flushed to disk and moved over the old one, so a crash leaves the old file or the new one, never
  half of one; temporaries a crash left behind are removed by the next `open`.
- **Append-only logs that survive a torn write** (`LOGS`): a last line cut short by a crash or a
  full disk is dropped by the next `open`, with a warning, and its bytes are kept in <log>.torn;
  a row of a step that has a checkpoint comes back from the copy the checkpoint keeps
  (`restore_rows`), so the logs always reach the last checkpointed step.
- **Resume rolls every log back** to the checkpoint's step (`roll_back`): the rows of steps that
  will run again move to <log>.orphaned.jsonl; nothing is deleted.

Failures to write (a full disk, a read-only folder) are `RunDirError`s: one line, and everything
written before is intact. The checkpoint file format is in `agpo_lab.training.checkpoints`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from agpo_lab.errors import DataError, MissingFileError, RunDirError
from agpo_lab.training import faults

LOGS = ("metrics.jsonl", "samples.jsonl")
"""The append-only, step-keyed logs of a run: repaired on open, rolled back on resume."""
STATES = ("running", "interrupted", "finished", "failed")
"""What status.json can say; `run_state` adds "stopped" for a running run whose process is gone."""


class RunDirWarning(UserWarning):
    """Something in a run directory was repaired (a torn log line, a corrupt checkpoint)."""


class FolderLock:
    """An exclusive lock on a folder, held by one process at a time, that names its holder.

    flock on <folder>/.lock: the operating system releases it when the holder exits, however it
    exits, so it is never stale. The lock file records the holder's pid, host, start time and
    command for the error a second process gets.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / ".lock"
        self._file = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._file is not None

    def acquire(self, rename_hint: str = "folder") -> None:
        """Create the folder if needed and take the lock, or raise RunDirError naming the holder
        (or why the folder cannot be used); `rename_hint` is what the user can change instead."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock_file = open(self.path, "a+")  # noqa: SIM115 (held until release)
        except OSError as err:
            raise RunDirError(
                f"cannot use {self.folder} ({_reason(err)}); choose another {rename_hint}"
            ) from None
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise RunDirError(
                f"{self.folder} is in use by {_describe_holder(self.path)}; wait for it to "
                f"finish, stop it, or choose another {rename_hint}"
            ) from None
        self._file = lock_file
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:300],
        }
        with contextlib.suppress(OSError):  # the lock itself is what matters
            lock_file.seek(0)
            lock_file.truncate()
            lock_file.write(json.dumps(holder) + "\n")
            lock_file.flush()

    def release(self) -> None:
        """Release the lock (a no-op when not held)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


class RunDir:
    """Paths and writers of one run directory (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config_path = self.path / "config.yaml"
        self.metrics_path = self.path / "metrics.jsonl"
        self.samples_path = self.path / "samples.jsonl"
        self.status_path = self.path / "status.json"
        self.checkpoint_dir = self.path / "checkpoints"
        self.final_dir = self.path / "final"
        self.lock = FolderLock(self.path)

    # ---- opening: folder, lock, repair --------------------------------------------------------

    def open(self) -> RunDir:
        """Create the folder if needed, take its lock, and repair what a crash left behind.

        Raises RunDirError (one line) when the path cannot be a writable folder or another
        process holds the run. Opening a run this object already holds does nothing.
        """
        if not self.lock.held:
            self.lock.acquire("run.out_dir or run.name")
            self._repair()
        return self

    def close(self) -> None:
        """Release the lock (the OS also releases it when the process ends)."""
        self.lock.release()

    @property
    def is_open(self) -> bool:
        """Whether this object holds the run's lock."""
        return self.lock.held

    def _repair(self) -> None:
        """Remove temporaries a crash left, and drop torn last lines of the logs (kept aside)."""
        for folder in (self.path, self.checkpoint_dir):
            for tmp in folder.glob("*.tmp") if folder.is_dir() else []:
                with contextlib.suppress(OSError):
                    if tmp.is_dir():
                        shutil.rmtree(tmp)
                    else:
                        tmp.unlink()
        for name in LOGS:
            log = self.path / name
            if not log.is_file() or log.stat().st_size == 0:
                continue
            data = log.read_bytes()
            if data.endswith(b"\n"):
                continue
            keep = data[: data.rfind(b"\n") + 1]
            with open(log.with_name(name + ".torn"), "ab") as torn:
                torn.write(data[len(keep) :] + b"\n")
            _atomic_write(log, keep)
            warnings.warn(
                f"{log}: dropped a partial last line ({len(data) - len(keep)} bytes, a write cut "
                f"short by a crash or a full disk); its bytes are in {name}.torn",
                RunDirWarning,
                stacklevel=3,
            )

    # ---- what a run holds ---------------------------------------------------------------------

    def holds_a_run(self) -> bool:
        """Whether a run has written here (a checkpoint or logged metrics)."""
        has_metrics = self.metrics_path.is_file() and self.metrics_path.stat().st_size > 0
        return has_metrics or any(self.checkpoint_dir.glob("step_*.safetensors"))

    def checkpoint_path(self, step: int) -> Path:
        """Where the checkpoint after `step` completed steps lives."""
        return self.checkpoint_dir / f"step_{step:06d}.safetensors"

    # ---- writing ------------------------------------------------------------------------------

    def write_config(self, text: str) -> None:
        """Write config.yaml (atomically)."""
        self._write(self.config_path, text.encode())
        faults.point("config.written")

    def log_metrics(self, row: dict[str, Any]) -> None:
        """Append one step's metrics as a JSON line, flushed to disk (NaN / inf become null)."""
        self._append(self.metrics_path, [row])

    def log_samples(self, rows: list[dict[str, Any]]) -> None:
        """Append sample completions, one JSON line each."""
        self._append(self.samples_path, rows)

    def set_status(self, state: str, step: int, steps: int, message: str = "") -> None:
        """Record the run's state in status.json: running, interrupted, finished or failed."""
        if state not in STATES:
            raise ValueError(f"state {state!r}: use one of {STATES}")
        status = {"state": state, "step": step, "steps": steps, "message": message}
        status["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self._write(self.status_path, (json.dumps(status) + "\n").encode())

    def roll_back(self, last_step: int) -> int:
        """Keep only the log rows of steps <= last_step (a resume runs the later steps again).

        The removed rows of each log are appended to <log>.orphaned.jsonl rather than deleted.
        Returns how many rows were moved, over all logs.
        """
        moved_total = 0
        for name in LOGS:
            log = self.path / name
            if not log.is_file():
                continue
            rows = _read_jsonl(log)
            keep = [r for r in rows if r.get("step", 0) <= last_step]
            moved = [r for r in rows if r.get("step", 0) > last_step]
            if moved:
                orphaned = log.with_name(log.stem + ".orphaned.jsonl")
                self._append(orphaned, moved)
                self._write(log, "".join(_json_line(r) for r in keep).encode())
                moved_total += len(moved)
        return moved_total

    def restore_rows(self, step: int, saved: dict[str, list[dict[str, Any]]]) -> list[str]:
        """Put back the rows of `step` (the checkpointed step, the last one in the logs after
        `roll_back`) that a log lost, from the copy its checkpoint keeps: a torn last line is
        never a lost step. Returns the names of the logs restored, with a warning."""
        restored = []
        for name, rows in saved.items():
            log, rows = self.path / name, [r for r in rows if r.get("step") == step]
            if name not in LOGS or not rows:
                continue
            kept = _read_jsonl(log) if log.is_file() else []
            if sum(r.get("step") == step for r in kept) >= len(rows):
                continue
            kept = [r for r in kept if r.get("step") != step] + rows
            self._write(log, "".join(_json_line(r) for r in kept).encode())
            restored.append(name)
            warnings.warn(
                f"{log}: restored the rows of step {step} from its checkpoint (the log had lost "
                "them)",
                RunDirWarning,
                stacklevel=2,
            )
        return restored

    def _write(self, path: Path, data: bytes) -> None:
        with contextlib.suppress(OSError):  # a failure to create it shows in the write
            path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, data)

    def _append(self, path: Path, rows: list[dict[str, Any]]) -> None:
        text = "".join(_json_line(r) for r in rows)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                half = len(text) // 2  # two writes, so a failpoint can stop between them
                f.write(text[:half])
                f.flush()
                faults.point("log.half_written")
                f.write(text[half:])
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            raise _write_error(path, err) from None
        faults.point("log.appended")


# ---- reading ---------------------------------------------------------------------------------


def load_metrics(run_dir: str | Path) -> pd.DataFrame:
    """metrics.jsonl as a DataFrame (one row per logged step; null values read as NaN).

    Example: ``load_metrics("runs/agpo-seed0").plot(x="step", y="reward/accuracy")``.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise MissingFileError(f"no metrics.jsonl in {run_dir}; is it a run directory?")
    return pd.DataFrame(_read_jsonl(path))


def load_samples(run_dir: str | Path) -> pd.DataFrame:
    """samples.jsonl as a DataFrame (empty if no samples were logged)."""
    path = Path(run_dir) / "samples.jsonl"
    return pd.DataFrame(_read_jsonl(path)) if path.is_file() else pd.DataFrame()


def run_state(run_dir: str | Path) -> str:
    """The state of a run: "running", "interrupted", "finished", "failed", "stopped" (status says
    running but no process holds the run: killed or crashed, resumable) or "unknown" (no status).
    """
    path = Path(run_dir)
    try:
        state = json.loads((path / "status.json").read_text())["state"]
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"
    if state == "running" and not _is_locked(path / ".lock"):
        return "stopped"
    return state


def check_writable(path: Path) -> None:
    """Raise RunDirError unless a file can be written at `path` (its folder exists and takes a new
    file): the check a command makes before expensive work whose result it must save."""
    probe = path.with_name(f".{path.name}.probe.tmp")
    try:
        with open(probe, "wb") as f:
            f.write(b"0")
        probe.unlink()
    except OSError as err:
        raise RunDirError(
            f"cannot write {path} ({_reason(err)}); choose a writable place for it (--out)"
        ) from None


def write_file(path: Path, data: bytes) -> None:
    """Write a whole file atomically; a failure is a RunDirError and leaves any old file intact."""
    try:
        _atomic_write(path, data)
    except OSError as err:
        raise _write_error(path, err) from None


# ---- helpers ---------------------------------------------------------------------------------


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


def _write_error(path: Path, err: OSError) -> RunDirError:
    return RunDirError(
        f"could not write {path} ({_reason(err)}); what was written before is intact: fix the "
        "cause (free space, permissions) and resume the run"
    )


def _is_locked(lock_path: Path) -> bool:
    if not lock_path.is_file():
        return False
    with open(lock_path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def _describe_holder(lock_path: Path) -> str:
    try:
        holder = json.loads(lock_path.read_text())
    except (OSError, ValueError):
        return "another process"
    who = f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
    if holder.get("pid") == os.getpid():
        who += " (this process: another Trainer on this run is still open; close() it)"
    return f"{who} ({holder.get('command', '')})"


def _json_line(row: dict[str, Any]) -> str:
    clean = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()
    }
    return json.dumps(clean) + "\n"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parse a JSONL file; a torn last line (a crash mid-write) is skipped with a warning."""
    text = path.read_text()
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1 and not text.endswith("\n"):
                warnings.warn(f"{path}: ignoring an incomplete last line", RunDirWarning, 3)
                continue
            raise DataError(f"{path}: line {i + 1} is not valid JSON; fix or remove it") from None
    return rows


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a flushed temporary file and os.replace (all or nothing)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
