"""From task scores to the learning signal, as `AlgorithmConfig` asks: length-shaped rewards, then
group advantages. The formulas live in `agpo_lab.algorithms`; this module only picks them.

All tensors are [num_groups, G] (G completions of one prompt per row), because every term here
needs whole groups.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from agpo_lab.algorithms import advantages as adv_lib
from agpo_lab.algorithms.length_rewards import (
    agpo_length_reward,
    dapo_overlong_penalty,
    kimi_length_penalty,
)
from agpo_lab.config import AlgorithmConfig
from agpo_lab.tasks.base import is_correct


def shaped_rewards(
    scores: Tensor, lengths: Tensor, cfg: AlgorithmConfig, max_new_tokens: int
) -> Tensor:
    """reward = score + length term (cfg.length_reward: none, agpo, kimi or dapo_overlong).

    A completion is correct by `tasks.is_correct` (score >= 1). Example: length_reward="none" gives
    the scores unchanged; "dapo_overlong" with max_new_tokens=8, overlong_cache=4 subtracts
    (length - 4) / 4 from completions longer than 4 tokens (-1 at the limit).
    """
    return scores + _length_term(is_correct(scores), lengths, cfg, max_new_tokens)


def _length_term(
    correct: Tensor, lengths: Tensor, cfg: AlgorithmConfig, max_new_tokens: int
) -> Tensor:
    if cfg.length_reward == "agpo":
        return agpo_length_reward(
            correct, lengths, cfg.length_weight, cfg.length_in_homogeneous_groups
        )
    if cfg.length_reward == "kimi":
        return kimi_length_penalty(correct, lengths, weight=cfg.length_weight)
    if cfg.length_reward == "dapo_overlong":
        return dapo_overlong_penalty(lengths, max_new_tokens, cfg.overlong_cache)
    return torch.zeros(correct.shape)


def group_advantages(rewards: Tensor, cfg: AlgorithmConfig) -> tuple[Tensor, Tensor]:
    """(advantages [num_groups, G], group_mask [num_groups]) by cfg.estimator and zero_variance.

    See `agpo_lab.algorithms.advantages.compute_advantages`. Example: GRPO on [[1, 0]] gives
    [[0.7070, -0.7070]] (Bessel std, eps 1e-4).
    """
    # Estimators differ in their options; pass std / eps only to those that take them.
    takes = inspect.signature(adv_lib.ESTIMATORS[cfg.estimator]).parameters
    options = {k: v for k, v in {"std": cfg.std, "eps": cfg.eps}.items() if k in takes}
    return adv_lib.compute_advantages(
        rewards,
        cfg.estimator,
        zero_variance=cfg.zero_variance,
        r_min=cfg.r_min,
        r_max=cfg.r_max,
        intermediate=cfg.intermediate,
        **options,
    )


def token_advantages(
    rewards: Tensor, advantages: Tensor, entropy: Tensor, completion_mask: Tensor,
    cfg: AlgorithmConfig,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """(row advantages [B], token advantages [B, C] or None) for the loss.

    Only zero_variance="rl_zvp" has token-level advantages: mixed groups keep their row's value on
    every token, all-correct / all-wrong groups get `rl_zvp_token_advantages` from the sampling
    entropies [B, C]; their row advantage becomes the mean over their tokens (0 exactly when every
    token's is 0, so the update still skips rows without gradient). Otherwise: (flat, None).

    Example: rewards [[1, 1]], entropy [[1, 3], [2, 2]], full mask, alpha 0.1 ->
    tokens [[0.1, 0.3], [0.2, 0.2]], rows [0.2, 0.2].
    """
    flat = advantages.flatten()
    if cfg.zero_variance != "rl_zvp":
        return flat, None
    G = rewards.shape[1]
    sign = adv_lib.zero_variance_sign(rewards, cfg.r_min, cfg.r_max).repeat_interleave(G)
    sign = sign.to(entropy.device)
    shaped = adv_lib.rl_zvp_token_advantages(entropy, completion_mask, sign, cfg.zvp_alpha)
    mask = completion_mask.to(shaped.dtype)
    flat = flat.to(shaped.device, shaped.dtype)
    tokens = torch.where(sign[:, None] != 0, shaped, flat[:, None] * mask)
    row_mean = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.where(sign != 0, row_mean, flat), tokens
