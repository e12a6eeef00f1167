"""Real math datasets (GSM8K, MATH-500, AIME24, AMC23) as `Task`s, from local JSONL or the hub.

Where the data comes from, first match wins:

1. ``split_files={"test": "my/test.jsonl"}``: one JSONL file per split.
2. ``path=``: a single JSONL file (used for every split asked for), or a folder holding
   ``<name>/<split>.jsonl`` (the layout of ``../shared/data``) or ``<split>.jsonl``.
3. The environment variable ``AGPO_LAB_DATA_DIR``: a folder laid out as in 2.
4. The Hugging Face hub via `datasets.load_dataset`, unless ``HF_HUB_OFFLINE`` or
   ``HF_DATASETS_OFFLINE`` is set, in which case a one-line error says where to put the file.

JSONL fields: ``question`` (or ``problem``) and ``answer`` for every dataset; GSM8K's ``answer`` is
its worked solution ending in ``#### <number>``; ``solution``, ``level``, ``subject``, ``id``,
``unique_id`` and ``url`` are kept when present.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agpo_lab.errors import ConfigError, DataError, MissingFileError
from agpo_lab.tasks.base import Problem
from agpo_lab.tasks.verify import DEFAULT_TIMEOUT_S, score_completion

DATA_DIR_ENV = "AGPO_LAB_DATA_DIR"
"""Environment variable naming the default local data folder (``<dir>/<name>/<split>.jsonl``)."""
DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""Appended to every question: the scorer reads the answer from the last \\boxed{}."""


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives on the hub and how its answers are checked."""

    splits: tuple[str, ...]
    """Splits it has, in our names (``train``, ``test``)."""
    hub_id: str
    """Hugging Face dataset repository."""
    hub_config: str | None
    """Its configuration name, if any."""
    hub_splits: dict[str, str]
    """Our split name -> the hub's split name."""
    style: str
    """Answer style for `score_completion`: ``gsm8k`` (numeric) or ``math`` (math-verify)."""


DATASETS: dict[str, DatasetSpec] = {
    "gsm8k": DatasetSpec(
        ("train", "test"), "openai/gsm8k", "main", {"train": "train", "test": "test"}, "gsm8k"
    ),
    "math500": DatasetSpec(("test",), "HuggingFaceH4/MATH-500", None, {"test": "test"}, "math"),
    "aime24": DatasetSpec(("test",), "HuggingFaceH4/aime_2024", None, {"test": "train"}, "math"),
    "amc23": DatasetSpec(("test",), "math-ai/amc23", None, {"test": "test"}, "math"),
}
_EXPECTED_FIELDS = {
    "gsm8k": '"question", "answer" (a solution ending in "#### <number>")',
    "math500": '"problem", "answer" (optional "solution", "level", "subject", "unique_id")',
    "aime24": '"problem", "answer" (optional "solution", "id", "url")',
    "amc23": '"problem" (or "question"), "answer" (optional "id", "url")',
}


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


def normalize_split(name: str, split: str) -> str:
    """Our split name for `split` ("eval" means "test"); one-line error if the set lacks it."""
    split = "test" if split == "eval" else split
    if split not in _spec(name).splits:
        splits = list(_spec(name).splits)
        raise ConfigError(
            f"{name} has no {split!r} split; it has {splits}: set task.train_split / "
            f"task.eval_split to one of them (e.g. task.train_split={splits[0]})"
        )
    return split


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each line of a JSONL file (blank lines skipped).

    A bad line gives a one-line ValueError naming the file and line, e.g. ``data.jsonl:3: ...``.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no such JSONL file: {path}")
    rows = []
    with path.open(encoding="utf-8") as file:
        try:
            lines = list(file)
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not UTF-8 text ({error.reason}); save it as UTF-8") from None
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}:{line_number}: invalid JSON ({error.msg}); each line must be one object"
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}"
            )
        rows.append((line_number, row))
    return rows


