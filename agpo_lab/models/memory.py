"""Expected GPU memory of an RL run on a real model, from its config.json (no GPU needed).

The project's one estimator: docs/scaling.md's table (`python -m agpo_lab.models.memory configs/gpu/*.yaml`
prints it) and notebook 05's chart come from here. Assumptions, from how agpo_lab trains (one
process, N parameters, w bytes per weight: 2 for bf16 / fp16 and for "auto", bf16 on CUDA; 4 fp32):

- weights: w*N, plus a frozen deep copy (w*N) as KL reference under full fine-tuning with
  beta > 0 (under LoRA the reference is the same weights, adapters off); peft keeps LoRA
  adapters in fp32: 4 bytes per adapter parameter.
- optimizer: AdamW's m and v in the trained parameters' dtype: 2w*N, or 8 bytes per adapter.
- gradients, during the update only (zero_grad(set_to_none=True)): w*N, or 4 bytes per adapter.
- activations of a micro-batch of m rows of s = prompt + completion tokens: with gradient
  checkpointing each layer's input (L*h values per token) plus one recomputed layer, counted as
  17h + 5*intermediate values (fp32 norms, q, k, v, attention output, the MLP's gate, up,
  activation and product), plus under LoRA its fp32 copies of the 7 adapted linears' inputs
  (6h + intermediate values, 4 bytes); without checkpointing every layer keeps its own.
- logits: `completion_logprobs` keeps, per completion token and vocabulary entry, the logits
  (w bytes) and the fp32 log-softmax saved for backward (4 bytes): m * completion * vocab * (w+4).
  The entropy is only logged and computed without gradients: it keeps nothing.
- rollout: the preallocated KV cache, rows * s * L * 2 (K, V) * kv_heads * head_dim * w, or the
  prefill if larger (the prompts' KV cache plus one MLP's 3*intermediate temporaries per token).
- rollout and update do not overlap: peak = weights + optimizer + max(update, rollout), with
  update = gradients + activations + logits. Left out: CUDA context, fragmentation and small
  temporaries (add 1 to 2 GiB); activations are good to about +/-30%.

Parameter counts are exact for Qwen2 / Llama-style decoders (gated MLP, RMSNorm, q/k/v biases
when the config has them); the tests check them against transformers' own models.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agpo_lab.config import TrainConfig, load_config

GIB = 2**30


@dataclass(frozen=True)
class Architecture:
    """The sizes of a decoder-only transformer that decide its memory (from config.json)."""

    hidden: int
    """hidden_size: h."""
    intermediate: int
    """intermediate_size: width of the gated MLP."""
    layers: int
    """num_hidden_layers: L."""
    heads: int
    """num_attention_heads."""
    kv_heads: int
    """num_key_value_heads (grouped-query attention)."""
    head_dim: int
    """head_dim, or hidden_size // num_attention_heads when the config has none."""
    vocab: int
    """vocab_size: rows of the embedding and of the output head."""
    tied_embeddings: bool
    """tie_word_embeddings: the output head reuses the embedding matrix."""
    qkv_bias: bool
    """attention_bias; Qwen2 configs have none and always use biases on q, k, v."""


def architecture_from_config(config: Any) -> Architecture:
    """Read an Architecture from a `transformers` config object or a config.json dict."""
    get = (config if isinstance(config, dict) else config.to_dict()).get
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers") if not get(k)]
    if missing or not get("vocab_size") or not get("num_attention_heads"):
        raise ValueError(f"model config lacks {missing or 'vocab/heads'}; pass a decoder LM config")
    heads = get("num_attention_heads")
    return Architecture(
        hidden=get("hidden_size"),
        intermediate=get("intermediate_size"),
        layers=get("num_hidden_layers"),
        heads=heads,
        kv_heads=get("num_key_value_heads") or heads,
        head_dim=get("head_dim") or get("hidden_size") // heads,
        vocab=get("vocab_size"),
        tied_embeddings=bool(get("tie_word_embeddings", True)),
        qkv_bias=bool(get("attention_bias", get("model_type") == "qwen2")),
    )


