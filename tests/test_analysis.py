"""agpo_lab.experiments analysis helpers: reward tables and group outcomes from records, the
ablation arms, reading eval records of a results folder."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from agpo_lab.experiments.ablation import ablation_arms, ablation_table
from agpo_lab.experiments.results import load_eval_records, paired_completions
from agpo_lab.experiments.zero_variance import group_outcomes_by_level, reward_table


def make_records(groups: dict[str, tuple[int, list[bool]]], greedy: bool = True) -> pd.DataFrame:
    """evaluate_records-shaped rows: {problem_id: (level, [correct per sample])} plus greedy rows."""
    rows = []
    for problem_id, (level, flags) in groups.items():
        if greedy:  # a greedy row that must be ignored: always "correct"
            rows.append((problem_id, level, True, 0, True))
        rows += [(problem_id, level, False, i, flag) for i, flag in enumerate(flags)]
    return pd.DataFrame(rows, columns=["problem_id", "difficulty", "greedy", "sample", "correct"])


def test_reward_table_orders_rows_by_problem_and_sample_and_ignores_greedy_rows():
    records = make_records({"b": (2, [True, False, True]), "a": (1, [False, False, True])})
    records = records.sample(frac=1.0, random_state=0)  # shuffled rows, same content
    rewards, problems = reward_table(records)
    first = records[~records["greedy"]]["problem_id"].iloc[0]
    expected = {"b": [1.0, 0.0, 1.0], "a": [0.0, 0.0, 1.0]}
    assert problems["problem_id"].tolist()[0] == first
    for row, problem_id in enumerate(problems["problem_id"]):
        assert rewards[row].tolist() == expected[problem_id]
    assert dict(zip(problems["problem_id"], problems["difficulty"])) == {"a": 1, "b": 2}


def test_reward_table_rejects_unequal_groups_and_greedy_only_records():
    with pytest.raises(ValueError, match="same number"):
        reward_table(make_records({"a": (1, [True, False]), "b": (1, [True, False, True])}))
    with pytest.raises(ValueError, match="no sampled"):
        reward_table(make_records({"a": (1, [])}))
    with pytest.raises(ValueError, match="lack columns"):
        reward_table(pd.DataFrame({"problem_id": ["a"]}))


def test_group_outcomes_by_level_counts_kinds_and_matches_the_docstring_example():
    records = make_records(
        {
            "a": (1, [True, True]),
            "b": (1, [True, False]),
            "c": (2, [False, False]),
            "d": (2, [False, False]),
            "e": (2, [True, True]),
            "f": (2, [False, True]),
        }
    )
    table = group_outcomes_by_level(records).set_index("level")
    one, two = table.loc[1], table.loc[2]
    assert (one["prompts"], one["group_size"], one["label"]) == (2, 2, "level 1")
    assert one["p"] == pytest.approx(0.75)
    assert (one["frac_all_correct"], one["frac_all_wrong"], one["frac_mixed"]) == (0.5, 0.0, 0.5)
    assert one["analytic"] == pytest.approx(0.625)
    assert two["p"] == pytest.approx(3 / 8)
    assert (two["frac_all_correct"], two["frac_all_wrong"]) == (0.25, 0.5)
    assert two["frac_zero_var"] == pytest.approx(0.75)
    assert two["analytic"] == pytest.approx((3 / 8) ** 2 + (5 / 8) ** 2)


def test_group_outcomes_agree_with_simulated_binomial_groups():
    # Every prompt with the same p: the measured fraction converges to p^G + (1-p)^G.
    generator = torch.Generator().manual_seed(0)
    flags = (torch.rand(4000, 8, generator=generator) < 0.8).tolist()
    records = make_records({f"q{i}": (3, row) for i, row in enumerate(flags)}, greedy=False)
    row = group_outcomes_by_level(records).iloc[0]
    assert row["frac_zero_var"] == pytest.approx(row["analytic"], abs=0.03)
    assert row["frac_all_correct"] == pytest.approx(0.8**8, abs=0.03)


def test_load_eval_records_adds_method_and_seed_and_drops_greedy(tmp_path):
    for method, seed in (("grpo", 0), ("agpo", 1)):
        run = tmp_path / "runs" / method / f"seed{seed}"
        run.mkdir(parents=True)
        make_records({"a": (1, [True, False])}).assign(tokens=[5, 6, 7]).to_csv(
            run / "eval_records.csv", index=False
        )
    records = load_eval_records(tmp_path)
    assert len(records) == 4 and not records["greedy"].any()
    assert set(zip(records["method"], records["seed"])) == {("grpo", 0), ("agpo", 1)}
    assert len(load_eval_records(tmp_path, sampled_only=False)) == 6
    with pytest.raises(FileNotFoundError, match="eval_records"):
        load_eval_records(tmp_path / "empty")


def test_ablation_arms_reads_the_two_by_two_from_method_overrides():
    methods = {
        "both": ["algorithm.estimator=agpo", "algorithm.length_reward=agpo"],
        "base": ["algorithm.estimator=grpo", "algorithm.length_reward=none"],
        "dr": ["algorithm.estimator=dr_grpo", "algorithm.length_reward=none"],
        "len": ["algorithm.estimator=grpo", "algorithm.length_reward=agpo"],
        "agg": ["algorithm.estimator=grpo", "algorithm.aggregation=token_mean"],
    }
    arms = ablation_arms(methods)
    assert arms["method"].tolist() == ["base", "len", "both"]
    assert arms["label"].tolist() == ["neither (GRPO)", "length only", "both (AGPO)"]
    assert arms["agpo_advantage"].tolist() == [False, False, True]


def test_ablation_arms_of_reproduce_cover_all_four_cells():
    arms = ablation_arms()
    assert arms["label"].tolist() == [
        "neither (GRPO)",
        "advantage only",
        "length only",
        "both (AGPO)",
    ]


def test_ablation_table_keeps_only_arms_with_results():
    summary = pd.DataFrame(
        {
            "method": ["start", "agpo", "grpo"],
            "accuracy_mean": [0.4, 0.6, 0.5],
            "accuracy_ci": [math.nan, 0.1, 0.1],
            "tokens_mean": [45.0, 30.0, 44.0],
            "tokens_ci": [math.nan, 2.0, 3.0],
        }
    )
    table = ablation_table(summary)
    assert table["method"].tolist() == ["grpo", "agpo"]
    assert table["tokens_mean"].tolist() == [44.0, 30.0]
    with pytest.raises(ValueError, match="lacks columns"):
        ablation_table(summary.drop(columns="tokens_ci"))


def test_paired_completions_lines_up_one_prompt_across_methods():
    texts = {
        "start": "3 + 4 = 7. Let me check: 7 - 4 = 3. The answer is 7.",
        "agpo": "3 + 4 = 7. The answer is 7.",
    }
    records = pd.concat(
        pd.DataFrame(
            {
                "problem_id": ["p", "p", "q"],
                "sample": [0, 1, 0],
                "text": [text, "other", "other"],
                "tokens": [len(text), 1, 1],
                "correct": [True, False, False],
                "truncated": [False] * 3,
                "method": method,
                "seed": 0,
            }
        )
        for method, text in texts.items()
    )
    pair = paired_completions(records, "p", seed=0, sample=0)
    assert list(pair.index) == ["start", "agpo"]
    assert list(pair["redundant"]) == [1, 0] and list(pair["text"]) == list(texts.values())
    with pytest.raises(FileNotFoundError, match="seed 1"):
        paired_completions(records, "p", seed=1)
