"""Planning the update: which rows each optimizer step computes, in how many passes, with what weight.

`plan_update` is a pure function of the batch and the settings (plus the data generator for the
mini-batch shuffle): the trainer's update loop then only executes the plan. Three ideas live here:

- **Mini-batches.** mu epochs over the rollout batch; each epoch shuffles whole rows into
  mini-batches of `mini_batch_rows` (one optimizer step each), unless one mini-batch holds them all.
- **Rows with no gradient are not computed.** With beta = 0 a row whose advantage is 0 has a loss of
  exactly 0 for any ratio (min(rho * 0, clip(rho) * 0) = 0), and a dropped group's rows have no
  loss at all; they get no forward and no backward, but their weight still counts in the
  normaliser. A mini-batch of rows with no weight at all (only dropped groups) gets no optimizer
  step either. Under DDP every process runs the same passes, so every row is computed there.
- **Micro-batches of similar length.** The computed rows are sorted by length and split into
  micro-batches (`micro_batches`); each pass's loss is weighted by its share of the mini-batch's
  weight (a row's weight: 1 per active row, or its tokens under token_mean), so the gradient equals
  the plain full-batch gradient (tests/test_update.py checks it). A pass counts the tokens of its
  cheapest layout in the budget (padded, each distinct prompt once, or rows packed without padding:
  `rollout.logprobs.pass_layout`), and a group's rows are kept in one pass when that computes
  fewer tokens than length order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from agpo_lab.rollout.inputs import distinct_prompts
from agpo_lab.rollout.logprobs import pass_layout
from agpo_lab.rollout.packing import first_fit_decreasing
from agpo_lab.training.batch import RowBatch


@dataclass
class MicroBatch:
    """One forward + backward pass."""

    rows: Tensor
    """Row ids of the batch, shortest first."""
    share: float
    """This pass's weight in its mini-batch loss: its rows' weight / the mini-batch's weight."""


@dataclass
class OptimizerStep:
    """One AdamW step and the passes whose gradients it sums."""

    epoch: int
    """Inner epoch (0 .. mu - 1)."""
    first: bool
    """The update's first step: the policy has not moved since it sampled (the ratio check)."""
    micro_batches: list[MicroBatch] = field(default_factory=list)
    """The passes; none when every gradient is exactly 0 (Adam still takes its step)."""


@dataclass
class UpdatePlan:
    """Everything the update loop does, in order."""

    reference_chunks: list[Tensor]
    """Micro-batches of all rows for the reference log-probs (beta > 0)."""
    steps: list[OptimizerStep]
    """The optimizer steps, in order."""


def _identity(value: float) -> float:
    return value


def plan_update(
    batch: RowBatch,
    *,
    epochs: int,
    mini_batch_rows: int,
    grad_accumulation: int = 1,
    token_budget: int | None = None,
    token_mean: bool = False,
    beta: float = 0.0,
    generator: torch.Generator | None = None,
    compute_all_rows: bool = False,
    sum_over_processes: Callable[[float], float] = _identity,
    max_over_processes: Callable[[float], float] = _identity,
    share_prompts: bool = False,
    pack_rows: bool = False,
    head_share: float = 0.0,
) -> UpdatePlan:
    """The optimizer steps of one update of `batch` (see the module docstring).

    epochs: mu. mini_batch_rows: rows per optimizer step on this process. grad_accumulation /
    token_budget: passes per step (`micro_batches`). token_mean: a row weighs its token count
    (DAPO's token_mean aggregation), else 1. generator: draws one permutation per epoch when a
    mini-batch holds fewer rows than the batch. compute_all_rows, sum_over_processes,
    max_over_processes: what DDP needs (every process computes every row, agrees whether a
    mini-batch has weight anywhere, and runs as many passes as the busiest one). share_prompts:
    the passes may compute each distinct prompt once (`micro_batches`' prompt_groups); pack_rows:
    the passes may pack rows without padding (`micro_batches`' pack); head_share: the model's
    `logprobs.lm_head_share`, which weighs the layouts' costs.

    Example: one group of G=4 with advantages [1, -1, 0, 0], beta 0, one epoch, one mini-batch,
    grad_accumulation 2 -> one step of two passes, one holding row 0 and one row 1, each with
    share 1/4 (each active row weighs 1 of the mini-batch's 4); rows 2 and 3 are not computed.
    """
    rows = batch.advantages.numel()
    device = batch.advantages.device
    prompt_lengths, completion_lengths = batch.row_lengths()
    groups = distinct_prompts(batch.prompt_ids, batch.prompt_mask)[2] if share_prompts else None

    def split(ids: Tensor, count: int) -> list[Tensor]:
        return micro_batches(
            ids, prompt_lengths, completion_lengths, count, token_budget, groups, pack_rows,
            head_share,
        )  # fmt: skip

    row_weight = batch.loss_mask.sum(1) if token_mean else batch.active.float()
    computed = batch.active & ((batch.advantages != 0) | (beta > 0))
    computed = computed | compute_all_rows
    plan = UpdatePlan(split(torch.arange(rows, device=device), grad_accumulation), [])
    for epoch in range(epochs):
        order = torch.arange(rows)
        if rows > mini_batch_rows:  # shuffle whole rows across mini-batches
            order = torch.randperm(rows, generator=generator)
        for start in range(0, rows, mini_batch_rows):
            ids = order[start : start + mini_batch_rows].to(device)
            total = row_weight[ids].sum()
            if sum_over_processes(total.item()) == 0:
                continue  # only dropped groups: no gradient, and no Adam momentum step either
            chunks = split(ids[computed[ids]], grad_accumulation)
            if compute_all_rows and token_budget:  # as many passes on every process
                most = int(max_over_processes(len(chunks)))
                chunks = micro_batches(
                    ids, prompt_lengths, completion_lengths, most, None, groups, pack_rows,
                    head_share,
                )  # fmt: skip
            total = total.clamp(min=1e-9)
            passes = [MicroBatch(c, (row_weight[c].sum() / total).item()) for c in chunks]
            plan.steps.append(OptimizerStep(epoch, epoch == 0 and start == 0, passes))
    return plan


