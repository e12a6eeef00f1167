"""One job of a `reproduce` plan, in its own process: train (unless reference), evaluate, and
write result.json, the mark of a complete run.

    python -m agpo_lab.experiments.job JOB_JSON       (what `reproduce` starts, one per job)

Exit status 0: complete; EXIT_INTERRUPTED: the training stopped before its last step (Ctrl-C or
SIGTERM), saved, no result written; 2: one of the user's errors (its line is in run.log).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from agpo_lab.errors import AgpoLabError
from agpo_lab.evaluation import evaluate_records, summarize_records
from agpo_lab.experiments.methods import REFERENCE
from agpo_lab.experiments.reproduce import EXIT_INTERRUPTED, Job, job_config, job_result
from agpo_lab.models.loading import load_policy
from agpo_lab.tasks.registry import build_task
from agpo_lab.training.run_dir import load_metrics, write_file
from agpo_lab.training.trainer import Trainer


def run_job(job: Job) -> dict | None:
    """Train (unless reference), evaluate on the held-out split, write result.json; return it.

    Returns None, and writes no result, when the training stopped before its last step (Ctrl-C
    or SIGTERM): the run saved its checkpoint and a later call resumes it.
    """
    done = job_result(job)
    if done is not None:
        return done
    torch.set_num_threads(job.threads)
    started = time.perf_counter()
    cfg = job_config(job)
    if job.method == REFERENCE:  # the starting checkpoint, evaluated without training
        model, tokenizer = load_policy(cfg.model, "cpu")
        task, device = build_task(cfg.task), torch.device("cpu")
        job.run_dir.mkdir(parents=True, exist_ok=True)
    else:
        trainer = Trainer(cfg)
        trainer.train()
        if trainer.step < cfg.run.steps:  # stopped early: never a complete run
            return None
        model, tokenizer, task, device = (
            trainer.policy,
            trainer.tokenizer,
            trainer.task,
            trainer.processes.device,
        )
    problems = task.problems(cfg.task.eval_split)
    generator = torch.Generator(device).manual_seed(cfg.eval.seed)
    records = evaluate_records(model, tokenizer, task, problems, cfg.eval, generator=generator)
    write_file(job.run_dir / "eval_records.csv", records.to_csv(index=False).encode())
    result = {"method": job.method, "seed": job.seed, **summarize_records(records, cfg.eval.k)}
    result.update(training_compute(job.run_dir))
    result["wall_seconds"] = time.perf_counter() - started
    result["threads"] = job.threads
    write_file(job.run_dir / "result.json", json.dumps(result, indent=1).encode())  # complete
    return result


def training_compute(run_dir: Path) -> dict[str, float]:
    """What the run's sampling cost in all (dynamic resampling included), from its metrics.jsonl:
    train/completions and train/tokens generated, so that methods compare at equal compute;
    0 for the reference row, which trains nothing."""
    if not (run_dir / "metrics.jsonl").is_file():
        return {"train/completions": 0.0, "train/tokens": 0.0}
    metrics = load_metrics(run_dir)
    totals = {}
    for name in ("completions", "tokens"):
        column = f"rollout/{name}"
        totals[f"train/{name}"] = float(metrics[column].sum()) if column in metrics else math.nan
    return totals


def _job_main(spec: str) -> int:
    """A job process: run the job; exit 0 when complete, EXIT_INTERRUPTED when stopped early."""
    data = json.loads(spec)
    job = Job(**{**data, "run_dir": Path(data["run_dir"]), "overrides": tuple(data["overrides"])})
    try:
        return 0 if run_job(job) is not None else EXIT_INTERRUPTED
    except KeyboardInterrupt:  # a second stop request during training
        return EXIT_INTERRUPTED
    except AgpoLabError as err:
        print(f"agpo-lab reproduce ({job.method}/seed{job.seed}): {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_job_main(sys.argv[1]))
