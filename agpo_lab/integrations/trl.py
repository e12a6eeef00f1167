"""AGPO inside TRL's GRPOTrainer: its multi-GPU, DeepSpeed and vLLM machinery, AGPO's advantages.

TRL 1.16 has no advantage hook: `GRPOTrainer._generate_and_score_completions` gathers every
process's rewards (`_calculate_rewards`), computes GRPO advantages inline and keeps this process's
slice. `AGPOTrainer` overrides the two methods as thinly as possible:

1. `_calculate_rewards`: unchanged rewards, plus the completion lengths gathered across processes
   the same way (so whole groups, with lengths, are on every process);
2. `_generate_and_score_completions`: after TRL's step, recompute the advantages of the whole
   gathered batch with `agpo_group_advantages` (AGPO's length reward on whole groups, then AGPO's
   +1 / -1 rule, GRPO elsewhere), keep this process's slice, and log the zero-variance split.

Private API, hence the exact pin: the constructor refuses any TRL but 1.16.0. Launcher:

    accelerate launch -m agpo_lab.integrations.trl --config configs/trl/qwen2.5-0.5b-instruct_gsm8k_lora.yaml
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import trl
from torch import Tensor
from trl import GRPOConfig, GRPOTrainer

from agpo_lab.algorithms import agpo_advantage, agpo_length_reward, group_stats
from agpo_lab.config import TaskConfig
from agpo_lab.tasks.base import CORRECT_SCORE, Problem
from agpo_lab.tasks.registry import build_task

SUPPORTED_TRL = "1.16.0"
TRL_EPS = 1e-4  # TRL's std epsilon, so that mixed groups match its GRPO advantage exactly


@dataclass
class AGPOConfig(GRPOConfig):
    """TRL's GRPOConfig plus AGPO's options (TRL's own options keep their meaning)."""

    r_min: float = 0.0
    """Lowest total reward (weighted sum over reward functions): AGPO's all-wrong bound."""
    r_max: float = 1.0
    """Highest total reward without the length bonus: AGPO's all-correct bound."""
    length_weight: float = 0.1
    """Weight of AGPO's length reward (shortest correct completion of a mixed group); 0 = off."""
    length_in_homogeneous_groups: bool = False
    """Also give the length reward inside all-correct groups (an ablation; paper's code: False)."""
    correctness_reward: str | None = None
    """Name of the reward function that says correct / wrong (None: the first reward function)."""
    correct_threshold: float = CORRECT_SCORE
    """A completion is correct when the correctness reward is >= this."""
    intermediate: str = "zero"
    """Homogeneous group strictly between r_min and r_max: "zero" (GRPO) or "midpoint_sign"."""


def agpo_group_advantages(
    rewards_per_func: Tensor,
    reward_weights: Tensor,
    lengths: Tensor,
    num_generations: int,
    cfg: AGPOConfig,
    correctness_index: int = 0,
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """AGPO advantages of a whole gathered batch, in TRL's flat layout (G consecutive rows a group).

        r_i = sum_k w_k r_ik + w_len * bonus_i   (bonus: agpo_length_reward, correct = r_ic >= thr)
        A   = agpo_advantage(r.view(-1, G), r_min, r_max, eps=1e-4)   (TRL's std convention)

    Returns (advantages [N], rewards [N], zero-variance metrics). Example: G=2, one reward function,
    rewards [1, 1, 0, 0, 1, 0], equal lengths -> advantages [1, 1, -1, -1, 0.7070, -0.7070] (the
    lone correct completion of the mixed group also gets +0.1 length reward, which does not change
    its z-score here).
    """
    totals = (rewards_per_func * reward_weights.to(rewards_per_func)[None, :]).nansum(dim=1)
    unscored = torch.isnan(rewards_per_func).all(dim=1)
    if unscored.any():
        raise ValueError(
            f"{int(unscored.sum())} completion(s) got None from every reward function; AGPO needs "
            "every completion scored (return 0.0 for a wrong completion instead of None)"
        )
    correct = (rewards_per_func[:, correctness_index] >= cfg.correct_threshold).view(
        -1, num_generations
    )
    bonus = agpo_length_reward(
        correct,
        lengths.view(-1, num_generations).to(totals),
        cfg.length_weight,
        cfg.length_in_homogeneous_groups,
    )
    rewards = totals.view(-1, num_generations) + bonus
    advantages = agpo_advantage(
        rewards, r_min=cfg.r_min, r_max=cfg.r_max, intermediate=cfg.intermediate, eps=TRL_EPS
    )
    stats = group_stats(rewards, cfg.r_min, cfg.r_max)
    metrics = {
        "zero_var/all_correct": stats["frac_all_max"],
        "zero_var/all_wrong": stats["frac_all_min"],
        "zero_var/frac": stats["frac_zero_var"],
        "agpo/length_reward": bonus.mean().item(),
    }
    return advantages.flatten(), rewards.flatten(), metrics


def check_trl_version(version: str | None = None) -> None:
    """One-line RuntimeError unless TRL is exactly the version whose private API this overrides."""
    version = trl.__version__ if version is None else version
    if version != SUPPORTED_TRL:
        raise RuntimeError(
            f"AGPOTrainer overrides private GRPOTrainer methods of trl=={SUPPORTED_TRL}, but trl "
            f"{version} is installed; pip install trl=={SUPPORTED_TRL}"
        )


class AGPOTrainer(GRPOTrainer):
    """GRPOTrainer whose advantages are AGPO's; everything else (loss, vLLM, DeepSpeed) is TRL's.

    Use exactly like GRPOTrainer, with an `AGPOConfig` as `args`. Logs zero_var/all_correct,
    zero_var/all_wrong, zero_var/frac (fractions of groups) and agpo/length_reward every step.
    """

    def __init__(self, *pargs, args: AGPOConfig | None = None, **kwargs) -> None:
        check_trl_version()
        if not isinstance(args, AGPOConfig):
            raise TypeError("AGPOTrainer needs args=AGPOConfig(...) (a GRPOConfig with r_min, ...)")
        _validate(args)
        super().__init__(*pargs, args=args, **kwargs)
        name = args.correctness_reward
        if name is not None and name not in self.reward_func_names:
            raise ValueError(
                f"correctness_reward={name!r} is not a reward function; have {self.reward_func_names}"
            )
        self._correctness_index = 0 if name is None else self.reward_func_names.index(name)
        self._agpo_gathered: tuple[Tensor, Tensor] | None = None

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(
            inputs, prompts, completions, completion_ids_list
        )
        # gathered in process order, exactly like TRL gathers rewards_per_func
        lengths = torch.tensor(
            [len(ids) for ids in completion_ids_list], device=self.accelerator.device
        )
        self._agpo_gathered = (rewards_per_func, self.accelerator.gather(lengths))
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        G = self.num_generations if mode == "train" else self.num_generations_eval
        if G < 2:  # eval with one completion per prompt: no group, keep TRL's advantages
            return out
        rewards_per_func, lengths = self._agpo_gathered
        advantages, _, metrics = agpo_group_advantages(
            rewards_per_func, self.reward_weights, lengths, G, self.args, self._correctness_index
        )
        n_local = len(inputs)
        start = self.accelerator.process_index * n_local
        out["advantages"] = advantages[start : start + n_local].to(out["advantages"])
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
        # the completions table shows advantages: replace TRL's GRPO values with the ones used
        logged = self._logs["advantages"]
        for _ in range(min(len(advantages), len(logged))):
            logged.pop()
        logged.extend(advantages.tolist())
        return out


def _validate(args: AGPOConfig) -> None:
    if not args.r_min < args.r_max:
        raise ValueError(f"AGPOConfig: r_min={args.r_min} must be < r_max={args.r_max}")
    if args.length_weight < 0:
        raise ValueError(f"AGPOConfig: length_weight={args.length_weight} must be >= 0")
    if args.intermediate not in ("zero", "midpoint_sign"):
        raise ValueError(
            f"AGPOConfig: intermediate={args.intermediate!r}; use zero or midpoint_sign"
        )
    if args.scale_rewards != "group" or args.multi_objective_aggregation != "sum_then_normalize":
        raise ValueError(
            "AGPOConfig: AGPO normalises per group; set scale_rewards='group' and "
            "multi_objective_aggregation='sum_then_normalize'"
        )


@dataclass
class AGPOScriptArguments:
    """What the launcher trains on (the model and LoRA come from TRL's ModelConfig)."""

    task: str = "gsm8k"
    """agpo_lab task name: gsm8k, math500, aime24, amc23 or arithmetic (the embedded toy task)."""
    data_path: str | None = None
    """Local JSONL file or folder of the task (None: AGPO_LAB_DATA_DIR, then the hub)."""
    train_split: str = "train"
    """Split the RL prompts come from."""
    eval_task: str | None = None
    """Held-out task evaluated with TRL's eval loop (e.g. math500), or None for no evaluation."""
    eval_split: str = "test"
    """Split of eval_task."""


def build_trainer(script: AGPOScriptArguments, args: AGPOConfig, model_args) -> AGPOTrainer:
    """An AGPOTrainer on an agpo_lab task: prompts from Task.format_prompt, reward Task.score."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import get_peft_config

    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, padding_side="left")
    tasks = {}

    def dataset(name: str, split: str):
        task = tasks.setdefault(name, build_task(TaskConfig(name=name, path=script.data_path)))
        problems = task.problems(split)
        return Dataset.from_dict(
            {
                "prompt": [task.format_prompt(p, tokenizer) for p in problems],
                "answer": [p.answer for p in problems],
                "task": [name] * len(problems),
            }
        )

    train = dataset(script.task, script.train_split)
    eval_set = dataset(script.eval_task, script.eval_split) if script.eval_task else None

    def correctness(completions, answer, task, **kwargs) -> list[float]:
        # Task.score reads only the reference answer (time-bounded); model text is never executed
        return [tasks[t].score(c, Problem("", "", a)) for c, a, t in zip(completions, answer, task)]

    init = {"dtype": model_args.dtype, "attn_implementation": model_args.attn_implementation}
    args.model_init_kwargs = {**init, **(args.model_init_kwargs or {})}
    return AGPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=correctness,
        args=args,
        train_dataset=train,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m agpo_lab.integrations.trl --config recipe.yaml [--key value ...]`."""
    from trl import ModelConfig, TrlParser

    parser = TrlParser((AGPOScriptArguments, AGPOConfig, ModelConfig))
    script, args, model_args = parser.parse_args_and_config(argv)
    build_trainer(script, args, model_args).train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
