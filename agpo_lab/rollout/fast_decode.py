"""A lean prefill and one-token decode step for Llama-family causal LMs (Llama, Qwen2, Qwen3,
Mistral), over their own KV cache.

The transformers forward is written for every case: per call it builds an attention mask, picks an
attention backend, records outputs and goes through about ten module wrappers per layer. For one
new token per row on a small model that bookkeeping costs as much as the arithmetic. `FastDecoder`
runs the same decoder layers with the model's own weights and nothing else, for p new tokens per
row (the prompts' prefill, then p = 1 per decode step):

    x = embed(token)
    per layer:  h = norm1(x);  q, k, v = proj(h);  (Qwen3: per-head q/k norms);  rotary(q, k)
                write k, v into the cache;  x = x + o_proj(softmax(q K^T * scale + mask) V)
                x = x + down(silu(gate(h2)) * up(h2)),  h2 = norm2(x)
    logits = lm_head(norm(x))

Where it keeps the operator count per token low (the decode of a small model is bound by it):
- the KV cache is `kv_cache.DecodeCache`, written in place, and attention for one query is two
  batched products, q K^T with the mask added in the same call and p V (grouped-query heads share
  their key/value head without a copy): on CPU in float32 a fraction of SDPA's cost for a single
  query; in bfloat16 the products would copy the cache first, and SDPA's fused kernel costs less;
- q/k/v and gate/up are fused into one matrix product each, with the RMSNorm weights folded into
  their columns: g * x / sqrt(mean(x^2) + eps) = (g sqrt(D)) * x / sqrt(sum(x^2) + D eps), so
  W diag(g sqrt(D)) is stored and a norm is four small operators (`_unit_scale`), where the
  RMSNorm module and `F.rms_norm` take several more (dtype casts, a mean, copies);
- in bfloat16 on a CPU the products read weights packed once per rollout for oneDNN
  (`packed_weights`), where `F.linear` would lay each weight out again in every call;
- residual additions ride on the products (`addmm`), and rotate-half is one `roll` against a
  sign-folded sine: rotate_half(x) * sin = roll(x, d/2) * [-sin1, sin2].
Fused copies are made once per rollout for small plain models (FUSE_MAX_BYTES); LoRA models get
them with the adapters merged in, W + scale * B A (MERGE_MAX_BYTES): one product per projection
instead of peft's three. Other models use their own modules for the products and norms.
Anything outside this family or with sliding windows, a non-SiLU MLP or tensor-parallel weights
falls back to the transformers forward. The folded and fused products round differently from the
transformers forward, so logits agree to float rounding, not bit for bit;
tests/test_fast_decode.py checks them against that forward for each supported architecture.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from agpo_lab.rollout.kv_cache import DecodeCache
from agpo_lab.rollout.packed_weights import linear, linear_add, pack

FAMILY = ("llama", "qwen2", "qwen3", "mistral")
FUSE_MAX_BYTES = 64 * 2**20
"""Fuse a plain model's projection weights only when all of them together are below this size: the
fused copies cost that memory again, and only small models, whose decode is overhead-bound, gain.
The same bound decides whether the LM head gets a copy with the final norm's weight folded in."""
MERGE_MAX_BYTES = 2**31
"""Merge LoRA adapters into copies of the projection weights for the rollout only when those copies
take at most this much memory (held during the rollout only, freed after it)."""


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supported(model: torch.nn.Module) -> bool:
    """Whether `FastDecoder` computes what this model's forward computes (up to float rounding)."""
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


def _norm_parts(norm: torch.nn.Module) -> tuple[Tensor, float] | None:
    """(weight * sqrt(D), D * eps) of a plain RMSNorm, weight * x / sqrt(mean(x^2) + eps), so that
    norm(x) = weight * sqrt(D) * _unit_scale(x, D * eps); None for other norms."""
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if weight is None or eps is None or weight.dim() != 1:
        return None
    return weight * weight.shape[0] ** 0.5, weight.shape[0] * eps


def _unit_scale(x: Tensor, sum_eps: float) -> Tensor:
    """x / sqrt(sum(x^2) + sum_eps) over the last dimension (an RMSNorm without its sqrt(D) and
    weight, which `_norm_parts` folds into the next product's weight).

    Example: x = [3, 4], sum_eps = 0 -> [0.6, 0.8].
    """
    x32 = x.float()  # the sum of squares in float32, as the RMSNorm modules compute it
    return x * (x32 * x32).sum(-1, keepdim=True).add_(sum_eps).rsqrt_().to(x.dtype)


