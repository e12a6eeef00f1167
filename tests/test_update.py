"""The update's speed-ups change no gradient: length-sorted trimmed micro-batches, token budgets,
skipped zero-gradient rows, the compiled forward; and the rollout's entropy equals the loss forward's."""

from __future__ import annotations

import pytest
import torch

from agpo_lab.algorithms.loss import policy_loss
from agpo_lab.config import RolloutConfig, load_config
from agpo_lab.rollout import completion_logprobs, generate
from agpo_lab.training.batch import RowBatch
from agpo_lab.training.planning import micro_batches, plan_update
from agpo_lab.training.trainer import Trainer
from tests.conftest import ParityTask, comparable, make_config


def as_lists(chunks: list[torch.Tensor]) -> list[list[int]]:
    return [c.tolist() for c in chunks]


def test_micro_batches_sort_by_length_and_pack_to_a_budget():
    rows, prompts = torch.arange(4), torch.ones(4, dtype=torch.long)
    completions = torch.tensor([4, 8, 5, 7])
    assert as_lists(micro_batches(rows, prompts, completions, 2)) == [[0, 2], [3, 1]]
    assert as_lists(micro_batches(rows, prompts, completions, 1, 12)) == [[0, 2], [3], [1]]
    assert as_lists(micro_batches(rows, prompts, completions, 9)) == [[0], [2], [3], [1]]
    assert as_lists(micro_batches(rows, prompts, completions, 1, 1)) == [[0], [2], [3], [1]]
    assert as_lists(micro_batches(torch.tensor([3, 1]), prompts, completions, 1, 100)) == [[3, 1]]
    assert micro_batches(torch.tensor([], dtype=torch.long), prompts, completions, 2) == []
    prompts, one_prompt = torch.full((4,), 4), torch.zeros(4, dtype=torch.long)
    assert as_lists(micro_batches(rows, prompts, completions, 1, 20)) == [[0, 2], [3], [1]]
    shared = micro_batches(rows, prompts, completions, 1, 20, one_prompt)
    assert as_lists(shared) == [[0, 2], [3, 1]]  # docstring example: 4 + 2 x 8 = 20


def test_micro_batches_order_rows_by_prompt_when_that_computes_fewer_tokens():
    rows, groups = torch.arange(4), torch.tensor([0, 1, 0, 1])
    prompts, completions = torch.full((4,), 6), torch.tensor([1, 1, 2, 2])
    # by length: [0, 1] (2 prompts: 12 + 2 x 1) and [2, 3] (12 + 2 x 2): 30 tokens;
    # by prompt: [0, 2] and [1, 3], 6 + 2 x 2 each: 20 tokens
    assert as_lists(micro_batches(rows, prompts, completions, 1, 16, groups)) == [[0, 2], [1, 3]]
    assert as_lists(micro_batches(rows, prompts, completions, 1, 16)) == [[0, 1], [2, 3]]
    # lengths that differ within a prompt: by length packs as tightly, in fewer passes
    groups, prompts, completions = (
        torch.tensor([0, 0, 1, 1]),
        torch.ones(4),
        torch.tensor([1, 8, 1, 8]),
    )
    assert as_lists(micro_batches(rows, prompts.long(), completions, 1, 10, groups)) == [
        [0, 2], [1], [3]
    ]  # fmt: skip


def test_trimmed_rows_give_the_same_logprobs(char_tokenizer):
    from agpo_lab.models.tiny import build_tiny_causal_lm

    model = build_tiny_causal_lm(char_tokenizer).eval()
    prompts = ["1+1=", "(12+34)*5=", "7*8=", "99-45="]
    out = generate(model, char_tokenizer, prompts, RolloutConfig(max_new_tokens=10))
    n = len(prompts)
    batch = RowBatch(
        out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask, out.logprobs,
        torch.zeros(n), torch.ones(n, dtype=torch.bool),
    )  # fmt: skip
    short = batch.select(torch.tensor([0, 2]))
    trimmed = short.trimmed()
    assert trimmed.prompt_ids.shape[1] == int(short.prompt_mask.sum(1).max())
    assert trimmed.completion_ids.shape[1] == int(short.completion_mask.sum(1).max())
    full = completion_logprobs(model, *short.model_inputs)
    cut = completion_logprobs(model, *trimmed.model_inputs)
    torch.testing.assert_close(cut, full[:, : cut.shape[1]], atol=1e-5, rtol=0)
    assert (full[:, cut.shape[1] :] == 0).all()


