"""Warm-start (SFT) speed: `agpo-lab warmstart`'s loop against TRL 1.16's SFTTrainer, on CPU.

Both sides fine-tune the same model folder with LoRA (r = 16, alpha 32, every linear layer, no
dropout) on the same stream of (prompt, worked solution) pairs that `agpo-lab warmstart` trains on
(`experiments.warmstart.sft_examples`: step k's batch is a pure function of (seed, k)), with the
same batch size, AdamW, learning rate and gradient clipping; the loss is the completion tokens'
mean negative log-likelihood on both (TRL: a prompt-completion dataset, `completion_only_loss`).
Ours computes each batch through the update's padding-free pass; TRL pads each batch to its
longest row (its default; `--trl-padding-free` turns on its `padding_free`, which on CPU falls back
to the sdpa attention with restarting position ids).

Each side runs in a fresh subprocess, one after the other. A step is timed end to end; the first
`--warmup` steps are excluded and the median of the rest reported, as tokens per second, where
tokens are the real prompt + completion tokens of the step (the same count for both sides, padding
not counted), and as a share of the machine's FLOP limit (flop_limit.py: forward + backward of the
frozen base under LoRA, 4 x Linear weights FLOPs per token, at the float32 matmul rate measured in
the same run).

    python benchmarks/bench_warmstart.py [--model smollm2-135m-instruct] [--steps 4] [--warmup 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))  # flop_limit beside this script


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="a fetched model or folder")
    p.add_argument("--steps", type=int, default=4, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps at the start")
    p.add_argument("--batch-size", type=int, default=16, help="worked solutions per step")
    p.add_argument("--trl-padding-free", action="store_true", help="TRL: padding_free=True")
    p.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)  # worker mode
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("need --steps >= 1, --warmup >= 0, --batch-size >= 1")
    return args


def warm_config(args: argparse.Namespace):
    from agpo_lab.config import WarmStartConfig

    return WarmStartConfig(
        base_model=args.model,
        steps=args.warmup + args.steps,
        batch_size=args.batch_size,
        warmup_steps=0,
        save_every=10**6,
        docs_dir=None,
    )


def batches(args: argparse.Namespace, tokenizer) -> list[list[tuple[str, str]]]:
    """The (prompt, completion) pairs of every step, as `agpo-lab warmstart` draws them."""
    from agpo_lab.experiments.warmstart import sft_examples
    from agpo_lab.tasks.word_arithmetic import WordArithmeticTask

    cfg, task = warm_config(args), WordArithmeticTask(levels=[1, 2, 3])
    return [sft_examples(cfg, step, task, tokenizer) for step in range(cfg.steps)]


def step_tokens(pairs: list[tuple[str, str]], tokenizer) -> int:
    """Real prompt + completion tokens of one step (the completion's end-of-turn token included)."""
    from agpo_lab.experiments.warmstart import sft_tensors

    _, prompt_mask, _, completion_mask = sft_tensors(pairs, tokenizer)
    return int(prompt_mask.sum() + completion_mask.sum())


def limits(model) -> dict:
    from flop_limit import linear_weights, matmul_gflops

    return {"gflops": matmul_gflops(), "linear_weights": linear_weights(model)}


def run_ours(args: argparse.Namespace, scratch: Path) -> dict:
    """`experiments.warmstart.train_warm_start` itself, on a scratch staging folder."""
    import torch

    from agpo_lab.experiments.warmstart import STATE_FILE, train_warm_start

    cfg = warm_config(args)
    model, tokenizer, _ = train_warm_start(cfg, scratch, progress=False)
    log = torch.load(scratch / STATE_FILE, weights_only=True)["log"]
    return {
        **limits(model),
        "step_seconds": [row["seconds"] for row in log],
        "tokens": [row["tokens"] for row in log],
        "loss": [row["loss"] for row in log],
    }


def run_trl(args: argparse.Namespace, scratch: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from agpo_lab.models.loading import load_tokenizer, resolve_model_path

    folder = resolve_model_path(args.model)
    tokenizer = load_tokenizer(folder)
    steps = batches(args, tokenizer)
    pairs = [pair for step in steps for pair in step]
    dataset = Dataset.from_dict(
        {"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]}
    )
    cfg = warm_config(args)
    config = SFTConfig(
        output_dir=str(scratch / "trl"),
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=cfg.steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_beta2=0.95,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        completion_only_loss=True,
        padding_free=args.trl_padding_free,
        max_length=None,
        seed=cfg.seed,
        dataloader_num_workers=0,
        data_seed=cfg.seed,
    )
    walls: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            walls.append(time.perf_counter())

    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")  # fmt: skip
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[Clock()],
    )
    # Sequential batches, so that step k sees the pairs our step k sees.
    trainer._get_train_sampler = lambda *_, **__: None
    walls.append(time.perf_counter())
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return {
        **limits(trainer.model),
        "step_seconds": [b - a for a, b in zip(walls, walls[1:])],
        "tokens": [step_tokens(step, tokenizer) for step in steps],
        "loss": losses,
    }


def summarize(result: dict, warmup: int) -> dict:
    seconds, tokens = result["step_seconds"][warmup:], result["tokens"][warmup:]
    tokens_per_s = sum(tokens) / sum(seconds)
    bound = result["gflops"] * 1e9 / (4 * result["linear_weights"])  # LoRA: fwd + activation bwd
    return {
        "median_step_s": statistics.median(seconds),
        "tokens_per_step": statistics.mean(tokens),
        "tokens_per_s": tokens_per_s,
        "percent_of_limit": 100 * tokens_per_s / bound,
        "loss": statistics.mean(result["loss"][warmup:])
        if result["loss"][warmup:]
        else float("nan"),
        "max_rss_mb": result["max_rss_mb"],
        "gflops": result["gflops"],
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.side:
        scratch = Path(args.result).parent / args.side
        result = run_ours(args, scratch) if args.side == "ours" else run_trl(args, scratch)
        result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        Path(args.result).write_text(json.dumps(result))
        return
    common = [f"--model={args.model}", f"--steps={args.steps}", f"--warmup={args.warmup}",
              f"--batch-size={args.batch_size}",
              *(["--trl-padding-free"] if args.trl_padding_free else [])]  # fmt: skip
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_warmstart_") as scratch_name:
        for side in ("ours", "trl"):
            print(f"{side} ...", flush=True)
            result_file = Path(scratch_name) / f"{side}.json"
            (Path(scratch_name) / side).mkdir()
            cmd = [sys.executable, __file__, f"--side={side}", f"--result={result_file}", *common]
            done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
                raise SystemExit(f"bench_warmstart: the {side} worker failed")
            results[side] = summarize(json.loads(result_file.read_text()), args.warmup)
    ours, trl = results["ours"], results["trl"]
    print(
        f"\nmodel: {args.model} (LoRA r=16 on every linear layer); {args.batch_size} worked "
        f"solutions per step, {args.steps} timed steps after {args.warmup} warm-up; TRL "
        f"{'padding_free' if args.trl_padding_free else 'padded batches'}"
    )
    print(f"\n{'':28s} {'agpo_lab':>10s} {'TRL SFT':>10s} {'ours/TRL':>9s}")
    rows = [("median step seconds", "median_step_s", "{:.2f}"),
            ("tokens per step (real)", "tokens_per_step", "{:.0f}"),
            ("tokens per second", "tokens_per_s", "{:.0f}"),
            ("% of the FLOP limit", "percent_of_limit", "{:.0f}"),
            ("mean loss (timed steps)", "loss", "{:.3f}"),
            ("peak RSS (MiB)", "max_rss_mb", "{:.0f}")]  # fmt: skip
    for label, key, fmt in rows:
        ratio = f"{ours[key] / trl[key]:.2f}x" if trl[key] and key != "loss" else "-"
        print(f"{label:28s} {fmt.format(ours[key]):>10s} {fmt.format(trl[key]):>10s} {ratio:>9s}")
    gflops = max(ours["gflops"], trl["gflops"])
    print(f"\nmachine limit: dense float32 matmul {gflops:.1f} GFLOP/s (measured in this run)")
    print(f"ratio tokens/s ours/TRL: {ours['tokens_per_s'] / trl['tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
