"""Devices and processes for the trainer: plain torch on one process, `accelerate` under a
multi-process launch (`accelerate launch`, which sets WORLD_SIZE).

The gather / reduce / backward helpers take the accelerator (None on one process) and do the
plain single-process thing without it, so the trainer reads the same in both cases.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import Tensor


def processes(device: str) -> tuple[Any, int, int, torch.device]:
    """(accelerator or None, this process's rank, number of processes, its device) for run.device."""
    accelerator = accelerator_if_distributed(device)
    if accelerator is None:
        return None, 0, 1, device_from(device)
    return accelerator, accelerator.process_index, accelerator.num_processes, accelerator.device


def accelerator_if_distributed(device: str):
    """An `accelerate.Accelerator` under a multi-process launch, else None (plain torch)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=device == "cpu")


def device_from(name: str) -> torch.device:
    """run.device as a torch.device ("auto" = CUDA when available); one-line error without CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"run.device={name!r} but CUDA is not available; use run.device=cpu")
    return torch.device(name)


def unwrap(model, accelerator):
    """The plain model inside accelerate's DDP wrapper (what generation and saving need)."""
    return accelerator.unwrap_model(model) if accelerator else model


def broadcast(obj: Any, accelerator) -> Any:
    """Process 0's value of `obj` on every process (e.g. a timestamped run name)."""
    if not accelerator:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj])[0]


def gather(accelerator, *tensors: Tensor) -> list[Tensor]:
    """Whole-batch tensors from every process, on CPU (identity on one process)."""
    if not accelerator:
        return list(tensors)
    return [accelerator.gather(t.to(accelerator.device)).cpu() for t in tensors]


def reduce_sum(accelerator, value: float) -> float:
    """Sum of a number over processes (the number itself on one process)."""
    if not accelerator:
        return value
    total = accelerator.reduce(torch.tensor(float(value), device=accelerator.device), "sum")
    return total.item()


def reduce_mean(accelerator, value: float) -> float:
    """Mean of a number over processes."""
    return reduce_sum(accelerator, value) / (accelerator.num_processes if accelerator else 1)


def reduce_max(accelerator, value: float) -> float:
    """Largest value of a number over processes."""
    if not accelerator:
        return value
    values = accelerator.gather(torch.tensor([float(value)], device=accelerator.device))
    return values.max().item()


def backward(accelerator, loss: Tensor) -> None:
    if accelerator:
        accelerator.backward(loss)
    else:
        loss.backward()


def sync_gradients_if(sync: bool, accelerator, model):
    """Context for one micro-batch's backward: skip DDP's gradient all-reduce unless `sync`
    (only the last micro-batch of a gradient-accumulation window needs it)."""
    if sync or accelerator is None:
        return contextlib.nullcontext()
    return accelerator.no_sync(model)
