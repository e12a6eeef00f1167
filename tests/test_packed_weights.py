"""agpo_lab.rollout.packed_weights: products on weights packed for oneDNN equal the plain ones."""

from __future__ import annotations

import pytest
import torch

from agpo_lab.rollout.fast_decode import FastDecoder
from agpo_lab.rollout.packed_weights import can_pack, is_packed, linear, linear_add, pack

needs_bf16_onednn = pytest.mark.skipif(
    not can_pack(torch.ones(2, 2, dtype=torch.bfloat16)),
    reason="this CPU's oneDNN has no bfloat16 products (nothing is packed here)",
)


def test_the_worked_examples():
    x, weight = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert linear(x, weight).tolist() == [[1.0, 3.0]]
    assert linear_add(torch.tensor([[10.0, 10.0]]), x, weight).tolist() == [[11.0, 13.0]]
    assert linear_add(torch.zeros(1, 2), x, weight, torch.tensor([1.0, 2.0])).tolist() == [
        [2.0, 5.0]
    ]


def test_only_bfloat16_cpu_weights_are_packed():
    weight = torch.randn(8, 4)
    assert pack(weight) is weight  # float32 products read the weight as it is
    one_d = weight[0].bfloat16()
    assert not can_pack(one_d) and pack(one_d) is one_d


@needs_bf16_onednn
@pytest.mark.parametrize("rows", [1, 5, 64, 300])
def test_packed_products_equal_the_plain_ones_for_any_row_count(rows):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 40, generator=gen).bfloat16()
    bias = torch.randn(96, generator=gen).bfloat16()
    x = torch.randn(rows, 40, generator=gen).bfloat16()
    residual = torch.randn(rows, 96, generator=gen).bfloat16()
    packed = pack(weight)
    assert is_packed(packed) and not is_packed(weight)
    torch.testing.assert_close(linear(x, packed), torch.nn.functional.linear(x, weight))
    torch.testing.assert_close(linear(x, packed, bias), torch.nn.functional.linear(x, weight, bias))
    torch.testing.assert_close(linear_add(residual, x, packed), linear_add(residual, x, weight))
    # with a bias too, oneDNN rounds once where addmm and the addition round twice: both are
    # within a bfloat16 step (2^-8 relative) of the float32 result
    exact = residual.float() + x.float() @ weight.float().T + bias.float()
    step = exact.abs().max().item() * 2**-8
    for got in (linear_add(residual, x, packed, bias), linear_add(residual, x, weight, bias)):
        torch.testing.assert_close(got.float(), exact, atol=2 * step, rtol=0)
    with torch.inference_mode():  # where the rollout runs them
        torch.testing.assert_close(linear(x, packed), torch.nn.functional.linear(x, weight))


@needs_bf16_onednn
def test_a_bfloat16_decoder_packs_its_weights_unless_compiled():
    from tests.test_fast_decode import _model

    model = _model("qwen2")  # q/k/v biases ride on the packed product
    decoder = FastDecoder(model, dtype=torch.bfloat16)
    assert all(is_packed(f.qkv_weight) and is_packed(f.down_weight) for f in decoder.fused)
    assert is_packed(decoder.head[0])
    assert not is_packed(FastDecoder(model, dtype=torch.bfloat16, compile=True).fused[0].qkv_weight)
    assert not is_packed(FastDecoder(model).fused[0].qkv_weight)  # float32
