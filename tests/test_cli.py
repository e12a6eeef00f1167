"""`agpo-lab` command line: train with overrides, resume a run directory, one-line config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agpo_lab.cli import main

AGPO_LAB = Path(sys.executable).with_name("agpo-lab")


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    """A tiny Qwen2 + char tokenizer on disk and a YAML config that trains it on arithmetic."""
    from agpo_lab.models.tiny import build_tiny_causal_lm
    from agpo_lab.models.tokenizer import build_char_tokenizer

    root = tmp_path_factory.mktemp("cli")
    tok = build_char_tokenizer()
    model = build_tiny_causal_lm(
        tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
        max_position_embeddings=128,
    )  # fmt: skip
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    path = root / "tiny.yaml"
    path.write_text(
        f"model: {{name_or_path: {root / 'model'}}}\n"
        "task: {name: arithmetic, n_train: 20, n_eval: 10, levels: [1]}\n"
        "rollout: {group_size: 2, max_new_tokens: 8}\n"
        f"run: {{steps: 5, prompts_per_step: 2, out_dir: {root / 'runs'}, name: tiny, device: cpu,"
        " save_every: 0, log_samples_every: 1}\n"
    )
    return path


@pytest.mark.slow
def test_train_subprocess_with_overrides_then_resume_the_run_dir(tiny_config):
    result = subprocess.run(
        [str(AGPO_LAB), "train", str(tiny_config), "run.steps=2", "optim.lr=1e-3", "--quiet"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONHASHSEED": "0"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tiny_config.parent / "runs" / "tiny"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "reward/accuracy" in rows[0]
    assert "optim.lr" not in (run_dir / "config.yaml").read_text()
    assert "lr: 0.001" in (run_dir / "config.yaml").read_text()

    # a run directory in place of a config resumes it (here with more steps)
    assert main(["train", str(run_dir), "run.steps=3", "--quiet"]) == 0
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in rows] == [1, 2, 3]


def test_bad_config_exits_2_with_one_line(tiny_config, capsys):
    assert main(["train", str(tiny_config), "rollout.group_size=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("agpo-lab train:") and "G >= 2" in err and "\n" not in err
    assert main(["train", str(tiny_config), "algorithm.nope=1"]) == 2
    assert "unknown key(s) ['nope'] in section 'algorithm'" in capsys.readouterr().err
    assert main(["train", "missing.yaml"]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
def test_bad_config_in_a_subprocess_has_no_traceback(tiny_config):
    result = subprocess.run(
        [str(AGPO_LAB), "train", str(tiny_config), "optim.lr=-1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "optim.lr" in result.stderr


def test_bench_lists_or_rejects(capsys):
    assert main(["bench"]) == 0
    assert main(["bench", "no_such_benchmark"]) == 2
    assert "no benchmark 'no_such_benchmark'" in capsys.readouterr().err
