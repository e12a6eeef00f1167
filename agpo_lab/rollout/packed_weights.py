"""bfloat16 weights packed once for oneDNN, the library behind torch's CPU matrix products.

A bfloat16 `F.linear` on a CPU hands its weight to oneDNN, which first lays it out in the blocked
format its kernels read (on CPUs with AMX, tiles), on every call. A decode step's products have a
few dozen rows, so that reordering is a large part of each product. `pack` does it once
(`torch.ops.mkldnn._reorder_linear_weight`, the call torch.compile's CPU weight freezing makes),
and `linear` / `linear_add` run the product on the packed weight. On this project's CPUs the
results are the dense products' bit for bit (tests/test_packed_weights.py checks them against
`F.linear` and `torch.addmm`); benchmarks/README.md has the timings.

    w = pack(weight)                 # [out, in] bfloat16 on a CPU; other weights come back as they are
    y = linear(x, w, bias)           # x W^T + bias
    y = linear_add(r, x, w, bias)    # r + x W^T + bias: a residual added in the same call

Only bfloat16 weights on a CPU with oneDNN's bfloat16 support are packed: float32 products go
through MKL, which reads the weight as it is (packing them changed the results' rounding and
saved little), and other devices have their own libraries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ROWS_HINT = 64
"""The row count oneDNN chooses the packed layout for; one packing serves products of any number
of rows (a decode step's few to a prefill's thousands)."""


def can_pack(weight: Tensor) -> bool:
    """Whether `pack` would pack this weight: a 2-D bfloat16 CPU tensor, with a oneDNN that runs
    bfloat16 products on this CPU."""
    return (
        weight.dim() == 2
        and weight.dtype is torch.bfloat16
        and weight.device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def pack(weight: Tensor) -> Tensor:
    """`weight` [out, in] laid out once for oneDNN's products (an opaque oneDNN tensor that only
    `linear` / `linear_add` read), or `weight` itself when it cannot be packed (`can_pack`)."""
    if not can_pack(weight):
        return weight
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), ROWS_HINT)


def is_packed(weight: Tensor) -> bool:
    """Whether `weight` came out of `pack` packed."""
    return weight.is_mkldnn


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x W^T + bias for a packed or a plain weight [out, in]; x: [rows, in].

    Example: x = [[1, 2]], W = [[1, 0], [1, 1]], bias = None -> [[1, 3]].
    """
    if is_packed(weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def linear_add(residual: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """residual + x W^T + bias for a packed or a plain weight [out, in]; x: [rows, in], residual:
    [rows, out]. The addition rides on the product (oneDNN's post-op, or `addmm`).

    Example: residual = [[10, 10]], x = [[1, 2]], W = [[1, 0], [1, 1]] -> [[11, 13]].
    """
    if is_packed(weight):
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    out = torch.addmm(residual, x, weight.t())
    return out if bias is None else out + bias