def test_rollout_entropy_equals_the_loss_forward_entropy(char_tokenizer):
    from agpo_lab.models.tiny import build_tiny_causal_lm

    model = build_tiny_causal_lm(char_tokenizer).eval()
    cfg = RolloutConfig(max_new_tokens=12, temperature=0.7)
    out = generate(model, char_tokenizer, ["1+1=", "7*8="], cfg)
    inputs = (out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask)
    _, entropy = completion_logprobs(model, *inputs, temperature=0.7, return_entropy=True)
    torch.testing.assert_close(out.entropy, entropy, atol=1e-5, rtol=0)
    assert (out.entropy[out.completion_mask == 1] > 0).all()


def _gradient_of_update(trainer: Trainer, batch: RowBatch) -> list[torch.Tensor]:
    """The gradient the trainer's update hands to its optimizer (the step itself is skipped)."""
    grads = []
    trainer.state.optimizer.step = lambda: grads.append([p.grad.clone() for p in trainer.params])
    trainer._update(batch)
    return grads[0]


def _plain_gradient(trainer: Trainer, batch: RowBatch) -> list[torch.Tensor]:
    """The textbook computation: every row in one untrimmed forward, one backward."""
    a = trainer.cfg.algorithm
    trainer.policy.zero_grad()
    logps = completion_logprobs(trainer.policy, *batch.model_inputs)
    loss, _ = policy_loss(
        logps, batch.old_logprobs, batch.advantages, batch.loss_mask,
        aggregation=a.aggregation, max_len=trainer.cfg.rollout.max_new_tokens,
    )  # fmt: skip
    loss.backward()
    grads = [p.grad.clone() for p in trainer.params]
    trainer.policy.zero_grad()
    return grads


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # one micro-batch; zero-advantage rows skipped
        ["optim.grad_accumulation=4"],
        ["optim.micro_batch_tokens=40"],
        ["algorithm.aggregation=token_mean", "optim.micro_batch_tokens=60"],
        ["algorithm.aggregation=seq_mean_token_sum_norm", "optim.grad_accumulation=2"],
        ["algorithm.zero_variance=drop", "optim.micro_batch_tokens=50"],
        ["optim.share_prompts=false", "optim.micro_batch_tokens=40"],
        ["optim.pack_rows=false", "optim.micro_batch_tokens=40"],
        ["optim.share_prompts=false", "optim.pack_rows=false", "optim.grad_accumulation=2"],
    ],
)
def test_update_gradient_equals_the_plain_full_batch_gradient(tiny_model_dir, tmp_path, overrides):
    cfg = make_config(tiny_model_dir, tmp_path, "optim.max_grad_norm=0", *overrides)
    trainer = Trainer(cfg, task=ParityTask())
    assert trainer._share_prompts == ("optim.share_prompts=false" not in overrides)
    assert trainer._pack_rows == ("optim.pack_rows=false" not in overrides)
    batch, _ = trainer._rollout(trainer.problems[:4])  # problems 0 and 3: always solved
    assert (batch.advantages == 0).sum() >= 8 and (batch.advantages != 0).any()
    assert len(set(batch.completion_mask.sum(1).tolist())) > 1  # rows of different lengths
    expected = _plain_gradient(trainer, batch)
    got = _gradient_of_update(trainer, batch)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-7, rtol=1e-5)


def test_a_batch_without_gradient_still_takes_an_adam_step(tiny_model_dir, tmp_path):
    trainer = Trainer(make_config(tiny_model_dir, tmp_path), task=ParityTask())
    batch, _ = trainer._rollout(trainer.problems[:4])
    batch.advantages.zero_()
    grads = _gradient_of_update(trainer, batch)
    assert len(grads) == len(trainer.params) and all((g == 0).all() for g in grads)


def test_micro_batch_tokens_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="optim.micro_batch_tokens"):
        load_config(None, ["optim.micro_batch_tokens=0"])


