"""Tests of agpo_lab.rollout: rollouts, log-probs, left padding, greedy parity, determinism, compile."""

from __future__ import annotations

import pytest
import torch

from agpo_lab.config import RolloutConfig
from agpo_lab.models.tiny import build_tiny_causal_lm
from agpo_lab.models.tokenizer import build_char_tokenizer
from agpo_lab.rollout import completion_logprobs, decode, generate
from agpo_lab.rollout.inputs import positions_from_mask

PROMPTS = ["1+2=", "what is 13*7?", "a", "(3+4)*5=", "9", "12-5="]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def tiny_model(tok, arch: str = "qwen2", eos_bias: float | None = None) -> torch.nn.Module:
    """A random 2-layer model; `eos_bias` adds to the EOS logit so that some rows stop early."""
    model = build_tiny_causal_lm(tok, arch=arch, tie_word_embeddings=False)
    if eos_bias is not None:
        head = model.get_output_embeddings()
        bias = torch.zeros(head.out_features)
        bias[tok.eos_token_id] = eos_bias
        head.bias = torch.nn.Parameter(bias)
    return model.eval()


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def early_model(request, tok):
    return tiny_model(tok, request.param, eos_bias=2.5)


def test_rollout_fields_are_consistent(tok, early_model):
    cfg = RolloutConfig(max_new_tokens=12)
    r = generate(early_model, tok, PROMPTS, cfg, generator=torch.Generator().manual_seed(0))
    batch, width = r.completion_ids.shape
    assert batch == len(PROMPTS) and width == int(r.lengths.max()) <= 12
    assert r.prompt_ids.shape == r.prompt_mask.shape and r.prompt_mask[:, -1].all()  # left padding
    assert r.completion_mask.dtype == torch.float32
    assert torch.equal(r.completion_mask.sum(1).long(), r.lengths)
    assert (r.logprobs[r.completion_mask == 0] == 0).all()
    assert (r.logprobs[r.completion_mask == 1] < 0).all()
    assert (r.completion_ids[r.completion_mask == 0] == tok.pad_token_id).all()
    last = r.completion_ids.gather(1, (r.lengths - 1)[:, None]).squeeze(1)
    assert torch.equal(r.truncated, last != tok.eos_token_id)
    assert (r.lengths[r.truncated] == 12).all()
    assert (~r.truncated).any() and (r.lengths < 12).any(), "eos bias should stop some rows early"
    for row, text, length in zip(r.completion_ids, r.texts, r.lengths):
        assert text == tok.decode(row[:length].tolist(), skip_special_tokens=True)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_match_completion_logprobs(tok, early_model, temperature):
    cfg = RolloutConfig(max_new_tokens=16, temperature=temperature)
    r = generate(early_model, tok, PROMPTS, cfg, generator=torch.Generator().manual_seed(1))
    assert len(set(r.lengths.tolist())) > 1, (
        "need rows of different lengths (finished rows removed)"
    )
    recomputed = completion_logprobs(
        early_model,
        r.prompt_ids,
        r.prompt_mask,
        r.completion_ids,
        r.completion_mask,
        temperature=temperature,
    )
    torch.testing.assert_close(recomputed, r.logprobs, atol=1e-5, rtol=0)


def test_completion_logprobs_equal_unpadded_plain_forward(tok, early_model):
    """Left padding must not shift positions: each row alone, unpadded, gives the same log-probs."""
    r = generate(early_model, tok, PROMPTS, RolloutConfig(max_new_tokens=10), generator=None)
    batched, entropy = completion_logprobs(
        early_model,
        r.prompt_ids,
        r.prompt_mask,
        r.completion_ids,
        r.completion_mask,
        return_entropy=True,
    )
    for i in range(len(PROMPTS)):
        prompt = r.prompt_ids[i][r.prompt_mask[i] == 1]
        completion = r.completion_ids[i, : r.lengths[i]]
        with torch.no_grad():
            logits = early_model(torch.cat([prompt, completion])[None]).logits[0]
        logp = logits[len(prompt) - 1 : -1].log_softmax(-1)
        expected = logp.gather(-1, completion[:, None]).squeeze(-1)
        torch.testing.assert_close(batched[i, : r.lengths[i]], expected, atol=1e-5, rtol=0)
        expected_entropy = -(logp.exp() * logp).sum(-1)
        torch.testing.assert_close(entropy[i, : r.lengths[i]], expected_entropy, atol=1e-5, rtol=0)
    assert (entropy[r.completion_mask == 0] == 0).all()


