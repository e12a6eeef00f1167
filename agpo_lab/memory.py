"""Expected GPU memory of an RL run on a real model, from its architecture (no GPU needed).

Used for the recipes' "expected memory per GPU" in configs/gpu/ and docs/scaling.md, where the
formula is explained term by term. An estimate (activations roughly +/-30%), not a measurement.
"""

from __future__ import annotations

GIB = 2**30
ARCH = {  # from the models' config.json (Qwen2.5, tied embeddings)
    "Qwen2.5-0.5B-Instruct": dict(
        params=494_032_768, layers=24, hidden=896, kv=2 * 64, inter=4864, vocab=151_936
    ),
    "Qwen2.5-1.5B-Instruct": dict(
        params=1_543_714_304, layers=28, hidden=1536, kv=2 * 128, inter=8960, vocab=151_936
    ),
}


def lora_params(arch: dict, r: int = 16) -> int:
    """LoRA r on q, k, v, o, gate, up, down of every layer: r * (fan_in + fan_out) each."""
    h, kv, i = arch["hidden"], arch["kv"], arch["inter"]
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    return arch["layers"] * sum(r * (a + b) for a, b in shapes)


def estimate_memory_gib(
    model: str,
    lora: bool,
    micro_batch: int = 8,
    rollout_rows: int = 256,
    prompt_len: int = 256,
    completion_len: int = 512,
    beta: float = 0.04,
) -> dict[str, float]:
    """Peak GPU memory (GiB) of one process, bf16, as docs/scaling.md explains it:

    weights 2N (+ 2N frozen reference under full fine-tuning with beta > 0); training states
    6N (bf16 grads 2N + AdamW m, v in bf16 4N) or 16 bytes per LoRA parameter (fp32 weight,
    grad, m, v); activations with gradient checkpointing per micro-batch token: the layer inputs
    2*L*h + one recomputed layer (34h + 10*inter) + 6*vocab for the completion's logits (bf16 and
    fp32 log-softmax); rollout KV cache: rows * seq * L * 2 * kv_dim * 2 bytes. Rollout and update
    do not overlap, so the peak is states + max(activations, KV cache).
    """
    a = ARCH[model]
    n, seq = a["params"], prompt_len + completion_len
    weights = 2 * n + (2 * n if not lora and beta > 0 else 0)
    states = 16 * lora_params(a) if lora else 6 * n
    per_token = 2 * a["layers"] * a["hidden"] + 34 * a["hidden"] + 10 * a["inter"]
    activations = micro_batch * (seq * per_token + completion_len * 6 * a["vocab"])
    kv_cache = rollout_rows * seq * a["layers"] * 2 * a["kv"] * 2
    parts = dict(
        weights=weights,
        train_states=states,
        activations=activations,
        kv_cache=kv_cache,
        total=weights + states + max(activations, kv_cache),
    )
    return {k: round(v / GIB, 1) for k, v in parts.items()}
