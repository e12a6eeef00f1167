"""A lean one-token decode step for Llama-family causal LMs (Llama, Qwen2, Qwen3, Mistral).

The transformers forward is written for every case: per call it builds an attention mask, picks an
attention backend, records outputs and goes through about ten module wrappers per layer. For one
new token per row on a small model that bookkeeping costs as much as the arithmetic. `FastDecoder`
runs the same decoder layers with the model's own modules and weights (so LoRA adapters apply)
and nothing else:

    x = embed(token)
    per layer:  h = norm1(x);  q, k, v = proj(h);  (Qwen3: per-head q/k norms);  rotary(q, k)
                append k, v to the KV cache;  x = x + o_proj(attention(q, cache))
                x = x + mlp(norm2(x))
    logits = lm_head(norm(x))

Small plain models get q/k/v and gate/up fused into one matrix product each (copies made once per
rollout, see FUSE_MAX_BYTES). LoRA models get the same fused products with the adapters merged in,
W + scale * B A, computed once per rollout (see MERGE_MAX_BYTES): one matrix product per projection
instead of peft's three plus its module overhead, with the same logits up to float rounding.
Anything outside this family or with sliding windows, a non-SiLU MLP or tensor-parallel weights
falls back to the transformers forward.
tests/test_fast_decode.py checks the logits against that forward for each supported architecture.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FAMILY = ("llama", "qwen2", "qwen3", "mistral")
FUSE_MAX_BYTES = 64 * 2**20
"""Fuse a plain model's projection weights only when all of them together are below this size: the
fused copies cost that memory again, and only small models, whose decode is overhead-bound, gain."""
MERGE_MAX_BYTES = 2**31
"""Merge LoRA adapters into copies of the projection weights for the rollout only when those copies
take at most this much memory (held during the rollout only, freed after it)."""


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supported(model: torch.nn.Module) -> bool:
    """Whether `FastDecoder` computes exactly what this model's forward computes."""
    cfg = getattr(_base(model), "config", None)
    if cfg is None or cfg.model_type not in FAMILY or cfg.hidden_act != "silu":
        return False
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return False
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"]
    windowed = getattr(cfg, "sliding_window", None) is not None and getattr(
        cfg, "use_sliding_window", cfg.model_type == "mistral"
    )
    decoder = _base(model).get_decoder()
    shaped = all(
        hasattr(decoder, name) for name in ("embed_tokens", "rotary_emb", "layers", "norm")
    )
    return shaped and set(layer_types) == {"full_attention"} and not windowed


def _projections(layer: torch.nn.Module) -> list[torch.nn.Module]:
    """q, k, v, o, gate, up, down: every matrix product of a decoder layer."""
    a, mlp = layer.self_attn, layer.mlp
    return [a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]


def _linear(proj: torch.nn.Module) -> torch.nn.Module:
    """The plain Linear doing a projection's product (peft wraps it as `base_layer`)."""
    return getattr(proj, "base_layer", proj)


def _weight_bytes(layers) -> int:
    weights = [_linear(p).weight for layer in layers for p in _projections(layer)]
    return sum(w.numel() * w.element_size() for w in weights)


def _is_lora(proj: torch.nn.Module) -> bool:
    return hasattr(proj, "lora_A") and hasattr(proj, "get_delta_weight")


