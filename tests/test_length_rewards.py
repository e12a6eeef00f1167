"""Length rewards: AGPO's correct-only bonus, Kimi k1.5's penalty, DAPO's overlong punishment."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agpo_lab.algorithms.length_rewards import (
    agpo_length_reward,
    dapo_overlong_penalty,
    kimi_length_penalty,
)

T = torch.tensor


def close(a: torch.Tensor, b, atol: float = 1e-5) -> bool:
    return torch.allclose(a, torch.as_tensor(b, dtype=a.dtype), atol=atol, rtol=0)


# ---------------------------------------------------------------- AGPO length bonus


def test_agpo_mixed_group_min_max_over_correct_only():
    # correct lengths 10, 20, 15 -> ratios 0, 1, 0.5; the wrong 5-token one is ignored (and gets 0)
    r = agpo_length_reward(T([[1, 1, 0, 1]]), T([[10, 20, 5, 15]]))
    assert close(r, [[0.1, 0.0, 0.0, 0.05]])
    assert r[0, 2] == 0.0


def test_agpo_all_correct_group_gets_no_bonus_unless_asked():
    correct, lengths = T([[True, True, True]]), T([[4, 8, 6]])
    assert torch.equal(agpo_length_reward(correct, lengths), torch.zeros(1, 3))
    r = agpo_length_reward(correct, lengths, weight=0.2, in_homogeneous_groups=True)
    assert close(r, [[0.2, 0.0, 0.1]])


def test_agpo_all_wrong_group_is_zero_in_both_modes():
    for flag in (False, True):
        r = agpo_length_reward(T([[0.0, 0.0]]), T([[3, 9]]), in_homogeneous_groups=flag)
        assert torch.equal(r, torch.zeros(1, 2))


def test_agpo_group_of_two_single_correct_and_equal_lengths():
    # a lone correct completion is the shortest correct one: full weight
    assert close(agpo_length_reward(T([[1, 0]]), T([[50, 10]])), [[0.1, 0.0]])
    # equal correct lengths: ratio 0 for all -> full weight each (reference implementation's 1e-6)
    r = agpo_length_reward(T([[1, 1, 0]]), T([[7, 7, 3]]))
    assert close(r, [[0.1, 0.1, 0.0]])


def test_agpo_groups_are_independent():
    r = agpo_length_reward(T([[1, 1, 0], [1, 0, 1]]), T([[10, 30, 1], [100, 1, 300]]))
    assert close(r, [[0.1, 0.0, 0.0], [0.1, 0.0, 0.0]])


# ---------------------------------------------------------------- Kimi and DAPO


def test_kimi_hand_values():
    # lambda = 0.5 - (l - 10) / 20 = [0.5, 0, -0.5]; the wrong one keeps only min(0, lambda)
    assert close(kimi_length_penalty(T([[1, 0, 1]]), T([[10, 20, 30]])), [[0.5, 0.0, -0.5]])
    assert close(kimi_length_penalty(T([[0, 1]]), T([[10, 30]])), [[0.0, -0.5]])
    assert close(kimi_length_penalty(T([[0, 0]]), T([[30, 10]]), weight=0.2), [[-0.1, 0.0]])
    assert torch.equal(kimi_length_penalty(T([[1, 0, 1]]), T([[5, 5, 5]])), torch.zeros(1, 3))


def test_dapo_overlong_hand_values():
    r = dapo_overlong_penalty(T([5, 6, 8, 10, 12]), max_len=10, cache_len=4)
    assert close(r, [0.0, 0.0, -0.5, -1.0, -1.0])
    # any shape; integer lengths
    r = dapo_overlong_penalty(torch.tensor([[0, 16], [17, 20]]), max_len=20, cache_len=4)
    assert close(r, [[0.0, 0.0], [-0.25, -1.0]])


# ---------------------------------------------------------------- validation errors


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: agpo_length_reward(T([[1, 2]]), T([[1, 2]])), "bool or 0/1"),
        (lambda: agpo_length_reward(T([[1, 0]]), T([[1, 2, 3]])), "does not match"),
        (lambda: agpo_length_reward(T([[1, 0]]), T([[1, -2]])), ">= 0"),
        (lambda: agpo_length_reward(T([[1, 0]]), T([[1.0, math.nan]])), "NaN"),
        (lambda: agpo_length_reward(T([[1], [0]]), T([[1], [2]])), "G=1 < 2"),
        (lambda: agpo_length_reward(T([1, 0]), T([1, 2])), "[num_groups, G]"),
        (lambda: agpo_length_reward(T([[1, 0]]), T([[1, 2]]), weight=-0.1), "weight"),
        (lambda: kimi_length_penalty(T([[1, 0]]), T([[1, 2, 3]])), "does not match"),
        (lambda: dapo_overlong_penalty(T([1, 2]), max_len=10, cache_len=0), "0 < cache_len"),
        (lambda: dapo_overlong_penalty(T([1, 2]), max_len=4, cache_len=8), "cache_len <= max_len"),
    ],
)
def test_bad_input_gives_one_line_error(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- properties (hypothesis)


@st.composite
def groups(draw) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct bool [n, G], lengths [n, G]) with repeated lengths and all-correct/wrong groups."""
    n, g = draw(st.integers(1, 5)), draw(st.integers(2, 12))
    max_len = draw(st.sampled_from([3, 50, 4096]))  # small pools force ties
    correct, lengths = [], []
    for _ in range(n):
        kind = draw(st.sampled_from(["random", "all_correct", "all_wrong"]))
        row = [draw(st.booleans()) if kind == "random" else kind == "all_correct" for _ in range(g)]
        correct.append(row)
        lengths.append([draw(st.integers(0, max_len)) for _ in range(g)])
    return torch.tensor(correct), torch.tensor(lengths)