_QWEN25_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_QWEN25_KEYS += ("num_key_value_heads", "vocab_size", "tie_word_embeddings")
QWEN25 = {  # the published config.json values (base and Instruct models share them)
    name: architecture_from_config(dict(zip(_QWEN25_KEYS, values), model_type="qwen2"))
    for name, values in {
        "Qwen2.5-0.5B": (896, 4864, 24, 14, 2, 151_936, True),
        "Qwen2.5-1.5B": (1536, 8960, 28, 12, 2, 151_936, True),
        "Qwen2.5-3B": (2048, 11008, 36, 16, 2, 151_936, True),
        "Qwen2.5-7B": (3584, 18944, 28, 28, 4, 152_064, False),
    }.items()
}


def architecture_for(name_or_path: str) -> Architecture:
    """A local model folder's config.json, else a Qwen2.5 name or hub id from QWEN25."""
    config_file = Path(name_or_path).expanduser() / "config.json"
    if config_file.is_file():
        return architecture_from_config(json.loads(config_file.read_text()))
    name = Path(name_or_path).name.removesuffix("-Instruct")
    if name not in QWEN25:
        raise ValueError(
            f"no architecture known for {name_or_path!r}; pass a model folder with a config.json "
            f"or one of {', '.join(QWEN25)}"
        )
    return QWEN25[name]


def _linears(a: Architecture) -> list[tuple[int, int]]:
    """(fan_in, fan_out) of q, k, v, o, gate, up, down in one layer."""
    q, kv, h, i = a.heads * a.head_dim, a.kv_heads * a.head_dim, a.hidden, a.intermediate
    return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def parameter_count(a: Architecture) -> int:
    """All weights: embeddings (twice when untied), L layers (7 linears, q/k/v biases, 2 norms),
    final norm. Example: Qwen2.5-0.5B -> 494,032,768 (the published 0.49B)."""
    biases = (a.heads + 2 * a.kv_heads) * a.head_dim if a.qkv_bias else 0
    layer = sum(fan_in * fan_out for fan_in, fan_out in _linears(a)) + biases + 2 * a.hidden
    embeddings = a.vocab * a.hidden * (1 if a.tied_embeddings else 2)
    return embeddings + a.layers * layer + a.hidden


def lora_parameter_count(a: Architecture, r: int = 16) -> int:
    """LoRA rank r on every linear of every layer ("all-linear"): r * (fan_in + fan_out) each.
    Example: Qwen2.5-0.5B, r = 16 -> 8,798,208 (peft's count)."""
    return a.layers * sum(r * (fan_in + fan_out) for fan_in, fan_out in _linears(a))


@dataclass
class Workload:
    """The training settings the memory depends on (defaults: the configs/gpu recipes)."""

    lora: bool = True
    """Train LoRA adapters (True) or all weights."""
    lora_r: int = 16
    """LoRA rank."""
    weight_bytes: int = 2
    """Bytes per weight: 2 (bf16, fp16, "auto" on CUDA) or 4 (fp32)."""
    beta: float = 0.04
    """KL weight; > 0 with full fine-tuning keeps a reference copy."""
    gradient_checkpointing: bool = True
    """Recompute layer activations in the backward pass."""
    micro_batch: int = 8
    """Completions per forward/backward pass of the update."""
    rollout_rows: int = 256
    """Completions generated together by one process (prompts x G / processes)."""
    prompt_len: int = 256
    """Prompt tokens (chat template included, padded length)."""
    completion_len: int = 512
    """Completion tokens (rollout.max_new_tokens)."""

    @classmethod
    def from_config(
        cls, config: TrainConfig, prompt_len: int = 256, processes: int = 1
    ) -> Workload:
        """Read a TrainConfig the way the trainer does (micro-batch, rows per process, dtype)."""
        rows = config.run.prompts_per_step * config.rollout.group_size // processes
        mini = (config.optim.mini_batch_size or rows * processes) // processes
        m = config.model
        fp32 = m.dtype in ("float32", "fp32") or (m.dtype == "auto" and config.run.device == "cpu")
        return cls(
            lora=m.lora,
            lora_r=m.lora_r,
            weight_bytes=4 if fp32 else 2,
            beta=config.algorithm.beta,
            gradient_checkpointing=m.gradient_checkpointing is not False,  # None: on for CUDA
            micro_batch=mini // config.optim.grad_accumulation,
            rollout_rows=rows,
            prompt_len=prompt_len,
            completion_len=config.rollout.max_new_tokens,
        )


