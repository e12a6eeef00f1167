"""`agpo-lab eval RUN_OR_MODEL`: evaluate a run directory or a model from the command line.

    agpo-lab eval runs/my_run --n 100 --k 8          (prints a metric table, writes RUN/eval.json)

`load_for_eval` turns a run directory, a model folder or "embedded" into (model, tokenizer, ...);
`eval_main` parses the flags and runs `agpo_lab.evaluation` (`evaluate_records`, then
`summarize_records`) on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from agpo_lab.evaluation import EvalConfig, evaluate_records, summarize_records


def load_for_eval(target: str, device: str = "cpu") -> tuple[Any, Any, Any, str]:
    """(model, tokenizer, the run's TrainConfig or None, description) for a run or a model.

    A run directory (has config.yaml) gives its model with the weights of its latest checkpoint,
    or its final/ folder when it has no checkpoint; "embedded" or a `from_pretrained` folder gives
    that model and no run config.
    """
    path = Path(target)
    is_model = target == "embedded" or (path / "config.json").is_file()
    if not is_model and not (path / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{target} is not a run directory (no config.yaml), a model folder (no config.json) "
            "or 'embedded'"
        )
    from agpo_lab.models.loading import ModelConfig, load_policy

    if is_model:
        model, tokenizer = load_policy(ModelConfig(name_or_path=target), device)
        return model, tokenizer, None, f"model {target}"
    from agpo_lab.config import load_config
    from agpo_lab.runs import find_latest_checkpoint, load_checkpoint

    train_cfg = load_config(path / "config.yaml")
    checkpoint = find_latest_checkpoint(path)
    if checkpoint is None:
        if not (path / "final" / "config.json").is_file():
            raise FileNotFoundError(f"run {target} has no checkpoint and no final/ model yet")
        model, tokenizer = load_policy(ModelConfig(name_or_path=str(path / "final")), device)
        return model, tokenizer, train_cfg, f"run {target} (final/)"
    model, tokenizer = load_policy(train_cfg.model, device)
    tensors, _ = load_checkpoint(checkpoint)
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown or not tensors:
        raise ValueError(
            f"checkpoint {checkpoint} does not fit the run's model ({len(unknown)} unknown "
            f"tensors, e.g. {unknown[:1]}); was config.yaml edited after training?"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].dtype))
    return model, tokenizer, train_cfg, f"run {target} ({checkpoint.name})"


def eval_main(argv: list[str] | None = None) -> None:
    """`agpo-lab eval RUN_OR_MODEL [--task T] [--n N] [--k K] [--out FILE] ...`.

    Unset options take the run's eval settings (or EvalConfig's defaults for a model). Prints a
    metric table and writes the metrics as JSON to --out (default for a run: RUN/eval.json).
    A bad path or setting prints one line to stderr and exits with code 2.
    """
    parser = argparse.ArgumentParser(prog="agpo-lab eval", description="Evaluate a run or model.")
    add = parser.add_argument
    add("target", metavar="RUN_OR_MODEL", help="run directory, model folder or 'embedded'")
    add("--task", help="task name (default: the run's task, else arithmetic)")
    add("--split", help="split to evaluate (default: the task's eval split)")
    add("--n", type=int, dest="n_problems", help="number of problems (default: all)")
    add("--k", type=int, help="sampled completions per problem, the k of pass@k")
    add("--temperature", type=float)
    add("--max-new-tokens", type=int)
    add("--batch-size", type=int)
    add("--seed", type=int)
    add("--device", default="cpu", help="cpu, cuda or cuda:N")
    add("--out", help="write the metrics as JSON here")
    add("--records", help="also write one row per completion to this .csv")
    args = parser.parse_args(argv)
    from agpo_lab.tasks.registry import TaskConfig, build_task

    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(EvalConfig)}
    try:
        model, tokenizer, run_cfg, description = load_for_eval(args.target, args.device)
        base = run_cfg.eval if run_cfg else EvalConfig()
        cfg = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
        task_cfg = run_cfg.task if run_cfg else TaskConfig()
        task_cfg = TaskConfig(name=args.task) if args.task else task_cfg
        task = build_task(task_cfg)
        records = evaluate_records(
            model, tokenizer, task, task.problems(args.split or task_cfg.eval_split), cfg
        )
    except (OSError, ValueError) as err:
        print(f"agpo-lab eval: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None

    metrics = summarize_records(records, cfg.k)
    print(f"{description}, task {task_cfg.name}, {records['problem_id'].nunique()} problems")
    for key, value in metrics.items():
        print(f"  {key:<34} {value:>10.4f}")
    out = args.out or (str(Path(args.target, "eval.json")) if run_cfg else None)
    if out:
        safe = {k: (None if math.isnan(v) else v) for k, v in metrics.items()}  # strict JSON
        Path(out).write_text(json.dumps(safe, indent=2) + "\n")
        print(f"wrote {out}")
    if args.records:
        records.to_csv(args.records, index=False)
        print(f"wrote {args.records}")
