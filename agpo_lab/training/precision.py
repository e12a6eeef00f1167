"""Whether the optimizer's updates survive the trained weights' precision.

AdamW moves a weight by at most about lr per step. Round-to-nearest drops a change smaller than
half the spacing between neighbouring values, which near |w| is between |w| eps / 2 and |w| eps
(eps of the dtype), so in bfloat16 (eps = 2^-7) an update of lr = 1e-6 is lost on every weight
above 5.1e-4 in magnitude (and on some above half of that): full fine-tuning with bfloat16
weights at the usual RL learning rates leaves most weights where they were. Mixed precision
avoids it (float32 weights for the optimizer, bfloat16 compute: verl's FSDP default, or the HF
Trainer's bf16=True on a float32 model); LoRA adapters are float32 here (peft), so only full
fine-tuning in low precision is concerned.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


def rounded_away_above(lr: float, dtype: torch.dtype) -> float:
    """The weight magnitude above which a change of `lr` always rounds away in `dtype`: 4 lr / eps
    (there the spacing is over 2 lr); below half of it the change always survives.

    Example: lr 1e-6 in bfloat16 (eps 2^-7) -> 5.12e-4; in float32 (eps 2^-23) -> 33.6.
    """
    return 4 * lr / torch.finfo(dtype).eps


def lost_update_warning(params: Iterable[torch.Tensor], lr: float) -> str | None:
    """A one-line warning when most trained weights are in bfloat16 / float16 and too large for a
    change of `lr` to survive rounding; None otherwise (float32 weights, or small enough ones)."""
    low = [p for p in params if p.dtype in LOW_PRECISION]
    if not low:
        return None
    dtype = low[0].dtype
    limit = rounded_away_above(lr, dtype)
    total = sum(p.numel() for p in low)
    with torch.no_grad():
        lost = sum(int((p.abs() > limit).sum()) for p in low)
    if lost <= total / 2:
        return None
    name = str(dtype).removeprefix("torch.")
    return (
        f"warning: optim.lr={lr:g} with {name} weights: an AdamW step moves a weight by at most "
        f"about lr, which rounds away for |w| > {limit:.1e}, {lost / total:.0%} of the trained "
        "weights, so they will barely change; train them in float32 (model.dtype=float32) or with "
        "LoRA (its adapters are float32)"
    )