def _effective(proj: torch.nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """(weight, bias) that one F.linear needs to compute `proj`: a plain Linear's own, or a peft
    LoRA Linear's base weight + its active adapters' scale * B A (LoRA dropout is off in eval
    mode); None for anything else (DoRA, LoRA biases, merged or quantised layers)."""
    if type(proj) is torch.nn.Linear:
        return proj.weight, proj.bias
    base = getattr(proj, "base_layer", None)
    if not _is_lora(proj) or type(base) is not torch.nn.Linear or proj.merged:
        return None
    if proj.disable_adapters:
        return base.weight, base.bias
    adapters = [name for name in proj.active_adapters if name in proj.lora_A]
    special = [getattr(proj, attr, {}).get(name) for attr in ("use_dora", "lora_bias")
               for name in adapters]  # fmt: skip
    if any(special):
        return None
    weight = base.weight
    for name in adapters:
        weight = weight + proj.get_delta_weight(name)
    return weight, base.bias


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding, rotate-half convention: x * cos + [-x2, x1] * sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class FastDecoder:
    """One decode step of a supported model over a transformers KV cache (see module docstring).

    Build it once per rollout, after the prefill; `step` appends to the cache's layers the same way
    the transformers forward would, so the cache's `batch_select_indices` keeps working.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        base = _base(model)
        self.decoder, self.lm_head = base.get_decoder(), base.get_output_embeddings()
        attn = self.decoder.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.heads = base.config.num_attention_heads
        self.kv_heads = getattr(base.config, "num_key_value_heads", None) or self.heads
        layers = self.decoder.layers
        lora = any(_is_lora(p) for layer in layers for p in _projections(layer))
        size = _weight_bytes(layers)
        worth = size <= MERGE_MAX_BYTES if lora else size <= FUSE_MAX_BYTES
        self.fused = [self._fuse(layer) for layer in layers] if worth else [None] * len(layers)
        # passed only when needed: torch.compile cannot trace sdpa's enable_gqa=False on CPU
        self.gqa = {"enable_gqa": True} if self.heads != self.kv_heads else {}

    @staticmethod
    def _fuse(layer: torch.nn.Module) -> tuple | None:
        """(qkv weight, qkv bias, o weight, o bias, gate-up weight, down weight) of a layer whose
        projections are plain or LoRA Linears (adapters merged), else None."""
        parts = [_effective(p) for p in _projections(layer)]
        if any(p is None for p in parts):
            return None
        (q, k, v, o, gate, up, down) = parts
        mixed_qkv_bias = len({b is None for b in (q[1], k[1], v[1])}) > 1
        if mixed_qkv_bias or any(b is not None for b in (gate[1], up[1], down[1])):
            return None
        qkv_bias = None if q[1] is None else torch.cat([q[1], k[1], v[1]])
        gate_up = torch.cat([gate[0], up[0]])
        return torch.cat([q[0], k[0], v[0]]), qkv_bias, o[0], o[1], gate_up, down[0]

    def step(self, cache, tokens: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        """Logits [b, V] after appending one token per row. tokens, positions: [b]; mask: [b, L]
        attention mask over the cache including this token (1 = attend)."""
        b, d = tokens.shape[0], self.head_dim
        x = self.decoder.embed_tokens(tokens)
        cos, sin = self.decoder.rotary_emb(x, positions[:, None])  # [b, 1, d]: broadcast on heads
        # additive mask, built once per step (a boolean one is converted in every layer's sdpa)
        mask_bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        mask_bias = mask_bias.masked_fill(mask == 0, float("-inf"))[:, None, None, :]
        q_heads, kv_width = self.heads, self.kv_heads * d
        for layer, kv_cache, fused in zip(self.decoder.layers, cache.layers, self.fused):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            if fused is None:
                q, k, v = a.q_proj(h), a.k_proj(h), a.v_proj(h)
                qk = torch.cat([q, k], dim=-1)
            else:
                qk, v = F.linear(h, fused[0], fused[1]).split(
                    [q_heads * d + kv_width, kv_width], -1
                )
            qk, v = qk.reshape(b, -1, d), v.view(b, -1, d)
            if hasattr(a, "q_norm"):  # Qwen3: RMSNorm over each head before the rotary embedding
                qk = torch.cat([a.q_norm(qk[:, :q_heads]), a.k_norm(qk[:, q_heads:])], dim=1)
            q, k = _rotate(qk, cos, sin).split([q_heads, self.kv_heads], dim=1)
            keys, values = kv_cache.update(k[:, :, None], v[:, :, None])
            attended = F.scaled_dot_product_attention(
                q[:, :, None],
                keys,
                values,
                attn_mask=mask_bias,
                scale=self.scaling,
                **self.gqa,
            )
            if fused is None:
                x = x + a.o_proj(attended.reshape(b, -1))
            else:
                x = x + F.linear(attended.reshape(b, -1), fused[2], fused[3])
            h = layer.post_attention_layernorm(x)
            if fused is None:
                x = x + layer.mlp(h)
            else:
                gate, up = F.linear(h, fused[4]).chunk(2, dim=-1)
                x = x + F.linear(F.silu(gate) * up, fused[5])
        return self.lm_head(self.decoder.norm(x))
