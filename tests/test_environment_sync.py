"""environment.yml (for conda users) must list the same dependencies as pyproject.toml."""

from __future__ import annotations

import re
import tomllib

import yaml

from tests.conftest import REPO_ROOT


def _normalise(requirement: str) -> str:
    return re.sub(r"\s+", "", requirement).lower()


def test_environment_yml_mirrors_pyproject_dependencies():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {_normalise(r) for r in pip_section if not r.startswith("-e")}
    expected = {_normalise(r) for r in pyproject["project"]["dependencies"]}
    assert listed == expected, (
        f"environment.yml and pyproject.toml disagree: only in environment.yml {listed - expected}, "
        f"only in pyproject.toml {expected - listed}"
    )
    assert "python=3.11" in env["dependencies"]
    assert any(r.startswith("-e .[dev]") for r in pip_section), (
        "environment.yml must install agpo_lab"
    )


def test_torch_is_pinned_for_the_cpu_build():
    constraints = (REPO_ROOT / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in constraints, "constraints.txt must pin torch==2.13.0 (CPU build here)"
    setup = (REPO_ROOT / "scripts" / "setup_venv.sh").read_text()
    assert '"torch==2.13.0"' in setup, "setup_venv.sh must install the pinned torch first"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO_ROOT / "README.md").read_text()
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "make test" in readme
    assert ci.strip().splitlines()[-1] == "exec make test"


def test_agpo_lab_shortens_the_openmp_spin_before_torch_loads_and_keeps_a_users_value():
    import os
    import subprocess
    import sys

    import agpo_lab

    show = "import agpo_lab, os, torch; print(os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    for given, expected in ((None, agpo_lab.GOMP_SPINCOUNT), ("123", "123")):
        run_env = env if given is None else {**env, "GOMP_SPINCOUNT": given}
        done = subprocess.run([sys.executable, "-c", show], env=run_env, capture_output=True,
                              text=True, check=True)  # fmt: skip
        assert done.stdout.strip() == expected


def test_make_lab_gives_the_notebook_kernels_the_same_spin():
    import subprocess

    import agpo_lab

    dry_run = subprocess.run(["make", "-n", "lab"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert dry_run.returncode == 0, dry_run.stderr
    command = dry_run.stdout.replace("\\\n", " ")  # the recipe's continued line as one
    spin = f"GOMP_SPINCOUNT=${{GOMP_SPINCOUNT:-{agpo_lab.GOMP_SPINCOUNT}}}"
    assert re.search(re.escape(spin) + r"\s+\S*jupyter lab ", command), command


def test_notebooks_import_agpo_lab_before_torch_so_the_spin_applies_in_any_jupyter():
    import json

    for path in sorted((REPO_ROOT / "notebooks").glob("[0-9]*.ipynb")):
        imports = [
            line.split()[1].split(".")[0]
            for cell in json.loads(path.read_text())["cells"]
            if cell["cell_type"] == "code"
            for line in "".join(cell["source"]).splitlines()
            if line.startswith(("import ", "from "))
        ]
        heavy = [i for i, name in enumerate(imports) if name in ("torch", "transformers", "peft")]
        if heavy:
            assert "agpo_lab" in imports[: heavy[0]], f"{path.name}: import agpo_lab before torch"
