"""Tests of agpo_lab.rollout.sampling and .inputs: top-k / top-p filters, token sampling, positions, left padding."""

from __future__ import annotations

import math

import pytest
import torch

from agpo_lab.rollout.inputs import left_pad, positions_from_mask
from agpo_lab.rollout.sampling import filter_top_k, filter_top_p, sample_next_token


def test_filter_top_k_worked_example():
    out = filter_top_k(torch.tensor([[1.0, 3.0, 2.0]]), 2)
    assert out.tolist() == [[float("-inf"), 3.0, 2.0]]
    assert torch.equal(filter_top_k(torch.tensor([[1.0, 2.0]]), 0), torch.tensor([[1.0, 2.0]]))


def test_filter_top_p_worked_example():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    kept = filter_top_p(logits, 0.7).isfinite()
    assert kept.tolist() == [[True, True, False]]
    # The most likely token always survives, even for a tiny p; order in the row does not matter.
    assert filter_top_p(torch.tensor([[0.1, 0.9]]).log(), 0.01).isfinite().tolist() == [
        [False, True]
    ]


def test_positions_from_mask_start_at_first_real_token():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 1], [0, 1, 2]]


def test_left_pad_worked_example():
    ids, mask = left_pad([[5], [6, 7]], pad_id=0)
    assert ids.tolist() == [[0, 5], [6, 7]] and mask.tolist() == [[0, 1], [1, 1]]


def test_greedy_is_argmax_with_unscaled_logprobs():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    tokens, logprobs = sample_next_token(logits, temperature=0.0)
    assert tokens.tolist() == [1, 0]
    torch.testing.assert_close(logprobs, logits.log_softmax(-1)[[0, 1], [1, 0]])


def test_sampled_logprobs_are_of_the_scaled_full_distribution():
    logits = torch.randn(256, 7, generator=torch.Generator().manual_seed(0))
    for top_k, top_p in [(0, 1.0), (2, 1.0), (0, 0.5)]:
        gen = torch.Generator().manual_seed(1)
        tokens, logprobs = sample_next_token(logits, 0.5, top_k, top_p, generator=gen)
        expected = (logits / 0.5).log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
        torch.testing.assert_close(logprobs, expected)
        allowed = filter_top_p(filter_top_k(logits / 0.5, top_k), top_p).isfinite()
        assert allowed.gather(-1, tokens[:, None]).all(), "drew a token the filters removed"
    # Unfiltered sampling really samples: 256 rows of 7 tokens are not all the argmax.
    tokens, _ = sample_next_token(logits, 1.0, generator=torch.Generator().manual_seed(2))
    assert (tokens != logits.argmax(-1)).any()


def test_same_generator_seed_same_tokens():
    logits = torch.randn(64, 11, generator=torch.Generator().manual_seed(0))
    a, _ = sample_next_token(logits, 1.0, generator=torch.Generator().manual_seed(3))
    b, _ = sample_next_token(logits, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_draw_categorical_worked_example_and_zero_probability_tokens():
    from agpo_lab.rollout.sampling import draw_categorical

    probs = torch.tensor([[0.2, 0.0, 0.8]]).repeat(4000, 1)
    tokens = draw_categorical(probs, torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0, 2}  # index 1 has probability 0: never drawn
    assert abs((tokens == 0).float().mean().item() - 0.2) < 0.03
    # unnormalised weights (the filtered softmax's leftovers) are read relative to the row sum
    weights = torch.tensor([[0.0, 3.0, 0.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    drawn = draw_categorical(weights.repeat(2000, 1), torch.Generator().manual_seed(1)).view(-1, 2)
    assert set(drawn[:, 0].tolist()) == {1, 3} and set(drawn[:, 1].tolist()) == {0}
    assert abs((drawn[:, 0] == 1).float().mean().item() - 0.75) < 0.03


def test_draw_categorical_matches_the_distribution():
    from agpo_lab.rollout.sampling import draw_categorical

    gen = torch.Generator().manual_seed(5)
    probs = torch.randn(1, 50, generator=gen).mul(2).softmax(-1)
    n = 200_000
    tokens = draw_categorical(probs.expand(n, -1), gen)
    frequency = torch.bincount(tokens, minlength=50).double() / n
    # every frequency within 5 standard errors of its probability
    stderr = (probs[0].double() * (1 - probs[0].double()) / n).sqrt()
    assert ((frequency - probs[0]).abs() <= 5 * stderr + 1e-9).all()


def test_two_level_draw_picks_the_flat_draws_token():
    from agpo_lab.rollout import sampling

    gen = torch.Generator().manual_seed(7)
    vocab = 5 * sampling.BLOCK + 37  # a partial last block
    probs = torch.randn(512, vocab, generator=gen).mul(3).softmax(-1)
    probs[:, 300:700] = 0.0  # whole and partial blocks of filtered-out tokens
    two_level = sampling.draw_categorical(probs, torch.Generator().manual_seed(8))
    u = torch.rand(512, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    cdf = probs.double().cumsum(-1)
    flat = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
    assert torch.equal(two_level, flat)
    assert not ((two_level >= 300) & (two_level < 700)).any()


def test_two_level_draw_never_picks_a_zero_probability_token_at_a_blocks_end():
    from agpo_lab.rollout import sampling

    vocab, block = 8 * sampling.BLOCK, sampling.BLOCK
    probs = torch.zeros(4000, vocab)
    probs[:, block + 3] = 1.0  # one live token early in block 1, the rest of the block is 0
    probs[:, 5 * block] = 3.0
    drawn = sampling.draw_categorical(probs, torch.Generator().manual_seed(2))
    assert set(drawn.tolist()) == {block + 3, 5 * block}
    assert abs((drawn == block + 3).float().mean().item() - 0.25) < 0.03


def test_entropy_of_a_row_with_impossible_tokens():
    logits = torch.tensor([[0.0, 0.0, float("-inf")], [1.0, 2.0, 3.0]])
    _, _, entropy = sample_next_token(logits, 1.0, generator=torch.Generator(), return_entropy=True)
    probs = logits.softmax(-1)
    expected = -(probs * probs.log()).nan_to_num().sum(-1)
    torch.testing.assert_close(entropy, expected)
    assert entropy[0].item() == pytest.approx(math.log(2))
