"""The 2x2 ablation of AGPO's two changes: revised advantage x length reward.

ablation_arms()           -> the reproduce methods that are arms, read from their overrides
ablation_table(summary)   -> those arms with their accuracy and tokens from a results summary
"""

from __future__ import annotations

import pandas as pd

from agpo_lab.experiments.methods import METHODS

_ARM_LABELS = {
    (False, False): "neither (GRPO)",
    (True, False): "advantage only",
    (False, True): "length only",
    (True, True): "both (AGPO)",
}


def ablation_arms(methods: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """The reproduce methods that form the 2x2 ablation, read from their config overrides.

    A method is an arm when it only sets algorithm.estimator (grpo or agpo) and
    algorithm.length_reward (none or agpo). Columns: method, agpo_advantage, length_reward, label;
    rows ordered neither, advantage only, length only, both.
    Example: {"agpo_adv_only": ["algorithm.estimator=agpo", "algorithm.length_reward=none"]} ->
    one row (agpo_adv_only, True, False, "advantage only"). None = `methods.METHODS`.
    """
    methods = METHODS if methods is None else methods
    rows = []
    for method, overrides in methods.items():
        settings = dict(o.split("=", 1) for o in overrides)
        estimator = settings.pop("algorithm.estimator", "grpo")
        length = settings.pop("algorithm.length_reward", "none")
        if settings or estimator not in ("grpo", "agpo") or length not in ("none", "agpo"):
            continue  # changes something else too (e.g. Dr.GRPO's aggregation): not an arm
        arm = (estimator == "agpo", length == "agpo")
        rows.append({"method": method, "agpo_advantage": arm[0], "length_reward": arm[1],
                     "label": _ARM_LABELS[arm], "_order": list(_ARM_LABELS).index(arm)})  # fmt: skip
    frame = pd.DataFrame(
        rows, columns=["method", "agpo_advantage", "length_reward", "label", "_order"]
    )
    return frame.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)


def ablation_table(
    summary: pd.DataFrame, methods: dict[str, list[str]] | None = None
) -> pd.DataFrame:
    """The ablation arms that `summary` (from `report.summarize`) has results for, in arm order.

    Columns: those of `ablation_arms` plus accuracy_mean, accuracy_ci, tokens_mean, tokens_ci.
    Arms without results are left out (compare with `ablation_arms()` to list them).
    """
    columns = ["method", "accuracy_mean", "accuracy_ci", "tokens_mean", "tokens_ci"]
    missing = [c for c in columns if c not in summary.columns]
    if missing:
        raise ValueError(f"ablation_table: summary lacks columns {missing}; use report.summarize")
    return ablation_arms(methods).merge(summary[columns], on="method", how="inner")
