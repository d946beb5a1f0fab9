"""Stopping training cleanly on SIGINT (Ctrl-C) or SIGTERM (what schedulers send first).

The first signal only records itself; the training loop stops at the next step boundary, when every run of a
sweep has taken the same steps, so the checkpoint it writes there resumes to the uninterrupted result. A second
signal stops at once (raising Interrupted); the last checkpoint is then the one kept.
"""

from __future__ import annotations

import signal
import threading
from typing import Self

from saelab.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager: while active (main thread only), `received` is the first stop signal's number, or None."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            raise Interrupted(signum, f"stopped at once by a second {signal.Signals(signum).name}; the last checkpoint "
                                      "is kept. Run the same command with --resume to continue from it.")
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
