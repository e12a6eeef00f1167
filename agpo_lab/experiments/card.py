"""Measuring and describing a pretrained checkpoint: the statistics and text of its model card.

`measure` samples G completions per eval-split prompt at temperature 1.0 and returns pass@1, the
group kinds (all correct / all wrong / mixed) and lengths, overall and per level; `render_card`
turns those statistics into the card (README.md) that `agpo_lab.experiments.pretrain` writes next
to the weights, with card.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from agpo_lab.paths import REPO_ROOT
from agpo_lab.tasks.arithmetic import ArithmeticTask, shortest_correct_trace
from agpo_lab.tasks.base import is_correct


@torch.no_grad()
def measure(
    model: Any,
    tokenizer: Any,
    task: ArithmeticTask,
    group_size: int = 8,
    max_new_tokens: int = 96,
    seed: int = 0,
    batch_size: int = 128,
) -> dict[str, Any]:
    """pass@1, group kinds and lengths on the task's eval split, sampling at temperature 1.0.

    Group kinds: a prompt's G samples are all correct, all wrong, or mixed. `length_ratio` is the
    mean completion length (tokens = characters, EOS excluded) over the mean length of the
    shortest correct traces of the same problems. `correct_per_question` maps each question to
    its number of correct samples out of G (lets a later check re-measure any subset).
    """
    model.eval()
    torch.manual_seed(seed)
    problems = task.problems("eval")
    per_batch = max(1, batch_size // group_size)
    rows = []  # (level, n_correct, lengths, n_truncated, question)
    for start in range(0, len(problems), per_batch):
        chunk = problems[start : start + per_batch]
        prompts = [task.format_prompt(p) for p in chunk for _ in range(group_size)]
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
        )
        generated = out[:, enc["input_ids"].shape[1] :]
        for j, problem in enumerate(chunk):
            correct, lengths, truncated = 0, [], 0
            for ids in generated[j * group_size : (j + 1) * group_size].tolist():
                ended = tokenizer.eos_token_id in ids
                ids = ids[: ids.index(tokenizer.eos_token_id)] if ended else ids
                text = tokenizer.decode(ids, skip_special_tokens=True)
                correct += int(ended and is_correct(task.score(text, problem)))
                lengths.append(len(ids))
                truncated += int(not ended)
            rows.append((problem.difficulty, correct, lengths, truncated, problem.question))
    return _summarise(rows, problems, group_size)


def _summarise(rows: list, problems: list, group_size: int) -> dict[str, Any]:
    """Aggregate per-prompt rows into the card's statistics (overall and per level)."""

    def stats(selected: list) -> dict[str, float]:
        n = len(selected)
        lengths = [length for row in selected for length in row[2]]
        return {
            "prompts": n,
            "pass_at_1": sum(r[1] for r in selected) / (n * group_size),
            "frac_all_correct": sum(r[1] == group_size for r in selected) / n,
            "frac_all_wrong": sum(r[1] == 0 for r in selected) / n,
            "frac_mixed": sum(0 < r[1] < group_size for r in selected) / n,
            "mean_completion_tokens": sum(lengths) / len(lengths),
            "truncated_rate": sum(r[3] for r in selected) / (n * group_size),
        }

    overall = stats(rows)
    shortest = sum(len(shortest_correct_trace(p.question)) for p in problems) / len(problems)
    overall["mean_shortest_correct_tokens"] = shortest
    overall["length_ratio"] = overall["mean_completion_tokens"] / shortest
    overall["group_size"] = group_size
    levels = sorted({r[0] for r in rows})
    overall["per_level"] = {str(lv): stats([r for r in rows if r[0] == lv]) for lv in levels}
    overall["correct_per_question"] = {r[4]: r[1] for r in rows}
    return overall


def portable_path(path: Path) -> str:
    """`path` relative to the repository when inside it, so cards hold no machine paths."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def render_card(card: dict[str, Any]) -> str:
    """The model card (markdown) from the statistics written to card.json."""
    lines = [
        "# agpo_lab embedded model",
        "",
        f"A {card['parameters'] / 1e6:.2f}M-parameter Qwen2 causal LM with a character tokenizer,",
        "trained by `agpo_lab.experiments.pretrain` (SFT) on the embedded arithmetic task",
        "(`agpo_lab.tasks.arithmetic`): traces with 0-3 redundant segments and occasional wrong steps.",
        "Prompt `q:<question>\\n`; a completion ends with `ans:<int>` then EOS.",
        "",
        "Made by (deterministic: the same command gives bit-identical weights on CPU):",
        "",
        f"    {card['command']}",
        "",
        f"Training: {card['train_seconds']} s wall, final loss {card['final_train_loss']:.4f}.",
    ]
    if "eval" in card:
        ev = card["eval"]
        lines += [
            "",
            f"## Measured on the eval split (temperature 1.0, G={ev['group_size']})",
            "",
            f"- pass@1: {ev['pass_at_1']:.3f} over {ev['prompts']} prompts",
            f"- groups all correct / all wrong / mixed: {ev['frac_all_correct']:.3f} / "
            f"{ev['frac_all_wrong']:.3f} / {ev['frac_mixed']:.3f}",
            f"- mean completion length: {ev['mean_completion_tokens']:.1f} tokens; shortest correct"
            f" trace: {ev['mean_shortest_correct_tokens']:.1f}; ratio {ev['length_ratio']:.2f}",
            f"- truncated (no EOS within the limit): {ev['truncated_rate']:.3f}",
            "",
            "| level | pass@1 | all correct | all wrong | mixed | mean tokens |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for level, s in ev["per_level"].items():
            lines.append(
                f"| {level} | {s['pass_at_1']:.3f} | {s['frac_all_correct']:.3f} | "
                f"{s['frac_all_wrong']:.3f} | {s['frac_mixed']:.3f} | "
                f"{s['mean_completion_tokens']:.1f} |"
            )
    return "\n".join(lines) + "\n"
