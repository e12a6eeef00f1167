"""Tests of agpo_lab.models.loading: local models, LoRA, the KL reference, one-line errors, and the
fast offline check of hub ids (only ever against localhost)."""

from __future__ import annotations

import shutil
import socket
import time

import huggingface_hub.constants
import pytest
import torch
import transformers

from agpo_lab.config import ModelConfig, RolloutConfig
from agpo_lab.models import EMBEDDED_MODEL_DIR
from agpo_lab.models.hub import hub_reachable
from agpo_lab.models.loading import load_policy, resolve_dtype
from agpo_lab.models.tiny import build_tiny_causal_lm
from agpo_lab.models.tokenizer import build_char_tokenizer
from agpo_lab.rollout import completion_logprobs, generate
from agpo_lab.training.reference import load_reference


def build_tiny(tok) -> torch.nn.Module:
    """The seed-0 tiny Qwen2 with an untied output layer, in eval mode."""
    return build_tiny_causal_lm(tok, tie_word_embeddings=False).eval()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny Qwen2 + char tokenizer saved to a folder, and the in-memory original."""
    folder = tmp_path_factory.mktemp("tiny_qwen2")
    tok = build_char_tokenizer()
    model = build_tiny(tok)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model


def batch(policy, tok):
    return generate(policy, tok, ["1+2=", "34*5="], RolloutConfig(max_new_tokens=6), generator=None)


def test_load_local_folder_gives_same_model(saved_model):
    folder, original = saved_model
    model, tok = load_policy(ModelConfig(name_or_path=str(folder)), "cpu")
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    assert next(model.parameters()).dtype == torch.float32  # auto on CPU
    assert not model.is_activation_checkpointing  # None means off on CPU
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits)


def test_dtype_and_checkpointing_options(saved_model):
    folder, _ = saved_model
    cfg = ModelConfig(name_or_path=str(folder), dtype="bfloat16", gradient_checkpointing=True)
    model, _ = load_policy(cfg, "cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.is_activation_checkpointing
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="model.dtype"):
        resolve_dtype("float8", "cpu")


def test_pad_token_falls_back_to_eos(tmp_path):
    tok = build_char_tokenizer()
    build_tiny(tok).save_pretrained(tmp_path)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    _, loaded = load_policy(ModelConfig(name_or_path=str(tmp_path)), "cpu")
    assert loaded.pad_token == loaded.eos_token == "<eos>" and loaded.padding_side == "left"


def test_remote_code_is_not_trusted_by_default(saved_model, monkeypatch):
    folder, _ = saved_model
    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_policy(ModelConfig(name_or_path=str(folder)), "cpu")
    load_policy(ModelConfig(name_or_path=str(folder), trust_remote_code=True), "cpu")
    assert seen == [False, True]


def test_missing_local_path_is_one_line_error(tmp_path):
    for bad in [str(tmp_path / "nope"), "./relative/missing", str(tmp_path)]:
        with pytest.raises(FileNotFoundError) as err:
            load_policy(ModelConfig(name_or_path=bad), "cpu")
        assert "\n" not in str(err.value)


def test_unreachable_hub_id_is_one_line_error_suggesting_local_path(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="pass a local path") as err:
        load_policy(ModelConfig(name_or_path="no-such-org/no-such-model"), "cpu")
    assert "\n" not in str(err.value) and "no-such-org/no-such-model" in str(err.value)


def test_embedded_model_loads_or_explains_how_to_get_it():
    if (EMBEDDED_MODEL_DIR / "config.json").is_file():
        model, tok = load_policy(ModelConfig(), "cpu")
        assert tok.padding_side == "left" and model.config.vocab_size >= len(tok)
    else:
        with pytest.raises(FileNotFoundError, match="embedded model is missing") as err:
            load_policy(ModelConfig(), "cpu")
        assert "\n" not in str(err.value)


def test_lora_policy_trains_only_adapters(saved_model):
    folder, _ = saved_model
    model, _ = load_policy(ModelConfig(name_or_path=str(folder), lora=True, lora_r=4), "cpu")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert any("q_proj" in name for name in trainable) and any("down_proj" in n for n in trainable)


def test_no_reference_when_beta_is_zero(saved_model):
    folder, _ = saved_model
    model, _ = load_policy(ModelConfig(name_or_path=str(folder)), "cpu")
    assert load_reference(model, ModelConfig(name_or_path=str(folder)), beta=0.0) is None
    with pytest.raises(ValueError, match="beta"):
        load_reference(model, ModelConfig(name_or_path=str(folder)), beta=-0.1)


def test_full_finetune_reference_is_a_frozen_copy(saved_model):
    folder, _ = saved_model
    cfg = ModelConfig(name_or_path=str(folder))
    policy, tok = load_policy(cfg, "cpu")
    ref = load_reference(policy, cfg, beta=0.04)
    assert ref.model is not policy
    assert not any(p.requires_grad for p in ref.model.parameters())
    r = batch(policy, tok)
    args = (r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    before = ref.logprobs(*args)
    torch.testing.assert_close(before, r.logprobs, atol=1e-5, rtol=0)
    assert not before.requires_grad
    with torch.no_grad():  # the policy moves; the reference must not
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.testing.assert_close(ref.logprobs(*args), before)
    assert not torch.allclose(completion_logprobs(policy, *args), before, atol=1e-3)


def test_lora_reference_is_the_base_with_adapters_disabled(saved_model):
    folder, original = saved_model
    cfg = ModelConfig(name_or_path=str(folder), lora=True, lora_r=4, lora_dropout=0.0)
    policy, tok = load_policy(cfg, "cpu")
    ref = load_reference(policy, cfg, beta=0.04)
    assert ref.model is policy  # no copy of the weights
    with torch.no_grad():  # make the adapters change the output
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    r = batch(policy, tok)
    args = (r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    with torch.no_grad():
        with_adapters = completion_logprobs(policy, *args)
        base = completion_logprobs(original, *args)
    torch.testing.assert_close(ref.logprobs(*args), base, atol=1e-5, rtol=0)
    assert not torch.allclose(with_adapters, base, atol=1e-3)
    with torch.no_grad():  # adapters are back on after the reference call
        torch.testing.assert_close(completion_logprobs(policy, *args), with_adapters)


def test_char_tokenizer_survives_a_qwen2_model_folder(tmp_path, char_tokenizer, tiny_qwen2):
    # transformers 5's AutoTokenizer would turn this folder's tokenizer into Qwen2Tokenizer,
    # dropping newlines and spaces; load_tokenizer must give back exactly what was saved.
    from agpo_lab.models.loading import load_tokenizer

    char_tokenizer.save_pretrained(tmp_path)
    tiny_qwen2.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    text = "q:12+7-5\ncheck 19-7=12;ans:14"
    assert loaded(text)["input_ids"] == char_tokenizer(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert loaded.padding_side == "left"


def closed_local_port() -> int:
    """A localhost port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_hub(monkeypatch):
    """Point the hub at localhost (no traffic leaves the machine) with no proxy and not offline;
    returns a function that sets the endpoint's port."""
    for name in ("https_proxy", "http_proxy", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def point_at(port: int) -> None:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")

    return point_at


def test_hub_reachable_honours_endpoint_offline_and_proxy(local_hub, monkeypatch):
    with socket.socket() as server:  # a listening localhost "hub"
        server.bind(("127.0.0.1", 0))
        server.listen()
        local_hub(server.getsockname()[1])
        assert hub_reachable(timeout_s=2.0)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert not hub_reachable(timeout_s=2.0)
        monkeypatch.delenv("HF_HUB_OFFLINE")
    local_hub(closed_local_port())
    assert not hub_reachable(timeout_s=2.0)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:1")  # only the download can tell then
    assert hub_reachable(timeout_s=2.0)


def test_uncached_hub_id_fails_fast_when_the_hub_is_unreachable(local_hub, monkeypatch, tmp_path):
    local_hub(closed_local_port())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # empty cache
    start = time.perf_counter()
    with pytest.raises(OSError, match="pass a local path") as err:
        load_policy(ModelConfig(name_or_path="some-org/uncached-model"), "cpu")
    assert time.perf_counter() - start < 5.0  # huggingface_hub's retries would take 25-50 s
    assert "\n" not in str(err.value) and "some-org/uncached-model" in str(err.value)


def test_cached_hub_id_loads_from_the_cache_when_the_hub_is_unreachable(
    local_hub, monkeypatch, tmp_path, saved_model
):
    folder, original = saved_model
    local_hub(closed_local_port())
    repo = tmp_path / "models--some-org--tiny-model"  # huggingface_hub's cache layout
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(folder, repo / "snapshots" / ("0" * 40))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    model, _ = load_policy(ModelConfig(name_or_path="some-org/tiny-model"), "cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits)
