"""What every task provides: problems with reference answers, a prompt format and a verifier.

The trainer, the evaluation and the notebooks only talk to tasks through `Problem` and `Task`, so the
embedded arithmetic task and the real math datasets are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

CORRECT_SCORE = 1.0
"""A completion is correct when its task score reaches this; scores live in [0, 1]."""

Score = TypeVar("Score")


def is_correct(score: Score) -> Score:
    """Whether a task score (a float, or a tensor / array of them) means a correct completion.

    The one definition of "correct" that rewards, metrics, evaluation and model cards share:
    ``score >= CORRECT_SCORE``. Example: ``is_correct(1.0) is True``; on a tensor of scores
    [1.0, 0.0, 0.5] it gives [True, False, False].
    """
    return score >= CORRECT_SCORE


@dataclass(frozen=True)
class Problem:
    """One prompt with a verifiable answer."""

    id: str
    """Stable identifier, unique within the task and split (e.g. ``"gsm8k/test/17"``)."""
    question: str
    """The problem text, without any prompt template or chat formatting."""
    answer: str
    """The reference final answer as a string (an integer for the embedded task and GSM8K)."""
    difficulty: int = 0
    """Difficulty level (embedded task: 1 = easiest; datasets: their own level, or 0 if none)."""
    solution: str = ""
    """A reference solution or trace, when the source has one (used for SFT and verifier tests)."""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Anything else the source carries (subject, url, ...)."""


@runtime_checkable
class Task(Protocol):
    """A source of problems plus the rule that scores a completion."""

    name: str
    """Short name used in configs and run directories."""

    def problems(self, split: str) -> list[Problem]:
        """All problems of a split (``"train"`` or ``"eval"``/``"test"``), in a fixed order."""
        ...

    def format_prompt(self, problem: Problem, tokenizer: Any = None) -> str:
        """The exact text fed to the model (uses the tokenizer's chat template when it has one)."""
        ...

    def score(self, completion: str, problem: Problem) -> float:
        """Correctness reward in [0, 1] (`is_correct` says which scores are correct); never
        evaluates model text; time-bounded."""
        ...
