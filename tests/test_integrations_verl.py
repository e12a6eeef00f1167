"""AGPO as a verl advantage estimator (agpo_lab.integrations.verl), on CPU with plain tensors.

verl is optional and not installed in the project venv (verl >= 0.5 conflicts with the pinned
transformers / numpy), so these tests call the estimator with verl's documented shapes and check
registration against a stand-in registry that copies verl's `register_adv_est(name)` contract.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import agpo_lab.integrations.verl as agpo_verl
from agpo_lab.algorithms import agpo_advantage, agpo_length_reward, compute_advantages

SCORES = torch.tensor([1.0, 0, 1, 1, 0, 0, 1, 0, 0, 1, 1, 1])
LENGTHS = torch.tensor([3, 5, 2, 6, 4, 4, 6, 3, 5, 2, 4, 7])
UIDS = ["a", "b", "c", "a", "b", "c", "a", "b", "c", "a", "b", "c"]  # interleaved: G=4 each


def verl_batch(scores=SCORES, lengths=LENGTHS, T=8):
    """token_level_rewards [B, T] with the score on the last response token, response_mask [B, T]."""
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    rewards = torch.zeros(len(scores), T)
    rewards[torch.arange(len(scores)), lengths - 1] = scores
    return rewards, mask


def grouped(x, uids=UIDS):
    rows = agpo_verl.group_rows(np.array(uids, dtype=object))
    return x[rows], rows


@pytest.fixture(autouse=True)
def default_options():
    agpo_verl.configure({})
    yield
    agpo_verl.configure({})


def test_group_rows_follows_uids_not_positions():
    rows = agpo_verl.group_rows(np.array(["b", "a", "b", "a"], dtype=object))
    assert rows.tolist() == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match="equal group sizes"):
        agpo_verl.group_rows(np.array(["a", "a", "b"]))


def test_estimator_equals_agpo_labs_including_length_reward():
    rewards, mask = verl_batch()
    adv, returns = agpo_verl.compute_agpo_outcome_advantage(
        rewards, mask, np.array(UIDS, dtype=object)
    )
    assert adv.shape == mask.shape and torch.equal(adv, returns)
    assert torch.all(adv[mask == 0] == 0)  # nothing beyond the response
    scores, rows = grouped(SCORES)
    lengths = LENGTHS[rows].float()
    shaped = scores + agpo_length_reward(scores >= 1, lengths, 0.1)
    expected = agpo_advantage(shaped, r_min=0.0, r_max=1.0, eps=1e-6)
    per_row = adv.gather(1, torch.zeros(len(SCORES), 1, dtype=torch.long)).squeeze(1)
    assert torch.allclose(per_row[rows], expected, atol=1e-6)
    # group "c" = rows 2, 5, 8, 11 with scores 1, 0, 0, 1: mixed; the shorter correct row wins
    assert per_row[2] > per_row[11] > 0 > per_row[5]


def test_all_correct_and_all_wrong_groups_get_plus_and_minus_one():
    scores = torch.tensor([1.0, 1, 0, 0, 1, 0])
    rewards, mask = verl_batch(scores, torch.tensor([2, 5, 3, 3, 4, 1]))
    adv, _ = agpo_verl.compute_agpo_outcome_advantage(
        rewards, mask, np.array(["x", "x", "y", "y", "z", "z"])
    )
    first = adv[:, 0].tolist()
    assert first[:4] == [1.0, 1.0, -1.0, -1.0]
    assert first[4] == pytest.approx(0.7071, abs=1e-3) and first[5] == pytest.approx(
        -0.7071, abs=1e-3
    )


def test_options_from_config_and_dr_grpo_variant():
    rewards, mask = verl_batch()
    uids = np.array(UIDS, dtype=object)
    config = {"norm_adv_by_std_in_grpo": False, "agpo": {"length_weight": 0.0}}
    adv, _ = agpo_verl.compute_agpo_outcome_advantage(rewards, mask, uids, config=config)
    scores, rows = grouped(SCORES)
    expected, _ = compute_advantages(scores, "dr_grpo", zero_variance="agpo", r_min=0.0, r_max=1.0)
    assert torch.allclose(adv[:, 0][rows], expected, atol=1e-6)
    with pytest.raises(ValueError, match="r_min"):
        agpo_verl.compute_agpo_outcome_advantage(
            rewards, mask, uids, config={"agpo": {"r_min": 2.0}}
        )


def test_configure_validates_and_sets_process_wide_options():
    assert agpo_verl.configure({"r_max": 2.0, "length_weight": 0.0}).r_max == 2.0
    rewards, mask = verl_batch(torch.tensor([2.0, 2.0]), torch.tensor([3, 4]))
    adv, _ = agpo_verl.compute_agpo_outcome_advantage(rewards, mask, np.array(["u", "u"]))
    assert adv[:, 0].tolist() == [1.0, 1.0]  # all at the configured r_max
    with pytest.raises(ValueError, match="unknown agpo option"):
        agpo_verl.configure({"rmax": 1.0})
    with pytest.raises(ValueError, match="intermediate"):
        agpo_verl.configure({"intermediate": "half"})


def stand_in_registry():
    """A registry with the contract of verl's `register_adv_est(name)` decorator: stores fn under
    name, returns fn unchanged, refuses a different fn under a taken name."""
    registry = {"grpo": object()}

    def register_adv_est(name):
        def decorator(fn):
            if name in registry and registry[name] is not fn:
                raise ValueError(f"Adv estimator {name} has already been registered")
            registry[name] = fn
            return fn

        return decorator

    return registry, register_adv_est


def test_registers_under_its_own_name_and_is_idempotent():
    registry, decorator = stand_in_registry()
    grpo = registry["grpo"]
    fn = agpo_verl.register(decorator)
    assert fn is agpo_verl.compute_agpo_outcome_advantage
    assert registry["agpo"] is fn and registry["grpo"] is grpo
    agpo_verl.register(decorator)  # a second registration (another import) is harmless


def test_task_runner_registers_inside_run_before_verl_trains(monkeypatch):
    registry, decorator = stand_in_registry()
    real_register = agpo_verl.register
    monkeypatch.setattr(agpo_verl, "register", lambda: real_register(decorator))
    seen = {}

    class FakeTaskRunner:
        def run(self, config):
            seen["registered"] = "agpo" in registry
            seen["length_weight"] = agpo_verl._options.length_weight
            return "trained"

    runner = agpo_verl.make_task_runner(FakeTaskRunner)()
    assert runner.run({"agpo": {"length_weight": 0.3}}) == "trained"
    assert seen == {"registered": True, "length_weight": 0.3}


def test_real_verl_registry_when_installed():
    core_algos = pytest.importorskip(
        "verl.trainer.ppo.core_algos",
        reason="verl is an optional extra, not installed here (verl>=0.5 conflicts with the pins)",
    )
    assert core_algos.get_adv_estimator_fn("agpo") is agpo_verl.compute_agpo_outcome_advantage
    assert core_algos.get_adv_estimator_fn("grpo") is core_algos.compute_grpo_outcome_advantage
