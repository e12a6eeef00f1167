"""Execute a notebook headless with small settings and save its figures as PNG files.

Each notebook has a cell tagged ``parameters`` (papermill's convention). The runner inserts a cell
right after it that overrides those parameters with small settings, executes the notebook with
nbclient in its own folder, and writes every ``image/png`` output to ``<figure_dir>/<name>/``.
"""

from __future__ import annotations

import base64
import os
import signal
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError, DeadKernelError


def inject_parameters(notebook: nbformat.NotebookNode, overrides: dict) -> nbformat.NotebookNode:
    """Insert a cell assigning `overrides` right after the cell tagged `parameters`."""
    index = next(
        (i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])),
        None,
    )
    if index is None:
        raise ValueError("notebook has no cell tagged 'parameters'; tag the settings cell")
    source = "\n".join(f"{name} = {value!r}" for name, value in overrides.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(index + 1, cell)
    return notebook


def save_figures(notebook: nbformat.NotebookNode, figure_dir: Path) -> list[Path]:
    """Write each PNG output of the executed notebook to `figure_dir`; return the paths.

    Both the cells' outputs and those captured by Output widgets (the live training view) count;
    the latter are named widgetNN_M.png. The folder is emptied first, so no figure of an earlier
    version of the notebook lingers.
    """
    if figure_dir.is_dir():
        for stale in figure_dir.glob("*.png"):
            stale.unlink()
    figure_dir.mkdir(parents=True, exist_ok=True)
    state = notebook.metadata.get("widgets", {}).get(
        "application/vnd.jupyter.widget-state+json", {}
    )
    widget_outputs = [
        m.get("state", {}).get("outputs", []) for m in state.get("state", {}).values()
    ]
    sources = [(f"cell{i:02d}", c.get("outputs", [])) for i, c in enumerate(notebook.cells)]
    sources += [(f"widget{i:02d}", outputs) for i, outputs in enumerate(widget_outputs) if outputs]
    written = []
    for prefix, outputs in sources:
        for output_index, output in enumerate(outputs):
            png = output.get("data", {}).get("image/png")
            if png:
                path = figure_dir / f"{prefix}_{output_index}.png"
                path.write_bytes(base64.b64decode(png))
                written.append(path)
    return written


HANG_GUARD_S = float(os.environ.get("AGPO_LAB_NOTEBOOK_HANG_GUARD_S", 45))
"""Per-cell limit in the tests: only a hung kernel reaches it. With small settings the slowest
cell (notebook 05's LoRA steps on SmolLM2) takes about 11 s here; a hang then costs this much and
one rerun of the notebook instead of a stuck test run. ipykernel 6.31 with pyzmq 27.3 still hangs
now and then (five times in fresh-clone `make test` runs on 2026-11-29, four of them on the first
notebook): both processes idle in epoll with empty socket queues. Neither a no-op probe cell
after start nor a kernel_info request after 20 s of silence (tried) woke such a kernel."""


def run_notebook(
    path: Path, overrides: dict, figure_dir: Path, hang_guard_s: float | None = HANG_GUARD_S
) -> tuple[nbformat.NotebookNode, list[Path]]:
    """Execute `path` with `overrides` injected; return the executed notebook and figure paths.

    A kernel that does not answer within `hang_guard_s` (see HANG_GUARD_S) is restarted and the
    notebook run once more, with a note on stderr; an error in a cell is never retried.
    """
    # The kernel inherits our environment; the tests set MPLBACKEND=Agg, under which plt.show()
    # draws nothing. The inline backend is what JupyterLab uses and what puts PNGs in outputs.
    saved = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    # After a real kernel hang and its clean-up, SIGINT in this process was once found ignored
    # (SIG_IGN; seen in a fresh-clone `make test`, origin not found): put back what was there.
    saved_sigint = signal.getsignal(signal.SIGINT)
    try:
        for attempt in (1, 2):
            notebook = inject_parameters(nbformat.read(path, as_version=4), overrides)
            client = NotebookClient(
                notebook,
                timeout=hang_guard_s,
                kernel_name="python3",
                resources={"metadata": {"path": str(path.parent)}},
            )
            try:
                client.execute()
                break
            except (CellTimeoutError, DeadKernelError) as err:
                if attempt == 2:
                    raise
                print(f"{path.name}: the kernel stopped answering ({type(err).__name__}); "
                      "running the notebook once more", file=sys.stderr)  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, saved_sigint)
        if saved is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = saved
    return notebook, save_figures(notebook, figure_dir / path.stem)


def main() -> None:
    """`python tests/notebook_runner.py NOTEBOOK [--small]`: run a notebook headless as JupyterLab
    would (its defaults, or the test settings), print its wall time, save its figures."""
    import argparse
    import ast
    import time

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--small", action="store_true", help="inject SMALL = True (the tests)")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                        help="more parameters, values as Python literals (STEPS=80)")  # fmt: skip
    args = parser.parse_args()
    overrides = {"SMALL": True} if args.small else {}
    for item in args.set:
        name, _, value = item.partition("=")
        overrides[name] = ast.literal_eval(value)
    started = time.perf_counter()
    executed, figures = run_notebook(
        args.notebook.resolve(),
        overrides,
        args.notebook.resolve().parent / "_figures",
        hang_guard_s=None,  # bigger settings may run long cells
    )
    errors = [o for c in executed.cells for o in c.get("outputs", []) if o.output_type == "error"]
    minutes, seconds = divmod(time.perf_counter() - started, 60)
    print(f"{args.notebook.name}: {int(minutes)} min {seconds:.0f} s, {len(figures)} figures, "
          f"{len(errors)} errors")  # fmt: skip
    raise SystemExit(1 if errors else 0)


if __name__ == "__main__":
    main()
