"""Drawing the next token: top-k / top-p filtering and sampling with the log-prob convention.

Log-prob convention (the same as TRL's GRPOTrainer): log-probs are those of the sampled token under
the *temperature-scaled full* distribution, log softmax(logits / T); top-k / top-p truncation only
decides which token is drawn, it does not renormalise the log-prob. `temperature == 0` means greedy
decoding, and its log-probs are then those of the unscaled distribution (T = 1).
"""

from __future__ import annotations

import torch


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf (k <= 0: unchanged).

    Example: ``filter_top_k(tensor([[1., 3., 2.]]), 2) -> [[-inf, 3., 2.]]``.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability sum reaches p; -inf elsewhere.

    A token is dropped when the probability mass strictly before it (in sorted order) already
    reaches p, so the most likely token always survives. Example with probabilities
    [0.5, 0.3, 0.2] and p = 0.7: mass before each is [0, 0.5, 0.8], so the last one is dropped.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


BLOCK = 256
"""Vocabulary entries per block of the two-level draw (`draw_categorical`)."""


def draw_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of [b, V] non-negative weights, drawn with probability probs / row sum.

    Inverse transform sampling: with cdf = cumsum(probs) (float64) and one uniform u per row,
    token = the first index i with cdf_i > u * cdf_V. A token of probability 0 (removed by top-k /
    top-p) has cdf_i == cdf_(i-1) and is never drawn. One uniform per row instead of
    `torch.multinomial`'s one exponential per vocabulary entry, which on CPU is a large share of
    a real model's decode step (benchmarks/README.md has the profile). Same distribution,
    different random stream: a seed draws other tokens than `torch.multinomial` did.

    A large vocabulary is searched in two levels, the same token for the same u: the cdf of the
    sums of blocks of `BLOCK` entries picks the block, the cdf inside that block the entry. That
    reads the [b, V] weights once (float32 block sums) where a full float64 cumsum writes two [b, V]
    copies: on a 49k vocabulary the cumsum was the costliest operator of the draw.

    Example: probs [[0.2, 0.0, 0.8]] -> cdf [0.2, 0.2, 1.0]; u = 0.1 draws 0, u = 0.5 draws 2,
    and index 1 never comes out.
    """
    rows, vocab = probs.shape
    u = torch.rand(rows, 1, dtype=torch.float64, device=probs.device, generator=generator)
    if vocab <= 4 * BLOCK:
        cdf = probs.double().cumsum(-1)
        tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
        return tokens.clamp_(max=vocab - 1).squeeze(-1)
    padded = torch.nn.functional.pad(probs, (0, -vocab % BLOCK)) if vocab % BLOCK else probs
    blocks = padded.view(rows, -1, BLOCK)
    block_cdf = blocks.sum(-1).double().cumsum(-1)  # [b, blocks]
    target = u * block_cdf[:, -1:]
    block = torch.searchsorted(block_cdf, target, right=True).clamp_(max=blocks.shape[1] - 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    picked = blocks.gather(1, block[..., None].expand(rows, 1, BLOCK)).squeeze(1)
    inner = picked.double().cumsum(-1)  # [b, BLOCK]
    # Kept below the block's total, so that float rounding between the two sums can never land
    # past the block's last entry of non-zero probability.
    rest = torch.minimum(target - before, inner[:, -1:] * (1 - 1e-12))
    index = torch.searchsorted(inner, rest, right=True).clamp_(max=BLOCK - 1)
    return (block * BLOCK + index).clamp_(max=vocab - 1).squeeze(-1)


def sample_next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    return_entropy: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Draw one token per row from [b, V] logits; return (tokens [b], their log-probs [b]), and
    with `return_entropy` also the entropy [b] of the distribution the log-probs come from.

    The log-prob is log softmax(logits / T)[token], before top-k / top-p (see the module docstring);
    temperature 0 is greedy (argmax) with T = 1 log-probs. Entropy: -sum_v p_v log p_v of that
    same distribution (what the loss forward would report for the token, at no extra forward).
    """
    scaled = logits.float()
    if temperature not in (0, 1):  # x / 1 == x exactly; a copy .float() made is scaled in place
        scaled = scaled / temperature if scaled is logits else scaled.div_(temperature)
    logp = scaled.log_softmax(-1)
    full_probs = logp.exp()
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        probs = full_probs  # the common case: no second softmax
        if top_k > 0 or top_p < 1.0:
            probs = filter_top_p(filter_top_k(scaled, top_k), top_p).softmax(-1)
        tokens = draw_categorical(probs, generator)
    token_logp = logp.gather(-1, tokens[:, None]).squeeze(-1)
    if return_entropy:
        return tokens, token_logp, _entropy(full_probs, logp)
    return tokens, token_logp


def _entropy(probs: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """-sum_v p_v log p_v per row; a row with a -inf log-prob (p = 0 there, 0 * -inf = NaN in the
    product) is summed again with those terms taken as 0 (rare: a pass less in the common case)."""
    entropy = -(probs * logp).sum(-1)
    if not entropy.isfinite().all():
        entropy = -(probs * logp).nan_to_num().sum(-1)
    return entropy