@settings(max_examples=500, deadline=None)
@given(groups(), st.floats(0.0, 2.0), st.booleans())
def test_property_agpo_bonus(data, weight, in_homogeneous):
    correct, lengths = data
    r = agpo_length_reward(correct, lengths, weight=weight, in_homogeneous_groups=in_homogeneous)
    assert torch.isfinite(r).all()
    assert (r[~correct] == 0).all()  # wrong completions never get a bonus
    assert ((r >= 0) & (r <= weight + 1e-7)).all()
    for i in range(correct.shape[0]):  # among correct ones: shorter never earns less
        idx = correct[i].nonzero().flatten()
        for a in idx:
            for b in idx:
                if lengths[i, a] < lengths[i, b]:
                    assert r[i, a] >= r[i, b]
                if lengths[i, a] == lengths[i, b]:
                    assert r[i, a] == r[i, b]
    applies = correct.any(dim=1) if in_homogeneous else correct.any(dim=1) & ~correct.all(dim=1)
    assert (r[~applies] == 0).all()
    if (
        weight > 0
    ):  # the shortest correct completion of each group it applies to gets the full weight
        assert torch.allclose(r[applies].amax(dim=1), torch.full((int(applies.sum()),), weight))


@settings(max_examples=300, deadline=None)
@given(groups(), st.randoms(use_true_random=False))
def test_property_length_rewards_permute_with_completions(data, rnd):
    correct, lengths = data
    perm = torch.stack(
        [torch.tensor(rnd.sample(range(correct.shape[1]), correct.shape[1])) for _ in correct]
    )
    pc, pl = torch.gather(correct, 1, perm), torch.gather(lengths, 1, perm)
    for fn in (agpo_length_reward, kimi_length_penalty):
        assert torch.equal(torch.gather(fn(correct, lengths), 1, perm), fn(pc, pl))


@settings(max_examples=300, deadline=None)
@given(groups(), st.floats(0.0, 2.0))
def test_property_kimi_bounds_and_signs(data, weight):
    correct, lengths = data
    r = kimi_length_penalty(correct, lengths, weight=weight)
    assert ((r >= -weight / 2 - 1e-6) & (r <= weight / 2 + 1e-6)).all()
    assert (r[~correct] <= 0).all()  # a wrong answer is never rewarded for being short
    equal = lengths.amin(dim=1) == lengths.amax(dim=1)
    assert (r[equal] == 0).all()


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 200), min_size=1, max_size=30), st.integers(1, 100), st.integers(0, 100)
)
def test_property_dapo_is_a_non_increasing_ramp_in_minus_one_zero(lengths, cache_len, extra):
    max_len = cache_len + extra
    lengths_t = torch.tensor(sorted(lengths))
    r = dapo_overlong_penalty(lengths_t, max_len=max_len, cache_len=cache_len)
    assert ((r >= -1) & (r <= 0)).all()
    assert (r[1:] <= r[:-1]).all()
    assert (r[lengths_t <= max_len - cache_len] == 0).all()
    assert (r[lengths_t >= max_len] == -1).all()
