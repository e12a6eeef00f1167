"""Checkpoints: everything an exact resume needs, in one safetensors file per step.

A checkpoint holds the trainable weights, the optimizer and scheduler states, the step and every
random state: torch's global RNG, the data generator (prompt order and mini-batch shuffles,
identical on all processes) and each process's sampling generator. `TrainingState` is that set of
objects; the trainer owns one and saves or restores it here, so a resumed run continues bit for bit
on CPU. `export_policy` writes the trained network as a plain `from_pretrained` folder, and
`load_run_policy` gives back the policy of a run directory (for `agpo-lab eval`).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from agpo_lab.config import ModelConfig, TrainConfig, load_config
from agpo_lab.models.loading import load_policy

_CHECKPOINT = re.compile(r"^step_(\d+)\.safetensors$")


@dataclass
class TrainingState:
    """The objects a checkpoint saves and restores (the trainer's, shared, not copies)."""

    policy: torch.nn.Module
    """The network being trained (unwrapped: plain parameter names); its trainable weights."""
    optimizer: torch.optim.Optimizer
    """AdamW and its moments."""
    scheduler: torch.optim.lr_scheduler.LRScheduler
    """The learning-rate schedule (warm-up position)."""
    data_generator: torch.Generator
    """Prompt order and mini-batch shuffles; the same stream on every process."""
    sample_generator: torch.Generator
    """This process's sampling stream."""
    step: int = 0
    """RL steps completed."""

    def rng_state(self) -> dict[str, torch.Tensor]:
        """Every random state this process draws from (CUDA's too when present)."""
        state = {
            "torch": torch.get_rng_state(),
            "data": self.data_generator.get_state(),
            "sample": self.sample_generator.get_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `rng_state`."""
        torch.set_rng_state(state["torch"])
        self.data_generator.set_state(state["data"])
        self.sample_generator.set_state(state["sample"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])

    def save(self, path: Path, config: TrainConfig, sample_generators: torch.Tensor) -> None:
        """Write the checkpoint file `path` unless it exists. `sample_generators`: every
        process's sampling state ([world, n]; one process's [n]), so each resumes its stream."""
        if path.exists():
            return
        weights = {n: p for n, p in self.policy.named_parameters() if p.requires_grad}
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": self.rng_state(),
            "sample_generators": sample_generators,
            "config": config.to_dict(),
        }
        save_checkpoint(path, weights, state)

    def load(self, path: str | Path, rank: int = 0, world: int = 1) -> None:
        """Restore weights, optimizer, scheduler, step and every RNG from a checkpoint file."""
        weights, state = load_checkpoint(path)
        trainable = {n for n, p in self.policy.named_parameters() if p.requires_grad}
        if set(weights) != trainable:
            raise ValueError(
                f"{path} does not match the model's trainable parameters; was "
                "model.* (e.g. lora) changed since the run started?"
            )
        self.policy.load_state_dict(weights, strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.set_rng_state(state["rng"])
        samplers = state["sample_generators"]
        if samplers.dim() == 2 and samplers.shape[0] == world:
            self.sample_generator.set_state(samplers[rank])
        elif samplers.dim() == 1 and world == 1:
            self.sample_generator.set_state(samplers)
        self.step = int(state["step"])


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], state: Any) -> Path:
    """Write named tensors plus a nested `state` (dicts, lists, numbers, tensors) atomically.

    Tensors inside `state` (optimizer moments, RNG states) are stored as safetensors entries and
    the rest as JSON in the file's metadata, so everything needed for an exact resume sits in one
    file. Example: ``save_checkpoint(p, {"w": w}, {"step": 3, "rng": gen.get_state()})``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = {f"tensor/{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}
    skeleton = _encode(state, stored)
    tmp = path.with_name(path.name + ".tmp")
    save_file(stored, str(tmp), metadata={"agpo_lab_state": json.dumps(skeleton)})
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], Any]:
    """Inverse of `save_checkpoint`: (tensors, state). One-line error for a missing/corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
            skeleton = json.loads((f.metadata() or {})["agpo_lab_state"])
    except Exception as err:  # safetensors raises several types for a damaged file
        raise ValueError(
            f"checkpoint {path} is unreadable ({type(err).__name__}: {str(err)[:80]}); move it "
            "away to resume from an earlier checkpoint"
        ) from None
    tensors = {k[len("tensor/") :]: v for k, v in stored.items() if k.startswith("tensor/")}
    return tensors, _decode(skeleton, stored)


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint with the most completed steps in run_dir/checkpoints (None if there is none)."""
    folder = Path(run_dir) / "checkpoints"
    found = [
        (int(m.group(1)), p) for p in folder.glob("step_*") if (m := _CHECKPOINT.match(p.name))
    ]
    return max(found)[1] if found else None


def export_policy(model: torch.nn.Module, tokenizer: Any, folder: Path) -> None:
    """Write a plain `from_pretrained` folder (LoRA merged into a copy), replacing it atomically."""
    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def load_run_policy(
    target: str | Path, device: str = "cpu"
) -> tuple[torch.nn.Module, Any, TrainConfig | None, str]:
    """(model, tokenizer, the run's TrainConfig or None, description) for a run or a model.

    A run directory (has config.yaml) gives its model with the weights of its latest checkpoint,
    or its final/ folder when it has no checkpoint; "embedded" or a `from_pretrained` folder gives
    that model and no run config.
    """
    path, target = Path(target), str(target)
    if target == "embedded" or (path / "config.json").is_file():
        model, tokenizer = load_policy(ModelConfig(name_or_path=target), device)
        return model, tokenizer, None, f"model {target}"
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{target} is not a run directory (no config.yaml), a model folder (no config.json) "
            "or 'embedded'"
        )
    train_cfg = load_config(path / "config.yaml")
    checkpoint = find_latest_checkpoint(path)
    if checkpoint is None:
        if not (path / "final" / "config.json").is_file():
            raise FileNotFoundError(f"run {target} has no checkpoint and no final/ model yet")
        model, tokenizer = load_policy(ModelConfig(name_or_path=str(path / "final")), device)
        return model, tokenizer, train_cfg, f"run {target} (final/)"
    model, tokenizer = load_policy(train_cfg.model, device)
    tensors, _ = load_checkpoint(checkpoint)
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown or not tensors:
        raise ValueError(
            f"checkpoint {checkpoint} does not fit the run's model ({len(unknown)} unknown "
            f"tensors, e.g. {unknown[:1]}); was config.yaml edited after training?"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].dtype))
    return model, tokenizer, train_cfg, f"run {target} ({checkpoint.name})"


def _encode(obj: Any, stored: dict[str, torch.Tensor]) -> Any:
    """JSON skeleton of `obj`; tensors move into `stored` (non-str dict keys and tuples kept)."""
    if isinstance(obj, torch.Tensor):
        key = f"state/{len(stored)}"
        stored[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__items__": [[_encode(k, stored), _encode(v, stored)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, stored) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, stored) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def _decode(obj: Any, stored: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, stored) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return stored[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, stored) for v in obj["__tuple__"])
        return {_decode(k, stored): _decode(v, stored) for k, v in obj["__items__"]}
    return obj
