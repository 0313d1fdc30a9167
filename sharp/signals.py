"""Stopping a run cleanly: SIGINT and SIGTERM ask the training loop to stop after the current
optimizer step and save a checkpoint; a second signal stops at once.

In a sweep's pool of worker processes the sweep's own process is the one that listens: it
forwards every SIGINT or SIGTERM it gets to its workers as SIGTERM, and the workers ignore
SIGINT (a terminal's Ctrl-C reaches the whole process group, so a worker would otherwise count
one Ctrl-C twice). A worker asked to stop finishes its run's step (or, past training, the
run's probes) and starts no further run.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any


class StopRequested(KeyboardInterrupt):
    """A stop asked for by a signal, raised between two optimizer steps (the state is whole)."""


class _PoolWorker:
    """This process's part in a sweep's pool: whether it is a worker, and whether a stop reached it."""

    active = False
    stop_asked = False


def _note_stop(signum: int, frame: Any) -> None:
    _PoolWorker.stop_asked = True


def listen_as_pool_worker() -> None:
    """Make this process a pool worker: SIGINT ignored, SIGTERM noted between runs (no run starts
    after it) and, inside one, handled by `StopSignals` as everywhere."""
    _PoolWorker.active = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _note_stop)


def pool_worker_stop_asked() -> bool:
    """Whether this pool worker has been asked to stop (always False outside a pool)."""
    return _PoolWorker.stop_asked


class StopSignals:
    """While entered, the first SIGINT or SIGTERM sets `requested`; a second raises
    KeyboardInterrupt at once (the last checkpoint written stays the one to resume from).
    `on_signal(signum)`, if given, is called on each one first (a sweep forwards it so)."""

    def __init__(self, on_signal: Callable[[int], None] | None = None) -> None:
        self.requested = _PoolWorker.stop_asked
        self._on_signal = on_signal
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self._on_signal is not None:
            self._on_signal(signum)
        if _PoolWorker.active:
            _PoolWorker.stop_asked = True
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopSignals:
        listened = (signal.SIGTERM,) if _PoolWorker.active else (signal.SIGINT, signal.SIGTERM)
        for signum in listened:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                break
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
