"""How often groups carry no GRPO gradient, measured on evaluation records (the analytic
p^G + (1-p)^G is `stats.zero_variance_probability`).

    reward_table(records)              -> [num_problems, G] 0/1 rewards + one row per problem
    group_outcomes_by_level(records)   -> all-correct / all-wrong / mixed fractions per level,
                                          next to the analytic probability

`records` are the frames of `agpo_lab.evaluation.evaluate_records` (one row per completion).
"""

from __future__ import annotations

import pandas as pd
import torch

from agpo_lab.algorithms import group_stats
from agpo_lab.experiments.stats import zero_variance_probability


def reward_table(records: pd.DataFrame) -> tuple[torch.Tensor, pd.DataFrame]:
    """The sampled completions of `records` as 0/1 rewards shaped [num_problems, G].

    Row i holds the `correct` flags of problem i's samples in sample order; the second value has
    one row per problem (problem_id, difficulty) in the order problems first appear. Greedy rows
    are ignored. Every problem must have the same number of samples G >= 2.
    Example: problem a with samples correct [T, F], b with [T, T] -> tensor([[1., 0.], [1., 1.]]).
    """
    missing = {"problem_id", "difficulty", "greedy", "sample", "correct"} - set(records.columns)
    if missing:
        raise ValueError(
            f"reward_table: records lack columns {sorted(missing)}; use evaluate_records"
        )
    sampled = records[~records["greedy"].astype(bool)]
    if sampled.empty:
        raise ValueError("reward_table: no sampled completions; evaluate with EvalConfig(k >= 2)")
    order = pd.unique(sampled["problem_id"])
    sampled = sampled.assign(_row=sampled["problem_id"].map({p: i for i, p in enumerate(order)}))
    sizes = sampled.groupby("_row").size()
    if sizes.nunique() != 1 or sizes.iloc[0] < 2:
        raise ValueError(
            f"reward_table: every problem needs the same number (>= 2) of samples, got "
            f"{sorted(sizes.unique().tolist())}; evaluate all problems with one k"
        )
    sampled = sampled.sort_values(["_row", "sample"], kind="stable")
    rewards = torch.tensor(sampled["correct"].astype(float).to_numpy()).view(len(order), -1)
    problems = sampled.groupby("_row", sort=True)[["problem_id", "difficulty"]].first()
    return rewards.to(torch.get_default_dtype()), problems.reset_index(drop=True)


def group_outcomes_by_level(records: pd.DataFrame) -> pd.DataFrame:
    """One row per difficulty level: how often its groups are all correct, all wrong or mixed.

    Columns: level, label ("level <d>"), prompts, group_size G, p (the level's mean per-sample
    success), frac_all_correct, frac_all_wrong, frac_mixed, frac_zero_var (= all correct + all
    wrong) and analytic = p^G + (1-p)^G at the level's p. The analytic value assumes every prompt
    of the level has the same p; real prompts differ, and since the curve is convex a spread of
    difficulty pushes the measured fraction above it.
    Example: G=2, one level with groups [1, 1] and [1, 0] -> p 0.75, all correct 0.5, mixed 0.5,
    analytic 0.75^2 + 0.25^2 = 0.625.
    """
    rewards, problems = reward_table(records)
    group_size = rewards.shape[1]
    rows = []
    for level in sorted(problems["difficulty"].unique()):
        level_rewards = rewards[torch.tensor((problems["difficulty"] == level).tolist())]
        stats = group_stats(level_rewards, r_min=0.0, r_max=1.0)
        p = level_rewards.mean().item()
        rows.append(
            {
                "level": int(level),
                "label": f"level {int(level)}",
                "prompts": level_rewards.shape[0],
                "group_size": group_size,
                "p": p,
                "frac_all_correct": stats["frac_all_max"],
                "frac_all_wrong": stats["frac_all_min"],
                "frac_mixed": 1.0 - stats["frac_zero_var"],
                "frac_zero_var": stats["frac_zero_var"],
                "analytic": float(zero_variance_probability(p, group_size)),
            }
        )
    return pd.DataFrame(rows)
