"""The benchmark scripts run end to end with their smallest settings and print their ratio lines.

These check that the scripts work, never how fast anything is (timings belong to the scripts'
own output, measured on an idle machine).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT

BENCH_ROLLOUT = REPO_ROOT / "benchmarks" / "bench_rollout.py"


@pytest.mark.slow
def test_bench_trainer_quick_prints_ratios():
    script = REPO_ROOT / "benchmarks" / "bench_trainer.py"
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--model", "random", "--hidden", "32"],
        capture_output=True,
        text=True,
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
    assert re.search(r"^machine limit: dense matmul \d+\.\d GFLOP/s", out, flags=re.MULTILINE)
    assert len(re.findall(r"FLOP-bound step \d+\.\d+ s .* -> \d+% of the limit", out)) == 2
    for side, what in (("agpo_lab", "sampling \\+ rewards"), ("TRL 1.16", "model.generate")):
        pattern = rf"^\({side}: {what} \d+\.\d+ s = \d+% of the mean step \d+\.\d+ s; the rest"
        assert re.search(pattern, out, flags=re.MULTILINE), out
    assert re.search(r"^\(ratio if our sampling were free: \d+\.\d+;", out, re.MULTILINE), out


@pytest.mark.slow
def test_bench_warmstart_prints_its_table_and_ratio(tiny_model_dir):
    script = REPO_ROOT / "benchmarks" / "bench_warmstart.py"
    args = ["--model", str(tiny_model_dir), "--steps", "1", "--warmup", "0", "--batch-size", "2"]
    done = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    match = re.search(r"^ratio tokens/s ours/TRL: (\d+\.\d+)", out, flags=re.MULTILINE)
    assert match and float(match.group(1)) > 0, out
    tokens = re.search(r"^tokens per step \(real\)\s+(\d+)\s+(\d+)", out, flags=re.MULTILINE)
    assert tokens and tokens.group(1) == tokens.group(2) and int(tokens.group(1)) > 0, out
    assert re.search(r"^peak RSS \(MiB\)\s+\d+\s+\d+", out, flags=re.MULTILINE), out


def test_flop_limit_counts_linear_weights_and_passes():
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from flop_limit import flops_per_token, linear_weights, matmul_gflops, percent_of_limit

    model = torch.nn.Sequential(
        torch.nn.Embedding(10, 4), torch.nn.Linear(4, 6), torch.nn.Linear(6, 10)
    )
    assert linear_weights(model) == 4 * 6 + 6 * 10  # the embedding is a lookup, not a matmul
    assert flops_per_token(model) == 2 * 84
    assert flops_per_token(model, backward=True, train_weights=False) == 4 * 84
    assert flops_per_token(model, backward=True) == 6 * 84
    assert matmul_gflops(size=64, repeats=2, device="cpu") > 0
    assert percent_of_limit(25.0, 100.0) == 25.0


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_rollout", BENCH_ROLLOUT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_rollout_helpers():
    bench = _bench_module()
    assert bench.early_stop_bias(54, 32) == pytest.approx(0.5359, abs=1e-3)
    eos = 2
    assert bench.generated_tokens(torch.tensor([[5, 2, 0], [5, 6, 7]]), eos) == 2 + 3


@pytest.mark.parametrize("impl", ["ours", "hf", "ours_bf16", "hf_bf16"])
@pytest.mark.parametrize("case", ["forced", "early"])
def test_bench_rollout_worker_smoke(impl, case):
    bench = _bench_module()
    args = bench.argparse.Namespace(
        model=None,
        impl=impl,
        case=case,
        batch=2,
        max_new_tokens=4,
        temperature=1.0,
        repeats=1,
        lora=False,
    )
    result = bench.worker(args)
    assert result["tokens_per_s"] > 0 and result["peak_rss_mb"] >= result["rss_after_load_mb"] > 0
    if case == "forced":
        assert result["tokens"] == 2 * 4


@pytest.mark.slow
def test_bench_rollout_runs_end_to_end():
    # one of our variants (the compiled step has its own test in test_rollout.py): the script's
    # plumbing is the same for every variant, and each costs two fresh processes
    cmd = [sys.executable, str(BENCH_ROLLOUT), "--batch", "2", "--max-new-tokens", "4"]
    cmd += ["--repeats", "1", "--impls", "ours"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("ratio agpo_lab/model.generate") == 2
    assert "compile" not in done.stdout
    assert done.stdout.count("machine limit (float32): matmul") == 2


@pytest.mark.slow
def test_profile_script_splits_a_rollout_and_a_step_and_prints_the_operators():
    script = REPO_ROOT / "benchmarks" / "profile_step.py"
    rollout = [sys.executable, str(script), "rollout", "--model", "random", "--batch", "2",
               "--max-new-tokens", "4", "--case", "early", "--rows", "3"]  # fmt: skip
    step = [sys.executable, str(script), "step", "--rows", "3", "--lora", "--bf16", "--steps", "1"]
    for cmd in (rollout, step):
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        parts = (
            ["forward", "sampling", "cache row selection"]
            if "rollout" in cmd
            else ["rollout", "update"]
        )
        for part in parts:
            assert re.search(rf"^  {part}\s+\d+\.\d+ m?s\s+\d+\.\d%", done.stdout, re.MULTILINE), (
                done.stdout
            )
        assert "Self CPU time total" in done.stdout
    assert "LoRA True, weights in float32, rollout and update in bfloat16" in done.stdout


@pytest.mark.slow
def test_profile_script_repeats_the_update_on_one_batch():
    script = REPO_ROOT / "benchmarks" / "profile_step.py"
    cmd = [sys.executable, str(script), "update", "--lora", "--bf16", "--bf16-activations",
           "--steps", "2"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(bfloat16 activations)" in done.stdout
    seconds = re.search(r"^seconds per update: (.+) \(first: warm-up\)$", done.stdout, re.MULTILINE)
    assert seconds and len(seconds.group(1).split(", ")) == 3, done.stdout
    tokens = re.search(r"^update tokens (\d+) \((\d+) with padding\)$", done.stdout, re.MULTILINE)
    assert tokens and 0 < int(tokens.group(1)) <= int(tokens.group(2)), done.stdout
    refused = subprocess.run(
        [sys.executable, str(script), "update", "--bf16-activations"],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )  # fmt: skip
    assert refused.returncode == 2 and "--bf16-activations needs --bf16" in refused.stderr


@pytest.mark.slow
def test_bench_thread_wait_prints_each_setting_against_the_default():
    script = REPO_ROOT / "benchmarks" / "bench_thread_wait.py"
    cmd = [sys.executable, str(script), "--steps", "1", "--per-level", "1",
           "--settings", "default", "spin 10000"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^default\s+\d+\s+[\d.]+\s+[\d.]+\s+1\.00x, 1\.00x$", done.stdout, re.M)
    assert re.search(r"^spin 10000\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+x, [\d.]+x$", done.stdout, re.M)


def test_bench_update_kernels_prints_each_piece_against_its_alternative():
    script = REPO_ROOT / "benchmarks" / "bench_update_kernels.py"
    cmd = [sys.executable, str(script), "--vocab", "300", "--tokens", "8", "--repeats", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    ratios = re.findall(r"^(.+?)\s+[\d.]+ ms /\s+[\d.]+ ms = [\d.]+x$", done.stdout, re.M)
    assert len(ratios) == 6 and any("fused" in r for r in ratios), done.stdout
