"""Training configuration: one dataclass per concern, composed into `TrainConfig`.

A YAML file has one mapping per section (model, task, rollout, algorithm, optim, run, eval); dotted
``section.key=value`` overrides are applied on top and parsed with the field's type. Everything is
validated up front, so a typo or an impossible value fails in one line before any model loads:

    cfg = load_config("configs/embedded_agpo.yaml", ["run.steps=20", "optim.lr=3e-5"])
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from agpo_lab.config_values import build_section, plain
from agpo_lab.evaluation import EvalConfig
from agpo_lab.models.loading import ModelConfig
from agpo_lab.rollout import RolloutConfig
from agpo_lab.tasks.registry import TaskConfig


@dataclass
class AlgorithmConfig:
    """How rewards become advantages and advantages become a loss."""

    estimator: Literal["grpo", "agpo", "dr_grpo", "rloo", "reinforce_pp"] = "grpo"
    """Advantage estimator (see agpo_lab.algorithms.advantages)."""
    zero_variance: Literal["keep", "agpo", "drop"] = "keep"
    """Homogeneous groups: keep the estimator's output, apply AGPO's +/-1 rule, or drop them."""
    r_min: float = 0.0
    """Lowest reward the correctness reward can give (AGPO's all-wrong bound)."""
    r_max: float = 1.0
    """Highest reward the correctness reward can give (AGPO's all-correct bound)."""
    intermediate: Literal["zero", "midpoint_sign"] = "zero"
    """AGPO: advantage of a homogeneous group between r_min and r_max (0, or sign vs midpoint)."""
    std: Literal["bessel", "population"] = "bessel"
    """Std convention of std-normalised estimators (bessel = TRL/verl, population = divide by G)."""
    eps: float = 1e-4
    """Added to the std before dividing (TRL 1e-4, verl 1e-6)."""
    length_reward: Literal["none", "agpo", "kimi", "dapo_overlong"] = "none"
    """Length shaping added to the correctness reward, computed on whole groups."""
    length_weight: float = 0.1
    """Weight w of the AGPO / Kimi length term."""
    length_in_homogeneous_groups: bool = False
    """AGPO length term also inside all-correct groups (an ablation; the paper's code: False)."""
    overlong_cache: int = 16
    """DAPO overlong penalty: length of the soft-penalty window before max_new_tokens."""
    clip_low: float = 0.2
    """PPO clip range below 1 (ratio clipped at 1 - clip_low)."""
    clip_high: float = 0.2
    """PPO clip range above 1 (DAPO's clip-higher uses 0.28)."""
    beta: float = 0.0
    """KL coefficient against the frozen reference (0 = no reference model is kept)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator per token (k3 = Schulman's unbiased, non-negative estimator)."""
    aggregation: Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"] = (
        "seq_mean_token_mean"
    )
    """Loss aggregation: GRPO per-sequence mean, DAPO token mean, Dr.GRPO sum / max_len."""
    mu: int = 1
    """Inner epochs over each rollout batch (mu = 1: one on-policy pass)."""
    max_resample_rounds: int = 0
    """With zero_variance=drop: extra sampling rounds to replace dropped groups (DAPO dynamic
    sampling); 0 = never resample, just train on the groups that remain."""

    def validate(self) -> None:
        """Raise a one-line ValueError for an impossible setting."""
        if self.r_max <= self.r_min:
            raise ValueError(f"algorithm.r_max={self.r_max} must exceed r_min={self.r_min}")
        if self.eps <= 0 or self.clip_low < 0 or self.clip_high < 0:
            raise ValueError("algorithm.eps must be > 0 and clip_low / clip_high >= 0")
        if not 0 <= self.clip_low < 1:
            raise ValueError(f"algorithm.clip_low={self.clip_low} must be in [0, 1)")
        if self.beta < 0 or self.length_weight < 0:
            raise ValueError("algorithm.beta and algorithm.length_weight must be >= 0")
        if self.mu < 1:
            raise ValueError(f"algorithm.mu={self.mu} must be >= 1")
        if self.max_resample_rounds < 0 or self.overlong_cache < 1:
            raise ValueError("algorithm.max_resample_rounds >= 0 and overlong_cache >= 1 needed")
        if self.max_resample_rounds and self.zero_variance != "drop":
            raise ValueError("algorithm.max_resample_rounds needs algorithm.zero_variance=drop")


@dataclass
class OptimizerConfig:
    """AdamW with linear warm-up, mini-batches and gradient accumulation."""

    lr: float = 1e-5
    """Peak learning rate (reached after warmup_steps, then constant)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to lr."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping, the norm is still logged)."""
    mini_batch_size: int | None = None
    """Completions per optimizer step (None: the whole rollout batch, one step per inner epoch)."""
    grad_accumulation: int = 1
    """Micro-batches each mini-batch is split into (memory knob; the update is the same). Rows
    are sorted by length first and each micro-batch is trimmed to its longest row."""
    micro_batch_tokens: int | None = None
    """Token budget per micro-batch instead of a fixed count: length-sorted rows are packed while
    rows x (longest prompt + completion) stays within it (verl's dynamic batch size); less
    padding, so a faster update; the update is the same. None: grad_accumulation micro-batches."""

    compile_update: bool = False
    """`torch.compile` the policy's forward (and so its backward) in the update: fused kernels
    (on CPU the step went from 0.49x to 0.45x TRL's, benchmarks/bench_trainer.py
    --compile-update) after a one-off compile of ~30 s; for long runs. Rollouts, evaluation and
    checkpoints use the plain model."""

    def validate(self) -> None:
        """Raise a one-line ValueError for an impossible setting."""
        if self.lr < 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("optim.lr, optim.weight_decay and optim.max_grad_norm must be >= 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas={list(self.betas)} must both be in [0, 1)")
        if self.warmup_steps < 0 or self.grad_accumulation < 1:
            raise ValueError("optim.warmup_steps must be >= 0 and optim.grad_accumulation >= 1")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 1:
            raise ValueError(
                f"optim.micro_batch_tokens={self.micro_batch_tokens} must be >= 1 or null"
            )
        if self.mini_batch_size is not None and self.mini_batch_size < 1:
            raise ValueError(f"optim.mini_batch_size={self.mini_batch_size} must be >= 1 or null")


