"""The warm start (SFT on worked solutions) end to end on the tiny model: card, determinism, resume."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from agpo_lab.config import WarmStartConfig
from agpo_lab.errors import ConfigError, MissingFileError
from agpo_lab.experiments import warmstart
from agpo_lab.experiments.warmstart import build_warm_start, sft_examples, sft_tensors
from agpo_lab.models.loading import load_tokenizer, resolve_model_path
from agpo_lab.tasks.redundancy import count_redundant_segments
from agpo_lab.tasks.word_arithmetic import WordArithmeticTask


def tiny_settings(model_dir, name: str) -> WarmStartConfig:
    return WarmStartConfig(
        base_model=str(model_dir), name=name, steps=3, batch_size=4, warmup_steps=3,
        lora_r=2, lora_alpha=4, save_every=1, card_train_problems=3, card_eval_problems=3,
        group_size=2, max_new_tokens=8, docs_dir=None,
    )  # fmt: skip


def test_sft_batches_are_a_function_of_seed_and_step(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    cfg, task = tiny_settings(tiny_model_dir, "x"), WordArithmeticTask(levels=[1, 2, 3])
    first = sft_examples(cfg, 5, task, tokenizer)
    assert first == sft_examples(cfg, 5, task, tokenizer) != sft_examples(cfg, 6, task, tokenizer)
    assert all(c.endswith(".") and "The answer is" in c for _, c in first)
    # the RL prompt itself (no chat template on the char tokenizer): the question, then the cue
    assert all(p.startswith("Question: ") and p.endswith("\nAnswer:") for p, _ in first)
    many = [c for step in range(10) for _, c in sft_examples(cfg, step, task, tokenizer)]
    counts = {count_redundant_segments(c) for c in many}
    assert counts == set(range(cfg.max_verbosity + 1))  # verbosity is drawn, not fixed
    prompt_ids, prompt_mask, completion_ids, completion_mask = sft_tensors(first, tokenizer)
    for i, (_, completion) in enumerate(first):
        n = int(completion_mask[i].sum())
        assert completion_ids[i, n - 1] == tokenizer.eos_token_id  # the turn ends, then padding
        assert tokenizer.decode(completion_ids[i, : n - 1]) == completion.replace(
            "T", "<unk>"
        ).replace("A", "<unk>").replace("L", "<unk>")  # no capitals in the char vocabulary
        assert prompt_mask[i, -1] == 1  # prompts are left-padded


def test_build_is_deterministic_resumable_and_carded(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("AGPO_LAB_MODELS_DIR", str(tmp_path))
    settings = dataclasses.replace(tiny_settings(tiny_model_dir, "whole"), docs_dir=str(tmp_path))
    loaded, real_load = [], warmstart.load_policy
    monkeypatch.setattr(warmstart, "load_policy", lambda c, d: loaded.append(c) or real_load(c, d))
    whole = build_warm_start(settings, command="test")
    card = json.loads((whole / "card.json").read_text())
    assert json.loads((tmp_path / "card.json").read_text()) == card  # the copy for the docs
    for name in ("rl_train_mix", "held_out"):
        stats = card[name]
        assert stats["n_problems"] == 3 and 0 <= stats["pass@1_sampled"] <= 1
        kinds = stats["groups_all_correct"] + stats["groups_all_wrong"] + stats["groups_mixed"]
        assert kinds == pytest.approx(1.0)
        assert 0 <= stats["redundant_frac"] <= 1 and stats["length_ratio"] > 0
        assert (whole / f"card_{name}.csv").is_file()
    assert card["training"]["steps"] == 3 and card["training"]["tokens"] > 0
    assert "held-out problems" in (whole / "README.md").read_text()
    assert not (whole / warmstart.STATE_FILE).exists()
    # the base model on the same problems, for the side-by-side with the weak start
    assert card["base"]["held_out"]["n_problems"] == 3
    assert [(c.name_or_path, c.lora) for c in loaded] == [
        (str(tiny_model_dir), True),
        (str(tiny_model_dir), False),
    ]
    assert "| held_out | base |" in (whole / "README.md").read_text()
    # a card from before the base measurement gets it added, the model untouched
    weights = (whole / "model.safetensors").read_bytes()
    (whole / "card.json").write_text(json.dumps({k: v for k, v in card.items() if k != "base"}))
    assert build_warm_start(tiny_settings(tiny_model_dir, "whole"), command="test") == whole
    remeasured = json.loads((whole / "card.json").read_text())["base"]
    assert remeasured["held_out"] == card["base"]["held_out"]  # deterministic for the seed
    assert (whole / "model.safetensors").read_bytes() == weights

    real_examples = warmstart.sft_examples

    def die_at_step_two(cfg, step, task, tokenizer):
        if step == 2:
            raise KeyboardInterrupt
        return real_examples(cfg, step, task, tokenizer)

    monkeypatch.setattr(warmstart, "sft_examples", die_at_step_two)
    with pytest.raises(KeyboardInterrupt):
        build_warm_start(tiny_settings(tiny_model_dir, "resumed"), command="test")
    state = torch.load(tmp_path / "resumed.partial" / warmstart.STATE_FILE, weights_only=True)
    assert state["step"] == 2
    monkeypatch.setattr(warmstart, "sft_examples", real_examples)
    resumed = build_warm_start(tiny_settings(tiny_model_dir, "resumed"), command="test")
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(a[k], base[k]) for k in base)  # the merged LoRA changed weights
    assert json.loads((resumed / "card.json").read_text())["training"]["steps"] == 3


def test_the_named_warm_start_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("AGPO_LAB_MODELS_DIR", str(tmp_path))
    with pytest.raises(MissingFileError, match="agpo-lab warmstart"):
        resolve_model_path(WarmStartConfig.name)
    with pytest.raises(ConfigError, match="warmstart.name|name="):
        WarmStartConfig(name="../elsewhere")


def test_token_budget_chunks_worked_example_from_its_docstring():
    chunks = warmstart.token_budget_chunks([300, 200, 100, 600], 512)
    assert chunks == [slice(0, 2), slice(2, 3), slice(3, 4)]
    assert warmstart.token_budget_chunks([300, 200], 0) == [slice(0, 2)]
    assert warmstart.token_budget_chunks([900, 10], 512) == [slice(0, 1), slice(1, 2)]


def test_micro_batches_train_the_same_weights_as_one_pass(tiny_model_dir, tmp_path, monkeypatch):
    # the step's loss is the mean over all its completion tokens either way; only the peak of one
    # pass's logits differs
    passes, real_logprobs = [], warmstart.completion_logprobs
    monkeypatch.setattr(
        warmstart,
        "completion_logprobs",
        lambda m, *a, **k: passes.append(1) or real_logprobs(m, *a, **k),
    )
    trained = {}
    for budget in (0, 60):
        settings = dataclasses.replace(
            tiny_settings(tiny_model_dir, "x"), steps=2, micro_batch_tokens=budget
        )
        (staging := tmp_path / str(budget)).mkdir()
        passes.clear()
        model, _, summary = warmstart.train_warm_start(settings, staging, progress=False)
        trained[budget] = (model.state_dict(), len(passes), summary["final_loss"])
    (one, one_passes, one_loss), (many, many_passes, many_loss) = trained[0], trained[60]
    assert one_passes == 2 and many_passes > 2 * 2  # the budget split every step
    assert many_loss == pytest.approx(one_loss, rel=1e-5)
    for key in one:
        torch.testing.assert_close(many[key], one[key], atol=1e-6, rtol=1e-5)
