"""A warm start for a real model: SFT that puts SmolLM2 in the paper's regime.

    agpo-lab warmstart                  (settings: `config.WarmStartConfig`; make warmstart)

The AGPO paper's models start strong and overthink. An untrained SmolLM2-135M-Instruct does
neither on word arithmetic (77% of its groups all wrong), so this supervised fine-tuning teaches it
natural-language worked solutions of the `word_arithmetic` train split (never the eval split),
written by `tasks.word_arithmetic.worked_solution` with a random number (0..max_verbosity) of
redundant re-checks and restatements and an occasional wrong step, ending with "The answer is N.".
The prompt is the RL prompt itself (the chat template with the task's instruction), so verbosity
is the model's own sampled choice, which a length reward can shift; the loss is on the completion
only (its tokens' mean negative log-likelihood, through the same padding-free pass the RL update
uses, `rollout.completion_logprobs`).

Our own loop rather than TRL's SFTTrainer: the batch of each step is a pure function of (seed,
step), so an interrupted build resumes exactly from its last saved state (LoRA weights, AdamW,
step), and it reuses the update's packed forward, which computes no padding.

The result is a plain model folder (LoRA merged into the weights) under the models folder, named
like a fetched model (`model.name_or_path: smollm2-135m-instruct-warm`), with a card (README.md,
card.json): pass@1 per level at the RL temperature, the group kinds at G = 8 and the mean
completion length on the RL training mix and on held-out problems, the share of completions that
carry a redundant segment, and the length against the shortest correct solution.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from agpo_lab.config import EvalConfig, ModelConfig, WarmStartConfig
from agpo_lab.evaluation import evaluate_records, select_problems, summarize_records
from agpo_lab.models.fetch import models_dir
from agpo_lab.models.loading import load_policy
from agpo_lab.rollout import completion_logprobs
from agpo_lab.rollout.inputs import left_pad
from agpo_lab.tasks.arithmetic import sample_problem
from agpo_lab.tasks.base import Problem
from agpo_lab.tasks.redundancy import count_redundant_segments
from agpo_lab.tasks.word_arithmetic import WordArithmeticTask, phrase_question, worked_solution
from agpo_lab.training.run_dir import write_file

STATE_FILE = "sft_state.pt"
"""The resumable SFT state inside the staging folder (removed once the model is saved)."""
RL_TASK = {"n_train": 600, "n_eval": 45}
"""The task sizes of configs/smollm2 (the RL training mix the card measures)."""


def warm_start_dir(cfg: WarmStartConfig) -> Path:
    """Where the finished warm start lives: <models folder>/<cfg.name>."""
    return models_dir() / cfg.name


def sft_examples(
    cfg: WarmStartConfig, step: int, task: WordArithmeticTask, tokenizer: Any
) -> list[tuple[str, str]]:
    """The (prompt, completion) pairs of SFT step `step`: a pure function of (seed, step).

    Questions are drawn from the train split of `cfg.levels` (uniformly over levels), phrased like
    the RL prompts, and answered by a worked solution with 0..max_verbosity redundant segments.
    """
    rng = random.Random(f"{cfg.seed}/warmstart/{step}")
    pairs = []
    for _ in range(cfg.batch_size):
        question, _ = sample_problem(rng.choice(cfg.levels), rng, "train")
        problem = Problem(id="sft", question=phrase_question(question), answer="")
        solution = worked_solution(question, rng.randint(0, cfg.max_verbosity), rng, cfg.error_rate)
        pairs.append((task.format_prompt(problem, tokenizer), solution))
    return pairs


def sft_tensors(pairs: list[tuple[str, str]], tokenizer: Any) -> tuple[torch.Tensor, ...]:
    """(prompt_ids, prompt_mask, completion_ids, completion_mask): prompts left-padded, each
    completion followed by the end-of-turn token and right-padded; the update's layout."""
    pad = tokenizer.pad_token_id
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p, _ in pairs]
    completions = [
        tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for _, c in pairs
    ]
    prompt_ids, prompt_mask = left_pad(prompts, pad)
    width = max(len(c) for c in completions)
    completion_ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    completion_mask = torch.zeros((len(pairs), width))
    for i, ids in enumerate(completions):
        completion_ids[i, : len(ids)] = torch.tensor(ids)
        completion_mask[i, : len(ids)] = 1.0
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def learning_rate_at(step: int, cfg: WarmStartConfig) -> float:
    """Linear warm-up to the peak, then cosine to 10%: lr(0) = peak / warmup, lr(end) = peak / 10."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def _save_state(path: Path, model: Any, optimizer: Any, step: int, log: list[dict]) -> None:
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    trainable = {k: v for k, v in model.state_dict().items() if k in names}
    state = {"step": step, "weights": trainable, "optimizer": optimizer.state_dict(), "log": log}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a kill leaves the previous state or the new one


def token_budget_chunks(row_tokens: list[int], budget: int) -> list[slice]:
    """Consecutive rows in chunks of at most `budget` tokens (a row above it alone; budget 0: one
    chunk). Example: tokens [300, 200, 100, 600], budget 512 -> rows 0:2, 2:3, 3:4."""
    if budget <= 0:
        return [slice(0, len(row_tokens))]
    chunks, start, total = [], 0, 0
    for i, count in enumerate(row_tokens):
        if i > start and total + count > budget:
            chunks.append(slice(start, i))
            start, total = i, 0
        total += count
    chunks.append(slice(start, len(row_tokens)))
    return chunks


def train_warm_start(
    cfg: WarmStartConfig, staging: Path, progress: bool = True
) -> tuple[Any, Any, dict]:
    """Run (or resume) the SFT in `staging`; returns the model with LoRA merged, its tokenizer and
    the training summary (steps, seconds, tokens, loss)."""
    torch.manual_seed(cfg.seed)  # the LoRA init
    model_cfg = ModelConfig(
        name_or_path=cfg.base_model,
        dtype="float32",
        lora=cfg.lora,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        gradient_checkpointing=False,
    )
    model, tokenizer = load_policy(model_cfg, "cpu")
    task = WordArithmeticTask(levels=cfg.levels)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.learning_rate,
        betas=(0.9, 0.95),
        weight_decay=0.0,
    )
    state_path, start, log = staging / STATE_FILE, 0, []
    if state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["weights"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        start, log = state["step"], state["log"]
    model.train()
    bar = tqdm(
        total=cfg.steps, initial=start, desc="warm start (SFT)", unit="step", disable=not progress
    )
    for step in range(start, cfg.steps):
        began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, cfg)
        inputs = sft_tensors(sft_examples(cfg, step, task, tokenizer), tokenizer)
        tokens = inputs[3].sum()
        optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros(())
        row_tokens = (inputs[1].sum(1) + inputs[3].sum(1)).tolist()
        for rows in token_budget_chunks(row_tokens, cfg.micro_batch_tokens):
            chunk = [tensor[rows] for tensor in inputs]
            part = -completion_logprobs(model, *chunk, pack_rows=True).sum() / tokens
            part.backward()
            loss += part.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        seconds = time.perf_counter() - began
        computed = int(inputs[1].sum() + tokens)
        log.append({"step": step + 1, "loss": loss.item(), "tokens": computed, "seconds": seconds})
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            _save_state(state_path, model, optimizer, step + 1, log)
    bar.close()
    if cfg.lora:
        model = model.merge_and_unload()
    model.eval()
    summary = {
        "steps": cfg.steps,
        "train_seconds": round(sum(r["seconds"] for r in log), 1),
        "tokens": sum(r["tokens"] for r in log),
        "final_loss": sum(r["loss"] for r in log[-10:]) / len(log[-10:]),
    }
    summary["tokens_per_s"] = round(summary["tokens"] / max(summary["train_seconds"], 1e-9), 1)
    return model, tokenizer, summary


def measure_regime(
    model: Any, tokenizer: Any, problems: list[Problem], cfg: WarmStartConfig, progress: bool
) -> tuple[dict[str, Any], pd.DataFrame]:
    """What the card reports on `problems`: sampled pass@1 (per level), the group kinds at G, the
    mean completion length, the share of completions with a redundant segment and the length
    against the shortest correct solution; and the completion records."""
    eval_cfg = EvalConfig(
        k=cfg.group_size,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        greedy=False,
        seed=cfg.seed,
        progress=progress,
    )
    task = WordArithmeticTask(levels=cfg.levels)
    records = evaluate_records(model, tokenizer, task, problems, eval_cfg)
    records["redundant"] = records["text"].map(count_redundant_segments)
    metrics = summarize_records(records, cfg.group_size)
    by_id = {p.id: p for p in problems}
    shortest = [
        len(tokenizer(worked_solution(by_id[i].meta["expression"], 0))["input_ids"]) + 1
        for i in records["problem_id"]
    ]
    stats = {key.removeprefix("eval/"): value for key, value in metrics.items()}
    stats["redundant_frac"] = float((records["redundant"] > 0).mean())
    stats["redundant_frac_correct"] = float((records["redundant"][records["correct"]] > 0).mean())
    stats["mean_shortest_correct_tokens"] = sum(shortest) / len(shortest)
    stats["length_ratio"] = stats["mean_tokens"] / stats["mean_shortest_correct_tokens"]
    return stats, records


def build_warm_start(cfg: WarmStartConfig, command: str, progress: bool = True) -> Path:
    """Build the warm start (resuming an interrupted build), measure it and write its card; return
    its folder. A finished warm start is returned as it is."""
    cfg.validate()
    torch.set_num_threads(cfg.num_threads)
    target = warm_start_dir(cfg)
    if (target / "config.json").is_file():
        card_path = target / "card.json"
        card = json.loads(card_path.read_text()) if card_path.is_file() else {"base": None}
        if "base" not in card:  # a warm start built before the card measured the base model
            card["base"] = measure_base_model(cfg, progress)
            _write_card(target, card, cfg)
        return target
    staging = target.with_name(target.name + ".partial")
    settings = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    recorded = staging / "warmstart_config.json"
    if recorded.is_file() and recorded.read_text() != settings:
        shutil.rmtree(staging)  # an interrupted build with other settings: start over
    staging.mkdir(parents=True, exist_ok=True)
    write_file(recorded, settings.encode())
    model, tokenizer, training = train_warm_start(cfg, staging, progress)

    card: dict[str, Any] = {
        "command": command,
        "config": dataclasses.asdict(cfg),
        "training": training,
        "torch_version": torch.__version__,
    }
    started = time.perf_counter()
    for name, problems in card_problem_sets(cfg).items():
        stats, records = measure_regime(model, tokenizer, problems, cfg, progress)
        card[name] = stats
        write_file(staging / f"card_{name}.csv", records.to_csv(index=False).encode())
    card["card_seconds"] = round(time.perf_counter() - started, 1)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    del model
    card["base"] = measure_base_model(cfg, progress)
    (staging / STATE_FILE).unlink(missing_ok=True)
    _write_card(staging, card, cfg)
    staging.rename(target)
    return target


def card_problem_sets(cfg: WarmStartConfig) -> dict[str, list[Problem]]:
    """The problems the card measures: a slice of the RL training mix and held-out problems."""
    task = WordArithmeticTask(levels=cfg.levels, **RL_TASK)
    sets = {
        "rl_train_mix": select_problems(task.problems("train"), cfg.card_train_problems),
        "held_out": select_problems(task.problems("eval"), cfg.card_eval_problems),
    }
    return {name: problems for name, problems in sets.items() if problems}


def measure_base_model(cfg: WarmStartConfig, progress: bool = True) -> dict[str, Any]:
    """The card's measurements of the base model (before the SFT), on the same problems with the
    same sampling: the weak start the warm start is compared with."""
    base_cfg = ModelConfig(name_or_path=cfg.base_model, dtype="float32", lora=False)
    model, tokenizer = load_policy(base_cfg, "cpu")
    started = time.perf_counter()
    base = {
        name: measure_regime(model, tokenizer, problems, cfg, progress)[0]
        for name, problems in card_problem_sets(cfg).items()
    }
    base["card_seconds"] = round(time.perf_counter() - started, 1)
    return base


def _write_card(folder: Path, card: dict[str, Any], cfg: WarmStartConfig) -> None:
    write_file(folder / "card.json", (json.dumps(card, indent=2) + "\n").encode())
    write_file(folder / "README.md", render_warm_card(card).encode())
    if cfg.docs_dir:
        docs = Path(cfg.docs_dir)
        docs.mkdir(parents=True, exist_ok=True)
        for name in ("README.md", "card.json"):
            shutil.copy2(folder / name, docs / name)


def render_warm_card(card: dict[str, Any]) -> str:
    """The warm start's card (markdown) from card.json."""
    cfg, training = card["config"], card["training"]
    lines = [
        f"# {cfg['name']}: {cfg['base_model']} warm-started on worked solutions",
        "",
        "Supervised fine-tuning (`agpo_lab.experiments.warmstart`) on natural-language worked",
        f"solutions of the word_arithmetic train split, levels {cfg['levels']}, each with 0..",
        f"{cfg['max_verbosity']} redundant re-checks or restatements and a {cfg['error_rate']:g}",
        "chance of a wrong step, ending with 'The answer is N.'; loss on the completion only.",
        f"{'LoRA r=' + str(cfg['lora_r']) + ' on every linear layer, merged' if cfg['lora'] else 'Full fine-tuning'};",
        f"{cfg['steps']} steps of {cfg['batch_size']} solutions, peak lr {cfg['learning_rate']:g}.",
        "",
        "Made by (deterministic for a seed on CPU):",
        "",
        f"    {card['command']}",
        "",
        f"Training: {training['train_seconds']} s, {training['tokens']} tokens computed "
        f"({training['tokens_per_s']} tokens/s), final loss {training['final_loss']:.4f}; "
        f"card measurement {card['card_seconds']} s.",
    ]
    titles = {"rl_train_mix": "the RL training mix (train split)", "held_out": "held-out problems"}
    if "base" in card:
        lines += [
            "",
            f"## The base model ({cfg['base_model']}) and the warm start, same problems and sampling",
            "",
            "| problems | model | pass@1 sampled | all correct / all wrong / mixed | mean tokens "
            "| length / shortest correct | with a redundant segment | truncated |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name in titles:
            for label, s in (("base", card["base"].get(name)), ("warm start", card.get(name))):
                if s is not None:
                    lines.append(
                        f"| {name} | {label} | {s['pass@1_sampled']:.3f} | "
                        f"{s['groups_all_correct']:.3f} / {s['groups_all_wrong']:.3f} / "
                        f"{s['groups_mixed']:.3f} | {s['mean_tokens']:.1f} | "
                        f"{s['length_ratio']:.2f} | {s['redundant_frac']:.3f} | "
                        f"{s['truncated_frac']:.3f} |"
                    )
        lines += ["", f"Base model measured in {card['base']['card_seconds']} s."]
    for name, title in titles.items():
        if name not in card:
            continue
        s = card[name]
        lines += [
            "",
            f"## On {title}: {int(s['n_problems'])} problems, G = {cfg['group_size']}, "
            f"temperature {cfg['temperature']:g}",
            "",
            f"- sampled pass@1: {s['pass@1_sampled']:.3f}",
            f"- groups all correct / all wrong / mixed: {s['groups_all_correct']:.3f} / "
            f"{s['groups_all_wrong']:.3f} / {s['groups_mixed']:.3f}",
            f"- mean completion tokens: {s['mean_tokens']:.1f} (correct ones "
            f"{s['mean_tokens_correct']:.1f}); shortest correct solution "
            f"{s['mean_shortest_correct_tokens']:.1f}; ratio {s['length_ratio']:.2f}",
            f"- completions with a redundant segment: {s['redundant_frac']:.3f} "
            f"(correct ones {s['redundant_frac_correct']:.3f})",
            f"- truncated (no end of turn within {cfg['max_new_tokens']} tokens): "
            f"{s['truncated_frac']:.3f}",
            "",
            "| level | pass@1 sampled | all correct | all wrong | mixed | mean tokens |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for level in cfg["levels"]:
            key = f"level_{level}"
            if f"pass@1_sampled/{key}" in s:
                lines.append(
                    f"| {level} | {s[f'pass@1_sampled/{key}']:.3f} | "
                    f"{s[f'groups_all_correct/{key}']:.3f} | {s[f'groups_all_wrong/{key}']:.3f} | "
                    f"{s[f'groups_mixed/{key}']:.3f} | {s[f'mean_tokens/{key}']:.1f} |"
                )
    return "\n".join(lines) + "\n"
