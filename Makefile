# The two commands a newcomer needs: `make reproduce` (main job) and `make test` (lint + tests).
# Both create or reuse the local virtual environment .venv with the pinned versions.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test lint format reproduce reproduce-quick lab clean-venv

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

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

reproduce: setup
	$(VENV)/bin/agpo-lab reproduce $(ARGS)

reproduce-quick: setup
	$(VENV)/bin/agpo-lab reproduce --quick $(ARGS)

# JupyterLab at the repository root (README and docs reachable), opened on the notebooks folder.
lab: setup
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks $(LAB_ARGS)

clean-venv:
	rm -rf $(VENV)
