"""Group-relative advantage estimators: GRPO, AGPO, Dr.GRPO, RLOO, REINFORCE++-baseline, and RL-ZVP's
token-level advantages for zero-variance groups.

Every function takes rewards shaped [num_groups, G] (row = the G completions of one prompt) and
returns advantages of the same shape, one scalar per completion (the trainer broadcasts it to every
token). `compute_advantages` dispatches by name and applies a zero-variance policy on top.

A group is *homogeneous* ("zero variance") when max(r) - min(r) <= atol (default 1e-6): then every
centred estimator gives exactly 0 and the group carries no policy gradient. AGPO replaces that 0 by
+1 / -1 when the whole group sits at the top / bottom of the reward range.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from torch import Tensor

STD_CONVENTIONS = ("population", "bessel")
INTERMEDIATE_RULES = ("zero", "midpoint_sign")
ZERO_VARIANCE_POLICIES = ("keep", "agpo", "drop", "rl_zvp")
DEFAULT_EPS = 1e-4  # TRL 1.16's constant; verl uses 1e-6
DEFAULT_ATOL = 1e-6  # two rewards closer than this count as equal


def _as_rewards(rewards: Tensor, name: str = "rewards") -> Tensor:
    """Validate a [num_groups, G] reward tensor and return it as a float tensor."""
    rewards = torch.as_tensor(rewards)
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    if rewards.dim() != 2:
        raise ValueError(
            f"{name} must be shaped [num_groups, G], got shape {tuple(rewards.shape)}; "
            "reshape a flat batch with rewards.view(-1, G)"
        )
    if rewards.shape[0] < 1:
        raise ValueError(f"{name} has no groups (shape {tuple(rewards.shape)})")
    if rewards.shape[1] < 2:
        raise ValueError(
            f"group size G={rewards.shape[1]} < 2: a group-relative advantage needs at least 2 "
            "completions per prompt"
        )
    if not torch.isfinite(rewards).all():
        bad = "NaN" if torch.isnan(rewards).any() else "infinite"
        raise ValueError(
            f"{name} contain {bad} values; score every completion with a finite number"
        )
    return rewards


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(allowed)}")


def _check_eps(eps: float) -> None:
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")


def _check_bounds(r_min: float | None, r_max: float | None) -> tuple[float, float]:
    if r_min is None or r_max is None:
        raise ValueError(
            "r_min and r_max are required: pass the reward function's lowest and highest reward "
            "(e.g. r_min=0.0, r_max=1.0 for a 0/1 correctness reward)"
        )
    if not (math.isfinite(r_min) and math.isfinite(r_max)):
        raise ValueError(f"r_min and r_max must be finite, got r_min={r_min}, r_max={r_max}")
    if r_min >= r_max:
        raise ValueError(f"r_min must be < r_max, got r_min={r_min}, r_max={r_max}")
    return float(r_min), float(r_max)


def _group_std(rewards: Tensor, std: str) -> Tensor:
    _check_choice(std, STD_CONVENTIONS, "std convention")
    return rewards.std(dim=1, keepdim=True, correction=1 if std == "bessel" else 0)


def _centred(rewards: Tensor, atol: float) -> Tensor:
    """r - mean(r) per group, exactly 0 in homogeneous groups.

    Why the override: the mean of G equal floats can differ from them by an ulp, and with eps=0 the
    z-score of that rounding noise is O(1) garbage instead of 0.
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return torch.where(is_homogeneous(rewards, atol)[:, None], 0.0, centred)


def is_homogeneous(rewards: Tensor, atol: float = DEFAULT_ATOL) -> Tensor:
    """[num_groups] bool: True where every reward of the group is equal (max - min <= atol).

    Example: ``is_homogeneous(torch.tensor([[1., 1.], [1., 0.]]))`` -> ``tensor([True, False])``.
    """
    rewards = _as_rewards(rewards)
    return (rewards.amax(dim=1) - rewards.amin(dim=1)) <= atol


