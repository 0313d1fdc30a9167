"""Stopping a run cleanly: SIGINT and SIGTERM ask the training loop to stop after the current
optimizer step and save a checkpoint; a second signal stops at once."""

from __future__ import annotations

import signal
from typing import Any


class StopRequested(KeyboardInterrupt):
    """A stop asked for by a signal, raised between two optimizer steps (the state is whole)."""


class StopSignals:
    """While entered, the first SIGINT or SIGTERM sets `requested`; a second raises
    KeyboardInterrupt at once (the last checkpoint written stays the one to resume from)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopSignals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                break
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