class FusedLayer(NamedTuple):
    """A decoder layer's products, fused and with its norm weights folded in (see module docstring)."""

    qkv_weight: Tensor
    """[(heads + 2 kv_heads) * head_dim, hidden], input norm's weight folded into the columns."""
    qkv_bias: Tensor | None
    input_eps: float
    """D * the input norm's eps (see `_norm_parts`)."""
    o_weight: Tensor
    """[hidden, heads * head_dim]: o_proj's weight."""
    o_bias: Tensor | None
    gate_up_weight: Tensor
    """[2 * intermediate, hidden], post-attention norm's weight folded into the columns."""
    post_eps: float
    """D * the post-attention norm's eps."""
    down_weight: Tensor
    """[hidden, intermediate]: down_proj's weight."""


def fuse_layer(layer: torch.nn.Module, dtype: torch.dtype | None = None) -> FusedLayer | None:
    """The layer's `FusedLayer` when its projections are plain or LoRA Linears (adapters merged)
    and its norms plain RMSNorms, else None. `dtype`: the fused copies' dtype (folded in the
    weights' own precision, then cast once); None keeps the weights' dtype."""
    parts = [_effective(p) for p in _projections(layer)]
    norms = [_norm_parts(layer.input_layernorm), _norm_parts(layer.post_attention_layernorm)]
    if any(p is None for p in parts) or any(n is None for n in norms):
        return None
    (q, k, v, o, gate, up, down), ((g_in, eps_in), (g_post, eps_post)) = parts, norms
    mixed_qkv_bias = len({b is None for b in (q[1], k[1], v[1])}) > 1
    if mixed_qkv_bias or any(b is not None for b in (gate[1], up[1], down[1])):
        return None
    cast = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.to(dtype))
    return FusedLayer(
        qkv_weight=cast(torch.cat([q[0], k[0], v[0]]) * g_in),
        qkv_bias=cast(None if q[1] is None else torch.cat([q[1], k[1], v[1]])),
        input_eps=eps_in,
        o_weight=cast(o[0]),
        o_bias=cast(o[1]),
        gate_up_weight=cast(torch.cat([gate[0], up[0]]) * g_post),
        post_eps=eps_post,
        down_weight=cast(down[0]),
    )


def _packed(fused: FusedLayer | None) -> FusedLayer | None:
    """The layer's weights packed for oneDNN (`packed_weights.pack`)."""
    if fused is None:
        return None
    names = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")
    return fused._replace(**{name: pack(getattr(fused, name)) for name in names})


class CannotLower(ValueError):
    """`FastDecoder` cannot copy this model's weights to the lower dtype asked for (a layer, norm
    or LM head it does not fuse); the decoding loop then autocasts the transformers forward."""


@functools.cache
def compiled(function):
    """`function` compiled once per process; dynamic shapes let one graph serve every batch size
    and cache length (a batch of one row would be specialised and recompiled: run it eagerly)."""
    return torch.compile(function, dynamic=True)


