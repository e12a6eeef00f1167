"""Config: YAML + typed overrides, up-front validation with one-line errors, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from agpo_lab.config import TaskConfig, TrainConfig, load_config
from agpo_lab.tasks.registry import build_task

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(
    "name", ["embedded_grpo", "embedded_agpo", "reproduce", "gpu/qwen2.5-0.5b-instruct_gsm8k_lora"]
)
def test_shipped_configs_parse_and_validate(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.rollout.group_size >= 2
    assert cfg.algorithm.estimator in ("grpo", "agpo")


def test_embedded_configs_differ_only_in_the_method():
    grpo, agpo = (
        load_config(CONFIGS / "embedded_grpo.yaml"),
        load_config(CONFIGS / "embedded_agpo.yaml"),
    )
    assert (grpo.algorithm.estimator, agpo.algorithm.estimator) == ("grpo", "agpo")
    assert agpo.algorithm.length_reward == "agpo" and grpo.algorithm.length_reward == "none"
    assert grpo.optim == agpo.optim and grpo.rollout == agpo.rollout and grpo.task == agpo.task


def test_overrides_are_parsed_with_the_field_type():
    cfg = load_config(
        None,
        [
            "optim.lr=3e-5",  # YAML alone reads this as a string
            "run.steps=7",
            "optim.betas=[0.9, 0.95]",
            "model.lora=true",
            "optim.mini_batch_size=32",
            "algorithm.estimator=agpo",
            "model.name_or_path=123",
        ],
    )
    assert cfg.optim.lr == pytest.approx(3e-5) and isinstance(cfg.optim.lr, float)
    assert cfg.run.steps == 7 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.model.lora is True and cfg.optim.mini_batch_size == 32
    assert cfg.algorithm.estimator == "agpo" and cfg.model.name_or_path == "123"
    assert load_config(None, ["optim.mini_batch_size=null"]).optim.mini_batch_size is None


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["algorithm.estmator=grpo"], "valid: estimator, zero_variance"),
        (["optimizer.lr=1"], "unknown config section"),
        (["rollout.group_size=1"], "G >= 2"),
        (["run.prompts_per_step=4", "rollout.group_size=4", "optim.mini_batch_size=6"], "divide"),
        (
            [
                "run.prompts_per_step=4",
                "rollout.group_size=4",
                "optim.mini_batch_size=8",
                "optim.grad_accumulation=3",
            ],
            "grad_accumulation",
        ),  # fmt: skip
        (["optim.lr=-1"], "optim.lr"),
        (["optim.lr=abc"], "expected a number"),
        (["run.steps=2.5"], "expected an integer"),
        (["algorithm.estimator=ppo"], "choose one of grpo, agpo"),
        (["algorithm.zero_variance=skip"], "keep, agpo, drop"),
        (["model.lora=maybe"], "true or false"),
        (["algorithm.max_resample_rounds=2"], "zero_variance=drop"),
        (["run.device=tpu"], "run.device"),
        (["runsteps=3"], "section.key=value"),
    ],
)
def test_bad_values_give_one_line_errors(overrides, fragment):
    with pytest.raises(ValueError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_bad_yaml_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("run: {steps: [\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_yaml_round_trip(tmp_path):
    cfg = load_config(CONFIGS / "embedded_agpo.yaml", ["optim.betas=[0.8, 0.9]", "run.seed=3"])
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_every_field_has_a_docstring():
    import ast
    import inspect

    from agpo_lab import config

    tree = ast.parse(inspect.getsource(config))
    for node in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        body = node.body
        for i, stmt in enumerate(body):
            if isinstance(stmt, ast.AnnAssign):
                following = body[i + 1] if i + 1 < len(body) else None
                assert isinstance(following, ast.Expr) and isinstance(
                    following.value, ast.Constant
                ), f"{node.name}.{stmt.target.id} has no docstring"


def test_build_task_embedded():
    task = build_task(TaskConfig(n_train=20, n_eval=10, levels=[1, 2]))
    assert len(task.problems("train")) == 20 and len(task.problems("eval")) == 10
    with pytest.raises(ValueError, match="valid: arithmetic"):
        build_task(TaskConfig(name="mnist"))
