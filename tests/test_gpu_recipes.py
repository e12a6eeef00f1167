"""GPU recipes: every agpo_lab-format YAML under configs/ validates, TRL recipes parse with TRL's own
parser, the verl script names the AGPO estimator; agpo_lab.models.memory counts parameters exactly and
docs/scaling.md's memory table is its output (so the table cannot drift from the estimator)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from agpo_lab.config import SECTIONS, load_config
from agpo_lab.models.memory import (
    GIB,
    QWEN25,
    Workload,
    architecture_from_config,
    estimate_memory_gib,
    lora_parameter_count,
    memory_table,
    parameter_count,
)

ROOT = Path(__file__).resolve().parents[1]


def our_format_yamls() -> list[Path]:
    """Every configs/**/*.yaml whose top-level keys are agpo_lab config sections."""
    found = []
    for path in sorted(ROOT.glob("configs/**/*.yaml")):
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict) and data and set(data) <= set(SECTIONS):
            found.append(path)
    return found


def test_gpu_recipes_exist_for_both_models_lora_and_full():
    names = {p.name for p in (ROOT / "configs" / "gpu").glob("*.yaml")}
    for model in ("qwen2.5-0.5b-instruct", "qwen2.5-1.5b-instruct"):
        for mode in ("lora", "full"):
            assert f"{model}_gsm8k_{mode}.yaml" in names
            assert (ROOT / "configs" / "trl" / f"{model}_gsm8k_{mode}.yaml").is_file()


@pytest.mark.parametrize("path", our_format_yamls(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_agpo_lab_config_validates(path):
    cfg = load_config(path)
    if path.parent.name == "gpu":
        assert cfg.algorithm.estimator == "agpo" and cfg.task.name == "gsm8k"
        assert cfg.model.dtype == "bfloat16" and cfg.model.lora == path.stem.endswith("_lora")
        assert cfg.run.device == "cuda" and cfg.model.gradient_checkpointing


def test_our_format_covers_the_gpu_recipes():
    assert {p.parent.name for p in our_format_yamls()} >= {"configs", "gpu"}


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")
@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "trl").glob("*.yaml")), ids=str)
def test_trl_recipes_parse_with_trls_parser(path):
    trl = pytest.importorskip("trl", reason="TRL is an optional dependency")
    from agpo_lab.integrations.trl import AGPOConfig, AGPOScriptArguments, _validate

    parser = trl.TrlParser((AGPOScriptArguments, AGPOConfig, trl.ModelConfig))
    # use_cpu only so that bf16 passes transformers' device check on this CPU machine
    script, args, model = parser.parse_args_and_config(["--config", str(path), "--use_cpu", "true"])
    _validate(args)
    assert model.use_peft == path.stem.endswith("_lora") and args.bf16
    assert script.task == "gsm8k" and script.eval_task == "math500"
    assert args.num_generations == 8 and args.length_weight == 0.1


def test_verl_script_selects_agpo_not_grpo():
    text = (ROOT / "configs" / "verl" / "agpo_gsm8k.sh").read_text()
    assert "python -m agpo_lab.integrations.verl" in text
    assert "algorithm.adv_estimator=agpo" in text and "adv_estimator=grpo" not in text
    assert "+agpo.r_min=0.0" in text and "+agpo.r_max=1.0" in text


def test_memory_table_in_docs_is_the_estimators_output():
    """docs/scaling.md shows exactly what `python -m agpo_lab.models.memory configs/gpu/*.yaml` prints."""
    doc = (ROOT / "docs" / "scaling.md").read_text()
    table = memory_table(sorted((ROOT / "configs" / "gpu").glob("*.yaml")))
    assert table.count("\n") == 5 and table in doc
    assert "python -m agpo_lab.models.memory configs/gpu/*.yaml" in doc


PUBLISHED_BILLIONS = {
    "Qwen2.5-0.5B": 0.49,
    "Qwen2.5-1.5B": 1.54,
    "Qwen2.5-3B": 3.09,
    "Qwen2.5-7B": 7.62,
}


@pytest.mark.parametrize("name", list(QWEN25))
def test_parameter_counts_equal_transformers_models_and_published_sizes(name):
    """Exact against the real architecture (built on the meta device, no memory used) and, rounded,
    the sizes on the model cards; the architecture read from a transformers config is the same."""
    arch = QWEN25[name]
    config = transformers.Qwen2Config(
        hidden_size=arch.hidden,
        intermediate_size=arch.intermediate,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.kv_heads,
        vocab_size=arch.vocab,
        tie_word_embeddings=arch.tied_embeddings,
    )
    assert architecture_from_config(config) == arch
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert parameter_count(arch) == sum(p.numel() for p in model.parameters())
    assert round(parameter_count(arch) / 1e9, 2) == PUBLISHED_BILLIONS[name]


def test_parameter_count_of_a_llama_style_config_without_biases():
    """Untied head, no q/k/v biases, head_dim != hidden / heads: still exact."""
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=300,
        tie_word_embeddings=False,
    )
    arch = architecture_from_config(config.to_dict())  # a config.json dict reads the same
    assert not arch.qkv_bias and arch.head_dim == 32
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert parameter_count(arch) == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="lacks"):
        architecture_from_config({"hidden_size": 64})


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")  # peft's own call
def test_lora_count_equals_peft():
    peft = pytest.importorskip("peft", reason="peft is an optional dependency")
    arch = QWEN25["Qwen2.5-0.5B"]
    config = transformers.Qwen2Config(
        hidden_size=arch.hidden,
        intermediate_size=arch.intermediate,
        num_hidden_layers=2,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.kv_heads,
        vocab_size=arch.vocab,
    )
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    lora = peft.LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM")
    trainable = sum(
        p.numel() for p in peft.get_peft_model(model, lora).parameters() if p.requires_grad
    )
    assert trainable == lora_parameter_count(replace(arch, layers=2), r=16)
    assert lora_parameter_count(arch, r=16) == 8_798_208


def test_estimate_terms_follow_the_stated_formulas():
    arch = QWEN25["Qwen2.5-0.5B"]
    lora = estimate_memory_gib(arch, Workload())
    # logits: micro-batch 8 x 512 completion tokens x vocab x (2 bf16 + 4 fp32 log-softmax) bytes
    assert lora["logits"] == pytest.approx(8 * 512 * 151_936 * 6 / GIB)
    # KV cache: 256 rows x 768 tokens x 24 layers x (K, V) x 2 heads x 64 dims x 2 bytes
    assert lora["kv_cache"] == pytest.approx(256 * 768 * 24 * 2 * 2 * 64 * 2 / GIB)
    assert lora["peak"] == pytest.approx(
        lora["weights"] + lora["optimizer"] + max(lora["update"], lora["rollout"])
    )
    full = estimate_memory_gib(arch, Workload(lora=False))
    n = parameter_count(arch)
    assert full["weights"] == pytest.approx(2 * 2 * n / GIB)  # policy + KL reference
    assert estimate_memory_gib(arch, Workload(lora=False, beta=0.0))["weights"] == pytest.approx(
        2 * n / GIB
    )
    assert full["optimizer"] == pytest.approx(4 * n / GIB) and full["peak"] > lora["peak"]
    halved = estimate_memory_gib(arch, Workload(micro_batch=4))
    assert halved["logits"] == pytest.approx(lora["logits"] / 2)
    no_checkpointing = estimate_memory_gib(arch, Workload(gradient_checkpointing=False))
    assert no_checkpointing["activations"] > 5 * lora["activations"]


def test_workload_reads_a_config_like_the_trainer():
    config = load_config(ROOT / "configs" / "gpu" / "qwen2.5-0.5b-instruct_gsm8k_lora.yaml")
    work = Workload.from_config(config)  # 32 prompts x G 8; mini-batch 64 / 8 accumulation
    assert (work.rollout_rows, work.micro_batch, work.completion_len) == (256, 8, 512)
    assert work.lora and work.weight_bytes == 2 and work.gradient_checkpointing
    assert Workload.from_config(config, processes=4).rollout_rows == 64
    by_name = estimate_memory_gib("Qwen/Qwen2.5-0.5B-Instruct", config)
    assert by_name == estimate_memory_gib(QWEN25["Qwen2.5-0.5B"], work)
    with pytest.raises(ValueError, match="no architecture known"):
        estimate_memory_gib("some-org/unknown-model", work)
