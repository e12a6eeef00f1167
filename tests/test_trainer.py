"""The RL trainer end to end on a tiny in-process Qwen2: metrics, determinism, resume, Ctrl-C."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from agpo_lab.training.checkpoints import find_latest_checkpoint, load_checkpoint
from agpo_lab.training.run_dir import load_metrics, run_state
from agpo_lab.training.trainer import Trainer
from tests.conftest import ParityTask, comparable, make_config

REQUIRED_KEYS = [
    "reward/mean", "reward/std", "reward/accuracy", "zero_var/frac", "zero_var/all_correct",
    "zero_var/all_wrong", "zero_var/other", "length/mean", "length/mean_correct",
    "length/mean_wrong", "length/clipped_frac", "advantage/mean", "advantage/std",
    "advantage/abs_mean", "loss/policy", "loss/kl", "loss/total", "clip/frac_low",
    "clip/frac_high", "policy/entropy", "policy/ratio_first_epoch_max_dev", "optim/grad_norm",
    "optim/lr", "perf/tokens_per_s", "perf/step_seconds",
]  # fmt: skip


def test_a_few_steps_log_every_metric(tiny_model_dir, tmp_path):
    cfg = make_config(tiny_model_dir, tmp_path, "optim.mini_batch_size=8",
                      "optim.grad_accumulation=2", "algorithm.mu=2", "run.eval_every=2",
                      "eval.n_problems=4", "eval.k=2", "eval.max_new_tokens=8")  # fmt: skip
    trainer = Trainer(cfg, task=ParityTask())
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    rows = trainer.train()

    frame = load_metrics(tmp_path / "run")
    assert list(frame["step"]) == [1, 2]
    for key in REQUIRED_KEYS:
        assert key in frame and frame[key].map(math.isfinite).all(), key
    assert any(key.startswith("eval/") for key in rows[-1])
    assert rows[0]["policy/ratio_first_epoch_max_dev"] < 1e-4  # old and new log-probs agree
    assert rows[0]["optim/grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))
    assert (tmp_path / "run" / "config.yaml").exists() and (
        tmp_path / "run" / "samples.jsonl"
    ).exists()
    assert (tmp_path / "run" / "final" / "config.json").exists()
    assert find_latest_checkpoint(tmp_path / "run").name == "step_000002.safetensors"
    with pytest.raises(ValueError, match="run.resume=true"):  # never overwrite a run silently
        Trainer(cfg, task=ParityTask())


@pytest.mark.slow
def test_resume_and_interrupts_reproduce_an_uninterrupted_run(tiny_model_dir, tmp_path):
    extra = ("run.steps=4", "optim.mini_batch_size=8", "optim.grad_accumulation=2",
             "algorithm.mu=2", "optim.warmup_steps=3", "run.save_every=1")  # fmt: skip
    full = Trainer(make_config(tiny_model_dir, tmp_path / "a", *extra), task=ParityTask()).train()
    assert len(full) == 4

    # N/2 steps, then a resumed run to N
    Trainer(
        make_config(tiny_model_dir, tmp_path / "c", *extra, "run.steps=2"), task=ParityTask()
    ).train()
    resumed = Trainer(
        make_config(tiny_model_dir, tmp_path / "c", *extra, "run.resume=true"), task=ParityTask()
    )
    assert resumed.step == 2
    resumed.train()
    assert comparable(load_metrics(tmp_path / "c" / "run").to_dict("records")) == comparable(
        load_metrics(tmp_path / "a" / "run").to_dict("records")
    )

    # Ctrl-C in the middle of step 3's rollout: the step is undone, step 2 saved, resume is exact
    trainer = Trainer(
        make_config(tiny_model_dir, tmp_path / "d", *extra, "run.save_every=0"), task=ParityTask()
    )
    original = trainer._update

    def interrupt_in_step_3(batch):
        if trainer.step == 2:
            raise KeyboardInterrupt
        return original(batch)

    trainer._update = interrupt_in_step_3
    assert len(trainer.train()) == 2
    assert find_latest_checkpoint(tmp_path / "d" / "run").name == "step_000002.safetensors"
    Trainer(
        make_config(tiny_model_dir, tmp_path / "d", *extra, "run.resume=true"), task=ParityTask()
    ).train()
    assert comparable(load_metrics(tmp_path / "d" / "run").to_dict("records")) == comparable(
        load_metrics(tmp_path / "a" / "run").to_dict("records")
    )


def test_ctrl_c_saves_after_the_current_step(tiny_model_dir, tmp_path):
    cfg = make_config(tiny_model_dir, tmp_path, "run.steps=5")
    trainer = Trainer(cfg, task=ParityTask())
    before = signal.getsignal(signal.SIGINT)
    rows = trainer.train(callback=lambda step, m: os.kill(os.getpid(), signal.SIGINT))
    assert len(rows) == 1 and trainer.step == 1
    assert find_latest_checkpoint(tmp_path / "run").name == "step_000001.safetensors"
    assert signal.getsignal(signal.SIGINT) is before  # the handler in place before is restored

    def raise_interrupt(step, metrics):
        raise KeyboardInterrupt

    resumed = Trainer(
        make_config(tiny_model_dir, tmp_path, "run.steps=5", "run.resume=true"), task=ParityTask()
    )
    assert len(resumed.train(callback=raise_interrupt)) == 1
    assert find_latest_checkpoint(tmp_path / "run").name == "step_000002.safetensors"
    assert list(load_metrics(tmp_path / "run")["step"]) == [1, 2]


def _interrupting_evaluation(trainer: Trainer, evaluated: list[int]):
    """An evaluate() that gets Kernel > Interrupt (SIGINT) as soon as it starts."""
    original = trainer.evaluate

    def evaluate():
        evaluated.append(trainer.step)
        os.kill(os.getpid(), signal.SIGINT)  # handled before the next line runs
        return original()  # an evaluation that ran on would get here

    return evaluate


def test_ctrl_c_during_the_starting_evaluation_stops_the_run_at_once(tiny_model_dir, tmp_path):
    cfg = make_config(tiny_model_dir, tmp_path, "run.steps=4", "run.eval_every=2",
                      "run.eval_at_start=true", "eval.n_problems=4")  # fmt: skip
    trainer = Trainer(cfg, task=ParityTask())
    evaluated: list[int] = []
    trainer.evaluate = _interrupting_evaluation(trainer, evaluated)
    assert trainer.train() == [] and evaluated == [0] and trainer.step == 0
    assert run_state(tmp_path / "run") == "interrupted"
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or load_metrics(tmp_path / "run").empty
    resumed = Trainer(
        make_config(tiny_model_dir, tmp_path, "run.steps=2", "run.eval_every=2",
                    "run.eval_at_start=true", "eval.n_problems=4", "run.resume=true"),
        task=ParityTask(),
    )  # fmt: skip
    resumed.train()
    assert list(load_metrics(tmp_path / "run")["step"]) == [0, 1, 2]  # evaluated at the start


def test_ctrl_c_during_a_later_evaluation_keeps_the_step_and_stops(tiny_model_dir, tmp_path):
    cfg = make_config(tiny_model_dir, tmp_path, "run.steps=4", "run.eval_every=2",
                      "run.eval_at_start=false", "eval.n_problems=4")  # fmt: skip
    trainer = Trainer(cfg, task=ParityTask())
    evaluated: list[int] = []
    trainer.evaluate = _interrupting_evaluation(trainer, evaluated)
    rows = trainer.train()
    assert [r["step"] for r in rows] == [1, 2] and evaluated == [1]  # during step 2's evaluation
    assert not any(key.startswith("eval/") for key in rows[-1])  # dropped, the step kept
    assert find_latest_checkpoint(tmp_path / "run").name == "step_000002.safetensors"
    assert run_state(tmp_path / "run") == "interrupted"


def test_drop_with_dynamic_resampling(tiny_model_dir, tmp_path):
    cfg = make_config(tiny_model_dir, tmp_path, "algorithm.zero_variance=drop",
                      "algorithm.max_resample_rounds=3", "run.prompts_per_step=8", "run.steps=1")  # fmt: skip
    row = Trainer(cfg, task=ParityTask()).train()[0]
    assert row["zero_var/all_correct"] > 0  # the "always solved" prompts were drawn
    assert row["dynamic/resample_rounds"] >= 1
    assert row["dynamic/active_frac"] > 1 - row["zero_var/reward_frac"]  # replacements were found
    assert math.isfinite(row["loss/policy"])


def test_lora_with_kl_reference(tiny_model_dir, tmp_path):
    cfg = make_config(tiny_model_dir, tmp_path, "model.lora=true", "model.lora_r=4",
                      "algorithm.beta=0.1", "optim.lr=5e-2")  # fmt: skip
    trainer = Trainer(cfg, task=ParityTask())
    assert trainer.reference is not None
    rows = trainer.train()
    assert rows[0]["loss/kl"] == pytest.approx(0.0, abs=1e-7)  # policy == reference at the start
    assert rows[1]["loss/kl_mean"] > 0  # after one update they differ
    weights, _ = load_checkpoint(find_latest_checkpoint(tmp_path / "run"))
    assert weights and all("lora" in name for name in weights)  # only the adapters are saved


def test_mask_truncated_leaves_truncated_completions_out_of_the_loss(tiny_model_dir, tmp_path):
    # 3 tokens truncate every completion of the untrained tiny model; AGPO gives every group of
    # the parity task +1 or -1, so without the mask every row has a gradient
    overrides = ["rollout.max_new_tokens=3", "run.steps=1", "algorithm.estimator=agpo"]
    changed = {}
    for mask in (True, False):
        cfg = make_config(
            tiny_model_dir, tmp_path / str(mask), *overrides, f"algorithm.mask_truncated={mask}"
        )
        trainer = Trainer(cfg, task=ParityTask())
        batch, info = trainer._rollout(trainer.problems[:4])
        assert info["truncated"].all()
        assert torch.equal(batch.active.cpu(), ~info["truncated"].flatten() if mask else
                           torch.ones(16, dtype=torch.bool))  # fmt: skip
        before = [p.detach().clone() for p in trainer.policy.parameters()]
        trainer.train()
        after = trainer.policy.parameters()
        changed[mask] = any(not torch.equal(a, b) for a, b in zip(before, after))
    assert changed == {True: False, False: True}
