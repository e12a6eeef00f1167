"""GPU recipes: every agpo_lab-format YAML under configs/ validates, TRL recipes parse with TRL's own
parser, the verl script names the AGPO estimator, and docs/scaling.md's memory table equals the
estimate computed here (so the table cannot drift from its stated formula)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from agpo_lab.config import SECTIONS, load_config
from agpo_lab.memory import ARCH, estimate_memory_gib, lora_params

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


def test_memory_table_in_docs_matches_the_estimate():
    doc = (ROOT / "docs" / "scaling.md").read_text()
    rows = re.findall(r"^\| (Qwen[\w.-]+) \| (LoRA r=16|full) \|(.*)\|$", doc, re.M)
    assert len(rows) == 4
    for model, mode, numbers in rows:
        shown = [float(x) for x in numbers.split("|")[:5]]
        expected = estimate_memory_gib(model, lora=mode != "full")
        assert shown == list(expected.values()), (model, mode)


def test_estimate_orders_make_sense():
    small_lora = estimate_memory_gib("Qwen2.5-0.5B-Instruct", lora=True)
    big_full = estimate_memory_gib("Qwen2.5-1.5B-Instruct", lora=False)
    assert small_lora["total"] < big_full["total"] < 80  # fits one 80 GB card
    assert lora_params(ARCH["Qwen2.5-0.5B-Instruct"]) == 8_798_208  # peft's count for r=16
