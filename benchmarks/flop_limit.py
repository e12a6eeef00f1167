"""How close a measured speed is to the machine's own limit, for the benchmark scripts.

The limit is the machine's dense matmul throughput, measured in the same run in the format the
measured code computes in (float32 on CPU by default, bfloat16 on CUDA; a bfloat16 rollout on CPU
against the CPU's bfloat16 rate), turned into the tokens/s a model could reach if every FLOP were a matmul at that
rate. A model's matmul FLOPs per token are 2 x (weights of its Linear layers, the LM head included):
attention scores and softmax are left out (small at these context lengths), so the bound is an
optimistic ceiling. A forward costs 2 x per token; a backward 2 x more for the activation gradients
and, when the weights train (full fine-tuning), 2 x more for the weight gradients; LoRA adapters add
a negligible amount on top of the frozen base.

    from flop_limit import matmul_gflops, linear_weights
    gflops = matmul_gflops()                      # e.g. 60 (GFLOP/s) on a 2-core CPU
    bound = gflops * 1e9 / (2 * linear_weights(model))  # forward tokens/s at the limit
"""

from __future__ import annotations

import time

import torch


def matmul_gflops(
    size: int = 1024,
    repeats: int = 5,
    device: str | None = None,
    dtype: torch.dtype | None = None,
) -> float:
    """Best dense matmul throughput of this process (GFLOP/s) on `size` x `size` matrices.

    In `dtype`; by default float32 on CPU (with the current torch thread count), bfloat16 on CUDA.
    Example: on a 2-core CPU ``matmul_gflops()`` gives a few tens to a few hundred.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def linear_weights(model: torch.nn.Module) -> int:
    """Elements in the weights of every `nn.Linear` (LM head included, LoRA adapters too)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def flops_per_token(
    model: torch.nn.Module, backward: bool = False, train_weights: bool = True
) -> int:
    """Matmul FLOPs per token: 2W forward; + 2W backward for activations; + 2W for weight grads."""
    weights = linear_weights(model)
    return 2 * weights * (1 + (backward + (backward and train_weights)))


def percent_of_limit(measured_tokens_per_s: float, bound_tokens_per_s: float) -> float:
    """The measured speed as a percentage of the FLOP-bound speed."""
    return 100.0 * measured_tokens_per_s / bound_tokens_per_s
