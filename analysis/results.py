"""Read run directories into plain records (JSON only: no torch), for figures and tables."""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sharp.fileio import read_json, read_jsonl


@dataclass
class RunRecord:
    """Everything a figure needs from one run directory."""

    path: Path
    settings: dict[str, Any]
    derived: dict[str, Any]
    environment: dict[str, Any]
    status: dict[str, Any]
    metrics: list[dict[str, Any]]  # evaluation records of metrics.jsonl, in order
    probes: list[dict[str, Any]] = field(default_factory=list)  # every RUN/probes/*.json

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def state(self) -> str:
        return self.status.get("state", "unknown")

    @property
    def diverged(self) -> bool:
        return self.state == "diverged"

    @property
    def batch_size(self) -> int:
        return int(self.derived.get("effective_batch") or self.settings["batch_size"])

    @property
    def final(self) -> dict[str, Any]:
        """The last evaluation record (empty if none)."""
        evaluations = [m for m in self.metrics if "test_acc" in m]
        return evaluations[-1] if evaluations else {}

    @property
    def evaluations(self) -> list[dict[str, Any]]:
        """The evaluation records of metrics.jsonl (those with a test accuracy), in order."""
        return [m for m in self.metrics if m.get("test_acc") is not None]

    @property
    def seed(self) -> int | None:
        return self.settings.get("seed")

    @property
    def micro_batch(self) -> int:
        """Examples per forward/backward (accumulation splits a batch into micro-batches)."""
        return int(self.derived.get("micro_batch") or self.settings.get("micro_batch") or self.batch_size)

    @property
    def bn_batch(self) -> int | None:
        """Examples per BN group (ghost BN); None without BN."""
        value = self.derived.get("bn_batch", self.settings.get("bn_batch"))
        return None if value is None else int(value)

    @property
    def lr(self) -> float | None:
        """The peak learning rate eta the run used (settings.lr, else derived.lr)."""
        value = self.settings.get("lr")
        return float(value) if value is not None else _float(self.derived.get("lr"))

    @property
    def base_lr(self) -> float | None:
        """Masters & Luschi 2018's base learning rate eta~ = eta / m: settings.base_lr when the lr
        was derived from it by linear scaling (divided by reference_batch if that is not 1), else
        lr / batch_size."""
        base = self.settings.get("base_lr")
        if base is not None and self.settings.get("lr") is None:
            scaling = self.settings.get("lr_scaling", "none")
            if scaling == "linear":
                reference = self.settings.get("reference_batch") or 1
                return float(base) if reference == 1 else float(base) / reference
        lr = self.lr
        return None if lr is None else lr / self.batch_size

    @property
    def n_train(self) -> int | None:
        return self.derived.get("n_train")

    def record_at_epoch(self, epoch: float) -> dict[str, Any] | None:
        """The evaluation record taken at `epoch` (epoch 0 is the step-0 record), or None."""
        for record in self.evaluations:
            if abs(float(record.get("epoch", math.nan)) - epoch) <= 1e-6:
                return record
        return None

    def median_test_acc(self, last: int = 5) -> float | None:
        """Median test accuracy of the last `last` evaluations (Masters & Luschi 2018's metric;
        fewer if the run has fewer); None if there are none or the median is not finite."""
        values = [float(m["test_acc"]) for m in self.evaluations[-last:]]
        if not values:
            return None
        median = statistics.median(values)
        return median if math.isfinite(median) else None

    def probe(self, kind: str, checkpoint: str = "final", **settings: Any) -> dict[str, Any] | None:
        """The newest probe record of `kind` (e.g. "epsilon_sharpness") at `checkpoint` whose
        fields or settings match `settings` (e.g. eps=1e-3, subspace_dim=None)."""
        found = [p for p in self.probes_of(kind, **settings) if checkpoint_of(p) == checkpoint]
        return found[-1] if found else None

    def probes_of(self, kind: str, **settings: Any) -> list[dict[str, Any]]:
        """Every probe record of `kind` matching `settings`, at any checkpoint."""
        out = []
        for record in self.probes:
            if record.get("probe") != kind:
                continue
            values = {**record.get("settings", {}), **record}
            if all(_same(values.get(k), v) for k, v in settings.items()):
                out.append(record)
        return out


def checkpoint_of(record: dict[str, Any]) -> str:
    """The checkpoint label a probe record was measured at ("final", "epoch-0003", ...)."""
    return record.get("provenance", {}).get("checkpoint", "final")


