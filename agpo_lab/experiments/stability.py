"""Is a method's training stable? Per-run statistics, the table across learning rates, the map.

A study arm is one `reproduce` results folder (one learning rate); every run in it has its
per-step metrics.jsonl and its held-out result.json, and the arm's reference row ("start") gives
each seed's accuracy before training. What is measured, per run:

- collapse: the final sampled pass@1 is more than `COLLAPSE_DROP` below the start's (same seed);
- volatility: the standard deviation of the step-to-step changes of the training accuracy curve
  (reward/accuracy: the correctness part of the reward, comparable across reward shapings);
- entropy of the sampling policy at the start and the end of training (mean of a few steps each);
- grad-norm spikes: the fraction of steps whose (pre-clip) gradient norm exceeds `SPIKE_FACTOR`
  times the run's median;
- no-gradient steps: the fraction of steps whose update computed no row (every group carried an
  exactly-zero gradient: all homogeneous under GRPO with beta 0);
- train/tokens: tokens sampled during training, resampling included (the compute it used).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from agpo_lab.experiments.methods import REFERENCE
from agpo_lab.experiments.results import load_results
from agpo_lab.experiments.stats import mean_ci95
from agpo_lab.training.run_dir import load_metrics

COLLAPSE_DROP = 0.05
"""A run collapsed when its final sampled pass@1 is more than this below its start."""
SPIKE_FACTOR = 5.0
"""A gradient-norm spike: a step's norm above this many times the run's median norm."""
EDGE_STEPS = 5
"""Steps averaged for "entropy at the start" and "entropy at the end"."""


def curve_volatility(values: pd.Series | np.ndarray) -> float:
    """Standard deviation (population) of the step-to-step changes of a curve; NaN under 3 points.

    Example: [0.5, 0.6, 0.5, 0.6] -> changes [0.1, -0.1, 0.1] -> std 0.0943.
    """
    series = np.asarray(values, dtype=float)
    series = series[np.isfinite(series)]
    return float(np.diff(series).std()) if series.size >= 3 else math.nan


def spike_fraction(grad_norms: pd.Series | np.ndarray, factor: float = SPIKE_FACTOR) -> float:
    """Fraction of steps whose gradient norm exceeds `factor` x the median norm of the run.

    Steps without a gradient (norm 0) are left out of both. Example: [1, 1, 1, 9], factor 5 -> 0.25.
    """
    norms = np.asarray(grad_norms, dtype=float)
    norms = norms[np.isfinite(norms) & (norms > 0)]
    if norms.size == 0:
        return math.nan
    return float((norms > factor * np.median(norms)).mean())


def run_stability(metrics: pd.DataFrame) -> dict[str, float]:
    """The per-run statistics of the module docstring, from one run's per-step metrics."""
    steps = metrics[metrics["step"] > 0].sort_values("step")
    entropy = steps["policy/entropy"].to_numpy(dtype=float)
    update_tokens = steps.get("perf/update_tokens", pd.Series(np.nan, index=steps.index))
    return {
        "volatility": curve_volatility(steps["reward/accuracy"]),
        "entropy_start": float(np.nanmean(entropy[:EDGE_STEPS])),
        "entropy_end": float(np.nanmean(entropy[-EDGE_STEPS:])),
        "spike_frac": spike_fraction(steps["optim/grad_norm"]),
        "no_grad_frac": float((update_tokens == 0).mean()),
        "train_tokens": float(steps["rollout/tokens"].sum()),
    }


def arm_runs(arm_root: Path) -> pd.DataFrame:
    """One row per trained run of an arm: method, seed, final metrics, start accuracy of the same
    seed, collapsed, and the `run_stability` statistics."""
    results = load_results(arm_root)
    start = results[results["method"] == REFERENCE].set_index("seed")["eval/pass@1_sampled"]
    rows = []
    for _, result in results[results["method"] != REFERENCE].iterrows():
        run_dir = arm_root / "runs" / result["method"] / f"seed{int(result['seed'])}"
        start_acc = float(start.get(result["seed"], math.nan))
        final = float(result["eval/pass@1_sampled"])
        rows.append(
            {
                "method": result["method"],
                "seed": int(result["seed"]),
                "start_pass@1": start_acc,
                "pass@1": final,
                "mean_tokens": float(result["eval/mean_tokens"]),
                "collapsed": final < start_acc - COLLAPSE_DROP,
                **run_stability(load_metrics(run_dir)),
            }
        )
    return pd.DataFrame(rows)


def stability_runs(arms: dict[float, Path]) -> pd.DataFrame:
    """`arm_runs` of every learning rate, with an lr column."""
    return pd.concat([arm_runs(root).assign(lr=lr) for lr, root in arms.items()], ignore_index=True)


