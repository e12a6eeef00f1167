"""The main job: planning, statistics of the summary, and a quick end-to-end run."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from agpo_lab.cli import main
from agpo_lab.config import ReproduceConfig
from agpo_lab.experiments import reproduce
from agpo_lab.experiments.methods import METHODS, REFERENCE
from agpo_lab.experiments.report import redundant_share, summarize, to_markdown
from agpo_lab.experiments.stats import t_critical_95


def test_plan_has_reference_and_every_method_seed_pair(tmp_path):
    cfg = ReproduceConfig(out_dir=str(tmp_path), seeds=(0, 1, 2))
    jobs = reproduce.plan_jobs(cfg)
    assert len(jobs) == (1 + len(cfg.methods)) * 3 and set(cfg.methods) <= set(METHODS)
    agpo = next(j for j in jobs if j.method == "agpo" and j.seed == 1)
    assert "algorithm.estimator=agpo" in agpo.overrides
    assert "algorithm.length_reward=agpo" in agpo.overrides
    assert agpo.run_dir == tmp_path / "embedded" / "runs" / "agpo" / "seed1"
    quick = reproduce.plan_jobs(ReproduceConfig(quick=True, seeds=(4, 5)))
    assert {j.seed for j in quick} == {4}
    assert all("run.steps=3" in j.overrides for j in quick if j.method != REFERENCE)


def test_parallel_runs_share_the_thread_budget(monkeypatch):
    import os

    cfg = ReproduceConfig(jobs=2, quick=True)
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    assert {job.threads for job in reproduce.plan_jobs(cfg)} == {3}
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # never below one thread
    assert {job.threads for job in reproduce.plan_jobs(cfg)} == {1}
    monkeypatch.delenv("OMP_NUM_THREADS")
    cores = os.cpu_count() or 1
    assert {job.threads for job in reproduce.plan_jobs(cfg)} == {max(1, cores // 2)}


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown; valid: grpo"):
        reproduce.plan_jobs(ReproduceConfig(methods=("ppo",)))
    with pytest.raises(ValueError, match="base_config=.*file not found"):
        ReproduceConfig(base_config=str(tmp_path / "nope.yaml"))
    with pytest.raises(ValueError, match="seeds"):
        ReproduceConfig(seeds=())


def test_a_rerun_with_other_settings_is_refused_before_anything_runs(tmp_path, monkeypatch):
    base = tmp_path / "base.yaml"
    base.write_text(Path(ReproduceConfig().base_config).read_text())
    cfg = ReproduceConfig(out_dir=str(tmp_path), base_config=str(base), methods=("grpo",),
                          seeds=(0,), quick=True, docs=False)  # fmt: skip
    jobs = reproduce.plan_jobs(cfg)
    for job in jobs:  # what `_start` records when a job first starts
        job.run_dir.mkdir(parents=True)
        (job.run_dir / reproduce.SETTINGS_FILE).write_text(json.dumps(reproduce.job_settings(job)))
    root = tmp_path / "embedded-quick"
    reproduce.check_settings(jobs, root)  # the same settings: fine
    more = reproduce.plan_jobs(dataclasses.replace(cfg, overrides=("optim.lr=1e-4",)))
    with pytest.raises(ValueError, match=r"seed0 holds a run made with another overrides; move"):
        reproduce.check_settings(more, root)
    base.write_text(base.read_text() + "\n# edited\n")
    monkeypatch.setattr(reproduce, "_run_jobs", lambda *a: pytest.fail("a job was started"))
    with pytest.raises(ValueError, match="another base_config; move .*embedded-quick aside"):
        reproduce.reproduce(cfg, progress=False)


def test_summary_statistics_by_hand():
    rows = []
    for method, accuracy, tokens in (("grpo", [0.5, 0.6, 0.7], [60, 62, 64]),
                                     ("agpo", [0.6, 0.6, 0.6], [40, 42, 44])):  # fmt: skip
        for seed, (a, t) in enumerate(zip(accuracy, tokens, strict=True)):
            rows.append({"method": method, "seed": seed, "eval/pass@1_sampled": a,
                         "eval/pass@1_greedy": a, "eval/mean_tokens": t,
                         "eval/mean_tokens_correct": t - 1, "wall_seconds": 10.0})  # fmt: skip
    training = pd.DataFrame({"method": ["agpo"] * 10, "seed": [0] * 10, "step": range(1, 11),
                             "zero_var/frac": [0.0] * 8 + [0.5, 0.7]})  # fmt: skip
    summary = summarize(pd.DataFrame(rows), training, baseline="grpo", reference="start")
    grpo, agpo = (summary.set_index("method").loc[m] for m in ("grpo", "agpo"))
    assert grpo["accuracy_mean"] == pytest.approx(0.6)
    assert grpo["accuracy_ci"] == pytest.approx(t_critical_95(2) * 0.1 / math.sqrt(3))
    assert agpo["accuracy_ci"] == pytest.approx(0.0)
    assert agpo["token_ratio_vs_grpo"] == pytest.approx(62 / 42)
    assert grpo["token_ratio_vs_grpo"] == pytest.approx(1.0)
    assert agpo["final_zero_var_frac"] == pytest.approx(0.6)  # mean of the last 20% of steps
    assert math.isnan(grpo["final_zero_var_frac"])  # no training metrics given for grpo
    table = to_markdown(summary, "grpo")
    assert "| agpo | 3 | 0.600 ± 0.000 |" in table and "1.48 ±" in table
    assert "redundant" not in table  # no records given: no column
    records = pd.DataFrame(
        [
            {"method": method, "seed": seed, "text": text, "correct": correct}
            for method in ("grpo", "agpo")
            for seed in range(3)
            for text, correct in (
                ("3+4=7;ans:7", True),
                ("3+4=7;again 3+4=7;ans:7" if method == "grpo" or seed == 0 else "3;ans:3", True),
            )
        ]
    )
    shares = redundant_share(records).set_index(["method", "seed"])
    assert shares.loc[("grpo", 1), "redundant"] == 0.5 and shares.loc[("agpo", 1), "redundant"] == 0
    with_records = summarize(pd.DataFrame(rows), training, "grpo", "start", records)
    assert with_records.set_index("method").loc["agpo", "redundant_mean"] == pytest.approx(1 / 6)
    assert "| with a redundant segment |" in to_markdown(with_records, "grpo")


@pytest.mark.slow
def test_quick_reproduce_end_to_end_and_skip_on_rerun(tmp_path):
    argv = ["reproduce", "--quick", "--out-dir", str(tmp_path), "--no-docs", "--methods", "grpo",
            "agpo"]  # fmt: skip
    assert main(argv) == 0
    root = tmp_path / "embedded-quick"
    summary = pd.read_csv(root / "summary.csv")
    assert list(summary["method"]) == ["start", "grpo", "agpo"]
    assert summary["accuracy_mean"].between(0, 1).all()
    assert (summary["tokens_mean"] > 0).all()
    # equal compute: 3 steps x 4 prompts x G=8 sampled, each at least one token; start trains none
    trained = summary.set_index("method")["train_tokens_mean"]
    assert trained["start"] == 0 and (trained[["grpo", "agpo"]] >= 3 * 4 * 8).all()
    for figure in (
        "accuracy_vs_tokens",
        "training_curves",
        "zero_variance",
        "length_distributions",
        "accuracy_vs_training_tokens",
    ):
        assert (root / f"{figure}.png").read_bytes()[:4] == b"\x89PNG"
    metrics = pd.read_json(root / "runs" / "agpo" / "seed0" / "metrics.jsonl", lines=True)
    assert len(metrics[metrics["step"] > 0]) == 3
    results = sorted(root.glob("runs/*/seed0/result.json"))
    stamps = [p.stat().st_mtime_ns for p in results]
    assert main(argv) == 0  # everything complete: nothing is trained again
    assert [p.stat().st_mtime_ns for p in results] == stamps
