"""The main job: GRPO vs AGPO and the ablations, over seeds, on the embedded default.

    agpo-lab reproduce            # full comparison (5 methods x 3 seeds), tables and figures
    agpo-lab reproduce --quick    # a smoke test of the same pipeline in a few minutes

Settings: `agpo_lab.config.ReproduceConfig`; methods: `agpo_lab.experiments.methods`.

Every (method, seed) is one ordinary training run (`Trainer`) from the same base config with a few
overrides, followed by a held-out evaluation of the final policy; the starting checkpoint is
evaluated too, as a reference row. Runs are independent processes (two at a time by default, one
thread each), so a run's numbers depend only on its method and seed. Only a run that trained to its
last step and was evaluated gets a `result.json`, the mark of a complete run; a rerun skips
complete runs and resumes the others from their last checkpoint, so after Ctrl-C (or SIGTERM) the
same command continues where it stopped. Each run records what it was made with (settings.json:
the base config's text and the overrides); a rerun with other settings into the same folder is a
one-line error before anything runs, instead of reusing runs that no longer match. Output lands
in results/<name>/: summary.csv, summary.md, per-run folders (config, settings, metrics.jsonl,
eval records, run.log) and PNG figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from agpo_lab.config import ReproduceConfig, TrainConfig, load_config
from agpo_lab.errors import AgpoLabError, ConfigError, Interrupted
from agpo_lab.experiments.methods import METHODS, REFERENCE
from agpo_lab.experiments.report import write_report
from agpo_lab.training.run_dir import FolderLock, write_file

QUICK_OVERRIDES = ["run.steps=3", "run.prompts_per_step=4", "eval.n_problems=16", "eval.k=2"]
"""quick: the same pipeline with a tiny budget (a smoke test, not a result)."""
DOCS_FILES = (
    "summary.md",
    "summary.csv",
    "accuracy_vs_tokens.png",
    "training_curves.png",
    "accuracy_vs_training_tokens.png",
)
"""The table and figures a full run copies into docs/results for the README."""
DOCS_RUN_FILES = ("result.json", "metrics.jsonl", "eval_records.csv", "config.yaml")
"""What it copies of each run (no checkpoints): enough for notebook 03 to redraw everything."""


@dataclass(frozen=True)
class Job:
    """One (method, seed) run: the overrides that define it and where it writes."""

    method: str
    seed: int
    run_dir: Path
    base_config: str
    overrides: tuple[str, ...]
    threads: int


def thread_budget() -> int:
    """The threads this process may use: $OMP_NUM_THREADS when set (as torch reads it), else one
    per core. The parallel runs share it, so that their threads never outnumber it."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return os.cpu_count() or 1


