"""The log-prob of each chosen token from its logits, in one fused step forward and backward.

    log p_t = logits_t[token_t] / T - logsumexp(logits_t / T)

`log_softmax(logits / T).gather(token)` computes the same thing, but on a 49,152-entry vocabulary
it walks [tokens, V] many times: a float32 copy of bfloat16 logits, the division by T, the
log-softmax (whose float32 output autograd keeps for the backward), then in the backward a zeroed
[tokens, V] gradient for the gather, the scatter into it, the log-softmax's backward, the division's
backward and the cast back. Here the forward keeps only the logits and one log-sum-exp per token,
and the backward writes the gradient once:

    d log p_t / d logits_t = (onehot(token_t) - softmax(logits_t / T)) / T

in row chunks of at most CHUNK_ELEMENTS float32 values, so no full float32 [tokens, V] copy of
bfloat16 logits is ever made.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 2**22
"""Float32 values (rows x vocabulary) of one chunk: 16 MB, a 49k vocabulary's 85 rows; a scratch
buffer this size is reused across the chunks."""


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(logits / T)[token] for logits [..., V] and tokens [...]: log-probs [...] in
    float32 (float64 for float64 logits), with the gradient of the unfused expression; temperature
    0 is read as 1, as for greedy rollouts. Contiguous logits are read in place, others copied.

    Example: logits [[0, ln 3]], token 1, T 1 -> ln(3 / 4) = -0.2877; gradient w.r.t. the logits
    for an upstream 1: onehot - softmax = [0 - 1/4, 1 - 3/4] = [-0.25, 0.25].
    """
    temperature = 1.0 if temperature == 0 else float(temperature)
    return _TokenLogprobs.apply(logits, tokens, temperature)


def _rows(logits: torch.Tensor) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, logits.shape[-1]))


def _shifted(rows: torch.Tensor, shift: torch.Tensor, temperature: float, out: torch.Tensor):
    """(rows - shift[:, None]) / T into `out` (float32 scratch of rows' shape); a bfloat16 input
    is copied first: `torch.sub` of mixed dtypes runs several times slower than the copy and an
    in-place subtraction together."""
    if rows.dtype == out.dtype:
        torch.sub(rows, shift[:, None], out=out)
    else:
        out.copy_(rows).sub_(shift[:, None])
    return out if temperature == 1.0 else out.div_(temperature)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits: torch.Tensor, tokens: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        flat, flat_tokens = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1, 1)
        compute = torch.promote_types(logits.dtype, torch.float32)  # bfloat16 -> float32
        chosen = flat.gather(-1, flat_tokens).squeeze(-1).to(compute) / temperature
        lse = chosen.new_empty(flat.shape[0])
        step = _rows(flat)
        scratch = flat.new_empty((min(step, flat.shape[0]), flat.shape[1]), dtype=compute)
        for start in range(0, flat.shape[0], step):
            rows = flat[start : start + step]
            # logsumexp(x / T) = max / T + log sum exp((x - max) / T), by hand: torch.logsumexp
            # allocates its intermediates and runs several times slower on a CPU
            top = rows.amax(-1).to(compute)
            out = _shifted(rows, top, temperature, scratch[: rows.shape[0]])
            lse[start : start + step] = out.exp_().sum(-1).log_().add_(top / temperature)
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature = temperature
        return (chosen - lse).reshape(tokens.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        logits, tokens, lse = ctx.saved_tensors
        T = ctx.temperature
        flat, flat_tokens = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1, 1)
        g = grad_out.reshape(-1, 1).to(lse.dtype) / T
        grad = torch.empty(flat.shape, dtype=logits.dtype, device=logits.device)
        in_place = grad.dtype == lse.dtype  # else each chunk is computed in float32, then cast
        step = _rows(flat)
        scratch = (
            None
            if in_place
            else flat.new_empty((min(step, flat.shape[0]), flat.shape[1]), dtype=lse.dtype)
        )
        for start in range(0, flat.shape[0], step):
            rows = slice(start, min(start + step, flat.shape[0]))
            out = grad[rows] if in_place else scratch[: rows.stop - start]
            # softmax(x / T) = exp((x - T lse) / T), written straight into the gradient's rows
            probs = _shifted(flat[rows], lse[rows] * T, T, out).exp_()
            probs.mul_(-g[rows]).scatter_add_(-1, flat_tokens[rows], g[rows])
            if not in_place:
                grad[rows] = probs
        return grad.reshape(logits.shape), None, None
