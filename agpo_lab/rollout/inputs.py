"""How prompts become model inputs: left padding, position ids, the tokens that end a completion,
eval mode while sampling, and a contiguous input for the LM head."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding gets 0).

    Example: mask [[0, 1, 1], [1, 1, 1]] -> [[0, 0, 1], [0, 1, 2]].
    """
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (ids [B, P], mask [B, P]). Example: [[5], [6, 7]] -> [[p, 5], [6, 7]]."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


def distinct_prompts(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [u, P], mask [u, P], inverse [B]): the u distinct rows of a left-padded prompt batch
    and, for each row, the index of its distinct prompt (rows of one group share one).

    Example: ids [[5, 6], [5, 6], [0, 7]], mask [[1, 1], [1, 1], [0, 1]] -> ids [[0, 7], [5, 6]],
    mask [[0, 1], [1, 1]], inverse [1, 1, 0] (distinct rows come out sorted).
    """
    width = prompt_ids.shape[1]
    rows = torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], dim=1)
    distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
    return distinct[:, :width], distinct[:, width:].to(prompt_mask.dtype), inverse


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


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Switch dropout off for the block and restore the previous train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def contiguous_head_input(model: torch.nn.Module) -> Iterator[None]:
    """While the block runs, the model's LM head gets its input as one contiguous tensor.

    transformers' `logits_to_keep=k` hands the head `hidden[:, -k:]`, a view whose rows are not
    adjacent in memory. A bias-free Linear goes through `torch.matmul`, which cannot fold such a
    view into one matrix product: it expands the head's weight to one copy per row and runs `bmm`
    (for a [V, D] = [49152, 576] head, 113 MB copied per row, in the forward and the backward).
    A contiguous copy of the kept hidden states costs B x k x D floats; the logits are the same.
    Example: ``with contiguous_head_input(model): model(ids, logits_to_keep=1)``.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Module):
        yield
        return
    handle = head.register_forward_pre_hook(_contiguous_first_input)
    try:
        yield
    finally:
        handle.remove()


def _contiguous_first_input(module: torch.nn.Module, args: tuple) -> tuple | None:
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None
