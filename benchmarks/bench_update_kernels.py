"""The update's pieces that the bfloat16 changes rest on, each against its alternative in one run.

    python benchmarks/bench_update_kernels.py [--vocab 49152] [--tokens 512] [--repeats 10]

Prints, forward and backward, milliseconds per call and the ratio to the baseline of each part:

- log-prob of the chosen token: `agpo_lab.rollout.token_logprobs` against
  `log_softmax(logits.float() / T).gather(token)`, float32 and bfloat16 logits [tokens, vocab],
  and float32 logits [64 x 64 tokens, 58] (the embedded model's update pass);
- attention (8 rows x 9 heads x 124 tokens x 64, causal mask): SDPA's CPU flash kernel in float32
  and bfloat16, its math path in bfloat16 (what `rollout.precision.autocast_to` picks on a CPU);
- a bfloat16 matrix product [M, 576] x [576, 1536]: a shape seen before against a new M on every
  call (oneDNN builds a kernel for each new shape; every pass of the update has its own M).

A micro-benchmark of one machine: quote it with the machine and whether it was idle.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from agpo_lab.rollout.token_logprobs import token_logprobs


def per_call_ms(run: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall milliseconds of `run` over `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def logprob_rows(
    tokens: int, vocab: int, repeats: int, dtypes: tuple[torch.dtype, ...]
) -> list[tuple[str, float, float]]:
    rows = []
    for dtype in dtypes:
        logits = torch.randn(tokens, vocab).to(dtype).requires_grad_()
        chosen = torch.randint(0, vocab, (tokens,))

        def fused(logits=logits, chosen=chosen):
            token_logprobs(logits, chosen, 1.0).sum().backward()

        def plain(logits=logits, chosen=chosen):
            logp = F.log_softmax(logits.float() / 1.0, -1)
            logp.gather(-1, chosen[:, None]).sum().backward()

        name = f"{str(dtype).removeprefix('torch.')}, V {vocab}"
        rows.append((f"log-prob {name}: fused / log_softmax+gather", per_call_ms(fused, repeats),
                     per_call_ms(plain, repeats)))  # fmt: skip
    return rows


def attention_rows(repeats: int) -> list[tuple[str, float, float]]:
    rows, times = [], {}
    shape, mask = (8, 9, 124, 64), torch.ones(124, 124, dtype=torch.bool).tril()
    for dtype, backend in [
        (torch.float32, SDPBackend.FLASH_ATTENTION),
        (torch.bfloat16, SDPBackend.FLASH_ATTENTION),
        (torch.bfloat16, SDPBackend.MATH),
    ]:
        q, k, v = (torch.randn(shape).to(dtype).requires_grad_() for _ in range(3))

        def run(q=q, k=k, v=v, backend=backend):
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()

        times[(dtype, backend)] = per_call_ms(run, repeats)
    flash32 = times[(torch.float32, SDPBackend.FLASH_ATTENTION)]
    flash16 = times[(torch.bfloat16, SDPBackend.FLASH_ATTENTION)]
    math16 = times[(torch.bfloat16, SDPBackend.MATH)]
    rows.append(("attention bfloat16: math / flash", math16, flash16))
    rows.append(("attention: bfloat16 math / float32 flash", math16, flash32))
    return rows


def new_shape_rows(repeats: int) -> list[tuple[str, float, float]]:
    weight = torch.randn(1536, 576).to(torch.bfloat16)
    seen = torch.randn(495, 576).to(torch.bfloat16)
    fresh = iter([torch.randn(m, 576).to(torch.bfloat16) for m in range(100, 100 + 4 * repeats)])
    new_ms = per_call_ms(lambda: F.linear(next(fresh), weight), repeats, warmup=0)
    return [("bfloat16 product: a new M / M seen before", new_ms,
             per_call_ms(lambda: F.linear(seen, weight), repeats))]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=49152, help="SmolLM2's vocabulary size")
    parser.add_argument("--tokens", type=int, default=512, help="one 512-token update pass")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    print(f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")
    both = (torch.float32, torch.bfloat16)
    rows = logprob_rows(args.tokens, args.vocab, args.repeats, both)
    rows += logprob_rows(64 * 64, 58, args.repeats, (torch.float32,))  # the embedded model's pass
    rows += attention_rows(args.repeats) + new_shape_rows(args.repeats)
    for name, ours, baseline in rows:
        print(f"{name:<50} {ours:9.2f} ms / {baseline:9.2f} ms = {ours / baseline:.2f}x")


if __name__ == "__main__":
    main()
