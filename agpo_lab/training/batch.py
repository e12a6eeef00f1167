"""The row batch the loss consumes: one row per completion, G consecutive rows per group.

A rollout becomes a `RowBatch` once its rewards and advantages are known; the update selects rows
of it (`select`), trims the padding a micro-batch does not need (`trimmed`), and DAPO-style dynamic
sampling swaps whole groups (`replace_groups`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class RowBatch:
    """Completions ready for the loss: B rows, G consecutive rows per group."""

    prompt_ids: Tensor
    """[B, P] long, left-padded."""
    prompt_mask: Tensor
    """[B, P] long, 1 on prompt tokens."""
    completion_ids: Tensor
    """[B, C] long, right-padded."""
    completion_mask: Tensor
    """[B, C] float, 1 on generated tokens."""
    old_logprobs: Tensor
    """[B, C] log-probs under the sampling policy."""
    advantages: Tensor
    """[B] one advantage per completion."""
    active: Tensor
    """[B] bool, False for rows of dropped groups (they stay in the batch with no loss weight, so
    every process keeps the same shapes)."""
    token_advantages: Tensor | None = None
    """[B, C] one advantage per token (RL-ZVP), used by the loss instead of `advantages`; None:
    every token of a row gets the row's advantage."""
    sampler_logprobs: Tensor | None = None
    """[B, C] log-probs under the sampler when it computes in another precision than the update
    (`rollout.precision`, `optim.precision`): the update then recomputes `old_logprobs` with the
    trained policy and weights each token by their ratio (`algorithm.sampler_correction`); None:
    the sampler is the trained policy and `old_logprobs` are its log-probs."""

    @property
    def model_inputs(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(prompt_ids, prompt_mask, completion_ids, completion_mask): what log-probs need."""
        return self.prompt_ids, self.prompt_mask, self.completion_ids, self.completion_mask

    @property
    def loss_advantages(self) -> Tensor:
        """What the loss multiplies the ratio by: [B, C] token advantages, else [B] row ones."""
        return self.advantages if self.token_advantages is None else self.token_advantages

    @property
    def loss_mask(self) -> Tensor:
        """[B, C] tokens that enter the loss: generated tokens of active rows."""
        return self.completion_mask * self.active[:, None].to(self.completion_mask.dtype)

    def select(self, rows: Tensor) -> RowBatch:
        """The rows at index `rows`, in that order."""
        picked = (getattr(self, f.name) for f in fields(self))
        return RowBatch(*(None if t is None else t[rows] for t in picked))

    def trimmed(self) -> RowBatch:
        """The same rows without the columns that are padding in every row (prompt columns on
        the left, completion columns on the right): what a micro-batch of similar lengths saves."""
        prompt_from = self.prompt_ids.shape[1] - int(self.prompt_mask.sum(1).max())
        width = max(1, int(self.completion_mask.sum(1).max()))
        return RowBatch(
            prompt_ids=self.prompt_ids[:, prompt_from:],
            prompt_mask=self.prompt_mask[:, prompt_from:],
            completion_ids=self.completion_ids[:, :width],
            completion_mask=self.completion_mask[:, :width],
            old_logprobs=self.old_logprobs[:, :width],
            advantages=self.advantages,
            active=self.active,
            token_advantages=None
            if self.token_advantages is None
            else self.token_advantages[:, :width],
            sampler_logprobs=None
            if self.sampler_logprobs is None
            else self.sampler_logprobs[:, :width],
        )

    def row_lengths(self) -> tuple[Tensor, Tensor]:
        """(prompt tokens [B], completion tokens [B]) of each row, padding left out."""
        return self.prompt_mask.sum(1), self.completion_mask.sum(1).long()

    @staticmethod
    def cat(batches: list[RowBatch], pad_id: int) -> RowBatch:
        """Stack batches row-wise, padding prompts on the left and completions on the right."""
        prompt_width = max(b.prompt_ids.shape[1] for b in batches)
        completion_width = max(b.completion_ids.shape[1] for b in batches)

        def cat(name: str, width: int | None, value: float, left: bool) -> Tensor:
            parts = [getattr(b, name) for b in batches]
            if width is not None:
                parts = [_pad(t, width, value, left) for t in parts]
            return torch.cat(parts)

        return RowBatch(
            prompt_ids=cat("prompt_ids", prompt_width, pad_id, left=True),
            prompt_mask=cat("prompt_mask", prompt_width, 0, left=True),
            completion_ids=cat("completion_ids", completion_width, pad_id, left=False),
            completion_mask=cat("completion_mask", completion_width, 0, left=False),
            old_logprobs=cat("old_logprobs", completion_width, 0, left=False),
            advantages=cat("advantages", None, 0, False),
            active=cat("active", None, 0, False),
            token_advantages=None
            if any(b.token_advantages is None for b in batches)
            else cat("token_advantages", completion_width, 0, left=False),
            sampler_logprobs=None
            if any(b.sampler_logprobs is None for b in batches)
            else cat("sampler_logprobs", completion_width, 0, left=False),
        )

    def replace_groups(
        self,
        slots: list[int],
        donor: RowBatch,
        donor_groups: list[int],
        group_size: int,
        pad_id: int,
    ) -> RowBatch:
        """This batch with its group slots[i] replaced by donor's group donor_groups[i] (pairs
        beyond the shorter list are ignored); other groups keep their place.

        Example: G=2, slots [1], donor_groups [0] -> rows 0, 1 of self, then rows 0, 1 of donor.
        """
        rows = torch.arange(self.advantages.numel()).view(-1, group_size)
        donor_rows = torch.arange(donor.advantages.numel()).view(-1, group_size) + rows.numel()
        for slot, new in zip(slots, donor_groups):
            rows[slot] = donor_rows[new]
        both = RowBatch.cat([self, donor], pad_id)
        return both.select(rows.flatten().to(self.advantages.device))


def _pad(t: Tensor, width: int, value: float, left: bool) -> Tensor:
    extra = width - t.shape[1]
    if extra == 0:
        return t
    pad = t.new_full((t.shape[0], extra), value)
    return torch.cat([pad, t] if left else [t, pad], dim=1)
