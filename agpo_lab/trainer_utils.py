"""The row batch the loss consumes, and preparing a policy and its optimizer for RL training."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial

import torch
from torch import Tensor

from agpo_lab.algorithms.loss import policy_loss


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

    @property
    def model_inputs(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(prompt_ids, prompt_mask, completion_ids, completion_mask): what log-probs need."""
        return self.prompt_ids, self.prompt_mask, self.completion_ids, self.completion_mask

    @property
    def loss_mask(self) -> Tensor:
        """[B, C] tokens that enter the loss: generated tokens of active rows."""
        return self.completion_mask * self.active[:, None].to(self.completion_mask.dtype)

    def select(self, rows: Tensor) -> RowBatch:
        """The rows at index `rows`, in that order."""
        return RowBatch(*(getattr(self, f.name)[rows] for f in fields(self)))

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


def micro_batches(
    rows: Tensor,
    prompt_lengths: Tensor,
    completion_lengths: Tensor,
    count: int,
    token_budget: int | None = None,
) -> list[Tensor]:
    """Split one mini-batch's row indices into micro-batches of rows of similar length.

    Rows are sorted by prompt + completion length (stable), so that a micro-batch trimmed to its
    longest prompt and completion (`RowBatch.trimmed`) carries little padding. Without
    `token_budget`: `count` micro-batches of near-equal row counts (fewer if there are fewer rows).
    With it: consecutive sorted rows are packed while rows x (longest prompt + longest completion)
    stays within the budget, at least one row each (verl's dynamic batch size); then `count` is
    ignored. prompt_lengths / completion_lengths are indexed by row id.
    Example: rows [0, 1, 2, 3], prompts all 1, completions [4, 8, 5, 7]: count 2 ->
    [[0, 2], [3, 1]]; token_budget 12 -> [[0, 2], [3], [1]] (3 rows of width 8 would be 24).
    """
    if rows.numel() == 0:
        return []
    rows = rows[(prompt_lengths[rows] + completion_lengths[rows]).argsort(stable=True)]
    if token_budget is None:
        return list(rows.tensor_split(min(count, rows.numel())))
    chunks, start, longest_prompt, longest_completion = [], 0, 0, 0
    for i, (p, c) in enumerate(
        zip(prompt_lengths[rows].tolist(), completion_lengths[rows].tolist())
    ):
        p, c = max(longest_prompt, p), max(longest_completion, c)
        if i > start and (i - start + 1) * (p + c) > token_budget:
            chunks.append(rows[start:i])
            start, (p, c) = i, (prompt_lengths[rows[i]].item(), completion_lengths[rows[i]].item())
        longest_prompt, longest_completion = p, c
    return [*chunks, rows[start:]]


def configured_loss(algorithm, max_len: int) -> Callable[..., tuple[Tensor, dict[str, float]]]:
    """`policy_loss` with the clip, KL and aggregation settings of an AlgorithmConfig bound."""
    a = algorithm
    return partial(
        policy_loss,
        clip_low=a.clip_low,
        clip_high=a.clip_high,
        beta=a.beta,
        kl_estimator=a.kl_estimator,
        aggregation=a.aggregation,
        max_len=max_len,
    )


def reference_logprobs(
    reference, batch: RowBatch, chunks: list[Tensor], temperature: float
) -> Tensor | None:
    """Frozen reference log-probs [B, C] of the batch (no gradient), computed over trimmed
    micro-batches `chunks`; None without a reference (beta = 0)."""
    if reference is None:
        return None
    ref = torch.zeros_like(batch.old_logprobs)
    for chunk in chunks:
        logps = reference.logprobs(
            *batch.select(chunk).trimmed().model_inputs, temperature=temperature
        )
        ref[chunk, : logps.shape[1]] = logps
    return ref


def _pad(t: Tensor, width: int, value: float, left: bool) -> Tensor:
    extra = width - t.shape[1]
    if extra == 0:
        return t
    pad = t.new_full((t.shape[0], extra), value)
    return torch.cat([pad, t] if left else [t, pad], dim=1)


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0, so that training-mode log-probs equal sampling ones."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def linear_warmup(warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier after s optimizer steps: min(1, (s + 1) / warmup_steps), or 1
    without warm-up (for `torch.optim.lr_scheduler.LambdaLR`).

    Example: linear_warmup(4) gives 0.25, 0.5, 0.75, 1.0, 1.0, ... for s = 0, 1, 2, ...
    """
    return lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0
