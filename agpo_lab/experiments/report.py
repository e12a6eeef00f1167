"""Tables and figures of a reproduce run: one row per method, intervals over seeds.

Reads what the runs wrote (`results`: result.json per run, metrics.jsonl, eval_records.csv) so that
a report can be rebuilt from a results folder alone:
``write_report(root, load_results(root), baseline="grpo", reference="start")``.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from agpo_lab.experiments import plots
from agpo_lab.experiments.results import load_eval_records, load_training_metrics
from agpo_lab.experiments.stats import mean_ci95, ratio_ci95
from agpo_lab.tasks.redundancy import count_redundant_segments

ACCURACY = "eval/pass@1_sampled"
"""The headline accuracy: held-out pass@1 of sampled completions (temperature of the eval config)."""
FINAL_WINDOW = 0.2
"""Final zero-variance fraction = mean over the last 20% of training steps."""


def _fmt(mean: float, half: float, digits: int) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def _mean_ci_or_nan(values: list[float]) -> tuple[float, float]:
    """mean_ci95, or (NaN, NaN) when no value is finite (e.g. the mean length of correct
    completions of runs that solved nothing): shown as n/a."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return mean_ci95(finite) if finite else (math.nan, math.nan)


def redundant_share(records: pd.DataFrame) -> pd.DataFrame:
    """Per (method, seed): the share of held-out completions that carry at least one redundant
    segment (`tasks.redundancy`: a re-check or restatement), overall and among correct ones.

    Example: a run whose completions are "3+4=7;ans:7" and "3+4=7;again 3+4=7;ans:7" -> 0.5.
    """
    segments = records["text"].map(count_redundant_segments) > 0
    frame = records.assign(redundant=segments, redundant_correct=segments.where(records["correct"]))
    return (
        frame.groupby(["method", "seed"], sort=False)[["redundant", "redundant_correct"]]
        .mean()
        .reset_index()
    )


def summarize(
    results: pd.DataFrame,
    training: pd.DataFrame,
    baseline: str,
    reference: str,
    records: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per method: means and 95% intervals over seeds, token ratio against `baseline`;
    with the runs' held-out `records`, also the share of completions with a redundant segment."""
    shares = redundant_share(records) if records is not None and len(records) else None
    rows = []
    base_tokens = results.loc[results["method"] == baseline, "eval/mean_tokens"].tolist()
    for method, runs in results.groupby("method", sort=False):
        row = {"method": method, "seeds": len(runs)}
        for key, column in (
            ("accuracy", ACCURACY),
            ("accuracy_greedy", "eval/pass@1_greedy"),
            ("tokens", "eval/mean_tokens"),
            ("tokens_correct", "eval/mean_tokens_correct"),
        ):
            row[f"{key}_mean"], row[f"{key}_ci"] = _mean_ci_or_nan(runs[column].tolist())
        row["token_ratio_vs_" + baseline], row["token_ratio_ci"] = (
            ratio_ci95(base_tokens, runs["eval/mean_tokens"].tolist())
            if base_tokens
            else (math.nan, math.nan)
        )
        if shares is not None:
            mine = shares[shares["method"] == method]
            row["redundant_mean"], row["redundant_ci"] = _mean_ci_or_nan(mine["redundant"].tolist())
        tokens = runs["train/tokens"].tolist() if "train/tokens" in runs else []
        row["train_tokens_mean"], row["train_tokens_ci"] = _mean_ci_or_nan(tokens)
        row["final_zero_var_frac"] = _final_zero_var(training, method)
        row["wall_seconds"] = float(runs["wall_seconds"].mean())
        rows.append(row)
    order = [reference, baseline]
    summary = pd.DataFrame(rows)
    summary["_order"] = summary["method"].map(lambda m: order.index(m) if m in order else 2)
    return summary.sort_values("_order", kind="stable").drop(columns="_order")


def _final_zero_var(training: pd.DataFrame, method: str) -> float:
    if training.empty or method not in set(training["method"]):
        return math.nan
    frame = training[training["method"] == method]
    last = frame["step"] > frame["step"].max() * (1 - FINAL_WINDOW)
    return float(frame.loc[last, "zero_var/frac"].mean())


def to_markdown(summary: pd.DataFrame, baseline: str) -> str:
    """The summary as a Markdown table (intervals are 95% t-intervals over seeds)."""
    ratio = "token_ratio_vs_" + baseline
    redundant = "redundant_mean" in summary
    lines = [
        f"| method | seeds | pass@1 (sampled) | pass@1 (greedy) | mean tokens | tokens (correct) "
        f"| {baseline} tokens / method tokens "
        + ("| with a redundant segment " if redundant else "")
        + "| final zero-var frac | tokens sampled in training (k) | wall s/run |",
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if redundant else ""),
    ]
    for _, r in summary.iterrows():
        share = f"| {_fmt(r['redundant_mean'], r['redundant_ci'], 2)} " if redundant else ""
        lines.append(
            f"| {r['method']} | {r['seeds']} | {_fmt(r['accuracy_mean'], r['accuracy_ci'], 3)} "
            f"| {_fmt(r['accuracy_greedy_mean'], r['accuracy_greedy_ci'], 3)} "
            f"| {_fmt(r['tokens_mean'], r['tokens_ci'], 1)} "
            f"| {_fmt(r['tokens_correct_mean'], r['tokens_correct_ci'], 1)} "
            f"| {_fmt(r[ratio], r['token_ratio_ci'], 2)} {share}"
            f"| {_fmt(r['final_zero_var_frac'], math.nan, 2)} "
            f"| {_fmt(r['train_tokens_mean'] / 1e3, r['train_tokens_ci'] / 1e3, 1)} "
            f"| {r['wall_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def write_report(root: Path, results: pd.DataFrame, baseline: str, reference: str) -> pd.DataFrame:
    """Write summary.csv, summary.md and the PNG figures into `root`; return the summary."""
    root = Path(root)
    methods = [m for m in results["method"].unique() if m != reference]
    training = load_training_metrics(root, methods)
    records = load_eval_records(root)
    summary = summarize(results, training, baseline, reference, records)
    summary.to_csv(root / "summary.csv", index=False)
    (root / "summary.md").write_text(to_markdown(summary, baseline))
    figures = {
        "accuracy_vs_tokens.png": plots.plot_accuracy_vs_tokens(summary),
        "length_distributions.png": plots.plot_length_distributions(records),
    }
    if not training.empty:
        figures["training_curves.png"] = plots.plot_training_curves(training)
        figures["zero_variance.png"] = plots.plot_zero_variance(training)
        if "rollout/tokens" in training:
            figures["accuracy_vs_training_tokens.png"] = plots.plot_accuracy_vs_training_tokens(
                training, summary
            )
    for name, fig in figures.items():
        fig.savefig(root / name, dpi=120)
        plt.close(fig)
    return summary
