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
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from agpo_lab.experiments.stats import zero_variance_probability

TRAINING_PANELS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("Reward", ("reward/mean",), "mean reward per completion"),
    ("Training accuracy", ("reward/accuracy",), "fraction of completions correct"),
    ("Completion length", ("length/mean_correct", "length/mean_wrong"), "tokens per completion"),
    ("Zero-variance groups", ("zero_var/all_correct", "zero_var/all_wrong"), "fraction of groups"),
)
"""(title, metric columns, y label) of each panel; a second column is drawn dashed."""
_STYLES = ("-", "--", ":")


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


def _panel_title(title: str, columns: tuple[str, ...]) -> str:
    if len(columns) == 1:
        return title
    styles = ", ".join(
        f"{name}: {column.split('/')[-1].removeprefix('mean_').replace('_', ' ')}"
        for name, column in zip(("solid", "dashed", "dotted"), columns)
    )
    return f"{title}\n({styles})"


def plot_training_curves(
    metrics: pd.DataFrame,
    panels: Sequence[tuple[str, tuple[str, ...], str]] = TRAINING_PANELS,
    smooth: int = 5,
    title: str = "Training curves (mean over seeds, band = min..max)",
    fontsize: float = 10,
) -> Figure:
    """One panel per quantity, one colour per method (the legend below the panels); a panel's
    second metric is dashed. RL steps are whole numbers on the x axis. Methods whose curves are
    identical in every panel (they overlap and look like one) are named in a note under the
    legend. `fontsize` scales every text of the figure."""
    _require_columns(metrics, ["step", "method", "seed"], "plot_training_curves")
    with plt.rc_context({"font.size": fontsize}):
        fig, axes = plt.subplots(
            1, len(panels), figsize=(4.2 * len(panels), 3.9), squeeze=False, layout="constrained"
        )
        methods = list(metrics["method"].unique())
        colours = dict(zip(methods, plt.cm.tab10.colors, strict=False))
        drawn: dict[str, list[np.ndarray]] = {m: [] for m in methods}
        for ax, (panel_title, columns, unit) in zip(axes[0], panels, strict=True):
            for method, frame in metrics.groupby("method", sort=False):
                for column, style in zip(columns, _STYLES):
                    if column not in frame or frame[column].isna().all():
                        continue
                    band = _band(frame.dropna(subset=[column]), column, smooth)
                    ax.plot(band["step"], band["mean"], style, color=colours[method])
                    ax.fill_between(band["step"], band["min"], band["max"],
                                    color=colours[method], alpha=0.15, linewidth=0)  # fmt: skip
                    drawn[method].append(band[["step", "mean"]].to_numpy())
            ax.set_title(_panel_title(panel_title, columns))
            ax.set_xlabel("RL step")
            ax.set_ylabel(unit)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        handles = [Line2D([], [], color=colours[m], linewidth=2) for m in methods]
        legend = fig.legend(
            handles, methods, loc="outside lower center", ncols=min(4, len(methods))
        )
        twins = _identical(drawn)
        if twins:
            note = "; ".join(" and ".join(group) for group in twins)
            legend.set_title(f"identical curves, drawn on top of each other: {note}")
        fig.suptitle(title)
    return fig


def _identical(drawn: dict[str, list[np.ndarray]]) -> list[list[str]]:
    """Groups of methods whose every drawn curve is the same (so only the last one is visible)."""
    groups: list[list[str]] = []
    for method, curves in drawn.items():
        for group in groups:
            other = drawn[group[0]]
            if len(other) == len(curves) and all(
                a.shape == b.shape and np.allclose(a, b, equal_nan=True)
                for a, b in zip(other, curves)
            ):
                group.append(method)
                break
        else:
            groups.append([method])
    return [group for group in groups if len(group) > 1 and drawn[group[0]]]


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


def plot_accuracy_vs_training_tokens(
    metrics: pd.DataFrame,
    summary: pd.DataFrame,
    smooth: int = 5,
    title: str = "Accuracy against the tokens sampled during training (equal compute)",
) -> Figure:
    """Left: training accuracy (y, moving mean over `smooth` steps) against the cumulative tokens
    sampled so far (x), mean over seeds; right: held-out pass@1 against the total tokens sampled
    in training, with 95% intervals. A method that samples more per step (dynamic sampling) sits
    further right, so none wins by sampling more without it showing.

    `metrics`: per-step rows with method, seed, step, reward/accuracy and rollout/tokens;
    `summary`: `report.summarize`'s rows (accuracy_*, train_tokens_*).
    """
    _require_columns(
        metrics, ["method", "seed", "step", "reward/accuracy", "rollout/tokens"],
        "plot_accuracy_vs_training_tokens",
    )  # fmt: skip
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    methods = list(metrics["method"].unique())
    colours = dict(zip(methods, plt.cm.tab10.colors, strict=False))
    for method, frame in metrics.groupby("method", sort=False):
        frame = frame.sort_values("step").copy()
        frame["sampled"] = frame.groupby("seed")["rollout/tokens"].cumsum()
        mean = frame.groupby("step")[["sampled", "reward/accuracy"]].mean()
        accuracy = mean["reward/accuracy"].rolling(smooth, min_periods=1).mean()
        axes[0].plot(mean["sampled"] / 1e3, accuracy, color=colours[method], label=method)
    axes[0].set_xlabel("tokens sampled in training so far (thousands)")
    axes[0].set_ylabel("training accuracy (sampled batch)")
    trained = summary[summary["method"].isin(methods)]
    for _, row in trained.iterrows():
        axes[1].errorbar(
            row["train_tokens_mean"] / 1e3, row["accuracy_mean"],
            xerr=np.nan_to_num(row["train_tokens_ci"] / 1e3), yerr=np.nan_to_num(row["accuracy_ci"]),
            fmt="o", capsize=4, color=colours[row["method"]], label=row["method"],
        )  # fmt: skip
    axes[1].set_xlabel("tokens sampled in training, total (thousands)")
    axes[1].set_ylabel("held-out pass@1 (sampled)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
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
    records: pd.DataFrame,
    bins: int = 30,
    title: str = "Completion lengths on the held-out split",
    columns: int = 3,
) -> Figure:
    """Histograms of completion length for correct and wrong completions, one panel per method,
    at most `columns` panels per row (all on the same length axis).

    `records` has one row per completion with columns method, tokens, correct.
    """
    _require_columns(records, ["method", "tokens", "correct"], "plot_length_distributions")
    methods = list(records["method"].unique())
    cols = min(columns, len(methods))
    rows = -(-len(methods) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False,
                             sharex=True, layout="constrained")  # fmt: skip
    for ax in axes.flat[len(methods) :]:
        ax.set_axis_off()
    edges = np.linspace(0, max(1, records["tokens"].max()), bins + 1)
    for ax, method in zip(axes.flat, methods):
        frame = records[records["method"] == method]
        correct = frame["correct"].astype(bool)
        right, wrong = frame.loc[correct, "tokens"], frame.loc[~correct, "tokens"]
        # filled bars and an outline: where they overlap both stay readable, in legend colours
        ax.hist(right, bins=edges, color="tab:green", alpha=0.5, label=f"correct (n={len(right)})")
        ax.hist(wrong, bins=edges, histtype="step", color="tab:red", linewidth=1.8,
                label=f"wrong (n={len(wrong)})")  # fmt: skip
        ax.set_title(str(method))
        ax.set_xlabel("completion length (tokens)")
        ax.set_ylabel("completions")
        ax.legend(fontsize=8)
    fig.suptitle(title)
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
