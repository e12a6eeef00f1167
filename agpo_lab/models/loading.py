"""Load any `transformers` causal LM as the policy (full fine-tuning or LoRA) and its KL reference.

The reference policy for the KL term is a frozen deep copy under full fine-tuning; under LoRA it is
the same network with its adapters switched off (peft's `disable_adapter()`), so no second copy of
the weights is kept. With beta = 0 there is no KL term and no reference at all.
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from agpo_lab.models import EMBEDDED_MODEL_DIR
from agpo_lab.rollout import completion_logprobs, eval_mode

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
HUB_TIMEOUT_S = 3.0
"""Seconds the hub gets to accept a connection before a hub id counts as unreachable (offline,
huggingface_hub's own retries take 25 to 50 s before failing)."""


@dataclass
class ModelConfig:
    """Which model to train and how."""

    name_or_path: str = "embedded"
    """Local model folder or hub id; "embedded" = the shipped tiny model (EMBEDDED_MODEL_DIR)."""
    dtype: str = "auto"
    """Weights dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or float16."""
    lora: bool = False
    """Train LoRA adapters (peft) instead of all weights."""
    lora_r: int = 16
    """LoRA rank r."""
    lora_alpha: int = 32
    """LoRA scale numerator: the update is (alpha / r) * B A."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input during training."""
    lora_target_modules: list[str] | str = "all-linear"
    """Module names that get adapters, or "all-linear" (every linear layer but the output head)."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in the backward pass to save memory; None = on for CUDA, off on CPU."""
    trust_remote_code: bool = False
    """Run modelling code shipped with a hub model; only set it for a model you trust."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers: sdpa, eager, flash_attention_2, ..."""


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """Map a dtype name to a torch dtype; "auto" is bf16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"model.dtype {name!r} is unknown; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_model_path(name_or_path: str) -> str:
    """A local folder as a string, or a hub id to try; one-line errors for paths that do not exist.

    A hub id is returned as it is when the hub answers within HUB_TIMEOUT_S; otherwise it becomes
    its snapshot folder in the local HF cache, or fails at once (OSError) when it is not cached.
    """
    if name_or_path == "embedded":
        if not (EMBEDDED_MODEL_DIR / "config.json").is_file():
            raise FileNotFoundError(
                f"the embedded model is missing at {EMBEDDED_MODEL_DIR}; build it with "
                "agpo_lab.models.pretrain or set model.name_or_path to a local model folder"
            )
        return str(EMBEDDED_MODEL_DIR)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json; pass a saved model")
        return str(path)
    if path.exists() or not HUB_ID.match(name_or_path) or name_or_path.startswith("."):
        raise FileNotFoundError(f"model path {name_or_path!r} is not a model folder; pass one")
    if hub_reachable():
        return name_or_path
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name_or_path, "config.json")
    if isinstance(cached, str):  # a cached snapshot is a plain model folder
        return str(Path(cached).parent)
    raise _hub_error(name_or_path, f"no connection within {HUB_TIMEOUT_S:g} s, not in the HF cache")


def hub_reachable(timeout_s: float = HUB_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT, default huggingface.co) accepts a connection.

    False under HF_HUB_OFFLINE; True when a proxy is set for the endpoint's scheme (only the
    download itself can tell then). The DNS lookup runs in a thread because it has no timeout.
    """
    from huggingface_hub import constants

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline or constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    proxies = (f"{endpoint.scheme}_proxy", "all_proxy")
    if any(os.environ.get(name) or os.environ.get(name.upper()) for name in proxies):
        return True
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    pool = ThreadPoolExecutor(max_workers=1)
    attempt = pool.submit(socket.create_connection, (endpoint.hostname, port), timeout_s)
    try:
        attempt.result(timeout=timeout_s).close()
        return True
    except OSError:  # refused, unreachable, no DNS, or no answer in time (TimeoutError)
        return False
    finally:
        pool.shutdown(wait=False)


def _hub_error(source: str, reason: str) -> OSError:
    return OSError(
        f"model {source!r} is neither a local folder nor reachable on the Hugging Face hub "
        f"(offline or wrong id: {reason}); pass a local path to a saved model instead"
    )


def _load_or_fail(loader, source: str, **kwargs):
    """Call `loader(source)`, turning a load failure into one line that says what to do."""
    try:
        return loader(source, **kwargs)
    except OSError as err:
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        if Path(source).is_dir():
            raise OSError(f"cannot load from model folder {source}: {reason}") from None
        raise _hub_error(source, reason) from None


GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
"""tokenizer_config.json classes that mean "exactly the saved tokenizer.json" (ours included)."""


def load_tokenizer(source: str, trust_remote_code: bool = False):
    """The tokenizer of a model folder or hub id, loaded as it was saved.

    A folder whose tokenizer_config.json names a generic fast tokenizer (the embedded character
    tokenizer does) is loaded with `PreTrainedTokenizerFast`: `AutoTokenizer` in transformers 5
    substitutes the architecture's own class (Qwen2Tokenizer next to a qwen2 config.json), whose
    byte-level pipeline drops the newlines and spaces the character tokenizer relies on.
    Everything else goes through `AutoTokenizer`.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_file = Path(source) / "tokenizer_config.json"
    if config_file.is_file():
        try:
            tokenizer_class = json.loads(config_file.read_text()).get("tokenizer_class")
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{config_file} is not valid JSON ({err}); re-save the tokenizer"
            ) from None
        if tokenizer_class in GENERIC_TOKENIZER_CLASSES:
            return _load_or_fail(PreTrainedTokenizerFast.from_pretrained, source)
    return _load_or_fail(AutoTokenizer.from_pretrained, source, trust_remote_code=trust_remote_code)


def load_policy(cfg: ModelConfig, device: str | torch.device) -> tuple[torch.nn.Module, object]:
    """Load (model, tokenizer) for training on `device`, with LoRA and checkpointing as configured.

    The tokenizer pads on the left (for batched generation); a tokenizer without a pad token
    pads with its EOS token. Remote code runs only with `cfg.trust_remote_code`.
    """
    from transformers import AutoModelForCausalLM

    source = resolve_model_path(cfg.name_or_path)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(source, trust_remote_code=cfg.trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {source} has neither a pad nor an eos token; add one")
        tokenizer.pad_token = tokenizer.eos_token
    model = _load_or_fail(
        AutoModelForCausalLM.from_pretrained,
        source,
        dtype=dtype,
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation,
    ).to(device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    checkpointing = cfg.gradient_checkpointing
    if checkpointing is None:
        checkpointing = torch.device(device).type == "cuda"
    if checkpointing:
        # Non-reentrant checkpointing also works when only LoRA weights need gradients.
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model.config.use_cache = False  # the cache is useless (and warned about) while training
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        if cfg.lora_r < 1:
            raise ValueError(f"model.lora_r must be >= 1, got {cfg.lora_r}")
        lora_cfg = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora_cfg)
    return model, tokenizer


class ReferencePolicy:
    """The KL reference: a frozen model, or the LoRA policy with its adapters switched off."""

    def __init__(self, model: torch.nn.Module, *, disable_adapters: bool = False):
        self.model = model
        self.disable_adapters = disable_adapters

    @torch.no_grad()
    def logprobs(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        *,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Reference log-probs [B, C] of the completion tokens (0 on padding), without gradients."""
        adapters_off = self.model.disable_adapter() if self.disable_adapters else nullcontext()
        with eval_mode(self.model), adapters_off:
            return completion_logprobs(
                self.model,
                prompt_ids,
                prompt_mask,
                completion_ids,
                completion_mask,
                temperature=temperature,
            )


def load_reference(
    policy: torch.nn.Module, cfg: ModelConfig, beta: float
) -> ReferencePolicy | None:
    """The reference for a KL weight `beta`: None when beta == 0 (nothing kept in memory)."""
    if beta < 0:
        raise ValueError(f"beta (KL weight) must be >= 0, got {beta}")
    if beta == 0:
        return None
    if cfg.lora:
        if not hasattr(policy, "disable_adapter"):
            raise ValueError(
                "model.lora is set but the policy is not a peft model; load it with load_policy"
            )
        return ReferencePolicy(policy, disable_adapters=True)
    frozen = copy.deepcopy(policy).eval()
    frozen.requires_grad_(False)
    return ReferencePolicy(frozen)
