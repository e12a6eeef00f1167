"""Log-probs of given completions in one forward pass: what the loss, the reference policy and the
first-epoch ratio check compute (the rollout's own log-probs, recomputed with gradients).

With `share_prompts`, rows that share a prompt (the G completions of a group) share its forward:
each distinct prompt goes through the network once, its keys and values are repeated to its rows,
and the completions run on top of them (`shared_prompt_logits`). The logits are the same up to
float rounding, and so is the gradient: autograd sums the rows' gradients into the one prompt
pass. With a prompt of P tokens, G completions of C cost P + G C tokens instead of G (P + C).

With `pack_rows`, rows are laid end to end without padding (`packing`): a pass costs about its real
tokens instead of rows x (longest prompt + longest completion). A pass takes whichever of the
three layouts (padded, shared, packed) costs least (`pass_layout`: tokens, the LM head weighed by its
share of the work); the planner
(`training.planning`) budgets its passes with the same count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import masking_utils

from agpo_lab.rollout.fast_decode import supported as llama_family
from agpo_lab.rollout.inputs import (
    contiguous_head_input,
    distinct_prompts,
    positions_from_mask,
)
from agpo_lab.rollout.kv_cache import cache_kwarg
from agpo_lab.rollout.packing import packed_inputs, packed_shape
from agpo_lab.rollout.token_logprobs import token_logprobs

LOGPROB_CHUNK_ELEMENTS = 2**24
"""Float32 logits (rows x tokens x vocabulary) turned into entropies at once."""


def can_share_prompts(model: torch.nn.Module) -> bool:
    """Whether `shared_prompt_logits` computes what one forward over prompt + completion does:
    Llama-family models with full attention (`fast_decode.supported`), unless they train with
    activation checkpointing (which switches the KV cache off in training mode)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    name = "is_activation_checkpointing"  # transformers 5; earlier: is_gradient_checkpointing
    name = name if hasattr(base, name) else "is_gradient_checkpointing"
    return llama_family(model) and not (model.training and getattr(base, name, False))


PACKABLE_ATTENTION = ("sdpa", "eager", "flex_attention")
"""Attention implementations whose transformers mask turns restarting position ids into sequence
boundaries for any number of rows; flash attention reads them only in a batch of one row."""


def can_pack_rows(model: torch.nn.Module) -> bool:
    """Whether a packed pass (`packing`) computes what a padded one does: Llama-family models with
    full attention through an implementation in PACKABLE_ATTENTION, whose transformers mask turns
    restarting position ids into sequence boundaries (activation checkpointing included; through a
    DDP wrapper too)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    attention = getattr(getattr(base, "config", None), "_attn_implementation", None)
    masks_packed = hasattr(masking_utils, "find_packed_sequence_indices")
    return llama_family(model) and attention in PACKABLE_ATTENTION and masks_packed


def lm_head_share(model: torch.nn.Module) -> float:
    """The LM head's share of a token's matrix-product work: V D / (V D + the network's other
    weights, input embeddings aside), what a pass pays per position whose logits it computes.

    Example: SmolLM2-135M (V 49,152, D 576, tied embeddings): 28.3 M / 134.5 M, about 0.21; the
    embedded model (V 58, D 128): about 0.007.
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head, embed = base.get_output_embeddings(), base.get_input_embeddings()
    if head is None or embed is None:
        return 0.0
    total = sum(p.numel() for p in base.parameters())  # a tied weight counts once
    tied = head.weight is embed.weight
    others = total - embed.weight.numel() - (0 if tied else head.weight.numel())
    return head.weight.numel() / max(1, head.weight.numel() + others)


def pass_layout(
    prompt_lengths: list[int],
    completion_lengths: list[int],
    prompt_groups: list[int] | None = None,
    pack: bool = False,
    head_share: float = 0.0,
) -> tuple[str, int, float]:
    """(layout, tokens, cost) of the cheapest pass over rows with these real prompt and completion
    lengths; tokens: what it runs through the network, padding included (and, after the colon,
    the positions the LM head runs at):

        "padded"  rows x (longest prompt + longest completion) : rows x (longest completion + 1)
        "shared"  (prompt_groups: row -> its prompt) distinct prompts x longest prompt
                  + rows x longest completion : rows x longest completion
        "packed"  (pack) packed rows x width (`packing.packed_shape`) : all of them

    cost = tokens x (1 - head_share) + head tokens x head_share (`lm_head_share`: a packed pass
    also computes logits over the prompts); ties go to the plainer layout.
    Example: prompts [4, 4], completions [8, 2], one prompt: padded 2 x 12 = 24, shared 4 + 2 x 8
    = 20, packed: lengths 11 and 5 in width 11 -> 2 x 11 = 22; -> ("shared", 20, 20). Without
    sharing -> ("packed", 22, 22); with head_share 0.5 -> ("padded", 24, 21): 12 + 9 < 11 + 11.
    """
    rows, prompt, longest = len(prompt_lengths), max(prompt_lengths), max(completion_lengths)
    costs = [("padded", rows * (prompt + longest), rows * (longest + 1))]
    if prompt_groups is not None:
        prompts = len(set(prompt_groups))
        costs.append(("shared", prompts * prompt + rows * longest, rows * longest))
    if pack:
        packed_rows, width = packed_shape(prompt_lengths, completion_lengths)
        costs.append(("packed", packed_rows * width, packed_rows * width))
    name, tokens, head = min(costs, key=lambda c: c[1] * (1 - head_share) + c[2] * head_share)
    return name, tokens, tokens * (1 - head_share) + head * head_share


