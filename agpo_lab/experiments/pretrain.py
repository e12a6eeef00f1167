"""SFT that makes the embedded checkpoint: a tiny Qwen2 trained on arithmetic traces.

    agpo-lab pretrain --output-dir data/embedded          (settings: `config.PretrainConfig`)

Each step draws a fresh batch of train-split questions over all difficulty levels, writes a trace
for each with a random number of redundant segments (0..max_verbosity, so verbosity is a choice the
model learns to sample, not something the prompt asks for) and an occasional wrong step, and
minimises the cross-entropy of the completion tokens (prompt tokens are masked). Afterwards the
checkpoint is measured on the eval split at temperature 1.0 with G samples per prompt
(`card.measure`), and the folder gets the weights, the tokenizer, a card (README.md,
`card.render_card`) and its statistics (card.json).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel

from agpo_lab.config import PretrainConfig
from agpo_lab.experiments.card import measure, portable_path, render_card
from agpo_lab.models.tiny import build_tiny_causal_lm
from agpo_lab.models.tokenizer import build_char_tokenizer
from agpo_lab.tasks.arithmetic import LEVELS, ArithmeticTask, sample_problem, write_trace


def build_model(config: PretrainConfig, tokenizer: Any) -> PreTrainedModel:
    """A fresh tiny Qwen2 (tied embeddings, no grouped KV) sized by `config`, seeded by its seed."""
    return build_tiny_causal_lm(
        tokenizer,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        num_kv_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=256,
        seed=config.seed,
    )


def sft_batch(
    tokenizer: Any, config: PretrainConfig, rng: random.Random
) -> dict[str, torch.Tensor]:
    """One left-padded batch of ``prompt + trace + <eos>`` with labels only on the completion."""
    levels = sorted(LEVELS)
    rows = []
    for _ in range(config.batch_size):
        level = rng.choices(levels, weights=config.level_weights)[0]
        question, _ = sample_problem(level, rng, "train")
        trace = write_trace(question, rng.randint(0, config.max_verbosity), rng, config.error_rate)
        prompt_ids = tokenizer(f"q:{question}\n")["input_ids"]
        completion_ids = tokenizer(trace)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt_ids, completion_ids))
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt_ids, completion_ids) in enumerate(rows):
        ids = prompt_ids + completion_ids
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        labels[i, width - len(completion_ids) :] = torch.tensor(completion_ids)
        attention_mask[i, width - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def learning_rate_at(step: int, config: PretrainConfig) -> float:
    """Linear warm-up to the peak, then cosine to 10%: lr(0) = peak / warmup, lr(end) = peak / 10."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def pretrain(config: PretrainConfig, command: str | None = None) -> Path:
    """Train, measure and save the checkpoint described by `config`; returns the output folder."""
    config.validate()
    torch.set_num_threads(config.num_threads)
    tokenizer = build_char_tokenizer()
    model = build_model(config, tokenizer)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.learning_rate,
        betas=(0.9, 0.95),
        weight_decay=config.weight_decay,
    )
    rng = random.Random(config.seed)
    started = time.perf_counter()
    model.train()
    losses = []
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, config)
        loss = model(**sft_batch(tokenizer, config, rng)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == config.steps - 1:
            elapsed = time.perf_counter() - started
            print(f"step {step:5d}  loss {loss.item():.4f}  {elapsed:6.1f}s", flush=True)
    train_seconds = time.perf_counter() - started

    model.generation_config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=config.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    card: dict[str, Any] = {
        "command": command or "agpo_lab.experiments.pretrain.pretrain (called from Python)",
        "config": {**dataclasses.asdict(config), "output_dir": portable_path(out)},
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_train_loss": sum(losses[-50:]) / len(losses[-50:]),
        "train_seconds": round(train_seconds, 1),
        "torch_version": torch.__version__,
    }
    if config.eval_problems > 0:
        started = time.perf_counter()
        task = ArithmeticTask(seed=0, n_eval=config.eval_problems)
        card["eval"] = measure(
            model,
            tokenizer,
            task,
            config.group_size,
            config.max_new_tokens,
            config.seed,
            config.eval_batch_size,
        )
        card["eval_seconds"] = round(time.perf_counter() - started, 1)
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "README.md").write_text(render_card(card))
    return out
