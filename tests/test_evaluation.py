"""Evaluation: the pass@k estimator, metric aggregation, evaluate() on a tiny model, the eval CLI."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agpo_lab.config import EvalConfig
from agpo_lab.evaluation import (
    evaluate,
    evaluate_records,
    pass_at_k,
    select_problems,
    summarize_records,
)
from agpo_lab.tasks.base import Problem

# ---- pass@k -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 1, 0.3),  # k = 1 is c / n
        (8, 0, 8, 0.0),  # nothing correct
        (8, 1, 8, 1.0),  # k = n: any correct sample passes
        (5, 5, 1, 1.0),
        (3, 1, 3, 1.0),
        (6, 2, 3, 0.8),  # 1 - C(4,3)/C(6,3) = 1 - 4/20
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@given(
    st.integers(1, 60).flatmap(
        lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))
    )
)
def test_pass_at_k_matches_binomial_formula_and_is_monotone(nck):
    n, c, k = nck
    value = pass_at_k(n, c, k)
    assert value == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-9)
    assert 0.0 <= value <= 1.0
    if c < n:
        assert pass_at_k(n, c + 1, k) >= value - 1e-12  # more correct samples never hurt
    if k < n:
        assert pass_at_k(n, c, k + 1) >= value - 1e-12  # a larger budget never hurts


@pytest.mark.parametrize(("n", "c", "k"), [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(n, c, k)


# ---- config and subset ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"n_problems": 0}, {"k": -1}, {"k": 0, "greedy": False}, {"temperature": 0}, {"top_p": 0},
     {"max_new_tokens": 0}, {"batch_size": 0}],
)  # fmt: skip
def test_eval_config_rejects_impossible_values(kwargs):
    with pytest.raises(ValueError, match=r"^eval\.") as info:
        EvalConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_select_problems_is_evenly_spaced_and_fixed():
    problems = [Problem(id=str(i), question="q", answer="0") for i in range(10)]
    assert [p.id for p in select_problems(problems, 3)] == ["0", "3", "6"]
    assert select_problems(problems, None) == problems
    assert select_problems(problems, 50) == problems


# ---- summarize_records: hand-built rows, hand-computed metrics --------------------------------


def _row(pid, level, greedy, sample, tokens, correct, truncated=False):
    return {"problem_id": pid, "difficulty": level, "greedy": greedy, "sample": sample,
            "text": "", "tokens": tokens, "truncated": truncated, "score": float(correct),
            "correct": correct}  # fmt: skip


def test_summarize_records_hand_computed():
    rows = [
        _row("a", 1, True, 0, 5, True),
        _row("b", 2, True, 0, 7, False),
        # problem a: 3 of 4 samples correct; problem b: 0 of 4 (one truncated at 20 tokens)
        _row("a", 1, False, 0, 4, True),
        _row("a", 1, False, 1, 6, True),
        _row("a", 1, False, 2, 8, True),
        _row("a", 1, False, 3, 10, False),
        _row("b", 2, False, 0, 12, False),
        _row("b", 2, False, 1, 20, False, truncated=True),
        _row("b", 2, False, 2, 2, False),
        _row("b", 2, False, 3, 2, False),
    ]
    m = summarize_records(pd.DataFrame(rows), k=2)
    assert m["eval/n_problems"] == 2
    assert m["eval/pass@1_greedy"] == 0.5
    assert m["eval/pass@1_greedy/level_1"] == 1.0
    assert m["eval/pass@1_greedy/level_2"] == 0.0
    assert m["eval/mean_tokens_greedy"] == 6.0
    assert m["eval/pass@1_sampled"] == pytest.approx((3 / 4 + 0 / 4) / 2)
    assert m["eval/pass@1_sampled/level_1"] == 0.75
    # pass@2 of a: 1 - C(1,2)/C(4,2) = 1; of b: 0
    assert m["eval/pass@k"] == pytest.approx(0.5)
    assert m["eval/k"] == 2
    assert m["eval/mean_tokens"] == pytest.approx(64 / 8)
    assert m["eval/mean_tokens_correct"] == pytest.approx(6.0)
    assert m["eval/mean_tokens_wrong"] == pytest.approx((10 + 12 + 20 + 2 + 2) / 5)
    assert m["eval/truncated_frac"] == pytest.approx(1 / 8)
    # group kinds over the 4 samples: a is mixed (3 of 4), b all wrong
    assert (m["eval/groups_all_correct"], m["eval/groups_all_wrong"]) == (0.0, 0.5)
    assert m["eval/groups_mixed"] == 0.5 and m["eval/groups_mixed/level_1"] == 1.0
    assert m["eval/groups_all_wrong/level_2"] == 1.0
    assert m["eval/mean_tokens/level_1"] == 7.0 and m["eval/mean_tokens/level_2"] == 9.0


def test_summarize_records_greedy_only_and_no_levels():
    rows = [_row("a", 0, True, 0, 3, False), _row("b", 0, True, 0, 5, False)]
    m = summarize_records(pd.DataFrame(rows), k=0)
    assert m["eval/pass@1_greedy"] == 0.0
    assert "eval/pass@k" not in m and "eval/pass@1_sampled" not in m
    assert not any("level_" in key for key in m)  # difficulty 0 means "no levels"
    assert m["eval/mean_tokens"] == 4.0  # falls back to the greedy completions
    assert math.isnan(m["eval/mean_tokens_correct"])


# ---- evaluate() on a tiny model with stand-in tasks whose scores we control ---------------------


class ParityTask:
    """Problem i is 'correct' whatever the model writes iff i is even; level 1 = even, 2 = odd."""

    name = "parity"

    def problems(self, split):
        return [
            Problem(id=str(i), question=str(i), answer="", difficulty=1 + i % 2) for i in range(6)
        ]

    def format_prompt(self, problem, tokenizer=None):
        return f"q:{problem.question}\n"

    def score(self, completion, problem):
        return 1.0 if int(problem.id) % 2 == 0 else 0.0


class ContainsCharTask(ParityTask):
    """Correct iff the completion contains the character 'a' (depends on what the model samples)."""

    def score(self, completion, problem):
        return 1.0 if "a" in completion else 0.0


SMALL = EvalConfig(k=3, max_new_tokens=8, batch_size=64, seed=0)


def test_evaluate_exact_numbers_with_a_controlled_scorer(tiny_qwen2, char_tokenizer):
    task = ParityTask()
    m = evaluate(tiny_qwen2, char_tokenizer, task, task.problems("eval"), SMALL)
    assert m["eval/n_problems"] == 6
    assert m["eval/pass@1_greedy"] == 0.5
    assert m["eval/pass@1_sampled"] == 0.5
    assert m["eval/pass@k"] == 0.5
    assert m["eval/pass@1_greedy/level_1"] == 1.0
    assert m["eval/pass@1_greedy/level_2"] == 0.0
    assert 1 <= m["eval/mean_tokens"] <= SMALL.max_new_tokens


def test_evaluate_matches_metrics_recomputed_from_the_texts(tiny_qwen2, char_tokenizer):
    task = ContainsCharTask()
    records = evaluate_records(tiny_qwen2, char_tokenizer, task, task.problems("eval"), SMALL)
    assert len(records) == 6 * (1 + SMALL.k)
    assert list(records.columns) == ["problem_id", "difficulty", "greedy", "sample", "text",
                                     "tokens", "truncated", "score", "correct"]  # fmt: skip
    assert (records["correct"] == records["text"].str.contains("a")).all()
    assert records["tokens"].between(1, SMALL.max_new_tokens).all()
    assert (records.loc[records["truncated"], "tokens"] == SMALL.max_new_tokens).all()
    # one token per character: the text holds at most the non-EOS tokens
    assert (records["text"].str.len() <= records["tokens"] - (~records["truncated"])).all()

    sampled = records[~records["greedy"]]
    by_problem = [sampled[sampled["problem_id"] == str(i)]["correct"].tolist() for i in range(6)]
    expected_pass_k = sum(any(c) for c in by_problem) / 6  # k = n: any correct sample passes
    expected_sampled = sum(sum(c) / len(c) for c in by_problem) / 6
    m = summarize_records(records, SMALL.k)
    assert m["eval/pass@k"] == pytest.approx(expected_pass_k)
    assert m["eval/pass@1_sampled"] == pytest.approx(expected_sampled)
    assert m["eval/pass@1_greedy"] == pytest.approx(records[records["greedy"]]["correct"].mean())
    assert m["eval/mean_tokens"] == pytest.approx(sampled["tokens"].mean())


def test_evaluate_is_deterministic_and_seeded(tiny_qwen2, char_tokenizer):
    task = ContainsCharTask()
    problems = task.problems("eval")
    first = evaluate_records(tiny_qwen2, char_tokenizer, task, problems, SMALL)
    again = evaluate_records(tiny_qwen2, char_tokenizer, task, problems, SMALL)
    pd.testing.assert_frame_equal(first, again)
    other = evaluate_records(tiny_qwen2, char_tokenizer, task, problems, EvalConfig(
        k=3, max_new_tokens=8, batch_size=64, seed=1))  # fmt: skip
    greedy = first["greedy"]
    assert other[greedy]["text"].tolist() == first[greedy]["text"].tolist()  # greedy: no sampling
    assert other[~greedy]["text"].tolist() != first[~greedy]["text"].tolist()


def test_batch_size_does_not_change_greedy_results(tiny_qwen2, char_tokenizer):
    task = ContainsCharTask()
    cfg = EvalConfig(k=0, max_new_tokens=8, batch_size=2)
    one = evaluate_records(tiny_qwen2, char_tokenizer, task, task.problems("eval"), cfg)
    cfg.batch_size = 64
    many = evaluate_records(tiny_qwen2, char_tokenizer, task, task.problems("eval"), cfg)
    assert one["text"].tolist() == many["text"].tolist()


def test_evaluate_leaves_training_mode_as_it_was(tiny_qwen2, char_tokenizer):
    task = ParityTask()
    tiny_qwen2.train()
    evaluate(
        tiny_qwen2, char_tokenizer, task, task.problems("eval"), EvalConfig(k=0, max_new_tokens=2)
    )
    assert tiny_qwen2.training
