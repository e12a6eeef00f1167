"""The main job: GRPO vs AGPO and the ablations, over seeds, on the embedded default.

    agpo-lab reproduce            # full comparison (5 methods x 3 seeds), tables and figures
    agpo-lab reproduce --quick    # a smoke test of the same pipeline in a few minutes

Every (method, seed) is one ordinary training run (`Trainer`) from the same base config with a few
overrides, followed by a held-out evaluation of the final policy; the starting checkpoint is
evaluated too, as a reference row. Runs are independent processes (two at a time by default, one
thread each), so a run's numbers depend only on its method and seed. A run whose `result.json`
exists is skipped, and an interrupted one resumes from its last checkpoint, so rerunning after
Ctrl-C continues where it stopped. Output lands in results/<name>/: summary.csv, summary.md,
per-run folders (config, metrics.jsonl, eval records) and PNG figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import pandas as pd

from agpo_lab.report import write_report

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO_ROOT / "configs" / "reproduce.yaml"
REFERENCE = "start"
"""Method name of the reference row: the starting checkpoint, evaluated without training."""

METHODS: dict[str, list[str]] = {
    "grpo": ["algorithm.estimator=grpo", "algorithm.length_reward=none"],
    "agpo": ["algorithm.estimator=agpo", "algorithm.length_reward=agpo"],
    "agpo_adv_only": ["algorithm.estimator=agpo", "algorithm.length_reward=none"],
    "length_only": ["algorithm.estimator=grpo", "algorithm.length_reward=agpo"],
    "dr_grpo": [
        "algorithm.estimator=dr_grpo",
        "algorithm.aggregation=seq_mean_token_sum_norm",
        "algorithm.length_reward=none",
    ],
}
"""Each method is a set of config overrides on the shared base config (same budget, same seeds)."""

QUICK_OVERRIDES = ["run.steps=3", "run.prompts_per_step=4", "eval.n_problems=16", "eval.k=2"]
"""--quick: the same pipeline with a tiny budget (a smoke test, not a result)."""


@dataclass
class ReproduceConfig:
    """What to reproduce and where to write it."""

    name: str = "embedded"
    """Results go to <out_dir>/<name>/."""
    base_config: str = str(BASE_CONFIG)
    """YAML config shared by every run (the budget: steps, prompts per step, G, lr, eval)."""
    methods: tuple[str, ...] = tuple(METHODS)
    """Methods to run, from METHODS."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds per method (the same seeds for every method)."""
    out_dir: str = "results"
    """Parent folder of the results."""
    jobs: int = 2
    """Runs in parallel (processes); each gets cpu_count // jobs threads."""
    quick: bool = False
    """Smoke-test budget (QUICK_OVERRIDES) and one seed."""
    overrides: list[str] = field(default_factory=list)
    """Extra section.key=value overrides applied to every run (after the method's)."""
    docs_dir: str | None = str(REPO_ROOT / "docs" / "results")
    """A full (non-quick) run copies its summary and main figures here for the README."""

    def validate(self) -> ReproduceConfig:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; valid: {', '.join(METHODS)}")
        if not self.seeds or self.jobs < 1:
            raise ValueError("reproduce needs at least one seed and jobs >= 1")
        if not Path(self.base_config).is_file():
            raise FileNotFoundError(f"base config {self.base_config} not found; pass --config")
        return self


@dataclass(frozen=True)
class Job:
    """One (method, seed) run: the overrides that define it and where it writes."""

    method: str
    seed: int
    run_dir: Path
    base_config: str
    overrides: tuple[str, ...]
    threads: int