@pytest.mark.slow
def test_compiled_update_gives_the_same_metrics(tiny_model_dir, tmp_path):
    runs = []
    for compiled in ("false", "true"):
        cfg = make_config(tiny_model_dir, tmp_path / compiled, f"optim.compile_update={compiled}")
        runs.append(comparable(Trainer(cfg, task=ParityTask()).train()))
    for eager, compiled in zip(*runs, strict=True):
        assert eager.keys() == compiled.keys()
        for key, value in eager.items():
            if isinstance(value, float):
                assert compiled[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key


def _hand_batch(advantages, active, completion_lengths, width: int = 6) -> RowBatch:
    """A RowBatch of one-token prompts with the given per-row completion lengths."""
    n = len(advantages)
    lengths = torch.tensor(completion_lengths)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
    return RowBatch(
        prompt_ids=torch.ones(n, 1, dtype=torch.long),
        prompt_mask=torch.ones(n, 1, dtype=torch.long),
        completion_ids=torch.ones(n, width, dtype=torch.long),
        completion_mask=mask,
        old_logprobs=torch.zeros(n, width),
        advantages=torch.tensor(advantages, dtype=torch.float),
        active=torch.tensor(active),
    )


def test_plan_update_worked_example_from_its_docstring():
    batch = _hand_batch([1.0, -1.0, 0.0, 0.0], [True] * 4, [3, 2, 4, 5])
    plan = plan_update(batch, epochs=1, mini_batch_rows=4, grad_accumulation=2)
    assert len(plan.steps) == 1 and plan.steps[0].first
    passes = plan.steps[0].micro_batches
    assert [p.rows.tolist() for p in passes] == [[1], [0]]  # shortest first
    assert [p.share for p in passes] == [0.25, 0.25]
    assert [c.tolist() for c in plan.reference_chunks] == [[1, 0], [2, 3]]  # every row
    with_kl = plan_update(batch, epochs=1, mini_batch_rows=4, grad_accumulation=2, beta=0.1)
    assert sorted(r for p in with_kl.steps[0].micro_batches for r in p.rows.tolist()) == [
        0,
        1,
        2,
        3,
    ]


def test_plan_update_weights_shuffles_and_skips():
    # rows 0-3: a dropped group (no weight); rows 4-7: a mixed group
    batch = _hand_batch([0.0] * 4 + [1.0, -1.0, 1.0, -1.0], [False] * 4 + [True] * 4,
                        [1, 2, 3, 4, 2, 4, 1, 3])  # fmt: skip
    by_tokens = plan_update(batch, epochs=1, mini_batch_rows=8, token_mean=True)
    (step,) = by_tokens.steps
    assert step.micro_batches[0].share == pytest.approx(1.0)  # all of the active tokens
    assert sorted(step.micro_batches[0].rows.tolist()) == [4, 5, 6, 7]
    # mini-batches of 4 shuffled rows, two epochs
    gen = torch.Generator().manual_seed(0)
    plan = plan_update(batch, epochs=2, mini_batch_rows=4, generator=gen)
    again = plan_update(
        batch, epochs=2, mini_batch_rows=4, generator=torch.Generator().manual_seed(0)
    )
    rows = [[p.rows.tolist() for p in s.micro_batches] for s in plan.steps]
    assert rows == [[p.rows.tolist() for p in s.micro_batches] for s in again.steps]  # seeded
    replay, expected = torch.Generator().manual_seed(0), []
    for epoch in range(2):  # the same permutations: a mini-batch with no active row is skipped
        order = torch.randperm(8, generator=replay)
        expected += [epoch for start in (0, 4) if (order[start : start + 4] >= 4).any()]
    assert [s.epoch for s in plan.steps] == expected
    assert [s.first for s in plan.steps] == [True] + [False] * (len(plan.steps) - 1)
    for step in plan.steps:  # shares are each pass's fraction of its mini-batch's active rows
        active = sum(r >= 4 for p in step.micro_batches for r in p.rows.tolist())
        assert sum(p.share for p in step.micro_batches) == pytest.approx(active / max(active, 1))


def test_plan_update_under_ddp_computes_every_row_in_as_many_passes_as_the_busiest_process():
    batch = _hand_batch([1.0, 0.0, 0.0, 0.0], [True] * 4, [3, 2, 4, 5])
    plan = plan_update(batch, epochs=1, mini_batch_rows=4, token_budget=100,
                       compute_all_rows=True, max_over_processes=lambda n: 3)  # fmt: skip
    passes = plan.steps[0].micro_batches
    assert len(passes) == 3
    assert sorted(r for p in passes for r in p.rows.tolist()) == [0, 1, 2, 3]
    nowhere = plan_update(_hand_batch([0.0] * 2, [False] * 2, [1, 1]), epochs=1,
                          mini_batch_rows=2, sum_over_processes=lambda total: total)  # fmt: skip
    assert nowhere.steps == []  # no weight on any process: no optimizer step
