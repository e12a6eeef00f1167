"""Paper-style figures from run metrics (pandas frames), shared by the notebooks and `reproduce`.

Inputs are plain frames: per-step metrics with a `step` column plus namespaced metric columns
(`reward/mean`, `zero_var/all_correct`, ...), concatenated over runs with `method` and `seed`
columns. Every figure has a title, axes with units and a legend.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from agpo_lab.experiments.stats import zero_variance_probability

TRAINING_PANELS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("Reward", ("reward/mean",), "mean reward per completion"),
    ("Training accuracy", ("reward/accuracy",), "fraction of completions correct"),
    ("Completion length", ("length/mean_correct", "length/mean_wrong"), "tokens per completion"),
    ("Zero-variance groups", ("zero_var/all_correct", "zero_var/all_wrong"), "fraction of groups"),
)
_STYLES = {"length/mean_wrong": "--", "zero_var/all_wrong": "--"}


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what}: the frame lacks columns {missing}; has {sorted(frame.columns)}")


def _smooth(values: pd.Series, window: int) -> pd.Series:
    return values.rolling(window, min_periods=1).mean() if window > 1 else values


def _band(frame: pd.DataFrame, metric: str, window: int) -> pd.DataFrame:
    """Per-step mean and min/max of `metric` over seeds, each seed smoothed first."""
    smoothed = frame.sort_values("step").groupby("seed", group_keys=False)[["step", metric]]
    per_seed = smoothed.apply(lambda g: g.assign(**{metric: _smooth(g[metric], window)}))
    return per_seed.groupby("step")[metric].agg(["mean", "min", "max"]).reset_index()


def plot_training_curves(
    metrics: pd.DataFrame,
    panels: Sequence[tuple[str, tuple[str, ...], str]] = TRAINING_PANELS,
    smooth: int = 5,
    title: str = "Training curves (mean over seeds, band = min..max)",
) -> Figure:
    """One panel per quantity, one colour per method; dashed lines are the second metric."""
    _require_columns(metrics, ["step", "method", "seed"], "plot_training_curves")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    colours = dict(zip(metrics["method"].unique(), plt.cm.tab10.colors, strict=False))
    for ax, (panel_title, columns, unit) in zip(axes[0], panels, strict=True):
        for method, frame in metrics.groupby("method", sort=False):
            for column in columns:
                if column not in frame or frame[column].isna().all():
                    continue
                band = _band(frame.dropna(subset=[column]), column, smooth)
                label = method if len(columns) == 1 else f"{method}: {column.split('/')[-1]}"
                ax.plot(band["step"], band["mean"], _STYLES.get(column, "-"),
                        color=colours[method], label=label)  # fmt: skip
                ax.fill_between(band["step"], band["min"], band["max"], color=colours[method],
                                alpha=0.15, linewidth=0)  # fmt: skip
        ax.set_title(panel_title)
        ax.set_xlabel("RL step")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_accuracy_vs_tokens(
    summary: pd.DataFrame, title: str = "Held-out accuracy against mean completion length"
) -> Figure:
    """Accuracy (y) against mean tokens (x) per method, with 95% intervals over seeds.

    `summary` has one row per method with columns method, accuracy_mean, accuracy_ci,
    tokens_mean, tokens_ci (NaN intervals are drawn without bars).
    """
    columns = ["method", "accuracy_mean", "accuracy_ci", "tokens_mean", "tokens_ci"]
    _require_columns(summary, columns, "plot_accuracy_vs_tokens")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for (_, row), colour in zip(summary.iterrows(), plt.cm.tab10.colors, strict=False):
        ax.errorbar(row["tokens_mean"], row["accuracy_mean"], xerr=np.nan_to_num(row["tokens_ci"]),
                    yerr=np.nan_to_num(row["accuracy_ci"]), fmt="o", capsize=4, color=colour,
                    label=row["method"])  # fmt: skip
    ax.set_xlabel("mean completion length on the held-out split (tokens)")
    ax.set_ylabel("held-out pass@1 (fraction correct)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_zero_variance(metrics: pd.DataFrame, smooth: int = 5) -> Figure:
    """Fraction of zero-variance groups over training, split into all-correct and all-wrong."""
    panels = (
        ("All zero-variance groups", ("zero_var/frac",), "fraction of groups"),
        ("All correct", ("zero_var/all_correct",), "fraction of groups"),
        ("All wrong", ("zero_var/all_wrong",), "fraction of groups"),
    )
    return plot_training_curves(metrics, panels, smooth, "Zero-variance groups over training")


def plot_length_distributions(
    records: pd.DataFrame, bins: int = 30, title: str = "Completion lengths on the held-out split"
) -> Figure:
    """Histograms of completion length for correct and wrong completions, one panel per method.

    `records` has one row per completion with columns method, tokens, correct.
    """
    _require_columns(records, ["method", "tokens", "correct"], "plot_length_distributions")
    methods = list(records["method"].unique())
    fig, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods), 3.2), squeeze=False)
    edges = np.linspace(0, max(1, records["tokens"].max()), bins + 1)
    for ax, method in zip(axes[0], methods, strict=True):
        frame = records[records["method"] == method]
        for correct, colour in ((True, "tab:green"), (False, "tab:red")):
            subset = frame[frame["correct"].astype(bool) == correct]["tokens"]
            label = f"{'correct' if correct else 'wrong'} (n={len(subset)})"
            ax.hist(subset, bins=edges, alpha=0.55, color=colour, label=label)
        ax.set_title(str(method))
        ax.set_xlabel("completion length (tokens)")
        ax.set_ylabel("completions")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_zero_variance_probability(
    group_sizes: Sequence[int] = (4, 8, 16), measured: pd.DataFrame | None = None
) -> Figure:
    """The analytic curve p^G + (1-p)^G for several G, with measured points if given.

    `measured` (optional) has columns p (per-prompt success rate bin or level mean), frac_zero_var,
    group_size and label.
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    p = np.linspace(0, 1, 201)
    for g in group_sizes:
        ax.plot(p, zero_variance_probability(p, g), label=f"analytic, G={g}")
    if measured is not None and len(measured):
        _require_columns(
            measured, ["p", "frac_zero_var", "label"], "plot_zero_variance_probability"
        )
        for label, frame in measured.groupby("label", sort=False):
            ax.plot(
                frame["p"], frame["frac_zero_var"], "o", markersize=7, label=f"measured: {label}"
            )
    ax.set_xlabel("per-sample success probability p")
    ax.set_ylabel("P(zero-variance group)")
    ax.set_title("How often a group carries no GRPO gradient")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
