"""Building blocks of the rollout loop: token filtering and sampling, padding, positions, KV cache.

Log-prob convention (the same as TRL's GRPOTrainer): log-probs are those of the sampled token under
the *temperature-scaled full* distribution, log softmax(logits / T); top-k / top-p truncation only
decides which token is drawn, it does not renormalise the log-prob. `temperature == 0` means greedy
decoding, and its log-probs are then those of the unscaled distribution (T = 1).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
from transformers.cache_utils import DynamicLayer


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
    logits = logits.float()
    scaled = logits if temperature == 0 else logits / temperature
    logp = scaled.log_softmax(-1)
    full_probs = logp.exp()
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        probs = full_probs  # the common case: no second softmax
        if top_k > 0 or top_p < 1.0:
            probs = filter_top_p(filter_top_k(scaled, top_k), top_p).softmax(-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    token_logp = logp.gather(-1, tokens[:, None]).squeeze(-1)
    if return_entropy:
        return tokens, token_logp, -(full_probs * logp).nan_to_num().sum(-1)
    return tokens, token_logp


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding gets 0).

    Example: mask [[0, 1, 1], [1, 1, 1]] -> [[0, 0, 1], [0, 1, 2]].
    """
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (ids [B, P], mask [B, P]). Example: [[5], [6, 7]] -> [[p, 5], [6, 7]]."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


def stop_token_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """EOS ids that end a completion: the tokenizer's EOS plus the model's generation-config EOS."""
    ids = {tokenizer.eos_token_id}
    gen_cfg = getattr(model, "generation_config", None)
    gen_eos = getattr(gen_cfg, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    ids.discard(None)
    if not ids:
        raise ValueError("rollout: the tokenizer has no eos_token; set one so completions can end")
    return sorted(ids)


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Switch dropout off for the block and restore the previous train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def cache_kwarg(model: torch.nn.Module) -> str:
    """transformers 5.x calls the KV cache argument `cache`; earlier ones `past_key_values`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer that writes new keys/values into spare room instead of `torch.cat`-ing.

    The stock layer copies its whole cache every step (O(length) per token); this one copies only
    when finished rows are selected out.
    """

    def __init__(self, layer: DynamicLayer, extra_tokens: int):
        super().__init__()
        batch, heads, length, dim = layer.keys.shape
        self.buffers = [
            t.new_empty(batch, heads, length + extra_tokens, t.shape[-1])
            for t in (layer.keys, layer.values)
        ]
        self.buffers[0][:, :, :length] = layer.keys
        self.buffers[1][:, :, :length] = layer.values
        self.length, self.device, self.is_initialized = length, layer.device, True
        self._set_views()

    def _set_views(self) -> None:
        self.keys, self.values = (b[:, :, : self.length] for b in self.buffers)

    def update(self, key_states, value_states, *args, **kwargs):
        new = key_states.shape[-2]
        self.buffers[0][:, :, self.length : self.length + new] = key_states
        self.buffers[1][:, :, self.length : self.length + new] = value_states
        self.length += new
        self._set_views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        # Copy only the filled part; the spare room stays uninitialised.
        new_buffers = [b.new_empty(len(indices), *b.shape[1:]) for b in self.buffers]
        for new, old in zip(new_buffers, self.buffers):
            new[:, :, : self.length] = old[:, :, : self.length].index_select(0, indices)
        self.buffers = new_buffers
        self._set_views()


def preallocate(cache, extra_tokens: int) -> None:
    """Swap the cache's plain DynamicLayers for preallocated ones (others stay as they are)."""
    layers = getattr(cache, "layers", None)
    for i, layer in enumerate(layers or []):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.dim() == 4:
            layers[i] = PreallocatedLayer(layer, extra_tokens)
