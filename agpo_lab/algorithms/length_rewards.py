"""Length-based reward terms added to the correctness reward: AGPO's bonus, Kimi k1.5, DAPO overlong.

All lengths are in tokens. The group-wise terms (AGPO, Kimi) need the whole group at once, shaped
[num_groups, G]; compute them after every completion of a group is scored, never per shard.
"""

from __future__ import annotations

import torch
from torch import Tensor

AGPO_LEN_EPS = 1e-6  # the constant in the author's reference implementation's denominator


def _as_correct(correct: Tensor) -> Tensor:
    """Validate a [num_groups, G] correctness tensor (bool or 0/1 numbers) and return it as bool."""
    correct = torch.as_tensor(correct)
    if correct.dim() != 2:
        raise ValueError(
            f"correct must be shaped [num_groups, G], got shape {tuple(correct.shape)}; "
            "reshape a flat batch with .view(-1, G)"
        )
    if correct.shape[1] < 2:
        raise ValueError(
            f"group size G={correct.shape[1]} < 2: a group needs at least 2 completions"
        )
    if correct.dtype != torch.bool:
        if not ((correct == 0) | (correct == 1)).all():
            raise ValueError("correct must be bool or 0/1 values (1 = correct completion)")
        correct = correct != 0
    return correct


def _as_lengths(lengths: Tensor, shape: torch.Size | None = None) -> Tensor:
    """Validate non-negative finite token counts (optionally of a given shape), return as float."""
    lengths = torch.as_tensor(lengths)
    lengths = lengths.to(torch.get_default_dtype()) if not lengths.is_floating_point() else lengths
    if shape is not None and lengths.shape != shape:
        raise ValueError(
            f"lengths shape {tuple(lengths.shape)} does not match correct shape {tuple(shape)}"
        )
    if not torch.isfinite(lengths).all():
        raise ValueError("lengths contain NaN or infinite values; pass token counts")
    if (lengths < 0).any():
        raise ValueError("lengths must be >= 0 (token counts)")
    return lengths


def _check_weight(weight: float) -> None:
    if not weight >= 0:
        raise ValueError(f"weight must be >= 0, got {weight}")


def agpo_length_reward(
    correct: Tensor,
    lengths: Tensor,
    weight: float = 0.1,
    in_homogeneous_groups: bool = False,
) -> Tensor:
    """AGPO's length bonus (reconstructed from the first author's code): shorter correct is better.

    Per group, over its correct completions C only:
        ratio_i = (l_i - min_C l) / (max_C l - min_C l + 1e-6)
        r_len_i = weight * (1 - ratio_i)  for i in C,   0 for wrong completions
    so every value lies in [0, weight]: the shortest correct completion gets `weight`, and a lone
    correct completion (or correct ones of equal length) gets `weight` too.
    By default the bonus is applied only in groups with mixed correctness (an all-correct group keeps
    its constant reward, hence AGPO's +1); in_homogeneous_groups=True applies it in all-correct
    groups as well (the ablation). All-wrong groups always get 0.

    Example: correct [[1, 1, 0, 1]], lengths [[10, 20, 5, 15]] -> [[0.1, 0.0, 0.0, 0.05]]
    (up to the 1e-6 in the denominator); correct [[1, 1]] -> [[0, 0]] unless in_homogeneous_groups.
    """
    correct = _as_correct(correct)
    lengths = _as_lengths(lengths, correct.shape)
    _check_weight(weight)
    inf = torch.tensor(float("inf"), dtype=lengths.dtype, device=lengths.device)
    shortest = torch.where(correct, lengths, inf).amin(dim=1, keepdim=True)
    longest = torch.where(correct, lengths, -inf).amax(dim=1, keepdim=True)
    ratio = (lengths - shortest) / (longest - shortest + AGPO_LEN_EPS)
    # clamp: ratio of a wrong completion can be anything (even inf-inf); it is zeroed just below
    bonus = weight * (1 - ratio.clamp(0.0, 1.0))
    applies = (
        correct.any(dim=1) if in_homogeneous_groups else ~correct.all(dim=1) & correct.any(dim=1)
    )
    return torch.where(correct & applies[:, None], bonus, torch.zeros_like(bonus))


def kimi_length_penalty(correct: Tensor, lengths: Tensor, weight: float = 1.0) -> Tensor:
    """Kimi k1.5 length reward (arXiv 2501.12599), over the whole group (correct and wrong):

        lambda_i = 0.5 - (l_i - min l) / (max l - min l)
        r_len_i  = weight * lambda_i            if correct
        r_len_i  = weight * min(0, lambda_i)    if wrong
    and 0 for the whole group when all lengths are equal. Values lie in [-weight/2, weight/2].
    The paper adds it with weight 1 (after a warm-up phase, which is the trainer's business).

    Example: correct [[1, 0, 1]], lengths [[10, 20, 30]] -> [[0.5, 0.0, -0.5]].
    """
    correct = _as_correct(correct)
    lengths = _as_lengths(lengths, correct.shape)
    _check_weight(weight)
    min_len = lengths.amin(dim=1, keepdim=True)
    span = lengths.amax(dim=1, keepdim=True) - min_len
    # where(span > 0) keeps the division finite in equal-length groups, which get 0
    lam = 0.5 - (lengths - min_len) / torch.where(span > 0, span, torch.ones_like(span))
    lam = torch.where(span > 0, lam, torch.zeros_like(lam))
    return weight * torch.where(correct, lam, lam.clamp(max=0.0))


def dapo_overlong_penalty(lengths: Tensor, max_len: int, cache_len: int) -> Tensor:
    """DAPO soft overlong punishment (arXiv 2503.14476), per completion, any shape:

        0                                    if l <= max_len - cache_len
        ((max_len - cache_len) - l) / cache_len   if max_len - cache_len < l <= max_len
        -1                                   if l > max_len
    A linear ramp from 0 to -1 over the last `cache_len` tokens of the budget (DAPO: 20480, 4096).

    Example: max_len=10, cache_len=4, lengths [5, 6, 8, 10, 12] -> [0, 0, -0.5, -1, -1].
    """
    lengths = _as_lengths(lengths)
    if not (isinstance(max_len, int | float) and isinstance(cache_len, int | float)):
        raise ValueError("max_len and cache_len must be numbers of tokens")
    if not 0 < cache_len <= max_len:
        raise ValueError(
            f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}"
        )
    soft_start = max_len - cache_len
    ramp = (soft_start - lengths) / cache_len
    penalty = torch.where(lengths <= soft_start, torch.zeros_like(lengths), ramp)
    return torch.where(lengths > max_len, torch.full_like(lengths, -1.0), penalty)
