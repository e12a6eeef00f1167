"""RL step time and peak memory: agpo_lab's trainer against TRL 1.16's GRPOTrainer, on CPU.

Both sides train the identical tiny model (one folder, loaded by each side: same initial weights)
on the ArithmeticTask train prompts, with the same group size G, prompts per step, max new tokens,
beta, learning rate, loss type ("grpo": per-sequence token mean, group-std advantages), sampling
temperature 1.0, and exactly one optimizer step per generation batch (mu = 1, no accumulation).
Each side runs in a fresh subprocess, one after the other, so its peak RSS (resource.getrusage)
is its own and the two never compete for the CPU.

A step is timed end to end, from one step's end to the next (generation, reward, forward/backward,
optimizer, metrics): the first `--warmup` steps are excluded and the median of the rest reported.
Step time depends on how many tokens were generated, so tokens per step and seconds per generated
token are printed too, and process CPU seconds per step (less sensitive to other load on a
shared machine than wall time). `--rounds N` runs the sides N times, alternating, and pools the
timed steps, so slow drifts in background load hit both sides alike.

    python benchmarks/bench_trainer.py              # defaults: 8 prompts x G=8, 64 new tokens
    python benchmarks/bench_trainer.py --rounds 3   # steadier figures on a busy machine
    python benchmarks/bench_trainer.py --quick      # smallest settings (smoke test)
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
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8, help="timed steps per side (after warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start")
    p.add_argument("--rounds", type=int, default=1, help="fresh runs per side, alternating")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--beta", type=float, default=0.0, help="KL weight (> 0 keeps a reference model)"
    )
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="sampling temperature of both sides (lower: more reward signal from a weak model)",
    )
    p.add_argument(
        "--micro-batch-tokens",
        type=int,
        default=None,
        help="ours: optim.micro_batch_tokens, the update's token budget per pass (bounds its peak "
        "memory); default: what our recipes set, 2048 on the embedded or random model (configs/"
        "reproduce.yaml), 512 on a real one (configs/smollm2); 0: the whole batch in one pass",
    )
    p.add_argument(
        "--model",
        default="embedded",
        help="'embedded' (data/embedded; falls back to 'random' if absent), 'random' (a tiny Qwen2 "
        "built from a config, seed 0), a fetched model's name (smollm2-135m-instruct) or a folder",
    )
    p.add_argument(
        "--lora",
        action="store_true",
        help="both sides train LoRA adapters (r=16, alpha=32, every linear layer) instead of all "
        "weights",
    )
    p.add_argument(
        "--task",
        choices=["auto", "arithmetic", "word_arithmetic"],
        default="auto",
        help="prompts and reward: auto = word_arithmetic (chat template) when the tokenizer has "
        "a chat template, else arithmetic",
    )
    p.add_argument("--hidden", type=int, default=128, help="hidden size of the 'random' model")
    p.add_argument("--layers", type=int, default=2, help="layers of the 'random' model")
    p.add_argument(
        "--quick", action="store_true", help="smallest settings: 2 prompts, G=2, 8 tokens"
    )
    p.add_argument(
        "--compile-decode",
        action="store_true",
        help="ours: rollout.compile_decode=true (torch.compile of the decode step; its compile "
        "time falls in the warm-up steps)",
    )
    p.add_argument(
        "--compile-update",
        action="store_true",
        help="ours: optim.compile_update=true (torch.compile of the update's forward/backward)",
    )
    p.add_argument(
        "--rollout-bf16",
        action="store_true",
        help="ours: rollout.precision=bfloat16 (bfloat16 copies of the weights for sampling, the "
        "loss corrected by truncated importance sampling)",
    )
    p.add_argument(
        "--update-bf16",
        action="store_true",
        help="ours: optim.precision=bfloat16 (the update's and the reference's passes under "
        "bfloat16 autocast; float32 weights, gradients and AdamW state)",
    )
    p.add_argument(
        "--update-bf16-activations",
        action="store_true",
        help="ours, with --update-bf16: optim.lowered_activations=true (the residual stream and "
        "frozen norms in bfloat16 too, as FSDP's param_dtype=bfloat16)",
    )
    p.add_argument(
        "--trl-bf16",
        action="store_true",
        help="TRL: bf16=True (its training passes under bfloat16 autocast), the like-for-like "
        "baseline of --update-bf16",
    )
    p.add_argument(
        "--no-pack-rows",
        dest="pack_rows",
        action="store_false",
        help="ours: optim.pack_rows=false (no padding-free passes; for an A/B of that option)",
    )
    p.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)  # worker mode
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.prompts, args.group_size = 2, 1, 2, 2
        args.max_new_tokens = 8
    if min(args.steps, args.rounds, args.prompts) < 1 or args.warmup < 0 or args.group_size < 2:
        p.error("need --steps, --rounds, --prompts >= 1, --warmup >= 0, --group-size >= 2")
    if args.update_bf16_activations and not args.update_bf16:
        p.error("--update-bf16-activations needs --update-bf16")
    return args


def prepare_model_dir(args: argparse.Namespace, scratch: Path) -> tuple[Path, str]:
    """The folder both sides load, and a one-line description of the model."""
    from agpo_lab.models import EMBEDDED_MODEL_DIR

    if args.model == "embedded" and (EMBEDDED_MODEL_DIR / "config.json").is_file():
        return EMBEDDED_MODEL_DIR, f"embedded ({EMBEDDED_MODEL_DIR})"
    if args.model not in ("embedded", "random"):
        from agpo_lab.errors import AgpoLabError
        from agpo_lab.models.loading import resolve_model_path

        try:
            folder = Path(resolve_model_path(args.model))
        except AgpoLabError as err:
            raise SystemExit(f"bench_trainer: error: {err}") from None
        return folder, f"{args.model} ({folder})"

    from agpo_lab.models.tiny import build_tiny_causal_lm
    from agpo_lab.models.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(
        tokenizer,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=4,
        num_kv_heads=4,
        intermediate_size=4 * args.hidden,
        max_position_embeddings=512,
    )
    folder = scratch / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    n_params = sum(p.numel() for p in model.parameters())
    return (
        folder,
        f"random Qwen2 h{args.hidden} x{args.layers} layers ({n_params / 1e6:.2f} M params)",
    )


class StepClock:
    """Wall and process-CPU time at the end of every step (CPU time counts all threads)."""

    def __init__(self) -> None:
        self.walls, self.cpus = [time.perf_counter()], [time.process_time()]

    def tick(self, *_: object, **__: object) -> None:
        self.walls.append(time.perf_counter())
        self.cpus.append(time.process_time())

    def durations(self) -> dict[str, list[float]]:
        """Per-step seconds: [t1 - t0, t2 - t1, ...] for the wall and the CPU clock."""

        def diff(xs: list[float]) -> list[float]:
            return [b - a for a, b in zip(xs, xs[1:])]

        return {"step_seconds": diff(self.walls), "cpu_seconds": diff(self.cpus)}


class GenerateTimer:
    """Seconds per step spent inside `model.generate` (TRL's sampling), by wrapping the method of
    this model instance (peft's wrappers call it once per generation)."""

    def __init__(self, model) -> None:
        self.total, self.at_tick, self.per_step, self.started = 0.0, 0.0, [], False
        generate = model.generate

        def timed_generate(*args, **kwargs):
            start = time.perf_counter()
            try:
                return generate(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - start

        model.generate = timed_generate

    def tick(self) -> None:
        """End of a step (the first call, before training, only sets the start)."""
        if self.started:
            self.per_step.append(self.total - self.at_tick)
        self.started, self.at_tick = True, self.total


def task_name(args: argparse.Namespace, tokenizer) -> str:
    """The task both sides train on (`--task`; auto: word_arithmetic for a chat model)."""
    if args.task != "auto":
        return args.task
    return "word_arithmetic" if getattr(tokenizer, "chat_template", None) else "arithmetic"


def lora_config():
    """The adapters both sides train with --lora (peft's LoraConfig, the same object type)."""
    from peft import LoraConfig

    return LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )


def limit_inputs(args: argparse.Namespace, model, tokenizer, task) -> dict:
    """What the FLOP limit needs, measured in this worker: matmul GFLOP/s at this process's
    thread count, the model's Linear weights, and the mean prompt length in tokens."""
    from flop_limit import linear_weights, matmul_gflops

    prompts = [task.format_prompt(p, tokenizer) for p in task.problems("train")[:200]]
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    import torch

    return {
        "gflops": matmul_gflops(),
        "gflops_bf16": matmul_gflops(dtype=torch.bfloat16),
        "linear_weights": linear_weights(model),
        "prompt_tokens": sum(lengths) / len(lengths),
    }


# ----------------------------------------------------------------------------- TRL side
def run_trl(args: argparse.Namespace, out_dir: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from agpo_lab.config import TaskConfig
    from agpo_lab.models.loading import load_tokenizer
    from agpo_lab.tasks.registry import build_task

    tokenizer = load_tokenizer(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir)
    task = build_task(TaskConfig(name=task_name(args, tokenizer), seed=0))
    problems = task.problems("train")
    dataset = Dataset.from_dict(
        {
            "prompt": [task.format_prompt(p, tokenizer) for p in problems],
            "problem_index": list(range(len(problems))),
        }
    )

    def correctness(completions: list[str], problem_index: list[int], **_: object) -> list[float]:
        return [task.score(c, problems[i]) for c, i in zip(completions, problem_index)]

    config = GRPOConfig(
        output_dir=str(out_dir / "trl"),
        use_cpu=True,
        bf16=args.trl_bf16,
        fp16=False,
        report_to="none",
        per_device_train_batch_size=args.prompts * args.group_size,
        gradient_accumulation_steps=1,
        num_generations=args.group_size,
        num_iterations=1,
        max_completion_length=args.max_new_tokens,
        max_steps=args.warmup + args.steps,
        logging_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        save_strategy="no",
        beta=args.beta,
        loss_type="grpo",
        scale_rewards="group",
        epsilon=0.2,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        disable_dropout=True,
        seed=0,
        dataloader_num_workers=0,
    )
    clock, generating = StepClock(), GenerateTimer(model)

    class OnStepEnd(TrainerCallback):
        def on_step_end(self, *_, **__):
            clock.tick()
            generating.tick()

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=correctness,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[OnStepEnd()],
        peft_config=lora_config() if args.lora else None,
    )
    limits = limit_inputs(args, trainer.model, tokenizer, task)
    clock.__init__()  # start the clocks after setup
    generating.tick()
    trainer.train()
    logs = [log for log in trainer.state.log_history if "completions/mean_length" in log]
    completions = args.prompts * args.group_size
    return {
        **limits,
        **clock.durations(),
        "tokens_per_step": [log["completions/mean_length"] * completions for log in logs],
        "reward": [log.get("reward", float("nan")) for log in logs],
        "rollout_seconds": generating.per_step,
    }


# ----------------------------------------------------------------------------- our side
def run_ours(args: argparse.Namespace, out_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from agpo_lab.config import TrainConfig
    from agpo_lab.models.loading import load_tokenizer
    from agpo_lab.training.trainer import Trainer

    tokenizer = load_tokenizer(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir)  # loaded as TRL loads it
    if args.lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config())
    config = TrainConfig.from_dict(
        {
            "task": {"name": task_name(args, tokenizer), "seed": 0},
            "model": {"lora": args.lora, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0},
            "rollout": {"group_size": args.group_size, "max_new_tokens": args.max_new_tokens,
                        "temperature": args.temperature, "top_p": 1.0, "top_k": 0,
                        "compile_decode": args.compile_decode,
                        "precision": "bfloat16" if args.rollout_bf16 else "model"},
            # TRL's loss_type="grpo": group std (Bessel) + 1e-4, per-sequence token mean, clip 0.2
            "algorithm": {"estimator": "grpo", "zero_variance": "keep", "length_reward": "none",
                          "std": "bessel", "eps": 1e-4, "clip_low": 0.2, "clip_high": 0.2,
                          "beta": args.beta, "aggregation": "seq_mean_token_mean", "mu": 1},
            "optim": {"lr": args.lr, "warmup_steps": 0, "max_grad_norm": 1.0,
                      "mini_batch_size": None, "grad_accumulation": 1,
                      "micro_batch_tokens": args.micro_batch_tokens,
                      "compile_update": args.compile_update, "pack_rows": args.pack_rows,
                      "precision": "bfloat16" if args.update_bf16 else "model",
                      "lowered_activations": args.update_bf16_activations},
            "run": {"steps": args.warmup + args.steps, "prompts_per_step": args.prompts,
                    "seed": 0, "out_dir": str(out_dir), "name": Path(args.result).stem, "eval_every": 0,
                    "save_every": 0, "log_samples_every": 0, "device": "cpu"},
        }
    )  # fmt: skip
    trainer = Trainer(config, model=model, tokenizer=tokenizer)
    limits = limit_inputs(args, trainer.policy, trainer.tokenizer, trainer.task)
    clock = StepClock()
    logged = trainer.train(callback=clock.tick)
    completions = args.prompts * args.group_size
    return {
        **limits,
        **clock.durations(),
        "tokens_per_step": [m["length/mean"] * completions for m in logged],
        "reward": [m["reward/mean"] for m in logged],
        "rollout_seconds": [m["perf/rollout_seconds"] for m in logged],
        "update_tokens": [m["perf/update_tokens"] for m in logged],
        "update_padded_tokens": [m["perf/update_padded_tokens"] for m in logged],
    }


# ----------------------------------------------------------------------------- report
def worker(args: argparse.Namespace) -> None:
    out_dir = Path(args.result).parent
    result = run_trl(args, out_dir) if args.side == "trl" else run_ours(args, out_dir)
    result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    Path(args.result).write_text(json.dumps(result))


def summarize(rounds: list[dict], warmup: int) -> dict[str, float]:
    """Medians over the timed steps of all rounds (warm-up steps of each round dropped)."""
    seconds = [x for r in rounds for x in r["step_seconds"][warmup:]]
    cpu = [x for r in rounds for x in r["cpu_seconds"][warmup:]]
    tokens = [x for r in rounds for x in r["tokens_per_step"][warmup:]]
    first = rounds[0]
    update = [x for r in rounds for x in r.get("update_tokens", [])[warmup:]]
    padded = [x for r in rounds for x in r.get("update_padded_tokens", [])[warmup:]]
    return {
        "gflops": max(r["gflops"] for r in rounds),
        "gflops_bf16": max(r["gflops_bf16"] for r in rounds),
        "linear_weights": first["linear_weights"],
        "prompt_tokens": first["prompt_tokens"],
        "median_step_s": statistics.median(seconds),
        "median_cpu_s": statistics.median(cpu),
        "tokens_per_step": statistics.mean(tokens),
        # TRL computes every row; ours skips rows whose gradient is exactly 0
        "update_tokens": statistics.mean(update) if update else None,
        "update_padded_tokens": statistics.mean(padded) if padded else None,
        "ms_per_token": 1000 * sum(seconds) / max(sum(tokens), 1e-9),
        "max_rss_mb": max(r["max_rss_mb"] for r in rounds),
        "reward": statistics.mean(x for r in rounds for x in r["reward"][warmup:]),
        "mean_step_s": statistics.mean(seconds),
        "mean_rollout_s": statistics.mean(x for r in rounds for x in r["rollout_seconds"][warmup:]),
    }


def step_target(args: argparse.Namespace) -> float:
    """The speed issues' ceilings for ours / TRL: on the small embedded (or random) model 0.33
    without a KL term, 0.5 with one; on a real model 0.2 without one, 0.25 with one."""
    if args.model in ("embedded", "random"):
        return 0.33 if args.beta == 0 else 0.5
    return 0.2 if args.beta == 0 else 0.25


def print_report(args: argparse.Namespace, model_desc: str, ours: dict, trl: dict) -> None:
    rows = [
        ("median step seconds (wall)", "median_step_s", "{:.3f}"),
        ("median step CPU seconds", "median_cpu_s", "{:.3f}"),
        ("generated tokens per step", "tokens_per_step", "{:.0f}"),
        ("ms per generated token", "ms_per_token", "{:.3f}"),
        ("peak RSS (MiB)", "max_rss_mb", "{:.0f}"),
        ("mean reward (timed steps)", "reward", "{:.3f}"),
    ]
    print(f"\nmodel: {model_desc}{' (LoRA r=16 on every linear layer)' if args.lora else ''}")
    print(
        f"setup: {args.prompts} prompts x G={args.group_size}, max_new_tokens={args.max_new_tokens}, "
        f"beta={args.beta}, loss=grpo, mu=1, temperature {args.temperature}, ours "
        f"micro_batch_tokens={args.micro_batch_tokens}, {precision_text(args)}, CPU "
        f"({torch_threads()} torch threads); "
        f"{args.rounds} round(s) of {args.steps} timed steps after {args.warmup} warm-up"
    )
    print(f"\n{'':28s} {'agpo_lab':>10s} {'TRL 1.16':>10s} {'ours/TRL':>9s}")
    for label, key, fmt in rows:
        ratio = f"{ours[key] / trl[key]:.2f}x" if trl[key] and key != "reward" else "-"
        ours_text, trl_text = fmt.format(ours[key]), fmt.format(trl[key])
        print(f"{label:28s} {ours_text:>10s} {trl_text:>10s} {ratio:>9s}")
    print_split(args, ours, trl)
    if ours["update_tokens"] is not None:
        all_tokens = (
            args.prompts * args.group_size * ours["prompt_tokens"] + ours["tokens_per_step"]
        )
        print(
            f"(ours: the update computed {ours['update_tokens']:.0f} of about {all_tokens:.0f} "
            "prompt + completion tokens per step (the prompts' mean length x rows + generated), "
            f"{ours['update_padded_tokens']:.0f} with padding: rows whose gradient is exactly 0 "
            "are skipped, a pass shares a group's prompt or packs rows without padding where "
            "that computes fewer tokens)"
        )
    print()
    gflops = max(ours["gflops"], trl["gflops"])
    bf16 = max(ours["gflops_bf16"], trl["gflops_bf16"])
    print(
        f"machine limit: dense matmul {gflops:.1f} GFLOP/s float32, {bf16:.1f} bfloat16 (measured "
        "in this run; each part of a step is held to the rate of the format it computes in);"
    )
    print(
        f"model Linear weights {ours['linear_weights'] / 1e6:.1f} M, prompt "
        f"{ours['prompt_tokens']:.0f} tokens"
    )
    formats = {  # (sampling, the rest) in bfloat16?
        "agpo_lab": (args.rollout_bf16, args.update_bf16),
        "TRL 1.16": (False, args.trl_bf16),
    }
    for name, side in (("agpo_lab", ours), ("TRL 1.16", trl)):
        rates = [bf16 if low else gflops for low in formats[name]]
        sampling, rest = flop_bound_seconds(args, side, *rates)
        measured_rest = side["mean_step_s"] - side["mean_rollout_s"]
        print(
            f"  {name}: FLOP-bound step {sampling + rest:.2f} s for its tokens -> "
            f"{100 * (sampling + rest) / side['median_step_s']:.0f}% of the limit (sampling "
            f"{100 * sampling / side['mean_rollout_s']:.0f}%, the rest "
            f"{100 * rest / measured_rest:.0f}%)"
        )
    step_ratio = ours["median_step_s"] / trl["median_step_s"]
    print(f"ratio step time ours/TRL: {step_ratio:.3f} (target <= {step_target(args)})")
    print(f"ratio s/token ours/TRL: {ours['ms_per_token'] / trl['ms_per_token']:.3f}")
    print(
        f"ratio peak memory ours/TRL: {ours['max_rss_mb'] / trl['max_rss_mb']:.3f} (target <= 1.0)"
    )


def print_split(args: argparse.Namespace, ours: dict, trl: dict) -> None:
    """Sampling against the rest of the step (the update, the reference forward, rewards,
    bookkeeping) on each side, and what the ratio would be if our sampling took no time at all:
    the floor that the rest of our step puts under the ratio."""
    for name, side, what in (
        ("agpo_lab", ours, "sampling + rewards"),
        ("TRL 1.16", trl, "model.generate"),
    ):
        rollout, step = side["mean_rollout_s"], side["mean_step_s"]
        print(
            f"({name}: {what} {rollout:.3f} s = {100 * rollout / step:.0f}% of the mean step "
            f"{step:.3f} s; the rest {step - rollout:.3f} s)"
        )
    rest = ours["mean_step_s"] - ours["mean_rollout_s"]
    print(
        f"(ratio if our sampling were free: {rest / trl['mean_step_s']:.2f}; our sampling is "
        f"{trl['mean_rollout_s'] / ours['mean_rollout_s']:.2f}x faster than TRL's model.generate "
        "in these steps)"
    )


def flop_bound_seconds(
    args: argparse.Namespace, side: dict, sampling_gflops: float, rest_gflops: float
) -> tuple[float, float]:
    """Seconds (sampling, the rest) of one step would take if all their matmul FLOPs ran at
    `sampling_gflops` and `rest_gflops` (the rates of the formats they compute in). Sampling: the forward over prompt and generated tokens. The rest: the reference
    forward over the same tokens when beta > 0, and the update's forward + backward (+ weight
    gradients without --lora) over the tokens it computed: all of them for TRL; for ours the rows
    with a non-zero gradient, each pass's distinct prompts once. Sampling counts every row's
    prompt on both sides (ours prefills each distinct prompt once), so it is the work TRL does."""
    rows = args.prompts * args.group_size
    tokens = rows * side["prompt_tokens"] + side["tokens_per_step"]
    update_tokens = tokens if side.get("update_tokens") is None else side["update_tokens"]
    weights = side["linear_weights"]
    sampling = tokens * 2 * weights
    rest = (tokens * 2 * weights if args.beta else 0) + update_tokens * (
        4 if args.lora else 6
    ) * weights
    return sampling / (sampling_gflops * 1e9), rest / (rest_gflops * 1e9)


def precision_text(args: argparse.Namespace) -> str:
    """Which parts of each side compute in bfloat16."""
    ours = [part for part, low in (("rollout", args.rollout_bf16), ("update", args.update_bf16))
            if low]  # fmt: skip
    ours_text = f"ours bf16 {' + '.join(ours)}" if ours else "ours float32"
    if args.update_bf16_activations:
        ours_text += " (bf16 activations)"
    return f"{ours_text}, TRL {'bf16=True' if args.trl_bf16 else 'float32'}"


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def run_worker(side: str, result_file: Path, common: list[str]) -> dict:
    """Run one side in a fresh interpreter; its output is shown only if it fails."""
    cmd = [sys.executable, __file__, f"--side={side}", f"--result={result_file}", *common]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"bench_trainer: the {side} worker failed (exit {done.returncode})")
    return json.loads(result_file.read_text())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.micro_batch_tokens is None and not args.side:
        args.micro_batch_tokens = 2048 if args.model in ("embedded", "random") else 512
    if args.side:
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as scratch_name:
        scratch = Path(scratch_name)
        model_dir, model_desc = prepare_model_dir(args, scratch)
        common = [
            f"--steps={args.steps}", f"--warmup={args.warmup}", f"--prompts={args.prompts}",
            f"--group-size={args.group_size}", f"--max-new-tokens={args.max_new_tokens}",
            f"--beta={args.beta}", f"--lr={args.lr}", f"--model-dir={model_dir}",
            f"--task={args.task}", f"--temperature={args.temperature}",
            *([f"--micro-batch-tokens={args.micro_batch_tokens}"] if args.micro_batch_tokens else []),
            *(["--lora"] if args.lora else []),
            *(["--compile-decode"] if args.compile_decode else []),
            *(["--compile-update"] if args.compile_update else []),
            *([] if args.pack_rows else ["--no-pack-rows"]),
            *(["--rollout-bf16"] if args.rollout_bf16 else []),
            *(["--update-bf16"] if args.update_bf16 else []),
            *(["--update-bf16-activations"] if args.update_bf16_activations else []),
            *(["--trl-bf16"] if args.trl_bf16 else []),
        ]  # fmt: skip
        results: dict[str, list[dict]] = {"ours": [], "trl": []}
        for round_index in range(args.rounds):  # alternate sides so load drift hits both
            for side in ("ours", "trl"):
                print(f"round {round_index + 1}/{args.rounds}: {side} ...", flush=True)
                result_file = scratch / f"{side}{round_index}.json"
                results[side].append(run_worker(side, result_file, common))
    ours, trl = (summarize(results[side], args.warmup) for side in ("ours", "trl"))
    print_report(args, model_desc, ours, trl)


if __name__ == "__main__":
    main()