def group_stats(
    rewards: Tensor, r_min: float, r_max: float, *, atol: float = DEFAULT_ATOL
) -> dict[str, Tensor | float]:
    """Classify each group as all-max, all-min, other-homogeneous or mixed (exactly one is True).

    all_max: homogeneous and every r_i >= r_max - atol; all_min: homogeneous and every
    r_i <= r_min + atol; other_homogeneous: homogeneous elsewhere; mixed: not homogeneous.
    "At or beyond the bound" (not "equal") so that a shaping term which lifts a whole all-correct
    group above r_max (e.g. a length bonus inside homogeneous groups) keeps it in all_max.
    Fractions are over groups; frac_zero_var = frac_all_max + frac_all_min + frac_other.

    Example (r_min=0, r_max=1): rows [1,1], [0,0], [.5,.5], [1,0] -> all_max [T,F,F,F],
    all_min [F,T,F,F], other_homogeneous [F,F,T,F], mixed [F,F,F,T], frac_zero_var 0.75.
    """
    rewards = _as_rewards(rewards)
    r_min, r_max = _check_bounds(r_min, r_max)
    homogeneous = is_homogeneous(rewards, atol)
    all_max = homogeneous & (rewards >= r_max - atol).all(dim=1)
    all_min = homogeneous & (rewards <= r_min + atol).all(dim=1)
    other = homogeneous & ~all_max & ~all_min
    n = rewards.shape[0]
    return {
        "all_max": all_max,
        "all_min": all_min,
        "other_homogeneous": other,
        "mixed": ~homogeneous,
        "frac_zero_var": homogeneous.sum().item() / n,
        "frac_all_max": all_max.sum().item() / n,
        "frac_all_min": all_min.sum().item() / n,
        "frac_other": other.sum().item() / n,
    }


def grpo_advantage(
    rewards: Tensor, *, std: str = "bessel", eps: float = DEFAULT_EPS, atol: float = DEFAULT_ATOL
) -> Tensor:
    """GRPO: A_i = (r_i - mean(r)) / (std(r) + eps), per group.

    std="bessel" (divide by G-1) with eps=1e-4 is TRL 1.16's convention and the default; verl uses
    bessel with eps=1e-6; std="population" divides by G. A homogeneous group (max - min <= atol)
    gives exactly 0, also with eps=0.

    Example: rewards [[1., 0., 0., 0.]] -> mean 0.25, bessel std 0.5 -> [[1.4997, -0.4999, ...]].
    """
    rewards = _as_rewards(rewards)
    _check_eps(eps)
    centred = _centred(rewards, atol)
    group_std = _group_std(rewards, std)
    # 1.0 for homogeneous rows (their centred value is 0): avoids 0/0 when eps=0
    group_std = torch.where(centred.abs().amax(dim=1, keepdim=True) > 0, group_std, 1.0)
    return centred / (group_std + eps)


def agpo_advantage(
    rewards: Tensor,
    *,
    r_min: float,
    r_max: float,
    intermediate: str = "zero",
    std: str = "bessel",
    eps: float = DEFAULT_EPS,
    atol: float = DEFAULT_ATOL,
) -> Tensor:
    """AGPO (arXiv 2503.15952, v1): +1 for all-max groups, -1 for all-min groups, GRPO otherwise.

        A_i = +1                          if every r_j == r_max  (whole group at the top)
        A_i = -1                          if every r_j == r_min  (whole group at the bottom)
        A_i = (r_i - mean) / (std + eps)  otherwise (mixed groups: identical to grpo_advantage)

    r_min / r_max are the reward function's bounds, not the group's. A homogeneous group at an
    intermediate value (possible with shaped rewards) is not settled by the paper:
    intermediate="zero" (default) gives 0 (plain GRPO); "midpoint_sign" gives
    sign(r - (r_min + r_max) / 2), i.e. +1 / -1 / 0 above / below / at the midpoint.

    Example (r_min=0, r_max=1): [[1,1,1], [0,0,0], [1,0,0]] -> [[1,1,1], [-1,-1,-1],
    [1.1545, -0.5773, -0.5773]] (the mixed row is grpo_advantage's).
    """
    rewards = _as_rewards(rewards)
    _check_choice(intermediate, INTERMEDIATE_RULES, "intermediate rule")
    advantages = grpo_advantage(rewards, std=std, eps=eps, atol=atol)
    return _apply_agpo_rule(advantages, rewards, r_min, r_max, intermediate, atol)


