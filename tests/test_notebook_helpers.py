"""What notebook cells show (`agpo_lab.experiments.notebook`): a figure made without pyplot as a
PNG, and an interrupt or a missing prerequisite as one line that still stops Run All."""

from __future__ import annotations

import nbformat
import pytest
from matplotlib.figure import Figure
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from agpo_lab.experiments.notebook import CellStop, show_figure
from tests.notebook_runner import BoundedPollKernelManager


def test_show_figure_displays_a_figure_made_without_pyplot_as_png(monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", shown.append)
    fig = Figure(figsize=(3, 2))
    fig.subplots().plot([0, 1], [1, 0])
    show_figure(fig)
    assert len(shown) == 1 and shown[0].data[:4] == b"\x89PNG"


def test_a_cell_stop_renders_as_one_line():
    assert CellStop("no runs yet")._render_traceback_() == [
        "\x1b[0;31mCellStop\x1b[0m: no runs yet"
    ]


def _execute(cells: list[str], allow_errors: bool) -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    NotebookClient(
        notebook,
        kernel_name="python3",
        kernel_manager_class=BoundedPollKernelManager,
        allow_errors=allow_errors,
    ).execute()
    return notebook


@pytest.mark.notebook
def test_an_interrupt_and_a_stop_end_their_cells_in_one_line_and_stop_run_all():
    setup = "from agpo_lab.experiments.notebook import CellStop, one_line_interrupts\n"
    setup += "assert one_line_interrupts()"
    cells = [setup, "raise KeyboardInterrupt", "raise CellStop('no runs yet: train one above')"]
    executed = _execute(cells, allow_errors=True)
    interrupted, stopped = (c.outputs for c in executed.cells[1:])
    assert [o.output_type for o in interrupted] == ["error"] and interrupted[
        0
    ].ename == "Interrupted"
    assert (
        len(interrupted[0].traceback) == 1 and "Kernel > Interrupt" in interrupted[0].traceback[0]
    )
    assert [o.output_type for o in stopped] == ["error"]
    assert stopped[0].traceback == ["\x1b[0;31mCellStop\x1b[0m: no runs yet: train one above"]
    with pytest.raises(CellExecutionError):  # an error: Run All goes no further
        _execute([setup, "raise KeyboardInterrupt", "print('ran on')"], allow_errors=False)
