"""AGPO inside TRL 1.16's GRPOTrainer (agpo_lab.integrations.trl), on CPU with a tiny in-process Qwen2.

The advantages the trainer hands to TRL's loss must equal agpo_lab's own: length reward on whole
groups, then AGPO's +1 / -1 for all-correct / all-wrong groups, GRPO (Bessel std, eps 1e-4) else.
"""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is an optional dependency (pip install trl==1.16.0)")

from agpo_lab.algorithms import agpo_advantage, agpo_length_reward  # noqa: E402
from agpo_lab.integrations.trl import (  # noqa: E402
    AGPOConfig,
    AGPOTrainer,
    agpo_group_advantages,
    check_trl_version,
    main,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")

G = 4
PROMPTS = ["1+2=", "3+4=", "5+6="]
_queued: list[list[float]] = []


def queued_reward(completions, **kwargs) -> list[float]:
    """Returns the rewards the test queued (or all 1.0 when none is queued)."""
    rewards = _queued.pop(0) if _queued else [1.0] * len(completions)
    assert len(rewards) == len(completions)
    return rewards


def half_reward(completions, **kwargs) -> list[float]:
    """A second reward function (e.g. a format reward) worth 0 or 0.5."""
    return [0.5 if len(c) % 2 else 0.0 for c in completions]


def tiny_model():
    from agpo_lab.models.tiny import build_tiny_causal_lm
    from agpo_lab.models.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    model = build_tiny_causal_lm(
        tok, hidden_size=32, num_heads=2, intermediate_size=64, max_position_embeddings=64
    )
    return model, tok


def make_args(out_dir, **overrides) -> AGPOConfig:
    options = dict(
        output_dir=str(out_dir),
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        per_device_train_batch_size=len(PROMPTS) * G,
        num_generations=G,
        max_completion_length=8,
        max_steps=3,
        logging_steps=1,
        learning_rate=1e-3,
        save_strategy="no",
        beta=0.0,
        loss_type="grpo",
        seed=0,
        dataloader_num_workers=0,
        r_min=0.0,
        r_max=1.0,
        length_weight=0.1,
    )
    return AGPOConfig(**{**options, **overrides})


def make_trainer(out_dir, reward_funcs=queued_reward, **overrides) -> AGPOTrainer:
    from datasets import Dataset

    model, tok = tiny_model()
    return AGPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=make_args(out_dir, **overrides),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tok,
    )


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    t = make_trainer(tmp_path_factory.mktemp("agpo_trl"))
    t.current_gradient_accumulation_steps = 1  # normally set by train()
    return t


def reference(rewards, lengths, weight=0.1, r_min=0.0, r_max=1.0, in_homogeneous=False):
    """agpo_lab's own pipeline (as the agpo_lab trainer runs it): length reward, then AGPO."""
    shaped = rewards + agpo_length_reward(rewards >= 1.0, lengths, weight, in_homogeneous)
    return agpo_advantage(shaped, r_min=r_min, r_max=r_max, eps=1e-4)


def test_pure_function_matches_agpo_lab_with_length_reward_and_homogeneous_groups():
    rewards = torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 1, 0]])
    lengths = torch.tensor([[5, 6, 7, 8], [3, 3, 3, 3], [4, 9, 6, 2], [7, 1, 3, 5]])
    cfg = make_args("unused", r_min=0.0, r_max=1.0, length_weight=0.2)
    adv, shaped, metrics = agpo_group_advantages(
        rewards.view(-1, 1), torch.ones(1), lengths.flatten(), G, cfg
    )
    assert torch.allclose(adv.view(-1, G), reference(rewards, lengths, 0.2), atol=1e-6)
    assert adv.view(-1, G)[0].tolist() == [1.0] * G and adv.view(-1, G)[1].tolist() == [-1.0] * G
    # the shorter correct completion of group 2 got the length bonus: a larger advantage
    assert shaped.view(-1, G)[2, 0] == pytest.approx(1.2) and adv[8] > adv[10] > 0
    assert metrics["zero_var/all_correct"] == 0.25 and metrics["zero_var/all_wrong"] == 0.25
    assert metrics["zero_var/frac"] == 0.5


