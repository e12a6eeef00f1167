"""Does a method's effect depend on where training starts? Curves per branch, weak vs strong start.

AGPO's -1 branch is unlikelihood on the model's own samples; a weak starting model has many
all-wrong groups, and pushing down every token of a wrong completion also pushes down the token
that ends it, so completions may grow. Per step the trainer logs, per branch (all-correct,
all-wrong, mixed group), the mean completion length (length/mean_<branch>) and the probability the
policy gave the stop token where a completion stopped (end_token/prob_<branch>). This module
reads them for every run of every arm and draws them over training.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from agpo_lab.experiments.results import load_results, load_training_metrics
from agpo_lab.training.metrics import BRANCHES

CURVES = (
    ("length/mean", "mean completion length"),
    ("end_token/prob", "p(stop token) where it stopped"),
    ("zero_var/all_wrong", "all-wrong groups"),
    ("reward/accuracy", "training accuracy"),
)
"""The panels of the regime figure (metric, title), one row per arm."""
MECHANISM_CURVES = (
    ("length/mean", "mean completion length"),
    ("length/clipped_frac", "truncated at the token limit"),
    ("end_token/prob_all_wrong", "p(stop), all-wrong groups"),
    ("reward/accuracy", "training accuracy"),
)
"""The panels of the mechanism figure: what a collapse looks like, step by step."""


def regime_metrics(arms: dict[str, object], methods: list[str]) -> pd.DataFrame:
    """Per-step training metrics of every run of every arm (a results folder each), with arm,
    method and seed columns; arms in the given order, then methods in the given order."""
    frames = [load_training_metrics(root, methods).assign(arm=arm) for arm, root in arms.items()]
    metrics = pd.concat([f for f in frames if not f.empty], ignore_index=True)
    arm_rank = {arm: i for i, arm in enumerate(arms)}
    method_rank = {method: i for i, method in enumerate(methods)}
    order = metrics["arm"].map(arm_rank) * len(methods) + metrics["method"].map(method_rank)
    return metrics.iloc[order.argsort(kind="stable")].reset_index(drop=True)


def branch_summary(metrics: pd.DataFrame, first: int = 5, last: int = 5) -> pd.DataFrame:
    """Per (arm, method): mean of the first and last few steps of the length and the stop-token
    probability, overall and per branch (NaN where a branch never occurred in those steps)."""
    rows = []
    for (arm, method), group in metrics.groupby(["arm", "method"], sort=False):
        steps = sorted(group["step"].unique())
        head = group[group["step"].isin(steps[:first])]
        tail = group[group["step"].isin(steps[-last:])]
        row = {"arm": arm, "method": method}
        for branch in ("", *BRANCHES):
            suffix = f"_{branch}" if branch else ""
            for metric, short in (("length/mean", "len"), ("end_token/prob", "p_end")):
                column = metric + suffix
                if column in group:
                    name = f"{short}{suffix}"
                    row[f"{name}_start"] = head[column].astype(float).mean()
                    row[f"{name}_end"] = tail[column].astype(float).mean()
        row["all_wrong_start"] = head["zero_var/all_wrong"].mean()
        row["all_correct_start"] = head["zero_var/all_correct"].mean()
        rows.append(row)
    return pd.DataFrame(rows)


def branch_markdown(summary: pd.DataFrame) -> str:
    """The per-branch summary as Markdown: start -> end of length and stop-token probability."""

    def pair(row: pd.Series, name: str, fmt: str) -> str:
        a, b = row.get(f"{name}_start"), row.get(f"{name}_end")
        if a is None or b is None or pd.isna(a) or pd.isna(b):
            return "n/a"
        return f"{a:{fmt}} → {b:{fmt}}"

    lines = [
        "| start | method | all-wrong / all-correct groups, first 5 steps | length | length, all-wrong "
        "groups | p(stop) | p(stop), all-wrong groups | p(stop), all-correct groups |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, r in summary.iterrows():
        lines.append(
            f"| {r['arm']} | {r['method']} | {r['all_wrong_start']:.2f} / "
            f"{r['all_correct_start']:.2f} | {pair(r, 'len', '.1f')} "
            f"| {pair(r, 'len_all_wrong', '.1f')} | {pair(r, 'p_end', '.3f')} "
            f"| {pair(r, 'p_end_all_wrong', '.3f')} | {pair(r, 'p_end_all_correct', '.3f')} |"
        )
    return "\n".join(lines) + "\n"


MECHANISM_COLUMNS = {
    "pass@1": "held-out pass@1 (sampled)",
    "tokens": "held-out mean tokens",
    "truncated": "held-out truncated",
    "train_len_end": "training length, last 5 steps",
    "train_truncated_end": "training truncated, last 5 steps",
    "p_stop_all_wrong": "p(stop) in all-wrong groups, first -> last 5 steps",
    "all_wrong_start": "all-wrong groups, first 5 steps",
}
"""The mechanism table's columns (what decides whether a method collapses a weak start)."""


