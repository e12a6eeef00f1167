"""Batched sampling with a KV cache, per-token log-probs and truncation flags.

`generate` is a small decoding loop that calls the model's forward directly: prefill the left-padded
prompts once, then one token per step from the KV cache. Rows that have emitted EOS leave the active
batch (their cache rows are selected out), so the late tokens of long completions cost only the
unfinished rows; plain transformers cache layers are swapped for preallocated ones so a step writes
its keys in place instead of re-concatenating the cache. For Llama-family models the one-token
step is `agpo_lab.fast_decode`'s lean decoder (same logits, fewer operations); with
`RolloutConfig.compile_decode` it runs through `torch.compile`. `completion_logprobs` recomputes the same log-probs in
one forward pass for the loss. Token filtering, sampling and the cache helpers live in
`agpo_lab.sampling` (its docstring states the log-prob convention: log softmax(logits / T) of the
full distribution; temperature 0 is greedy with T = 1 log-probs).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from agpo_lab import fast_decode
from agpo_lab.fast_decode import FastDecoder
from agpo_lab.sampling import (  # noqa: F401  (filters, eval_mode: re-exported for callers)
    cache_kwarg,
    eval_mode,
    filter_top_k,
    filter_top_p,
    left_pad,
    positions_from_mask,
    preallocate,
    sample_next_token,
    stop_token_ids,
)


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
    fast_decode: bool = True
    """Decode Llama-family models (Llama, Qwen2, Qwen3, Mistral) with agpo_lab.fast_decode's lean
    one-token step: the same logits as the transformers forward (tested) at ~1.3x the rollout
    tokens/s on small models (benchmarks/bench_rollout.py); other models always use the
    transformers forward. False: always the latter."""
    compile_decode: bool = False
    """`torch.compile` the one-token decode step: fewer, fused kernels per token (on CPU measured
    1.0-1.15x the rollout tokens/s of the eager fast step, 1.3-1.5x that of the transformers
    forward; benchmarks/bench_rollout.py) after a one-off compile of ~10 s per process (one more if
    the batch size was constant until then); for long training runs, not for a quick notebook
    cell. Forward hooks on the model run only while compiling, not per step."""


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
    entropy: torch.Tensor
    """[B, C] float32 entropy of softmax(logits / T) at each generated token, 0 on padding (the
    policy entropy metric, taken here so that the update need not compute it)."""
    lengths: torch.Tensor
    """[B] long, generated tokens per row (EOS included)."""
    truncated: torch.Tensor
    """[B] bool, True where no EOS came within max_new_tokens."""
    texts: list[str]
    """Decoded completions, special tokens (EOS, padding) removed."""


LOGPROB_CHUNK_ELEMENTS = 2**24
"""Float32 logits (rows x tokens x vocabulary) turned into log-probs at once in the loss forward."""


def _forward(runner: tuple, cache, tokens, positions, mask) -> torch.Tensor:
    """Logits [b, V] of one new token per row through the transformers forward;
    runner = (the model, the name of its cache argument)."""
    model, cache_name = runner
    inputs = {
        "input_ids": tokens[:, None],
        "attention_mask": mask,
        "position_ids": positions[:, None],
    }
    return model(**inputs, use_cache=True, **{cache_name: cache}).logits[:, -1]


def _fast_forward(decoder: FastDecoder, cache, tokens, positions, mask) -> torch.Tensor:
    """The same logits through agpo_lab.fast_decode (Llama-family models)."""
    return decoder.step(cache, tokens, positions, mask)


@functools.cache
def _compiled(forward):
    """A decode forward compiled once per process; dynamic shapes let one graph serve every batch
    size and cache length (a batch of one row would be specialised and recompiled, so it runs
    eagerly)."""
    return torch.compile(forward, dynamic=True)


@torch.inference_mode()
def _decode(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    cfg: RolloutConfig,
    stops: torch.Tensor,
    pad_id: int,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, ...]:
    """The sampling loop: (token ids, log-probs, entropies: [B, N]; lengths [B]), N = max_new_tokens."""
    batch, steps = prompt_ids.shape[0], cfg.max_new_tokens
    device = prompt_ids.device
    out_ids = torch.full((batch, steps), pad_id, dtype=torch.long, device=device)
    out_logprobs = torch.zeros(batch, steps, dtype=torch.float32, device=device)
    out_entropy = torch.zeros(batch, steps, dtype=torch.float32, device=device)
    lengths = torch.full((batch,), steps, dtype=torch.long, device=device)
    active = torch.arange(batch, device=device)  # original row index of each row still decoding
    # The attention mask of every step is a prefix of this one (generated tokens are never padding).
    full_mask = torch.cat([prompt_mask, prompt_mask.new_ones(batch, steps)], dim=1)
    position = positions_from_mask(prompt_mask)
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=position,
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    preallocate(cache, steps)
    position, logits = position[:, -1], out.logits[:, -1]
    fast = cfg.fast_decode and fast_decode.supported(model)
    runner = FastDecoder(model) if fast else (model, cache_kwarg(model))
    forward = _fast_forward if fast else _forward
    for step in range(steps):
        tokens, logprobs, entropy = sample_next_token(
            logits, cfg.temperature, cfg.top_k, cfg.top_p, generator, True
        )
        out_ids[active, step] = tokens
        out_logprobs[active, step] = logprobs
        out_entropy[active, step] = entropy
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
        mask = full_mask[:, : prompt_ids.shape[1] + step + 1]
        compiled = cfg.compile_decode and len(tokens) > 1
        logits = (_compiled(forward) if compiled else forward)(
            runner, cache, tokens, position, mask
        )
    return out_ids, out_logprobs, out_entropy, lengths


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
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    pad_id = tokenizer.eos_token_id if pad_id is None else pad_id
    stops = torch.tensor(stop_token_ids(model, tokenizer), device=device)
    token_rows = tokenizer(prompts)["input_ids"]
    if any(len(r) == 0 for r in token_rows):
        raise ValueError("rollout.generate: a prompt tokenizes to nothing; pass non-empty prompts")
    prompt_ids, prompt_mask = (t.to(device) for t in left_pad(token_rows, pad_id))
    with eval_mode(model):
        out_ids, out_logprobs, out_entropy, lengths = _decode(
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
        entropy=out_entropy[:, :width].clone() * completion_mask,
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
    distribution, -sum_v p_v log p_v, without gradients (a metric; keeping its graph would hold
    one more fp32 [C, V] tensor per row). Log-prob gradients flow unless under no_grad. Matches
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
    # Rows in chunks of at most LOGPROB_CHUNK_ELEMENTS float32 logits: a tiny vocabulary takes
    # the whole batch in one op, a 150k vocabulary one row at a time (a bounded float32 copy).
    rows_per_chunk = max(1, LOGPROB_CHUNK_ELEMENTS // max(1, logits.shape[1] * logits.shape[2]))
    for chunk_logits, chunk_tokens in zip(
        logits.split(rows_per_chunk), completion_ids.split(rows_per_chunk), strict=True
    ):
        logp = F.log_softmax(chunk_logits.float() / temperature, dim=-1)
        logprob_rows.append(logp.gather(-1, chunk_tokens[..., None]).squeeze(-1))
        if return_entropy:  # a logged metric: without a graph it keeps no [C, V] tensor alive
            with torch.no_grad():
                detached = logp.detach()
                entropy_rows.append(-(detached.exp() * detached).sum(-1))
    mask = completion_mask.float()
    logprobs = torch.cat(logprob_rows) * mask
    if return_entropy:
        return logprobs, torch.cat(entropy_rows) * mask
    return logprobs
