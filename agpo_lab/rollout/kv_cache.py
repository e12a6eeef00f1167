"""The KV caches of the decoding loop: transformers' cache layers, preallocated so that a decode
step writes its keys in place instead of re-concatenating the whole cache (`preallocate`), and
`DecodeCache`, the fast decode path's own cache (plain buffers, no per-call bookkeeping)."""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import DynamicLayer


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


class DecodeCache:
    """The fast decode path's own KV cache (`fast_decode.FastDecoder`): per layer, keys and values
    [b, kv_heads, capacity, head_dim], allocated once for the whole rollout.

    The decoder writes new keys and values at position `length` of each layer's buffers and reads
    the filled part as views, with none of the transformers cache layers' per-call bookkeeping;
    `batch_select_indices` keeps the listed rows, copying only the filled part.
    """

    def __init__(
        self,
        layers: int,
        batch: int,
        kv_heads: int,
        capacity: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.length = 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_empty(len(indices), *old.shape[1:])
                new[:, :, : self.length] = old[:, :, : self.length].index_select(0, indices)
                store[i] = new
