"""Answer extraction and checking for math tasks, safe against untrusted model output.

Three layers, cheapest first:

1. Extraction: the final answer is the content of the last balanced ``\\boxed{...}``, or, for
   numeric answers (GSM8K, the word-arithmetic task), whichever comes last of a box, the dataset's
   own ``#### <answer>`` line and a stated answer ("The answer is 42.", "**Answer:** 42") whose
   sentence holds no other number. There is no "last number in the text" fallback, and an
   equation such as "9 + 2 = 11" is not an answer: a lenient extractor is a reward hack waiting
   to happen.
2. Screening: answers that are too long, contain control characters, nest too deeply, or hold
   numeric power towers / huge exponents or factorials are rejected before any parser sees them.
3. Checking: plain numbers are compared exactly with `fractions.Fraction` in-process. Everything
   else goes to `math-verify` (LaTeX parser only; its plain-expression parser runs
   `sympy.parse_expr`, i.e. `eval`, so it is never used on model text) in a small persistent
   worker process that is killed and replaced if it overruns, so every check is time-bounded
   from any thread (`agpo_lab.tasks.verify_worker` explains why a process).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from agpo_lab.tasks.verify_worker import shared_pool

MAX_TEXT_CHARS = 200_000
"""Longer completions are rejected outright (far beyond any realistic completion length)."""
MAX_ANSWER_CHARS = 512
"""Longest extracted answer that is checked (MATH-500's longest reference is under 100 chars)."""
MAX_NESTING = 24
"""Deepest bracket nesting ({, (, [) allowed in an answer before it is rejected."""
DEFAULT_TIMEOUT_S = 5.0
"""Default hard time bound of one `check_math` call, in seconds."""
STYLES = ("math", "gsm8k")
"""`math`: answer in \\boxed{}, checked by math-verify. `gsm8k`: \\boxed{}, `#### ` or a stated
"the answer is N", checked numerically."""

_BRACE_TOKEN = re.compile(r"\\(?:boxed|fbox)\s*\{|\\[{}]|[{}]")
_UNBRACED_BOX = re.compile(r"\\boxed\s+([^\s$]+)")
_HASH_ANSWER = re.compile(r"^[ \t]*####[ \t]*(.*?)[ \t]*$", re.MULTILINE)
_STATED_ANSWER = re.compile(
    r"\banswer\**\s*(?:is|:|=)[\s:*$]*(?:\\\(\s*)?([-+]?\d[\d,]*(?:\.\d+)?)(?![\d,]*\.?\d)",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"\.(?:\s|$)|[!?\n]|$")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_POWER_TOWER = re.compile(r"\d\^[-+]?\d+\^")
_BASE_SUBSCRIPT = re.compile(r"_\{?(\d+)\}?\s*$")
_HUGE_EXPONENT = re.compile(r"\^[-+]?\d{5,}|\d{4,}!")
_BIG_OPERATOR = re.compile(r"\\(?:[dt]?binom|choose|sum|prod)")


def _last_boxed_span(text: str) -> tuple[int, int] | None:
    """(start, end) of the content of the last balanced box, i.e. the box that closes last."""
    stack: list[int | None] = []  # content start for a box brace, None for a plain brace
    best = None
    for match in _BRACE_TOKEN.finditer(text):
        token = match.group()
        if token.startswith("\\") and len(token) == 2:
            continue  # \{ and \} are literal braces (sets), not grouping
        if token == "}":
            if stack and (start := stack.pop()) is not None:
                best = (start, match.start())
        else:
            stack.append(match.end() if token != "{" else None)
    if best is None and (loose := list(_UNBRACED_BOX.finditer(text))):
        best = loose[-1].span(1)  # `\boxed 5`, as some MATH solutions write it
    return best


def extract_boxed(text: str) -> str | None:
    """Content of the last balanced ``\\boxed{...}`` (or ``\\fbox{...}``), or None.

    Example: ``extract_boxed(r"so \\boxed{\\frac{1}{2}} or \\boxed{3}") == "3"``; unbalanced
    ``\\boxed{3`` gives None; texts over MAX_TEXT_CHARS give None.
    """
    if not isinstance(text, str) or len(text) > MAX_TEXT_CHARS:
        return None
    span = _last_boxed_span(text)
    return None if span is None else text[span[0] : span[1]].strip()


def stated_answer_span(text: str) -> tuple[int, int] | None:
    """(start, end) of the number in the last "answer is N" statement, or None.

    Accepted: "answer is N", "answer: N", "answer = N" (any case, "**Answer:** N", "$N$" and a
    trailing unit word allowed). Refused (None): a last statement whose sentence holds another
    number ("The answer is 3 or 4", "The answer is 3, 4, 5"), so hedging never pays. Only the last
    statement counts. Example: ``"So the answer is 1,200 dollars."`` -> the span of "1,200".
    """
    statements = list(_STATED_ANSWER.finditer(text))
    if not statements:
        return None
    last = statements[-1]
    sentence_end = _SENTENCE_END.search(text, last.end(1))
    rest = text[last.end(1) : sentence_end.start() if sentence_end else len(text)]
    return None if re.search(r"\d", rest) else last.span(1)


def extract_final_answer(text: str, style: str = "math") -> str | None:
    """The final answer of a completion in `style`.

    "math": the last box. "gsm8k" (numeric answers): whichever comes last of the last box, the
    last ``#### N`` line and the last stated answer (`stated_answer_span`).
    Examples: ``extract_final_answer("3 + 4 = 7\\n#### 7", "gsm8k") == "7"``;
    ``extract_final_answer("3 + 4 = 7. The answer is 7.", "gsm8k") == "7"``;
    ``extract_final_answer("3 + 4 = 7", "gsm8k") is None``.
    """
    if style not in STYLES:
        raise ValueError(f"unknown answer style {style!r}; use one of {STYLES}")
    if not isinstance(text, str) or len(text) > MAX_TEXT_CHARS:
        return None
    box = _last_boxed_span(text)
    if style == "math":
        return None if box is None else text[box[0] : box[1]].strip()
    candidates = [span for span in (box, stated_answer_span(text)) if span is not None]
    hashes = list(_HASH_ANSWER.finditer(text))
    if hashes:
        candidates.append(hashes[-1].span(1))
    if not candidates:
        return None
    start, end = max(candidates)
    return text[start:end].strip() or None


def screen_answer(answer: str) -> str | None:
    """Why an extracted answer is refused before any parsing, or None if it may be checked.

    Example: ``screen_answer("9^{9^{9^{9}}}")`` gives "numeric power tower";
    ``screen_answer(r"\\frac{1}{2}") is None``.
    """
    if len(answer) > MAX_ANSWER_CHARS:
        return f"longer than {MAX_ANSWER_CHARS} characters"
    if _CONTROL.search(answer):
        return "contains control characters"
    depth = deepest = 0
    for char in answer:
        depth += (char in "{([") - (char in "})]")
        deepest = max(deepest, depth)
    if deepest > MAX_NESTING:
        return f"brackets nested deeper than {MAX_NESTING}"
    flat = re.sub(r"[\s{}()]", "", answer).replace("**", "^")
    if _POWER_TOWER.search(flat):
        return "numeric power tower"
    if _HUGE_EXPONENT.search(flat):
        return "huge exponent or factorial"
    if _BIG_OPERATOR.search(answer) and re.search(r"\d{5,}", answer):
        return "sum, product or binomial with a huge bound"
    return None


def parse_number(text: str) -> Fraction | None:
    """A plain number written the ways GSM8K-style answers are written, exactly; else None.

    Accepts `$`, `\\$`, `%`, thousands commas, trailing `.0`, `\\frac{a}{b}`, `a/b`, `x = ...`,
    and unit words after the number. Example: ``parse_number(r"\\$1,234.50") == Fraction(2469, 2)``,
    ``parse_number("50%") == 50``, ``parse_number("1,2") is None``.
    """
    if len(text) > 100 or _CONTROL.search(text):
        return None
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r" \1 ", text)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\[$%!,;: ]|[$%]|\^\{?\\circ\}?|°", " ", s)
    s = re.sub(r"^\s*[a-zA-Z]\s*=", "", s).strip().rstrip(".").strip()
    s = re.sub(r"(?<=\d)\s+[a-zA-Z]{2,}[a-zA-Z ]*$", "", s).strip()  # units: "18 dollars"
    s = re.sub(r"(?<=\d),(?=\d{3}(?:\D|$))", "", s)
    fraction = re.fullmatch(r"([-+]?)\\frac(\{\d+\}|\d)(\{\d+\}|\d)", s)
    match = fraction or re.fullmatch(r"([-+]?)(\d+)\s*/\s*(\d+)", s)
    if match:
        sign, num, den = (group.strip("{}") for group in match.groups())
    elif re.fullmatch(r"[-+]?(?:\d+\.?\d*|\.\d+)", s):
        try:
            return Fraction(Decimal(s))
        except (InvalidOperation, ValueError):
            return None
    else:
        return None
    if int(den) == 0:
        return None
    return Fraction(int(num), int(den)) * (-1 if sign == "-" else 1)


