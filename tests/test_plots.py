import numpy as np
import pandas as pd
import pytest

from agpo_lab.experiments import plots


def _fake_metrics() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for method in ("grpo", "agpo"):
        for seed in range(3):
            for step in range(10):
                rows.append({
                    "method": method, "seed": seed, "step": step,
                    "reward/mean": rng.random(), "reward/accuracy": rng.random(),
                    "length/mean_correct": 30 + rng.random(), "length/mean_wrong": 40.0,
                    "zero_var/frac": 0.5, "zero_var/all_correct": 0.3, "zero_var/all_wrong": 0.2,
                })  # fmt: skip
    return pd.DataFrame(rows)


def _labels(fig):
    for ax in fig.axes:
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
        assert ax.get_legend() is not None or fig.legends  # per panel or one for the figure


def test_training_curves_have_one_line_per_method_and_metric():
    fig = plots.plot_training_curves(_fake_metrics())
    _labels(fig)
    assert len(fig.axes) == 4
    assert len(fig.axes[2].get_lines()) == 4  # 2 methods x (correct, wrong)
    reward_line = fig.axes[0].get_lines()[0]
    assert len(reward_line.get_xdata()) == 10
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["grpo", "agpo"]
    assert fig.legends[0].get_title().get_text() == ""  # different curves: no note
    ticks = fig.axes[0].xaxis.get_major_locator().tick_values(0, 3)
    assert all(float(t).is_integer() for t in ticks)  # whole RL steps


def test_identical_curves_are_named_in_a_note():
    metrics = _fake_metrics()
    twin = metrics[metrics["method"] == "grpo"].assign(method="agpo-twin")
    fig = plots.plot_training_curves(pd.concat([metrics, twin]))
    note = fig.legends[0].get_title().get_text()
    assert "identical curves" in note and "grpo and agpo-twin" in note


def test_zero_variance_and_accuracy_vs_tokens():
    _labels(plots.plot_zero_variance(_fake_metrics()))
    summary = pd.DataFrame({
        "method": ["grpo", "agpo"], "accuracy_mean": [0.6, 0.62], "accuracy_ci": [0.02, np.nan],
        "tokens_mean": [50.0, 35.0], "tokens_ci": [3.0, 2.0],
    })  # fmt: skip
    fig = plots.plot_accuracy_vs_tokens(summary)
    _labels(fig)
    with pytest.raises(ValueError, match="lacks columns"):
        plots.plot_accuracy_vs_tokens(summary.drop(columns="tokens_ci"))


def test_length_distributions():
    records = pd.DataFrame({"method": ["a"] * 4 + ["b"] * 4, "tokens": [10, 20, 30, 40] * 2,
                            "correct": [1, 0, 1, 0] * 2})  # fmt: skip
    fig = plots.plot_length_distributions(records)
    _labels(fig)
    assert len(fig.axes) == 2


def test_zero_variance_probability_plot():
    measured = pd.DataFrame({"p": [0.2, 0.8], "frac_zero_var": [0.2, 0.3], "label": ["x", "x"]})
    _labels(plots.plot_zero_variance_probability(measured=measured))
