"""Log-probs of given completions in one forward pass: what the loss, the reference policy and the
first-epoch ratio check compute (the rollout's own log-probs, recomputed with gradients)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agpo_lab.rollout.inputs import positions_from_mask

LOGPROB_CHUNK_ELEMENTS = 2**24
"""Float32 logits (rows x tokens x vocabulary) turned into log-probs at once in the loss forward."""


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
