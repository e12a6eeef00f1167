"""Computing in a lower precision than the weights: which dtype, and the autocast context.

`rollout.precision`, `optim.precision` and `eval.precision` say "model" (the weights' own dtype)
or "bfloat16". bfloat16 matrix products run several times faster than float32 ones on CPUs with
AMX or AVX512-BF16 and on GPUs; the weights stay as they are (the rollout takes bfloat16 copies,
the update autocasts), so the optimizer still sees float32 weights and gradients.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack, nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

MATH_ON_CPU = True
"""Lower-precision passes on a CPU run SDPA's math attention, faster there in bfloat16 than the
CPU flash kernel (measured in benchmarks/README.md, "bfloat16 that pays")."""


def lower_dtype(model: torch.nn.Module, precision: str) -> torch.dtype | None:
    """The dtype to compute in when `precision` is lower than the model's own, else None.

    Example: a float32 model with precision "bfloat16" -> torch.bfloat16; with "model", or a
    bfloat16 model with "bfloat16" -> None (the weights' own precision).
    """
    if precision == "model":
        return None
    dtype = getattr(torch, precision)
    return None if next(model.parameters()).dtype == dtype else dtype


def autocast_to(device: torch.device | str, dtype: torch.dtype | None) -> AbstractContextManager:
    """`torch.autocast` to `dtype` on the device's type, or nothing when dtype is None; the
    context may be entered again and again, as `torch.autocast` may.

    On a CPU the attention also takes SDPA's math path (`MATH_ON_CPU`), since the CPU flash
    kernel is slower in bfloat16 than in float32 and slower than the math path.
    """
    if dtype is None:
        return nullcontext()
    kind = torch.device(device).type
    if kind == "cpu" and MATH_ON_CPU:
        return _Both(torch.autocast(kind, dtype=dtype), lambda: sdpa_kernel(SDPBackend.MATH))
    return torch.autocast(kind, dtype=dtype)


class _Both(AbstractContextManager):
    """A reusable context: `first` (itself reusable) and a fresh `make_second()` on each entry."""

    def __init__(self, first: AbstractContextManager, make_second) -> None:
        self.first, self.make_second, self._stacks = first, make_second, []

    def __enter__(self) -> None:
        stack = ExitStack()
        stack.enter_context(self.first)
        stack.enter_context(self.make_second())
        self._stacks.append(stack)

    def __exit__(self, *exc) -> bool | None:
        return self._stacks.pop().__exit__(*exc)