def checkpoint_epoch(label: str) -> int | None:
    """3 for "epoch-0003"; None for "final" or any other label."""
    match = re.fullmatch(r"epoch-(\d+)", label)
    return int(match.group(1)) if match else None


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1.0)
    return a == b


def load_run(path: str | Path) -> RunRecord:
    """One run directory as a RunRecord (probe files sorted by modification time)."""
    path = Path(path)
    config = read_json(path / "config.json")
    if config is None:
        raise ValueError(f"{path} is not a run directory (no readable config.json)")
    probe_files = sorted((path / "probes").glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    return RunRecord(
        path=path,
        settings=config.get("settings", {}),
        derived=config.get("derived", {}),
        environment=config.get("environment", {}),
        status=read_json(path / "status.json") or {"state": "unknown"},
        metrics=[m for m in read_jsonl(path / "metrics.jsonl") if "step" in m],
        probes=[r for r in (read_json(p) for p in probe_files) if r is not None],
    )


def load_runs(paths: Iterable[str | Path]) -> list[RunRecord]:
    """Run directories, each given directly or as a folder holding run directories (a sweep)."""
    runs = []
    for path in paths:
        path = Path(path)
        if (path / "config.json").exists():
            runs.append(load_run(path))
        else:
            children = path / "runs" if (path / "runs").is_dir() else path
            runs.extend(load_run(p) for p in sorted(children.iterdir()) if (p / "config.json").exists())
    return runs


# --- summaries shared by figures and tables ---------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1) over seeds; std is NaN with one value, and
    both are NaN with none."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    if len(values) == 1:
        return values[0], math.nan
    return statistics.fmean(values), statistics.stdev(values)


def batch_sizes(runs: Sequence[RunRecord]) -> list[int]:
    """The distinct (effective) batch sizes of `runs`, ascending."""
    return sorted({r.batch_size for r in runs})


def _dataset_text(runs: Sequence[RunRecord]) -> str:
    parts = []
    for name in dict.fromkeys(str(r.settings.get("dataset", "?")) for r in runs):
        group = [r for r in runs if str(r.settings.get("dataset", "?")) == name]
        subset = sorted({r.settings.get("train_subset") for r in group if r.settings.get("train_subset")})
        n_train = sorted({r.n_train for r in group if r.n_train})
        sizes = "/".join(f"{n:,}" for n in (subset or n_train))
        if subset:
            parts.append(f"{name} (train subset {sizes})")
        elif sizes:
            parts.append(f"{name} (full train set, {sizes})")
        else:
            parts.append(name)
    return ", ".join(parts)


def _model_text(runs: Sequence[RunRecord]) -> str:
    parts = []
    for r in runs:
        text = str(r.settings.get("model", "?"))
        width = r.settings.get("width", 1.0)
        if width not in (None, 1, 1.0):
            text += f" x{width:g}"
        norm = r.settings.get("norm")
        if norm:
            text += f" ({'no norm' if norm == 'none' else norm})"
        parts.append(text)
    return ", ".join(dict.fromkeys(parts))


def describe(runs: Sequence[RunRecord], scale: str | None = None) -> str:
    """One line naming what was run, for titles and captions: dataset (and training-set size:
    subset or full, from settings.train_subset and derived.n_train), model, batch sizes and
    scale ("cpu" or "full", given by the caller)."""
    if not runs:
        return "no runs" + (f"; scale: {scale}" if scale else "")
    sizes = ", ".join(str(b) for b in batch_sizes(runs))
    text = f"{_dataset_text(runs)}; {_model_text(runs)}; B = {sizes}"
    return text + (f"; scale: {scale}" if scale else "")


def run_labels(runs: Sequence[RunRecord]) -> dict[Path, str]:
    """A short legend label per run path: "B=64", plus whatever tells runs of one batch apart
    (micro-batch, BN batch, eta~, seed)."""
    labels = {}
    for r in runs:
        same = [o for o in runs if o.batch_size == r.batch_size]
        text = f"B={r.batch_size}"
        if len({o.micro_batch for o in same}) > 1:
            text += f", micro {r.micro_batch}"
        if len({o.bn_batch for o in same}) > 1:
            text += f", BN {r.bn_batch}"
        if len({o.base_lr for o in same}) > 1 and r.base_lr is not None:
            text += f", η̃={r.base_lr:.3g}"
        if len({o.seed for o in same}) > 1:
            text += f", seed {r.seed}"
        if text in labels.values():
            text += f" ({r.name})"
        labels[r.path] = text
    return labels