def saved_tensor_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for the backward pass while `fn` runs."""
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[(t.data_ptr(), t.shape)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


def test_entropy_is_a_detached_metric_with_unchanged_values(tok):
    """The entropy carries no graph (it is only logged) and keeps nothing alive for backward;
    the log-probs keep their gradient; the values equal -sum p log p with gradients on."""
    model = tiny_model(tok)
    r = generate(model, tok, PROMPTS, RolloutConfig(max_new_tokens=8), generator=None)
    inputs = (r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    logps, entropy = completion_logprobs(model, *inputs, temperature=0.7, return_entropy=True)
    assert logps.requires_grad and not entropy.requires_grad
    mask = torch.cat([r.prompt_mask, r.completion_mask.long()], 1)
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    logits = model(ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    logp = (logits[:, r.prompt_ids.shape[1] - 1 : -1] / 0.7).log_softmax(-1)
    with_grad = -(logp.exp() * logp).sum(-1) * r.completion_mask
    assert with_grad.requires_grad
    torch.testing.assert_close(entropy, with_grad.detach(), atol=1e-5, rtol=0)
    logps.sum().backward()  # the log-probs still train the model
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    plain = saved_tensor_bytes(lambda: completion_logprobs(model, *inputs))
    both = saved_tensor_bytes(lambda: completion_logprobs(model, *inputs, return_entropy=True))
    assert both == plain


# EOS biases under which greedy decoding of the seed-0 tiny models stops some rows, not all.
GREEDY_EOS_BIAS = {"qwen2": 0.0, "llama": 0.2}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("greedy", [dict(temperature=0.0), dict(top_k=1)])
def test_greedy_equals_model_generate(tok, arch, greedy):
    """Greedy is temperature=0 (or top_k=1); the tokens must equal transformers' greedy search."""
    model = tiny_model(tok, arch, eos_bias=GREEDY_EOS_BIAS[arch])
    cfg = RolloutConfig(max_new_tokens=16, **greedy)
    ours = generate(model, tok, PROMPTS, cfg, generator=torch.Generator().manual_seed(0))
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    theirs = model.generate(
        **enc, do_sample=False, max_new_tokens=16, pad_token_id=tok.pad_token_id
    )
    assert torch.equal(enc["input_ids"], ours.prompt_ids)
    assert torch.equal(theirs[:, enc["input_ids"].shape[1] :], ours.completion_ids)
    assert (~ours.truncated).any() and ours.truncated.any(), (
        "want rows that stop and rows that don't"
    )


def test_same_seed_same_rollout_and_other_seed_differs(tok):
    model = tiny_model(tok, eos_bias=2.0)
    cfg = RolloutConfig(max_new_tokens=12, top_p=0.9, top_k=20)

    def run(seed):
        return generate(model, tok, PROMPTS, cfg, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.completion_ids[:, :4], c.completion_ids[:, :4])


