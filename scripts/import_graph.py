"""The import graph of agpo_lab: which layer imports which, and a check that imports only go down.

    python scripts/import_graph.py            # layer-level graph, then the verdict (exit 1 if broken)
    python scripts/import_graph.py --modules  # every module's imports inside the package

Every import statement counts, also one inside a function (a lazy import that hides a cycle is
still a cycle). The layers follow the data flow; a module may import its own package and any
layer listed before its own, never a later one (docs/architecture.md explains each layer).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "agpo_lab"
LAYERS = (
    "paths",
    "errors",
    "config",
    "tasks",
    "models",
    "rollout",
    "algorithms",
    "evaluation",
    "training",
    "experiments",
    "integrations",
    "cli",
)
"""agpo_lab's layers in data-flow order (paths and errors below everything); `agpo_lab/__init__.py`
counts as the first."""


def module_name(path: Path) -> str:
    """agpo_lab/training/trainer.py -> agpo_lab.training.trainer (a package's __init__: the package)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports() -> dict[str, set[str]]:
    """Each module of the package -> the package modules it imports (anywhere in the file)."""
    files = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import: resolve against this module's package
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def layer_of(module: str) -> str:
    """agpo_lab.training.trainer -> "training"; agpo_lab itself -> "paths" (the bottom)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else LAYERS[0]


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first search meets (empty when the graph is acyclic)."""
    seen, on_stack, stack, cycles = set(), set(), [], []

    def visit(node: str) -> None:
        seen.add(node)
        on_stack.add(node)
        stack.append(node)
        for target in sorted(graph[node]):
            if target in on_stack:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in seen:
                visit(target)
        stack.pop()
        on_stack.discard(node)

    for node in sorted(graph):
        if node not in seen:
            visit(node)
    return cycles


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs where a layer imports a later layer (or one not in LAYERS)."""
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    bad = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            a, b = layer_of(source), layer_of(target)
            if a != b and rank.get(b, len(LAYERS)) >= rank.get(a, -1):
                bad.append((source, target))
    return bad


def layer_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph collapsed to layers (imports within a layer left out)."""
    layers: dict[str, set[str]] = defaultdict(set)
    for source, targets in graph.items():
        layers[layer_of(source)].update(
            layer_of(t) for t in targets if layer_of(t) != layer_of(source)
        )
    return layers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", action="store_true", help="print module-level imports")
    args = parser.parse_args(argv)
    graph = module_imports()
    if args.modules:
        for source in sorted(graph):
            print(f"{source:42s} -> {', '.join(sorted(graph[source])) or '-'}")
    else:
        layers = layer_graph(graph)
        for layer in LAYERS:
            print(f"{layer:13s} -> {', '.join(sorted(layers[layer], key=LAYERS.index)) or '-'}")
    cycles, upward = find_cycles(graph), upward_imports(graph)
    for cycle in cycles:
        print("cycle: " + " -> ".join(cycle))
    for source, target in upward:
        print(f"upward import: {source} -> {target}")
    if cycles or upward:
        return 1
    print(f"{len(graph)} modules: no import cycles, every import goes down the layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
