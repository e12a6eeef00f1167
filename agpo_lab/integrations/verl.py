"""AGPO as a verl advantage estimator, registered as "agpo" (verl's own "grpo" is left alone).

verl computes advantages on its driver, the `TaskRunner` Ray actor, by looking the name in
`algorithm.adv_estimator` up in `verl.trainer.ppo.core_algos.ADV_ESTIMATOR_REGISTRY` and calling it
with `token_level_rewards` [B, T], `response_mask` [B, T], `index` (prompt uids, numpy [B]) and
`config` (the `algorithm` section). The whole batch is there, so every group is whole.

Registration must happen in that actor process, not only in the launching shell: `main()` below
runs verl's PPO with a TaskRunner subclass that registers first (needs verl >= 0.5, whose `run_ppo`
takes `task_runner_class` and whose trainer accepts registered estimator names):

    python -m agpo_lab.integrations.verl algorithm.adv_estimator=agpo +agpo.length_weight=0.1 ...

Importing this module also registers the estimator when verl is importable (for custom mains that
call verl's trainer in-process). Options come from the top-level `agpo` section of verl's config
(see `AGPOVerlOptions`); `algorithm.agpo` is read too when present.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from agpo_lab.algorithms import agpo_advantage, agpo_length_reward, compute_advantages

AGPO_NAME = "agpo"


@dataclass
class AGPOVerlOptions:
    """AGPO's settings inside verl (set from the config's `agpo` section)."""

    r_min: float = 0.0
    """Lowest reward of verl's reward function (AGPO's all-wrong bound)."""
    r_max: float = 1.0
    """Highest reward without the length bonus (AGPO's all-correct bound)."""
    length_weight: float = 0.1
    """Weight of AGPO's length reward inside mixed groups; 0 = off."""
    length_in_homogeneous_groups: bool = False
    """Also give the length reward inside all-correct groups (ablation)."""
    correct_threshold: float = 1.0
    """A response is correct when its score (sum of token_level_rewards) is >= this."""
    intermediate: str = "zero"
    """Homogeneous group strictly between r_min and r_max: "zero" or "midpoint_sign"."""
    epsilon: float = 1e-6
    """Added to the group std (verl's GRPO constant)."""

    def validate(self) -> AGPOVerlOptions:
        """Raise a one-line ValueError for an impossible setting; return self."""
        if not self.r_min < self.r_max:
            raise ValueError(f"agpo.r_min={self.r_min} must be < agpo.r_max={self.r_max}")
        if self.length_weight < 0 or self.epsilon < 0:
            raise ValueError("agpo.length_weight and agpo.epsilon must be >= 0")
        if self.intermediate not in ("zero", "midpoint_sign"):
            raise ValueError(f"agpo.intermediate={self.intermediate!r}; use zero or midpoint_sign")
        return self


_options = AGPOVerlOptions()


def configure(section: Mapping[str, Any] | None) -> AGPOVerlOptions:
    """Set the process-wide options from a mapping (e.g. verl's `config.agpo`); unknown keys fail."""
    global _options
    values = dict(section or {})
    valid = [f.name for f in dataclasses.fields(AGPOVerlOptions)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"unknown agpo option(s) {unknown}; valid: {', '.join(valid)}")
    _options = AGPOVerlOptions(**values).validate()
    return _options


def group_rows(index: np.ndarray) -> Tensor:
    """[num_groups, G] row numbers of each prompt uid, groups in order of first appearance.

    Example: index ["b", "a", "b", "a"] -> [[0, 2], [1, 3]]. Groups must all have the same size.
    """
    rows: dict[Any, list[int]] = {}
    for i, uid in enumerate(np.asarray(index, dtype=object).tolist()):
        rows.setdefault(uid, []).append(i)
    sizes = {len(r) for r in rows.values()}
    if len(sizes) != 1:
        raise ValueError(
            f"AGPO needs equal group sizes (actor_rollout_ref.rollout.n); got sizes {sorted(sizes)}"
        )
    return torch.tensor(list(rows.values()), dtype=torch.long)


def compute_agpo_outcome_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: np.ndarray,
    epsilon: float | None = None,
    norm_adv_by_std_in_grpo: bool = True,
    config: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """verl estimator: AGPO on outcome rewards, with AGPO's length reward; same call as verl's GRPO.

        score_i = sum_t token_level_rewards[i, t];  length_i = sum_t response_mask[i, t]
        r = score + agpo_length_reward(score >= threshold, length)      (per uid group)
        A = agpo_advantage(r, r_min, r_max, eps)     (Dr.GRPO + AGPO's rule if not std-normalised)
    Returns (advantages, returns), both A_i broadcast over the response tokens: [B, T].

    Example (length reward off): scores [1, 1, 0, 0, 1, 0], uids [a, a, b, b, c, c] ->
    A per row [1, 1, -1, -1, 0.7071, -0.7071].
    """
    opts = _options
    if config is not None and config.get("agpo", None) is not None:
        opts = dataclasses.replace(opts, **dict(config.get("agpo"))).validate()
    if config is not None:
        norm_adv_by_std_in_grpo = config.get("norm_adv_by_std_in_grpo", norm_adv_by_std_in_grpo)
    eps = opts.epsilon if epsilon is None else epsilon
    with torch.no_grad():
        rows = group_rows(index).to(token_level_rewards.device)
        scores = token_level_rewards.sum(dim=-1).float()[rows]
        lengths = response_mask.sum(dim=-1).float()[rows]
        bonus = agpo_length_reward(
            scores >= opts.correct_threshold,
            lengths,
            opts.length_weight,
            opts.length_in_homogeneous_groups,
        )
        rewards = scores + bonus
        bounds = dict(r_min=opts.r_min, r_max=opts.r_max, intermediate=opts.intermediate)
        if norm_adv_by_std_in_grpo:
            grouped = agpo_advantage(rewards, eps=eps, **bounds)
        else:
            grouped = compute_advantages(rewards, "dr_grpo", zero_variance="agpo", **bounds)[0]
        flat = torch.empty_like(scores.flatten())
        flat[rows.flatten()] = grouped.flatten()
        advantages = flat[:, None].to(token_level_rewards.dtype) * response_mask
    return advantages, advantages


def register(register_adv_est: Callable[[str], Callable] | None = None) -> Callable:
    """Register the estimator as "agpo" with verl's `register_adv_est(name)` decorator (or a given
    stand-in with the same contract); registering the same function twice is a no-op in verl."""
    if register_adv_est is None:
        from verl.trainer.ppo.core_algos import register_adv_est
    return register_adv_est(AGPO_NAME)(compute_agpo_outcome_advantage)


def make_task_runner(base: type) -> type:
    """A subclass of verl's TaskRunner that registers AGPO (with the config's `agpo` options) in
    the Ray actor process that computes advantages, then runs verl's training unchanged."""

    class AGPOTaskRunner(base):
        def run(self, config):
            configure(config.get("agpo", None))
            register()
            return super().run(config)

    return AGPOTaskRunner


def main(argv: list[str] | None = None) -> int:
    """verl's PPO/GRPO trainer with AGPO registered: pass verl's Hydra overrides as arguments."""
    from pathlib import Path

    import ray
    import verl.trainer.main_ppo as verl_main
    from hydra import compose, initialize_config_dir

    if "task_runner_class" not in inspect.signature(verl_main.run_ppo).parameters:
        raise RuntimeError(
            "agpo_lab's verl entry point needs verl >= 0.5 (run_ppo with task_runner_class)"
        )
    overrides = sys.argv[1:] if argv is None else list(argv)
    config_dir = str(Path(verl_main.__file__).parent / "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)
    configure(config.get("agpo", None))  # fail fast on bad options, before Ray starts
    runner = ray.remote(num_cpus=1)(make_task_runner(verl_main.TaskRunner))
    verl_main.run_ppo(config, task_runner_class=runner)
    return 0


with contextlib.suppress(ImportError):  # register on import when verl is installed (optional)
    register()

if __name__ == "__main__":
    sys.exit(main())
