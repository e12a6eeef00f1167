"""The paper's relatives and the studies: RL-ZVP's token advantages, the new methods, compute
accounting, the stability statistics and the two `agpo-lab study` commands end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from agpo_lab.algorithms import compute_advantages, rl_zvp_token_advantages, zero_variance_sign
from agpo_lab.cli import main
from agpo_lab.config import AlgorithmConfig, StudyConfig, load_config
from agpo_lab.errors import ConfigError
from agpo_lab.experiments import regime, stability
from agpo_lab.experiments.methods import METHODS
from agpo_lab.experiments.study import run_study, study_arms
from agpo_lab.training.metrics import branch_metrics, stop_probability
from agpo_lab.training.rewards import token_advantages
from agpo_lab.training.trainer import Trainer
from tests.conftest import ParityTask, make_config

# ---- RL-ZVP ----------------------------------------------------------------------------------


def test_rl_zvp_worked_example_from_its_docstring():
    entropy = torch.tensor([[1.0, 3.0, 9.0], [2.0, 5.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    got = rl_zvp_token_advantages(entropy, mask, torch.tensor([1, -1]), alpha=0.1)
    torch.testing.assert_close(got, torch.tensor([[0.1, 0.3, 0.0], [-0.3, 0.0, 0.0]]))


def test_rl_zvp_by_hand_more_cases():
    # all-wrong rows: -alpha * (row max - H); the max runs over the row's own tokens only
    entropy = torch.tensor([[0.2, 0.8, 5.0], [0.5, 0.7, 0.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1]])
    got = rl_zvp_token_advantages(entropy, mask, torch.tensor([-1, -1, 0]), alpha=0.1)
    expected = torch.tensor([[-0.06, 0.0, 0.0], [-0.02, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(got, expected)
    # alpha scales linearly; positive rows are alpha * H
    doubled = rl_zvp_token_advantages(entropy, mask, torch.tensor([1, 1, 1]), alpha=0.2)
    torch.testing.assert_close(doubled, 0.2 * entropy * mask)


def test_rl_zvp_takes_no_gradient_through_the_entropy():
    entropy = torch.tensor([[1.0, 2.0]], requires_grad=True)
    got = rl_zvp_token_advantages(entropy, torch.ones(1, 2), torch.tensor([1]))
    assert not got.requires_grad


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.ones(2), torch.ones(2), torch.ones(2)), "shaped"),
        ((torch.ones(1, 2), torch.ones(1, 3), torch.ones(1)), "shaped"),
        ((torch.ones(1, 2), torch.ones(1, 2), torch.ones(2)), "sign"),
        ((torch.ones(1, 2), torch.ones(1, 2), torch.ones(1), 0.0), "alpha"),
    ],
)
def test_rl_zvp_bad_input_is_a_clear_error(args, message):
    with pytest.raises(ValueError, match=message):
        rl_zvp_token_advantages(*args)


def test_zero_variance_sign_and_rl_zvp_policy_of_compute_advantages():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.5, 0.5]])
    assert zero_variance_sign(rewards, 0.0, 1.0).tolist() == [1, -1, 0, 0]
    adv, mask = compute_advantages(rewards, "grpo", zero_variance="rl_zvp")
    assert mask.all()  # nothing dropped: the caller adds the token-level part
    assert adv[[0, 1, 3]].eq(0).all() and adv[2].ne(0).all()


def test_token_advantages_keep_mixed_groups_and_shape_homogeneous_ones():
    cfg = AlgorithmConfig(zero_variance="rl_zvp", zvp_alpha=0.5)
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    advantages, _ = compute_advantages(rewards, "grpo", zero_variance="rl_zvp")
    entropy = torch.tensor([[9.0, 9.0], [9.0, 0.0], [1.0, 3.0], [2.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    rows, tokens = token_advantages(rewards, advantages, entropy, mask, cfg)
    mixed = advantages.flatten()[:2]
    torch.testing.assert_close(tokens[:2], mixed[:, None] * mask[:2])  # GRPO's value per token
    torch.testing.assert_close(tokens[2:], torch.tensor([[-1.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(rows, torch.cat([mixed, torch.tensor([-0.5, 0.0])]))
    plain = token_advantages(rewards, advantages, entropy, mask, AlgorithmConfig())
    assert plain[1] is None and torch.equal(plain[0], advantages.flatten())


# ---- methods and the trainer ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["agpo_mask", "dapo", "rl_zvp"])
def test_new_methods_are_valid_configs(method, tmp_path):
    cfg = load_config(None, [*METHODS[method], f"run.out_dir={tmp_path}"])
    assert cfg.algorithm.estimator == "grpo"


def test_agpo_mask_is_the_authors_recipe():
    cfg = load_config(None, METHODS["agpo_mask"]).algorithm
    assert (cfg.zero_variance, cfg.aggregation, cfg.length_reward) == (
        "drop", "token_mean", "agpo"
    )  # fmt: skip
    assert (cfg.clip_low, cfg.clip_high, cfg.beta) == (0.2, 0.28, 0.0)
    assert cfg.max_resample_rounds > 0 and not cfg.length_in_homogeneous_groups


def test_rl_zvp_rollout_gives_token_advantages_and_the_update_uses_them(tiny_model_dir, tmp_path):
    from agpo_lab.algorithms.loss import policy_loss
    from agpo_lab.rollout import completion_logprobs
    from tests.test_update import _gradient_of_update

    cfg = make_config(
        tiny_model_dir, tmp_path, "optim.max_grad_norm=0", "algorithm.zero_variance=rl_zvp",
        "optim.micro_batch_tokens=40",
    )  # fmt: skip
    trainer = Trainer(cfg, task=ParityTask())
    batch, _ = trainer._rollout(trainer.problems[:4])  # problems 0 and 3: always solved
    assert batch.token_advantages is not None
    solved = batch.token_advantages.view(4, 4, -1)[[0, 3]]
    assert (solved >= 0).all() and (solved > 0).any()  # all-correct groups: +alpha * H
    trainer.policy.zero_grad()
    logps = completion_logprobs(trainer.policy, *batch.model_inputs)
    loss, _ = policy_loss(logps, batch.old_logprobs, batch.token_advantages, batch.loss_mask)
    loss.backward()
    expected = [p.grad.clone() for p in trainer.params]
    trainer.policy.zero_grad()
    for g, e in zip(_gradient_of_update(trainer, batch), expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-7, rtol=1e-5)


def test_compute_is_counted_with_resampling(tiny_model_dir, tmp_path):
    cfg = make_config(
        tiny_model_dir, tmp_path, "algorithm.zero_variance=drop", "algorithm.max_resample_rounds=2"
    )
    logged = Trainer(cfg).train()
    for row in logged:
        rounds = row["dynamic/resample_rounds"]
        assert row["rollout/completions"] >= 16 + (4 if rounds else 0)
        assert row["rollout/tokens"] >= row["length/mean"] * 16
        assert row["perf/update_tokens"] >= 0
    result = Trainer(make_config(tiny_model_dir, tmp_path / "b")).train()
    assert all(row["rollout/completions"] == 16 for row in result)


def test_branch_metrics_worked_example_from_its_docstring():
    got = branch_metrics(
        torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
        torch.tensor([[4, 6], [8, 2]]),
        torch.tensor([[0.5, 0.7], [0.9, math.nan]]),
    )
    assert got["length/mean_all_correct"] == 5.0 and got["length/mean_mixed"] == 5.0
    assert got["end_token/prob_all_correct"] == pytest.approx(0.6)
    assert got["end_token/prob_mixed"] == pytest.approx(0.9)
    assert got["length/mean_all_wrong"] is None and got["end_token/prob_all_wrong"] is None


def test_stop_probability_worked_example_from_its_docstring():
    got = stop_probability(
        torch.tensor([[-1.0, -0.1], [-2.0, -3.0]]),
        torch.tensor([2, 1]),
        torch.tensor([False, True]),
    )
    assert got[0].item() == pytest.approx(math.exp(-0.1)) and math.isnan(got[1].item())


# ---- stability statistics ---------------------------------------------------------------------


def test_curve_volatility_and_spikes_by_hand():
    assert stability.curve_volatility([0.5, 0.6, 0.5, 0.6]) == pytest.approx(0.0942809)
    assert math.isnan(stability.curve_volatility([0.5, 0.6]))
    assert stability.spike_fraction([1, 1, 1, 9]) == 0.25
    assert stability.spike_fraction([0, 1, 1, 1]) == 0.0  # no-gradient steps are left out
    assert math.isnan(stability.spike_fraction([0, 0]))


def _fake_arm(root, start, finals, accuracy_curves):
    """A results folder as reproduce writes it, with chosen numbers."""
    for method, seeds in [("start", start), *finals.items()]:
        for seed, accuracy in enumerate(seeds):
            run = root / "runs" / method / f"seed{seed}"
            run.mkdir(parents=True)
            result = {"method": method, "seed": seed, "eval/pass@1_sampled": accuracy,
                      "eval/mean_tokens": 40.0 + seed}  # fmt: skip
            (run / "result.json").write_text(json.dumps(result))
            if method == "start":
                continue
            curve = accuracy_curves[method]
            rows = [
                {"step": s + 1, "reward/accuracy": a, "policy/entropy": 1.0 - 0.1 * s,
                 "optim/grad_norm": [0.0, 10.0, 1.0, 1.0][s],
                 "perf/update_tokens": 0 if s == 0 else 50, "rollout/tokens": 100}
                for s, a in enumerate(curve)
            ]  # fmt: skip
            (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_stability_table_by_hand(tmp_path):
    _fake_arm(
        tmp_path / "lr",
        start=[0.6, 0.7],
        finals={"grpo": [0.50, 0.69], "agpo": [0.7, 0.8]},
        accuracy_curves={"grpo": [0.5, 0.7, 0.5, 0.7], "agpo": [0.5, 0.5, 0.5, 0.5]},
    )
    runs = stability.stability_runs({1e-3: tmp_path / "lr"})
    table = stability.stability_table(runs).set_index("method")
    assert table.loc["grpo", "collapsed"] == 1  # 0.50 < 0.6 - 0.05; 0.69 is within 5 points
    assert table.loc["agpo", "collapsed"] == 0
    assert table.loc["grpo", "delta_pass@1"] == pytest.approx(-0.055)
    assert table.loc["grpo", "volatility"] == pytest.approx(np.std([0.2, -0.2, 0.2]))
    assert table.loc["agpo", "volatility"] == 0.0
    assert table.loc["grpo", "no_grad_frac"] == 0.25  # the first step computed no row
    assert table.loc["grpo", "spike_frac"] == pytest.approx(1 / 3)  # 10 > 5 x median 1
    assert table.loc["grpo", "train_tokens"] == 400
    assert table.loc["grpo", "entropy_start"] == pytest.approx(0.85)
    markdown = stability.stability_markdown(table.reset_index())
    assert "| grpo | 0.001 | 1/2 |" in markdown
    figure = stability.plot_stability_map(table.reset_index())
    assert len(figure.axes) == 4  # two maps and their colour bars


def test_a_stability_table_of_runs_too_short_for_volatility_says_n_a(tmp_path):
    _fake_arm(tmp_path / "lr", start=[0.6], finals={"grpo": [0.5]},
              accuracy_curves={"grpo": [0.5, 0.7]})  # fmt: skip
    table = stability.stability_table(stability.stability_runs({1e-3: tmp_path / "lr"}))
    assert math.isnan(table.loc[0, "volatility"]) and table.loc[0, "pass@1"] == 0.5
    assert "| grpo | 0.001 | 1/1 | 0.500 | -0.100 | n/a |" in stability.stability_markdown(table)


def test_mechanism_table_by_hand(tmp_path):
    for seed, (accuracy, tokens) in enumerate([(0.0, 96.0), (0.2, 90.0)]):
        run = tmp_path / "weak" / "runs" / "agpo" / f"seed{seed}"
        run.mkdir(parents=True)
        result = {"method": "agpo", "seed": seed, "eval/pass@1_sampled": accuracy,
                  "eval/mean_tokens": tokens, "eval/truncated_frac": tokens / 96}  # fmt: skip
        (run / "result.json").write_text(json.dumps(result))
    metrics = pd.DataFrame(
        [
            {
                "arm": "weak",
                "method": "agpo",
                "seed": seed,
                "step": step,
                "length/mean": 40.0 + 5 * step,
                "length/clipped_frac": step / 10,
                "end_token/prob_all_wrong": 1.0 - step / 100,
                "zero_var/all_wrong": 0.5,
            }
            for seed in (0, 1)
            for step in range(1, 11)
        ]  # fmt: skip
    )
    table = regime.mechanism_table({"weak": tmp_path / "weak"}, metrics, first=2, last=2)
    row = table.iloc[0]
    assert (row["arm"], row["method"], row["seeds"]) == ("weak", "agpo", 2)
    assert row["pass@1"] == pytest.approx(0.1) and row["tokens"] == pytest.approx(93.0)
    assert row["train_len_end"] == pytest.approx(40 + 5 * 9.5)  # steps 9 and 10
    assert row["train_truncated_end"] == pytest.approx(0.95)
    assert row["p_stop_all_wrong_start"] == pytest.approx(0.985)  # steps 1 and 2
    assert row["p_stop_all_wrong_end"] == pytest.approx(0.905)
    assert "| weak | agpo | 2 | 0.100 | 93.0 |" in regime.mechanism_markdown(table)


# ---- the study commands -----------------------------------------------------------------------


def test_study_settings_fail_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match="unknown"):
        run_study(StudyConfig(methods=("grpo", "nope"), out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="learning_rates"):
        StudyConfig(learning_rates=(1e-4, -1.0)).validate()
    assert main(["study", "nonsense", "--out-dir", str(tmp_path)]) == 2
    assert not any(tmp_path.iterdir())


def test_study_arms(tmp_path):
    lrs = study_arms(StudyConfig(learning_rates=(1e-4, 3e-4)), tmp_path)
    assert lrs == {"lr_0.0001": ["optim.lr=0.0001"], "lr_0.0003": ["optim.lr=0.0003"]}
    arms = study_arms(StudyConfig(study="regime"), tmp_path)
    assert arms == {
        "weak": [f"model.name_or_path={tmp_path / 'weak_model'}"],
        "embedded": ["model.name_or_path=embedded"],
    }


QUICK = ["--quick", "--no-docs", "eval.n_problems=8"]
"""`--quick` budgets, on fewer held-out problems: a smoke test of the pipeline, not a result."""


@pytest.mark.slow
def test_quick_stability_study_end_to_end(tmp_path):
    args = ["--learning-rates", "1e-3", "--methods", "grpo", "rl_zvp", "--out-dir", str(tmp_path)]
    assert main(["study", "stability", *args, *QUICK]) == 0
    root = tmp_path / "stability-quick"
    table = pd.read_csv(root / "summary.csv")
    assert list(zip(table["method"], table["lr"])) == [("grpo", 1e-3), ("rl_zvp", 1e-3)]
    assert (root / "stability_map.png").read_bytes()[:4] == b"\x89PNG"
    assert {"lr", "method", "seed", "step", "reward/accuracy"} <= set(
        pd.read_csv(root / "curves.csv").columns
    )


@pytest.mark.slow
def test_quick_regime_study_end_to_end(tmp_path):
    args = ["--weak-steps", "5", "--methods", "grpo", "--out-dir", str(tmp_path)]
    assert main(["study", "regime", *args, *QUICK]) == 0
    root = tmp_path / "regime-quick"
    assert (root / "weak_model" / "config.json").is_file()
    summary = pd.read_csv(root / "summary.csv")
    assert set(summary["arm"]) == {"weak", "embedded"}
    mechanism = pd.read_csv(root / "mechanism.csv")
    assert list(zip(mechanism["arm"], mechanism["method"])) == [
        ("weak", "grpo"),
        ("embedded", "grpo"),
    ]
    assert mechanism["pass@1"].between(0, 1).all()
    assert (root / "regime_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (root / "mechanism_curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("method", ["grpo", "agpo"])
def test_bfloat16_methods_differ_from_theirs_by_the_precision_only(method, tmp_path):
    plain = load_config(None, [*METHODS[method], f"run.out_dir={tmp_path}"]).to_dict()
    lowered = load_config(None, [*METHODS[f"{method}_bf16"], f"run.out_dir={tmp_path}"]).to_dict()
    assert lowered["rollout"].pop("precision") == "bfloat16"
    assert lowered["optim"].pop("precision") == "bfloat16"
    for section in ("rollout", "optim"):
        assert plain[section].pop("precision") == "model"
    assert plain == lowered
