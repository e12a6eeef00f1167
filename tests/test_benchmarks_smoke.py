"""The trainer benchmark runs end to end with its smallest settings and prints its ratio lines."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_trainer_quick_prints_ratios():
    script = REPO_ROOT / "benchmarks" / "bench_trainer.py"
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--model", "random", "--hidden", "32"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for label in ("step time", "s/token", "peak memory"):
        match = re.search(rf"^ratio {label} ours/TRL: (\d+\.\d+)", out, flags=re.MULTILINE)
        assert match, f"no '{label}' ratio line in:\n{out}"
        assert float(match.group(1)) > 0
    assert re.search(
        r"^median step seconds \(wall\)\s+\d+\.\d+\s+\d+\.\d+", out, flags=re.MULTILINE
    ), out
