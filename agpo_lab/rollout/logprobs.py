"""Log-probs of given completions in one forward pass: what the loss, the reference policy and the
first-epoch ratio check compute (the rollout's own log-probs, recomputed with gradients).

With `share_prompts`, rows that share a prompt (the G completions of a group) share its forward:
each distinct prompt goes through the network once, its keys and values are repeated to its rows,
and the completions run on top of them (`shared_prompt_logits`). The logits are the same up to
float rounding, and so is the gradient: autograd sums the rows' gradients into the one prompt
pass. With a prompt of P tokens, G completions of C cost P + G C tokens instead of G (P + C).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agpo_lab.rollout.fast_decode import supported as llama_family
from agpo_lab.rollout.inputs import distinct_prompts, positions_from_mask
from agpo_lab.rollout.kv_cache import cache_kwarg

LOGPROB_CHUNK_ELEMENTS = 2**24
"""Float32 logits (rows x tokens x vocabulary) turned into log-probs at once in the loss forward."""


def can_share_prompts(model: torch.nn.Module) -> bool:
    """Whether `shared_prompt_logits` computes what one forward over prompt + completion does:
    Llama-family models with full attention (`fast_decode.supported`), unless they train with
    activation checkpointing (which switches the KV cache off in training mode)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    name = "is_activation_checkpointing"  # transformers 5; earlier: is_gradient_checkpointing
    name = name if hasattr(base, name) else "is_gradient_checkpointing"
    return llama_family(model) and not (model.training and getattr(base, name, False))


def shared_prompt_logits(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """Logits [B, C, V] that predict each completion token (position t predicts token t), with
    each distinct prompt computed once: prefill the u distinct prompts with a KV cache, repeat
    each one's keys and values to its rows (`Cache.batch_select_indices`, differentiable), then
    run the completion tokens 0 .. C-2 of every row on top of that cache.

    Example: 8 rows, one prompt of 60 tokens, completions of 64: one 60-token pass and 8 x 63
    completion tokens, where a plain forward takes 8 x 124 tokens.
    """
    ids, mask, inverse = distinct_prompts(prompt_ids, prompt_mask)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions_from_mask(mask),
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    first = out.logits[:, -1].index_select(0, inverse)  # predicts completion token 0
    if completion_ids.shape[1] == 1:
        return first[:, None]
    cache.batch_select_indices(inverse)  # every row gets its prompt's keys and values
    full_mask = torch.cat([prompt_mask.long(), (completion_mask > 0).long()], dim=1)
    rest = model(
        input_ids=completion_ids[:, :-1],
        attention_mask=full_mask[:, :-1],
        position_ids=positions_from_mask(full_mask)[:, prompt_ids.shape[1] : -1],
        use_cache=True,
        **{cache_kwarg(model): cache},
    ).logits
    return torch.cat([first[:, None], rest], dim=1)


def completion_logprobs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    share_prompts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs [B, C] of `completion_ids` after the prompts, in one forward pass.

    log p_t = log softmax(logits_{t-1} / T)[token_t], 0 where completion_mask is 0; temperature 0
    is read as 1 (greedy rollouts). With `return_entropy`, also the entropy [B, C] of that same
    distribution, -sum_v p_v log p_v, without gradients (a metric; keeping its graph would hold
    one more fp32 [C, V] tensor per row). Log-prob gradients flow unless under no_grad. Matches
    `Rollout.logprobs` (to ~1e-5 in fp32) when the model is in eval mode, as during the rollout.
    `share_prompts`: rows with the same prompt share its forward (`shared_prompt_logits`) when
    some do and the model allows it (`can_share_prompts`); the same log-probs up to rounding.
    """
    temperature = 1.0 if temperature == 0 else temperature
    width = completion_ids.shape[1]
    if share_prompts and can_share_prompts(model) and _repeats_a_prompt(prompt_ids, prompt_mask):
        logits = shared_prompt_logits(
            model, prompt_ids, prompt_mask, completion_ids, completion_mask
        )
    else:
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


def _repeats_a_prompt(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> bool:
    return len(distinct_prompts(prompt_ids, prompt_mask)[0]) < len(prompt_ids)
