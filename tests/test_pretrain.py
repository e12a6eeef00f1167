"""The SFT script and the shipped checkpoint in data/embedded."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from agpo_lab.config import PretrainConfig
from agpo_lab.experiments.card import _summarise, measure
from agpo_lab.experiments.pretrain import learning_rate_at, pretrain, sft_batch
from agpo_lab.models import EMBEDDED_MODEL_DIR
from agpo_lab.models.tokenizer import build_char_tokenizer
from agpo_lab.tasks.arithmetic import ArithmeticTask, extract_answer

TINY = {
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 2,
    "intermediate_size": 64,
    "steps": 3,
    "batch_size": 8,
    "warmup_steps": 1,
    "eval_problems": 0,
}


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_same_seed_gives_bit_identical_weights(tmp_path):
    first = pretrain(PretrainConfig(output_dir=str(tmp_path / "a"), seed=5, **TINY))
    second = pretrain(PretrainConfig(output_dir=str(tmp_path / "b"), seed=5, **TINY))
    other = pretrain(PretrainConfig(output_dir=str(tmp_path / "c"), seed=6, **TINY))
    a, b, c = _weights(first), _weights(second), _weights(other)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    for name in ["config.json", "generation_config.json", "tokenizer.json", "README.md"]:
        assert (first / name).is_file()
    card = json.loads((first / "card.json").read_text())
    assert card["config"]["seed"] == 5 and "eval" not in card


def test_sft_batch_is_left_padded_with_completion_only_labels():
    tok = build_char_tokenizer()
    config = PretrainConfig(batch_size=6)
    batch = sft_batch(tok, config, random.Random(0))
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape and ids.shape[0] == 6
    assert (mask[:, -1] == 1).all()  # left padding: every row ends with a real token
    assert (labels[:, -1] == tok.eos_token_id).all()
    for row in range(6):
        prompt_end = tok.decode(ids[row][mask[row].bool()]).index("\n") + 1
        start = int((mask[row] == 0).sum())
        assert (labels[row, : start + prompt_end] == -100).all()  # prompt and padding masked
        completion = tok.decode(labels[row, start + prompt_end : -1])
        assert extract_answer(completion) is not None


def test_learning_rate_schedule():
    config = PretrainConfig(steps=100, warmup_steps=10, learning_rate=1.0)
    assert learning_rate_at(0, config) == pytest.approx(0.1)
    assert learning_rate_at(10, config) == pytest.approx(1.0)
    assert learning_rate_at(100, config) == pytest.approx(0.1)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="level_weights"):
        PretrainConfig(level_weights=(1.0,))
    with pytest.raises(ValueError, match="divisible"):
        PretrainConfig(hidden_size=30, num_heads=4)


def test_summarise_worked_example():
    # Two prompts, G=2: one solved twice (all correct), one solved once (mixed).
    rows = [(1, 2, [10, 12], 0, "3+4"), (2, 1, [20, 30], 1, "1+2-3")]
    problems = ArithmeticTask(n_eval=5).problems("eval")[:2]
    stats = _summarise(rows, problems, group_size=2)
    assert stats["pass_at_1"] == 0.75
    assert (stats["frac_all_correct"], stats["frac_all_wrong"], stats["frac_mixed"]) == (
        0.5,
        0.0,
        0.5,
    )
    assert stats["mean_completion_tokens"] == 18.0 and stats["truncated_rate"] == 0.25
    assert stats["correct_per_question"] == {"3+4": 2, "1+2-3": 1}
    assert stats["per_level"]["2"]["pass_at_1"] == 0.5


# ---- the shipped checkpoint -------------------------------------------------------------------


def _card():
    return json.loads((EMBEDDED_MODEL_DIR / "card.json").read_text())


def test_shipped_checkpoint_loads_offline_and_is_small(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL_DIR)
    tok = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    assert model.config.model_type == "qwen2"
    assert tok.padding_side == "left" and len(tok) == model.config.vocab_size
    assert 0.3e6 < sum(p.numel() for p in model.parameters()) < 2e6
    size = sum(f.stat().st_size for f in EMBEDDED_MODEL_DIR.iterdir() if f.is_file())
    assert size < 10 * 2**20
    readme = (EMBEDDED_MODEL_DIR / "README.md").read_text()
    assert _card()["command"] in readme and "pretrain" in _card()["command"]


def test_shipped_card_meets_the_issue_targets():
    ev = _card()["eval"]
    assert ev["group_size"] == 8 and ev["prompts"] >= 100
    assert 0.3 <= ev["pass_at_1"] <= 0.8
    for kind in ["frac_all_correct", "frac_all_wrong", "frac_mixed"]:
        assert ev[kind] >= 0.1, kind
    assert ev["length_ratio"] >= 1.5
    # A spread of difficulty: the easiest level is mostly solved, the hardest never.
    assert ev["per_level"]["1"]["pass_at_1"] > 0.6 > ev["per_level"]["5"]["pass_at_1"]


@pytest.mark.slow
def test_shipped_pass_at_1_agrees_with_the_card():
    card = _card()["eval"]
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL_DIR)
    tok = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    task = ArithmeticTask(seed=0, n_eval=40)  # a subset of the card's eval problems
    stats = measure(model, tok, task, group_size=8, max_new_tokens=96, seed=123)
    expected = [card["correct_per_question"][q] / 8 for q in stats["correct_per_question"]]
    assert abs(stats["pass_at_1"] - sum(expected) / len(expected)) < 0.1
