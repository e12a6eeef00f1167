"""Pure torch algorithm pieces: advantage estimators, length rewards and the policy loss.

Independent of the trainer, so a notebook can call any of them on a hand-made batch.
"""

from agpo_lab.algorithms.advantages import (
    ESTIMATORS,
    agpo_advantage,
    compute_advantages,
    dr_grpo_advantage,
    group_stats,
    grpo_advantage,
    is_homogeneous,
    reinforce_pp_baseline_advantage,
    rl_zvp_token_advantages,
    rloo_advantage,
    zero_variance_sign,
)
from agpo_lab.algorithms.length_rewards import (
    agpo_length_reward,
    dapo_overlong_penalty,
    kimi_length_penalty,
)
from agpo_lab.algorithms.loss import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    aggregate,
    kl_penalty,
    loss_rows,
    policy_loss,
)
from agpo_lab.algorithms.sampler_correction import mismatch_metrics, sampler_weights

__all__ = [
    "AGGREGATIONS",
    "ESTIMATORS",
    "KL_ESTIMATORS",
    "agpo_advantage",
    "agpo_length_reward",
    "aggregate",
    "compute_advantages",
    "dapo_overlong_penalty",
    "dr_grpo_advantage",
    "group_stats",
    "grpo_advantage",
    "is_homogeneous",
    "kimi_length_penalty",
    "kl_penalty",
    "loss_rows",
    "mismatch_metrics",
    "policy_loss",
    "reinforce_pp_baseline_advantage",
    "rl_zvp_token_advantages",
    "rloo_advantage",
    "sampler_weights",
    "zero_variance_sign",
]
