"""Padding-free passes (`rollout.packing`, `logprobs.packed_logits`): rows laid end to end give the
log-probs and gradients of one padded forward, and a pass takes its cheapest layout."""

from __future__ import annotations

import pytest
import torch

from agpo_lab.rollout.logprobs import (
    can_pack_rows,
    choose_layout,
    completion_logprobs,
    pass_layout,
)
from agpo_lab.rollout.packing import first_fit_decreasing, packed_inputs, packed_shape
from agpo_lab.training.planning import micro_batches
from tests.test_fast_decode import SIZES, _lora_model, _model
from tests.test_shared_prompts import _group_batch, _logprobs_and_grads


def test_first_fit_decreasing_and_packed_shape_worked_examples():
    assert first_fit_decreasing([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]
    assert first_fit_decreasing([9, 1], 4) == [[0], [1]]  # too long: a bin of its own
    assert first_fit_decreasing([2, 2, 2], 6) == [[0, 1, 2]]
    assert packed_shape([2, 2, 2], [5, 1, 3]) == (2, 6)


def test_packed_inputs_worked_example_from_its_docstring():
    ids, positions, index = packed_inputs(
        torch.tensor([[0, 7], [8, 9]]),
        torch.tensor([[0, 1], [1, 1]]),
        torch.tensor([[1, 2], [3, 0]]),
        torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
    )
    assert ids.tolist() == [[7, 1], [8, 9]]
    assert positions.tolist() == [[0, 1], [0, 1]]
    assert index.tolist() == [[0, 1], [3, 0]]


def test_packed_inputs_lay_rows_end_to_end_with_restarting_positions():
    prompt_ids, prompt_mask, completion_ids, completion_mask = _group_batch()
    ids, positions, index = packed_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask)
    prompts, completions = prompt_mask.sum(1), completion_mask.sum(1).long()
    lengths = prompts + completions - 1
    assert ids.shape[1] == lengths.max() and len(ids) < len(prompt_ids)  # fewer rows than B
    assert (positions == 0).sum() >= len(prompt_ids)  # every row starts a sequence at 0
    flat_ids, flat_positions = ids.flatten(), positions.flatten()
    for row in range(len(prompt_ids)):
        real = torch.cat(
            [prompt_ids[row, prompt_mask[row] == 1], completion_ids[row, : completions[row]]]
        )
        first = int(index[row, 0]) - int(prompts[row]) + 1  # where the row's tokens start
        span = slice(first, first + int(lengths[row]))
        assert flat_ids[span].tolist() == real[:-1].tolist()  # the last token is never an input
        assert flat_positions[span].tolist() == list(range(int(lengths[row])))


def test_pass_layout_worked_example_and_ties():
    assert pass_layout([4, 4], [8, 2], [0, 0], pack=True) == ("shared", 20, 20)
    assert pass_layout([4, 4], [8, 2], [0, 0]) == ("shared", 20, 20)
    assert pass_layout([4, 4], [8, 2], pack=True) == ("packed", 22, 22)
    assert pass_layout([4, 4], [8, 2]) == ("padded", 24, 24)
    assert pass_layout([3, 3], [5, 5], [0, 1]) == ("padded", 16, 16)  # a tie: the plainer layout
    assert pass_layout([3, 3], [5, 5], [0, 1], pack=True) == (
        "packed",
        14,
        14,
    )  # 2 rows of 3 + 5 - 1
    # short prompts, completions of very different lengths: packing beats sharing (38)
    assert pass_layout([2] * 4, [9, 2, 3, 4], [0] * 4, pack=True) == ("packed", 30, 30)
    # a large LM head: a packed pass also computes logits over the prompts (12 + 9 < 11 + 11)
    assert pass_layout([4, 4], [8, 2], pack=True, head_share=0.5) == ("padded", 24, 21)


def test_lm_head_share_worked_examples():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from agpo_lab.rollout.logprobs import lm_head_share

    for tied in (True, False):
        model = Qwen2ForCausalLM(Qwen2Config(**SIZES, tie_word_embeddings=tied))
        head = model.get_output_embeddings().weight.numel()
        # the head's weight counts once when tied; untied, the input embeddings are no product
        others = sum(p.numel() for p in model.parameters()) - head * (1 if tied else 2)
        assert lm_head_share(model) == pytest.approx(head / (head + others))
    assert 0 < lm_head_share(_lora_model()) < 1


