"""Every setting of agpo_lab: one dataclass per concern, a docstring on every field, checked up front.

A training run is a `TrainConfig` of seven sections (model, task, rollout, algorithm, optim, run,
eval). A YAML file has one mapping per section; dotted ``section.key=value`` overrides go on top and
are parsed with the field's type. Every value is checked when its section is built (ranges, choices,
finite numbers) and the sections against each other when the whole config is, so a typo or an
impossible value fails in one line that names the key, before any model loads:

    cfg = load_config("configs/embedded_agpo.yaml", ["run.steps=20", "optim.lr=3e-5"])

`PretrainConfig` (the SFT that makes the embedded model) and `ReproduceConfig` (the main job) are
the other two commands' settings. This module imports nothing heavy (no torch, no transformers):
reading a config is instant, and `agpo-lab train --help` lists every key from the docstrings here.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from agpo_lab.errors import ConfigError, MissingFileError
from agpo_lab.paths import CONFIGS_DIR, DOCS_RESULTS_DIR, EMBEDDED_MODEL_DIR

TaskName = Literal["arithmetic", "word_arithmetic", "gsm8k", "math500", "aime24", "amc23"]
Tracker = Literal["tensorboard", "wandb", "mlflow", "trackio"]
ARITHMETIC_LEVELS = (1, 2, 3, 4, 5)
"""Difficulty levels of the embedded task (described in `agpo_lab.tasks.arithmetic.LEVELS`)."""
DType = Literal["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"]

FLOAT32_MAX = (2 - 2**-23) * 2.0**127
"""The largest float32 (3.4e38): rewards, advantages, the loss and the weights' updates are float32
tensors, so a setting that enters them, or a product of settings, must stay below it."""
FLOAT32_TINY = 2.0**-126
"""The smallest normal float32 (1.2e-38): a non-zero setting below it becomes 0 or loses its
precision once it meets a float32 tensor (1 / temperature overflows)."""
INT64_MAX = 2**63 - 1
"""Whole-number settings become torch sizes, indices and seeds, which are 64-bit integers."""
NAME_MAX_BYTES = 255
"""The longest file name Linux and macOS file systems take (NAME_MAX), in UTF-8 bytes."""
_FOLDER_NAME = re.compile(r"\w[\w.,+=@-]*")
"""A folder name that stays one path component: a letter, digit or _ first (never . or ..),
then letters, digits and _ . , + = @ - (no separator, no space, no control character)."""


def folder_name_problem(name: str) -> str | None:
    """Why `name` cannot be the name of a folder agpo_lab creates, or None when it can.

    Example: ``folder_name_problem("..")`` says why; ``folder_name_problem("agpo-seed0")`` is None.
    """
    if not _FOLDER_NAME.fullmatch(name):
        return (
            "must be one folder name: a letter, digit or _ first, then letters, digits and "
            "_ . , + = @ - (no /, no space; never . or ..), e.g. agpo-seed0"
        )
    if len(name.encode("utf-8")) > NAME_MAX_BYTES:
        return f"is longer than the {NAME_MAX_BYTES} bytes a file name can have; shorten it"
    return None


def _number_problem(value: Any) -> str | None:
    """Why a number cannot be a setting (not finite, beyond float32 or 64 bits), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return "must be a finite number"
        if value and not FLOAT32_TINY <= abs(value) <= FLOAT32_MAX:
            return (
                f"must be 0 or between {FLOAT32_TINY:.3g} and {FLOAT32_MAX:.3g} in size (float32, "
                "which the training math runs in)"
            )
    if isinstance(value, int) and abs(value) > INT64_MAX:
        return f"must fit in 64 bits (|n| <= {INT64_MAX}): sizes and seeds are 64-bit integers"
    if isinstance(value, str) and not _is_utf8(value):
        return "must be valid UTF-8 text"
    return None


