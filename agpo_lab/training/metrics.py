"""Per-step training metrics: `rollout_metrics` turns a scored batch into the namespaced numbers
written to metrics.jsonl; `UpdateStats` averages the loss diagnostics over optimizer steps;
`sample_records` are the rows of samples.jsonl.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from agpo_lab.algorithms.advantages import group_stats, is_homogeneous
from agpo_lab.tasks.base import is_correct


def _mean(values: Tensor) -> float | None:
    """Mean as a float, None when there is nothing to average (written as null)."""
    return values.float().mean().item() if values.numel() else None


def rollout_metrics(
    scores: Tensor,
    rewards: Tensor,
    lengths: Tensor,
    truncated: Tensor,
    advantages: Tensor,
    active: Tensor,
) -> dict[str, float | None]:
    """Reward, zero-variance, length and advantage metrics of one scored rollout batch.

    scores / rewards / lengths / truncated / advantages: [num_groups, G]; active: [num_groups].
    zero_var/* classify groups by their correctness scores (all correct / all wrong / other
    homogeneous); zero_var/reward_frac is the fraction whose total reward (with length shaping)
    is homogeneous, i.e. the groups that give GRPO no gradient. Advantage stats are over active
    rows. Example: scores [[1, 1], [1, 0]] -> reward/accuracy 0.75, zero_var/all_correct 0.5.
    """
    correct = is_correct(scores)
    stats = group_stats(scores, 0.0, 1.0)
    lengths = lengths.float()
    used = advantages[active]
    return {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.flatten().std(correction=0).item(),
        "reward/accuracy": correct.float().mean().item(),
        "zero_var/frac": stats["frac_zero_var"],
        "zero_var/all_correct": stats["frac_all_max"],
        "zero_var/all_wrong": stats["frac_all_min"],
        "zero_var/other": stats["frac_other"],
        "zero_var/reward_frac": is_homogeneous(rewards).float().mean().item(),
        "length/mean": lengths.mean().item(),
        "length/mean_correct": _mean(lengths[correct]),
        "length/mean_wrong": _mean(lengths[~correct]),
        "length/clipped_frac": truncated.float().mean().item(),
        "advantage/mean": _mean(used),
        "advantage/std": used.float().std(correction=0).item() if used.numel() else None,
        "advantage/abs_mean": _mean(used.abs()),
    }


BRANCHES = ("all_correct", "all_wrong", "mixed")
"""Group kinds by correctness: the branches AGPO treats differently (+1, -1, group-relative)."""


def stop_probability(logprobs: Tensor, lengths: Tensor, truncated: Tensor) -> Tensor:
    """[B] the probability the sampling policy gave the stop token where each completion stopped
    (the last sampled token's), NaN for a truncated completion (it never stopped).

    Example: logprobs [[-1, -0.1], [-2, -3]], lengths [2, 1], truncated [False, True] ->
    [0.905, nan].
    """
    last = logprobs.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
    return last.exp().masked_fill(truncated, math.nan).cpu()


def branch_metrics(scores: Tensor, lengths: Tensor, end_prob: Tensor) -> dict[str, float | None]:
    """Completion length and end-token probability per branch (group kind).

    scores / lengths / end_prob: [num_groups, G]; end_prob is the probability the policy gave the
    stop token where the completion stopped (NaN for a truncated one). A falling end_token/prob in
    all-wrong groups is the -1 branch teaching the model not to stop. None where a branch is empty.
    Example: scores [[1, 1], [1, 0]], lengths [[4, 6], [8, 2]], end_prob [[.5, .7], [.9, nan]] ->
    length/mean_all_correct 5.0, end_token/prob_all_correct 0.6, length/mean_mixed 5.0,
    end_token/prob_mixed 0.9, all_wrong: None.
    """
    stats = group_stats(scores, 0.0, 1.0)
    kinds = {
        "all_correct": stats["all_max"],
        "all_wrong": stats["all_min"],
        "mixed": stats["mixed"],
    }
    out: dict[str, float | None] = {}
    for name in BRANCHES:
        rows = kinds[name]
        probs = end_prob[rows].flatten()
        out[f"length/mean_{name}"] = _mean(lengths[rows].float())
        out[f"end_token/prob_{name}"] = _mean(probs[~torch.isnan(probs)])
    ended = end_prob[~torch.isnan(end_prob)]
    out["end_token/prob"] = _mean(ended)
    return out


class UpdateStats:
    """Averages loss diagnostics over optimizer steps (each step's value is already the
    micro-batch-weighted mini-batch value; `summary` reports the loss, KL, clip and grad-norm
    ones), plus the first-epoch ratio deviation (`observe_ratio`)."""

    def __init__(self, ratio_guard: RatioGuard | None = None) -> None:
        self.ratio_guard = ratio_guard
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.ratio_max_dev = 0.0

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            if math.isfinite(value):
                self.sums[key] += value
                self.counts[key] += 1

    @torch.no_grad()
    def observe_ratio(self, logps: Tensor, mb) -> None:
        """Before the first optimizer step, add max |exp(logp - old_logp) - 1| over the tokens of
        a micro-batch `mb` (a RowBatch).

        That ratio deviation must be ~0: the policy has not moved since it sampled, so a
        deviation means rollout and training compute different log-probs (the guard warns).
        Example: logps == mb.old_logprobs everywhere -> ratio_max_dev stays 0.0.
        """
        mask = mb.completion_mask > 0
        if mask.any():
            deviation = (logps[mask] - mb.old_logprobs[mask]).exp().sub(1).abs().max().item()
            self.ratio_max_dev = max(self.ratio_max_dev, deviation)
            if self.ratio_guard is not None:
                self.ratio_guard.check(deviation, logps.dtype, logps.device)

    def summary(self) -> dict[str, float | None]:
        mean = {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k]}
        policy, kl = mean.get("policy_loss", 0.0), mean.get("kl_loss", 0.0)
        return {
            "loss/policy": policy,
            "loss/kl": kl,
            "loss/total": policy + kl,
            "loss/kl_mean": mean.get("kl_mean", 0.0),
            "clip/frac_low": mean.get("clip_frac_low", 0.0),
            "clip/frac_high": mean.get("clip_frac_high", 0.0),
            "policy/ratio_first_epoch_max_dev": self.ratio_max_dev,
            "optim/grad_norm": mean.get("grad_norm", 0.0),
        }


class RatioGuard:
    """Warns once per run when a first-epoch ratio exp(logp - old_logp) deviates from 1 by more
    than the tolerance (1e-3 for float32 on CPU, else 5e-2): before the first optimizer step the
    policy has not moved, so rollout and training must compute the same log-probs."""

    def __init__(self) -> None:
        self.warned = False

    def check(self, deviation: float, dtype: torch.dtype, device: torch.device) -> None:
        tolerance = 1e-3 if dtype == torch.float32 and device.type == "cpu" else 5e-2
        if deviation > tolerance and not self.warned:
            self.warned = True
            print(
                f"warning: first-epoch ratio deviates from 1 by {deviation:.2e} "
                f"(> {tolerance}); rollout and training log-probs disagree",
                file=sys.stderr,
            )


def sample_records(
    step: int,
    problems: list,
    info: dict[str, Any],
    advantages: Tensor,
    group_size: int,
    num_samples: int,
) -> list[dict[str, Any]]:
    """Rows for samples.jsonl: the first completion of each of the first `num_samples` groups.

    `info` holds the rollout's "texts" (flat) and "scores" / "rewards" / "lengths" ([groups, G]);
    `advantages` is flat, G consecutive rows per group.
    """
    rows = [g * group_size for g in range(len(problems))][:num_samples]
    return [
        {
            "step": step,
            "problem_id": problems[r // group_size].id,
            "question": problems[r // group_size].question,
            "answer": problems[r // group_size].answer,
            "completion": info["texts"][r],
            "score": info["scores"].flatten()[r].item(),
            "reward": info["rewards"].flatten()[r].item(),
            "length": int(info["lengths"].flatten()[r]),
            "advantage": advantages[r].item(),
        }
        for r in rows
    ]
