"""Execute a notebook headless with small settings and save its figures as PNG files.

Each notebook has a cell tagged ``parameters`` (papermill's convention). The runner inserts a cell
right after it that overrides those parameters with small settings, executes the notebook with
nbclient in its own folder, and writes every ``image/png`` output to ``<figure_dir>/<name>/``.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient


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

    The folder is emptied first, so no figure of an earlier version of the notebook lingers.
    """
    if figure_dir.is_dir():
        for stale in figure_dir.glob("*.png"):
            stale.unlink()
    figure_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for cell_index, cell in enumerate(notebook.cells):
        for output_index, output in enumerate(cell.get("outputs", [])):
            png = output.get("data", {}).get("image/png")
            if png:
                path = figure_dir / f"cell{cell_index:02d}_{output_index}.png"
                path.write_bytes(base64.b64decode(png))
                written.append(path)
    return written


HANG_GUARD_S = 1800
"""Per-cell limit: only a hung kernel reaches it (a cell with small settings takes seconds, also
on a loaded machine); it turns a hang into a failure instead of a stuck test run."""


def run_notebook(
    path: Path, overrides: dict, figure_dir: Path
) -> tuple[nbformat.NotebookNode, list[Path]]:
    """Execute `path` with `overrides` injected; return the executed notebook and figure paths."""
    notebook = inject_parameters(nbformat.read(path, as_version=4), overrides)
    client = NotebookClient(
        notebook,
        timeout=HANG_GUARD_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    # The kernel inherits our environment; the tests set MPLBACKEND=Agg, under which plt.show()
    # draws nothing. The inline backend is what JupyterLab uses and what puts PNGs in outputs.
    saved = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    try:
        client.execute()
    finally:
        if saved is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = saved
    return notebook, save_figures(notebook, figure_dir / path.stem)