def _shown(value: Any, limit: int = 60) -> str:
    """repr(value) for an error message, cut to `limit` characters (a value can be huge)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8 (e.g. in argv)
        return False
    return True


def _checker(prefix: str, section: Any):
    """A `check(key, ok, rule)` for one section: raises the one-line error every setting uses,
    ``prefix.key=value: rule``, when `ok` is False (prefix "" for a command's flat settings)."""

    def check(key: str, ok: bool, rule: str) -> None:
        if not ok:
            name = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{name}={_shown(_plain(getattr(section, key)))}: {rule}")

    return check


class Settings:
    """Base of every settings dataclass: its values are checked when it is built.

    Every number must be finite (NaN and infinities are never a setting) and fit the machine's
    types (float32, 64-bit integers), every text must be UTF-8, then the class's own `validate`
    checks ranges and choices. `PREFIX` is the section name its errors use.
    """

    PREFIX = ""

    def __post_init__(self) -> None:
        check = _checker(self.PREFIX, self)
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            values = getattr(self, f.name)
            values = values if isinstance(values, (list, tuple)) else [values]
            problems = [p for p in map(_number_problem, values) if p]
            check(f.name, not problems, problems[0] if problems else "")
        self.validate()

    def validate(self) -> None:
        """Raise a ConfigError naming the first impossible setting (each class its own rules)."""


# ---- the sections of a training run -----------------------------------------------------------


@dataclass
class ModelConfig(Settings):
    """Which model to train and how."""

    PREFIX = "model"

    name_or_path: str = "embedded"
    """Local model folder or hub id; "embedded" = the shipped tiny model (data/embedded)."""
    dtype: DType = "auto"
    """Weights dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or float16."""
    lora: bool = False
    """Train LoRA adapters (peft) instead of all weights."""
    lora_r: int = 16
    """LoRA rank r."""
    lora_alpha: int = 32
    """LoRA scale numerator: the update is (alpha / r) * B A."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input during training."""
    lora_target_modules: list[str] | str = "all-linear"
    """Module names that get adapters, or "all-linear" (every linear layer but the output head)."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in the backward pass to save memory; None = on for CUDA, off on CPU."""
    trust_remote_code: bool = False
    """Run modelling code shipped with a hub model; only set it for a model you trust."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers: sdpa, eager, flash_attention_2, ..."""

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first impossible setting."""
        check = _checker(self.PREFIX, self)
        check("name_or_path", bool(self.name_or_path.strip()), "name a model folder or hub id")
        check("dtype", self.dtype in get_args(DType), f"use {', '.join(get_args(DType))}")
        check("lora_r", self.lora_r >= 1, "must be >= 1")
        check("lora_alpha", self.lora_alpha > 0, "must be > 0")
        check("lora_dropout", 0 <= self.lora_dropout < 1, "must be in [0, 1)")
        check("lora_target_modules", bool(self.lora_target_modules), "name modules or all-linear")


@dataclass
class TaskConfig(Settings):
    """Which problems the policy trains and is evaluated on."""

    PREFIX = "task"

    name: TaskName = "arithmetic"
    """Task name: "arithmetic" (embedded, offline), "word_arithmetic" (the same problems in natural
    language for a chat model, offline) or a dataset: gsm8k, math500, aime24, amc23."""
    path: str | None = None
    """Local data file or folder for a dataset task (None: the task's default location)."""
    seed: int = 0
    """Seed of the (word_)arithmetic problem generator (which problems exist, not their order)."""
    n_train: int = 1000
    """(word_)arithmetic: number of training problems."""
    n_eval: int = 200
    """(word_)arithmetic: number of held-out problems."""
    levels: list[int] | None = None
    """(word_)arithmetic: difficulty levels 1..5 to draw from (None: all levels)."""
    train_split: str = "train"
    """Split the RL prompts are drawn from."""
    eval_split: str = "eval"
    """Held-out split used by periodic evaluation ("eval"; datasets may call it "test")."""

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first impossible setting."""
        check = _checker(self.PREFIX, self)
        check("name", self.name in get_args(TaskName), f"valid: {', '.join(get_args(TaskName))}")
        check("n_train", self.n_train >= 1, "must be >= 1")
        check("n_eval", self.n_eval >= 1, "must be >= 1")
        levels_ok = self.levels is None or (
            bool(self.levels) and set(self.levels) <= set(ARITHMETIC_LEVELS)
        )
        check("levels", levels_ok, f"choose among {list(ARITHMETIC_LEVELS)}, or null for all")


@dataclass
class RolloutConfig(Settings):
    """Sampling settings for one batch of rollouts."""

    PREFIX = "rollout"

    group_size: int = 8
    """G: completions per prompt. The trainer repeats each prompt G times; `generate` does not."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding (argmax, log-probs at T = 1), which training
    rejects (the G completions of a prompt would all be the same)."""
    top_p: float = 1.0
    """Nucleus sampling: draw from the smallest set of tokens whose probability reaches top_p; 1 = off."""
    top_k: int = 0
    """Draw only from the k most likely tokens; 0 = off; 1 = greedy with T-scaled log-probs."""
    max_new_tokens: int = 96
    """Most tokens generated per completion (EOS included); a row that reaches it is `truncated`."""
    fast_decode: bool = True
    """Prefill and decode Llama-family models (Llama, Qwen2, Qwen3, Mistral) with
    agpo_lab.rollout.fast_decode's lean layers and KV cache: the transformers forward's logits up
    to float rounding (tested), faster (benchmarks/README.md); other models always use the
    transformers forward. False: always the latter."""
    precision: Literal["model", "bfloat16"] = "model"
    """What the rollout computes in: the model's own dtype, or bfloat16 copies of its weights
    (taken once per rollout; Llama-family models through the fast decode, others under
    `torch.autocast`). bfloat16 matrix products are several times faster on CPUs with AMX or
    AVX512-BF16 and on GPUs; the sampled tokens then come from a slightly different policy than
    the one trained, which the loss corrects for (`algorithm.sampler_correction`)."""
    compile_decode: bool = False
    """`torch.compile` the one-token decode step: fewer, fused kernels per token after a one-off
    compile per process (benchmarks/README.md has the measured gain and cost); for long training
    runs, not for a quick notebook cell. Forward hooks on the model run only while compiling."""

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first impossible setting."""
        check = _checker(self.PREFIX, self)
        check("group_size", self.group_size >= 1, "must be >= 1")
        check("temperature", self.temperature >= 0, "must be >= 0 (0 = greedy decoding)")
        check("top_p", 0 < self.top_p <= 1, "must be in (0, 1] (1 = off)")
        check("top_k", self.top_k >= 0, "must be >= 0 (0 = off)")
        check("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1")


@dataclass
class AlgorithmConfig(Settings):
    """How rewards become advantages and advantages become a loss."""

    PREFIX = "algorithm"

    estimator: Literal["grpo", "agpo", "dr_grpo", "rloo", "reinforce_pp"] = "grpo"
    """Advantage estimator (see agpo_lab.algorithms.advantages)."""
    zero_variance: Literal["keep", "agpo", "drop", "rl_zvp"] = "keep"
    """Homogeneous groups: keep the estimator's output, apply AGPO's +/-1 rule, drop them (out of
    the loss and its token denominator), or give them RL-ZVP's entropy-guided token advantages."""
    zvp_alpha: float = 0.1
    """RL-ZVP's scale alpha: |A_t| = alpha * (entropy of token t), or alpha * (max entropy in the
    completion - entropy of t) in all-wrong groups (0.1 as in the implementations we checked)."""
    r_min: float = 0.0
    """Lowest reward the correctness reward can give (AGPO's all-wrong bound)."""
    r_max: float = 1.0
    """Highest reward the correctness reward can give (AGPO's all-correct bound)."""
    intermediate: Literal["zero", "midpoint_sign"] = "zero"
    """AGPO: advantage of a homogeneous group between r_min and r_max (0, or sign vs midpoint)."""
    std: Literal["bessel", "population"] = "bessel"
    """Std convention of std-normalised estimators (bessel = TRL/verl, population = divide by G)."""
    eps: float = 1e-4
    """Added to the std before dividing (TRL 1e-4, verl 1e-6; 0 is allowed: homogeneous groups
    still get exactly 0)."""
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
    mask_truncated: bool = False
    """Leave completions that hit rollout.max_new_tokens out of the loss (their group's advantages
    are still computed with them): TRL's mask_truncated_completions, DAPO's overlong filtering."""
    max_resample_rounds: int = 0
    """With zero_variance=drop: extra sampling rounds to replace dropped groups (DAPO dynamic
    sampling); 0 = never resample, just train on the groups that remain."""
    sampler_correction: Literal[
        "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"
    ] = "token_truncate"
    """When the rollout and the update compute in different precisions (`rollout.precision`,
    `optim.precision`), the sampler's policy differs slightly from the trained one; each token's
    surrogate is then weighted by w = pi_trainer / pi_sampler (`algorithms.sampler_correction`):
    truncated at the cap (Yao et al.'s TIS), or set to 0 above it (mask), per token or once per
    sequence (the product over its tokens), as TRL and verl correct vLLM rollouts. Unused when
    both run in the model's precision (w = 1)."""
    sampler_correction_cap: float = 2.0
    """C of the sampler correction: weights are min(w, C) (truncate) or 0 where w > C (mask)."""

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first impossible setting."""
        check = _checker(self.PREFIX, self)
        check("sampler_correction_cap", self.sampler_correction_cap >= 1, "must be >= 1")
        check("r_max", self.r_max > self.r_min, f"must exceed algorithm.r_min={self.r_min}")
        check("eps", self.eps >= 0, "must be >= 0")
        check("clip_low", 0 <= self.clip_low < 1, "must be in [0, 1)")
        check("clip_high", self.clip_high >= 0, "must be >= 0")
        check("beta", self.beta >= 0, "must be >= 0 (0 = no KL term)")
        check("length_weight", self.length_weight >= 0, "must be >= 0")
        check("mu", self.mu >= 1, "must be >= 1")
        check("overlong_cache", self.overlong_cache >= 1, "must be >= 1")
        check("max_resample_rounds", self.max_resample_rounds >= 0, "must be >= 0")
        check("zvp_alpha", self.zvp_alpha > 0, "must be > 0")
        resample_ok = not self.max_resample_rounds or self.zero_variance == "drop"
        check("max_resample_rounds", resample_ok, "needs algorithm.zero_variance=drop")


@dataclass
class OptimizerConfig(Settings):
    """AdamW with linear warm-up, mini-batches and gradient accumulation."""

    PREFIX = "optim"

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
    """Token budget per micro-batch instead of a fixed count: length-sorted rows are grouped while
    the tokens their pass computes, padding included, stay within it (rows x (longest prompt +
    completion) for a padded pass; fewer when it shares prompts or packs rows); verl's dynamic
    batch size: less padding, so a faster update; the update is the same. None:
    grad_accumulation micro-batches."""
    precision: Literal["model", "bfloat16"] = "model"
    """What the update's and the reference's forward and backward compute in: the model's own
    dtype, or bfloat16 under `torch.autocast` (mixed precision: the weights, their gradients and
    AdamW's state stay in the model's dtype, as verl's FSDP default and the HF Trainer's bf16=True
    keep them). Several times faster matrix products on CPUs with AMX or AVX512-BF16 and on GPUs,
    log-probs rounded to bfloat16 logits; a rollout in another precision is corrected for
    (`algorithm.sampler_correction`)."""
    lowered_activations: bool = False
    """With `precision` bfloat16: carry the activations in bfloat16 too (the input embedding's
    output, so the residual stream, and frozen norm weights), as FSDP's mixed precision with
    param_dtype=bfloat16 (verl's default) computes, instead of autocast's float32 residual stream
    (the HF Trainer's bf16=True). Fewer casts and half the bytes per elementwise operator
    (benchmarks/README.md has the measured gain). Weights, gradients and AdamW's state stay
    float32. Off by default: on the warm-start comparison (docs/real_model.md) it was not shown
    to keep the accuracy of autocast's bfloat16."""
    compile_update: bool = False
    """`torch.compile` the policy's forward (and so its backward) in the update: fused kernels after
    a one-off compile (benchmarks/README.md has the measured gain and cost); for long runs.
    Rollouts, evaluation and checkpoints use the plain model."""
    share_prompts: bool = True
    """The G completions of a group share one forward of their prompt in the update and in the
    reference pass (`rollout.logprobs.shared_prompt_logits`): P + G C tokens instead of G (P + C),
    the same gradient up to float rounding. Applies to Llama-family models on one process without
    compile_update or activation checkpointing; elsewhere (and with false) every row computes its
    own prompt."""
    pack_rows: bool = True
    """Padding-free passes in the update and in the reference pass (`rollout.packing`): rows laid
    end to end with restarting position ids, so a pass computes about its real tokens instead of
    rows x (longest prompt + completion); the same gradient up to float rounding. Llama-family
    models with sdpa, eager or flex attention only (not flash attention). Each pass takes the
    cheapest of padded, shared-prompt and packed (`rollout.logprobs.pass_layout`); false: never
    packed."""

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first impossible setting."""
        check = _checker(self.PREFIX, self)
        check("lr", self.lr >= 0, "must be >= 0")
        check("betas", all(0 <= b < 1 for b in self.betas), "both must be in [0, 1)")
        check("weight_decay", self.weight_decay >= 0, "must be >= 0")
        check("warmup_steps", self.warmup_steps >= 0, "must be >= 0")
        check("max_grad_norm", self.max_grad_norm >= 0, "must be >= 0 (0 = no clipping)")
        mini, tokens = self.mini_batch_size, self.micro_batch_tokens
        check("mini_batch_size", mini is None or mini >= 1, "must be >= 1 or null")
        check("grad_accumulation", self.grad_accumulation >= 1, "must be >= 1")
        check("micro_batch_tokens", tokens is None or tokens >= 1, "must be >= 1 or null")
        check(
            "lowered_activations",
            not self.lowered_activations or self.precision != "model",
            "needs optim.precision=bfloat16 (activations are lowered only with the products)",
        )


@dataclass
class RunConfig(Settings):
    """Length of training, logging, checkpoints and where everything is written."""

    PREFIX = "run"

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
    report_to: list[Tracker] = field(default_factory=list)
    """Experiment trackers that also receive every step's metrics and the config (accelerate's):
    tensorboard, wandb (offline unless WANDB_MODE says otherwise), mlflow, trackio. Their files
    go into the run directory (tensorboard/, wandb/, mlruns/). metrics.jsonl is always written."""

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first impossible setting."""
        check = _checker(self.PREFIX, self)
        check("steps", self.steps >= 1, "must be >= 1")
        check("prompts_per_step", self.prompts_per_step >= 1, "must be >= 1")
        for key in ("eval_every", "save_every", "log_samples_every", "num_samples"):
            check(key, getattr(self, key) >= 0, "must be >= 0")
        check("out_dir", bool(self.out_dir.strip()), "must name a folder")
        name_problem = None if self.name is None else folder_name_problem(self.name)
        check("name", name_problem is None, f"{name_problem} (or null for a generated name)")
        cuda_n = self.device.startswith("cuda:") and self.device[5:].isdigit()
        check(
            "device",
            self.device in ("auto", "cpu", "cuda") or cuda_n,
            "use auto, cpu, cuda or cuda:N",
        )
        trackers = get_args(Tracker)
        known = all(t in trackers for t in self.report_to)
        once = len(set(self.report_to)) == len(self.report_to)
        check("report_to", known and once, f"choose among {', '.join(trackers)}, each once")


@dataclass
class EvalConfig(Settings):
    """How to evaluate a policy on a held-out split."""

    PREFIX = "eval"

    n_problems: int | None = None
    """Evaluate n problems of the split (a fixed, evenly spaced subset); None = the whole split."""
    k: int = 8
    """Sampled completions per problem; also the k of pass@k. 0 = greedy only (no sampled metrics)."""
    temperature: float = 1.0
    """Sampling temperature of the k sampled completions (greedy decoding ignores it)."""
    top_p: float = 1.0
    """Nucleus sampling threshold of the sampled completions (1.0 = off)."""
    max_new_tokens: int = 96
    """Generation budget per completion; a completion that hits it is counted as truncated."""
    batch_size: int = 64
    """Completions generated per `generate` call (memory knob; results do not depend on it)."""
    seed: int = 0
    """Seed of the sampling generator used when the caller passes none (same seed, same samples)."""
    greedy: bool = True
    """Also decode one greedy completion per problem (gives eval/pass@1_greedy)."""
    progress: bool = False
    """Show a progress bar (with an ETA) over the evaluation's generation batches."""
    precision: Literal["model", "bfloat16"] = "model"
    """What the evaluation's sampling computes in (as `rollout.precision`); "model" measures the
    trained policy itself, so comparisons of training settings keep it."""

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first impossible setting."""
        check = _checker(self.PREFIX, self)
        n = self.n_problems
        check("n_problems", n is None or n >= 1, "must be >= 1, or null for the whole split")
        check("k", self.k >= 0, "must be >= 1 (or 0 for greedy only)")
        check("k", self.k > 0 or self.greedy, "k=0 with eval.greedy=false evaluates nothing")
        check("temperature", self.temperature > 0, "must be > 0 (greedy is eval.greedy)")
        check("top_p", 0 < self.top_p <= 1, "must be in (0, 1]")
        check("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1")
        check("batch_size", self.batch_size >= 1, "must be >= 1")


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
        for name in SECTIONS:
            getattr(self, name).validate()
        rollout, run, algorithm, optim = self.rollout, self.run, self.algorithm, self.optim
        check = _checker("rollout", rollout)
        check("group_size", rollout.group_size >= 2, "group-relative methods need G >= 2")
        check("temperature", rollout.temperature > 0, "training needs > 0 (0 is greedy decoding)")
        batch = run.prompts_per_step * rollout.group_size
        mini = optim.mini_batch_size
        fits = mini is None or (batch % mini == 0 and mini % rollout.group_size == 0)
        check = _checker("optim", optim)
        check(
            "mini_batch_size",
            fits,
            f"must divide the batch ({run.prompts_per_step} prompts x "
            f"G={rollout.group_size} = {batch}) and be a multiple of G",
        )
        divides = (mini or batch) % optim.grad_accumulation == 0
        check("grad_accumulation", divides, f"must divide the mini-batch size {mini or batch}")
        overlong_ok = (
            algorithm.length_reward != "dapo_overlong"
            or algorithm.overlong_cache < rollout.max_new_tokens
        )
        check = _checker("algorithm", algorithm)
        check(
            "overlong_cache",
            overlong_ok,
            f"must be < rollout.max_new_tokens={rollout.max_new_tokens}",
        )
        _check_float32_products(self)
        return self

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (tuples as lists): what config.yaml holds."""
        return {name: _plain(dataclasses.asdict(getattr(self, name))) for name in SECTIONS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build and validate from a nested dict; unknown sections or keys are errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a mapping of sections, got {type(data).__name__}")
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown config section(s) {unknown}; valid: {', '.join(SECTIONS)}")
        hints = typing.get_type_hints(cls)
        sections = {}
        for name in SECTIONS:
            values = data.get(name) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"config section '{name}' must be a mapping, got {values!r}")
            sections[name] = build_section(hints[name], name, values)
        return cls(**sections).validate()

    def save(self, path: str | Path) -> None:
        """Write as YAML (sections in a fixed order)."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _check_float32_products(cfg: TrainConfig) -> None:
    """Products of settings that the trainer computes in float32 must stay below FLOAT32_MAX.

    AdamW's first step moves a weight by lr / (1 - beta1) and decays it by lr * weight_decay; a
    group's reward statistics sum G squared deviations, each up to (1 + length weight)^2 (the
    score is in [0, 1], the length terms are at most the weight in size).
    """
    optim, algorithm, G = cfg.optim, cfg.algorithm, cfg.rollout.group_size
    check, limit = _checker("optim", optim), f"overflows float32 (max {FLOAT32_MAX:.3g})"
    step = optim.lr / (1 - optim.betas[0])
    rule = f"AdamW's first step, lr / (1 - betas[0]) = {step:.3g}, {limit}; lower it"
    check("lr", step <= FLOAT32_MAX, rule)
    decay = optim.lr * optim.weight_decay
    rule = f"lr * weight_decay = {decay:.3g} {limit}; lower it or optim.lr"
    check("weight_decay", decay <= FLOAT32_MAX, rule)
    if algorithm.length_reward in ("agpo", "kimi"):
        largest = math.sqrt(FLOAT32_MAX / G) - 1
        rule = f"must be <= {largest:.3g}, or a group's reward variance (G={G}) {limit}"
        _checker("algorithm", algorithm)("length_weight", algorithm.length_weight <= largest, rule)


MAX_CONFIG_BYTES = 1 << 20
"""A config file is a few kB; anything over 1 MiB is not one (and is refused before parsing)."""
MAX_CONFIG_DEPTH = 16
"""Nesting a config may have: its schema needs 4 levels (sections, keys, lists, values)."""


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader with a depth limit (its composer recurses once per level, so 50,000 `[`
    would end in a RecursionError) and without aliases (*name), whose expansion can be
    exponentially larger than the file."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("anchors and aliases (*name) are not supported in a config")
        self._depth += 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                raise yaml.YAMLError(f"nested deeper than {MAX_CONFIG_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def parse_yaml(text: str) -> Any:
    """`yaml.safe_load` with the config limits (depth, no aliases); raises yaml.YAMLError."""
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader subclass)


def read_config_file(path: Path) -> Any:
    """The YAML in `path`, or a one-line ConfigError for a file too large, not UTF-8 text, not
    valid YAML or too deep."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{path}: {size} bytes is too large for a config (at most {MAX_CONFIG_BYTES}); "
                "pass a YAML config file"
            )
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {path} ({err.strerror or type(err).__name__})") from None
    try:
        text = raw.decode("utf-8-sig")  # a UTF-8 byte-order mark is allowed
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); save "
            "the config as UTF-8 YAML"
        ) from None
    try:
        return parse_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (None: all defaults), apply ``section.key=value`` overrides, validate.

    Example: ``load_config("configs/embedded_grpo.yaml", ["run.steps=5", "rollout.group_size=4"])``.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"config file not found: {path}; pass an existing YAML file")
        data = read_config_file(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return TrainConfig.from_dict(apply_overrides(data, overrides or []))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``section.key=value`` in the nested dict `data` (in place; returned), the value
    read as YAML: ``["run.steps=5"]`` sets ``data["run"]["steps"] = 5``."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"override {item!r} must look like section.key=value (run.steps=10)")
        try:
            value = parse_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            if "nested deeper" in str(err) or "aliases" in str(err):
                raise ConfigError(f"override {key.strip()}: {str(err).splitlines()[0]}") from None
            value = raw  # not YAML: the text itself (a name, a path)
        section = data.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ConfigError(f"config section '{parts[0]}' must be a mapping, got {section!r}")
        section[parts[1]] = value
    return data


# ---- the other commands' settings -------------------------------------------------------------


@dataclass
class PretrainConfig(Settings):
    """SFT of the embedded checkpoint: a tiny Qwen2 on arithmetic traces (same config + seed = same
    weights)."""

    output_dir: str = str(EMBEDDED_MODEL_DIR)
    """Folder to write model, tokenizer and card into (created if missing, files overwritten)."""
    seed: int = 0
    """Seeds the weights init, the SFT data stream and the sampling of the measurement."""
    steps: int = 2000
    """Optimizer steps (each on a fresh batch of traces)."""
    batch_size: int = 64
    """Traces per optimizer step."""
    learning_rate: float = 3e-3
    """Peak AdamW learning rate (linear warm-up, then cosine decay to 10% of it)."""
    warmup_steps: int = 100
    """Steps of linear learning-rate warm-up."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    hidden_size: int = 128
    """Transformer width."""
    num_layers: int = 4
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads (multi-head, no grouped KV)."""
    intermediate_size: int = 512
    """MLP width."""
    level_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)
    """Sampling weight of each difficulty level 1..5 in the SFT data."""
    max_verbosity: int = 3
    """Each trace gets uniformly 0..max_verbosity redundant segments (re-checks, restatements)."""
    error_rate: float = 0.03
    """Probability that a step of an SFT trace is a slip (the answer is then wrong too)."""
    eval_problems: int = 200
    """Eval-split problems measured after training (spread evenly over the levels); 0 skips it."""
    group_size: int = 8
    """Samples per eval prompt (G) for pass@1 and the group-kind fractions."""
    max_new_tokens: int = 96
    """Generation limit of the measurement (completions without EOS count as wrong)."""
    eval_batch_size: int = 128
    """Sequences generated at once during the measurement."""
    num_threads: int = 2
    """torch CPU threads (fixed, since thread count can change float reduction order)."""

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first impossible setting."""
        check = _checker(self.PREFIX, self)
        weights = self.level_weights
        weights_ok = len(weights) == len(ARITHMETIC_LEVELS) and min(weights) >= 0 < sum(weights)
        check(
            "level_weights", weights_ok, f"needs {len(ARITHMETIC_LEVELS)} numbers >= 0, not all 0"
        )
        for key in (
            "steps",
            "batch_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "group_size",
            "max_new_tokens",
            "eval_batch_size",
            "num_threads",
        ):
            check(key, getattr(self, key) >= 1, "must be >= 1")
        for key in ("warmup_steps", "max_verbosity", "eval_problems"):
            check(key, getattr(self, key) >= 0, "must be >= 0")
        check("learning_rate", self.learning_rate > 0, "must be > 0")
        check("weight_decay", self.weight_decay >= 0, "must be >= 0")
        heads_ok = self.hidden_size % self.num_heads == 0
        check("hidden_size", heads_ok, f"must be divisible by num_heads={self.num_heads}")
        check("error_rate", 0 <= self.error_rate < 1, "must be in [0, 1)")


@dataclass
class WarmStartConfig(Settings):
    """SFT that puts a real chat model in the paper's regime (`agpo_lab.experiments.warmstart`):
    natural-language worked solutions of the word_arithmetic train split with redundant re-checks,
    so that the model solves most prompts and overthinks (same config + seed = same weights)."""

    base_model: str = "smollm2-135m-instruct"
    """The model to fine-tune (a fetched model's name, a local folder or a hub id)."""
    name: str = "smollm2-135m-instruct-warm"
    """The warm start's folder under the models folder ($AGPO_LAB_MODELS_DIR, else models/);
    `model.name_or_path` names it like a fetched model."""
    seed: int = 0
    """Seeds the LoRA init, the SFT data stream and the card's sampling."""
    steps: int = 90
    """Optimizer steps (each on a fresh batch of worked solutions)."""
    batch_size: int = 16
    """Worked solutions per optimizer step."""
    learning_rate: float = 1e-3
    """Peak AdamW learning rate (linear warm-up, then cosine decay to 10% of it)."""
    warmup_steps: int = 10
    """Steps of linear learning-rate warm-up."""
    lora: bool = True
    """Train LoRA adapters on every linear layer (merged into the weights at the end) instead of all
    weights."""
    lora_r: int = 16
    """LoRA rank r."""
    lora_alpha: int = 32
    """LoRA scale numerator: the update is (alpha / r) * B A."""
    micro_batch_tokens: int = 512
    """The step's solutions go through the loss in passes of at most this many prompt +
    completion tokens (whole solutions; one longer than this gets its own pass), their gradients
    summed: the peak memory of one pass's [tokens, vocabulary] logits, not the batch's. 0: one
    pass."""
    levels: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Difficulty levels of the SFT questions (the RL training mix of configs/smollm2)."""
    max_verbosity: int = 4
    """Each solution gets uniformly 0..max_verbosity redundant segments (re-checks, restatements):
    verbosity is the model's sampled choice, as in the embedded model's traces."""
    error_rate: float = 0.05
    """Probability that a step of a worked solution is a slip (the answer is then wrong too)."""
    save_every: int = 20
    """Save the SFT state every this many steps (an interrupted build resumes from there)."""
    card_train_problems: int = 96
    """Problems of the RL training mix (train split, the configs/smollm2 task) the card measures."""
    card_eval_problems: int = 45
    """Held-out problems the card measures (eval split, never trained on)."""
    group_size: int = 8
    """Samples per problem (G) for the card's pass@1 and group kinds."""
    temperature: float = 0.5
    """Sampling temperature of the card (the RL recipes' rollout.temperature)."""
    max_new_tokens: int = 128
    """Generation limit of the card (configs/smollm2/warm_compare.yaml's rollout.max_new_tokens)."""
    num_threads: int = 2
    """torch CPU threads (fixed, since thread count can change float reduction order)."""
    docs_dir: str | None = str(DOCS_RESULTS_DIR / "smollm2" / "warm_start")
    """Where the finished build's card (README.md, card.json) is copied for the docs; null: not."""

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first impossible setting."""
        check = _checker(self.PREFIX, self)
        check("base_model", bool(self.base_model.strip()), "name a model")
        name_problem = folder_name_problem(self.name)
        check("name", name_problem is None, str(name_problem))
        for key in ("steps", "batch_size", "lora_r", "save_every", "group_size", "max_new_tokens"):
            check(key, getattr(self, key) >= 1, "must be >= 1")
        for key in ("warmup_steps", "max_verbosity", "card_train_problems", "card_eval_problems",
                    "micro_batch_tokens"):  # fmt: skip
            check(key, getattr(self, key) >= 0, "must be >= 0")
        check("num_threads", self.num_threads >= 1, "must be >= 1")
        check("learning_rate", self.learning_rate > 0, "must be > 0")
        check("lora_alpha", self.lora_alpha > 0, "must be > 0")
        check("error_rate", 0 <= self.error_rate < 1, "must be in [0, 1)")
        check("temperature", self.temperature > 0, "must be > 0")
        levels_ok = bool(self.levels) and set(self.levels) <= set(ARITHMETIC_LEVELS)
        check("levels", levels_ok, f"choose among {list(ARITHMETIC_LEVELS)}")


@dataclass
class ReproduceConfig(Settings):
    """The main job: GRPO vs AGPO and the ablations, over seeds, each run a `TrainConfig` made of
    the base config plus the method's overrides; results with intervals and figures."""

    name: str | None = None
    """Results go to <out_dir>/<name>/ (None: "embedded", or "embedded-quick" with quick)."""
    base_config: str = str(CONFIGS_DIR / "reproduce.yaml")
    """YAML config shared by every run (the budget: steps, prompts per step, G, lr, eval)."""
    methods: tuple[str, ...] = ("grpo", "agpo", "agpo_adv_only", "length_only", "dr_grpo")
    """Methods to run, by name (agpo_lab.experiments.methods.METHODS)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds per method (the same seeds for every method)."""
    out_dir: str = "results"
    """Parent folder of the results."""
    jobs: int = 2
    """Runs in parallel (processes); each gets $OMP_NUM_THREADS (else the cores) // jobs threads."""
    quick: bool = False
    """Smoke-test budget (a few steps, one seed): checks the pipeline, is not a result."""
    docs: bool = True
    """A full (non-quick) run copies its table and main figures into docs/results for the README."""
    docs_dir: str = str(DOCS_RESULTS_DIR)
    """Where `docs` copies them."""
    overrides: list[str] = field(default_factory=list)
    """Extra section.key=value overrides applied to every run (after the method's)."""

    @property
    def results_name(self) -> str:
        """The name of the results folder: `name`, or the default for the budget."""
        return self.name or ("embedded-quick" if self.quick else "embedded")

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first impossible setting (the method names are
        checked against the registry by `agpo_lab.experiments.reproduce`, before any run)."""
        check = _checker(self.PREFIX, self)
        unique = len(set(self.methods)) == len(self.methods)
        check("methods", bool(self.methods) and unique, "name at least one method, each once")
        check("seeds", bool(self.seeds), "name at least one seed")
        check("jobs", self.jobs >= 1, "must be >= 1")
        name_problem = None if self.name is None else folder_name_problem(self.name)
        check("name", name_problem is None, f"{name_problem} (or leave it out)")
        check("base_config", Path(self.base_config).is_file(), "file not found; pass a YAML config")
        for item in self.overrides:
            well_formed = "=" in item and "." in item.partition("=")[0]
            check("overrides", well_formed, f"{item!r} must look like section.key=value")


@dataclass
class StudyConfig(Settings):
    """A study: the `reproduce` comparison repeated along one axis, each arm its own results folder
    (resumable like reproduce), then one table and one figure across the arms.
    stability: one arm per learning rate; regime: one arm per starting checkpoint."""

    study: Literal["stability", "regime"] = "stability"
    """Which axis: learning rates (stability) or starting checkpoints (regime)."""
    name: str | None = None
    """Results go to <out_dir>/<name>/ (None: the study's name, "-quick" added with quick)."""
    base_config: str = str(CONFIGS_DIR / "reproduce.yaml")
    """YAML config shared by every run (the embedded default's budget)."""
    methods: tuple[str, ...] = (
        "grpo", "agpo", "agpo_adv_only", "length_only", "agpo_mask", "rl_zvp", "dapo", "dr_grpo",
    )  # fmt: skip
    """Methods (agpo_lab.experiments.methods.METHODS), the same in every arm."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds per method and arm."""
    learning_rates: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    """stability: one arm per optim.lr, from stable to unstable for the embedded model."""
    checkpoints: tuple[str, ...] = ("weak", "embedded")
    """regime: starting checkpoints (model.name_or_path values); "weak" is the embedded recipe
    stopped early (weak_steps SFT steps), built on first use into <out_dir>/<name>/weak_model."""
    weak_steps: int = 300
    """SFT steps of the "weak" checkpoint (the embedded model has 2000): more all-wrong than
    all-correct groups."""
    out_dir: str = "results"
    """Parent folder of the results."""
    jobs: int = 2
    """Runs in parallel (processes); each gets $OMP_NUM_THREADS (else the cores) // jobs threads."""
    quick: bool = False
    """Smoke-test budget (a few steps, one seed): checks the pipeline, is not a result."""
    docs: bool = True
    """A full (non-quick) study copies its tables and figures into docs_dir/<results name>
    (docs/results/stability, docs/results/regime, or the name given)."""
    docs_dir: str = str(DOCS_RESULTS_DIR)
    """Parent folder `docs` copies into."""
    overrides: list[str] = field(default_factory=list)
    """Extra section.key=value overrides applied to every run (after the method's and the arm's)."""

    @property
    def results_name(self) -> str:
        """The name of the results folder: `name`, or the study's name (+ "-quick")."""
        return self.name or (f"{self.study}-quick" if self.quick else self.study)

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first impossible setting."""
        check = _checker(self.PREFIX, self)
        unique = len(set(self.methods)) == len(self.methods)
        check("methods", bool(self.methods) and unique, "name at least one method, each once")
        check("seeds", bool(self.seeds), "name at least one seed")
        lrs = self.learning_rates
        check("learning_rates", bool(lrs) and min(lrs) > 0, "name at least one lr, each > 0")
        check("checkpoints", bool(self.checkpoints), "name at least one checkpoint")
        check("weak_steps", self.weak_steps >= 1, "must be >= 1")
        check("jobs", self.jobs >= 1, "must be >= 1")
        name_problem = None if self.name is None else folder_name_problem(self.name)
        check("name", name_problem is None, f"{name_problem} (or leave it out)")
        check("base_config", Path(self.base_config).is_file(), "file not found; pass a YAML config")
        for item in self.overrides:
            well_formed = "=" in item and "." in item.partition("=")[0]
            check("overrides", well_formed, f"{item!r} must look like section.key=value")


# ---- reading values and documenting keys ------------------------------------------------------


def build_section(cls: type, name: str, values: dict[str, Any]) -> Any:
    """Instantiate a section dataclass from YAML values, checking key names and value types."""
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in section '{name}'; valid: {', '.join(valid)}"
        )
    kwargs = {k: coerce(v, hints[k], f"{name}.{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"section '{name}': {err}") from None


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type `tp`, or raise a one-line ValueError.

    Numbers must be finite: `.inf`, `.nan` and overflowing literals such as 1e400 are rejected.
    Example: ``coerce("3e-5", float, "optim.lr") == 3e-5`` (YAML reads 3e-5 as a string).
    """
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ValueError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {_shown(value)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"{key}={_shown(value)} is not valid; choose one of {', '.join(args)}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={_shown(value)}: expected a list like [a, b]")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}={_shown(value)}: expected {len(args)} values")
            return tuple(coerce(v, a, key) for v, a in zip(value, args))
        item_type = args[0] if args else Any
        return origin(coerce(v, item_type, key) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={_shown(value)}: expected true or false")
        return value
    if tp in (int, float):
        written = value
        if isinstance(value, str):
            try:
                value = float(value) if tp is float else _whole_number(value)
            except ValueError:
                raise ConfigError(f"{key}={_shown(value)}: expected a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={_shown(value)}: expected a number")
        if isinstance(value, int) and abs(value) > INT64_MAX:  # too large for a float too
            raise ConfigError(f"{key}={_shown(written)}: must fit in 64 bits (|n| <= {INT64_MAX})")
        if not math.isfinite(value):
            raise ConfigError(f"{key}={_shown(written)}: expected a finite number")
        if tp is int and float(value) != int(value):
            raise ConfigError(f"{key}={_shown(value)}: expected an integer")
        return tp(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}={_shown(value)}: expected a string")
        return str(value)
    return value


def _whole_number(text: str) -> int | float:
    """An int from "12" or from "1e12" (YAML reads 1e12 as text): a float-looking text gives its
    float, which `coerce` then accepts only when it is a whole number."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively (YAML-safe)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass, by field name.

    Example: ``field_docs(RunConfig)["steps"] == "RL steps (one rollout batch and its updates each)."``
    """
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        is_doc = isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and is_doc:
            docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def describe_keys(sections: tuple[str, ...] = SECTIONS, width: int = 100) -> str:
    """Every ``section.key`` of a TrainConfig with its default and docstring (`--help` text)."""
    hints = typing.get_type_hints(TrainConfig)
    lines = []
    for name in sections:
        cls = hints[name]
        lines.append(f"{name}: {inspect.getdoc(cls)}")
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            head = f"  {name}.{f.name}={yaml.safe_dump(_plain(default), default_flow_style=True).strip().removesuffix('...').strip()}"
            body = textwrap.fill(
                docs.get(f.name, ""), width, initial_indent=" " * 6, subsequent_indent=" " * 6
            )
            lines += [head, body]
    return "\n".join(lines)
