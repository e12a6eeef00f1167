"""Bounds that follow from the machine and the model, checked before anything loads.

`load_config` checks what a config alone can say (ranges, float32, 64 bits). What it cannot say
needs the machine or the model, and is checked here, before a run directory is opened or weights
are read: whether a run's rollout, update and evaluation fit in the device's memory (the
`agpo_lab.models.memory` estimate, from the model's config.json only), whether the task can
produce the problems asked for, and whether the seeds the trainer derives fit a generator. Each
failure is a one-line ConfigError that names the setting and the limit:

    rollout.max_new_tokens=1000000000000: a rollout needs about 9.5e+06 GiB (KV cache ...), more
    than the 125.8 GiB of memory of this machine; lower it (default 96)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from agpo_lab.config import TrainConfig
from agpo_lab.errors import ConfigError
from agpo_lab.models.fetch import CATALOG, fetched_model_dir
from agpo_lab.models.memory import (
    Architecture,
    Workload,
    architecture_for,
    architecture_from_config,
    estimate_memory_gib,
)
from agpo_lab.paths import EMBEDDED_MODEL_DIR
from agpo_lab.tasks.arithmetic import ArithmeticTask

GIB = 2**30
SEED_RANGE = (-(2**63), 2**64 - 1)
"""What `torch.Generator.manual_seed` accepts."""
TRAIN_MEMORY_KEYS = (
    "rollout.max_new_tokens",
    "rollout.group_size",
    "run.prompts_per_step",
    "optim.mini_batch_size",
    "optim.grad_accumulation",
    "model.lora_r",
)
"""Settings the memory of a training step grows with, in the order a tie names them."""
EVAL_MEMORY_KEYS = ("eval.max_new_tokens", "eval.k")
"""Settings the memory of an evaluation's generation grows with."""


def sampling_seed(seed: int, rank: int) -> int:
    """The seed of process `rank`'s sampling generator in a run with run.seed = `seed`."""
    return seed * 1000 + 1 + rank


def check_run_bounds(
    cfg: TrainConfig,
    device: str | torch.device,
    world: int = 1,
    model_config: Any = None,
    evaluates: bool | None = None,
) -> None:
    """Raise a one-line ConfigError when a training run of `cfg` cannot work on this machine: its
    seeds, its task's size, the memory of a step and of an evaluation. `model_config`: the
    config of a model passed in directly (else config.json of model.name_or_path is read);
    `evaluates`: whether the eval split is used (None: when run.eval_every or eval_at_start)."""
    check_seeds(cfg, world)
    if evaluates is None:
        evaluates = bool(cfg.run.eval_every or cfg.run.eval_at_start)
    check_task_size(cfg, ("train", "eval") if evaluates else ("train",))
    arch = model_architecture(cfg.model.name_or_path, model_config)
    if arch is None:  # a hub id not on disk: the loader reports it; nothing to estimate from
        return
    found = memory_limit(device)
    if found is None:  # no such device here: the trainer reports it
        return
    limit, where = found
    check_memory(cfg, arch, limit, where, _train_peak, TRAIN_MEMORY_KEYS, world)
    if evaluates:
        check_memory(cfg, arch, limit, where, _eval_peak, EVAL_MEMORY_KEYS, world)


def check_seeds(cfg: TrainConfig, world: int = 1) -> None:
    """The seeds the trainer derives from run.seed must be generator seeds."""
    low, high = SEED_RANGE
    seeds = (sampling_seed(cfg.run.seed, 0), sampling_seed(cfg.run.seed, world - 1))
    if not all(low <= s <= high for s in seeds):
        raise ConfigError(
            f"run.seed={cfg.run.seed}: process r samples with seed run.seed * 1000 + 1 + r, "
            f"which must lie in [{low}, {high}]; use a smaller seed"
        )


def check_task_size(cfg: TrainConfig, splits: tuple[str, ...]) -> None:
    """The embedded task must have as many distinct problems as task.n_train / n_eval ask (of
    the splits used), which it can tell without drawing one."""
    t = cfg.task
    if t.name in ("arithmetic", "word_arithmetic"):
        task = ArithmeticTask(seed=t.seed, n_train=t.n_train, n_eval=t.n_eval, levels=t.levels)
        for split in splits:
            task.check_size(split)


def model_architecture(name_or_path: str, model_config: Any = None) -> Architecture | None:
    """The sizes of the model from its config.json (no weights read), or None when there is no
    local config to read (a hub id not fetched) or it is not a decoder LM's."""
    try:
        if model_config is not None:
            return architecture_from_config(model_config)
        folder = _local_folder(name_or_path)
        if folder is None:
            return architecture_for(name_or_path)  # a known Qwen2.5 name, else ValueError
        return architecture_from_config(json.loads((folder / "config.json").read_text()))
    except (OSError, ValueError, TypeError, AttributeError):
        return None  # unreadable or unusual: the loader gives its own one-line error


