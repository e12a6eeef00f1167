"""Batched sampling with a KV cache, per-token log-probs and truncation flags.

`generate` is a small decoding loop that calls the model's forward directly: prefill the left-padded
prompts once, then one token per step from the KV cache. Rows that have emitted EOS leave the active
batch (their cache rows are selected out), so the late tokens of long completions cost only the
unfinished rows; plain transformers cache layers are swapped for preallocated ones so a step writes
its keys in place instead of re-concatenating the cache. `completion_logprobs` recomputes the same
log-probs in one forward pass for the loss.

Log-prob convention (the same as TRL's GRPOTrainer): log-probs are those of the sampled token under
the *temperature-scaled full* distribution, log softmax(logits / T); top-k / top-p truncation only
decides which token is drawn, it does not renormalise the log-prob. `temperature == 0` means greedy
decoding, and its log-probs are then those of the unscaled distribution (T = 1).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer


@dataclass
class RolloutConfig:
    """Sampling settings for one batch of rollouts."""

    group_size: int = 8
    """G: completions per prompt. The trainer repeats each prompt G times; `generate` does not."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding (argmax, log-probs at T = 1)."""
    top_p: float = 1.0
    """Nucleus sampling: draw from the smallest set of tokens whose probability reaches top_p; 1 = off."""
    top_k: int = 0
    """Draw only from the k most likely tokens; 0 = off; 1 = greedy with T-scaled log-probs."""
    max_new_tokens: int = 96
    """Most tokens generated per completion (EOS included); a row that reaches it is `truncated`."""


@dataclass
class Rollout:
    """One batch of sampled completions, ready for reward and loss (B rows, all on the model's device)."""

    prompt_ids: torch.Tensor
    """[B, P] long, left-padded with the pad id."""
    prompt_mask: torch.Tensor
    """[B, P] long, 1 on real prompt tokens."""
    completion_ids: torch.Tensor
    """[B, C] long, right-padded with the pad id; C = the longest completion in the batch."""
    completion_mask: torch.Tensor
    """[B, C] float, 1.0 on generated tokens (EOS included), 0.0 on padding."""
    logprobs: torch.Tensor
    """[B, C] float32 log-probs of the sampled tokens under softmax(logits / T), 0 on padding."""
    lengths: torch.Tensor
    """[B] long, generated tokens per row (EOS included)."""
    truncated: torch.Tensor
    """[B] bool, True where no EOS came within max_new_tokens."""
    texts: list[str]
    """Decoded completions, special tokens (EOS, padding) removed."""


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
    logits: torch.Tensor, cfg: RolloutConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from [b, V] logits; return (tokens [b], their log-probs [b]).

    The log-prob is log softmax(logits / T)[token], before top-k / top-p (see the module docstring).
    """
    logits = logits.float()
    if cfg.temperature == 0:
        tokens = logits.argmax(dim=-1)
        return tokens, logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    scaled = logits / cfg.temperature
    filtered = filter_top_p(filter_top_k(scaled, cfg.top_k), cfg.top_p)
    tokens = torch.multinomial(filtered.softmax(dim=-1), 1, generator=generator).squeeze(-1)
    return tokens, scaled.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding gets 0).

    Example: mask [[0, 1, 1], [1, 1, 1]] -> [[0, 0, 1], [0, 1, 2]].
    """
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers 5.x calls the KV cache argument `cache`; earlier ones `past_key_values`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


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


class _PreallocatedLayer(DynamicLayer):
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


def _preallocate(cache, extra_tokens: int) -> None:
    """Swap the cache's plain DynamicLayers for preallocated ones (others stay as they are)."""
    layers = getattr(cache, "layers", None)
    for i, layer in enumerate(layers or []):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.dim() == 4:
            layers[i] = _PreallocatedLayer(layer, extra_tokens)


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Switch dropout off for the block and restore the previous train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (ids [B, P], mask [B, P]). Example: [[5], [6, 7]] -> [[p, 5], [6, 7]]."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


