"""The main job: GRPO vs AGPO and the ablations, over seeds, on the embedded default.

    agpo-lab reproduce            # full comparison (5 methods x 3 seeds), tables and figures
    agpo-lab reproduce --quick    # a smoke test of the same pipeline in a few minutes

Settings: `agpo_lab.config.ReproduceConfig`; methods: `agpo_lab.experiments.methods`.

Every (method, seed) is one ordinary training run (`Trainer`) from the same base config with a few
overrides, followed by a held-out evaluation of the final policy; the starting checkpoint is
evaluated too, as a reference row. Runs are independent processes (two at a time by default, one
thread each), so a run's numbers depend only on its method and seed. A run whose `result.json`
exists is skipped, and an interrupted one resumes from its last checkpoint, so rerunning after
Ctrl-C continues where it stopped. Output lands in results/<name>/: summary.csv, summary.md,
per-run folders (config, metrics.jsonl, eval records) and PNG figures.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from agpo_lab.config import ReproduceConfig, load_config
from agpo_lab.evaluation import evaluate_records, summarize_records
from agpo_lab.experiments.methods import METHODS, REFERENCE
from agpo_lab.experiments.report import write_report
from agpo_lab.models.loading import load_policy
from agpo_lab.tasks.registry import build_task
from agpo_lab.training.trainer import Trainer

QUICK_OVERRIDES = ["run.steps=3", "run.prompts_per_step=4", "eval.n_problems=16", "eval.k=2"]
"""quick: the same pipeline with a tiny budget (a smoke test, not a result)."""
DOCS_FILES = ("summary.md", "summary.csv", "accuracy_vs_tokens.png", "training_curves.png")
"""What a full run copies into docs/results for the README."""


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
    """Every (method, seed) pair plus the reference evaluation of each seed, in a fixed order.

    Unknown method names are a one-line error here, before any run starts.
    """
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods={unknown}: unknown; valid: {', '.join(METHODS)}")
    seeds = cfg.seeds[:1] if cfg.quick else cfg.seeds
    extra = (*(QUICK_OVERRIDES if cfg.quick else []), *cfg.overrides)
    threads = max(1, (os.cpu_count() or 1) // cfg.jobs)
    runs = Path(cfg.out_dir) / cfg.results_name / "runs"
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
            trainer.processes.device,
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
    cfg.validate()
    jobs = plan_jobs(cfg)
    root = Path(cfg.out_dir) / cfg.results_name
    root.mkdir(parents=True, exist_ok=True)
    (root / "reproduce.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
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
    if cfg.docs and not cfg.quick:
        docs = Path(cfg.docs_dir)
        docs.mkdir(parents=True, exist_ok=True)
        for name in DOCS_FILES:
            shutil.copyfile(root / name, docs / name)
    return root
