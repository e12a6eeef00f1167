"""Failpoints: named places in the write path where a test can kill the process.

Set ``AGPO_LAB_FAULT=<point>:<n>`` and the process kills itself with SIGKILL (no handler, no
cleanup, as a crash or the kernel's OOM killer would) the n-th time it passes `point`; unset, a
failpoint costs one dictionary lookup. tests/test_faults.py draws points and counts with a fixed
seed and checks that a killed run resumes to exactly the uninterrupted one.

The points: step.start, step.rollout (sampled, not yet updated), update.optimizer_step (weights
half-way through an update), log.half_written (half a metrics or samples line on disk),
log.appended, checkpoint.written (temporary file complete, not yet in place), checkpoint.replaced,
config.written, export.written.
"""

from __future__ import annotations

import os
import signal

ENV = "AGPO_LAB_FAULT"
"""The environment variable that arms one failpoint: ``<point>:<n>`` (n counts from 1)."""

_hits: dict[str, int] = {}


def _armed() -> tuple[str, int] | None:
    spec = os.environ.get(ENV, "")
    point, _, count = spec.rpartition(":")
    return (point, int(count)) if point and count.isdigit() else None


def point(name: str) -> None:
    """Pass the failpoint `name`: kill this process if it is armed here and this is the n-th pass."""
    armed = _armed()
    if armed is None or armed[0] != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == armed[1]:
        os.kill(os.getpid(), signal.SIGKILL)
