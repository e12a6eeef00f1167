"""Checkpoints: everything an exact resume needs, in one verified safetensors file per step.

A checkpoint holds the trainable weights, the optimizer and scheduler states, the step and every
random state: torch's global RNG, the data generator (prompt order and mini-batch shuffles,
identical on all processes) and each process's sampling generator; and the log rows its step
wrote, which a resume puts back when a torn write lost them. `TrainingState` is that set of
objects; the trainer owns one and saves or restores it here, so a resumed run continues bit for bit
on CPU.

Every file carries the sha256 of its contents in its metadata and is checked when read: a file
changed after it was written (flipped bits, a torn copy) is refused, and
`load_latest_good_checkpoint` falls back to the newest checkpoint that passes, with a warning. A
file is written to a temporary name, flushed to disk and then moved into place; a failed write (a
full disk) removes the temporary and leaves every earlier checkpoint as it was.

`export_policy` writes the trained network as a plain `from_pretrained` folder, and
`load_run_policy` gives back the policy of a run directory (for `agpo-lab eval`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from agpo_lab.config import ModelConfig, TrainConfig, load_config
from agpo_lab.errors import CheckpointError, MissingFileError, RunDirError
from agpo_lab.models.fetch import CATALOG
from agpo_lab.models.loading import load_policy
from agpo_lab.training import faults
from agpo_lab.training.run_dir import RunDirWarning

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

    def save(
        self,
        path: Path,
        config: TrainConfig,
        sample_generators: torch.Tensor,
        logs: dict[str, list[dict[str, Any]]] | None = None,
    ) -> None:
        """Write the checkpoint file `path` unless it exists. `sample_generators`: every
        process's sampling state ([world, n]; one process's [n]), so each resumes its stream.
        `logs`: the rows the step logged, by log name, restored on resume if a log lost them."""
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
            "logs": logs or {},
        }
        save_checkpoint(path, weights, state)

    def load(self, path: str | Path, rank: int = 0, world: int = 1) -> None:
        """Restore weights, optimizer, scheduler, step and every RNG from a checkpoint file."""
        self.restore(*load_checkpoint(path), rank=rank, world=world, source=path)

    def restore(
        self,
        weights: dict[str, torch.Tensor],
        state: dict[str, Any],
        rank: int = 0,
        world: int = 1,
        source: str | Path = "checkpoint",
    ) -> None:
        """Restore from the (weights, state) of a checkpoint already read (`load_checkpoint`)."""
        trainable = {n for n, p in self.policy.named_parameters() if p.requires_grad}
        if set(weights) != trainable:
            raise CheckpointError(
                f"{source} does not match the model's trainable parameters; was model.* (e.g. "
                "lora) changed since the run started?"
            )
        check_shapes(source, weights, dict(self.policy.named_parameters()))
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


def check_shapes(
    source: str | Path, tensors: dict[str, torch.Tensor], params: dict[str, torch.Tensor]
) -> None:
    """A one-line CheckpointError naming the first tensor of `source` whose shape differs from
    the model's parameter of that name (a checkpoint of another model size, or edited)."""
    for name, tensor in tensors.items():
        if name in params and tensor.shape != params[name].shape:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {list(tensor.shape)} but the model's is "
                f"{list(params[name].shape)}; the checkpoint is of another model (was model.* "
                "or config.yaml changed since it was written?)"
            )


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], state: Any) -> Path:
    """Write named tensors plus a nested `state` (dicts, lists, numbers, tensors) atomically.

    Tensors inside `state` (optimizer moments, RNG states) are stored as safetensors entries and
    the rest as JSON in the file's metadata, next to the sha256 of both (`_digest`), so everything
    needed for an exact resume sits in one file that can be checked. A failed write raises
    RunDirError and leaves no temporary file. Example:
    ``save_checkpoint(p, {"w": w}, {"step": 3, "rng": gen.get_state()})``.
    """
    path = Path(path)
    stored = {f"tensor/{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}
    skeleton = json.dumps(_encode(state, stored))
    metadata = {"agpo_lab_state": skeleton, "agpo_lab_sha256": _digest(stored, skeleton)}
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(stored, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        faults.point("checkpoint.written")
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:  # safetensors reports a full disk as its own error
        with contextlib.suppress(OSError):
            tmp.unlink()
        reason = getattr(err, "strerror", None) or " ".join(str(err).split())[:160]
        raise RunDirError(
            f"could not write checkpoint {path} ({reason}); the earlier checkpoints are intact: "
            "free space (or fix the folder) and resume the run"
        ) from None
    faults.point("checkpoint.replaced")
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], Any]:
    """Inverse of `save_checkpoint`: (tensors, state), checked against the file's own sha256.

    One-line errors: MissingFileError for a missing file, CheckpointError for one that cannot be
    read or whose contents changed since it was written. Files written before checksums were
    added (no "agpo_lab_sha256") are read unchecked.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
            metadata = f.metadata() or {}
        skeleton = metadata["agpo_lab_state"]
        state = _decode(json.loads(skeleton), stored)
    except Exception as err:  # safetensors raises several types for a damaged file
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:120]
        raise CheckpointError(f"checkpoint {path} is unreadable ({reason})") from None
    expected = metadata.get("agpo_lab_sha256")
    if expected is not None and expected != _digest(stored, skeleton):
        raise CheckpointError(
            f"checkpoint {path} failed its checksum: its contents changed after it was written"
        )
    tensors = {k[len("tensor/") :]: v for k, v in stored.items() if k.startswith("tensor/")}
    return tensors, state


def _digest(stored: dict[str, torch.Tensor], skeleton: str) -> str:
    """sha256 over every stored tensor (name, dtype, shape, bytes, in name order) and the state."""
    digest = hashlib.sha256(skeleton.encode())
    for name in sorted(stored):
        tensor = stored[name]
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint with the most completed steps in run_dir/checkpoints (None if there is none)."""
    found = _checkpoints_newest_first(run_dir)
    return found[0] if found else None