def check_numeric(pred: str | None, ref: str) -> bool:
    """Exact numeric equality after `parse_number` normalisation (GSM8K's rule).

    Example: ``check_numeric("1,000.0", "1000")`` is True; ``check_numeric("999", "1000")`` False.
    """
    if pred is None:
        return False
    pred_value, ref_value = parse_number(pred), parse_number(ref)
    return pred_value is not None and ref_value is not None and pred_value == ref_value


def _plain_number(text: str) -> Fraction | None:
    """A bare decimal like "025" or "-2.50" (no units, no LaTeX), exactly; else None."""
    text = text.strip()
    if len(text) > 100 or not re.fullmatch(r"[-+]?(?:\d+\.?\d*|\.\d+)", text):
        return None
    return Fraction(Decimal(text))


def check_math(pred: str | None, ref: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether answer `pred` equals reference `ref` (LaTeX), within `timeout_s` seconds.

    Plain numbers are compared exactly in-process; the rest by math-verify in a worker process
    that is killed on overrun (a timed-out check counts as wrong). The bound runs from when a
    worker takes the check: waiting for a busy worker, and a worker's start-up (about a second,
    on first use and after a kill), are not counted. Example:
    ``check_math(r"\\frac{1}{2}", "0.5")`` and ``check_math("-q+p", "p - q")`` are True.
    """
    if not timeout_s > 0:
        raise ValueError(f"check_math: timeout_s={timeout_s!r}; it must be a positive number")
    if pred is None or screen_answer(pred) is not None or screen_answer(ref) is not None:
        return False
    pred_value, ref_value = _plain_number(pred), _plain_number(ref)
    if pred_value is not None and ref_value is not None:
        if pred_value == ref_value:
            return True
        if pred_value.denominator == 1 and ref_value.denominator == 1:
            return False  # distinct integers; math-verify would agree, skip the round trip
    pred_base, ref_base = _BASE_SUBSCRIPT.search(pred), _BASE_SUBSCRIPT.search(ref)
    if pred_base and ref_base and pred_base.group(1) != ref_base.group(1):
        return False  # 52_8 vs 52_9: math-verify drops the base subscript
    return shared_pool().check(ref, pred, timeout_s)


def score_completion(
    completion: str, reference: str, style: str = "math", timeout_s: float = DEFAULT_TIMEOUT_S
) -> float:
    """1.0 if the completion's final answer matches `reference`, else 0.0 (never raises on text).

    Example: ``score_completion("... so \\boxed{18}.", "18", "gsm8k") == 1.0``.
    """
    answer = extract_final_answer(completion, style)
    if style == "gsm8k":
        return float(check_numeric(answer, reference))
    return float(check_math(answer, reference, timeout_s))


def verify_workers() -> int:
    """How many math-verify worker processes the pool uses (env AGPO_LAB_VERIFY_WORKERS)."""
    return len(shared_pool().workers)


def check_math_batch(
    pairs: list[tuple[str | None, str]], timeout_s: float = DEFAULT_TIMEOUT_S
) -> list[bool]:
    """`check_math` over (pred, ref) pairs, using every worker of the pool in parallel.

    Example: ``check_math_batch([("1/2", "0.5"), ("2", "3")]) == [True, False]``.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=verify_workers()) as executor:
        return list(executor.map(lambda pair: check_math(pair[0], pair[1], timeout_s), pairs))
