"""How prompts become model inputs: left padding, position ids, the tokens that end a completion,
and eval mode while sampling."""

from __future__ import annotations

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