def _assert_packing_changes_nothing(model, inputs) -> None:
    """Packed log-probs and every gradient equal the padded forward's (padding stays 0)."""
    plain, plain_grads = _logprobs_and_grads(model, inputs)
    packed, packed_grads = _logprobs_and_grads(model, inputs, pack_rows=True)
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)
    assert (packed[inputs[3] == 0] == 0).all()
    for got, expected in zip(packed_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3", "llama_mha"])
def test_packed_forward_gives_the_plain_logprobs_and_gradients(arch):
    model = _model(arch).train()
    assert can_pack_rows(model)
    inputs = _group_batch()
    assert choose_layout(*inputs[:2], inputs[3], share_prompts=False, pack_rows=True) == "packed"
    _assert_packing_changes_nothing(model, inputs)


def test_packed_forward_under_lora_and_activation_checkpointing():
    _assert_packing_changes_nothing(_lora_model().train(), _group_batch())
    model = _model("llama")
    model.activation_checkpointing_enable()
    model.train()
    assert can_pack_rows(model)  # no KV cache needed: checkpointing can pack
    _assert_packing_changes_nothing(model, _group_batch())


def test_packed_forward_edge_cases_and_entropy():
    model = _model("qwen2")
    with torch.no_grad():
        one_token = _group_batch(completion_width=1)
        torch.testing.assert_close(
            completion_logprobs(model, *one_token, pack_rows=True),
            completion_logprobs(model, *one_token),
        )
        inputs = _group_batch()
        plain = completion_logprobs(model, *inputs, return_entropy=True)
        packed = completion_logprobs(model, *inputs, return_entropy=True, pack_rows=True)
        for got, expected in zip(packed, plain, strict=True):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        row = tuple(t[:1] for t in inputs)  # a single row: one sequence, nothing to pack
        torch.testing.assert_close(
            completion_logprobs(model, *row, pack_rows=True), completion_logprobs(model, *row)
        )


def test_models_without_sequence_boundaries_from_positions_are_not_packed():
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    assert not can_pack_rows(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)))
    assert not can_pack_rows(MistralForCausalLM(MistralConfig(**SIZES, sliding_window=4)))
    flash = _model("qwen2")  # flash attention reads restarting positions only in one row
    flash.config._attn_implementation = "flash_attention_2"
    assert not can_pack_rows(flash)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    inputs = _group_batch()
    with torch.no_grad():  # asked to pack, it runs the padded forward
        torch.testing.assert_close(
            completion_logprobs(gpt2, *inputs, pack_rows=True), completion_logprobs(gpt2, *inputs)
        )


def test_micro_batches_budget_packed_passes_by_their_packed_tokens():
    rows, prompts = torch.arange(4), torch.ones(4, dtype=torch.long)
    completions = torch.tensor([4, 8, 5, 7])
    # padded: [0, 2] is 2 x 6 = 12, three rows 3 x 8 = 24; packed: row lengths 4, 8, 5, 7
    assert [c.tolist() for c in micro_batches(rows, prompts, completions, 1, 12)] == [
        [0, 2], [3], [1]
    ]  # fmt: skip
    # packed in width 8: [0, 2, 3] -> bins {7}, {5}, {4}: 3 x 7 = 21 > 16; [0, 2] -> 2 x 5 = 10
    packed = micro_batches(rows, prompts, completions, 1, 16, pack=True)
    assert [c.tolist() for c in packed] == [[0, 2], [3, 1]]  # 7 + 8 in width 8 -> 2 x 8 = 16
    short = torch.tensor([2, 2, 2, 9])  # three short rows fit beside each other
    packed = micro_batches(rows, prompts, short, 1, 18, pack=True)
    assert [c.tolist() for c in packed] == [[0, 1, 2, 3]]  # 9 + (2 + 2 + 2) in width 9: 18


def test_the_update_reports_its_real_and_its_padded_tokens():
    from agpo_lab.training.planning import plan_update
    from agpo_lab.training.trainer import _computed_tokens
    from tests.test_update import _hand_batch

    batch = _hand_batch([1.0, -1.0, 1.0, -1.0], [True] * 4, [3, 2, 4, 5])
    plan = plan_update(batch, epochs=1, mini_batch_rows=4)
    real = 4 * 1 + (3 + 2 + 4 + 5)  # one-token prompts
    assert _computed_tokens(batch, plan, share=False, pack=False) == (real, 4 * (1 + 5))
    # packed: row lengths 3, 2, 4, 5 (the last completion token is no input) in width 5
    assert _computed_tokens(batch, plan, share=False, pack=True) == (real, 3 * 5)
