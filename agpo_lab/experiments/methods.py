"""The named methods a `reproduce` run compares: each is a set of config overrides on one base config.

Every method trains from the same base config (same budget, same seeds); only its overrides differ,
so a row of the results table differs from GRPO's by exactly what its overrides say. A new method is
one entry here (with a comment on where it comes from).
"""

from __future__ import annotations

REFERENCE = "start"
"""Method name of the reference row: the starting checkpoint, evaluated without training."""

METHODS: dict[str, list[str]] = {
    "grpo": ["algorithm.estimator=grpo", "algorithm.length_reward=none"],
    "agpo": ["algorithm.estimator=agpo", "algorithm.length_reward=agpo"],
    "agpo_adv_only": ["algorithm.estimator=agpo", "algorithm.length_reward=none"],
    "length_only": ["algorithm.estimator=grpo", "algorithm.length_reward=agpo"],
    "dr_grpo": [
        "algorithm.estimator=dr_grpo",
        "algorithm.aggregation=seq_mean_token_sum_norm",
        "algorithm.length_reward=none",
    ],
}
"""Each method is a set of config overrides on the shared base config (same budget, same seeds)."""
