"""Cross-check against TRL 1.16.0's GRPOTrainer, running TRL's own code (a test-only dependency).

TRL has no standalone advantage or loss function: advantages are computed inline in
`_generate_and_score_completions` and the loss in `_compute_loss`. So we build a GRPOTrainer around
a tiny in-process Qwen2 and (1) let it generate and score a batch whose rewards we dictate, reading
back its advantages, and (2) call its `compute_loss` on a batch we construct, comparing the loss
value, the parameter gradients and the logged clip/KL metrics with ours.
"""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is a test-only dependency (pip install trl==1.16.0)")

from agpo_lab.algorithms.advantages import (  # noqa: E402
    dr_grpo_advantage,
    group_stats,
    grpo_advantage,
)
from agpo_lab.algorithms.loss import policy_loss  # noqa: E402

# building the trainer imports TRL and takes several seconds; transformers 5.24 warns (harmlessly)
# about TRL 1.16 still using the gradient_checkpointing names
pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning"),
]

G = 4
NUM_PROMPTS = 3
MAX_COMPLETION = 8  # TRL's max_completion_length (Dr.GRPO's constant); our crafted T is smaller
AGGREGATION_OF = {
    "grpo": "seq_mean_token_mean",
    "dr_grpo": "seq_mean_token_sum_norm",
    "dapo": "token_mean",
}
_dictated_rewards: list[list[float]] = []


def dictated_reward(completions, **kwargs) -> list[float]:
    """A reward function that returns whatever the test queued, ignoring the completions."""
    rewards = _dictated_rewards.pop(0)
    assert len(rewards) == len(completions)
    return rewards


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from agpo_lab.models.tiny import build_tiny_causal_lm
    from agpo_lab.models.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    model = build_tiny_causal_lm(
        tok, hidden_size=32, num_heads=2, intermediate_size=64, max_position_embeddings=64
    )
    args = GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")),
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        per_device_train_batch_size=NUM_PROMPTS * G,
        num_generations=G,
        max_completion_length=MAX_COMPLETION,
        max_steps=1,
        save_strategy="no",
        beta=0.0,
        loss_type="grpo",
        temperature=1.0,
        seed=0,
        dataloader_num_workers=0,
    )
    ds = Dataset.from_dict({"prompt": ["1+2=", "3+4=", "5+6="]})
    trainer = GRPOTrainer(
        model=model, reward_funcs=dictated_reward, args=args, train_dataset=ds, processing_class=tok
    )
    # normally set by Trainer.train(); one micro-batch per optimizer step here
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def trl_advantages(
    trainer, rewards: torch.Tensor, scale_rewards: str
) -> tuple[torch.Tensor, float]:
    """Run TRL's generate-and-score step with dictated rewards; return its advantages and its
    logged fraction of zero-std groups."""
    trainer.scale_rewards = scale_rewards
    _dictated_rewards.append(rewards.flatten().tolist())
    prompts = [{"prompt": p} for p in ("1+2=", "3+4=", "5+6=") for _ in range(G)]
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions(prompts)
    mode = "train" if trainer.model.training else "eval"
    return out["advantages"].view(NUM_PROMPTS, G), trainer._metrics[mode]["frac_reward_zero_std"][
        -1
    ]


