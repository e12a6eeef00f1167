"""Rows that share a prompt share its forward (`logprobs.shared_prompt_logits`): the same
log-probs and the same gradients as one forward over each row's prompt + completion."""

from __future__ import annotations

import pytest
import torch

from agpo_lab.rollout.inputs import distinct_prompts
from agpo_lab.rollout.logprobs import can_share_prompts, completion_logprobs
from tests.test_fast_decode import SIZES, _lora_model, _model


def test_distinct_prompts_worked_example_from_its_docstring():
    ids = torch.tensor([[5, 6], [5, 6], [0, 7]])
    mask = torch.tensor([[1, 1], [1, 1], [0, 1]])
    distinct, distinct_mask, inverse = distinct_prompts(ids, mask)
    assert distinct.tolist() == [[0, 7], [5, 6]]
    assert distinct_mask.tolist() == [[0, 1], [1, 1]]
    assert inverse.tolist() == [1, 1, 0]
    assert torch.equal(distinct[inverse], ids) and torch.equal(distinct_mask[inverse], mask)


def _group_batch(completion_width: int = 6) -> tuple[torch.Tensor, ...]:
    """3 prompts (two left-padded) x G=3 rows, completions of different lengths."""
    gen = torch.Generator().manual_seed(2)
    prompts = torch.randint(3, 58, (3, 5), generator=gen)
    prompt_mask = torch.ones_like(prompts)
    prompt_mask[1, :2] = 0
    prompt_mask[2, :1] = 0
    prompts = prompts.masked_fill(prompt_mask == 0, 0)
    prompt_ids, prompt_mask = prompts.repeat_interleave(3, 0), prompt_mask.repeat_interleave(3, 0)
    completion_ids = torch.randint(3, 58, (9, completion_width), generator=gen)
    lengths = torch.tensor([6, 2, 4, 1, 6, 3, 5, 5, 2]).clamp(max=completion_width)
    completion_mask = (torch.arange(completion_width)[None] < lengths[:, None]).float()
    return (
        prompt_ids,
        prompt_mask,
        completion_ids.masked_fill(completion_mask == 0, 0),
        completion_mask,
    )


def _logprobs_and_grads(model, inputs, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logprobs = completion_logprobs(model, *inputs, temperature=0.7, **kwargs)
    (logprobs * torch.linspace(-1, 1, logprobs.numel()).view_as(logprobs)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return logprobs.detach(), grads


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3", "llama_mha"])
def test_shared_prompt_forward_gives_the_plain_logprobs_and_gradients(arch):
    model = _model(arch).train()
    assert can_share_prompts(model)
    inputs = _group_batch()
    plain, plain_grads = _logprobs_and_grads(model, inputs)
    shared, shared_grads = _logprobs_and_grads(model, inputs, share_prompts=True)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    assert (shared[inputs[3] == 0] == 0).all()  # padding stays 0
    for got, expected in zip(shared_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_shared_prompt_forward_under_lora_trains_the_same_adapters():
    model = _lora_model().train()
    inputs = _group_batch()
    plain, plain_grads = _logprobs_and_grads(model, inputs)
    shared, shared_grads = _logprobs_and_grads(model, inputs, share_prompts=True)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in name for name in trained)
    for got, expected in zip(shared_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_shared_prompt_forward_edge_cases_and_entropy():
    model = _model("qwen2")
    with torch.no_grad():
        one_token = _group_batch(completion_width=1)  # only the prompt pass predicts anything
        torch.testing.assert_close(
            completion_logprobs(model, *one_token, share_prompts=True),
            completion_logprobs(model, *one_token),
        )
        inputs = _group_batch()
        plain = completion_logprobs(model, *inputs, return_entropy=True)
        shared = completion_logprobs(model, *inputs, return_entropy=True, share_prompts=True)
        for got, expected in zip(shared, plain, strict=True):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        distinct = tuple(t[::3] for t in inputs)  # every prompt once: the plain forward runs
        torch.testing.assert_close(
            completion_logprobs(model, *distinct, share_prompts=True),
            completion_logprobs(model, *distinct),
        )


def test_models_the_shared_forward_does_not_cover_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    assert not can_share_prompts(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)))
    windowed = MistralConfig(**SIZES, sliding_window=4)
    assert not can_share_prompts(MistralForCausalLM(windowed))
    model = _model("llama")
    model.activation_checkpointing_enable()
    assert can_share_prompts(model)  # in eval mode (the reference) the cache still works
    assert not can_share_prompts(model.train())  # checkpointing switches the KV cache off


def _head_weight_copies(model, inputs, **kwargs) -> list[list[int]]:
    """Shapes of the `bmm` operands that hold the LM head's weight once per row, forward and
    backward of one log-prob pass (the copy torch.matmul makes for a non-contiguous input)."""
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:  # fmt: skip
        completion_logprobs(model, *inputs, **kwargs).sum().backward()
    return [
        shape
        for event in prof.events()
        if event.name == "aten::bmm"
        for shape in event.input_shapes
        if len(shape) == 3 and sorted(shape[1:]) == sorted([hidden, vocab])
    ]


@pytest.mark.parametrize("share_prompts", [True, False], ids=["shared", "plain"])
def test_the_lm_head_runs_as_one_matrix_product_without_a_weight_copy_per_row(share_prompts):
    # logits_to_keep hands the head a strided view of the hidden states; with a frozen head (LoRA)
    # matmul then expanded the [V, D] weight to [rows, D, V] and ran bmm (a trained head's weight
    # makes matmul copy the input instead)
    model = _lora_model().train()
    assert not model.get_output_embeddings().weight.requires_grad
    inputs = _group_batch()
    assert _head_weight_copies(model, inputs, share_prompts=share_prompts) == []
    from agpo_lab.rollout import inputs as rollout_inputs

    head = model.get_output_embeddings()
    seen = []
    head.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    with rollout_inputs.contiguous_head_input(model):
        model(input_ids=inputs[0], logits_to_keep=1)
    assert seen == [True]
    model(input_ids=inputs[0], logits_to_keep=1)  # the hook is gone: transformers' strided view
    assert seen == [True, False]