def _clean_answer(value: Any) -> str:
    """Reference answers as strings: 27.0 -> "27", "025" -> "25", LaTeX kept as is."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return str(int(text)) if text.isdigit() else text


def row_to_problem(name: str, split: str, index: int, row: dict[str, Any], where: str) -> Problem:
    """One dataset row as a `Problem`; `where` (e.g. "file.jsonl:3") prefixes any error."""
    question = row.get("question", row.get("problem"))
    if not isinstance(question, str) or "answer" not in row:
        raise DataError(f"{where}: needs fields {_EXPECTED_FIELDS[name]}; got {sorted(row)}")
    if name == "gsm8k":
        solution = str(row["answer"])
        if "####" not in solution:
            raise DataError(f"{where}: GSM8K answer has no '#### <number>' final line")
        answer = solution.rsplit("####", 1)[1].strip()
    else:
        solution, answer = str(row.get("solution") or ""), _clean_answer(row["answer"])
    level = str(row.get("level", 0)).removeprefix("Level ").strip()
    meta = {key: row[key] for key in ("subject", "unique_id", "id", "url") if key in row}
    return Problem(
        id=f"{name}/{split}/{index}",
        question=question,
        answer=answer,
        difficulty=int(level) if level.isdigit() else 0,
        solution=solution,
        meta=meta,
    )


def _hub_offline() -> bool:
    flags = (os.environ.get(var, "") for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(flag.strip().lower() in {"1", "true", "yes", "on"} for flag in flags)


def _local_file(name: str, split: str, path: str | Path | None, split_files: dict | None):
    """The JSONL file to read, or None to fall back to the hub."""
    if split_files and split in split_files:
        return Path(split_files[split])
    folder = path if path is not None else os.environ.get(DATA_DIR_ENV) or None
    if folder is None:
        return None
    folder = Path(folder)
    if folder.is_file():
        return folder
    for candidate in (folder / name / f"{split}.jsonl", folder / f"{split}.jsonl"):
        if candidate.is_file():
            return candidate
    source = "path" if path is not None else DATA_DIR_ENV
    raise MissingFileError(
        f"{name}: no {folder / name / (split + '.jsonl')} (from {source}); put a JSONL file with "
        f"fields {_EXPECTED_FIELDS[name]} there"
    )


def _load_from_hub(name: str, split: str) -> list[dict[str, Any]]:
    spec = _spec(name)
    hint = (
        f"put a JSONL file with fields {_EXPECTED_FIELDS[name]} at <dir>/{name}/{split}.jsonl and "
        f"pass path=<dir> (or set {DATA_DIR_ENV}=<dir>), or pass path=<file.jsonl>"
    )
    if _hub_offline():
        raise MissingFileError(
            f"{name}: no local data and the hub is offline (HF_*_OFFLINE); {hint}"
        )
    try:
        from datasets import load_dataset

        rows = load_dataset(spec.hub_id, spec.hub_config, split=spec.hub_splits[split])
        return [dict(row) for row in rows]
    except Exception as error:
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise MissingFileError(f"{name}: could not load {spec.hub_id} ({reason}); {hint}") from None


def load_problems(
    name: str,
    split: str = "test",
    path: str | Path | None = None,
    split_files: dict[str, str | Path] | None = None,
) -> list[Problem]:
    """All problems of one split of dataset `name`, in file order (see the module docstring)."""
    split = normalize_split(name, split)
    file = _local_file(name, split, path, split_files)
    if file is None:
        where = f"{_spec(name).hub_id}[{split}]"
        return [
            row_to_problem(name, split, i, row, f"{where} row {i}")
            for i, row in enumerate(_load_from_hub(name, split))
        ]
    rows = read_jsonl(file)
    if not rows:
        raise DataError(f"{file}: no problems in it; expected JSONL with {_EXPECTED_FIELDS[name]}")
    return [
        row_to_problem(name, split, i, row, f"{file}:{line_number}")
        for i, (line_number, row) in enumerate(rows)
    ]


class MathDatasetTask:
    """GSM8K, MATH-500, AIME24 or AMC23 as a `Task`: prompts ask for a \\boxed{} final answer.

    Example: ``task = MathDatasetTask("gsm8k", path="../shared/data")``; then
    ``task.score("... \\boxed{18}", task.problems("test")[0]) == 1.0``.
    """

    def __init__(
        self,
        name: str,
        path: str | Path | None = None,
        split_files: dict[str, str | Path] | None = None,
        system_prompt: str | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"MathDatasetTask: timeout_s={timeout_s!r}; it must be positive")
        self.spec = _spec(name)
        self.name = name
        self.path = path
        self.split_files = dict(split_files or {})
        self.system_prompt = system_prompt
        self.instruction = instruction
        self.timeout_s = timeout_s
        self._cache: dict[str, list[Problem]] = {}

    def problems(self, split: str) -> list[Problem]:
        """All problems of `split` ("train", "test"; "eval" means "test"), loaded once."""
        split = normalize_split(self.name, split)
        if split not in self._cache:
            self._cache[split] = load_problems(self.name, split, self.path, self.split_files)
        return list(self._cache[split])

    def format_prompt(self, problem: Problem, tokenizer: Any = None) -> str:
        """The chat template's text when the tokenizer has one, else a plain-text template."""
        user = f"{problem.question}\n\n{self.instruction}"
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            system = (
                [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            )
            messages = [*system, {"role": "user", "content": user}]
            return tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        header = f"{self.system_prompt}\n\n" if self.system_prompt else ""
        return f"{header}Problem: {user}\n\nSolution:"

    def score(self, completion: str, problem: Problem) -> float:
        """1.0 if the completion's final answer matches the reference (time-bounded), else 0.0."""
        return score_completion(completion, problem.answer, self.spec.style, self.timeout_s)