def micro_batches(
    rows: Tensor,
    prompt_lengths: Tensor,
    completion_lengths: Tensor,
    count: int,
    token_budget: int | None = None,
    prompt_groups: Tensor | None = None,
    pack: bool = False,
    head_share: float = 0.0,
) -> list[Tensor]:
    """Split one mini-batch's row indices into micro-batches of rows of similar length.

    Rows are sorted by prompt + completion length (stable), so that a micro-batch trimmed to its
    longest prompt and completion (`RowBatch.trimmed`) carries little padding. Without
    `token_budget`: `count` micro-batches of near-equal row counts (fewer if there are fewer rows).
    With it: consecutive sorted rows are packed while the tokens their pass computes, padding
    included (`logprobs.pass_layout`: rows x (longest prompt + longest completion) for a padded
    pass), stay within the budget, at least one row each (verl's dynamic batch size); then `count`
    is ignored. prompt_lengths / completion_lengths are indexed by row id.
    Example: rows [0, 1, 2, 3], prompts all 1, completions [4, 8, 5, 7]: count 2 ->
    [[0, 2], [3, 1]]; token_budget 12 -> [[0, 2], [3], [1]] (3 rows of width 8 would be 24).

    `prompt_groups` (row id -> id of its prompt) is for passes that may compute each distinct
    prompt once (`logprobs.shared_prompt_logits`), `pack` for passes that may lay rows end to end
    without padding (`logprobs.packed_logits`); each pass is costed at its cheapest layout
    (`logprobs.pass_layout`, weighing the LM head by head_share) and counted in its tokens. With
    prompt_groups, rows may also be ordered by prompt (prompts by their longest row, rows by length
    within one) so that a prompt's rows share a pass; with pack, in the packed rows of the whole
    mini-batch (`packing.first_fit_decreasing`), so that short rows share a pass with long ones;
    whichever order costs least in all is used. Example: the rows above with prompts
    of 4 tokens and token_budget 20 -> [[0, 2], [3], [1]] (3 x (4 + 8) = 24 is over); as one
    shared prompt -> [[0, 2], [3, 1]] (4 + 2 x 8 = 20).
    """
    if rows.numel() == 0:
        return []
    total = prompt_lengths + completion_lengths
    by_length = rows[total[rows].argsort(stable=True)]
    orders = [by_length]
    if prompt_groups is not None:  # by prompt, prompts by their longest row (stable sorts)
        longest = torch.zeros_like(total).scatter_reduce(0, prompt_groups, total, "amax")
        by_prompt = by_length[prompt_groups[by_length].argsort(stable=True)]
        orders.append(by_prompt[longest[prompt_groups[by_prompt]].argsort(stable=True)])
    prompts, completions = prompt_lengths.tolist(), completion_lengths.tolist()
    if pack:  # short rows beside long ones: the packed rows of the whole mini-batch, in turn
        ids = by_length.tolist()
        lengths = [prompts[i] + completions[i] - 1 for i in ids]
        bins = first_fit_decreasing(lengths, max(lengths))
        orders.append(rows.new_tensor([ids[j] for packed_row in bins for j in packed_row]))
    groups = None if prompt_groups is None else prompt_groups.tolist()

    def layout(ids: list[int]) -> tuple[str, int, float]:
        return pass_layout(
            [prompts[i] for i in ids],
            [completions[i] for i in ids],
            None if groups is None else [groups[i] for i in ids],
            pack,
            head_share,
        )

    packings = []
    for order in orders:
        if token_budget is None:
            chunks = list(order.tensor_split(min(count, order.numel())))
        else:
            chunks = _pack(order, lambda ids: layout(ids)[1], token_budget)
        cost = sum(layout(c.tolist())[2] for c in chunks)
        packings.append((cost, len(chunks), chunks))
    return min(packings, key=lambda packing: packing[:2])[2]


def _pack(rows: Tensor, pass_tokens: Callable[[list[int]], int], budget: int) -> list[Tensor]:
    """Consecutive `rows` packed while a pass's `pass_tokens` stays within `budget` (at least one
    row per pass)."""
    ids, chunks, start = rows.tolist(), [], 0
    for end in range(1, len(ids)):
        if pass_tokens(ids[start : end + 1]) > budget:
            chunks.append(rows[start:end])
            start = end
    return [*chunks, rows[start:]]