@torch.inference_mode()
def _decode(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    cfg: RolloutConfig,
    stops: torch.Tensor,
    pad_id: int,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sampling loop: (token ids [B, N], log-probs [B, N], lengths [B]), N = max_new_tokens."""
    batch, steps = prompt_ids.shape[0], cfg.max_new_tokens
    device = prompt_ids.device
    out_ids = torch.full((batch, steps), pad_id, dtype=torch.long, device=device)
    out_logprobs = torch.zeros(batch, steps, dtype=torch.float32, device=device)
    lengths = torch.full((batch,), steps, dtype=torch.long, device=device)
    active = torch.arange(batch, device=device)  # original row index of each row still decoding
    # The attention mask of every step is a prefix of this one (generated tokens are never padding).
    full_mask = torch.cat([prompt_mask, prompt_mask.new_ones(batch, steps)], dim=1)
    position = positions_from_mask(prompt_mask)
    cache_name = _cache_kwarg(model)
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=position,
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    _preallocate(cache, steps)
    position = position[:, -1:]
    for step in range(steps):
        tokens, logprobs = sample_next_token(out.logits[:, -1], cfg, generator)
        out_ids[active, step] = tokens
        out_logprobs[active, step] = logprobs
        if step == steps - 1:
            break
        finished = torch.isin(tokens, stops)
        if finished.any():
            lengths[active[finished]] = step + 1
            keep = (~finished).nonzero().squeeze(-1)
            if keep.numel() == 0:
                break
            # Dropping finished rows from the cache is what makes late tokens cheap.
            cache.batch_select_indices(keep)
            active, tokens, position = active[keep], tokens[keep], position[keep]
            full_mask = full_mask[keep]
        position = position + 1
        out = model(
            input_ids=tokens[:, None],
            attention_mask=full_mask[:, : prompt_ids.shape[1] + step + 1],
            position_ids=position,
            use_cache=True,
            **{cache_name: cache},
        )
    return out_ids, out_logprobs, lengths


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    cfg: RolloutConfig,
    *,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample one completion per prompt (repeat prompts yourself for groups) with a KV cache.

    Prompts are tokenized with the tokenizer's defaults (special tokens as the tokenizer adds them)
    and left-padded. The model runs in eval mode (no dropout) and is put back as it was.
    Deterministic given `generator` (on CPU; CUDA kernels may add tiny nondeterminism).
    """
    if not prompts:
        raise ValueError("rollout.generate: `prompts` is empty; pass at least one prompt")
    if cfg.max_new_tokens < 1 or cfg.temperature < 0 or not 0 < cfg.top_p <= 1 or cfg.top_k < 0:
        raise ValueError(
            f"rollout.generate: bad RolloutConfig {cfg}; need max_new_tokens >= 1, "
            "temperature >= 0, 0 < top_p <= 1, top_k >= 0"
        )
    device = _model_device(model)
    pad_id = tokenizer.pad_token_id
    pad_id = tokenizer.eos_token_id if pad_id is None else pad_id
    stops = torch.tensor(stop_token_ids(model, tokenizer), device=device)
    token_rows = tokenizer(prompts)["input_ids"]
    if any(len(r) == 0 for r in token_rows):
        raise ValueError("rollout.generate: a prompt tokenizes to nothing; pass non-empty prompts")
    prompt_ids, prompt_mask = (t.to(device) for t in left_pad(token_rows, pad_id))
    with eval_mode(model):
        out_ids, out_logprobs, lengths = _decode(
            model, prompt_ids, prompt_mask, cfg, stops, pad_id, generator
        )

    # Outside inference mode from here on: `clone` gives ordinary tensors the loss may use.
    width = int(lengths.max())
    lengths = lengths.clone()
    completion_mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).float()
    completion_ids = out_ids[:, :width].clone().masked_fill(completion_mask == 0, pad_id)
    logprobs = out_logprobs[:, :width].clone() * completion_mask
    last_token = completion_ids.gather(1, (lengths - 1)[:, None]).squeeze(1)
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        logprobs=logprobs,
        lengths=lengths,
        truncated=~torch.isin(last_token, stops),
        texts=tokenizer.batch_decode(completion_ids.tolist(), skip_special_tokens=True),
    )


def completion_logprobs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs [B, C] of `completion_ids` after the prompts, in one forward pass.

    log p_t = log softmax(logits_{t-1} / T)[token_t], 0 where completion_mask is 0; temperature 0
    is read as 1 (greedy rollouts). With `return_entropy`, also the entropy [B, C] of that same
    distribution, -sum_v p_v log p_v. Gradients flow unless the caller is under no_grad. Matches
    `Rollout.logprobs` (to ~1e-5 in fp32) when the model is in eval mode, as during the rollout.
    """
    temperature = 1.0 if temperature == 0 else temperature
    width = completion_ids.shape[1]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask.long(), (completion_mask > 0).long()], dim=1)
    # Keep only the logits that predict completion tokens (the last prompt position onwards).
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions_from_mask(attention_mask),
        use_cache=False,
        logits_to_keep=width + 1,
    ).logits[:, :-1]
    logprob_rows, entropy_rows = [], []
    # One row at a time keeps the float32 copy of the [C, V] logits small for big vocabularies.
    for row_logits, row_tokens in zip(logits, completion_ids):
        logp = F.log_softmax(row_logits.float() / temperature, dim=-1)
        logprob_rows.append(logp.gather(-1, row_tokens[:, None]).squeeze(-1))
        if return_entropy:
            entropy_rows.append(-(logp.exp() * logp).sum(-1))
    mask = completion_mask.float()
    logprobs = torch.stack(logprob_rows) * mask
    if return_entropy:
        return logprobs, torch.stack(entropy_rows) * mask
    return logprobs
