"""The embedded task: multi-step integer arithmetic with a step-by-step trace.

A problem is a left-to-right expression such as ``12+7-5``; the prompt is ``q:12+7-5\\n`` and a
correct completion is a trace of steps that ends with the answer marker, for example

    concise:  ``12+7=19;19-5=14;ans:14``
    verbose:  ``12+7=19;check 19-7=12;19-5=14;again 19-5=14;ans:14``

The task creates the two things the AGPO paper is about:

- **difficulty spread**: five labelled levels, from one-digit sums a tiny model always solves to
  two-digit products it never solves, so groups can be all correct, all wrong or mixed;
- **overthinking**: the same solution can carry 0..3 redundant segments (re-checks by the inverse
  operation, restated steps). The SFT data mixes them at random and the prompt does not say how
  many to write, so verbosity is the model's own sampled choice that a length reward can shift.

Train and eval splits are disjoint by construction: a question belongs to the eval split when a
salted hash of its text lands in the eval bucket, whatever the task seed (so the shipped model,
trained on train questions only, has never seen an eval question).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator, Sequence
from typing import Any

from agpo_lab.errors import ConfigError
from agpo_lab.tasks.base import Problem

ANSWER_MARKER = "ans:"
MAX_COMPLETION_CHARS = 4096  # longer model output is rejected before any parsing
MAX_ANSWER_DIGITS = 12
EVAL_FRACTION = 0.2
_SPLIT_SALT = "agpo-lab-arithmetic-v1"  # changing it changes which questions are held out
_ANSWER_TAIL = re.compile(rf"ans:(-?\d{{1,{MAX_ANSWER_DIGITS}}})")
_QUESTION = re.compile(r"\d{1,6}(?:[-+*]\d{1,6}){0,8}")

LEVELS: dict[int, str] = {
    1: "a+b with a, b in 0..19 (one step)",
    2: "a+b-c with one-digit numbers (two steps)",
    3: "a+b-c+d with a two-digit a and one-digit b, c, d (three steps)",
    4: "a+b-c with two-digit numbers (two steps, carries and borrows)",
    5: "a*b+c with two-digit a, b and one-digit c (a product out of a tiny model's reach)",
}
"""Difficulty levels, 1 = easiest. Every intermediate result is a non-negative integer."""


def make_question(level: int, rng: random.Random) -> str:
    """Draw one question of a level, e.g. level 2 -> ``"7+5-3"``; results are never negative."""
    r = rng.randint
    if level == 1:
        return f"{r(0, 19)}+{r(0, 19)}"
    if level == 2:
        a, b = r(0, 9), r(0, 9)
        return f"{a}+{b}-{r(0, min(9, a + b))}"
    if level == 3:
        a, b = r(10, 99), r(0, 9)
        return f"{a}+{b}-{r(0, 9)}+{r(0, 9)}"
    if level == 4:
        a, b = r(10, 99), r(10, 99)
        return f"{a}+{b}-{r(10, min(99, a + b))}"
    if level == 5:
        return f"{r(10, 99)}*{r(10, 99)}+{r(0, 9)}"
    raise ValueError(f"unknown level {level!r}; choose one of {sorted(LEVELS)}")


def level_size(level: int) -> int:
    """How many distinct questions `make_question` can draw at a level (both splits together),
    counted from its ranges; e.g. level 1 -> 400 (a, b in 0..19)."""
    if level == 1:
        return 20 * 20
    if level == 2:
        return sum(min(9, a + b) + 1 for a in range(10) for b in range(10))
    if level == 3:
        return 90 * 10 * 10 * 10
    if level == 4:
        return sum(min(99, a + b) - 9 for a in range(10, 100) for b in range(10, 100))
    if level == 5:
        return 90 * 90 * 10
    raise ValueError(f"unknown level {level!r}; choose one of {sorted(LEVELS)}")


def check_problem_counts(key: str, total: int, levels: Sequence[int], share: float) -> None:
    """A one-line ConfigError when `total` problems spread evenly over `levels` need more of some
    level than it has distinct questions: the task could never produce them. `share`: the
    split's expected fraction of each level (EVAL_FRACTION for eval)."""
    per_level = -(-total // len(levels))  # the first levels get the remainder
    smallest = min(levels, key=level_size)
    if per_level > level_size(smallest):
        most = share * len(levels) * level_size(smallest)
        raise ConfigError(
            f"{key}={total}: more problems than the task has: {per_level} per level, but level "
            f"{smallest} has {level_size(smallest)} distinct questions, about {share:.0%} of them "
            f"in this split; use fewer than about {most:.0f}, or other task.levels"
        )


def solve_steps(question: str) -> list[tuple[int, str, int, int]]:
    """Left-to-right steps ``(left, op, right, result)`` of a task question.

    Example: ``solve_steps("12+7-5") == [(12, "+", 7, 19), (19, "-", 5, 14)]``. Only the task's own
    question format is accepted (digits joined by + - *), so nothing here evaluates free text.
    """
    if not _QUESTION.fullmatch(question):
        raise ValueError(f"not an arithmetic-task question: {question[:40]!r}")
    tokens = re.findall(r"\d+|[-+*]", question)
    value, steps = int(tokens[0]), []
    for op, right_text in zip(tokens[1::2], tokens[2::2]):
        right = int(right_text)
        result = value + right if op == "+" else value - right if op == "-" else value * right
        steps.append((value, op, right, result))
        value = result
    return steps


def split_of(question: str) -> str:
    """``"eval"`` for about EVAL_FRACTION of all questions (a salted hash), else ``"train"``."""
    digest = hashlib.sha256(f"{_SPLIT_SALT}|{question}".encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2**64 < EVAL_FRACTION else "train"


def sample_problem(level: int, rng: random.Random, split: str = "train") -> tuple[str, int]:
    """Draw a question of `level` that belongs to `split`; returns ``(question, answer)``."""
    for _ in range(10_000):
        question = make_question(level, rng)
        if split_of(question) == split:
            return question, solve_steps(question)[-1][3]
    raise RuntimeError(f"could not draw a level-{level} question in split {split!r}")


def _order_key(question: str) -> str:
    """A stable shuffle key (a hash), so problem order never depends on set iteration order."""
    return hashlib.sha256(question.encode()).hexdigest()


def slipped_value(value: int, rng: random.Random) -> int:
    """A plausible slip: off by one, two or ten, never negative."""
    wrong = value + rng.choice((-10, -2, -1, 1, 2, 10))
    return wrong if wrong >= 0 and wrong != value else value + 1


def _redundant_segment(step: tuple[int, str, int, int], correct: bool, rng: random.Random) -> str:
    """A re-check by the inverse operation (only of a correct step) or a restated step."""
    left, op, right, result = step
    if correct and right != 0 and rng.random() < 0.5:
        inverse = {"+": "-", "-": "+", "*": "/"}[op]
        return f"check {result}{inverse}{right}={left}"
    return f"again {left}{op}{right}={result}"


def planned_steps(
    question: str, verbosity: int = 0, rng: random.Random | None = None, error_rate: float = 0.0
) -> Iterator[tuple[tuple[int, str, int, int], bool, int]]:
    """The steps ``((left, op, right, result), slipped, redundant)`` of a written solution: each
    step a slip (`slipped_value`) with probability `error_rate`, later steps building on the wrong
    value, and `verbosity` redundant segments placed after random steps (`redundant` of them after
    this one). The plan both the embedded traces and the worked solutions are written from.

    A generator, so a caller's own draws between steps (the redundant segments' wording) keep
    their place in the random stream. Example: ``list(planned_steps("12+7-5"))`` ->
    ``[((12, "+", 7, 19), False, 0), ((19, "-", 5, 14), False, 0)]``.
    """
    if verbosity < 0:
        raise ValueError(f"verbosity must be >= 0, got {verbosity}")
    if (verbosity > 0 or error_rate > 0) and rng is None:
        raise ValueError("a solution with verbosity > 0 or error_rate > 0 needs an rng")
    steps = solve_steps(question)
    placements = sorted(rng.randrange(len(steps)) for _ in range(verbosity)) if rng else []
    value = steps[0][0]
    for i, (_, op, right, _) in enumerate(steps):
        exact = value + right if op == "+" else value - right if op == "-" else value * right
        slipped = error_rate > 0 and rng.random() < error_rate
        result = slipped_value(exact, rng) if slipped else exact
        yield (value, op, right, result), slipped, placements.count(i)
        value = result


def write_trace(
    question: str, verbosity: int, rng: random.Random | None = None, error_rate: float = 0.0
) -> str:
    """A step-by-step trace ending in ``ans:<int>``, with `verbosity` redundant segments.

    Each step is wrong with probability `error_rate` (a slip of +-1, 2 or 10); later steps build on
    the wrong value, so the answer is wrong too. Redundant segments go after random steps.
    Example: ``write_trace("12+7-5", 0) == "12+7=19;19-5=14;ans:14"``.
    """
    parts, answer = [], None
    for step, slipped, redundant in planned_steps(question, verbosity, rng, error_rate):
        left, op, right, answer = step
        parts.append(f"{left}{op}{right}={answer}")
        parts += [_redundant_segment(step, not slipped, rng) for _ in range(redundant)]
    return ";".join([*parts, f"{ANSWER_MARKER}{answer}"])


def shortest_correct_trace(question: str) -> str:
    """The concise correct trace, the length baseline: ``"3+4=7;ans:7"`` for ``"3+4"``."""
    return write_trace(question, verbosity=0)


def extract_answer(completion: str) -> int | None:
    """The integer after the single ``ans:`` marker that ends the completion, else None.

    Strict: the completion must end with ``ans:<int>`` (trailing whitespace allowed), contain the
    marker exactly once, have at most MAX_ANSWER_DIGITS digits and MAX_COMPLETION_CHARS characters.
    Examples: ``"3+4=7;ans:7" -> 7``; ``"ans:7;ans:8" -> None``; ``"ans:7 maybe" -> None``.
    Model text is only matched by a bounded regular expression, never evaluated.
    """
    if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
        return None
    text = completion.rstrip()
    if text.count(ANSWER_MARKER) != 1:
        return None
    match = _ANSWER_TAIL.fullmatch(text[text.rfind(ANSWER_MARKER) :])
    return int(match.group(1)) if match else None


class ArithmeticTask:
    """The embedded task: `n_train` / `n_eval` unique problems spread evenly over `levels`.

    Example: ``ArithmeticTask(seed=0).problems("eval")[0]`` is a `Problem` with ``difficulty`` in
    1..5. The same seed gives the same problems; the splits never share a question.
    """

    name = "arithmetic"

    def __init__(
        self,
        seed: int = 0,
        n_train: int = 1000,
        n_eval: int = 200,
        levels: Sequence[int] | None = None,
    ) -> None:
        self.levels = tuple(sorted(LEVELS)) if levels is None else tuple(levels)
        unknown = [lv for lv in self.levels if lv not in LEVELS]
        if unknown or not self.levels:
            raise ConfigError(f"task.levels={levels}: use a non-empty subset of {sorted(LEVELS)}")
        if n_train < len(self.levels) or n_eval < len(self.levels):
            raise ConfigError(
                f"task.n_train={n_train}, task.n_eval={n_eval}: each must be >= the number of "
                f"levels ({len(self.levels)})"
            )
        self.seed, self.n_train, self.n_eval = seed, n_train, n_eval
        self._cache: dict[str, list[Problem]] = {}

    def problems(self, split: str) -> list[Problem]:
        """All problems of ``"train"`` or ``"eval"`` (``"test"`` is an alias), level by level."""
        split = {"test": "eval"}.get(split, split)
        if split not in ("train", "eval"):
            raise ConfigError(
                f"the arithmetic task has no {split!r} split; set task.train_split / "
                "task.eval_split to train or eval (alias test)"
            )
        if split not in self._cache:
            self._cache[split] = self._build(split)
        return list(self._cache[split])

    def check_size(self, split: str) -> None:
        """A one-line ConfigError, at once, when the split asks for more problems than the task
        can draw (`check_problem_counts`); building the split would search for minutes first."""
        if split == "train":
            check_problem_counts("task.n_train", self.n_train, self.levels, 1 - EVAL_FRACTION)
        else:
            check_problem_counts("task.n_eval", self.n_eval, self.levels, EVAL_FRACTION)

    def _build(self, split: str) -> list[Problem]:
        self.check_size(split)
        total = self.n_train if split == "train" else self.n_eval
        problems: list[Problem] = []
        for k, level in enumerate(self.levels):
            count = total // len(self.levels) + (k < total % len(self.levels))
            rng = random.Random(f"{self.seed}/{split}/{level}")
            seen: set[str] = set()
            for _ in range(200 * count):
                if len(seen) == count:
                    break
                seen.add(sample_problem(level, rng, split)[0])
            if len(seen) < count:
                raise ConfigError(
                    f"task.n_{'train' if split == 'train' else 'eval'}={total}: level {level} has "
                    f"fewer than {count} {split} questions; lower it"
                )
            for question in sorted(seen, key=_order_key):
                steps = solve_steps(question)
                problems.append(
                    Problem(
                        id=f"arithmetic/{split}/{len(problems)}",
                        question=question,
                        answer=str(steps[-1][3]),
                        difficulty=level,
                        solution=shortest_correct_trace(question),
                        meta={"level": level, "n_steps": len(steps)},
                    )
                )
        return problems

    def format_prompt(self, problem: Problem, tokenizer: Any = None) -> str:
        """``q:<question>\\n`` (a chat-templated instruction when the tokenizer has a template)."""
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            message = (
                f"Compute {problem.question} step by step, left to right. "
                f"End with '{ANSWER_MARKER}' followed by the integer answer."
            )
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
            )
        return f"q:{problem.question}\n"

    def score(self, completion: str, problem: Problem) -> float:
        """1.0 when the strictly extracted answer equals the reference answer, else 0.0."""
        return 1.0 if extract_answer(completion) == int(problem.answer) else 0.0