def _checkpoints_newest_first(run_dir: str | Path) -> list[Path]:
    folder = Path(run_dir) / "checkpoints"
    found = [
        (int(m.group(1)), p) for p in folder.glob("step_*") if (m := _CHECKPOINT.match(p.name))
    ]
    return [p for _, p in sorted(found, reverse=True)]


def load_latest_good_checkpoint(
    run_dir: str | Path, quarantine: bool = False
) -> tuple[Path, dict[str, torch.Tensor], Any] | None:
    """(path, tensors, state) of the newest checkpoint that reads and passes its checksum.

    Each newer one that fails is skipped with a warning; with `quarantine` (the run's writer) it
    is also renamed to <name>.corrupt, so it is kept for a look but never read again. None when
    no checkpoint passes (or there is none).
    """
    for path in _checkpoints_newest_first(run_dir):
        try:
            return (path, *load_checkpoint(path))
        except CheckpointError as err:
            note = ""
            if quarantine:
                with contextlib.suppress(OSError):
                    path.rename(path.with_name(path.name + ".corrupt"))
                    note = f"; renamed to {path.name}.corrupt"
            warnings.warn(f"{err}; using an earlier checkpoint{note}", RunDirWarning, stacklevel=2)
    return None


def export_policy(model: torch.nn.Module, tokenizer: Any, folder: Path) -> None:
    """Write a plain `from_pretrained` folder (LoRA merged into a copy), replacing it atomically."""
    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        faults.point("export.written")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunDirError(
            f"could not write the final model to {folder} ({err.strerror or type(err).__name__}); "
            "the last checkpoint is intact: fix the cause and resume the run to export it"
        ) from None


def load_run_policy(
    target: str | Path, device: str = "cpu"
) -> tuple[torch.nn.Module, Any, TrainConfig | None, str]:
    """(model, tokenizer, the run's TrainConfig or None, description) for a run or a model.

    A run directory (has config.yaml) gives its model with the weights of its latest checkpoint,
    or its final/ folder when it has no checkpoint; "embedded" or a `from_pretrained` folder gives
    that model and no run config, and so does the name of a fetched model (`models.fetch.CATALOG`).
    """
    path, target = Path(target), str(target)
    if target == "embedded" or target in CATALOG or (path / "config.json").is_file():
        model, tokenizer = load_policy(ModelConfig(name_or_path=target), device)
        return model, tokenizer, None, f"model {target}"
    if not (path / "config.yaml").is_file():
        raise MissingFileError(
            f"{target} is not a run directory (no config.yaml), a model folder (no config.json), "
            f"'embedded' or a fetched model ({', '.join(CATALOG)})"
        )
    train_cfg = load_config(path / "config.yaml")
    found = load_latest_good_checkpoint(path)
    if found is None:
        if not (path / "final" / "config.json").is_file():
            raise MissingFileError(f"run {target} has no readable checkpoint and no final/ model")
        model, tokenizer = load_policy(ModelConfig(name_or_path=str(path / "final")), device)
        return model, tokenizer, train_cfg, f"run {target} (final/)"
    checkpoint, tensors, _ = found
    model, tokenizer = load_policy(train_cfg.model, device)
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown or not tensors:
        raise CheckpointError(
            f"checkpoint {checkpoint} does not fit the run's model ({len(unknown)} unknown "
            f"tensors, e.g. {unknown[:1]}); was config.yaml edited after training?"
        )
    check_shapes(checkpoint, tensors, params)
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
