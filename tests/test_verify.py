"""Answer extraction and checking: perturbations, adversarial text, worker time bounds.

The checks of the real reference solutions (../shared/data) are in test_verify_real_data.py.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from agpo_lab.tasks import verify, verify_worker
from agpo_lab.tasks.verify import (
    check_math,
    check_math_batch,
    check_numeric,
    extract_boxed,
    extract_final_answer,
    parse_number,
    score_completion,
    screen_answer,
)

TIMEOUT_S = 1.0
# kill + restart + pipe round trip on a loaded 2-core machine; an unbounded check runs over 20 s
SLACK_S = 3.0


@pytest.fixture(scope="module", autouse=True)
def warm_worker():
    """Start the math-verify workers once, so timings below measure checks, not start-up."""
    assert all(check_math_batch([("x+1", "1+x")] * verify.verify_workers()))


# --- extraction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{\frac{1}{2}} or rather \boxed{3}.", "3"),
        (r"$\boxed{\left( 3, \frac{\pi}{2} \right)}$", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{a} then \boxed{b", "a"),
        (r"\fbox{7}", "7"),
        (r"the answer is $\boxed 5$", "5"),
        (r"\boxed{ 12 }", "12"),
        ("no box here, 42", None),
        ("}}}{{{", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_final_answer_gsm8k_takes_whichever_comes_last():
    assert extract_final_answer("3 + 4 = 7\n#### 7", "gsm8k") == "7"
    assert extract_final_answer("#### 7\nno wait, \\boxed{8}", "gsm8k") == "8"
    assert extract_final_answer("\\boxed{8}\n#### 1,000", "gsm8k") == "1,000"
    assert extract_final_answer("#### 7", "math") is None
    assert extract_final_answer("so 3 + 4 = 7", "gsm8k") is None  # no last-number fallback
    assert extract_final_answer("the answer is 7", "math") is None
    with pytest.raises(ValueError, match="unknown answer style"):
        extract_final_answer("x", "latex")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # what SmolLM2-135M-Instruct and other instruct models actually write
        ("10 + 9 = 19.\nThe answer is 19.", "19"),
        ("The answer is: 19", "19"),
        ("**Answer:** 1,200", "1,200"),
        ("So the final answer is $18$.", "18"),
        ("The answer is \\(12\\).", "12"),
        ("The answer is 19 apples.", "19"),
        ("The answer is -3.", "-3"),
        ("Answer = 4.5", "4.5"),
        ("The answer is 7.\n#### 8", "8"),  # whichever comes last
        ("\\boxed{5} The answer is 6.", "6"),
        ("The answer is 6. Double-checking: \\boxed{5}", "5"),
        # refused: no stated answer, or a hedge
        ("The answer is N.", None),
        ("9 + 2 = 11", None),
        ("The answer is 3 or 4.", None),
        ("The answer is 3, 4, 5 or 6", None),
        ("The answer is 7 but 3+4 is 8", None),
        ("The answer is 7. Wait, the answer is 8 or 9.", None),  # the last statement counts
        ("I think 7 is the answer.", None),
    ],
)
def test_stated_answers_are_accepted_and_hedges_refused(text, expected):
    assert extract_final_answer(text, "gsm8k") == expected


def test_stated_answer_is_scored_exactly():
    assert score_completion("The answer is 19.", "19", "gsm8k") == 1.0
    assert score_completion("The answer is 19.0.", "19", "gsm8k") == 1.0
    assert score_completion("The answer is 190.", "19", "gsm8k") == 0.0
    assert score_completion("The answer is 1 or 19.", "19", "gsm8k") == 0.0
    many = "The answer is 19. " * 5000 + "x" * 200_000  # over MAX_TEXT_CHARS: refused outright
    assert score_completion(many, "19", "gsm8k") == 0.0


# --- numeric checking ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("18", 18),
        ("1,234", 1234),
        (r"\$1,234.50", 1234.5),
        ("$18.00", 18),
        ("7.", 7),
        ("50%", 50),
        (r"50\%", 50),
        ("-3", -3),
        (r"\frac{3}{4}", 0.75),
        (r"-\dfrac{3}{4}", -0.75),
        ("3/4", 0.75),
        ("18 dollars", 18),
        (r"18 \text{ dollars}", 18),
        ("x = 7", 7),
        ("1,00", None),
        ("5x", None),
        (r"\frac123", None),
        ("3/0", None),
        ("1e5", None),
        ("seven", None),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_check_numeric_equal_and_perturbed():
    assert check_numeric("1,000.0", "1000")
    assert check_numeric(r"\$5", "5")
    assert not check_numeric("999", "1000")
    assert not check_numeric("1000.5", "1000")
    assert not check_numeric(None, "1000")
    assert not check_numeric("", "1000")


# --- math-verify checking -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "ref"),
    [
        (r"\frac{1}{2}", "0.5"),
        ("-q+p", "p - q"),
        ("025", "25"),
        (r"\{2, 1\}", r"\{1, 2\}"),
        (r"(3, \frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\sqrt{2}", r"2^{1/2}"),
        (r"90", r"90^\circ"),
        (r"\text{Evelyn}", r"\text{Evelyn}"),
    ],
)
def test_check_math_accepts_equivalent_forms(pred, ref):
    assert check_math(pred, ref)


@pytest.mark.parametrize(
    ("pred", "ref"),
    [
        ("0.51", "0.5"),
        ("p + q", "p - q"),
        ("26", "25"),
        (r"\{1, 3\}", r"\{1, 2\}"),
        (r"\sqrt{3}", r"2^{1/2}"),
        ("52_9", "52_8"),
        ("5x", "5"),
        (None, "5"),
        ("", "5"),
    ],
)
def test_check_math_rejects_different_answers(pred, ref):
    assert not check_math(pred, ref)


def test_non_positive_timeout_is_a_clear_error():
    with pytest.raises(ValueError, match="timeout_s=0"):
        check_math("x", "y", timeout_s=0)


def test_model_text_is_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    assert score_completion(f"\\boxed{{{payload}}}", "0") == 0.0
    assert score_completion(f"\\boxed{{{payload}}}", "0", "gsm8k") == 0.0
    assert not marker.exists()


# --- adversarial completions --------------------------------------------------------------------

ADVERSARIAL = {
    "power tower": r"\boxed{9^9^9^9}",
    "braced power tower": r"\boxed{9^{9^{9^{9}}}}",
    "huge exponent": r"\boxed{10^{10000000}}",
    "huge factorial": r"\boxed{99999!}",
    "big power": r"\boxed{999999^{999999}}",
    "slow harmonic sum (passes the screen)": r"\boxed{\sum_{k=1}^{9999} \frac{1}{k}}",
    "slow expansion (passes the screen)": r"\boxed{(x+1)^{9999}}",
    "huge product": r"\boxed{\prod_{k=1}^{999999} k}",
    "huge binomial": r"\boxed{\binom{999999}{499999}}",
    "deep braces in a box": r"\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",
    "deep parentheses": r"\boxed{" + "(" * 200 + "1" + ")" * 200 + "}",
    "unbalanced megabyte of braces": "{" * 1_000_000,
    "megabyte answer": r"\boxed{" + "1" * 1_000_000 + "}",
    "long answer within the text cap": r"\boxed{" + "1+" * 50_000 + "1}",
    "NUL bytes": "\\boxed{1\x00}",
    "control characters": "\\boxed{\x1b[31m1\x07}",
    "only NUL": "\x00" * 1000,
    "unicode soup": "\\boxed{" + "\u202e\ufeff\U0001f600" * 100 + "}",
    "many boxes": r"\boxed{1}" * 20_000,
}


@pytest.mark.parametrize("style", ["math", "gsm8k"])
@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_completions_are_bounded(name, style):
    start = time.monotonic()
    score = score_completion(ADVERSARIAL[name], "2", style, timeout_s=TIMEOUT_S)
    elapsed = time.monotonic() - start
    assert score == 0.0
    assert elapsed < TIMEOUT_S + SLACK_S, f"{name}: {elapsed:.2f} s"


def test_screen_answer_reasons():
    assert screen_answer(r"\frac{1}{2}") is None
    assert screen_answer("9^{9^{9^{9}}}") == "numeric power tower"
    assert screen_answer("2^{12345678}") == "huge exponent or factorial"
    assert screen_answer("12345!") == "huge exponent or factorial"
    assert "huge bound" in screen_answer(r"\binom{999999}{499999}")
    assert screen_answer(r"\binom{10}{5}") is None
    assert "control" in screen_answer("1\x00")
    assert "nested" in screen_answer("{" * 30 + "}" * 30)
    assert "longer" in screen_answer("1" * 10_000)


def worker_pids() -> list[int]:
    """Process ids of the running math-verify workers of this process's pool."""
    return [w.process.pid for w in verify_worker.shared_pool().workers if w.process is not None]


