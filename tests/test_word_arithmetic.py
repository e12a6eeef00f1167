"""The word-arithmetic task: the embedded problems in natural language, scored like GSM8K."""

from __future__ import annotations

import re

import pytest

from agpo_lab.config import TaskConfig
from agpo_lab.tasks.arithmetic import ArithmeticTask
from agpo_lab.tasks.registry import build_task
from agpo_lab.tasks.word_arithmetic import (
    WordArithmeticTask,
    phrase_question,
    spoken_expression,
    word_problem,
)


def test_same_problems_levels_and_split_as_the_arithmetic_task():
    words = WordArithmeticTask(seed=3, n_train=50, n_eval=20, levels=[1, 2, 3])
    plain = ArithmeticTask(seed=3, n_train=50, n_eval=20, levels=[1, 2, 3])
    for split in ("train", "eval"):
        ours, theirs = words.problems(split), plain.problems(split)
        assert [p.answer for p in ours] == [p.answer for p in theirs]
        assert [p.difficulty for p in ours] == [p.difficulty for p in theirs]
        assert [p.meta["expression"] for p in ours] == [p.question for p in theirs]
        assert all(p.id.startswith(f"word_arithmetic/{split}/") for p in ours)
    kinds = {p.question.startswith("What is") for p in words.problems("train")}
    assert kinds == {True, False}  # both phrasings occur


def test_word_problems_state_every_number_in_order():
    assert spoken_expression("12+7-5") == "12 + 7 - 5"
    story = word_problem("12+7-5")
    assert re.findall(r"\d+", story) == ["12", "7", "5"]
    assert "gets 7 more" in story and "gives away 5" in story and story.endswith("now?")
    product = word_problem("54*41+3")
    assert re.findall(r"\d+", product) == ["54", "41", "3"]
    assert "in total?" in product
    assert phrase_question("12+7-5") == phrase_question("12+7-5")  # fixed by a hash


def test_reference_solutions_score_and_wrong_or_hedged_answers_do_not():
    task = WordArithmeticTask(seed=0, n_eval=25)
    for problem in task.problems("eval"):
        assert task.score(problem.solution, problem) == 1.0
        wrong = int(problem.answer) + 1
        assert task.score(f"The answer is {wrong}.", problem) == 0.0
        assert task.score(f"The answer is {problem.answer} or {wrong}.", problem) == 0.0
        assert task.score(f"{problem.meta['expression']}={problem.answer}", problem) == 0.0


def test_prompt_without_a_chat_template_and_the_registry():
    task = build_task(TaskConfig(name="word_arithmetic", n_train=10, n_eval=5, levels=[1]))
    assert isinstance(task, WordArithmeticTask)
    problem = task.problems("eval")[0]
    prompt = task.format_prompt(problem)
    assert prompt.startswith(f"Question: {problem.question} ") and prompt.endswith("\nAnswer:")
    with pytest.raises(ValueError, match="task.levels"):
        TaskConfig(name="word_arithmetic", levels=[9]).validate()