def plan_jobs(cfg: ReproduceConfig) -> list[Job]:
    """Every (method, seed) pair plus the reference evaluation of each seed, in a fixed order.

    Unknown method names are a one-line error here, before any run starts.
    """
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"methods={unknown}: unknown; valid: {', '.join(METHODS)}")
    seeds = cfg.seeds[:1] if cfg.quick else cfg.seeds
    extra = (*(QUICK_OVERRIDES if cfg.quick else []), *cfg.overrides)
    threads = max(1, thread_budget() // cfg.jobs)
    runs = Path(cfg.out_dir) / cfg.results_name / "runs"
    return [
        Job(m, s, runs / m / f"seed{s}", cfg.base_config, (*METHODS.get(m, []), *extra), threads)
        for m in (REFERENCE, *cfg.methods)
        for s in seeds
    ]


def job_config(job: Job) -> TrainConfig:
    """The TrainConfig a job runs with: the base config, the job's overrides, its seed and its
    run folder (resumed when it holds a run)."""
    seeded = [f"run.seed={job.seed}", f"eval.seed={job.seed}"]
    folder = [f"run.out_dir={job.run_dir.parent}", f"run.name={job.run_dir.name}"]
    return load_config(job.base_config, [*job.overrides, *seeded, *folder, "run.resume=true"])


def check_job_bounds(jobs: list[Job]) -> None:
    """Each job's config against the machine and the model (`training.bounds`): a run that
    cannot fit or a task too small fails here in one line, before any run starts."""
    from agpo_lab.training.bounds import check_run_bounds  # torch: only when reproducing

    for job in jobs:
        cfg = job_config(job)
        check_run_bounds(cfg, cfg.run.device, evaluates=True)  # every job evaluates


EXIT_INTERRUPTED = 3
"""A job process's exit status when its training stopped before the end (resumable)."""


SETTINGS_FILE = "settings.json"
"""What a run was made with (`job_settings`), written when its job first starts."""


def job_settings(job: Job) -> dict:
    """What defines a job's numbers: the base config's text and the overrides (method, budget,
    user). Threads and paths are left out; so is the package version (an upgrade keeps runs)."""
    return {"base_config": Path(job.base_config).read_text(), "overrides": list(job.overrides)}


def check_settings(jobs: list[Job], root: Path) -> None:
    """A one-line ConfigError when a run folder holds a run made with other settings, which a
    rerun would otherwise skip (complete) or resume (partial) under the new ones."""
    for job in jobs:
        try:
            saved = json.loads((job.run_dir / SETTINGS_FILE).read_text())
        except (OSError, ValueError):
            continue  # a new run, or one from before settings were recorded
        now = job_settings(job)
        changed = [key for key in now if saved.get(key) != now[key]]
        if changed:
            raise ConfigError(
                f"{job.run_dir} holds a run made with another {' and '.join(changed)}; move "
                f"{root} aside or pass --name NEW to keep both"
            )


def job_result(job: Job) -> dict | None:
    """The job's result.json when the job is complete; None when it is not (or the file is
    unreadable, in which case the job runs again: a resumed run finishes at once)."""
    try:
        return json.loads((job.run_dir / "result.json").read_text())
    except (OSError, ValueError):
        return None


def reproduce(cfg: ReproduceConfig, progress: bool = True) -> Path:
    """Run every job (skipping complete ones), then write tables and figures; return the folder.

    Each job is its own process (`python -m agpo_lab.experiments.job JOB`, in its own session,
    its output in the run's run.log), `cfg.jobs` at a time. Ctrl-C or SIGTERM starts no
    further job and asks the running ones to stop after their current step (a second one: at
    once); then an Interrupted error says how far it got, and the same command continues from there.
    A job that fails does not stop the others; the failures are reported at the end.
    """
    cfg.validate()
    jobs = plan_jobs(cfg)
    check_job_bounds(jobs)
    root = Path(cfg.out_dir) / cfg.results_name
    lock = FolderLock(root)
    lock.acquire("--name or --out-dir")  # one reproduce per results folder at a time
    try:
        check_settings(jobs, root)
        write_file(root / "reproduce.json", json.dumps(dataclasses.asdict(cfg), indent=1).encode())
        outcome = _run_jobs(jobs, cfg.jobs, progress)
    finally:
        lock.release()
    complete = [job_result(job) for job in jobs]
    missing = [job for job, result in zip(jobs, complete) if result is None]
    if outcome.interrupted:
        raise Interrupted(
            f"interrupted: {len(jobs) - len(missing)} of {len(jobs)} runs complete, the runs in "
            "flight saved their last step; run the same command again to continue"
        )
    if missing:
        failed = ", ".join(f"{job.method}/seed{job.seed}" for job in missing)
        last = outcome.errors.get(missing[0], "no result")
        raise AgpoLabError(
            f"{len(missing)} run(s) failed ({failed}); first: {last} (full log: "
            f"{missing[0].run_dir / 'run.log'}); fix it and run the same command again"
        )
    write_report(root, pd.DataFrame(complete), baseline="grpo", reference=REFERENCE)
    if cfg.docs and not cfg.quick:
        copy_for_docs(root, Path(cfg.docs_dir), jobs)
    return root


def copy_for_docs(root: Path, docs: Path, jobs: list[Job]) -> None:
    """Replace docs/results with this run's table, figures and per-run records (no checkpoints)."""
    shutil.rmtree(docs / "runs", ignore_errors=True)
    docs.mkdir(parents=True, exist_ok=True)
    for name in DOCS_FILES:
        shutil.copyfile(root / name, docs / name)
    for job in jobs:
        target = docs / job.run_dir.relative_to(root)
        target.mkdir(parents=True, exist_ok=True)
        for name in DOCS_RUN_FILES:
            if (job.run_dir / name).is_file():
                shutil.copyfile(job.run_dir / name, target / name)


@dataclass
class _Outcome:
    interrupted: bool = False
    errors: dict[Job, str] = dataclasses.field(default_factory=dict)


def _run_jobs(jobs: list[Job], parallel: int, progress: bool) -> _Outcome:
    """Run the incomplete jobs as child processes, `parallel` at a time (see `reproduce`)."""
    queue = [job for job in jobs if job_result(job) is None]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(queue), desc="reproduce runs",
               unit="run", disable=not progress)  # fmt: skip
    running: dict[Job, subprocess.Popen] = {}
    outcome, signals = _Outcome(), []

    def forward(signum, frame):  # a stop request: no new jobs; the running ones stop too
        signals.append(signum)
        outcome.interrupted = True
        for child in running.values():  # 1st: after the step, 2nd: now, 3rd: kill
            with contextlib.suppress(OSError):
                child.send_signal(signal.SIGINT if len(signals) < 3 else signal.SIGKILL)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while running or (queue and not outcome.interrupted):
            while queue and len(running) < parallel and not outcome.interrupted:
                job = queue.pop(0)
                running[job] = _start(job)
            time.sleep(0.2)
            for job, child in list(running.items()):
                if child.poll() is None:
                    continue
                del running[job]
                if child.returncode not in (0, EXIT_INTERRUPTED):
                    outcome.errors[job] = _last_line(job.run_dir / "run.log")
                if child.returncode == 0:
                    bar.set_postfix_str(f"done {job.method}/seed{job.seed}")
                    bar.update(1)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        bar.close()
    return outcome


def _start(job: Job) -> subprocess.Popen:
    """The job as `python -m agpo_lab.experiments.job JOB`, its output appended to run.log.

    It runs in its own session, so a terminal's Ctrl-C reaches it only through `reproduce`, and
    it starts with SIGINT ignored (inherited through exec), so a stop request counts only where
    the trainer listens for it (between steps): one that arrives while the job starts up or
    evaluates never leaves a half-written result.
    """
    job.run_dir.mkdir(parents=True, exist_ok=True)
    if not (job.run_dir / SETTINGS_FILE).exists():  # a resumed run keeps its first record
        write_file(job.run_dir / SETTINGS_FILE, json.dumps(job_settings(job), indent=1).encode())
    spec = json.dumps({**dataclasses.asdict(job), "run_dir": str(job.run_dir)})
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with open(job.run_dir / "run.log", "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "agpo_lab.experiments.job", spec],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    finally:
        signal.signal(signal.SIGINT, previous)


def _last_line(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1].strip()[:300] if lines else "empty log"
