"""The character tokenizer: one token per character, left padding, offline save/load."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, Qwen2Config

from agpo_lab.models.tokenizer import (
    DEFAULT_CHARS,
    SPECIAL_TOKENS,
    build_char_tokenizer,
    byte_level_spelling,
)


def test_one_token_per_character_and_round_trip():
    tok = build_char_tokenizer()
    text = "q:12+7-5\n12+7=19;check 19-7=12;ans:14"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert len(tok) == len(SPECIAL_TOKENS) + len(DEFAULT_CHARS)


def test_no_special_tokens_are_added_and_eos_is_skippable():
    tok = build_char_tokenizer()
    ids = tok("3+4")["input_ids"]
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    assert tok.decode([*ids, tok.eos_token_id], skip_special_tokens=True) == "3+4"


def test_unknown_characters_map_to_unk():
    tok = build_char_tokenizer()
    ids = tok("1&2")["input_ids"]
    assert ids[1] == tok.unk_token_id
    assert ids[0] != tok.unk_token_id


def test_batches_are_left_padded():
    tok = build_char_tokenizer()
    batch = tok(["1", "123"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 3)
    assert batch["input_ids"][0, :2].tolist() == [tok.pad_token_id] * 2
    assert batch["attention_mask"].tolist() == [[0, 0, 1], [1, 1, 1]]


@pytest.mark.parametrize("with_qwen2_config", [False, True])
def test_save_and_load_offline(tmp_path, monkeypatch, with_qwen2_config):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = build_char_tokenizer()
    tok.save_pretrained(tmp_path)
    if with_qwen2_config:  # transformers then rebuilds a Qwen2Tokenizer from the saved vocab
        Qwen2Config(vocab_size=len(tok)).save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "q:87*73+4\n87*73=6351; again ans:6355"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert loaded.padding_side == "left"
    assert (loaded.pad_token, loaded.eos_token) == ("<pad>", "<eos>")


def test_custom_alphabet_and_repeated_characters():
    tok = build_char_tokenizer("ab")
    assert len(tok) == len(SPECIAL_TOKENS) + 2
    assert tok.decode(tok("abba")["input_ids"]) == "abba"
    with pytest.raises(ValueError, match="repeated"):
        build_char_tokenizer("aab")


def test_byte_level_spelling_worked_examples():
    assert [byte_level_spelling(c) for c in "a1+"] == ["a", "1", "+"]
    assert byte_level_spelling(" ") == "Ġ" and byte_level_spelling("\n") == "Ċ"
    with pytest.raises(ValueError, match="single byte"):
        byte_level_spelling("€")
