"""Rollout speed and memory: `agpo_lab.rollout.generate` against `model.generate`.

Both sample (do_sample=True, same temperature, same max_new_tokens, KV cache on) from the same
model for the same left-padded batch of prompts. Two cases, because a random-init model almost
never emits EOS:

- forced: EOS is made impossible (its logit gets a -1e9 bias in the output layer, identically for
  both), so every row generates exactly max_new_tokens tokens: pure per-token cost.
- early: EOS gets a positive bias so that rows stop after ~max_new_tokens / 3 tokens on average
  (with --model, the model's own EOS behaviour is used instead): the realistic case, where our
  loop drops finished rows from the batch and `model.generate` keeps decoding them as padding.

Ours runs as configured by default (eager, agpo_lab.rollout.fast_decode's lean decode step),
with `RolloutConfig(compile_decode=True)`, whose one-off compile time shows in the "warm-up s"
column (the untimed first run) and not in tokens/s, with `fast_decode=False` (the transformers
forward inside our loop), which shows what the lean step adds, and with `precision="bfloat16"`
(bfloat16 copies of the weights for the rollout; `ours_bf16_hf_forward`: the transformers forward
under bfloat16 autocast instead of the fast decode). `hf_bf16` is `model.generate` on the model cast
to bfloat16, the like-for-like baseline of the latter. The "% limit" column measures each
implementation against the matmul rate of the format it computes in (flop_limit.py).

Each (implementation, case) runs in a fresh subprocess so that peak memory is its own: peak RSS
(`resource.getrusage(...).ru_maxrss`, which includes the ~0.5 GB of torch + transformers imports,
so the "after load" RSS is printed too) on CPU, `torch.cuda.max_memory_allocated` on CUDA.
tokens/s counts generated tokens up to and including EOS, best of --repeats timed runs after a
warm-up; "tok/CPU-s" divides by the process's CPU time instead of wall time, which is steadier on a
machine shared with other jobs. Run: `python benchmarks/bench_rollout.py [--model data/embedded] [--batch 64]`.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))  # flop_limit beside this script
from flop_limit import linear_weights, matmul_gflops, percent_of_limit  # noqa: E402

IMPLS = {
    "ours": "agpo_lab",
    "ours_compiled": "agpo_lab+compile",
    "ours_hf_forward": "agpo_lab, hf fwd",
    "ours_bf16": "agpo_lab bf16",
    "ours_bf16_hf_forward": "agpo_lab bf16, hf",
    "hf": "model.generate",
    "hf_bf16": "generate bf16",
}
BASELINES = ("hf", "hf_bf16")
PROMPTS = ["12+34=", "7*8=", "(5+6)*2=", "99-45=", "3+4*5=", "81/9=", "1+1=", "250-17="]


def build_model(model_path: str | None, device: str, lora: bool = False):
    """The benchmark model and tokenizer: a local model folder, or a ~1M-param random Qwen2;
    with `lora`, a folder's model wrapped in LoRA adapters as the recipes train it (r = 16 on
    every linear layer, B drawn at random so that the adapters change the outputs)."""
    if model_path:
        from agpo_lab.config import ModelConfig
        from agpo_lab.models.loading import load_policy

        cfg = ModelConfig(name_or_path=model_path, dtype="float32", lora=lora, lora_r=16,
                          lora_alpha=32, lora_dropout=0.0)  # fmt: skip
        model, tok = load_policy(cfg, device)
        if lora:
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.copy_(torch.randn(param.shape, generator=gen) * 1e-3)
        return model, tok
    from agpo_lab.models.tiny import build_tiny_causal_lm
    from agpo_lab.models.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    model = build_tiny_causal_lm(
        tok,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
        intermediate_size=512,
        max_position_embeddings=512,
    )
    return model.to(device).eval(), tok


def benchmark_prompts(tokenizer, batch: int) -> list[str]:
    """`batch` prompts: word-arithmetic questions in the chat template for a chat model (what it
    is trained on here), else the short arithmetic strings of PROMPTS."""
    if getattr(tokenizer, "chat_template", None):
        from agpo_lab.tasks.word_arithmetic import WordArithmeticTask

        task = WordArithmeticTask(seed=0, n_eval=max(batch, 5))
        texts = [task.format_prompt(p, tokenizer) for p in task.problems("eval")]
    else:
        texts = PROMPTS
    return [texts[i % len(texts)] for i in range(batch)]


def set_eos_bias(model, eos_id: int, bias: float) -> None:
    """Add `bias` to the EOS logit through an output-layer bias (same cost for both generators)."""
    head = model.get_output_embeddings()
    vector = torch.zeros(head.out_features, device=head.weight.device, dtype=head.weight.dtype)
    vector[eos_id] = bias
    head.bias = torch.nn.Parameter(vector, requires_grad=False)


def early_stop_bias(vocab_size: int, mean_length: float) -> float:
    """EOS bias giving P(EOS) = 1 / mean_length per step if the other logits were all equal.

    Solve e^b / (e^b + V - 1) = q for b: b = log((V - 1) q / (1 - q)); e.g. V = 54, 32 -> 0.54.
    """
    q = 1.0 / mean_length
    return math.log((vocab_size - 1) * q / (1 - q))


def generated_tokens(completions: torch.Tensor, eos_id: int) -> int:
    """Tokens up to and including the first EOS of each row (rows without EOS count fully)."""
    is_eos = completions == eos_id
    has_eos = is_eos.any(dim=1)
    first_eos = is_eos.float().argmax(dim=1)
    lengths = torch.where(has_eos, first_eos + 1, torch.full_like(first_eos, completions.shape[1]))
    return int(lengths.sum())


def worker(args: argparse.Namespace) -> dict:
    """Time one implementation on one case in this process; return the figures as a dict."""
    from agpo_lab.config import RolloutConfig
    from agpo_lab.rollout import generate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = build_model(args.model, device, args.lora)
    eos = tok.eos_token_id
    if args.case == "forced":
        set_eos_bias(model, eos, -1e9)
    elif not args.model:
        set_eos_bias(model, eos, early_stop_bias(len(tok), args.max_new_tokens / 3))
    prompts = benchmark_prompts(tok, args.batch)
    cfg = RolloutConfig(
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        compile_decode=args.impl == "ours_compiled",
        fast_decode=not args.impl.endswith("hf_forward"),
        precision="bfloat16" if args.impl.startswith("ours_bf16") else "model",
    )
    dtype = torch.bfloat16 if "bf16" in args.impl else None
    if args.impl == "hf_bf16":
        model = model.to(torch.bfloat16)
    enc = tok(prompts, return_tensors="pt", padding=True).to(device)
    gflops = matmul_gflops(device=device, dtype=dtype)
    limit = {"gflops": gflops, "linear_weights": linear_weights(model)}
    rss_after_load_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def run_once(seed: int) -> int:
        if args.impl not in BASELINES:
            rollout = generate(
                model, tok, prompts, cfg, generator=torch.Generator(device).manual_seed(seed)
            )
            return int(rollout.lengths.sum())
        torch.manual_seed(seed)
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=args.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=args.max_new_tokens,
            use_cache=True,
            pad_token_id=tok.pad_token_id,
            eos_token_id=eos,
        )
        return generated_tokens(out[:, enc["input_ids"].shape[1] :], eos)

    start = time.perf_counter()
    run_once(0)  # warm-up (and the compile, for ours_compiled)
    warmup_s = time.perf_counter() - start
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    best = {"tokens_per_s": 0.0, "tokens_per_cpu_s": 0.0}
    for seed in range(1, args.repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        tokens = run_once(seed)
        if device == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        best["tokens"] = tokens
        best["tokens_per_s"] = max(best["tokens_per_s"], tokens / wall)
        best["tokens_per_cpu_s"] = max(best["tokens_per_cpu_s"], tokens / cpu)
    best["warmup_s"] = warmup_s
    best["rss_after_load_mb"] = rss_after_load_mb
    best["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        best["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    best["device"] = device
    best["dtype"] = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")
    # The decode forward at the machine's matmul rate: 2 x Linear weights FLOPs per new token.
    best["bound_tokens_per_s"] = limit["gflops"] * 1e9 / (2 * limit["linear_weights"])
    best["gflops"] = limit["gflops"]
    return best


def measure(args: argparse.Namespace, impl: str, case: str) -> dict:
    """Run `worker` for (impl, case) in a fresh Python process and parse its JSON line."""
    cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--case", case]
    cmd += ["--batch", str(args.batch), "--max-new-tokens", str(args.max_new_tokens)]
    cmd += ["--temperature", str(args.temperature), "--repeats", str(args.repeats)]
    cmd += ["--threads", str(args.threads)] + (["--lora"] if args.lora else [])
    if args.model:
        cmd += ["--model", args.model]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench worker {impl}/{case} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def rollout_target(model: str | None, case: str) -> float:
    """The speed issues' floors for ours / model.generate: on a real model 3x when rows stop at
    EOS, 2.5x when every row runs to the end (the real-model speed issue); on the small embedded
    or random model 3x and 2x."""
    if model not in (None, "embedded") and "data/embedded" not in str(model):
        return 3.0 if case == "early" else 2.5
    return 3.0 if case == "early" else 2.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default=None,
        help="a model folder (e.g. data/embedded), 'embedded' or a fetched model's name "
        "(smollm2-135m-instruct); default: a random ~1M-parameter Qwen2",
    )
    parser.add_argument("--batch", type=int, default=64, help="rows per batch (prompts x G)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best is kept")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = default")
    parser.add_argument(
        "--lora",
        action="store_true",
        help="with --model: the model with LoRA adapters (r = 16, every linear layer), as the "
        "recipes train it; model.generate then runs peft's adapter layers",
    )
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=list(IMPLS),
        default=list(IMPLS),
        help="implementations to time (model.generate always runs: it is the baseline)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=["forced", "early"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args)))
        return

    model_name = args.model or "random Qwen2 (h128, 4 layers, ~1M params, char tokenizer)"
    model_name += " with LoRA r=16" if args.lora else ""
    print(
        f"model: {model_name}; batch {args.batch}, max_new_tokens {args.max_new_tokens}, "
        f"T={args.temperature}, best of {args.repeats}, torch threads {torch.get_num_threads()}"
    )
    header = f"{'case':<8}{'impl':<18}{'tokens':>8}{'tok/s':>10}{'tok/CPU-s':>11}"
    header += f"{'% limit':>9}{'warm-up s':>10}{'RSS load MB':>13}{'peak RSS MB':>13}"
    print(header + ("  peak CUDA MB" if torch.cuda.is_available() else ""))
    for case in ("forced", "early"):
        chosen = [impl for impl in IMPLS if impl in args.impls or impl == "hf"]
        results = {impl: measure(args, impl, case) for impl in chosen}
        # One limit per case and format: the best matmul rate any worker measured in it.
        for dtype in {r["dtype"] for r in results.values()}:
            same = [r for r in results.values() if r["dtype"] == dtype]
            gflops = max(r["gflops"] for r in same)
            for r in same:
                r["bound_tokens_per_s"] *= gflops / r["gflops"]
                r["gflops"] = gflops
        for impl, r in results.items():
            line = f"{case:<8}{IMPLS[impl]:<18}{r['tokens']:>8}{r['tokens_per_s']:>10.0f}"
            share = percent_of_limit(r["tokens_per_s"], r["bound_tokens_per_s"])
            line += f"{r['tokens_per_cpu_s']:>11.0f}{share:>8.1f}%{r['warmup_s']:>10.1f}"
            line += f"{r['rss_after_load_mb']:>13.0f}{r['peak_rss_mb']:>13.0f}"
            print(line + (f"{r['peak_cuda_mb']:>14.1f}" if "peak_cuda_mb" in r else ""))
        limits = {r["dtype"]: r for r in results.values()}
        for dtype, r in sorted(limits.items()):
            print(
                f"{case:<8}machine limit ({dtype}): matmul {r['gflops']:.1f} GFLOP/s (measured "
                f"in this run) -> {r['bound_tokens_per_s']:.0f} tokens/s FLOP-bound for this "
                "model's forward"
            )
        ours = [impl for impl in IMPLS if impl.startswith("ours")]
        for impl in (i for i in ours if i in results):
            for base in (b for b in BASELINES if b in results):
                ratio = results[impl]["tokens_per_s"] / results[base]["tokens_per_s"]
                cpu_ratio = results[impl]["tokens_per_cpu_s"] / results[base]["tokens_per_cpu_s"]
                target = f" (target >= {rollout_target(args.model, case)}x)" if base == "hf" else ""
                print(
                    f"{case:<8}ratio {IMPLS[impl]}/{IMPLS[base]} tokens/s: {ratio:.2f}x wall, "
                    f"{cpu_ratio:.2f}x CPU time{target}"
                )


if __name__ == "__main__":
    main()