def stability_table(runs: pd.DataFrame, methods: list[str] | None = None) -> pd.DataFrame:
    """Per (method, lr): collapse count, means (with 95% half-widths where it matters) of the
    per-run statistics. Methods in the order given (default: of first appearance), lrs ascend."""
    rows = []
    methods = methods or list(dict.fromkeys(runs["method"]))
    for method in methods:
        for lr in sorted(runs["lr"].unique()):
            group = runs[(runs["method"] == method) & (runs["lr"] == lr)]
            if group.empty:
                continue
            row = {"method": method, "lr": lr, "runs": len(group)}
            row["collapsed"] = int(group["collapsed"].sum())
            for key in ("pass@1", "mean_tokens", "volatility", "train_tokens"):
                values = group[key].dropna().tolist()  # volatility: NaN for runs under 3 steps
                row[key], row[f"{key}_ci"] = mean_ci95(values) if values else (math.nan, math.nan)
            row["delta_pass@1"] = float((group["pass@1"] - group["start_pass@1"]).mean())
            for key in ("entropy_start", "entropy_end", "spike_frac", "no_grad_frac"):
                row[key] = float(group[key].mean())
            rows.append(row)
    return pd.DataFrame(rows)


def _pm(mean: float, half: float, digits: int) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def stability_markdown(table: pd.DataFrame) -> str:
    """The stability table as Markdown (one row per method and lr)."""
    header = (
        "| method | lr | collapsed | pass@1 (sampled) | Δ vs start | volatility | entropy "
        "start → end | grad spikes | no-grad steps | mean tokens | train tokens (k) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for _, r in table.iterrows():
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['collapsed']}/{r['runs']} "
            f"| {_pm(r['pass@1'], r['pass@1_ci'], 3)} | {r['delta_pass@1']:+.3f} "
            f"| {_pm(r['volatility'], r['volatility_ci'], 3)} "
            f"| {r['entropy_start']:.2f} → {r['entropy_end']:.2f} | {r['spike_frac']:.2f} "
            f"| {r['no_grad_frac']:.2f} | {_pm(r['mean_tokens'], r['mean_tokens_ci'], 1)} "
            f"| {r['train_tokens'] / 1e3:.0f} |"
        )
    return header + "\n".join(lines) + "\n"


def plot_stability_map(table: pd.DataFrame) -> Figure:
    """Methods x learning rates at a glance: the change in pass@1 against the start (colour, with
    the collapse count written in each cell) and the volatility of the training accuracy curve."""
    methods = list(dict.fromkeys(table["method"]))
    lrs = sorted(table["lr"].unique())
    fig = Figure(figsize=(3.0 + 2.6 * len(lrs), 1.4 + 0.45 * len(methods)), layout="constrained")
    panels = fig.subplots(1, 2)
    cells = {(r["method"], r["lr"]): r for _, r in table.iterrows()}

    def grid(key: str) -> np.ndarray:
        return np.array(
            [[cells[(m, lr)][key] if (m, lr) in cells else np.nan for lr in lrs] for m in methods]
        )

    delta, volatility = grid("delta_pass@1"), grid("volatility")
    limit = max(0.05, float(np.nanmax(np.abs(delta))))
    image = panels[0].imshow(delta, cmap="RdYlGn", vmin=-limit, vmax=limit, aspect="auto")
    fig.colorbar(image, ax=panels[0])
    panels[0].set_title("final pass@1 - start (collapsed / runs)", fontsize=10)
    for i, method in enumerate(methods):
        for j, lr in enumerate(lrs):
            if (method, lr) in cells:
                r = cells[(method, lr)]
                text = f"{r['delta_pass@1']:+.2f}\n{r['collapsed']}/{r['runs']}"
                panels[0].text(j, i, text, ha="center", va="center", fontsize=8)
    image = panels[1].imshow(volatility, cmap="Purples", aspect="auto")
    fig.colorbar(image, ax=panels[1])
    panels[1].set_title("std of step-to-step change of training accuracy", fontsize=10)
    dark = np.nanmin(volatility) + 0.6 * (np.nanmax(volatility) - np.nanmin(volatility))
    for i in range(len(methods)):
        for j in range(len(lrs)):
            if np.isfinite(volatility[i, j]):
                colour = "white" if volatility[i, j] > dark else "black"
                text = f"{volatility[i, j]:.3f}"
                panels[1].text(j, i, text, ha="center", va="center", fontsize=8, color=colour)
    for ax in panels:
        ax.set_xticks(range(len(lrs)), [f"lr {lr:g}" for lr in lrs])
        ax.set_yticks(range(len(methods)), methods)
    panels[1].set_yticklabels([])
    return fig