def test_pure_function_weights_several_reward_functions_and_picks_the_correctness_one():
    correct = torch.tensor([[1.0, 1], [1, 0]])
    fmt = torch.tensor([[0.5, 0.5], [0.0, 0.5]])
    per_func = torch.stack([fmt.flatten(), correct.flatten()], dim=1)  # correctness is column 1
    weights = torch.tensor([1.0, 2.0])
    cfg = make_args("unused", r_min=0.0, r_max=2.5, length_weight=0.0)
    adv, shaped, _ = agpo_group_advantages(per_func, weights, torch.ones(4), 2, cfg, 1)
    assert shaped.tolist() == [2.5, 2.5, 2.0, 0.5]
    assert torch.allclose(adv.view(2, 2), agpo_advantage(shaped.view(2, 2), r_min=0, r_max=2.5))


def test_pure_function_rejects_unscored_completions():
    cfg = make_args("unused")
    with pytest.raises(ValueError, match="every completion scored"):
        agpo_group_advantages(
            torch.tensor([[1.0], [float("nan")]]), torch.ones(1), torch.ones(2), 2, cfg
        )


@pytest.mark.parametrize("seed", range(3))
def test_trainer_advantages_equal_agpo_labs(trainer, seed):
    g = torch.Generator().manual_seed(seed)
    rewards = (torch.rand(len(PROMPTS), G, generator=g) < 0.5).float()
    rewards[seed % len(PROMPTS)] = float(seed % 2)  # one all-correct or all-wrong group
    _queued.append(rewards.flatten().tolist())
    torch.manual_seed(seed)
    out = trainer._generate_and_score_completions(
        [{"prompt": p} for p in PROMPTS for _ in range(G)]
    )
    lengths = out["completion_mask"].sum(dim=1).view(-1, G)
    expected = reference(rewards, lengths)
    assert torch.allclose(out["advantages"].view(-1, G), expected, atol=1e-5)
    homogeneous = seed % len(PROMPTS)
    assert out["advantages"].view(-1, G)[homogeneous].tolist() == [2.0 * (seed % 2) - 1] * G
    metrics = trainer._metrics["train"]
    assert metrics["zero_var/frac"][-1] >= 1 / 3
    assert metrics["zero_var/all_correct"][-1] + metrics["zero_var/all_wrong"][-1] >= 1 / 3


@pytest.mark.slow
def test_three_training_steps_learn_from_all_correct_groups_and_log_zero_var(tmp_path):
    # every completion is rewarded 1.0: plain GRPO gets zero advantage and zero gradient here
    trainer = make_trainer(tmp_path)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 3
    for log in steps:
        assert log["zero_var/all_correct"] == 1.0 and log["zero_var/frac"] == 1.0
        assert log["zero_var/all_wrong"] == 0.0 and log["grad_norm"] > 0
    after = list(trainer.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_wrong_trl_version_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(RuntimeError, match=r"trl==1\.16\.0") as err:
        make_trainer(tmp_path)
    assert "\n" not in str(err.value)
    check_trl_version("1.16.0")  # the supported version passes


def test_bad_options_are_one_line_errors(tmp_path):
    from datasets import Dataset

    model, tok = tiny_model()
    ds = Dataset.from_dict({"prompt": PROMPTS})
    plain = trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(TypeError, match="AGPOConfig"):
        AGPOTrainer(model=model, reward_funcs=queued_reward, args=plain, train_dataset=ds)
    for bad, match in [
        ({"scale_rewards": "batch"}, "scale_rewards='group'"),
        ({"r_min": 1.0, "r_max": 1.0}, "r_min"),
        ({"length_weight": -1.0}, "length_weight"),
        ({"intermediate": "half"}, "intermediate"),
    ]:
        with pytest.raises(ValueError, match=match):
            make_trainer(tmp_path, **bad)


def test_correctness_reward_is_looked_up_by_name(tmp_path):
    trainer = make_trainer(
        tmp_path, reward_funcs=[half_reward, queued_reward], correctness_reward="queued_reward"
    )
    assert trainer._correctness_index == 1
    with pytest.raises(ValueError, match="not a reward function"):
        make_trainer(tmp_path, correctness_reward="nope")


@pytest.mark.slow
def test_launcher_trains_a_local_model_on_the_arithmetic_task(tmp_path):
    model, tok = tiny_model()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_name_or_path: {tmp_path / 'model'}\ndtype: float32\ntask: arithmetic\n"
        f"output_dir: {tmp_path / 'out'}\nuse_cpu: true\nbf16: false\nreport_to: none\n"
        "per_device_train_batch_size: 8\nnum_generations: 4\nmax_completion_length: 8\n"
        "max_steps: 1\nsave_strategy: 'no'\nlogging_steps: 1\nlength_weight: 0.1\n"
    )
    assert main(["--config", str(recipe)]) == 0