def choose_layout(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    share_prompts: bool,
    pack_rows: bool,
    head_share: float = 0.0,
) -> str:
    """`pass_layout`'s choice for this pass (share_prompts / pack_rows: the layouts allowed)."""
    if not (share_prompts or pack_rows):
        return "padded"
    groups = distinct_prompts(prompt_ids, prompt_mask)[2].tolist() if share_prompts else None
    prompts, completions = prompt_mask.sum(1).tolist(), (completion_mask > 0).sum(1).tolist()
    return pass_layout(prompts, completions, groups, pack_rows, head_share)[0]


def packed_logits(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """Logits [B, C, V] that predict each completion token, from one padding-free pass
    (`packing.packed_inputs`); on padding, the logits of some other position (masked later)."""
    ids, positions, index = packed_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask)
    logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    return logits.flatten(0, 1)[index]


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
    pack_rows: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs [B, C] of `completion_ids` after the prompts, in one forward pass.

    log p_t = log softmax(logits_{t-1} / T)[token_t] (fused: `token_logprobs`), 0 where
    completion_mask is 0; temperature 0 is read as 1 (greedy rollouts). With `return_entropy`,
    also the entropy [B, C] of that same distribution, -sum_v p_v log p_v, without gradients (a
    metric; keeping its graph would hold one more fp32 [C, V] tensor per row). Log-prob gradients
    flow unless under no_grad. Matches
    `Rollout.logprobs` (to ~1e-5 in fp32) when the model is in eval mode, as during the rollout.
    `share_prompts`: rows with the same prompt may share its forward (`shared_prompt_logits`),
    `pack_rows`: rows may be packed without padding (`packed_logits`), where the model allows it
    (`can_share_prompts`, `can_pack_rows`) and `pass_layout` finds it cheaper; the same log-probs
    up to float rounding.
    """
    temperature = 1.0 if temperature == 0 else temperature
    width = completion_ids.shape[1]
    share, pack = share_prompts and can_share_prompts(model), pack_rows and can_pack_rows(model)
    layout = choose_layout(
        prompt_ids,
        prompt_mask,
        completion_mask,
        share_prompts=share,
        pack_rows=pack,
        head_share=lm_head_share(model) if share or pack else 0.0,
    )
    inputs = (prompt_ids, prompt_mask, completion_ids, completion_mask)
    with contiguous_head_input(model):  # the kept positions, without a weight copy per row
        if layout == "shared":
            logits = shared_prompt_logits(model, *inputs)
        elif layout == "packed":
            logits = packed_logits(model, *inputs)
        else:
            input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
            attention_mask = torch.cat([prompt_mask.long(), (completion_mask > 0).long()], dim=1)
            # Only the logits that predict completion tokens (positions P - 1 .. P + C - 2), as
            # one contiguous tensor that the fused log-prob reads in place.
            prompt_width = prompt_ids.shape[1]
            keep = torch.arange(prompt_width - 1, prompt_width + width - 1, device=input_ids.device)
            logits = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions_from_mask(attention_mask),
                use_cache=False,
                logits_to_keep=keep,
            ).logits
    mask = completion_mask.float()
    logprobs = token_logprobs(logits, completion_ids, temperature) * mask
    if return_entropy:  # a logged metric: without a graph it keeps no [C, V] tensor alive
        return logprobs, completion_entropy(logits.detach(), temperature) * mask
    return logprobs


@torch.no_grad()
def completion_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy [B, C] of softmax(logits / T), -sum_v p_v log p_v, in row chunks of at most
    LOGPROB_CHUNK_ELEMENTS float32 values (no gradient: a metric)."""
    rows_per_chunk = max(1, LOGPROB_CHUNK_ELEMENTS // max(1, logits.shape[1] * logits.shape[2]))
    entropy_rows = []
    for chunk in logits.split(rows_per_chunk):
        logp = F.log_softmax(chunk.float() / temperature, dim=-1)
        entropy_rows.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(entropy_rows)
