"""Dataset loaders and MathDatasetTask: local JSONL, the env folder, the hub, prompts, scoring."""

from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
import pytest

from agpo_lab.models.tokenizer import build_char_tokenizer
from agpo_lab.tasks.base import Problem, Task
from agpo_lab.tasks.math_datasets import (
    DATA_DIR_ENV,
    DEFAULT_INSTRUCTION,
    MathDatasetTask,
    load_problems,
    read_jsonl,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SIZES = {("gsm8k", "train"): 7473, ("gsm8k", "test"): 1319, ("math500", "test"): 500}
SIZES |= {("aime24", "test"): 30, ("amc23", "test"): 40}


def shared_data(name: str) -> Path:
    """The shared data folder, or skip: a fresh clone has no ../shared/data."""
    if not (SHARED_DATA / name).is_dir():
        pytest.skip(f"reference data {SHARED_DATA / name} is absent (only in the dev workspace)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def no_data_env(monkeypatch):
    """Tests start with no default data folder and a hub that must not be reached."""
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_network)


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


GSM_ROWS = [
    {"question": "What is 2+3?", "answer": "2+3=<<2+3=5>>5\n#### 5"},
    {"question": "What is 1000*2?", "answer": "1000*2=2000\n#### 2,000"},
]


# --- the shared data ----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "split"), sorted(SIZES))
def test_loads_every_shared_dataset(name, split):
    problems = load_problems(name, split, shared_data(name))
    assert len(problems) == SIZES[name, split]
    assert len({p.id for p in problems}) == len(problems)
    assert problems[0].id == f"{name}/{split}/0"
    assert all(p.question.strip() and p.answer for p in problems)
    if name == "gsm8k":
        first = {"train": "72", "test": "18"}[split]  # Natalia's clips; Janet's ducks
        assert problems[0].answer == first and problems[0].solution.endswith(f"#### {first}")
    if name == "math500":
        assert {p.difficulty for p in problems} == {1, 2, 3, 4, 5}
        assert problems[0].answer == r"\left( 3, \frac{\pi}{2} \right)"
        assert problems[0].meta["subject"] == "Precalculus"
    if name in ("aime24", "amc23"):  # integers, "025" -> "25", 27.0 -> "27"
        assert all(
            p.answer.lstrip("-").isdigit() and p.answer == str(int(p.answer)) for p in problems
        )


def test_env_folder_and_eval_alias(monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(shared_data("amc23")))
    task = MathDatasetTask("amc23")
    assert isinstance(task, Task)
    assert task.problems("eval") == task.problems("test")
    assert len(task.problems("eval")) == 40


# --- local files --------------------------------------------------------------------------------


def test_folder_layouts_single_file_and_split_files(tmp_path):
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", GSM_ROWS)
    assert [p.answer for p in load_problems("gsm8k", "test", tmp_path)] == ["5", "2,000"]
    assert len(load_problems("gsm8k", "test", tmp_path / "gsm8k")) == 2  # <split>.jsonl directly
    one_file = write_jsonl(tmp_path / "mine.jsonl", GSM_ROWS[:1])
    assert len(load_problems("gsm8k", "train", one_file)) == 1
    task = MathDatasetTask("gsm8k", split_files={"train": one_file}, path=tmp_path)
    assert len(task.problems("train")) == 1 and len(task.problems("test")) == 2


def test_missing_local_file_names_the_expected_path(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"math500/test\.jsonl.*\"problem\", \"answer\""):
        load_problems("math500", "test", tmp_path)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=DATA_DIR_ENV):
        load_problems("math500", "test")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"question": "q", "answer": "#### 1"}\n\n{"question": "q", "answer":\n',
            r":3: invalid JSON",
        ),
        ('{"question": "q", "answer": "#### 1"}\n[1, 2]\n', r":2: expected a JSON object"),
        ('{"question": "q", "solution": "1"}\n', r":1: needs fields \"question\", \"answer\""),
        ('{"question": "q", "answer": "just 1"}\n', r":1: GSM8K answer has no '#### <number>'"),
        ("\n\n", r"no problems in it"),
        (b"\xff\xfe{", r"not UTF-8"),
    ],
)
def test_malformed_jsonl_gives_one_line_error_with_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as error:
        load_problems("gsm8k", "test", path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_read_jsonl_reports_line_numbers(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    assert read_jsonl(path) == [(1, {"a": 1}), (3, {"a": 2})]
    with pytest.raises(FileNotFoundError, match="no such JSONL file"):
        read_jsonl(tmp_path / "absent.jsonl")


def test_unknown_dataset_and_split_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown dataset 'gsm9k'"):
        MathDatasetTask("gsm9k")
    with pytest.raises(ValueError) as error:
        MathDatasetTask("math500").problems("train")
    message = str(error.value)
    assert message.startswith("math500 has no 'train' split; it has ['test']")
    assert "set task.train_split" in message and "task.train_split=test" in message
    assert "\n" not in message


# --- the hub ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_without_a_path_says_where_to_put_the_file(monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as error:
        MathDatasetTask("gsm8k").problems("train")
    message = str(error.value)
    assert time.monotonic() - start < 1.0  # answered without any network attempt
    assert "\n" not in message
    assert "offline" in message and "gsm8k/train.jsonl" in message and "path=" in message
    assert '"question", "answer"' in message and DATA_DIR_ENV in message


def test_hub_rows_become_problems_with_the_hub_split_name(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    calls = []

    def fake_load_dataset(repo, config, split):
        calls.append((repo, config, split))
        return [{"id": 60, "problem": "Find x.", "solution": r"\boxed{25}", "answer": "025"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    problems = MathDatasetTask("aime24").problems("test")
    assert calls == [("HuggingFaceH4/aime_2024", None, "train")]  # AIME 2024's only hub split
    assert problems == [Problem("aime24/test/0", "Find x.", "25", 0, r"\boxed{25}")]
    assert problems[0].meta == {"id": 60}


def test_hub_failure_is_a_one_line_error(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach huggingface.co\nsecond line of detail")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(FileNotFoundError, match=r"could not load HuggingFaceH4/MATH-500") as error:
        MathDatasetTask("math500").problems("test")
    assert "\n" not in str(error.value) and "Couldn't reach" in str(error.value)


# --- prompts and scoring ------------------------------------------------------------------------

PROBLEM = Problem("gsm8k/test/0", "What is 2+3?", "5")


def test_plain_text_prompt_asks_for_a_boxed_answer():
    task = MathDatasetTask("gsm8k")
    prompt = task.format_prompt(PROBLEM)
    assert prompt == f"Problem: What is 2+3?\n\n{DEFAULT_INSTRUCTION}\n\nSolution:"
    assert task.format_prompt(PROBLEM, build_char_tokenizer()) == prompt  # no chat template
    with_system = MathDatasetTask("gsm8k", system_prompt="Be brief.").format_prompt(PROBLEM)
    assert with_system == f"Be brief.\n\n{prompt}"


def test_chat_template_is_used_when_the_tokenizer_has_one():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    user = f"<user>What is 2+3?\n\n{DEFAULT_INSTRUCTION}\n"
    assert MathDatasetTask("gsm8k").format_prompt(PROBLEM, tokenizer) == f"{user}<assistant>"
    task = MathDatasetTask("gsm8k", system_prompt="Be brief.")
    assert task.format_prompt(PROBLEM, tokenizer) == f"<system>Be brief.\n{user}<assistant>"


def test_task_scores_completions(tmp_path):
    gsm = MathDatasetTask("gsm8k", path=write_jsonl(tmp_path / "g.jsonl", GSM_ROWS))
    first, second = gsm.problems("test")
    assert gsm.score("2+3 is 5, so \\boxed{5}.", first) == 1.0
    assert gsm.score("1000*2=2000\n#### 2000", second) == 1.0
    assert gsm.score("\\boxed{6}", first) == 0.0
    assert gsm.score("so we get 5", first) == 0.0  # strict format: no last-number fallback
    assert gsm.score("2+3 = 5. The answer is 5.", first) == 1.0  # a stated answer counts
    math = MathDatasetTask("math500", path=shared_data("math500"))
    polar = math.problems("test")[0]
    assert math.score(r"so $\boxed{(3, \pi/2)}$", polar) == 1.0
    assert math.score(r"so $\boxed{(3, \pi)}$", polar) == 0.0
