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
from queue import Empty

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError, DeadKernelError
from nbclient.util import ensure_async


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


HANG_GUARD_S = float(os.environ.get("AGPO_LAB_NOTEBOOK_HANG_GUARD_S", 120))
"""Per-cell limit in the tests: only a hung kernel reaches it (with small settings the slowest
notebook, 05 with its LoRA steps on SmolLM2, takes well under a minute in all, also on a loaded
machine); it turns a hang that the kick below does not cure into a retry, then a failure,
instead of a stuck test run."""
KICK_S = 20.0
"""While a reply is awaited, a kernel_info request goes to the kernel every KICK_S seconds."""


class KickingNotebookClient(NotebookClient):
    """nbclient's client, plus a periodic kernel_info request while a reply is awaited.

    The hangs seen here (ipykernel 6.31, pyzmq 27.3; four in fresh-clone `make test` runs on
    2026-11-29, on different notebooks and cells) leave both processes idle in epoll with empty
    socket queues: the kernel never handles a request that has arrived. That is the lost wake-up
    of an edge-triggered ZMQ socket descriptor (ipython/ipykernel#1529 traces it for ipykernel 7);
    a new message on the same socket raises a new edge, and the kernel then handles both, in
    order. Its reply to the kernel_info request has another parent id and is skipped. A kernel
    that is merely busy queues the request and answers it after the cell: harmless.
    """

    async def async_wait_for_reply(self, msg_id: str, cell=None) -> dict | None:
        timeout, waited, last_kick = self._get_timeout(cell), 0.0, 0.0
        while True:
            try:
                msg = await ensure_async(
                    self.kc.shell_channel.get_msg(timeout=self.shell_timeout_interval)
                )
            except Empty:
                await self._async_check_alive()
                waited += self.shell_timeout_interval
                if timeout and waited > timeout:
                    await self._async_handle_timeout(timeout, cell)
                    return None
                if waited - last_kick >= KICK_S:
                    self.kc.kernel_info()
                    last_kick = waited
                continue
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg


def run_notebook(
    path: Path, overrides: dict, figure_dir: Path, hang_guard_s: float | None = HANG_GUARD_S
) -> tuple[nbformat.NotebookNode, list[Path]]:
    """Execute `path` with `overrides` injected; return the executed notebook and figure paths.

    A kernel that loses a request is woken up (`KickingNotebookClient`); one that still does not
    answer within `hang_guard_s` is restarted and the notebook run once more, with a note on
    stderr; an error in a cell is never retried.
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
            client = KickingNotebookClient(
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
