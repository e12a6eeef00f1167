"""Tests of agpo_lab.rollout.token_logprobs: the fused log-prob of the chosen token agrees with
log_softmax + gather, forward and backward, in float32 and bfloat16, chunked or not."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from agpo_lab.rollout import token_logprobs as fused
from agpo_lab.rollout.token_logprobs import token_logprobs


def _unfused(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, -1).gather(-1, tokens[..., None])[..., 0]


def test_worked_example_value_and_gradient():
    logits = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)
    logp = token_logprobs(logits, torch.tensor([1]))
    logp.sum().backward()
    assert logp.item() == pytest.approx(math.log(3 / 4), abs=1e-6)
    torch.testing.assert_close(logits.grad, torch.tensor([[-0.25, 0.25]]))


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_log_softmax_and_gather_forward_and_backward(dtype, temperature):
    torch.manual_seed(0)
    logits = (4 * torch.randn(3, 5, 37)).to(dtype).requires_grad_()
    tokens = torch.randint(0, 37, (3, 5))
    upstream = torch.randn(3, 5)
    ours = token_logprobs(logits, tokens, temperature)
    (ours * upstream).sum().backward()
    ours_grad, logits.grad = logits.grad, None
    plain = _unfused(logits, tokens, temperature or 1.0)
    (plain * upstream).sum().backward()
    assert ours.dtype == torch.float32 and ours_grad.dtype == dtype
    torch.testing.assert_close(ours, plain, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(
        ours_grad, logits.grad, atol=3e-6 if dtype == torch.float32 else 1e-2, rtol=0
    )


def test_chunks_give_the_same_result_as_one_pass(monkeypatch):
    torch.manual_seed(1)
    logits = torch.randn(2, 7, 50, dtype=torch.float64).float().requires_grad_()
    tokens = torch.randint(0, 50, (2, 7))
    whole = token_logprobs(logits, tokens, 0.9)
    whole.sum().backward()
    whole_grad, logits.grad = logits.grad, None
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 3 * 50)  # 3 rows a chunk, the last one short
    chunked = token_logprobs(logits, tokens, 0.9)
    chunked.sum().backward()
    torch.testing.assert_close(chunked, whole, atol=0, rtol=0)
    torch.testing.assert_close(logits.grad, whole_grad, atol=0, rtol=0)


def test_works_on_a_strided_view_and_with_no_rows():
    torch.manual_seed(2)
    base = torch.randn(2, 6, 11, requires_grad=True)
    view = base[:, 1:]  # what `.logits[:, :-1]`-style slicing hands over
    tokens = torch.randint(0, 11, (2, 5))
    token_logprobs(view, tokens).sum().backward()
    expected = torch.zeros_like(base)
    expected[:, 1:] = torch.func.grad(lambda x: _unfused(x, tokens, 1.0).sum())(view.detach())
    torch.testing.assert_close(base.grad, expected)
    empty = token_logprobs(torch.zeros(0, 4, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,)


def test_gradcheck_in_float64():
    logits = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 9, (4,))
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, tokens, 0.8), (logits,))
