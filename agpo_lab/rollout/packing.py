"""Padding-free passes: several rows side by side in one row of the model's input.

A padded pass computes rows x (longest prompt + longest completion) tokens; when completion lengths
vary a lot within a pass, much of that is padding. Packing lays each row's real tokens (its prompt
without padding, then its completion) end to end in rows of width W, the longest row's length, with
position ids that restart at 0 at every row's start. Given position ids and no attention mask,
transformers (5.x) reads the restarts as sequence boundaries and masks attention to stay within
each sequence (block-diagonal causal attention, with the sdpa, eager and flex implementations;
flash attention reads them only in a batch of one row, so `logprobs.can_pack_rows` refuses it),
so each row's logits are what its own forward gives, up to float rounding. TRL calls this
`padding_free`, verl `use_remove_padding`.

    ids, positions, index = packed_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask)
    logits = model(input_ids=ids, position_ids=positions).logits    # [R, W, V]
    per_row = logits.flatten(0, 1)[index]                           # [B, C, V]
"""

from __future__ import annotations

import torch
from torch import Tensor


def first_fit_decreasing(lengths: list[int], width: int) -> list[list[int]]:
    """Bins of at most `width` total length holding every item (the longest first, each into the
    first bin with room): the rows of a packed pass. Items longer than `width` get a bin each.

    Example: lengths [5, 3, 4, 2], width 7 -> [[0, 3], [2, 1]] (5 + 2 and 4 + 3).
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for item in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        size = lengths[item]
        spot = next((b for b, free in enumerate(room) if free >= size), None)
        if spot is None:
            bins.append([item])
            room.append(width - size)
        else:
            bins[spot].append(item)
            room[spot] -= size
    return bins


def packed_shape(prompt_lengths: list[int], completion_lengths: list[int]) -> tuple[int, int]:
    """(packed rows R, width W) of a pass over rows with these real prompt and completion lengths
    (completions >= 1 token). A row takes p + c - 1 tokens: its last completion token is never an
    input. Example: prompts [2, 2, 2], completions [5, 1, 3] -> lengths [6, 2, 4]: R 2, W 6."""
    lengths = [p + c - 1 for p, c in zip(prompt_lengths, completion_lengths)]
    width = max(lengths)
    return len(first_fit_decreasing(lengths, width)), width


def packed_inputs(
    prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids [R, W], position_ids [R, W], index [B, C]) of the packed pass over B left-padded
    prompts and right-padded completions: `logits.flatten(0, 1)[index]` are the logits that
    predict each completion token (position t predicts token t; padding points at position 0).

    The free end of a packed row is filled with token 0 at positions 0, 1, ...: a sequence of its
    own, whose logits nobody reads.

    Example: prompts [[0, 7], [8, 9]] (mask [[0, 1], [1, 1]]), completions [[1, 2], [3, 0]]
    (mask [[1, 1], [1, 0]]): row 0 takes [7, 1] (p 1 + c 2 - 1), row 1 [8, 9] (2 + 1 - 1);
    width 2, two packed rows: ids [[7, 1], [8, 9]], positions [[0, 1], [0, 1]], index
    [[0, 1], [3, 0]].
    """
    prompt_lengths = prompt_mask.sum(1).tolist()
    completion_lengths = (completion_mask > 0).sum(1).tolist()
    lengths = [p + c - 1 for p, c in zip(prompt_lengths, completion_lengths)]
    width = max(lengths)
    prompt_width, columns = prompt_ids.shape[1], completion_ids.shape[1]
    row_width = prompt_width + columns  # of `tokens` below: a row's prompt, then its completion
    sources, positions = [], []  # per packed token: its flat index into `tokens`, its position
    index = [[0] * columns for _ in lengths]
    for r, rows in enumerate(first_fit_decreasing(lengths, width)):
        used = 0
        for i in rows:
            first = i * row_width + prompt_width - prompt_lengths[i]  # the row's first real token
            sources += range(first, first + lengths[i])
            positions += range(lengths[i])
            start = r * width + used + prompt_lengths[i] - 1  # predicts completion token 0
            index[i][: completion_lengths[i]] = range(start, start + completion_lengths[i])
            used += lengths[i]
        sources += [-1] * (width - used)  # the free end: token 0, one more sequence
        positions += range(width - used)
    device = prompt_ids.device
    sources = torch.tensor(sources, device=device)
    tokens = torch.cat([prompt_ids, completion_ids], dim=1).flatten()
    ids = tokens[sources.clamp(min=0)].masked_fill(sources < 0, 0).view(-1, width)
    positions = torch.tensor(positions, device=device).view(-1, width)
    return ids, positions, torch.tensor(index, device=device)
