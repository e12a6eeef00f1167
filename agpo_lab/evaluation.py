"""Held-out evaluation: pass@1 (greedy and sampled), pass@k and token counts.

Three layers, each usable alone from a notebook:

    evaluate_records(model, tokenizer, task, problems, cfg)  -> DataFrame, one row per completion
    summarize_records(records, k)                             -> {"eval/...": float}
    evaluate(...) = summarize_records(evaluate_records(...))

`agpo-lab eval RUN_OR_MODEL` runs the same thing on a run directory or a model.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from agpo_lab.config import EvalConfig, RolloutConfig
from agpo_lab.errors import DataError
from agpo_lab.rollout import generate
from agpo_lab.tasks.base import Problem, Task, is_correct


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al. 2021, arXiv 2107.03374) from n samples, c correct.

        pass@k = 1 - C(n - c, k) / C(n, k)
               = 1 - prod_{i = n-c+1}^{n} (1 - k / i)      (the product form avoids huge binomials)

    It is the probability that k samples drawn without replacement from the n contain a correct one.
    Worked example: n=4, c=1, k=2 -> 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5.
    With k = n it is 1 if any sample is correct; with k = 1 it is c / n.
    """
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def select_problems(problems: list[Problem], n: int | None) -> list[Problem]:
    """A fixed, evenly spaced subset of n problems (all of them when n is None or >= len).

    Evenly spaced rather than the first n, because splits are often ordered by difficulty level.
    Example: 10 problems, n=3 -> indices 0, 3, 6.
    """
    if n is None or n >= len(problems):
        return list(problems)
    return [problems[i * len(problems) // n] for i in range(n)]


def _generate_rows(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    samples_per_prompt: int,
    greedy: bool,
    cfg: EvalConfig,
    generator: torch.Generator | None,
    bar: tqdm,
) -> list[tuple[str, int, bool]]:
    """(text, tokens, truncated) for every completion, prompt-major, generated in chunks.

    `rollout.generate` draws one completion per prompt string, so each prompt is repeated
    `samples_per_prompt` times; temperature 0 is its greedy decoding. `bar` counts completions.
    """
    rollout_cfg = RolloutConfig(
        temperature=0.0 if greedy else cfg.temperature,
        top_p=1.0 if greedy else cfg.top_p,
        top_k=0,
        max_new_tokens=cfg.max_new_tokens,
        precision=cfg.precision,
    )
    prompts_per_call = max(1, cfg.batch_size // samples_per_prompt)
    rows: list[tuple[str, int, bool]] = []
    for start in range(0, len(prompts), prompts_per_call):
        chunk = prompts[start : start + prompts_per_call]
        repeated = [prompt for prompt in chunk for _ in range(samples_per_prompt)]
        out = generate(model, tokenizer, repeated, rollout_cfg, generator=generator)
        rows.extend(
            zip(out.texts, map(int, out.lengths.tolist()), map(bool, out.truncated.tolist()))
        )
        bar.update(len(repeated))
    return rows


def evaluate_records(
    model: Any,
    tokenizer: Any,
    task: Task,
    problems: list[Problem],
    cfg: EvalConfig | None = None,
    *,
    generator: torch.Generator | None = None,
) -> pd.DataFrame:
    """Generate and score completions; one row per completion (for notebooks and `evaluate`).

    Columns: problem_id, difficulty, greedy (bool), sample (0..k-1; 0 for the greedy row), text,
    tokens (completion length incl. EOS), truncated, score (task score in [0, 1]), correct.
    Generation runs in eval mode (no dropout); the model's train/eval mode is left as it was.
    """
    cfg = cfg or EvalConfig()
    cfg.validate()
    problems = select_problems(problems, cfg.n_problems)
    if not problems:
        raise DataError("evaluate: the problem list is empty; check the task's eval split")
    if generator is None:
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    prompts = [task.format_prompt(p, tokenizer) for p in problems]

    records = []
    # (greedy?, completions per problem): one greedy pass, then k samples per problem.
    passes = [(True, 1)] * cfg.greedy + [(False, cfg.k)] * (cfg.k > 0)
    total = len(prompts) * sum(per_prompt for _, per_prompt in passes)
    # `with`: an interrupt closes the bar at once, so a caller's last line comes after it
    with tqdm(
        total=total, desc="held-out evaluation", unit="completion", disable=not cfg.progress
    ) as bar:
        for greedy, per_prompt in passes:
            rows = _generate_rows(
                model, tokenizer, prompts, per_prompt, greedy, cfg, generator, bar
            )
            for row_index, (text, tokens, truncated) in enumerate(rows):
                problem = problems[row_index // per_prompt]
                score = float(task.score(text, problem))
                records.append(
                    {
                        "problem_id": problem.id,
                        "difficulty": problem.difficulty,
                        "greedy": greedy,
                        "sample": row_index % per_prompt,
                        "text": text,
                        "tokens": tokens,
                        "truncated": truncated,
                        "score": score,
                        "correct": is_correct(score),
                    }
                )
    return pd.DataFrame.from_records(records)


def _mean_or_nan(values: pd.Series) -> float:
    return float(values.mean()) if len(values) else math.nan


def summarize_records(records: pd.DataFrame, k: int) -> dict[str, float]:
    """Namespaced metrics from `evaluate_records` rows (pure: no model involved).

    eval/pass@1_greedy       fraction of problems whose greedy completion is correct
    eval/pass@1_sampled      mean over problems of c_i / n_i (n_i sampled completions, c_i correct)
    eval/pass@k              mean over problems of pass_at_k(n_i, c_i, k)
    eval/mean_tokens[_correct|_wrong], eval/truncated_frac
                             over the sampled completions (the greedy ones when there are none);
                             NaN when a subset is empty (e.g. no correct completion)
    eval/mean_tokens_greedy  mean length of the greedy completions
    eval/groups_all_correct, eval/groups_all_wrong, eval/groups_mixed
                             fractions of problems whose k >= 2 sampled completions are all
                             correct, all wrong, or both (the group kinds GRPO and AGPO treat
                             differently, at G = k)
    .../level_<d>            pass@1, group kinds and mean tokens per difficulty level, when
                             problems carry levels (any d != 0)
    """
    if records.empty:
        raise ValueError("summarize_records: no records to summarize")
    greedy = records[records["greedy"]]
    sampled = records[~records["greedy"]]
    metrics: dict[str, float] = {"eval/n_problems": float(records["problem_id"].nunique())}
    has_levels = bool((records["difficulty"] != 0).any())

    if len(greedy):
        metrics["eval/pass@1_greedy"] = float(greedy["correct"].mean())
        metrics["eval/mean_tokens_greedy"] = float(greedy["tokens"].mean())
        if has_levels:
            for level, rows in greedy.groupby("difficulty"):
                metrics[f"eval/pass@1_greedy/level_{level}"] = float(rows["correct"].mean())
    if len(sampled):
        per_problem = sampled.groupby("problem_id", sort=False).agg(
            n=("correct", "size"), c=("correct", "sum"), difficulty=("difficulty", "first")
        )
        per_problem["accuracy"] = per_problem["c"] / per_problem["n"]
        metrics["eval/pass@1_sampled"] = float(per_problem["accuracy"].mean())
        metrics["eval/pass@k"] = float(
            sum(pass_at_k(int(n), int(c), k) for n, c in zip(per_problem["n"], per_problem["c"]))
            / len(per_problem)
        )
        metrics["eval/k"] = float(k)
        if k >= 2:
            metrics.update(_group_kinds(per_problem, ""))
        if has_levels:
            for level, rows in per_problem.groupby("difficulty"):
                metrics[f"eval/pass@1_sampled/level_{level}"] = float(rows["accuracy"].mean())
                if k >= 2:
                    metrics.update(_group_kinds(rows, f"/level_{level}"))

    lengths_from = sampled if len(sampled) else greedy
    metrics["eval/mean_tokens"] = float(lengths_from["tokens"].mean())
    metrics["eval/mean_tokens_correct"] = _mean_or_nan(
        lengths_from["tokens"][lengths_from["correct"]]
    )
    metrics["eval/mean_tokens_wrong"] = _mean_or_nan(
        lengths_from["tokens"][~lengths_from["correct"]]
    )
    metrics["eval/truncated_frac"] = float(lengths_from["truncated"].mean())
    if has_levels:
        for level, rows in lengths_from.groupby("difficulty"):
            metrics[f"eval/mean_tokens/level_{level}"] = float(rows["tokens"].mean())
    return metrics


def _group_kinds(per_problem: pd.DataFrame, suffix: str) -> dict[str, float]:
    """Fractions of problems (rows with n samples, c correct) that are all correct / wrong / mixed."""
    n, c = per_problem["n"], per_problem["c"]
    return {
        f"eval/groups_all_correct{suffix}": float((c == n).mean()),
        f"eval/groups_all_wrong{suffix}": float((c == 0).mean()),
        f"eval/groups_mixed{suffix}": float(((c > 0) & (c < n)).mean()),
    }


def evaluate(
    model: Any,
    tokenizer: Any,
    task: Task,
    problems: list[Problem],
    cfg: EvalConfig | None = None,
    *,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Evaluate a policy on `problems`: the metrics of `summarize_records` (keys start with eval/)."""
    cfg = cfg or EvalConfig()
    records = evaluate_records(model, tokenizer, task, problems, cfg, generator=generator)
    return summarize_records(records, cfg.k)