def test_top_k_samples_only_among_top_k_tokens(tok):
    model = tiny_model(tok)
    cfg = RolloutConfig(max_new_tokens=10, top_k=3)
    r = generate(model, tok, PROMPTS, cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
        mask = torch.cat([r.prompt_mask, r.completion_mask.long()], 1)
        logits = model(ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    step_logits = logits[:, r.prompt_ids.shape[1] - 1 : -1]
    top3 = step_logits.topk(3, dim=-1).indices
    assert (top3 == r.completion_ids[..., None]).any(-1)[r.completion_mask == 1].all()


@pytest.mark.slow
def test_compiled_decode_matches_eager_and_completion_logprobs(tok):
    """compile_decode changes kernels, not results: same tokens, log-probs within 1e-5, stops."""
    model = tiny_model(tok, eos_bias=2.5)

    def run(compile_decode, **kw):
        cfg = RolloutConfig(max_new_tokens=16, compile_decode=compile_decode, **kw)
        return generate(model, tok, PROMPTS, cfg, generator=torch.Generator().manual_seed(5))

    eager, compiled, again = run(False), run(True), run(True)
    assert len(set(compiled.lengths.tolist())) > 1, "need rows that leave the batch early"
    assert torch.equal(compiled.completion_ids, eager.completion_ids)
    assert torch.equal(compiled.completion_ids, again.completion_ids)
    assert torch.equal(compiled.logprobs, again.logprobs)
    recomputed = completion_logprobs(
        model, compiled.prompt_ids, compiled.prompt_mask, compiled.completion_ids,
        compiled.completion_mask,
    )  # fmt: skip
    torch.testing.assert_close(recomputed, compiled.logprobs, atol=1e-5, rtol=0)
    greedy = run(True, temperature=0.0)
    assert torch.equal(greedy.completion_ids, run(False, temperature=0.0).completion_ids)


def _decode_batch_sizes(model, tok, prompts=PROMPTS, **cfg) -> tuple[list[int], torch.Tensor]:
    """(the batch size of every forward: the prefill, then each decode step; the rollout's lengths)."""
    batch_sizes = []
    # the embedding sees every forward's batch: the prefill and each decode step (either path)
    hook = model.get_input_embeddings().register_forward_pre_hook(
        lambda mod, args: batch_sizes.append(args[0].shape[0])
    )
    try:
        r = generate(model, tok, prompts, RolloutConfig(max_new_tokens=16, **cfg), generator=None)
    finally:
        hook.remove()
    return batch_sizes, r.lengths


@pytest.mark.parametrize("fast_decode", [True, False])
def test_finished_rows_leave_the_batch(tok, monkeypatch, fast_decode):
    model = tiny_model(tok, eos_bias=2.5)
    monkeypatch.setattr(decode, "COMPACT_FRACTION", 0.0)  # leave as soon as they finish
    batch_sizes, lengths = _decode_batch_sizes(model, tok, fast_decode=fast_decode)
    assert batch_sizes[0] == len(PROMPTS)
    assert batch_sizes == sorted(batch_sizes, reverse=True) and batch_sizes[-1] < len(PROMPTS)
    # Each forward after the prefill decodes exactly the rows still running at that step.
    running = [(lengths > step).sum().item() for step in range(1, int(lengths.max()))]
    assert batch_sizes[1:] == running


def test_finished_rows_stay_until_they_are_a_quarter_of_the_batch(tok):
    model = tiny_model(tok, eos_bias=1.0)
    batch_sizes, lengths = _decode_batch_sizes(model, tok, PROMPTS * 4)  # rows finish one by one
    running = [(lengths > step).sum().item() for step in range(1, int(lengths.max()))]
    assert batch_sizes[0] == len(set(PROMPTS))  # each distinct prompt is prefilled once
    batch_sizes = batch_sizes[1:]
    assert batch_sizes == sorted(batch_sizes, reverse=True) and batch_sizes[-1] < 4 * len(PROMPTS)
    assert any(size > run for size, run in zip(batch_sizes[1:], running)), "none stayed"
    for size, run in zip(batch_sizes, running):
        assert run <= size and size - run <= decode.COMPACT_FRACTION * size


@pytest.mark.parametrize("fast_decode", [True, False])
def test_a_group_s_rows_share_one_prefill_and_sample_on_their_own(tok, monkeypatch, fast_decode):
    model = tiny_model(tok, eos_bias=2.5)
    prompts = [p for p in PROMPTS[:3] for _ in range(4)]  # 3 groups of G = 4
    monkeypatch.setattr(decode, "COMPACT_FRACTION", 1.0)  # finished rows stay: all 12 decode
    batch_sizes, _ = _decode_batch_sizes(model, tok, prompts, fast_decode=fast_decode)
    assert batch_sizes[0] == 3 and set(batch_sizes[1:]) == {len(prompts)}
    cfg = RolloutConfig(max_new_tokens=12, fast_decode=fast_decode)
    r = generate(model, tok, prompts, cfg, generator=torch.Generator().manual_seed(3))
    assert len({tuple(row.tolist()) for row in r.completion_ids[:4]}) > 1  # different samples
    recomputed = completion_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids,
                                     r.completion_mask)  # fmt: skip
    torch.testing.assert_close(recomputed, r.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_when_finished_rows_leave_does_not_change_the_rollout(tok, monkeypatch, fraction):
    """Finished rows decode padding until they leave; the live rows draw the same uniforms."""
    model = tiny_model(tok, eos_bias=2.5)
    cfg = RolloutConfig(max_new_tokens=16)
    default = generate(model, tok, PROMPTS, cfg, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(decode, "COMPACT_FRACTION", fraction)  # 1.0: never
    other = generate(model, tok, PROMPTS, cfg, generator=torch.Generator().manual_seed(2))
    assert len(set(default.lengths.tolist())) > 1, "need rows that finish early"
    assert torch.equal(other.completion_ids, default.completion_ids)
    torch.testing.assert_close(other.logprobs, default.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(other.entropy, default.entropy, atol=1e-5, rtol=0)


def test_lora_model_rollout_and_train_mode_restored(tok):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_model(tok, eos_bias=2.5), LoraConfig(r=4, target_modules="all-linear")
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:  # make the adapters matter
            torch.nn.init.normal_(param, std=0.1)
    model.train()
    r = generate(model, tok, PROMPTS, RolloutConfig(max_new_tokens=12), generator=None)
    assert model.training, "generate must put the model back in train mode"
    model.eval()
    recomputed = completion_logprobs(
        model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask
    )
    torch.testing.assert_close(recomputed, r.logprobs, atol=1e-5, rtol=0)
    assert recomputed.requires_grad, "the loss needs gradients through completion_logprobs"


@pytest.mark.parametrize(
    "bad",
    [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2)],
)
def test_bad_rollout_config_is_one_line_error(tok, bad):
    with pytest.raises(ValueError, match=r"^rollout\.") as err:
        generate(tiny_model(tok), tok, ["1"], RolloutConfig(**bad))
    assert "\n" not in str(err.value)


def test_empty_prompts_rejected(tok):
    with pytest.raises(ValueError, match="empty"):
        generate(tiny_model(tok), tok, [], RolloutConfig())
