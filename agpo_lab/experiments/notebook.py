"""What a notebook cell shows when it draws or stops: figures as PNG images, stops in one line.

    show_figure(fig)                 # a PNG in JupyterLab, in a headless run and in exported HTML
    one_line_interrupts()            # Kernel > Interrupt ends any cell with one line, no traceback
    raise CellStop("no runs yet: run the training cell above")   # a one-line error, stops Run All

Why a helper for figures: `display(fig)` of a `matplotlib.figure.Figure` made without pyplot has
only a text form (`<Figure size 1080x500 with 4 Axes>`) until the inline backend has been loaded,
which happens on the first pyplot figure; `show_figure` renders the PNG itself, whatever was
drawn before. Why an exception for stops: a cell that ends in an error stops Run All (JupyterLab
runs no further cell), which is what an interrupt or a missing prerequisite should do; IPython
shows an exception with a `_render_traceback_` method by that method's lines, so the stop reads
as one sentence instead of a traceback.
"""

from __future__ import annotations

import io
from typing import Any

from matplotlib.figure import Figure

from agpo_lab import errors


def show_figure(fig: Figure, dpi: float | None = None) -> None:
    """Display `fig` as a PNG image in the running notebook, then close it.

    Closing matters for figures made with pyplot: the inline backend would otherwise draw them a
    second time at the end of the cell. Outside IPython nothing is displayed.
    """
    from IPython.display import Image, display

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")  # the inline backend's crop
    display(Image(data=buffer.getvalue(), format="png"))
    import matplotlib.pyplot as plt

    plt.close(fig)  # a no-op for a figure pyplot does not manage


class CellStop(Exception):
    """An error that a notebook shows as one line (`CellStop: <message>`) and that stops Run All."""

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[0;31m{type(self).__name__}\x1b[0m: {self}"]


class Interrupted(CellStop, errors.Interrupted):
    """Kernel > Interrupt stopped the cell (what was saved, and how to go on, is in the message)."""


def _interrupt_in_one_line(shell: Any, etype: type, value: BaseException, tb: Any, tb_offset=None):
    """IPython custom-exception handler: KeyboardInterrupt as one line (see one_line_interrupts)."""
    stop = Interrupted("Kernel > Interrupt stopped this cell; run it again to redo it")
    structured = stop._render_traceback_()
    shell._showtraceback(Interrupted, stop, structured)  # IPython leaves the showing to us
    return structured


def one_line_interrupts() -> bool:
    """Show a KeyboardInterrupt (Kernel > Interrupt) in this kernel as one line, not a traceback.

    The cell still ends in an error, so Run All stops there. Returns False outside IPython.
    Training through `LiveTraining` stops after its current step and says so in its own line.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None:
        return False
    shell.set_custom_exc((KeyboardInterrupt,), _interrupt_in_one_line)
    return True
