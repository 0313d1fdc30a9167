"""Progress bars for terminals only.

Every long loop shows a tqdm bar with its rate; `disable=None` makes tqdm check whether
stderr is a terminal, so CI logs and `sharp demo > log` get the one-line summaries alone,
not thousands of carriage-return frames.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm import tqdm


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar that shows on a terminal when `enabled`, and never in a log."""
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=None if enabled else True, **kwargs)
