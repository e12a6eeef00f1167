"""Computing in a lower precision than the weights: which dtype, and the autocast context.

`rollout.precision`, `optim.precision` and `eval.precision` say "model" (the weights' own dtype)
or "bfloat16". bfloat16 matrix products run several times faster than float32 ones on CPUs with
AMX or AVX512-BF16 and on GPUs; the weights stay as they are (the rollout takes bfloat16 copies,
the update autocasts), so the optimizer still sees float32 weights and gradients.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


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
    """`torch.autocast` to `dtype` on the device's type, or nothing when dtype is None."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
