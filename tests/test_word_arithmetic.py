"""The word-arithmetic task: the embedded problems in natural language, scored like GSM8K."""

from __future__ import annotations

import random
import re

import pytest

from agpo_lab.config import TaskConfig
from agpo_lab.tasks.arithmetic import ArithmeticTask, write_trace
from agpo_lab.tasks.redundancy import count_redundant_segments
from agpo_lab.tasks.registry import build_task
from agpo_lab.tasks.word_arithmetic import (
    WordArithmeticTask,
    phrase_question,
    spoken_expression,
    word_problem,
    worked_solution,
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


def test_worked_solutions_docstring_examples_and_scoring():
    assert worked_solution("12+7-5", 0) == "12 + 7 = 19. 19 - 5 = 14. The answer is 14."
    assert count_redundant_segments("3 + 4 = 7. Again, 3 + 4 = 7. The answer is 7.") == 1
    assert count_redundant_segments(worked_solution("12+7-5", 0)) == 0
    task = WordArithmeticTask(seed=0, n_train=60, levels=[1, 2, 3])
    rng = random.Random(0)
    for problem in task.problems("train"):
        verbosity = rng.randint(0, 3)
        text = worked_solution(problem.meta["expression"], verbosity, rng)
        assert count_redundant_segments(text) == verbosity
        assert task.score(text, problem) == 1.0
        assert len(text) > len(worked_solution(problem.meta["expression"], 0)) or not verbosity


def test_worked_solutions_slip_and_are_reproducible():
    slipped = worked_solution("12+7-5", 0, random.Random(1), error_rate=0.999)
    assert not slipped.endswith("The answer is 14.")
    # a slip carries on: the next step starts from the wrong value
    first, second = re.findall(r"(\d+) [-+] \d+ = (\d+)\.", slipped)
    assert second[0] == first[1]
    again = [worked_solution("54*41+3", 2, random.Random(5), 0.1) for _ in range(2)]
    assert again[0] == again[1]
    with pytest.raises(ValueError, match="rng"):
        worked_solution("3+4", 1)


def test_redundant_segments_of_both_tasks_are_counted():
    assert count_redundant_segments("3+4=7;check 7-4=3;ans:7") == 1
    assert count_redundant_segments("3 + 4 = 7. Again, 3 + 4 = 7. To be sure, 3 + 4 = 7.") == 2
    assert count_redundant_segments("3+4=7;ans:7") == count_redundant_segments(None) == 0
    rng = random.Random(3)
    for verbosity in range(4):
        assert count_redundant_segments(write_trace("12+7-5", verbosity, rng)) == verbosity