def _local_folder(name_or_path: str) -> Path | None:
    if name_or_path == "embedded":
        return EMBEDDED_MODEL_DIR
    if name_or_path in CATALOG:
        return fetched_model_dir(name_or_path)
    path = Path(name_or_path).expanduser()
    return path if (path / "config.json").is_file() else None


def memory_limit(device: str | torch.device) -> tuple[int, str] | None:
    """(bytes, description) of the memory a run on `device` can use at most: the GPU's total
    memory, or the machine's physical memory (lower when a cgroup limits this process); None for
    a GPU this machine does not have."""
    device = _resolve(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(device)
        return props.total_memory, f"the {props.total_memory / GIB:.1f} GiB of the {props.name}"
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cgroup = _cgroup_limit()
    if cgroup is not None and cgroup < limit:
        return cgroup, f"the {cgroup / GIB:.1f} GiB this process may use (cgroup memory.max)"
    return limit, f"the {limit / GIB:.1f} GiB of memory of this machine"


def _cgroup_limit() -> int | None:
    try:
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _resolve(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_memory(
    cfg: TrainConfig,
    arch: Architecture,
    limit: int,
    where: str,
    peak_of: Any,
    keys: tuple[str, ...],
    world: int = 1,
) -> None:
    """Raise when `peak_of(cfg, arch, world)` (bytes, what) exceeds `limit`, naming the setting
    of `keys` whose default brings the peak down the most (model.name_or_path when none does)."""
    peak, what = peak_of(cfg, arch, world)
    if peak <= limit:
        return
    defaults = TrainConfig()
    lowered = {key: peak_of(_with(cfg, key, _get(defaults, key)), arch, world)[0] for key in keys}
    key = min(keys, key=lambda k: lowered[k])
    if lowered[key] >= peak:
        key, fix = "model.name_or_path", "choose a smaller model, or model.lora=true"
    else:
        fix = f"lower it (default {_get(defaults, key)})"
    raise ConfigError(
        f"{key}={_get(cfg, key)}: {what} needs about {peak / GIB:.3g} GiB, more than {where}; {fix}"
    )


def _train_peak(cfg: TrainConfig, arch: Architecture, world: int) -> tuple[float, str]:
    """(bytes, description) of a training step's peak: the memory estimate with a one-token
    prompt (a lower bound: prompts are never shorter) and, with micro_batch_tokens, one-row
    micro-batches."""
    work = Workload.from_config(cfg, prompt_len=1, processes=world)
    if cfg.model.dtype == "auto" and _resolve(cfg.run.device).type == "cpu":
        work = dataclasses.replace(work, weight_bytes=4)  # auto is float32 on CPU
    if cfg.optim.micro_batch_tokens is not None:
        work = dataclasses.replace(work, micro_batch=1)
    gib = estimate_memory_gib(arch, work)
    if gib["rollout"] >= gib["update"]:
        what = f"a rollout of {work.rollout_rows} rows x {1 + work.completion_len} tokens"
    else:
        what = f"an update of {work.micro_batch}-row micro-batches x {work.completion_len} tokens"
    return gib["peak"] * GIB, what


def _eval_peak(cfg: TrainConfig, arch: Architecture, world: int) -> tuple[float, str]:
    """(bytes, description) of an evaluation's generation: the weights and the KV cache of at
    least eval.k rows (a problem's samples are generated together) of eval.max_new_tokens."""
    rows, tokens = max(1, cfg.eval.k), cfg.eval.max_new_tokens
    auto_fp32 = cfg.model.dtype == "auto" and _resolve(cfg.run.device).type == "cpu"
    fp32 = cfg.model.dtype in ("float32", "fp32") or auto_fp32
    work = Workload(lora=False, beta=0.0, weight_bytes=4 if fp32 else 2, micro_batch=0,
                    rollout_rows=rows, prompt_len=1, completion_len=tokens)  # fmt: skip
    gib = estimate_memory_gib(arch, work)
    return (
        gib["weights"] + gib["rollout"]
    ) * GIB, f"an evaluation of {rows} rows x {tokens} tokens"


def _get(cfg: TrainConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _with(cfg: TrainConfig, key: str, value: Any) -> TrainConfig:
    """A copy of `cfg` with one setting changed, not validated (only its sizes are read)."""
    section, name = key.split(".")
    changed = object.__new__(type(getattr(cfg, section)))
    changed.__dict__.update({**vars(getattr(cfg, section)), name: value})
    return dataclasses.replace(cfg, **{section: changed})


def check_eval_bounds(cfg: TrainConfig, target: str, device: str) -> None:
    """Raise a one-line ConfigError when evaluating `target` (a run directory, whose model is
    cfg.model, or a model) with cfg's eval and task settings cannot work on `device`."""
    check_task_size(cfg, ("eval",))
    is_run = (Path(target) / "config.yaml").is_file()
    arch = model_architecture(cfg.model.name_or_path if is_run else target)
    found = memory_limit(device)
    if arch is not None and found is not None:
        cfg = _with(cfg, "run.device", device)
        check_memory(cfg, arch, *found, _eval_peak, EVAL_MEMORY_KEYS)
