"""Answer checking on the real benchmark data in ../shared/data (skipped where it is absent).

Every reference solution of GSM8K test, MATH-500, AIME 2024 and AMC 2023 must verify against its
own answer, and near-miss perturbations of the answers must not. The checker itself (extraction,
numeric and math-verify checking, adversarial text, worker time bounds) is in test_verify.py.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from agpo_lab.tasks import verify
from agpo_lab.tasks.math_datasets import load_problems
from agpo_lab.tasks.verify import (
    check_math_batch,
    extract_boxed,
    parse_number,
    score_completion,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(name: str) -> Path:
    """The shared data folder, or skip: a fresh clone has no ../shared/data."""
    if not (SHARED_DATA / name).is_dir():
        pytest.skip(f"reference data {SHARED_DATA / name} is absent (only in the dev workspace)")
    return SHARED_DATA


@pytest.fixture(scope="module", autouse=True)
def warm_worker():
    """Start the math-verify workers once, so the timings printed below measure checks only."""
    assert all(check_math_batch([("x+1", "1+x")] * verify.verify_workers()))


def test_every_gsm8k_test_solution_verifies():
    problems = load_problems("gsm8k", "test", shared_data("gsm8k"))
    assert len(problems) == 1319
    own = [score_completion(p.solution, p.answer, "gsm8k") for p in problems]
    boxed = [
        score_completion(f"So it is \\boxed{{{p.answer}}}.", p.answer, "gsm8k") for p in problems
    ]
    print(f"GSM8K test: reference solutions verify {sum(own)}/1319, boxed {sum(boxed)}/1319")
    assert sum(own) == sum(boxed) == 1319  # no allow-list needed: every reference verifies


def test_perturbed_gsm8k_answers_are_rejected():
    problems = load_problems("gsm8k", "test", shared_data("gsm8k"))
    for problem in problems:
        value = parse_number(problem.answer)
        assert value is not None and value.denominator == 1, problem.answer
        for wrong in (value + 1, value - 1, value * 10):
            completion = f"... so the answer is \\boxed{{{wrong}}}."
            assert score_completion(completion, problem.answer, "gsm8k") == 0.0


def _math500_problems():
    return load_problems("math500", "test", shared_data("math500"))


# MATH-500 answers whose reference solution does not verify against them (with the reason).
MATH500_REFERENCE_MISSES: dict[str, str] = {}


def test_every_math500_solution_verifies():
    problems = _math500_problems()
    start = time.monotonic()
    ok = check_math_batch([(extract_boxed(p.solution), p.answer) for p in problems])
    elapsed = time.monotonic() - start
    misses = sorted(p.answer for p, good in zip(problems, ok) if not good)
    print(f"MATH-500: {sum(ok)}/{len(ok)} reference solutions verify in {elapsed:.1f} s")
    assert misses == sorted(MATH500_REFERENCE_MISSES)
    assert sum(ok) / len(ok) >= 0.99


# Digit perturbations that math-verify still accepts, each for a known reason.
MATH500_PERTURBATION_ALLOWED = {
    ".0000673": "math-verify compares floats after rounding to 6 decimals",
    "864 \\mbox{ inches}^3": "units (and their exponent) are stripped before comparing",
    "15\\mbox{ cm}^3": "units (and their exponent) are stripped before comparing",
}


def _bump_last_digit(answer: str) -> str | None:
    """`\\frac{14}{3}` -> `\\frac{14}{4}`: a near miss, since only one digit changes."""
    digits = list(re.finditer(r"\d", answer))
    if not digits:
        return None
    i = digits[-1].start()
    return answer[:i] + str((int(answer[i]) + 1) % 10) + answer[i + 1 :]


@pytest.mark.slow
def test_perturbed_math500_answers_are_rejected():
    problems = _math500_problems()
    plus_one = check_math_batch([(f"{p.answer} + 1", p.answer) for p in problems])
    assert not any(plus_one), [p.answer for p, bad in zip(problems, plus_one) if bad]
    pairs = [(_bump_last_digit(p.answer), p.answer) for p in problems if re.search(r"\d", p.answer)]
    accepted = sorted(pred for (pred, _), bad in zip(pairs, check_math_batch(pairs)) if bad)
    print(f"MATH-500: {len(accepted)}/{len(pairs)} one-digit perturbations accepted: {accepted}")
    assert accepted == sorted(MATH500_PERTURBATION_ALLOWED)


@pytest.mark.parametrize("name", ["aime24", "amc23"])
def test_competition_answers_verify_and_perturbations_fail(name):
    problems = load_problems(name, "test", shared_data(name))
    for problem in problems:
        assert score_completion(f"\\boxed{{{problem.answer}}}", problem.answer) == 1.0
        assert score_completion(f"\\boxed{{{int(problem.answer) + 1}}}", problem.answer) == 0.0
