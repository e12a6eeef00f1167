"""Where the time goes: a profile of our rollout or of one RL step, the figures behind the "Where
the time goes" section of benchmarks/README.md.

    python benchmarks/profile_step.py rollout [--model embedded] [--case forced|early] [--compile]
    python benchmarks/profile_step.py step [--beta 0.04] [--micro-batch-tokens 2048] [--compile]
        [--model smollm2-135m-instruct --lora --bf16 [--bf16-activations]]
    python benchmarks/profile_step.py update [the step options] [--steps 4]

`rollout` times `agpo_lab.rollout.generate` on the benchmark batch of bench_rollout.py (the same
prompts, the same EOS handling per case), splits a rollout's wall time into the one-token forward,
the sampling and the KV-cache row selection, and prints torch.profiler's operator table. `step`
does the same for one RL step of the trainer (bench_trainer.py's set-up on the embedded model):
rollout and update seconds, then the operator table of one step. `update` times the update alone,
repeated on one rollout's batch with lr 0 (the same passes every time), the measure to compare two
settings of the update by, run one after the other. A profile, not a benchmark: nothing is
compared, and the profiler itself adds overhead to every operator.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def timed(totals: dict[str, float], name: str, function: Callable) -> Callable:
    """`function`, adding its wall time to totals[name] on every call."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start

    return wrapper