def _apply_agpo_rule(
    advantages: Tensor, rewards: Tensor, r_min: float, r_max: float, intermediate: str, atol: float
) -> Tensor:
    """Overwrite homogeneous groups with AGPO's constants; mixed groups are left as they are."""
    stats = group_stats(rewards, r_min, r_max, atol=atol)
    target = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    if intermediate == "midpoint_sign":
        target = torch.sign(rewards[:, 0] - (r_min + r_max) / 2)
    target = torch.where(stats["all_max"], 1.0, torch.where(stats["all_min"], -1.0, target))
    homogeneous = ~stats["mixed"]
    return torch.where(homogeneous[:, None], target[:, None].to(advantages.dtype), advantages)


def dr_grpo_advantage(rewards: Tensor, *, atol: float = DEFAULT_ATOL) -> Tensor:
    """Dr. GRPO (arXiv 2503.20783): A_i = r_i - mean(r); no std division (removes its bias).

    Example: [[1., 0., 0., 0.]] -> [[0.75, -0.25, -0.25, -0.25]].
    """
    return _centred(_as_rewards(rewards), atol)


def rloo_advantage(rewards: Tensor, *, atol: float = DEFAULT_ATOL) -> Tensor:
    """RLOO: A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(r)) (leave-one-out baseline).

    Example: [[1., 0., 0., 0.]] -> [[1.0, -0.3333, -0.3333, -0.3333]].
    """
    rewards = _as_rewards(rewards)
    g = rewards.shape[1]
    return g / (g - 1) * _centred(rewards, atol)


def reinforce_pp_baseline_advantage(
    rewards: Tensor, *, std: str = "bessel", eps: float = DEFAULT_EPS, atol: float = DEFAULT_ATOL
) -> Tensor:
    """REINFORCE++-baseline: centre per group, then scale by the std over the WHOLE batch.

        c_i = r_i - mean_group(r);   A_i = c_i / (std_batch(c) + eps)

    The batch-level std (over all num_groups * G centred rewards) avoids GRPO's per-prompt
    difficulty bias; an all-homogeneous batch gives 0 everywhere. (The batch mean of c is 0 already.)

    Example: [[1., 0.], [1., 1.]] -> c = [[.5, -.5], [0, 0]], bessel std 0.4082 ->
    [[1.2244, -1.2244], [0, 0]].
    """
    rewards = _as_rewards(rewards)
    _check_eps(eps)
    _check_choice(std, STD_CONVENTIONS, "std convention")
    centred = _centred(rewards, atol)
    if not centred.any():  # every group homogeneous: 0 (also with eps=0, where 0/0 would be NaN)
        return centred
    batch_std = centred.flatten().std(correction=1 if std == "bessel" else 0)
    return centred / (batch_std + eps)


def zero_variance_sign(
    rewards: Tensor, r_min: float, r_max: float, *, atol: float = DEFAULT_ATOL
) -> Tensor:
    """[num_groups] +1 for an all-max group, -1 for an all-min group, 0 otherwise (mixed groups and
    homogeneous groups between the bounds): the direction AGPO and RL-ZVP give such a group.

    Example (r_min=0, r_max=1): [[1, 1], [0, 0], [1, 0], [.5, .5]] -> [1, -1, 0, 0].
    """
    stats = group_stats(rewards, r_min, r_max, atol=atol)
    return stats["all_max"].long() - stats["all_min"].long()


def rl_zvp_token_advantages(
    entropy: Tensor, mask: Tensor, sign: Tensor, alpha: float = 0.1
) -> Tensor:
    """RL-ZVP (arXiv 2509.21880): token advantages [B, T] of completions in zero-variance groups.

        A_{i,t} = +alpha * H_{i,t}                           sign_i = +1 (group all correct)
        A_{i,t} = -alpha * (max_{t'} H_{i,t'} - H_{i,t})     sign_i = -1 (group all wrong)
        A_{i,t} = 0                                          sign_i = 0  (any other row)

    H_{i,t} is the entropy of the distribution token t was sampled from (no gradient flows
    through it), the max runs over row i's own tokens (mask), padding gets 0. A correct answer is
    reinforced most where the model was unsure; a wrong one is pushed down most where it was
    confident (low entropy). Mixed groups keep their group-relative advantage (the caller's).

    Example: entropy [[1, 3, 9], [2, 5, 0]], mask [[1, 1, 0], [1, 1, 0]], sign [1, -1],
    alpha 0.1 -> [[0.1, 0.3, 0.0], [-0.3, 0.0, 0.0]].
    """
    if entropy.dim() != 2 or mask.shape != entropy.shape:
        raise ValueError(
            f"entropy and mask must both be shaped [B, T], got {tuple(entropy.shape)} and "
            f"{tuple(mask.shape)}"
        )
    if sign.shape != entropy.shape[:1]:
        raise ValueError(f"sign must be shaped [B] = [{entropy.shape[0]}], got {tuple(sign.shape)}")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    mask = mask.bool()
    h = torch.where(mask, entropy.detach().float(), 0.0)
    row_max = torch.where(mask, h, -math.inf).amax(dim=1, keepdim=True).clamp(min=0)
    positive, negative = alpha * h, -alpha * (row_max - h)
    sign = sign[:, None]
    out = torch.where(sign > 0, positive, torch.where(sign < 0, negative, torch.zeros_like(h)))
    return torch.where(mask, out, 0.0)


