"""Time-bounded math-verify checks in persistent worker processes.

Why a process and not a thread: math-verify's own timeouts use `signal.alarm`, which only works
in the main thread, and a sympy simplification stuck in C code cannot be interrupted at all. So
each check runs in a small worker process that arms its own (soft) timer in its own main thread,
and the caller kills and replaces a worker that overruns even that, so every check is bounded
from any thread. A timed-out or crashed check counts as "not equal".

This file imports only the standard library at module level: the worker is started with
``python -I`` and loads this file by path, so it never imports agpo_lab (or torch).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

WORKER_START_TIMEOUT_S = 60.0
"""Longest wait for a fresh worker to import math-verify and warm sympy up."""
SOFT_FRACTION = 0.8
"""The worker gives up by itself at this fraction of a check's budget (the kill is the backstop)."""
WORKER_MEMORY_BYTES = 2 * 1024**3
"""Address-space limit of a worker, so a runaway expression hits MemoryError, not the OOM killer."""
WORKERS_ENV = "AGPO_LAB_VERIFY_WORKERS"
"""Environment variable setting the pool size (default: min(2, CPU count))."""

_WORKER_BOOT = (
    "import importlib.util, sys; "
    "spec = importlib.util.spec_from_file_location('_agpo_verify_worker', sys.argv[1]); "
    "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
    "module.worker_main()"
)


class _SoftTimeout(BaseException):
    """Raised inside the worker by its own timer; BaseException so library `except Exception`
    blocks cannot swallow it."""


def worker_main() -> None:
    """Serve `{"gold", "pred", "soft_s"}` JSON lines on stdin with `{"ok"}` lines on stdout."""
    import logging
    import resource

    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
    logging.disable(logging.CRITICAL)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    from math_verify import LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(boxed_match_priority=0)]

    def same(gold: str, pred: str) -> bool:
        gold_parsed = parse(f"\\boxed{{{gold}}}", config, parsing_timeout=None)
        pred_parsed = parse(f"\\boxed{{{pred}}}", config, parsing_timeout=None)
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))

    def on_alarm(signum, frame):
        raise _SoftTimeout

    signal.signal(signal.SIGALRM, on_alarm)
    # sympy imports much lazily on first use: pay that now, not in the first checks' budgets.
    for gold, pred in [("(x+1)^2", "x^2+2x+1"), ("\\{1, 2\\}", "(1, 2]"), ("\\frac{1}{3}", "0.3")]:
        same(gold, pred)
    protocol.write('{"ready": true}\n')
    protocol.flush()
    for line in sys.stdin:
        request = json.loads(line)
        signal.setitimer(signal.ITIMER_REAL, request["soft_s"])
        try:
            ok = same(request["gold"], request["pred"])
        except (_SoftTimeout, Exception):
            ok = False
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        protocol.write(json.dumps({"ok": ok}) + "\n")
        protocol.flush()


class Worker:
    """One math-verify worker process; one check at a time (guarded by `lock`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.process: subprocess.Popen | None = None
        self.buffer = b""

    def _start(self) -> None:
        command = [sys.executable, "-I", "-c", _WORKER_BOOT, os.path.abspath(__file__)]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        self.buffer = b""
        if self._read_line(time.monotonic() + WORKER_START_TIMEOUT_S) is None:
            self.stop()
            raise RuntimeError(
                "the math-verify worker process failed to start; check that "
                f"`{sys.executable} -c 'import math_verify'` works"
            )

    def _read_line(self, deadline: float) -> bytes | None:
        """One line from the worker, or None on timeout or exit."""
        assert self.process is not None and self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def stop(self) -> None:
        """Kill the process (if any); the next check starts a fresh one."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            for stream in (self.process.stdin, self.process.stdout):
                stream.close()
        self.process = None

    def check(self, gold: str, pred: str, timeout_s: float) -> bool:
        """Caller holds `self.lock`. Start-up time is not counted against `timeout_s`."""
        if self.process is None or self.process.poll() is not None:
            self.stop()
            self._start()
        assert self.process is not None and self.process.stdin is not None
        request = {"gold": gold, "pred": pred, "soft_s": max(0.01, SOFT_FRACTION * timeout_s)}
        deadline = time.monotonic() + timeout_s
        try:
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            self.process.stdin.flush()
            line = self._read_line(deadline)
        except OSError:  # the worker died (e.g. out of memory): a fresh one next time
            line = None
        except BaseException:  # e.g. KeyboardInterrupt: an unread answer would desynchronise
            self.stop()
            raise
        if line is None:  # overran even its own soft timer (stuck in C code): kill it
            self.stop()
            return False
        return bool(json.loads(line)["ok"])


class WorkerPool:
    """A few workers shared by all threads; a check takes any idle one."""

    def __init__(self, size: int) -> None:
        self.workers = [Worker() for _ in range(size)]
        self.owner_pid = os.getpid()
        self.next = 0
        self.next_lock = threading.Lock()

    def check(self, gold: str, pred: str, timeout_s: float) -> bool:
        """Whether math-verify finds `pred` equal to `gold` in `timeout_s` (False on overrun)."""
        for worker in self.workers:
            if worker.lock.acquire(blocking=False):
                break
        else:  # all busy: queue on one of them, round robin
            with self.next_lock:
                worker = self.workers[self.next % len(self.workers)]
                self.next += 1
            worker.lock.acquire()
        try:
            return worker.check(gold, pred, timeout_s)
        finally:
            worker.lock.release()

    def close(self) -> None:
        """Stop every worker (only in the process that started them)."""
        if os.getpid() == self.owner_pid:  # a forked child must not kill its parent's workers
            for worker in self.workers:
                worker.stop()


_POOL: WorkerPool | None = None
_POOL_LOCK = threading.Lock()


def shared_pool() -> WorkerPool:
    """The process-wide pool (created on first use, sized by env AGPO_LAB_VERIFY_WORKERS)."""
    global _POOL
    with _POOL_LOCK:
        # After a fork the child must not share its parent's pipes: it gets its own pool.
        if _POOL is None or _POOL.owner_pid != os.getpid():
            size = os.environ.get(WORKERS_ENV, str(min(2, os.cpu_count() or 1)))
            if not size.isdigit() or int(size) < 1:
                raise ValueError(f"{WORKERS_ENV}={size!r}; set a whole number >= 1")
            _POOL = WorkerPool(int(size))
            atexit.register(_POOL.close)
        return _POOL