def operator_table(run: Callable[[], object], rows: int) -> str:
    """torch.profiler's table of the operators `run` calls, by their own CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def profile_rollout(args: argparse.Namespace) -> None:
    from bench_rollout import benchmark_prompts, build_model, early_stop_bias, set_eos_bias

    import agpo_lab.rollout.decode as decode
    from agpo_lab.config import RolloutConfig
    from agpo_lab.rollout.kv_cache import DecodeCache, PreallocatedLayer

    model, tokenizer = build_model(args.model, "cpu")
    eos = tokenizer.eos_token_id
    if args.case == "forced":
        set_eos_bias(model, eos, -1e9)
    elif args.model in (None, "random"):  # a random model needs help to stop, as in bench_rollout
        set_eos_bias(model, eos, early_stop_bias(len(tokenizer), args.max_new_tokens / 3))
    prompts = benchmark_prompts(tokenizer, args.batch)
    cfg = RolloutConfig(max_new_tokens=args.max_new_tokens, compile_decode=args.compile)
    totals = {"forward": 0.0, "sampling": 0.0, "cache row selection": 0.0}
    # FastDecoder compiles inside _fast_forward, so timing it from outside is right either way;
    # the transformers forward is compiled around _forward, so time the compiled function instead.
    compiled = decode.compiled
    decode.compiled = lambda forward: timed(totals, "forward", compiled(forward))
    decode._fast_forward = timed(totals, "forward", decode._fast_forward)
    if not args.compile:
        decode._forward = timed(totals, "forward", decode._forward)
    decode.sample_next_token = timed(totals, "sampling", decode.sample_next_token)
    for cache in (DecodeCache, PreallocatedLayer):
        cache.batch_select_indices = timed(
            totals, "cache row selection", cache.batch_select_indices
        )

    def rollout(seed: int):
        return decode.generate(
            model, tokenizer, prompts, cfg, generator=torch.Generator().manual_seed(seed)
        )

    rollout(0)  # warm-up (and the compile)
    for key in totals:
        totals[key] = 0.0
    start = time.perf_counter()
    out = rollout(1)
    wall = time.perf_counter() - start
    tokens = int(out.lengths.sum())
    print(
        f"rollout: {args.model or 'random'}, batch {args.batch}, {args.max_new_tokens} new tokens, "
        f"{args.case}, compile_decode={args.compile}, {torch.get_num_threads()} threads"
    )
    print(f"wall {wall * 1000:.0f} ms for {tokens} tokens ({tokens / wall:.0f} tokens/s)")
    for name, seconds in totals.items():  # under compile the forward includes the compiled call
        print(f"  {name:<20} {seconds * 1000:8.1f} ms  {100 * seconds / wall:5.1f}%")
    rest = wall - sum(totals.values())
    print(f"  {'prefill and the rest':<20} {rest * 1000:8.1f} ms  {100 * rest / wall:5.1f}%")
    print(operator_table(lambda: rollout(2), args.rows))


def build_trainer(args: argparse.Namespace, lr: float = 1e-5):
    """(trainer, task name) of `step` and `update`: 8 prompts x G=8 on --model."""
    from transformers import AutoModelForCausalLM

    from agpo_lab.config import TrainConfig
    from agpo_lab.models.loading import load_tokenizer, resolve_model_path
    from agpo_lab.training.trainer import Trainer

    folder = resolve_model_path(args.model or "embedded")
    tokenizer = load_tokenizer(folder)
    # --base-bf16: the weights in bfloat16 (model.dtype), peft keeps the adapters in float32
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=torch.bfloat16 if args.base_bf16 else torch.float32,
        attn_implementation=args.attn,
    )
    if args.lora:  # the adapters bench_trainer.py --lora trains
        from bench_trainer import lora_config
        from peft import get_peft_model

        model = get_peft_model(model, lora_config())
    precision = "bfloat16" if args.bf16 else "model"
    # bench_trainer.py's prompts: in words with the chat template where the model has one
    task = "word_arithmetic" if getattr(tokenizer, "chat_template", None) else "arithmetic"
    config = TrainConfig.from_dict(
        {
            "task": {"name": task, "seed": 0},
            "model": {"lora": args.lora, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                      "dtype": "bfloat16" if args.base_bf16 else "float32",
                      "attn_implementation": args.attn},
            "rollout": {"group_size": 8, "max_new_tokens": 64, "temperature": 1.0,
                        "compile_decode": args.compile, "precision": precision},
            "algorithm": {"estimator": "grpo", "zero_variance": "keep", "length_reward": "none",
                          "beta": args.beta, "aggregation": "seq_mean_token_mean", "mu": 1},
            "optim": {"lr": lr, "warmup_steps": 0,
                      "micro_batch_tokens": args.micro_batch_tokens or None,
                      "compile_update": args.compile, "precision": precision,
                      "lowered_activations": args.bf16_activations},
            "run": {"steps": 100, "prompts_per_step": 8, "seed": 0, "eval_every": 0,
                    "save_every": 0, "log_samples_every": 0, "device": "cpu",
                    "out_dir": tempfile.mkdtemp(prefix="profile_step_")},
        }
    )  # fmt: skip
    return Trainer(config, model=model, tokenizer=tokenizer), task


def profile_train_step(args: argparse.Namespace) -> None:
    trainer, task = build_trainer(args)
    for _ in range(3 if args.compile else 2):  # warm-up (and the compiles)
        trainer.train_step()
    totals = {"rollout": 0.0, "update": 0.0}
    trainer._rollout = timed(totals, "rollout", trainer._rollout)
    trainer._update = timed(totals, "update", trainer._update)
    steps, start = args.steps, time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    wall = (time.perf_counter() - start) / steps
    print(
        f"RL step: {args.model or 'embedded'} on {task}, 8 prompts x G=8, 64 new tokens, "
        f"beta {args.beta}, "
        f"micro_batch_tokens {args.micro_batch_tokens or None}, compiled {args.compile}, "
        f"LoRA {args.lora}, weights in {'bfloat16' if args.base_bf16 else 'float32'}, "
        f"rollout and update in {'bfloat16' if args.bf16 or args.base_bf16 else 'float32'}, "
        f"{args.attn} attention, {torch.get_num_threads()} threads"
    )
    print(f"mean step {wall:.3f} s over {steps} steps")
    for name, seconds in totals.items():
        print(f"  {name:<8} {seconds / steps:.3f} s  {100 * seconds / steps / wall:5.1f}%")
    if args.rows > 0:
        print(operator_table(trainer.train_step, args.rows))


def profile_update(args: argparse.Namespace) -> None:
    """The update alone, timed again and again on one rollout's batch: with lr 0 the weights never
    move, so every repeat computes the same passes (a rollout's varying lengths out of the way)."""
    import copy

    trainer, task = build_trainer(args, lr=0.0)
    G, prompts = trainer.cfg.rollout.group_size, trainer.cfg.run.prompts_per_step
    batch, _ = trainer._rollout(trainer.problems[:prompts])
    seconds, metrics = [], {}
    for _ in range(1 + args.steps):  # the first repeat warms up
        start = time.perf_counter()
        metrics = trainer._update(copy.deepcopy(batch))
        seconds.append(time.perf_counter() - start)
    print(
        f"update: {args.model or 'embedded'} on {task}, {prompts} prompts x G={G}, "
        f"beta {args.beta}, micro_batch_tokens {args.micro_batch_tokens or None}, LoRA {args.lora}, "
        f"{'bfloat16' if args.bf16 else 'float32'}"
        f"{' (bfloat16 activations)' if args.bf16_activations else ''}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"update tokens {metrics['perf/update_tokens']:.0f} "
          f"({metrics['perf/update_padded_tokens']:.0f} with padding)")  # fmt: skip
    print("seconds per update: " + ", ".join(f"{t:.2f}" for t in seconds) + " (first: warm-up)")
    timed = sorted(seconds[1:])
    print(f"median {timed[len(timed) // 2]:.3f} s, min {timed[0]:.3f} s over {len(timed)} repeats")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["rollout", "step", "update"])
    parser.add_argument("--model", default="embedded",
                        help="embedded, random (rollout only), a fetched model's name or a folder")  # fmt: skip
    parser.add_argument("--batch", type=int, default=64, help="rollout: rows")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="rollout: new tokens")
    parser.add_argument("--case", choices=["forced", "early"], default="forced",
                        help="rollout: every row to the limit, or rows stop at EOS")  # fmt: skip
    parser.add_argument(
        "--compile",
        action="store_true",
        help="rollout: compile_decode; step: compile_decode and compile_update",
    )
    parser.add_argument("--beta", type=float, default=0.04, help="step: KL weight")
    parser.add_argument("--micro-batch-tokens", type=int, default=2048,
                        help="step: optim.micro_batch_tokens (0: one pass)")  # fmt: skip
    parser.add_argument("--lora", action="store_true",
                        help="step: train LoRA adapters (r=16, every linear layer), as --lora of "
                        "bench_trainer.py")  # fmt: skip
    parser.add_argument("--bf16", action="store_true",
                        help="step: rollout.precision and optim.precision bfloat16")  # fmt: skip
    parser.add_argument("--bf16-activations", action="store_true",
                        help="step, update: with --bf16, optim.lowered_activations=true")  # fmt: skip
    parser.add_argument("--base-bf16", action="store_true",
                        help="step: the model's weights in bfloat16 (model.dtype); with --lora "
                        "the adapters stay float32, as peft keeps them")  # fmt: skip
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                        help="step: model.attn_implementation")  # fmt: skip
    parser.add_argument("--steps", type=int, default=4,
                        help="step: timed steps (after 2 warm-up); update: timed repeats (after 1)")  # fmt: skip
    parser.add_argument(
        "--rows", type=int, default=15, help="operators shown (0: time the steps, no profile)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.model == "random":
        args.model = None
    if args.bf16_activations and not args.bf16:
        parser.error("--bf16-activations needs --bf16")
    run = {"rollout": profile_rollout, "step": profile_train_step, "update": profile_update}
    run[args.what](args)


if __name__ == "__main__":
    main()