ESTIMATORS: dict[str, Callable[..., Tensor]] = {
    "grpo": grpo_advantage,
    "agpo": agpo_advantage,
    "dr_grpo": dr_grpo_advantage,
    "rloo": rloo_advantage,
    "reinforce_pp": reinforce_pp_baseline_advantage,
}


def compute_advantages(
    rewards: Tensor,
    estimator: str,
    *,
    zero_variance: str = "keep",
    r_min: float | None = None,
    r_max: float | None = None,
    intermediate: str = "zero",
    atol: float = DEFAULT_ATOL,
    **options: object,
) -> tuple[Tensor, Tensor]:
    """Advantages by estimator name, plus a zero-variance policy usable with any estimator.

    estimator: "grpo", "agpo", "dr_grpo", "rloo", "reinforce_pp"; `options` go to it (std, eps).
    zero_variance (what homogeneous groups get):
      - "keep": the estimator's own output (0 for every centred estimator; +/-1 for "agpo").
      - "agpo": AGPO's rule on top of any estimator: +1 all-max, -1 all-min, `intermediate` rule
        otherwise (needs r_min, r_max).
      - "drop": advantage 0 and group_mask False, so the loss masks the group out (pass the mask
        to the loss as zero rows; see loss.policy_loss).
      - "rl_zvp": advantage 0 here (group_mask True); the caller gives such groups RL-ZVP's
        token-level advantages (`rl_zvp_token_advantages`), which need the tokens' entropies.
    Returns (advantages [num_groups, G], group_mask [num_groups] bool, False only for dropped).

    Example: compute_advantages(torch.tensor([[1., 1.], [1., 0.]]), "grpo", zero_variance="drop")
    -> (tensor([[0., 0.], [0.7070, -0.7070]]), tensor([False, True])).
    """
    rewards = _as_rewards(rewards)
    _check_choice(estimator, tuple(ESTIMATORS), "estimator")
    _check_choice(zero_variance, ZERO_VARIANCE_POLICIES, "zero_variance policy")
    _check_choice(intermediate, INTERMEDIATE_RULES, "intermediate rule")
    fn = ESTIMATORS[estimator]
    named_here = {"rewards", "r_min", "r_max", "intermediate", "atol"}
    accepted = set(inspect.signature(fn).parameters) - named_here
    unknown = sorted(set(options) - accepted)
    if unknown:
        valid = ", ".join(sorted(accepted)) or "none"
        raise ValueError(f"unknown option(s) {unknown} for estimator {estimator!r}; valid: {valid}")
    options = {**options, "atol": atol}
    if estimator == "agpo":
        r_min, r_max = _check_bounds(r_min, r_max)
        options.update(r_min=r_min, r_max=r_max, intermediate=intermediate)
    advantages = fn(rewards, **options)

    group_mask = torch.ones(rewards.shape[0], dtype=torch.bool, device=rewards.device)
    if zero_variance == "agpo":
        r_min, r_max = _check_bounds(r_min, r_max)
        advantages = _apply_agpo_rule(advantages, rewards, r_min, r_max, intermediate, atol)
    elif zero_variance in ("drop", "rl_zvp"):
        mixed = ~is_homogeneous(rewards, atol)
        advantages = advantages * mixed[:, None]
        if zero_variance == "drop":
            group_mask = mixed
    return advantages, group_mask
