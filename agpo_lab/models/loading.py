"""Load any `transformers` causal LM as the policy (full fine-tuning or LoRA), with its tokenizer.

`model.name_or_path` is "embedded" (the shipped tiny model), the name of a fetched model
(`agpo_lab.models.fetch.CATALOG`, e.g. smollm2-135m-instruct), a local folder, or a hub id; a hub id
that cannot be reached within a few seconds becomes its local HF-cache snapshot, or a one-line error
that says to pass a local folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from agpo_lab.config import ModelConfig, WarmStartConfig
from agpo_lab.errors import ConfigError, MissingFileError, ModelLoadError
from agpo_lab.models.fetch import CATALOG, fetched_model_dir, is_fetched, models_dir
from agpo_lab.models.hub import HUB_TIMEOUT_S, hub_reachable
from agpo_lab.paths import EMBEDDED_MODEL_DIR

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """Map a dtype name to a torch dtype; "auto" is bf16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"model.dtype={name!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_model_path(name_or_path: str) -> str:
    """A local folder as a string, or a hub id to try; one-line errors for paths that do not exist.

    A hub id is returned as it is when the hub answers within HUB_TIMEOUT_S; otherwise it becomes
    its snapshot folder in the local HF cache, or fails at once (OSError) when it is not cached.
    """
    if name_or_path == "embedded":
        if not (EMBEDDED_MODEL_DIR / "config.json").is_file():
            raise MissingFileError(
                f"the embedded model is missing at {EMBEDDED_MODEL_DIR}; build it with "
                "`agpo-lab pretrain` or set model.name_or_path to a local model folder"
            )
        return str(EMBEDDED_MODEL_DIR)
    if name_or_path in CATALOG:
        if not is_fetched(name_or_path):
            raise MissingFileError(
                f"model {name_or_path!r} is not fetched yet (looked in "
                f"{fetched_model_dir(name_or_path)}); run `agpo-lab models fetch {name_or_path}`"
            )
        return str(fetched_model_dir(name_or_path))
    if name_or_path == WarmStartConfig.name:
        folder = models_dir() / name_or_path
        if not (folder / "config.json").is_file():
            raise MissingFileError(
                f"the warm start {name_or_path!r} is not built yet (looked in {folder}); build it "
                "with `agpo-lab warmstart` (about half an hour on a 2-core CPU)"
            )
        return str(folder)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MissingFileError(f"model folder {path} has no config.json; pass a saved model")
        return str(path)
    if path.exists() or not HUB_ID.match(name_or_path) or name_or_path.startswith("."):
        raise MissingFileError(f"model path {name_or_path!r} is not a model folder; pass one")
    if hub_reachable():
        return name_or_path
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name_or_path, "config.json")
    if isinstance(cached, str):  # a cached snapshot is a plain model folder
        return str(Path(cached).parent)
    raise _hub_error(name_or_path, f"no connection within {HUB_TIMEOUT_S:g} s, not in the HF cache")


def _hub_error(source: str, reason: str) -> ModelLoadError:
    return ModelLoadError(
        f"model {source!r} is neither a local folder nor reachable on the Hugging Face hub "
        f"(offline or wrong id: {reason}); pass a local path to a saved model instead"
    )


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def _load_or_fail(loader, source: str, **kwargs):
    """Call `loader(source)`, turning a load failure into one line that says what to do.

    A local folder that fails to load is the folder's fault whatever transformers raises (a torn
    safetensors file raises its own error type): the message names the file that is broken when
    `diagnose_folder` finds it. A hub id that fails is unreachable or wrong.
    """
    folder = Path(source).is_dir()
    try:
        return loader(source, **kwargs)
    except OSError as err:
        if not folder:
            raise _hub_error(source, _first_line(err)) from None
        problem = diagnose_folder(Path(source)) or _first_line(err)
        raise ModelLoadError(f"cannot load model folder {source}: {problem}") from None
    except Exception as err:
        if not folder:
            raise
        problem = diagnose_folder(Path(source)) or _first_line(err)
        raise ModelLoadError(
            f"cannot load model folder {source}: {problem}; re-save or re-download the model"
        ) from None


def diagnose_folder(folder: Path) -> str | None:
    """The first broken file of a model folder, described in a few words, or None.

    Looks at the JSON files transformers reads (config, generation config, tokenizer files) and
    at the header of every safetensors file. Example: "tokenizer.json is not valid JSON (line 1,
    column 2)"; "model.safetensors is unreadable (invalid header length)".
    """
    from safetensors import safe_open

    for name in JSON_FILES:
        path = folder / name
        if path.is_file():
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                where = f"line {err.lineno}, column {err.colno}" if hasattr(err, "lineno") else err
                return f"{name} is not valid JSON ({where})"
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as weights:
                for key in weights.keys():  # noqa: SIM118 (safe_open has no iterator)
                    weights.get_slice(key)
        except Exception as err:  # safetensors raises its own error type
            return f"{path.name} is unreadable ({' '.join(str(err).split())[:120]})"
    return None


JSON_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
"""The JSON files of a model folder that `diagnose_folder` checks."""


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
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ModelLoadError(
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
            raise ModelLoadError(
                f"tokenizer of {source} has neither a pad nor an eos token; add one and re-save it"
            )
        tokenizer.pad_token = tokenizer.eos_token
    try:
        model = _load_or_fail(
            AutoModelForCausalLM.from_pretrained,
            source,
            dtype=dtype,
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn_implementation,
        ).to(device)
    except (
        ModelLoadError
    ) as err:  # transformers refuses an unknown kernel name: the setting's fault
        if "attn_implementation" not in str(err):
            raise
        raise ConfigError(
            f"model.attn_implementation={cfg.attn_implementation!r}: not an attention kernel "
            "transformers knows; use sdpa, eager, flash_attention_2 or flex_attention"
        ) from None
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

        lora_cfg = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora_cfg)
    return model, tokenizer


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0, so that training-mode log-probs equal sampling ones."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