def test_stuck_worker_is_killed_and_replaced(monkeypatch):
    # Disable the screen and the worker's own soft timer: only the parent's hard kill can stop
    # this check (it runs for over 20 s when left alone).
    monkeypatch.setattr(verify, "screen_answer", lambda answer: None)
    monkeypatch.setattr(verify_worker, "SOFT_FRACTION", 1000.0)
    pids_before = worker_pids()
    start = time.monotonic()
    assert not check_math(r"\binom{999999}{499999}", "1", timeout_s=0.5)
    assert time.monotonic() - start < 0.5 + SLACK_S
    pids_after = worker_pids()
    assert set(pids_after) != set(pids_before)  # one worker was killed
    assert check_math("x+1", "1+x")  # and the next check still works (on a fresh worker)


def test_checks_work_and_are_bounded_from_threads():
    results: dict[str, object] = {}

    def run(key, pred, ref):
        start = time.monotonic()
        results[key] = (check_math(pred, ref, timeout_s=TIMEOUT_S), time.monotonic() - start)

    threads = [
        threading.Thread(target=run, args=("easy", r"\frac{2}{4}", "0.5")),
        threading.Thread(target=run, args=("slow", r"\sum_{k=1}^{9999} \frac{1}{k}", "1")),
        threading.Thread(target=run, args=("symbolic", "(x+1)^2", "x^2+2x+1")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[k][0] for k in ("easy", "slow", "symbolic")] == [True, False, True]
    # Three checks on two workers: the last may queue behind the slow one.
    assert max(seconds for _, seconds in results.values()) < 2 * TIMEOUT_S + SLACK_S


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX only)")
def test_forked_child_gets_its_own_workers():
    assert check_math("x+1", "1+x")
    parent_pids = worker_pids()
    child = os.fork()
    if child == 0:  # the child: must not talk to (or kill) the parent's workers
        try:
            ok = (
                check_math("(x+1)^2", "x^2+2x+1")
                and verify_worker.shared_pool().owner_pid == os.getpid()
            )
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert worker_pids() == parent_pids
    assert check_math("x+2", "2+x")
