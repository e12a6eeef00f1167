"""The embedded arithmetic task: determinism, disjoint splits, traces and the strict verifier."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agpo_lab.tasks.arithmetic import (
    LEVELS,
    MAX_COMPLETION_CHARS,
    ArithmeticTask,
    extract_answer,
    make_question,
    sample_problem,
    shortest_correct_trace,
    solve_steps,
    split_of,
    write_trace,
)
from agpo_lab.tasks.base import Problem, Task


def test_implements_the_task_protocol():
    task = ArithmeticTask()
    assert isinstance(task, Task)
    assert task.name == "arithmetic"


def test_same_seed_same_problems_other_seed_other_problems():
    a, b, c = ArithmeticTask(seed=3), ArithmeticTask(seed=3), ArithmeticTask(seed=4)
    assert a.problems("eval") == b.problems("eval")
    assert a.problems("train") == b.problems("train")
    assert a.problems("eval") != c.problems("eval")


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_train_and_eval_splits_are_disjoint(seed):
    task = ArithmeticTask(seed=seed, n_train=1000, n_eval=200)
    train = {p.question for p in task.problems("train")}
    eval_ = {p.question for p in task.problems("eval")}
    assert len(train) == 1000 and len(eval_) == 200  # unique within each split
    assert not train & eval_
    assert all(split_of(q) == "eval" for q in eval_)
    # Held out whatever the seed: another seed's train split never contains these eval questions.
    other_train = {p.question for p in ArithmeticTask(seed=seed + 100).problems("train")}
    assert not other_train & eval_


def test_test_is_an_alias_of_eval_and_bad_split_is_rejected():
    task = ArithmeticTask()
    assert task.problems("test") == task.problems("eval")
    with pytest.raises(ValueError, match="no 'validation' split; set task.train_split"):
        task.problems("validation")


def test_level_size_counts_every_question_a_level_can_draw():
    import random

    from agpo_lab.tasks.arithmetic import level_size, make_question

    for level in (1, 2):  # small enough to draw every question
        rng = random.Random(0)
        assert len({make_question(level, rng) for _ in range(50_000)}) == level_size(level)
    with pytest.raises(ValueError, match="level 1 has 400 distinct questions"):
        ArithmeticTask(n_train=5 * 401).problems("train")  # refused before drawing any


def test_levels_are_labelled_and_balanced():
    task = ArithmeticTask(n_eval=50)
    problems = task.problems("eval")
    counts = {level: sum(p.difficulty == level for p in problems) for level in LEVELS}
    assert counts == {level: 10 for level in LEVELS}
    only = ArithmeticTask(n_eval=6, levels=(1, 5)).problems("eval")
    assert sorted({p.difficulty for p in only}) == [1, 5]
    with pytest.raises(ValueError, match="levels"):
        ArithmeticTask(levels=(9,))


def test_reference_answers_and_solutions_are_correct():
    task = ArithmeticTask()
    for problem in task.problems("eval"):
        assert isinstance(problem, Problem)
        assert task.score(problem.solution, problem) == 1.0
        assert problem.solution == shortest_correct_trace(problem.question)
        assert int(problem.answer) >= 0
    level5 = [p for p in task.problems("eval") if p.difficulty == 5][0]
    a, rest = level5.question.split("*")
    b, c = rest.split("+")
    assert int(level5.answer) == int(a) * int(b) + int(c)


def test_solve_steps_worked_examples_and_rejects_free_text():
    assert solve_steps("12+7-5") == [(12, "+", 7, 19), (19, "-", 5, 14)]
    assert solve_steps("23*47+5") == [(23, "*", 47, 1081), (1081, "+", 5, 1086)]
    for bad in ["__import__('os')", "1+", "2**99999", ""]:
        with pytest.raises(ValueError, match="not an arithmetic-task question"):
            solve_steps(bad)


def test_every_level_draws_valid_questions_with_nonnegative_steps():
    rng = random.Random(0)
    for level in LEVELS:
        for _ in range(200):
            steps = solve_steps(make_question(level, rng))
            assert all(result >= 0 for *_, result in steps)
    with pytest.raises(ValueError, match="unknown level"):
        make_question(6, rng)


def test_trace_worked_example_and_verbosity():
    assert write_trace("12+7-5", 0) == "12+7=19;19-5=14;ans:14"
    assert shortest_correct_trace("3+4") == "3+4=7;ans:7"
    rng = random.Random(1)
    for verbosity in range(4):
        trace = write_trace("12+7-5", verbosity, rng)
        assert trace.count("check ") + trace.count("again ") == verbosity
        assert extract_answer(trace) == 14
        if verbosity:
            assert len(trace) > len(shortest_correct_trace("12+7-5"))
    with pytest.raises(ValueError, match="rng"):
        write_trace("1+2", 2)


def test_wrong_steps_give_wrong_answers_at_the_error_rate():
    rng = random.Random(2)
    # One-step problems: a slip always changes the answer.
    for _ in range(50):
        question, answer = sample_problem(1, rng)
        assert extract_answer(write_trace(question, 1, rng, error_rate=1.0)) != answer
    wrong = 0
    for _ in range(2000):
        question, answer = sample_problem(2, rng)
        wrong += extract_answer(write_trace(question, 0, rng, error_rate=0.1)) != answer
    assert 0.13 < wrong / 2000 < 0.25  # about 1 - 0.9**2 = 0.19 for two steps


def test_traces_stay_short_enough_for_fast_rollouts():
    rng = random.Random(3)
    lengths = [
        len(write_trace(sample_problem(level, rng)[0], 3, rng, 0.03))
        for level in LEVELS
        for _ in range(300)
    ]
    assert max(lengths) < 96


@settings(max_examples=60, deadline=None)
@given(
    level=st.sampled_from(sorted(LEVELS)),
    seed=st.integers(0, 10_000),
    verbosity=st.integers(0, 3),
)
def test_any_error_free_trace_verifies(level, seed, verbosity):
    rng = random.Random(seed)
    question, answer = sample_problem(level, rng)
    assert extract_answer(write_trace(question, verbosity, rng)) == answer


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("3+4=7;ans:7", 7),
        ("ans:-12", -12),
        ("2+2=4;ans:4\n  ", 4),
        ("ans:7;ans:8", None),  # two markers: ambiguous
        ("ans:7 maybe", None),  # text after the answer
        ("3+4=7", None),  # no marker
        ("ans:", None),
        ("ans:1e9", None),
        ("ans:0x1f", None),
        ("ans:" + "9" * 13, None),  # more digits than allowed
        ("ans:4\x00", None),  # control character
        ("ANS:4", None),
        (None, None),
    ],
)
def test_extract_answer_is_strict(completion, expected):
    assert extract_answer(completion) == expected


def test_extract_answer_is_fast_on_adversarial_input():
    huge = "ans:" + "1" * 1_000_000
    nested = "(" * 100_000 + "ans:3"
    started = time.perf_counter()
    assert extract_answer(huge) is None
    assert extract_answer(nested) is None  # over the length cap
    assert extract_answer("x" * (MAX_COMPLETION_CHARS - 5) + "ans:3") == 3
    assert time.perf_counter() - started < 0.5


def test_prompt_format_and_score():
    task = ArithmeticTask()
    problem = task.problems("eval")[0]
    prompt = task.format_prompt(problem)
    assert prompt == f"q:{problem.question}\n"
    assert "check" not in prompt and "again" not in prompt  # verbosity is not leaked
    assert task.score(problem.solution, problem) == 1.0
    assert task.score(f"ans:{int(problem.answer) + 1}", problem) == 0.0
    assert task.score("", problem) == 0.0


def test_prompt_uses_a_chat_template_when_the_tokenizer_has_one():
    class ChatTokenizer:
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return "<user>" + messages[0]["content"] + "<assistant>"

    task = ArithmeticTask()
    problem = task.problems("eval")[0]
    prompt = task.format_prompt(problem, ChatTokenizer())
    assert prompt.startswith("<user>") and problem.question in prompt and "ans:" in prompt
