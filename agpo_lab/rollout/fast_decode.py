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

Plain (non-LoRA) models get q/k/v and gate/up fused into one matrix product each (copies made once
per rollout, when they are small, see FUSE_MAX_BYTES). Anything outside this family or with sliding
windows, a non-SiLU MLP or tensor-parallel weights falls back to the transformers forward.
tests/test_fast_decode.py checks the logits against that forward for each supported architecture.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FAMILY = ("llama", "qwen2", "qwen3", "mistral")
FUSE_MAX_BYTES = 64 * 2**20
"""Fuse projection weights only when all of them together are below this size: the fused copies
cost that memory again, and only small models, whose decode is overhead-bound, gain from them."""


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


def _small(layers) -> bool:
    projections = [p for layer in layers for p in (*_projections(layer), layer.mlp.down_proj)]
    return sum(p.weight.numel() * p.weight.element_size() for p in projections) <= FUSE_MAX_BYTES


def _projections(layer: torch.nn.Module) -> list[torch.nn.Module]:
    a, mlp = layer.self_attn, layer.mlp
    return [a.q_proj, a.k_proj, a.v_proj, mlp.gate_proj, mlp.up_proj]


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
        self.fused = (
            [self._fuse(layer) for layer in layers] if _small(layers) else [None] * len(layers)
        )
        # passed only when needed: torch.compile cannot trace sdpa's enable_gqa=False on CPU
        self.gqa = {"enable_gqa": True} if self.heads != self.kv_heads else {}

    @staticmethod
    def _fuse(layer: torch.nn.Module) -> tuple | None:
        """(qkv weight, qkv bias, gate-up weight) of a layer with plain Linear projections."""
        a, mlp, parts = layer.self_attn, layer.mlp, _projections(layer)
        if any(type(p) is not torch.nn.Linear for p in parts) or mlp.gate_proj.bias is not None:
            return None
        qkv = [a.q_proj, a.k_proj, a.v_proj]
        bias = None if a.q_proj.bias is None else torch.cat([p.bias for p in qkv])
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        return torch.cat([p.weight for p in qkv]), bias, gate_up

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
            x = x + a.o_proj(attended.reshape(b, -1))
            h = layer.post_attention_layernorm(x)
            if fused is None:
                x = x + layer.mlp(h)
            else:
                gate, up = F.linear(h, fused[2]).chunk(2, dim=-1)
                x = x + layer.mlp.down_proj(F.silu(gate) * up)
        return self.lm_head(self.decoder.norm(x))
