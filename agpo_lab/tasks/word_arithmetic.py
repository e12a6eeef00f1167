"""The embedded task's problems in natural language, for a real chat model.

The same questions, levels and train/eval split as `agpo_lab.tasks.arithmetic`, phrased the way a
chat model is asked things: about half as a plain question ("What is 12 + 7 - 5?"), half as a
short word problem ("Mia has 12 stickers. Then she gets 7 more. Then she gives away 5. How many
stickers does Mia have now?"); which one is fixed by a hash of the question. The prompt goes
through the tokenizer's chat template and asks for a final "The answer is N." The score accepts
what an instruct model actually writes (a stated answer, ``#### N``, ``\\boxed{N}``: see
`agpo_lab.tasks.verify.extract_final_answer`, style "gsm8k") and nothing looser.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from agpo_lab.tasks.arithmetic import ArithmeticTask, planned_steps, solve_steps
from agpo_lab.tasks.base import Problem
from agpo_lab.tasks.verify import DEFAULT_TIMEOUT_S, score_completion

DEFAULT_INSTRUCTION = "Finish with the sentence 'The answer is' followed by the number."
"""Appended to every question: the scorer reads the answer from that sentence (or a box)."""
_PEOPLE = (("Mia", "she"), ("Tom", "he"), ("Ana", "she"), ("Sam", "he"), ("Lea", "she"))
_THINGS = ("stickers", "apples", "marbles", "coins", "books", "pencils")


def _pick(question: str, salt: str, options: Sequence[Any]) -> Any:
    digest = hashlib.sha256(f"{salt}|{question}".encode()).digest()
    return options[digest[0] % len(options)]


def spoken_expression(question: str) -> str:
    """``"12+7-5"`` -> ``"12 + 7 - 5"`` (spaces around each operator, * kept)."""
    return "".join(f" {c} " if c in "+-*" else c for c in question)


def word_problem(question: str) -> str:
    """A short story whose answer is the value of `question` (left to right).

    Examples: ``"3+4"`` -> "Tom has 3 apples. Then he gets 4 more. How many apples does Tom have
    now?" (name and things depend on a hash); ``"54*41+3"`` -> "There are 54 boxes with 41 coins
    in each, and 3 more coins outside the boxes. How many coins are there in total?"
    """
    steps = solve_steps(question)
    things = _pick(question, "things", _THINGS)
    if steps[0][1] == "*":
        extra = " ".join(
            f"and {right} more {things} outside the boxes." if op == "+" else f"minus {right}."
            for _, op, right, _ in steps[1:]
        )
        return (
            f"There are {steps[0][0]} boxes with {steps[0][2]} {things} in each{',' if extra else '.'}"
            f"{' ' + extra if extra else ''} How many {things} are there in total?"
        )
    name, pronoun = _pick(question, "person", _PEOPLE)
    sentences = [f"{name} has {steps[0][0]} {things}."]
    for _, op, right, _ in steps:
        if op == "+":
            sentences.append(f"Then {pronoun} gets {right} more.")
        else:
            sentences.append(f"Then {pronoun} gives away {right}.")
    sentences.append(f"How many {things} does {name} have now?")
    return " ".join(sentences)


def phrase_question(question: str) -> str:
    """The natural-language form of an arithmetic question: a plain question or a word problem."""
    if _pick(question, "style", ("plain", "story")) == "plain":
        return f"What is {spoken_expression(question)}?"
    return word_problem(question)


REDUNDANT_OPENERS = ("Let me check:", "Again,", "To be sure,")
"""How each redundant segment of a worked solution begins (`worked_solution`): a re-check by the
inverse operation, a restated step, a restated step "to be sure"."""


def _redundant_sentence(step: tuple[int, str, int, int], correct: bool, rng: random.Random) -> str:
    """One redundant segment about a step: a re-check (only of a correct step) or a restatement."""
    left, op, right, result = step
    kind = rng.randrange(3) if correct and right != 0 else rng.randrange(1, 3)
    if kind == 0:
        inverse = {"+": "-", "-": "+", "*": "/"}[op]
        return f"{REDUNDANT_OPENERS[0]} {result} {inverse} {right} = {left}."
    return f"{REDUNDANT_OPENERS[kind]} {left} {op} {right} = {result}."


def worked_solution(
    question: str, verbosity: int, rng: random.Random | None = None, error_rate: float = 0.0
) -> str:
    """A natural-language step-by-step solution with `verbosity` redundant segments, ending with
    "The answer is N." (the warm start's SFT target, `agpo_lab.experiments.warmstart`).

    Each step is written "a + b = c."; each is wrong with probability `error_rate` (later steps
    build on the wrong value, as in `arithmetic.write_trace`); redundant segments (re-checks and
    restatements, `REDUNDANT_OPENERS`, counted by `tasks.redundancy`) go after random steps. Examples:
    ``worked_solution("12+7-5", 0) == "12 + 7 = 19. 19 - 5 = 14. The answer is 14."``; with
    verbosity 1 it may read "12 + 7 = 19. Let me check: 19 - 7 = 12. 19 - 5 = 14. The answer is 14."
    """
    sentences, answer = [], None
    for step, slipped, redundant in planned_steps(question, verbosity, rng, error_rate):
        left, op, right, answer = step
        sentences.append(f"{left} {op} {right} = {answer}.")
        sentences += [_redundant_sentence(step, not slipped, rng) for _ in range(redundant)]
    return " ".join([*sentences, f"The answer is {answer}."])


class WordArithmeticTask:
    """The embedded arithmetic problems as natural-language questions, scored like GSM8K.

    Example: ``WordArithmeticTask(seed=0).problems("eval")[0].question`` is e.g. "What is 12 + 7?";
    ``task.score("12 + 7 = 19. The answer is 19.", problem) == 1.0``.
    """

    name = "word_arithmetic"

    def __init__(
        self,
        seed: int = 0,
        n_train: int = 1000,
        n_eval: int = 200,
        levels: Sequence[int] | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.arithmetic = ArithmeticTask(seed=seed, n_train=n_train, n_eval=n_eval, levels=levels)
        self.levels = self.arithmetic.levels
        self.instruction = instruction
        self.timeout_s = timeout_s

    def problems(self, split: str) -> list[Problem]:
        """The arithmetic task's problems of `split`, with natural-language questions."""
        return [
            replace(
                problem,
                id=problem.id.replace("arithmetic/", "word_arithmetic/", 1),
                question=phrase_question(problem.question),
                solution=f"{spoken_expression(problem.question)} = {problem.answer}. "
                f"The answer is {problem.answer}.",
                meta={**problem.meta, "expression": problem.question},
            )
            for problem in self.arithmetic.problems(split)
        ]

    def format_prompt(self, problem: Problem, tokenizer: Any = None) -> str:
        """The chat template's text when the tokenizer has one, else ``Question: ...\\nAnswer:``."""
        user = f"{problem.question} {self.instruction}"
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
            )
        return f"Question: {user}\nAnswer:"

    def score(self, completion: str, problem: Problem) -> float:
        """1.0 when the stated final answer equals the reference exactly, else 0.0."""
        return score_completion(completion, problem.answer, "gsm8k", self.timeout_s)
