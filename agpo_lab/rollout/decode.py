"""The decoding loop: G completions per prompt with a KV cache, their log-probs and entropies.

`generate` calls the model's forward directly: prefill the left-padded prompts once (each distinct
prompt once: the G rows of a group share its keys and values), then one token per step from the KV
cache. Rows that have emitted EOS leave the active batch (their cache rows are
selected out once they are more than a quarter of it), so the late tokens of long completions cost
only the unfinished rows; the cache is preallocated (`kv_cache`) so a step writes its keys in
place. For Llama-family models the prefill and the one-token steps are `fast_decode`'s lean
layers over their own cache (the same logits up to float rounding, far fewer operations); with
`RolloutConfig.compile_decode` it runs through `torch.compile`. Token drawing and the log-prob
convention (log softmax(logits / T) of the full distribution; temperature 0 is greedy with T = 1
log-probs) are in `sampling`; `logprobs.completion_logprobs` recomputes the same log-probs in one
forward pass for the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agpo_lab.config import RolloutConfig
from agpo_lab.rollout.fast_decode import CannotLower, FastDecoder, compiled
from agpo_lab.rollout.fast_decode import supported as fast_decode_supported
from agpo_lab.rollout.inputs import (
    contiguous_head_input,
    distinct_prompts,
    eval_mode,
    left_pad,
    positions_from_mask,
    stop_token_ids,
)
from agpo_lab.rollout.kv_cache import cache_kwarg, preallocate
from agpo_lab.rollout.precision import autocast_to, lower_dtype
from agpo_lab.rollout.sampling import sample_next_token


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


def _forward(runner: tuple, cache, tokens, positions, mask) -> torch.Tensor:
    """Logits [b, V] of one new token per row through the transformers forward;
    runner = (the model, the name of its cache argument, the autocast dtype or None)."""
    model, cache_name, lower = runner
    inputs = {
        "input_ids": tokens[:, None],
        "attention_mask": mask,
        "position_ids": positions[:, None],
    }
    with autocast_to(tokens.device, lower):
        return model(**inputs, use_cache=True, **{cache_name: cache}).logits[:, -1]


def _fast_forward(decoder: FastDecoder, cache, tokens, positions, mask) -> torch.Tensor:
    """The same logits through `FastDecoder` (Llama-family models; compiled inside when asked)."""
    return decoder.step(cache, tokens, positions, mask)


COMPACT_FRACTION = 0.25
"""Finished rows leave the decoding batch (and the KV cache) once they are more than this fraction
of it; until then they decode padding. Selecting cache rows out copies the whole filled cache, while
a few more rows cost a decode step little on an overhead- or weight-bound model (benchmarks/
README.md has the profile before and after). 0: compact whenever a row finishes."""


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
    rows = torch.arange(batch, device=device)  # original index of each row of the decoding batch
    live = None  # the batch rows still sampling (indices into `rows`); None: all of them
    active = rows  # original index of each live row
    # The attention mask of every step is a prefix of this one (generated tokens are never padding).
    full_mask = torch.cat([prompt_mask, prompt_mask.new_ones(batch, steps)], dim=1)
    # Each distinct prompt is prefilled once (a group's G rows share theirs), then its keys,
    # values and last logits are repeated to its rows.
    distinct_ids, distinct_mask, inverse = distinct_prompts(prompt_ids, prompt_mask)
    if len(distinct_ids) == batch:  # keep the rows in their order
        distinct_ids, distinct_mask, inverse = prompt_ids, prompt_mask, None
    distinct_positions = positions_from_mask(distinct_mask)
    lower = lower_dtype(model, cfg.precision)
    fast = cfg.fast_decode and fast_decode_supported(model)
    if fast:  # FastDecoder compiles its own step when asked
        try:
            runner = FastDecoder(model, compile=cfg.compile_decode, dtype=lower)
        except CannotLower:  # its weights cannot be copied to `lower`: autocast instead
            fast = False
    if fast:
        forward = _fast_forward
        logits, cache = runner.prefill(distinct_ids, distinct_mask, distinct_positions, steps)
    else:
        with autocast_to(device, lower), contiguous_head_input(model):
            out = model(
                input_ids=distinct_ids,
                attention_mask=distinct_mask,
                position_ids=distinct_positions,
                use_cache=True,
                logits_to_keep=1,
            )
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        preallocate(cache, steps)
        logits = out.logits[:, -1]
        runner, forward = (model, cache_kwarg(model), lower), _forward
    position = distinct_positions[:, -1]
    if inverse is not None:
        cache.batch_select_indices(inverse)
        logits, position = logits[inverse], position[inverse]
    compile_forward = cfg.compile_decode and not fast
    for step in range(steps):
        tokens, logprobs, entropy = sample_next_token(
            logits if live is None else logits[live],
            cfg.temperature, cfg.top_k, cfg.top_p, generator, True,
        )  # fmt: skip
        out_ids[active, step] = tokens
        out_logprobs[active, step] = logprobs
        out_entropy[active, step] = entropy
        if step == steps - 1:
            break
        finished = torch.isin(tokens, stops)
        if finished.any():
            lengths[active[finished]] = step + 1
            still = (~finished).nonzero().squeeze(-1)
            if still.numel() == 0:
                break
            live = still if live is None else live[still]
            active, tokens = rows[live], tokens[still]
            if len(rows) - len(live) > COMPACT_FRACTION * len(rows):
                # Dropping finished rows from the cache is what makes late tokens cheap.
                cache.batch_select_indices(live)
                rows, position, full_mask = active, position[live], full_mask[live]
                live = None
        if live is not None:  # finished rows still in the batch decode a pad token, unused
            tokens = tokens.new_full((len(rows),), pad_id).index_copy_(0, live, tokens)
        position = position + 1
        mask = full_mask[:, : prompt_ids.shape[1] + step + 1]
        run = compiled(forward) if compile_forward and len(tokens) > 1 else forward
        logits = run(runner, cache, tokens, position, mask)
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
    cfg.validate()
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
