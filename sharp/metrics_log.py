"""A run's metrics: `metrics.jsonl` (the source of truth), optionally mirrored as TensorBoard
scalars in `RUN/tensorboard/` (through `torch.utils.tensorboard`, the `tensorboard` extra)."""

from __future__ import annotations

import json
import math
from typing import Any

from sharp.errors import SharpError
from sharp.fileio import append_jsonl, atomic_write_bytes, read_jsonl
from sharp.runs import RunDir

# metrics.jsonl keys that are not scalars to plot (positions and flags)
NOT_SCALARS = ("step", "diverged", "reason")
# the key of the rows measured at the start of a step, before it runs (--track-sharpness): the
# checkpoint at step s is written before the row of step s, so a resume from it drops that row
STEP_START_KEY = "lambda_max"


def _tensorboard_writer(run: RunDir, purge_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SharpError(
            "--tensorboard needs the tensorboard package: pip install 'sharp[tensorboard]'"
        ) from None
    return SummaryWriter(log_dir=str(run.path / "tensorboard"), purge_step=purge_step)


class MetricsLog:
    """Appends one JSON object per record to metrics.jsonl (fsynced), and with `tensorboard` the
    same numbers as scalars at global step `record["step"]`. Only the main process writes."""

    def __init__(self, run: RunDir, is_main: bool = True, tensorboard: bool = False) -> None:
        self.run = run
        self.is_main = is_main
        self.tensorboard = tensorboard and is_main
        self._writer: Any = None

    def append(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        append_jsonl(self.run.metrics, record)
        if self.tensorboard:
            self._scalars(record)

    def _scalars(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            self._writer = _tensorboard_writer(self.run, purge_step=None)
        step = int(record.get("step", 0))
        for key, value in record.items():
            if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def truncate_after(self, step: int) -> None:
        """On resume: drop every line written after the checkpoint at `step` (those of later steps,
        the start-of-step rows of `step` itself, any divergence line), and tell TensorBoard to
        discard its events after that step."""
        if not self.is_main:
            return

        def before(record: dict[str, Any]) -> bool:
            at = record.get("step", 0)
            return (at < step or (at == step and STEP_START_KEY not in record)) and not record.get("diverged")

        kept = [r for r in read_jsonl(self.run.metrics) if before(r)]
        atomic_write_bytes(self.run.metrics, "".join(json.dumps(r) + "\n" for r in kept).encode())
        if self.tensorboard:
            self._writer = _tensorboard_writer(self.run, purge_step=step + 1)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
