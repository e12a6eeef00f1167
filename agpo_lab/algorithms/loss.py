"""The clipped policy-gradient loss (PPO/GRPO surrogate) with a KL penalty and three aggregations.

Per token t of completion i, with ratio rho = exp(logp - old_logp) and advantage A:

    l_{i,t} = -min(rho * A, clip(rho, 1 - clip_low, 1 + clip_high) * A) + beta * KL_{i,t}

and the batch loss aggregates l over the masked tokens (see `aggregate`). This matches TRL 1.16's
GRPOTrainer token for token (cross-checked in tests/test_trl_crosscheck.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from sampled tokens; d = ref_logp - logp.

        k1 = -d                  (plain log-ratio; unbiased, high variance, can be negative)
        k2 = d**2 / 2            (biased, low variance)
        k3 = exp(d) - d - 1      (Schulman's unbiased, always >= 0; GRPO paper and TRL use it)

    Example: logprobs [[-1.0]], ref [[-1.5]] -> d = -0.5 -> k1 0.5, k2 0.125, k3 0.1065.
    """
    return _kl_from_log_ratio(ref_logprobs - logprobs, estimator)


def _kl_from_log_ratio(d: Tensor, estimator: str) -> Tensor:
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d**2
    return torch.exp(d) - d - 1