@dataclass
class RunConfig:
    """Length of training, logging, checkpoints and where everything is written."""

    steps: int = 100
    """RL steps (one rollout batch and its updates each)."""
    prompts_per_step: int = 16
    """Prompts per step (over all processes); each gets rollout.group_size completions."""
    seed: int = 0
    """Seed of every random choice: prompts, sampling, mini-batch order."""
    out_dir: str = "runs"
    """Parent folder of run directories."""
    name: str | None = None
    """Run directory name under out_dir (None: <estimator>-seed<seed>-<timestamp>)."""
    resume: bool = False
    """Continue from the run directory's last checkpoint (required if the directory has one)."""
    eval_every: int = 0
    """Evaluate on the held-out split every this many steps and at the end (0 = never)."""
    eval_at_start: bool = False
    """Also evaluate before the first step (logged as step 0)."""
    save_every: int = 50
    """Checkpoint every this many steps (and always at the end and on Ctrl-C)."""
    log_samples_every: int = 10
    """Write sample completions to samples.jsonl every this many steps (0 = never)."""
    num_samples: int = 4
    """How many completions are written each time samples are logged."""
    device: str = "auto"
    """"auto" (cuda when available), "cpu", "cuda" or "cuda:N"."""

    def validate(self) -> None:
        """Raise a one-line ValueError for an impossible setting."""
        if self.steps < 1 or self.prompts_per_step < 1:
            raise ValueError("run.steps and run.prompts_per_step must be >= 1")
        if min(self.eval_every, self.save_every, self.log_samples_every, self.num_samples) < 0:
            raise ValueError("run.eval_every, save_every, log_samples_every, num_samples: >= 0")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"run.device={self.device!r}: use auto, cpu, cuda or cuda:N")


SECTIONS = ("model", "task", "rollout", "algorithm", "optim", "run", "eval")


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as config.yaml in every run directory."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Policy model: path, dtype, LoRA, gradient checkpointing."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """Problems and verifier."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling: group size G, temperature, top-p/k, max new tokens."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """Advantage estimator, zero-variance policy, length reward, loss."""
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW, warm-up, mini-batches, gradient accumulation and clipping."""
    run: RunConfig = field(default_factory=RunConfig)
    """Steps, batch size, seed, logging and checkpoints."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Periodic held-out evaluation."""

    def validate(self) -> TrainConfig:
        """Check every section and the constraints between sections; return self."""
        for name in ("task", "algorithm", "optim", "run"):
            getattr(self, name).validate()
        group_size, mb = self.rollout.group_size, self.optim.mini_batch_size
        if group_size < 2:
            raise ValueError(f"rollout.group_size={group_size}: group-relative methods need G >= 2")
        if self.rollout.max_new_tokens < 1 or self.rollout.temperature <= 0:
            raise ValueError("rollout.max_new_tokens must be >= 1 and rollout.temperature > 0")
        batch = self.run.prompts_per_step * group_size
        if mb is not None and (batch % mb or mb % group_size):
            raise ValueError(
                f"optim.mini_batch_size={mb} must divide the batch ({self.run.prompts_per_step} "
                f"prompts x G={group_size} = {batch}) and be a multiple of G"
            )
        if (mb or batch) % self.optim.grad_accumulation:
            raise ValueError(
                f"optim.grad_accumulation={self.optim.grad_accumulation} must divide the "
                f"mini-batch size {mb or batch}"
            )
        overlong = self.algorithm.length_reward == "dapo_overlong"
        if overlong and self.algorithm.overlong_cache >= self.rollout.max_new_tokens:
            raise ValueError("algorithm.overlong_cache must be < rollout.max_new_tokens")
        return self

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (tuples as lists): what config.yaml holds."""
        return {name: plain(dataclasses.asdict(getattr(self, name))) for name in SECTIONS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build and validate from a nested dict; unknown sections or keys are errors."""
        if not isinstance(data, dict):
            raise ValueError(f"config must be a mapping of sections, got {type(data).__name__}")
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown config section(s) {unknown}; valid: {', '.join(SECTIONS)}")
        hints = typing.get_type_hints(cls)
        sections = {}
        for name in SECTIONS:
            values = data.get(name) or {}
            if not isinstance(values, dict):
                raise ValueError(f"config section '{name}' must be a mapping, got {values!r}")
            sections[name] = build_section(hints[name], name, values)
        return cls(**sections).validate()

    def save(self, path: str | Path) -> None:
        """Write as YAML (sections in a fixed order)."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (None: all defaults), apply ``section.key=value`` overrides, validate.

    Example: ``load_config("configs/embedded_grpo.yaml", ["run.steps=5", "rollout.group_size=4"])``.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ValueError(f"override {item!r} must look like section.key=value (run.steps=10)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        section = data.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ValueError(f"config section '{parts[0]}' must be a mapping, got {section!r}")
        section[parts[1]] = value
    return TrainConfig.from_dict(data)
