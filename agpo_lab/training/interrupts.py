"""Ctrl-C and SIGTERM as a request to stop: finish the current step, save, stop; a second one stops
at once. Work that can be dropped without harm (an evaluation, a step's rollout before the weights
move) is stopped at once by the first one: the trainer marks it with `StopRequest.immediate`.

SIGTERM is what schedulers (Slurm, Kubernetes) and ``docker stop`` send before they kill a job; it
is handled exactly like Ctrl-C, so a preempted run saves its last completed step and resumes.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""The signals that ask a run to stop."""


class StopRequest:
    """Set by the first Ctrl-C or SIGTERM (`requested`); the second raises KeyboardInterrupt.

    Usage: ``with stop.catching_signals(): while not stop.requested: ...``. Only the main thread
    can install signal handlers; elsewhere the signals keep their default behaviour.
    """

    def __init__(self) -> None:
        self.requested = False
        self.immediate = False
        """While True, a stop request raises KeyboardInterrupt at once (and sets `requested`): for
        work that can be dropped, so that a stop does not wait minutes for it on a slow machine."""

    @contextlib.contextmanager
    def catching_signals(self) -> Iterator[StopRequest]:
        """Install the handler for the block and restore the previous ones afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            if self.requested or self.immediate:
                self.requested = True
                raise KeyboardInterrupt
            self.requested = True
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            print(f"\n{name}: stopping after this step (again to stop now)", file=sys.stderr)

        previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
