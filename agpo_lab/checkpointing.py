"""Stopping, saving and resuming a `Trainer` so that a resumed run is bit-identical on CPU.

A checkpoint (see `agpo_lab.runs` for the file format) holds the trainable weights, the optimizer
and scheduler states, the step and every random state: torch's global RNG, the data generator
(prompt order and mini-batch shuffles, identical on all processes) and each process's sampling
generator. Ctrl-C is deferred to the end of the current step; a second Ctrl-C stops at once and
still saves, unless the weights are half-way through an update.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from agpo_lab.distributed import broadcast, unwrap
from agpo_lab.runs import find_latest_checkpoint, load_checkpoint, save_checkpoint

if TYPE_CHECKING:
    from agpo_lab.config import TrainConfig
    from agpo_lab.trainer import Trainer


def rng_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every random state this process draws from (CUDA's too when present)."""
    state = {
        "torch": torch.get_rng_state(),
        "data": trainer.data_generator.get_state(),
        "sample": trainer.sample_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(trainer: Trainer, state: dict[str, torch.Tensor]) -> None:
    """Inverse of `rng_state`."""
    torch.set_rng_state(state["torch"])
    trainer.data_generator.set_state(state["data"])
    trainer.sample_generator.set_state(state["sample"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(trainer: Trainer) -> None:
    """Write checkpoints/step_N.safetensors unless it exists (process 0 writes)."""
    samplers = trainer.sample_generator.get_state()
    if trainer.accelerator:  # every process's sampler, so each resumes its own stream
        samplers = trainer.accelerator.gather(samplers.to(trainer.device)[None]).cpu()
    if trainer.rank != 0:
        return
    path = trainer.run_dir.checkpoint_path(trainer.step)
    if path.exists():
        return
    model = unwrap(trainer.model, trainer.accelerator)
    weights = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state = {
        "step": trainer.step,
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "rng": rng_state(trainer),
        "sample_generators": samplers,
        "config": trainer.cfg.to_dict(),
    }
    save_checkpoint(path, weights, state)


def load(trainer: Trainer, path: str | Path) -> None:
    """Restore weights, optimizer, scheduler, step and every RNG from a checkpoint file."""
    weights, state = load_checkpoint(path)
    model = unwrap(trainer.model, trainer.accelerator)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != trainable:
        raise ValueError(
            f"{path} does not match the model's trainable parameters; was "
            "model.* (e.g. lora) changed since the run started?"
        )
    model.load_state_dict(weights, strict=False)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(trainer, state["rng"])
    samplers = state["sample_generators"]
    if samplers.dim() == 2 and samplers.shape[0] == trainer.world:
        trainer.sample_generator.set_state(samplers[trainer.rank])
    elif samplers.dim() == 1 and trainer.world == 1:
        trainer.sample_generator.set_state(samplers)
    trainer.step = int(state["step"])


def run_path(cfg: TrainConfig, accelerator) -> Path:
    """out_dir/name; an unnamed run gets (and keeps in cfg) "<estimator>-seed<N>-<timestamp>"."""
    run = cfg.run
    if run.name is None:
        name = f"{cfg.algorithm.estimator}-seed{run.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
        run.name = broadcast(name, accelerator)  # every process must agree on the timestamp
    return Path(run.out_dir) / run.name


def open_run_dir(trainer: Trainer) -> None:
    """Create the run directory, or resume it; never overwrite an existing run silently."""
    run_dir = trainer.run_dir
    latest = find_latest_checkpoint(run_dir.path)
    if (latest or run_dir.metrics_path.exists()) and not trainer.cfg.run.resume:
        raise ValueError(
            f"{run_dir.path} already holds a run; set run.resume=true to "
            "continue it or choose another run.name"
        )
    if latest is not None:
        load(trainer, latest)
    if trainer.rank == 0:
        run_dir.truncate_metrics(trainer.step)  # a resume re-runs (and re-logs) later steps
        run_dir.write_config(yaml.safe_dump(trainer.cfg.to_dict(), sort_keys=False))


@contextlib.contextmanager
def deferred_interrupt(trainer: Trainer):
    """First Ctrl-C sets trainer.stop_requested (finish the step, save, stop); a second one
    raises KeyboardInterrupt at once. Only the main thread can install signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if trainer.stop_requested:
            raise KeyboardInterrupt
        trainer.stop_requested = True
        print("\nCtrl-C: stopping after this step (press again to stop now)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def save_after_hard_interrupt(
    trainer: Trainer, *, mid_update: bool, rng_at_step_start: dict | None
) -> None:
    """KeyboardInterrupt mid-step: save the state after the last completed step, unless the
    weights are half-way through the step's update (then the last checkpoint stays the latest)."""
    if mid_update:
        print(
            f"interrupted during the update of step {trainer.step + 1}; not saving it (the "
            f"weights are half-updated); resume starts from the last checkpoint",
            file=sys.stderr,
        )
        return
    if rng_at_step_start is not None:  # undo the interrupted step's random draws
        set_rng_state(trainer, rng_at_step_start)
    save(trainer)
    print(f"interrupted: saved the checkpoint after step {trainer.step}", file=sys.stderr)


def export_policy(model: torch.nn.Module, tokenizer, folder: Path) -> None:
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
