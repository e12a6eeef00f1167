"""Execute a notebook headless with small settings and save its figures as PNG files.

Each notebook has a cell tagged ``parameters`` (papermill's convention). The runner inserts a cell
right after it that overrides those parameters with small settings, executes the notebook with
nbclient in its own folder, and writes every ``image/png`` output to ``<figure_dir>/<name>/``.
"""

from __future__ import annotations

import base64
import os
import signal
from pathlib import Path
from queue import Empty

import nbformat
from jupyter_client import AsyncKernelManager
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.channels import AsyncZMQSocketChannel
from nbclient import NotebookClient
from traitlets import Type, default


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


def _widget_outputs(notebook: nbformat.NotebookNode) -> dict[str, list[dict]]:
    """Outputs captured by each Output widget of an executed notebook, by model id."""
    state = notebook.metadata.get("widgets", {}).get(
        "application/vnd.jupyter.widget-state+json", {}
    )
    return {
        model_id: model.get("state", {}).get("outputs", [])
        for model_id, model in state.get("state", {}).items()
    }


def _children(notebook: nbformat.NotebookNode, model_id: str) -> list[str]:
    state = notebook.metadata.get("widgets", {}).get(
        "application/vnd.jupyter.widget-state+json", {}
    )
    children = state.get("state", {}).get(model_id, {}).get("state", {}).get("children", [])
    return [c.removeprefix("IPY_MODEL_") for c in children if isinstance(c, str)]


def cell_outputs(notebook: nbformat.NotebookNode, index: int) -> list[dict]:
    """What cell `index` shows: its own outputs, then those of the widgets it displayed (an
    `interact` figure or the live training view lives in an Output widget inside a box)."""
    captured, shown = _widget_outputs(notebook), []
    todo = [
        o["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]
        for o in notebook.cells[index].get("outputs", [])
        if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
    ]
    seen: set[str] = set()
    while todo:
        model_id = todo.pop(0)
        if model_id not in seen:
            seen.add(model_id)
            shown += captured.get(model_id, [])
            todo += _children(notebook, model_id)
    return [*notebook.cells[index].get("outputs", []), *shown]


def cell_pngs(notebook: nbformat.NotebookNode, index: int) -> list[bytes]:
    """The PNG images cell `index` shows (see `cell_outputs`)."""
    return [
        base64.b64decode(o["data"]["image/png"])
        for o in cell_outputs(notebook, index)
        if "image/png" in o.get("data", {})
    ]


POLL_S = 1.0
"""Longest wait on one poll of a kernel socket before looking again (see BoundedPollChannel)."""


class BoundedPollChannel(AsyncZMQSocketChannel):
    """A kernel channel whose unbounded wait is a loop of polls of at most POLL_S seconds.

    Why: nbclient waits for a cell's reply with ``shell_channel.get_msg(timeout=None)``, one
    ``poll()`` with no timeout on the shell socket. While it waits, nbclient's stand-in for the
    front end's Output widget (``nbclient.output_widget.OutputWidget``, used by ``interact`` and by
    our live training view) sends ``comm_msg`` updates on that same socket. Such a send can take the
    socket's wake-up (pyzmq's asyncio sockets are woken by an edge-triggered file descriptor), and
    then the reply sits in the socket's queue while the poll waits forever: the kernel had answered,
    a fresh client got ``kernel_info`` at once, the runner never looked again. A bounded poll looks
    again (``zmq_poll``) when it ends, so a lost wake-up costs at most POLL_S. This is not a limit
    on how long a cell may run: the loop waits as long as the kernel is alive.

    Measured 2026-12-06 on a busy 2-core machine, with a 21-cell notebook holding six ``interact``
    cells: nbclient's own client stalled in 8 of 19 runs, each time right after an ``interact``
    cell's reply; with the Output widget's send switched off, 0 of 10; with this channel, 0 of 20,
    and 15 replies (or idle statuses) were found only by a poll that ended on its bound.
    """

    async def get_msg(self, timeout: float | None = None) -> dict:
        if timeout is not None:
            return await super().get_msg(timeout)
        while True:
            try:
                return await super().get_msg(POLL_S)
            except Empty:
                continue


class BoundedPollKernelClient(AsyncKernelClient):
    """nbclient's kernel client with BoundedPollChannel for the replies and the outputs."""

    shell_channel_class = Type(BoundedPollChannel)
    iopub_channel_class = Type(BoundedPollChannel)


class BoundedPollKernelManager(AsyncKernelManager):
    """nbclient's kernel manager, handing out BoundedPollKernelClient."""

    @default("client_factory")
    def _client_factory_default(self) -> type[AsyncKernelClient]:
        return BoundedPollKernelClient


OUTPUT_WAIT_S = 24 * 3600
"""How long nbclient may wait for a cell's outputs after its reply (its `iopub_timeout`, default
4 s, after which it drops the outputs still to come with only a warning). The kernel sends them
right after the reply, but on a busy machine that can take seconds: never cut them off."""


def run_notebook(
    path: Path, overrides: dict, figure_dir: Path
) -> tuple[nbformat.NotebookNode, list[Path]]:
    """Execute `path` with `overrides` injected; return the executed notebook and figure paths.

    No cell has a time limit (a slow machine is not a hung one); a kernel that dies fails the run.
    """
    # The kernel inherits our environment; the tests set MPLBACKEND=Agg, under which plt.show()
    # draws nothing. The inline backend is what JupyterLab uses and what puts PNGs in outputs.
    saved = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    # After a kernel's clean-up, SIGINT in this process was once found ignored (SIG_IGN; seen in
    # a fresh-clone `make test`, origin not found): put back what was there.
    saved_sigint = signal.getsignal(signal.SIGINT)
    try:
        notebook = inject_parameters(nbformat.read(path, as_version=4), overrides)
        client = NotebookClient(
            notebook,
            kernel_name="python3",
            kernel_manager_class=BoundedPollKernelManager,
            timeout=None,
            iopub_timeout=OUTPUT_WAIT_S,
            startup_timeout=OUTPUT_WAIT_S,  # a kernel starting on a busy machine is slow too
            resources={"metadata": {"path": str(path.parent)}},
        )
        client.execute()
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
    )
    errors = [o for c in executed.cells for o in c.get("outputs", []) if o.output_type == "error"]
    minutes, seconds = divmod(time.perf_counter() - started, 60)
    print(f"{args.notebook.name}: {int(minutes)} min {seconds:.0f} s, {len(figures)} figures, "
          f"{len(errors)} errors")  # fmt: skip
    raise SystemExit(1 if errors else 0)


if __name__ == "__main__":
    main()