def plan_jobs(cfg: ReproduceConfig) -> list[Job]:
    """Every (method, seed) pair plus the reference evaluation of each seed, in a fixed order."""
    seeds = cfg.seeds[:1] if cfg.quick else cfg.seeds
    extra = (*(QUICK_OVERRIDES if cfg.quick else []), *cfg.overrides)
    threads = max(1, (os.cpu_count() or 1) // cfg.jobs)
    runs = Path(cfg.out_dir) / cfg.name / "runs"
    return [
        Job(m, s, runs / m / f"seed{s}", cfg.base_config, (*METHODS.get(m, []), *extra), threads)
        for m in (REFERENCE, *cfg.methods)
        for s in seeds
    ]


def run_job(job: Job) -> dict:
    """Train (unless reference), evaluate on the held-out split, write result.json; return it."""
    result_path = job.run_dir / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    import torch

    from agpo_lab.config import load_config
    from agpo_lab.evaluation import evaluate_records, summarize_records
    from agpo_lab.models.loading import load_policy
    from agpo_lab.tasks.registry import build_task
    from agpo_lab.trainer import Trainer

    torch.set_num_threads(job.threads)
    started = time.perf_counter()
    overrides = [
        *job.overrides,
        f"run.seed={job.seed}",
        f"eval.seed={job.seed}",
        f"run.out_dir={job.run_dir.parent}",
        f"run.name={job.run_dir.name}",
        "run.resume=true",
    ]
    cfg = load_config(job.base_config, overrides)
    if job.method == REFERENCE:  # the starting checkpoint, evaluated without training
        model, tokenizer = load_policy(cfg.model, "cpu")
        task, device = build_task(cfg.task), torch.device("cpu")
        job.run_dir.mkdir(parents=True, exist_ok=True)
    else:
        trainer = Trainer(cfg)
        trainer.train()
        model, tokenizer, task, device = (
            trainer.policy,
            trainer.tokenizer,
            trainer.task,
            trainer.device,
        )
    problems = task.problems(cfg.task.eval_split)
    generator = torch.Generator(device).manual_seed(cfg.eval.seed)
    records = evaluate_records(model, tokenizer, task, problems, cfg.eval, generator=generator)
    records.to_csv(job.run_dir / "eval_records.csv", index=False)
    result = {"method": job.method, "seed": job.seed, **summarize_records(records, cfg.eval.k)}
    result["wall_seconds"] = time.perf_counter() - started
    result["threads"] = job.threads
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, result_path)  # the marker that the run is complete
    return result


def reproduce(cfg: ReproduceConfig, progress: bool = True) -> Path:
    """Run every job (skipping finished ones), then write tables and figures; return the folder."""
    from tqdm.auto import tqdm

    cfg.validate()
    jobs = plan_jobs(cfg)
    root = Path(cfg.out_dir) / cfg.name
    root.mkdir(parents=True, exist_ok=True)
    (root / "reproduce.json").write_text(json.dumps(vars(cfg), indent=1, default=list))
    results = []
    bar = tqdm(total=len(jobs), desc="reproduce runs", unit="run", disable=not progress)
    context = get_context("spawn")  # fresh interpreters: no torch state shared between runs
    with ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=context) as pool:
        futures = {pool.submit(run_job, job): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            results.append(future.result())
            bar.set_postfix_str(f"done {job.method}/seed{job.seed}")
            bar.update(1)
    bar.close()
    write_report(root, pd.DataFrame(results), baseline="grpo", reference=REFERENCE)
    if cfg.docs_dir and not cfg.quick:
        docs = Path(cfg.docs_dir)
        docs.mkdir(parents=True, exist_ok=True)
        for name in ("summary.md", "summary.csv", "accuracy_vs_tokens.png", "training_curves.png"):
            shutil.copyfile(root / name, docs / name)
    return root


def main(argv: list[str] | None = None) -> int:
    """`agpo-lab reproduce [--quick] [--name N] [--seeds 0 1 2] [--methods ...] [--jobs 2]`."""
    parser = argparse.ArgumentParser(prog="agpo-lab reproduce", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke-test budget, one seed")
    parser.add_argument("--name", default=None, help="results/<name> (default: embedded[-quick])")
    parser.add_argument("--config", default=str(BASE_CONFIG), help="base YAML config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    parser.add_argument("--out", default="results", help="parent folder of the results")
    parser.add_argument("--no-docs", action="store_true", help="do not copy results into docs/")
    parser.add_argument("overrides", nargs="*", help="section.key=value applied to every run")
    args = parser.parse_args(argv)
    cfg = ReproduceConfig(
        name=args.name or ("embedded-quick" if args.quick else "embedded"),
        base_config=args.config,
        methods=tuple(args.methods),
        seeds=tuple(args.seeds),
        out_dir=args.out,
        jobs=args.jobs,
        quick=args.quick,
        overrides=list(args.overrides),
        docs_dir=None if args.no_docs else ReproduceConfig.docs_dir,
    )
    root = reproduce(cfg)
    print((root / "summary.md").read_text())
    print(f"results: {root}")
    return 0