def random_rewards(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if seed % 2 == 0:  # binary correctness rewards: plenty of all-correct / all-wrong groups
        rewards = (torch.rand(NUM_PROMPTS, G, generator=g) < 0.5).float()
        rewards[seed % NUM_PROMPTS] = float(seed % 4 == 0)  # always one homogeneous group
        return rewards
    return torch.rand(NUM_PROMPTS, G, generator=g) * 3 - 1  # continuous, shaped-reward-like


@pytest.mark.parametrize("seed", range(12))
def test_grpo_advantage_matches_trl(trainer, seed):
    rewards = random_rewards(seed)
    theirs, frac_zero_std = trl_advantages(trainer, rewards, "group")
    ours = grpo_advantage(rewards, std="bessel", eps=1e-4)  # TRL's convention (also our default)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
    assert frac_zero_std == pytest.approx(group_stats(rewards, -1.0, 2.0)["frac_zero_var"])
    # and with population std the numbers really differ: the convention matters
    assert rewards.std(dim=1).max() == 0 or not torch.allclose(
        grpo_advantage(rewards, std="population"), theirs, atol=1e-5
    )


@pytest.mark.parametrize("seed", range(4))
def test_dr_grpo_advantage_matches_trl_scale_rewards_none(trainer, seed):
    rewards = random_rewards(seed)
    theirs, _ = trl_advantages(trainer, rewards, "none")
    assert torch.allclose(dr_grpo_advantage(rewards), theirs, atol=1e-6, rtol=0)


def crafted_batch(trainer, seed: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts, right-padded completions of varied lengths, random advantages, and
    old / reference log-probs perturbed away from the current policy so that clipping happens."""
    g = torch.Generator().manual_seed(seed)
    b, p, t = NUM_PROMPTS * G, 4, 6
    vocab = trainer.model.config.vocab_size
    prompt_ids = torch.randint(4, vocab, (b, p), generator=g)
    prompt_mask = torch.ones(b, p, dtype=torch.long)
    prompt_mask[::3, :2] = 0  # some left padding
    prompt_ids[prompt_mask == 0] = trainer.processing_class.pad_token_id
    completion_ids = torch.randint(4, vocab, (b, t), generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    completion_mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    completion_ids[completion_mask == 0] = trainer.processing_class.pad_token_id
    with torch.no_grad():
        current = completion_logprobs(
            trainer.model, prompt_ids, prompt_mask, completion_ids, completion_mask
        )
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.randn(b, generator=g),
        "old_per_token_logps": current + torch.randn(b, t, generator=g) * 0.3,
        "ref_per_token_logps": current + torch.randn(b, t, generator=g) * 0.3,
        "num_items_in_batch": completion_mask.sum(),
    }


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Our own log pi(token) for each completion token: a plain forward pass and log_softmax."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    t = completion_ids.shape[1]
    logprobs = torch.log_softmax(logits[:, -t - 1 : -1].float(), dim=-1)
    return logprobs.gather(-1, completion_ids[..., None]).squeeze(-1)


@pytest.mark.parametrize(
    ("beta", "kl_bias_correction"), [(0.0, False), (0.04, False), (0.04, True)]
)
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_policy_loss_matches_trl(trainer, loss_type, beta, kl_bias_correction):
    model = trainer.model
    trainer.loss_type, trainer.beta = loss_type, beta
    trainer.args.use_bias_correction_kl = kl_bias_correction  # TRL 1.16's default is True
    trainer.epsilon_low, trainer.epsilon_high = 0.2, 0.28  # asymmetric, to catch a swapped clip
    params = [p for p in model.parameters() if p.requires_grad]
    batch = crafted_batch(trainer, seed=10 * list(AGGREGATION_OF).index(loss_type) + int(beta > 0))

    theirs = trainer.compute_loss(model, batch)
    their_grads = torch.autograd.grad(theirs, params)

    logprobs = completion_logprobs(
        model,
        batch["prompt_ids"],
        batch["prompt_mask"],
        batch["completion_ids"],
        batch["completion_mask"],
    )
    ours, diag = policy_loss(
        logprobs,
        batch["old_per_token_logps"],
        batch["advantages"],
        batch["completion_mask"],
        batch["ref_per_token_logps"] if beta > 0 else None,
        clip_low=0.2,
        clip_high=0.28,
        beta=beta,
        kl_estimator="k3",
        kl_bias_correction=kl_bias_correction,
        aggregation=AGGREGATION_OF[loss_type],
        max_len=MAX_COMPLETION,
    )
    our_grads = torch.autograd.grad(ours, params)

    assert abs(ours.item() - theirs.item()) < 1e-5, (ours.item(), theirs.item())
    for mine, trls in zip(our_grads, their_grads, strict=True):
        assert torch.allclose(mine, trls, atol=1e-5, rtol=1e-4)
    # the batch really exercises clipping on both sides, and the diagnostics agree with TRL's logs
    mode = "train" if model.training else "eval"
    logged = trainer._metrics[mode]
    assert diag["clip_frac_low"] > 0 and diag["clip_frac_high"] > 0
    assert diag["clip_frac_low"] == pytest.approx(logged["clip_ratio/low_mean"][-1], abs=1e-6)
    assert diag["clip_frac_high"] == pytest.approx(logged["clip_ratio/high_mean"][-1], abs=1e-6)
    if beta > 0 and not kl_bias_correction:  # TRL logs rho * KL under the correction
        assert diag["kl_mean"] == pytest.approx(logged["kl"][-1], abs=1e-5)
        assert diag["kl_loss"] > 0


def test_the_aggregations_really_differ_on_this_batch(trainer):
    # guards the cross-check above from passing vacuously (e.g. all completions of equal length)
    batch = crafted_batch(trainer, seed=7)
    with torch.no_grad():
        lp = completion_logprobs(
            trainer.model,
            batch["prompt_ids"],
            batch["prompt_mask"],
            batch["completion_ids"],
            batch["completion_mask"],
        )
    args = (lp, batch["old_per_token_logps"], batch["advantages"], batch["completion_mask"])
    values = {
        a: policy_loss(*args, aggregation=a, max_len=MAX_COMPLETION)[0].item()
        for a in AGGREGATION_OF.values()
    }
    assert len({round(v, 4) for v in values.values()}) == 3, values
