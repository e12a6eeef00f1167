"""`agpo-lab` command line: train with overrides, resume a run directory, eval a run or model,
flags from the settings dataclasses, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from agpo_lab.cli import main
from agpo_lab.config import EvalConfig
from agpo_lab.evaluation import evaluate_records
from agpo_lab.training.checkpoints import load_run_policy

AGPO_LAB = Path(sys.executable).with_name("agpo-lab")


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    """A tiny Qwen2 + char tokenizer on disk and a YAML config that trains it on arithmetic."""
    from agpo_lab.models.tiny import build_tiny_causal_lm
    from agpo_lab.models.tokenizer import build_char_tokenizer

    root = tmp_path_factory.mktemp("cli")
    tok = build_char_tokenizer()
    model = build_tiny_causal_lm(
        tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
        max_position_embeddings=128,
    )  # fmt: skip
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    path = root / "tiny.yaml"
    path.write_text(
        f"model: {{name_or_path: {root / 'model'}}}\n"
        "task: {name: arithmetic, n_train: 20, n_eval: 10, levels: [1]}\n"
        "rollout: {group_size: 2, max_new_tokens: 8}\n"
        f"run: {{steps: 5, prompts_per_step: 2, out_dir: {root / 'runs'}, name: tiny, device: cpu,"
        " save_every: 0, log_samples_every: 1}\n"
    )
    return path


@pytest.mark.slow
def test_train_subprocess_with_overrides_then_resume_the_run_dir(tiny_config):
    result = subprocess.run(
        [str(AGPO_LAB), "train", str(tiny_config), "run.steps=2", "optim.lr=1e-3", "--quiet"],
        capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tiny_config.parent / "runs" / "tiny"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "reward/accuracy" in rows[0]
    assert "optim.lr" not in (run_dir / "config.yaml").read_text()
    assert "lr: 0.001" in (run_dir / "config.yaml").read_text()

    # a run directory in place of a config resumes it (here with more steps)
    assert main(["train", str(run_dir), "run.steps=3", "--quiet"]) == 0
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in rows] == [1, 2, 3]


def test_bad_config_exits_2_with_one_line(tiny_config, capsys):
    assert main(["train", str(tiny_config), "rollout.group_size=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("agpo-lab train:") and "G >= 2" in err and "\n" not in err
    assert main(["train", str(tiny_config), "algorithm.nope=1"]) == 2
    assert "unknown key(s) ['nope'] in section 'algorithm'" in capsys.readouterr().err
    assert main(["train", "missing.yaml"]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
def test_bad_config_in_a_subprocess_has_no_traceback(tiny_config):
    result = subprocess.run(
        [str(AGPO_LAB), "train", str(tiny_config), "optim.lr=-1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "optim.lr" in result.stderr


def test_bench_lists_or_rejects(capsys):
    assert main(["bench"]) == 0
    assert "bench_trainer" in capsys.readouterr().out
    assert main(["bench", "no_such_benchmark"]) == 2
    assert "no benchmark 'no_such_benchmark'" in capsys.readouterr().err
    for outside in ("../tests/conftest", "benchmarks/bench_trainer", "/bin/true"):  # never a path
        assert main(["bench", outside]) == 2
        assert "no benchmark" in capsys.readouterr().err


def test_help_lists_every_verb_and_every_train_key(capsys):
    from agpo_lab.config import SECTIONS, TrainConfig

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(verb in out for verb in ("train", "eval", "reproduce", "pretrain", "bench"))
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for section in SECTIONS:
        for key in getattr(TrainConfig(), section).__dataclass_fields__:
            assert f"  {section}.{key}=" in out, f"{section}.{key}"
    assert "Peak learning rate" in out  # the field's docstring


def test_flags_come_from_the_dataclass(capsys):
    from agpo_lab.cli import parse_flags
    from agpo_lab.config import PretrainConfig, ReproduceConfig

    argv = ["--steps", "7", "--level-weights", "1", "2", "3", "4", "5", "--output-dir", "x"]
    config = parse_flags(PretrainConfig, "pretrain", argv)
    assert (config.steps, config.level_weights, config.output_dir) == (7, (1, 2, 3, 4, 5), "x")
    cfg = parse_flags(ReproduceConfig, "reproduce", ["--seeds", "3", "4", "--no-docs", "--quick"])
    assert (cfg.seeds, cfg.docs, cfg.quick, cfg.jobs) == ((3, 4), False, True, 2)
    for argv, fragment in ((["--level-weights", "a"], "expected a number"),
                           (["--level-weights", "1", "2"], "needs 5 numbers"),
                           (["--steps", "0"], "steps=0"), (["--bogus"], "unrecognized")):  # fmt: skip
        assert main(["pretrain", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("agpo-lab pretrain:") and fragment in err and err.count("\n") == 1
    assert main(["reproduce", "--methods", "ppo", "--out-dir", "/nonexistent"]) == 2
    assert "unknown; valid: grpo" in capsys.readouterr().err


# ---- eval --------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/nonexistent/run", "{tmp}"])
def test_eval_bad_path_is_one_line_exit_2(target, tmp_path, capsys):
    assert main(["eval", target.format(tmp=tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("agpo-lab eval:") and err.count("\n") == 1


def test_eval_bad_setting_fails_before_the_model_loads(
    tiny_qwen2, char_tokenizer, tmp_path, capsys
):
    tiny_qwen2.save_pretrained(tmp_path)
    char_tokenizer.save_pretrained(tmp_path)
    assert main(["eval", str(tmp_path), "eval.k=-1"]) == 2
    assert "eval.k=-1" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "run.steps=3"]) == 2
    assert "only eval.* and task.*" in capsys.readouterr().err


def test_eval_on_a_model_folder_writes_json(tiny_qwen2, char_tokenizer, tmp_path, capsys):
    tiny_qwen2.save_pretrained(tmp_path / "model")
    char_tokenizer.save_pretrained(tmp_path / "model")
    out, records = tmp_path / "eval.json", tmp_path / "records.csv"
    argv = ["eval", str(tmp_path / "model"), "eval.n_problems=5", "eval.k=2",
            "eval.max_new_tokens=4", "--out", str(out), "--records", str(records)]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads(out.read_text())
    assert metrics["eval/n_problems"] == 5 and metrics["eval/k"] == 2
    assert set(metrics) >= {"eval/pass@1_greedy", "eval/pass@1_sampled", "eval/pass@k",
                            "eval/mean_tokens", "eval/truncated_frac"}  # fmt: skip
    assert len(pd.read_csv(records)) == 5 * 3
    assert "eval/pass@1_greedy" in capsys.readouterr().out


def test_load_run_policy_keeps_the_char_tokenizer_of_a_model_folder(
    tiny_qwen2, char_tokenizer, tmp_path
):
    # A folder with a qwen2 config.json must not turn the char tokenizer into Qwen2Tokenizer
    # (whose byte-level pre-tokenizer drops the prompt's newline).
    tiny_qwen2.save_pretrained(tmp_path)
    char_tokenizer.save_pretrained(tmp_path)
    _, tokenizer, run_cfg, _ = load_run_policy(str(tmp_path))
    assert run_cfg is None
    text = "q:12+7-5\n"
    assert tokenizer(text)["input_ids"] == char_tokenizer(text)["input_ids"]


def test_eval_on_a_run_directory_uses_its_latest_checkpoint(tiny_qwen2, char_tokenizer, tmp_path):
    import copy

    import torch

    from agpo_lab.config import TrainConfig
    from agpo_lab.tasks.arithmetic import ArithmeticTask
    from agpo_lab.training.checkpoints import save_checkpoint

    tiny_qwen2.save_pretrained(tmp_path / "base")
    char_tokenizer.save_pretrained(tmp_path / "base")
    run = tmp_path / "run"
    run.mkdir()
    TrainConfig.from_dict(
        {"model": {"name_or_path": str(tmp_path / "base")}, "task": {"n_train": 5, "n_eval": 5},
         "eval": {"k": 2, "max_new_tokens": 6}}
    ).save(run / "config.yaml")  # fmt: skip
    trained = copy.deepcopy(tiny_qwen2)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p))
    base_weights = dict(tiny_qwen2.named_parameters())
    save_checkpoint(run / "checkpoints" / "step_000001.safetensors", base_weights, {"step": 1})
    save_checkpoint(
        run / "checkpoints" / "step_000002.safetensors",
        dict(trained.named_parameters()),
        {"step": 2},
    )

    assert main(["eval", str(run), "--records", str(tmp_path / "records.csv")]) == 0
    metrics = json.loads((run / "eval.json").read_text())  # the default output of a run
    assert metrics["eval/n_problems"] == 5 and metrics["eval/k"] == 2  # the run's eval settings

    task = ArithmeticTask(seed=0, n_train=5, n_eval=5)
    cfg = EvalConfig(k=2, max_new_tokens=6)
    expected = evaluate_records(trained, char_tokenizer, task, task.problems("eval"), cfg)
    base = evaluate_records(tiny_qwen2, char_tokenizer, task, task.problems("eval"), cfg)
    texts = pd.read_csv(tmp_path / "records.csv", keep_default_na=False)["text"].tolist()
    assert texts == expected["text"].tolist()
    assert texts != base["text"].tolist()  # the checkpoint's weights were loaded, not the base's
    # --task: another task's own defaults, not the run's task section (which holds 5 problems)
    other = tmp_path / "other.json"
    argv = ["eval", str(run), "--task", "arithmetic", "eval.n_problems=7", "eval.k=1",
            "eval.max_new_tokens=2", "--out", str(other)]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(other.read_text())["eval/n_problems"] == 7


def test_only_the_projects_own_errors_become_one_line(monkeypatch, capsys):
    from agpo_lab import cli
    from agpo_lab.errors import DataError

    monkeypatch.setitem(
        cli.VERBS, "bench", lambda argv: (_ for _ in ()).throw(DataError("bad row"))
    )
    assert main(["bench"]) == 2
    assert capsys.readouterr().err == "agpo-lab bench: bad row\n"
    monkeypatch.setitem(cli.VERBS, "bench", lambda argv: 1 / 0)  # a bug keeps its traceback
    with pytest.raises(ZeroDivisionError):
        main(["bench"])


def test_an_unreachable_hub_model_is_one_line(tiny_config, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["train", str(tiny_config), "model.name_or_path=no-org/no-model", "run.name=hub"]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "neither a local folder nor reachable" in err and err.count("\n") == 1
