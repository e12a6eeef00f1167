"""The layout keeps its promises: imports only go down the layers, no cycles, settings in one place,
and reading a config stays light."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys

from tests.conftest import REPO_ROOT


def _import_graph_script():
    spec = importlib.util.spec_from_file_location(
        "import_graph", REPO_ROOT / "scripts" / "import_graph.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_imports_only_go_down_the_layers_and_never_cycle():
    graph_script = _import_graph_script()
    graph = graph_script.module_imports()
    assert "agpo_lab.training.trainer" in graph and "agpo_lab.config" in graph
    assert graph_script.find_cycles(graph) == []
    assert graph_script.upward_imports(graph) == []
    layers = {graph_script.layer_of(m) for m in graph}
    assert layers <= set(graph_script.LAYERS), f"a package outside LAYERS: {layers}"


def test_docs_show_the_graph_as_it_is(capsys):
    graph_script = _import_graph_script()
    assert graph_script.main([]) == 0
    layer_lines = capsys.readouterr().out.splitlines()[: len(graph_script.LAYERS)]
    doc = (REPO_ROOT / "docs" / "architecture.md").read_text()
    assert "\n".join(layer_lines) in doc, "update the graph in docs/architecture.md"


def test_the_checks_catch_a_cycle_and_an_upward_import():
    graph_script = _import_graph_script()
    graph = {"agpo_lab.config": {"agpo_lab.training.trainer"}, "agpo_lab.training.trainer": set()}
    assert graph_script.upward_imports(graph) == [("agpo_lab.config", "agpo_lab.training.trainer")]
    graph["agpo_lab.training.trainer"] = {"agpo_lab.config"}
    assert graph_script.find_cycles(graph) != []


def test_reading_a_config_imports_no_torch_or_transformers():
    code = (
        "import sys; from agpo_lab.config import load_config; "
        "load_config('configs/embedded_agpo.yaml', ['run.steps=3']); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'peft'}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True
    )
    assert done.stdout.strip() == "[]"


def test_settings_dataclasses_live_in_config():
    """Every *Config class of the package is in agpo_lab/config.py (the integrations' configs
    extend TRL's and verl's own, so they stay beside them)."""
    elsewhere = [
        f"{path.relative_to(REPO_ROOT)}: {node.name}"
        for path in sorted((REPO_ROOT / "agpo_lab").rglob("*.py"))
        if path.name != "config.py" and "integrations" not in path.parts
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef) and node.name.endswith("Config")
    ]
    assert elsewhere == []