class FastDecoder:
    """The prefill and the one-token decode steps of a supported model over a `DecodeCache` (see
    the module docstring). Build it once per rollout (it reads the adapters' current state):

        logits, cache = decoder.prefill(prompt_ids, prompt_mask, positions, extra_tokens)
        logits = decoder.step(cache, tokens, positions, mask)   # once per new token
    """

    def __init__(
        self, model: torch.nn.Module, compile: bool = False, dtype: torch.dtype | None = None
    ) -> None:
        base = _base(model)
        self.decoder, self.lm_head = base.get_decoder(), base.get_output_embeddings()
        attn = self.decoder.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.heads = base.config.num_attention_heads
        self.kv_heads = getattr(base.config, "num_key_value_heads", None) or self.heads
        self.compile = compile
        layers = self.decoder.layers
        own_dtype = _linear(attn.o_proj).weight.dtype
        lowered = dtype is not None and dtype != own_dtype
        self.dtype = dtype if lowered else own_dtype
        """What the rollout computes in: the weights' own dtype, or the lower one asked for."""
        on_cpu = attn.o_proj.weight.device.type == "cpu"
        self.fused_attention = on_cpu and self.dtype in (torch.bfloat16, torch.float16)
        """Attention through SDPA's fused kernel, which reads the cache's views as they are: on a
        CPU in bfloat16 the two batched products would first copy the filled part of the cache.
        In float32 the products take the views, and cost less than SDPA for one query."""
        lora = any(_is_lora(p) for layer in layers for p in _projections(layer))
        size = _weight_bytes(layers)
        worth = size <= MERGE_MAX_BYTES if lora or lowered else size <= FUSE_MAX_BYTES
        # In the compute dtype even when not lowered: a bfloat16 base's merged LoRA delta is float32.
        fused = [fuse_layer(layer, self.dtype) for layer in layers] if worth else None
        self.fused = fused or [None] * len(layers)
        self.head = None
        """(LM head weight with the final norm's weight folded in, eps, bias), for a small head."""
        norm, head = _norm_parts(self.decoder.norm), self.lm_head
        plain_head = type(head) is torch.nn.Linear
        if norm is not None and plain_head and (lowered or head.weight.nbytes <= FUSE_MAX_BYTES):
            bias = None if head.bias is None else head.bias.to(self.dtype)
            self.head = ((head.weight * norm[0]).to(self.dtype), norm[1], bias)
        if lowered and (None in self.fused or self.head is None):
            raise CannotLower(f"a layer, norm or LM head of this model cannot be copied to {dtype}")
        if not compile and self.dtype is torch.bfloat16:
            # On a CPU the products read weights laid out once for oneDNN (`pack` leaves other
            # devices' alone; these copies are made per rollout anyway). torch.compile gets the
            # plain ones, which its graphs can take.
            self.fused = [_packed(f) for f in self.fused]
            if self.head is not None:
                self.head = (pack(self.head[0]), *self.head[1:])
        half = attn.o_proj.weight.new_ones(self.head_dim // 2, dtype=self.dtype)
        self.rotate_sign = torch.cat([-half, half])
        """[-1, ..., 1, ...]: rotate_half(x) * sin == roll(x, d / 2) * (sin * rotate_sign)."""

    def prefill(
        self, prompt_ids: Tensor, prompt_mask: Tensor, positions: Tensor, extra_tokens: int
    ) -> tuple[Tensor, DecodeCache]:
        """(logits [b, V] at each row's last prompt token, a `DecodeCache` holding the prompts with
        room for `extra_tokens` more). prompt_ids, prompt_mask, positions: [b, P], left-padded."""
        (b, p), dtype, device = prompt_ids.shape, self.rotate_sign.dtype, prompt_ids.device
        cache = DecodeCache(len(self.fused), b, self.kv_heads, p + extra_tokens, self.head_dim,
                            dtype=dtype, device=device)  # fmt: skip
        # A query sees the real keys up to its own position; a padding query sees only itself
        # (its output is never used, but a row of -inf scores would turn into NaN).
        causal = torch.ones(p, p, dtype=torch.bool, device=device).tril()
        itself = torch.eye(p, dtype=torch.bool, device=device)
        seen = causal & prompt_mask[:, None, :].bool() | itself
        bias = torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill(~seen, -torch.inf)
        logits = _forward(self, cache, prompt_ids, positions, bias)
        cache.length = p
        return logits, cache

    def step(self, cache: DecodeCache, tokens: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        """Logits [b, V] after appending one token per row at position `cache.length`. tokens,
        positions: [b]; mask: [b, cache.length + 1] attention mask including this token (1 =
        attend)."""
        run = compiled(_decode_step) if self.compile and len(tokens) > 1 else _decode_step
        logits = run(self, cache, tokens, positions, mask)
        cache.length = mask.shape[1]
        return logits


def _decode_step(
    dec: FastDecoder, cache: DecodeCache, tokens: Tensor, positions: Tensor, mask: Tensor
) -> Tensor:
    """`FastDecoder.step` without its bookkeeping (no Python state changes: it may be compiled)."""
    bias = torch.zeros(mask.shape, dtype=dec.rotate_sign.dtype, device=mask.device)
    bias = bias.masked_fill(mask == 0, -torch.inf)[:, None, :]  # [b, 1 query, keys]
    return _forward(dec, cache, tokens[:, None], positions[:, None], bias)


def _attend(dec: FastDecoder, q: Tensor, keys: Tensor, values: Tensor, bias: Tensor) -> Tensor:
    """softmax(q K^T * scale + bias) V for every head, as [b * p, heads * d]. q: [b, heads, p, d];
    keys, values: [b, kv_heads, L, d], views of the cache (a group of heads shares a key/value
    head); bias: as `_forward` lays it out for `dec.fused_attention`."""
    b, heads, p, d = q.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    if dec.fused_attention:
        attended = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=bias, scale=dec.scaling, enable_gqa=kv_heads != heads
        )  # [b, heads, p, d]
        return attended.transpose(1, 2).reshape(b * p, heads * d)
    q = q.reshape(b * kv_heads, heads // kv_heads * p, d)  # a group's heads share a kv head
    keys, values = (t.reshape(-1, length, d) for t in (keys, values))
    scores = torch.baddbmm(bias, q, keys.transpose(1, 2), alpha=dec.scaling)
    # softmax in float32 whatever the compute dtype, as the attention backends do
    probs = scores.softmax(-1, dtype=torch.float32).to(values.dtype)
    attended = torch.bmm(probs, values)  # [b * kv_heads, group * p, d]
    return attended.view(b, heads, p, d).transpose(1, 2).reshape(b * p, heads * d)


def _forward(
    dec: FastDecoder, cache: DecodeCache, tokens: Tensor, positions: Tensor, bias: Tensor
) -> Tensor:
    """Logits [b, V] at the last of p new tokens per row, whose keys and values are written to the
    cache at columns [L - p, L). tokens, positions: [b, p]; bias: [b, p, L] additive attention mask
    (0 = attend, -inf = not) over the cache's first L columns."""
    (b, p), length, d = tokens.shape, bias.shape[-1], dec.head_dim
    heads, kv_heads = dec.heads, dec.kv_heads
    group, start = heads // kv_heads, length - p
    x = dec.decoder.embed_tokens(tokens).view(b * p, -1).to(dec.dtype)
    cos, sin = dec.decoder.rotary_emb(x, positions)  # [b, p, d]
    cos, sin = cos[:, None], (sin * dec.rotate_sign)[:, None]  # broadcast over heads
    if dec.fused_attention:  # [b, 1 (every head), p, length]
        bias = bias[:, None]
    else:  # laid out as the scores: [b * kv_heads, group * p queries, length keys]
        bias = bias[:, None, None].expand(b, kv_heads, group, p, length)
        bias = bias.reshape(-1, group * p, length)
    for i, (layer, fused) in enumerate(zip(dec.decoder.layers, dec.fused)):
        a = layer.self_attn
        if fused is None:
            h = layer.input_layernorm(x)
            qk, v = torch.cat([a.q_proj(h), a.k_proj(h)], dim=-1), a.v_proj(h)
        else:
            qkv = linear(_unit_scale(x, fused.input_eps), fused.qkv_weight, fused.qkv_bias)
            qk, v = qkv.split([(heads + kv_heads) * d, kv_heads * d], -1)
        qk = qk.reshape(b, p, heads + kv_heads, d).transpose(1, 2)  # [b, heads, p, d]
        if hasattr(a, "q_norm"):  # Qwen3: RMSNorm over each head before the rotary embedding
            qk = torch.cat([a.q_norm(qk[:, :heads]), a.k_norm(qk[:, heads:])], dim=1).to(x.dtype)
        qk = torch.addcmul(qk * cos, qk.roll(d // 2, -1), sin)
        keys, values = cache.keys[i], cache.values[i]
        keys.narrow(2, start, p).copy_(qk[:, heads:])
        values.narrow(2, start, p).copy_(v.reshape(b, p, kv_heads, d).transpose(1, 2))
        keys, values = keys[:, :, :length], values[:, :, :length]
        attended = _attend(dec, qk[:, :heads], keys, values, bias)
        if fused is None:
            x = x + a.o_proj(attended)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            continue
        x = linear_add(x, attended, fused.o_weight, fused.o_bias)
        gate, up = linear(_unit_scale(x, fused.post_eps), fused.gate_up_weight).chunk(2, dim=-1)
        x = linear_add(x, F.silu(gate) * up, fused.down_weight)
    x = x.view(b, p, -1)[:, -1]
    if dec.head is None:
        return dec.lm_head(dec.decoder.norm(x))
    weight, sum_eps, bias = dec.head
    return linear(_unit_scale(x, sum_eps), weight, bias)