def mechanism_table(
    arms: dict[str, Path], metrics: pd.DataFrame, first: int = 5, last: int = 5
) -> pd.DataFrame:
    """Per (arm, method), mean over seeds: held-out pass@1, mean tokens and truncated share
    (result.json), and from training the length and truncated share of the last steps, the
    stop-token probability in all-wrong groups at the start and the end, and the share of
    all-wrong groups at the start: what tells a collapse (lengths at the limit, p(stop) falling
    where the -1 branch acts) from a healthy run."""
    rows = []
    for arm, root in arms.items():
        results = load_results(root) if Path(root, "runs").is_dir() else pd.DataFrame()
        for method, group in metrics[metrics["arm"] == arm].groupby("method", sort=False):
            steps = sorted(group["step"].unique())
            head = group[group["step"].isin(steps[:first])]
            tail = group[group["step"].isin(steps[-last:])]
            final = results[results["method"] == method] if len(results) else results
            p_wrong = "end_token/prob_all_wrong"
            rows.append(
                {
                    "arm": arm,
                    "method": method,
                    "seeds": group["seed"].nunique(),
                    "pass@1": final["eval/pass@1_sampled"].mean() if len(final) else float("nan"),
                    "tokens": final["eval/mean_tokens"].mean() if len(final) else float("nan"),
                    "truncated": final["eval/truncated_frac"].mean()
                    if len(final)
                    else float("nan"),
                    "train_len_end": tail["length/mean"].mean(),
                    "train_truncated_end": tail["length/clipped_frac"].mean(),
                    "p_stop_all_wrong_start": head[p_wrong].astype(float).mean()
                    if p_wrong in head
                    else float("nan"),
                    "p_stop_all_wrong_end": tail[p_wrong].astype(float).mean()
                    if p_wrong in tail
                    else float("nan"),
                    "all_wrong_start": head["zero_var/all_wrong"].mean(),
                }
            )
    return pd.DataFrame(rows)


def mechanism_markdown(table: pd.DataFrame) -> str:
    """The mechanism table as Markdown (one row per arm and method, means over seeds)."""

    def num(value: float, fmt: str) -> str:
        return "n/a" if pd.isna(value) else f"{value:{fmt}}"

    lines = [
        "| start | method | seeds | " + " | ".join(MECHANISM_COLUMNS.values()) + " |",
        "|---|---|---|" + "---|" * len(MECHANISM_COLUMNS),
    ]
    for _, r in table.iterrows():
        p_stop = (
            f"{num(r['p_stop_all_wrong_start'], '.3f')} → {num(r['p_stop_all_wrong_end'], '.3f')}"
        )
        lines.append(
            f"| {r['arm']} | {r['method']} | {r['seeds']} | {num(r['pass@1'], '.3f')} "
            f"| {num(r['tokens'], '.1f')} | {num(r['truncated'], '.3f')} "
            f"| {num(r['train_len_end'], '.1f')} | {num(r['train_truncated_end'], '.3f')} "
            f"| {p_stop} | {num(r['all_wrong_start'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def plot_regime(
    metrics: pd.DataFrame, smooth: int = 5, curves: tuple[tuple[str, str], ...] = CURVES
) -> Figure:
    """One row per arm, one column per metric of `curves` (`CURVES`, or `MECHANISM_CURVES`), one
    line per method (mean over seeds, rolling mean over `smooth` steps)."""
    arms = list(dict.fromkeys(metrics["arm"]))
    methods = list(dict.fromkeys(metrics["method"]))
    fig = Figure(figsize=(3.3 * len(curves), 2.6 * len(arms)), layout="constrained")
    axes = fig.subplots(len(arms), len(curves), squeeze=False)
    for i, arm in enumerate(arms):
        for j, (metric, title) in enumerate(curves):
            ax = axes[i][j]
            for method in methods:
                runs = metrics[(metrics["arm"] == arm) & (metrics["method"] == method)]
                if metric not in runs or runs[metric].isna().all():
                    continue
                curve = runs.groupby("step")[metric].mean().rolling(smooth, min_periods=1).mean()
                ax.plot(curve.index, curve.to_numpy(), label=method)
            ax.set_title(f"{arm}: {title}", fontsize=9)
            ax.set_xlabel("step")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 8))
    return fig