def aggregate(
    per_token: Tensor, mask: Tensor, aggregation: str, max_len: int | None = None
) -> Tensor:
    """Reduce a [B, T] per-token loss to a scalar over the tokens where mask is True.

    Let n_i = tokens of row i, S = the rows with n_i > 0 (rows of all-zero mask, e.g. groups dropped
    by the zero-variance policy "drop", are left out of every average):
      - seq_mean_token_mean (GRPO):  mean_{i in S} (sum_t l_it / n_i)
      - token_mean (DAPO):           sum_{i,t} l_it / sum_i n_i          (every token weighs the same)
      - seq_mean_token_sum_norm (Dr.GRPO): sum_{i,t} l_it / (|S| * max_len), max_len a constant
        (the generation budget), so a token's weight does not depend on its sequence's length.
    With no tokens at all the loss is 0 (still attached to the graph).
    Differences from TRL 1.16: it divides grpo/dr_grpo by B, not |S| (the same unless a row is
    empty), and dapo by `num_items_in_batch` (the same for one micro-batch per generation batch).

    Example: l = [[1, 3], [2, 0]], mask = [[1, 1], [1, 0]] -> seq_mean_token_mean (2 + 2) / 2 = 2,
    token_mean 6 / 3 = 2, seq_mean_token_sum_norm with max_len 4: 6 / (2 * 4) = 0.75.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
    weights = mask.to(per_token.dtype)
    masked = per_token * weights
    tokens_per_row = weights.sum(dim=-1)
    rows = (tokens_per_row > 0).sum().clamp(min=1)
    if aggregation == "seq_mean_token_mean":
        return (masked.sum(dim=-1) / tokens_per_row.clamp(min=1)).sum() / rows
    if aggregation == "token_mean":
        return masked.sum() / tokens_per_row.sum().clamp(min=1)
    if max_len is None or not max_len > 0:
        raise ValueError(
            "aggregation 'seq_mean_token_sum_norm' needs max_len > 0: pass the generation budget "
            "in tokens (e.g. max_new_tokens), the constant Dr.GRPO divides by"
        )
    return masked.sum() / (rows * max_len)


def loss_rows(group_mask: Tensor, truncated: Tensor, mask_truncated: bool = False) -> Tensor:
    """Which completions enter the loss: [num_groups * G] bool, one per row, group-major.

        keep_{g,i} = group_mask_g  and  (not truncated_{g,i}  if mask_truncated)

    group_mask [num_groups] is False for dropped groups (zero_variance=drop); truncated
    [num_groups, G] marks completions that hit the token limit. With `mask_truncated` those leave
    the loss and its token denominators (TRL's mask_truncated_completions, DAPO's overlong
    filtering), while their group's advantages were computed with them: a truncated completion
    is neither pushed up nor down, whatever its group.
    Example: group_mask [True, False], truncated [[False, True], [False, False]] ->
    [True, True, False, False]; with mask_truncated -> [True, False, False, False].
    """
    if truncated.dim() != 2 or truncated.shape[0] != group_mask.shape[0]:
        raise ValueError(
            f"truncated must be [num_groups, G] with num_groups = {group_mask.shape[0]}, got "
            f"{tuple(truncated.shape)}"
        )
    keep = group_mask.bool()[:, None].expand_as(truncated)
    if mask_truncated:
        keep = keep & ~truncated.bool()
    return keep.reshape(-1)


def _as_float(x: Tensor) -> Tensor:
    # half-precision log-probs lose the ratio's precision; compute in at least float32
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _validate_options(
    clip_low: float, clip_high: float, beta: float, kl_estimator: str, aggregation: str
) -> None:
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(
            f"unknown kl_estimator {kl_estimator!r}; valid: {', '.join(KL_ESTIMATORS)}"
        )
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
    if not (0 <= clip_low < 1 and 0 <= clip_high < math.inf):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if not 0 <= beta < math.inf:
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")


def _validate_tensors(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logprobs: Tensor | None,
    beta: float,
) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be shaped [B, T], got shape {tuple(logprobs.shape)}")
    named = {"old_logprobs": old_logprobs, "mask": mask, "ref_logprobs": ref_logprobs}
    for name, tensor in named.items():
        if tensor is not None and tensor.shape != logprobs.shape:
            raise ValueError(
                f"{name} shape {tuple(tensor.shape)} does not match logprobs shape "
                f"{tuple(logprobs.shape)}"
            )
    if advantages.shape not in (logprobs.shape[:1], logprobs.shape):
        raise ValueError(
            f"advantages must be shaped [B] or [B, T] = {tuple(logprobs.shape)}, got "
            f"{tuple(advantages.shape)}; flatten [num_groups, G] advantages with .reshape(-1)"
        )
    if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must be bool or 0/1 values (1 = completion token)")
    if not torch.isfinite(advantages).all():
        raise ValueError("advantages contain NaN or infinite values")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs (the reference policy's token log-probs)")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logprobs: Tensor | None = None,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    aggregation: str = "seq_mean_token_mean",
    max_len: int | None = None,
    kl_bias_correction: bool = False,
    log_ratio_clamp: float = 20.0,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped surrogate + beta * KL, aggregated over masked tokens; returns (loss, diagnostics).

        rho = exp(logp - old_logp)      (log-ratio clamped to +/-log_ratio_clamp so that the loss
                                         stays finite for absurd ratios; e^20 ~ 5e8, inactive in
                                         any sane run; same clamp on the KL's log-ratio)
        l_t = -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A) + beta * KL_t(kl_estimator)
        loss = aggregate(l, mask, aggregation, max_len)

    logprobs / old_logprobs / ref_logprobs / mask: [B, T] (B = num_groups * G completions, right
    padded; values at mask == 0 are ignored, even NaN). advantages: [B] (per sequence) or [B, T].
    clip_high > clip_low is DAPO's clip-higher (0.2 / 0.28). Aggregations: see `aggregate`;
    "seq_mean_token_sum_norm" needs max_len (Dr.GRPO's constant, as TRL's dr_grpo uses
    max_completion_length). kl_bias_correction=True multiplies KL_t by the (differentiable) ratio
    rho, as TRL 1.16 does by default (`use_bias_correction_kl=True`, from DeepSeek-V3.2); the
    default False is the GRPO paper's objective above. token_weights [B, T] (no gradient) multiply
    each token's surrogate term, not its KL: the sampler correction of a rollout computed in
    another precision (`sampler_correction.sampler_weights`); None = all 1.

    Diagnostics (floats, over masked tokens): clip_frac_low (rho < 1 - clip_low with A < 0),
    clip_frac_high (rho > 1 + clip_high with A > 0) - the tokens whose gradient the clip removes, as
    TRL counts them; kl_mean (the plain estimator's token mean, without the rho of
    kl_bias_correction; 0.0 without ref_logprobs); ratio_mean / ratio_min / ratio_max (NaN
    when no token is masked in); policy_loss and kl_loss (= beta * aggregated KL), their sum = loss.

    Example: logprobs = old = [[-1., -1.]], advantages [2.], mask [[1, 1]] -> rho = 1, loss -2.0;
    with logprobs [[-0.5, -1.]] (rho_0 = 1.65 > 1.2, clipped): loss -(1.2 * 2 + 2) / 2 = -2.2.
    """
    _validate_options(clip_low, clip_high, beta, kl_estimator, aggregation)
    _validate_tensors(logprobs, old_logprobs, advantages, mask, ref_logprobs, beta)
    if token_weights is not None and token_weights.shape != logprobs.shape:
        raise ValueError(
            f"token_weights must have the log-probs' shape {tuple(logprobs.shape)}, "
            f"got {tuple(token_weights.shape)}"
        )
    mask = mask.bool()
    logprobs, old_logprobs = _as_float(logprobs), _as_float(old_logprobs)
    # zero the padded positions first: a NaN/inf there would otherwise leak into the gradient
    logprobs = torch.where(mask, logprobs, torch.zeros_like(logprobs))
    old_logprobs = torch.where(mask, old_logprobs, torch.zeros_like(old_logprobs)).detach()
    adv = _as_float(advantages).detach()
    adv = adv[:, None].expand_as(logprobs) if adv.dim() == 1 else adv

    log_ratio = (logprobs - old_logprobs).clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token_pg = -torch.minimum(ratio * adv, clipped_ratio * adv)
    if token_weights is not None:
        per_token_pg = per_token_pg * token_weights.detach().float()
    pg = aggregate(per_token_pg, mask, aggregation, max_len)

    kl = None
    if ref_logprobs is not None:
        ref = torch.where(mask, _as_float(ref_logprobs), torch.zeros_like(logprobs)).detach()
        # clamp the log-ratio the same way: k3 = exp(d) - d - 1 overflows for d > ~88
        d = (ref - logprobs).clamp(-log_ratio_clamp, log_ratio_clamp)
        kl = _kl_from_log_ratio(d, kl_estimator)
    # rho * KL_t: makes the KL gradient the unbiased reverse-KL one off-policy (DeepSeek-V3.2)
    kl_in_loss = kl * ratio if kl is not None and kl_bias_correction else kl
    kl_term = (
        beta * aggregate(kl_in_loss, mask, aggregation, max_len) if beta > 0 else pg.new_zeros(())
    )
    loss = pg + kl_term

    with torch.no_grad():
        n_tokens = max(int(mask.sum()), 1)
        masked_ratio = ratio[mask]
        empty = masked_ratio.numel() == 0
        diagnostics = {
            "clip_frac_low": ((ratio < 1 - clip_low) & (adv < 0) & mask).sum().item() / n_tokens,
            "clip_frac_high": ((ratio > 1 + clip_high) & (adv > 0) & mask).sum().item() / n_tokens,
            "kl_mean": 0.0 if kl is None else (kl * mask).sum().item() / n_tokens,
            "ratio_mean": math.nan if empty else masked_ratio.mean().item(),
            "ratio_min": math.nan if empty else masked_ratio.min().item(),
            "ratio_max": math.nan if empty else masked_ratio.max().item(),
            "policy_loss": pg.item(),
            "kl_loss": kl_term.item(),
        }
    return loss, diagnostics
