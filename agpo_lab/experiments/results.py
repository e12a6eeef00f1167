"""Reading a results folder (what `reproduce` writes) back as pandas frames.

<root>/runs/<method>/seed<s>/result.json        final held-out metrics of one run
<root>/runs/<method>/seed<s>/metrics.jsonl      its per-step training metrics
<root>/runs/<method>/seed<s>/eval_records.csv   its held-out completions, one row each
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from agpo_lab.errors import MissingFileError
from agpo_lab.tasks.redundancy import count_redundant_segments
from agpo_lab.training.run_dir import load_metrics, run_state


def load_results(root: Path) -> pd.DataFrame:
    """All result.json files under root/runs as a frame (one row per method and seed)."""
    paths = sorted(Path(root).glob("runs/*/seed*/result.json"))
    if not paths:
        raise MissingFileError(f"no runs/*/seed*/result.json under {root}; run reproduce first")
    return pd.DataFrame([json.loads(p.read_text()) for p in paths])


def load_training_metrics(root: Path, methods: list[str]) -> pd.DataFrame:
    """Per-step training metrics of every run, with method and seed columns."""
    frames = []
    for run_dir in sorted(Path(root).glob("runs/*/seed*")):
        method, seed = run_dir.parent.name, int(run_dir.name.removeprefix("seed"))
        if method in methods and (run_dir / "metrics.jsonl").exists():
            frame = load_metrics(run_dir)
            frames.append(frame[frame["step"] > 0].assign(method=method, seed=seed))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_eval_records(root: str | Path, sampled_only: bool = True) -> pd.DataFrame:
    """Every run's held-out completions under root/runs/<method>/seed<s>/eval_records.csv.

    Adds method and seed columns; with `sampled_only` drops the greedy rows (the length figures
    describe what the policy samples).
    """
    paths = sorted(Path(root).glob("runs/*/seed*/eval_records.csv"))
    if not paths:
        raise MissingFileError(f"no runs/*/seed*/eval_records.csv under {root}; run reproduce")
    frames = []
    for path in paths:
        frame = pd.read_csv(path)
        if sampled_only:
            frame = frame[~frame["greedy"].astype(bool)]
        seed = int(path.parent.name.removeprefix("seed"))
        frames.append(frame.assign(method=path.parent.parent.name, seed=seed))
    return pd.concat(frames, ignore_index=True)


def training_runs(
    folder: str | Path, include_partial: bool = False
) -> tuple[list[Path], list[Path]]:
    """(runs to compare, runs left out) among the run directories in `folder`, oldest first.

    A run counts when it has a metrics.jsonl; one that did not finish (interrupted, failed,
    stopped by a kill) is left out of comparisons unless `include_partial`, because its curves
    end early and its last numbers are not those of a full budget.
    """
    found = [p for p in Path(folder).glob("*") if (p / "metrics.jsonl").is_file()]
    found.sort(key=lambda p: (p / "metrics.jsonl").stat().st_ctime)
    keep = [p for p in found if include_partial or run_state(p) == "finished"]
    return keep, [p for p in found if p not in keep]


def paired_completions(
    records: pd.DataFrame, problem_id: str, seed: int, sample: int = 0
) -> pd.DataFrame:
    """The completions every method wrote for one held-out prompt (same seed, same sample index),
    one row per method in the order of `records`, with its tokens, correctness and redundant
    segments (`tasks.redundancy`): the before/after view of a prompt, "start" being before.

    Example: records of start and agpo for problem p, seed 0, sample 0 -> two rows, start's
    "3 + 4 = 7. Let me check: 7 - 4 = 3. The answer is 7." (1 redundant) above agpo's
    "3 + 4 = 7. The answer is 7." (0 redundant).
    """
    mine = records[
        (records["problem_id"] == problem_id)
        & (records["seed"] == seed)
        & (records["sample"] == sample)
    ]
    if mine.empty:
        raise MissingFileError(f"no completion of {problem_id!r} for seed {seed}, sample {sample}")
    rows = mine.drop_duplicates("method").set_index("method")
    return rows[["text", "tokens", "correct", "truncated"]].assign(
        redundant=rows["text"].map(count_redundant_segments)
    )
