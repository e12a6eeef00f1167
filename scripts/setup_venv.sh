#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install agpo_lab with its dev extras.
# torch is installed first, pinned, so that no other package can pull a multi-GB CUDA build.
set -euo pipefail
python="${1:-python3}"
venv="${2:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade "pip>=24"
"${pip[@]}" install -c constraints.txt "torch==2.13.0"
"${pip[@]}" install -c constraints.txt -e ".[dev]"
echo "agpo_lab environment ready in $venv ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
