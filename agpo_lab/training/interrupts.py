"""Ctrl-C as a request to stop: finish the current step, save, stop; a second Ctrl-C stops at once."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator


class StopRequest:
    """Set by the first Ctrl-C (`requested`); the second raises KeyboardInterrupt at once.

    Usage: ``with stop.catching_ctrl_c(): while not stop.requested: ...``. Only the main thread
    can install signal handlers; elsewhere Ctrl-C keeps its default behaviour.
    """

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def catching_ctrl_c(self) -> Iterator[StopRequest]:
        """Install the handler for the block and restore the previous one afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print("\nCtrl-C: stopping after this step (press again to stop now)", file=sys.stderr)

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)
