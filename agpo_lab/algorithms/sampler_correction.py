"""Correcting for a sampler that is not quite the trained policy (a lower-precision rollout).

When the rollout computes in bfloat16 and the update in float32 (or both in bfloat16 through
different kernels), a completion is drawn from pi_sampler but the loss's gradient is that of
pi_trainer: the samples are slightly off-policy. Importance sampling reweights each token by

    w_t = pi_trainer(y_t | ...) / pi_sampler(y_t | ...) = exp(logp_trainer_t - logp_sampler_t)

and, because a few tokens where the two disagree strongly would dominate, caps it (Yao et al.,
"Your efficient RL framework secretly brings you off-policy RL training", 2025: truncated
importance sampling; TRL and verl apply the same to vLLM rollouts):

    token_truncate:    w_t <- min(w_t, C)
    token_mask:        w_t <- w_t if w_t <= C else 0
    sequence_truncate: every token of a row gets min(prod_t w_t, C)
    sequence_mask:     every token of a row gets prod_t w_t, or 0 if that exceeds C

The weights multiply the clipped surrogate of each token (not the KL term) and carry no gradient:
`policy_loss(..., token_weights=w)`. When sampler and trainer agree exactly, every w_t is 1 and
the loss is unchanged (tests/test_sampler_correction.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def sampler_weights(
    trainer_logprobs: Tensor,
    sampler_logprobs: Tensor,
    mask: Tensor,
    mode: str = "token_truncate",
    cap: float = 2.0,
) -> Tensor:
    """Importance weights [B, T] of sampled tokens, pi_trainer / pi_sampler, capped (module
    docstring); 0 where mask is 0, no gradient.

    trainer_logprobs, sampler_logprobs, mask: [B, T]. Example: trainer [[-1.0, -2.0]], sampler
    [[-1.0, -3.0]], mask [[1, 1]]: w = [1, e = 2.72]; token_truncate, C = 2 -> [[1, 2]];
    token_mask -> [[1, 0]]; sequence_truncate -> the product 2.72 capped: [[2, 2]];
    sequence_mask -> [[0, 0]].
    """
    if mode not in MODES:
        raise ValueError(f"sampler correction mode must be one of {MODES}, got {mode!r}")
    if cap < 1:
        raise ValueError(
            f"sampler correction cap must be >= 1 (weights near 1 must pass), got {cap}"
        )
    mask = mask.bool()
    log_w = torch.where(mask, trainer_logprobs.float() - sampler_logprobs.float(), 0.0).detach()
    if mode.startswith("sequence"):
        log_w = log_w.sum(-1, keepdim=True).expand_as(log_w)
    weights = log_w.clamp(max=60.0).exp()  # exp(60) ~ 1e26: finite, and far above any cap
    if mode.endswith("truncate"):
        weights = weights.clamp(max=cap)
    else:
        weights = weights.masked_fill(weights > cap, 0.0)
    return weights * mask


def mismatch_metrics(
    trainer_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, weights: Tensor
) -> dict[str, float]:
    """How far sampler and trainer are apart, over masked tokens (NaN when none is masked in):
    sampler/kl (k3 estimate of KL(sampler || trainer), the metric TRL and verl log),
    sampler/abs_logprob_diff (mean |logp_trainer - logp_sampler|), sampler/weight_mean (of the
    capped weights the loss used) and sampler/token_ratio_max (the largest uncapped per-token
    pi_trainer / pi_sampler).

    Example: trainer [[-1.0, -2.0]], sampler [[-1.0, -2.1]], all masked in -> abs diff 0.05.
    """
    mask = mask.bool()
    if not mask.any():
        nan = float("nan")
        return {"sampler/kl": nan, "sampler/abs_logprob_diff": nan,
                "sampler/weight_mean": nan, "sampler/token_ratio_max": nan}  # fmt: skip
    d = (trainer_logprobs.float() - sampler_logprobs.float())[mask].detach()
    raw = d.clamp(max=60.0).exp()
    return {
        "sampler/kl": (raw - d - 1).mean().item(),
        "sampler/abs_logprob_diff": d.abs().mean().item(),
        "sampler/weight_mean": weights[mask].float().mean().item(),
        "sampler/token_ratio_max": raw.max().item(),
    }
