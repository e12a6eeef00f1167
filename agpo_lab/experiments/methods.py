"""The named methods a `reproduce` run compares: each is a set of config overrides on one base config.

Every method trains from the same base config (same budget, same seeds); only its overrides differ,
so a row of the results table differs from GRPO's by exactly what its overrides say. A new method is
one entry here (with a comment on where it comes from).
"""

from __future__ import annotations

REFERENCE = "start"
"""Method name of the reference row: the starting checkpoint, evaluated without training."""

RESAMPLE_ROUNDS = 3
"""Dynamic sampling (agpo_mask, dapo): at most this many extra rounds to refill dropped groups.
The authors' code and DAPO sample until the batch is full; a bound keeps a CPU step's cost
predictable (each round samples only as many groups as are still missing), and every generated
token is counted (train/tokens), so the comparison stays at equal compute."""

BFLOAT16 = ["rollout.precision=bfloat16", "optim.precision=bfloat16"]
"""The overrides of the `*_bf16` methods: sampling and update in bfloat16 (float32 weights)."""

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
    # AGPO as the first author's code does it (ColossalAI feat/agpo; docs/method.md): no +/-1;
    # homogeneous groups masked out of the loss and its token denominator, refilled by dynamic
    # sampling; clip-higher; token-level loss; the correct-only length bonus. Their rewards are
    # +1/-1 with bonus 0.1, i.e. 0.05 on our 0/1 scale (a z-score only sees the ratio).
    "agpo_mask": [
        "algorithm.estimator=grpo",
        "algorithm.zero_variance=drop",
        f"algorithm.max_resample_rounds={RESAMPLE_ROUNDS}",
        "algorithm.clip_high=0.28",
        "algorithm.aggregation=token_mean",
        "algorithm.length_reward=agpo",
        "algorithm.length_weight=0.05",
    ],
    # DAPO (arXiv 2503.14476): clip-higher, dynamic sampling, token-level loss, soft overlong
    # punishment (window algorithm.overlong_cache before max_new_tokens).
    "dapo": [
        "algorithm.estimator=grpo",
        "algorithm.zero_variance=drop",
        f"algorithm.max_resample_rounds={RESAMPLE_ROUNDS}",
        "algorithm.clip_high=0.28",
        "algorithm.aggregation=token_mean",
        "algorithm.length_reward=dapo_overlong",
    ],
    # RL-ZVP (arXiv 2509.21880): GRPO on mixed groups; zero-variance groups get entropy-guided
    # token advantages (sign from correctness). Everything else as grpo, so the row differs from
    # GRPO's by that one choice.
    "rl_zvp": [
        "algorithm.estimator=grpo",
        "algorithm.zero_variance=rl_zvp",
        "algorithm.length_reward=none",
    ],
    # The collapse's suspects, one change each from agpo (the mechanism study, docs/results):
    # the -1 branch off (r_min below any reward, so an all-wrong group is "intermediate" and
    # gets 0), the token-mean and Dr.GRPO aggregations instead of the per-sequence mean, and
    # truncated completions left out of the loss (TRL's mask_truncated_completions).
    "agpo_plus_only": [
        "algorithm.estimator=agpo",
        "algorithm.length_reward=agpo",
        "algorithm.r_min=-1",
    ],  # fmt: skip
    "agpo_token_mean": [
        "algorithm.estimator=agpo",
        "algorithm.length_reward=agpo",
        "algorithm.aggregation=token_mean",
    ],
    "agpo_sum_norm": [
        "algorithm.estimator=agpo",
        "algorithm.length_reward=agpo",
        "algorithm.aggregation=seq_mean_token_sum_norm",
    ],
    "agpo_mask_truncated": [
        "algorithm.estimator=agpo",
        "algorithm.length_reward=agpo",
        "algorithm.mask_truncated=true",
    ],
    # The same methods with the rollout and the update in bfloat16 (sampler corrected by
    # truncated importance sampling): whether the faster precision changes the results, before
    # it may become a recipe's default (evaluation stays in the model's precision).
    "grpo_bf16": [
        "algorithm.estimator=grpo",
        "algorithm.length_reward=none",
        *BFLOAT16,
    ],
    "agpo_bf16": [
        "algorithm.estimator=agpo",
        "algorithm.length_reward=agpo",
        *BFLOAT16,
    ],
    # ... and with the update's activations in bfloat16 too (optim.lowered_activations: the
    # residual stream as FSDP's param_dtype=bfloat16 computes it, not autocast's float32 one).
    "grpo_bf16act": [
        "algorithm.estimator=grpo",
        "algorithm.length_reward=none",
        *BFLOAT16,
        "optim.lowered_activations=true",
    ],
    "agpo_bf16act": [
        "algorithm.estimator=agpo",
        "algorithm.length_reward=agpo",
        *BFLOAT16,
        "optim.lowered_activations=true",
    ],
}
"""Each method is a set of config overrides on the shared base config (same budget, same seeds)."""