def estimate_memory_gib(
    arch: Architecture | str, work: Workload | TrainConfig | None = None
) -> dict[str, float]:
    """Peak GPU memory of one process by term, in GiB (the module docstring states the terms).

    `arch`: an Architecture or a name for `architecture_for`; `work`: a Workload, a TrainConfig
    (read with Workload.from_config) or None for the defaults.
    Example: Qwen2.5-0.5B with Workload() -> peak 5.5 GiB, of which logits 3.5 GiB.
    """
    a = architecture_for(arch) if isinstance(arch, str) else arch
    w = work if isinstance(work, Workload) else Workload.from_config(work) if work else Workload()
    n, wb, h, i = parameter_count(a), w.weight_bytes, a.hidden, a.intermediate
    trained = lora_parameter_count(a, w.lora_r) if w.lora else n
    state_bytes = 4 if w.lora else wb  # peft's adapters are fp32
    seq = w.prompt_len + w.completion_len
    layer = (17 * h + 5 * i) * wb + (4 * (6 * h + i) if w.lora and wb < 4 else 0)
    kept = a.layers * h * wb + layer if w.gradient_checkpointing else a.layers * layer
    kv_per_token = a.layers * 2 * a.kv_heads * a.head_dim * wb
    kv_cache = w.rollout_rows * seq * kv_per_token
    prefill = w.rollout_rows * w.prompt_len * (kv_per_token + 3 * i * wb)
    reference = n * wb if not w.lora and w.beta > 0 else 0
    terms = {
        "weights": n * wb + reference + (trained * 4 if w.lora else 0),
        "optimizer": 2 * trained * state_bytes,
        "gradients": trained * state_bytes,
        "activations": w.micro_batch * seq * kept,
        "logits": w.micro_batch * w.completion_len * a.vocab * (wb + 4),
        "kv_cache": kv_cache,
        "rollout": max(kv_cache, prefill),
    }
    terms["update"] = terms["gradients"] + terms["activations"] + terms["logits"]
    terms["peak"] = terms["weights"] + terms["optimizer"] + max(terms["update"], terms["rollout"])
    return {key: value / GIB for key, value in terms.items()}


def memory_table(config_paths: list[str | Path], prompt_len: int = 256) -> str:
    """A markdown table of the estimate (GiB, one decimal) for each agpo_lab config file."""
    columns = ["weights", "optimizer", "gradients", "activations", "logits", "rollout", "peak"]
    lines = ["| recipe | micro-batch | " + " | ".join(columns) + " |"]
    lines.append("| --- " * (len(columns) + 2) + "|")
    for path in config_paths:
        config = load_config(path)
        work = Workload.from_config(config, prompt_len)
        gib = estimate_memory_gib(architecture_for(config.model.name_or_path), work)
        values = " | ".join(f"{gib[key]:.1f}" for key in columns)
        lines.append(f"| {Path(path).stem} | {work.micro_batch} | {values} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m agpo_lab.models.memory configs/gpu/*.yaml
    print(memory_table(sorted(sys.argv[1:])))
