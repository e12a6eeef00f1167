"""The processes a run trains on: plain torch on one process, `accelerate` under a multi-process
launch (`accelerate launch`, which sets WORLD_SIZE).

`Processes` offers the few collective operations the trainer needs (gather, sum, mean, max,
broadcast, backward, gradient sync); on one process each is the plain single-process thing, so the
trainer reads the same in both cases.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import Tensor

from agpo_lab.errors import ConfigError


class Processes:
    """This process's place in the run: rank, world size, device, and the accelerator if any."""

    def __init__(self, device: str) -> None:
        """`device` is run.device; a multi-process launch brings its own accelerator."""
        self.accelerator = accelerator_if_distributed(device)
        if self.accelerator is None:
            self.rank, self.world, self.device = 0, 1, device_from(device)
        else:
            acc = self.accelerator
            self.rank, self.world, self.device = acc.process_index, acc.num_processes, acc.device

    @property
    def distributed(self) -> bool:
        """Whether more than one process trains (DDP through accelerate)."""
        return self.accelerator is not None

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple:
        """(model, optimizer) ready for this launch: the DDP wrappers under accelerate."""
        if self.accelerator is None:
            return model, optimizer
        return self.accelerator.prepare(model, optimizer)

    def broadcast(self, obj: Any) -> Any:
        """Process 0's value of `obj` on every process (e.g. a timestamped run name)."""
        if self.accelerator is None:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj])[0]

    def gather(self, *tensors: Tensor) -> list[Tensor]:
        """Whole-batch tensors from every process, on CPU (identity on one process)."""
        if self.accelerator is None:
            return list(tensors)
        acc = self.accelerator
        return [acc.gather(t.to(acc.device)).cpu() for t in tensors]

    def sum(self, value: float) -> float:
        """Sum of a number over processes (the number itself on one process)."""
        if self.accelerator is None:
            return value
        acc = self.accelerator
        return acc.reduce(torch.tensor(float(value), device=acc.device), "sum").item()

    def mean(self, value: float) -> float:
        """Mean of a number over processes."""
        return self.sum(value) / self.world

    def max(self, value: float) -> float:
        """Largest value of a number over processes."""
        if self.accelerator is None:
            return value
        acc = self.accelerator
        return acc.gather(torch.tensor([float(value)], device=acc.device)).max().item()

    def backward(self, loss: Tensor) -> None:
        """loss.backward(), through accelerate when it is there."""
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def sync_gradients_if(self, sync: bool, model: torch.nn.Module):
        """Context for one micro-batch's backward: skip DDP's gradient all-reduce unless `sync`
        (only the last micro-batch of a gradient-accumulation window needs it)."""
        if sync or self.accelerator is None:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)


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
        raise ConfigError(f"run.device={name!r} but CUDA is not available; use run.device=cpu")
    return torch.device(name)
