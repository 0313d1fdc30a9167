"""Progress bars: frames on a terminal, nothing in a log."""

from __future__ import annotations

import io
import itertools
import re

import pytest

from sharp.progress import progress_bar


class FakeTerminal(io.StringIO):
    """A text stream that says it is a terminal, as stderr does in an interactive shell."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stream", "enabled"),
    [(io.StringIO(), True), (FakeTerminal(), False)],
    ids=["log-file", "terminal-but-disabled"],
)
def test_a_bar_writes_nothing_to_a_log_or_when_disabled(stream, enabled):
    for _ in progress_bar(range(5), desc="work", enabled=enabled, file=stream, mininterval=0):
        pass
    assert stream.getvalue() == ""


def test_a_bar_on_a_terminal_draws_frames_with_a_rate(monkeypatch):
    # tqdm reads the clock it bound at import: one that ticks 10 ms per reading makes the
    # elapsed time, and so the rate, known and nonzero whatever the machine's speed
    ticks = itertools.count()
    monkeypatch.setattr("tqdm.std.time", lambda: 0.01 * next(ticks))
    stream = FakeTerminal()
    for _ in progress_bar(range(5), desc="work", unit="step", file=stream, mininterval=0):
        pass
    frames = [f for f in stream.getvalue().split("\r") if f.strip()]
    assert frames and frames[-1].startswith("work: 100%")
    assert "5/5" in frames[-1]
    assert re.search(r"\d+(\.\d+)?step/s", frames[-1]), frames[-1]
