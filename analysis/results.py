"""Read run directories into plain records (JSON only: no torch), for figures and tables."""

from __future__ import annotations

import json
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


def dataset_label(settings: dict[str, Any], derived: dict[str, Any]) -> str:
    """The dataset as a reader knows it ("CIFAR-10"): derived.dataset_label, recorded at training
    time; for a run trained before that was recorded, the dataset's name, a folder's by its last
    path component (a title never shows a local path)."""
    label = derived.get("dataset_label")
    if label:
        return str(label)
    name = str(settings.get("dataset", "?"))
    kind, _, path = name.partition(":")
    return (Path(path.rstrip("/\\")).name or path) if kind == "folder" else name


def dataset_text(settings: dict[str, Any], derived: dict[str, Any]) -> str:
    """One run's data for a title: "CIFAR-10, 5,000-image subset" or "CIFAR-10 (full train set, 50,000)"."""
    label, subset, n_train = (
        dataset_label(settings, derived),
        settings.get("train_subset"),
        derived.get("n_train"),
    )
    if subset:
        return f"{label}, {int(subset):,}-image subset"
    return f"{label} (full train set, {int(n_train):,})" if n_train else label


def _dataset_text(runs: Sequence[RunRecord]) -> str:
    parts = []
    labels = {r.path: dataset_label(r.settings, r.derived) for r in runs}
    for name in dict.fromkeys(labels.values()):
        group = [r for r in runs if labels[r.path] == name]
        subset = sorted({r.settings.get("train_subset") for r in group if r.settings.get("train_subset")})
        n_train = sorted({r.n_train for r in group if r.n_train})
        if subset:
            parts.append(f"{name}, {'/'.join(f'{n:,}' for n in subset)}-image subset")
        elif n_train:
            parts.append(f"{name} (full train set, {'/'.join(f'{n:,}' for n in n_train)})")
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


def figure_title(
    title: str | None, name: str, runs: Sequence[RunRecord], scale: str | None = None, note: str = ""
) -> str:
    """A figure's title: `title` if given, else "`name` — `describe(runs, scale)`", then `note` (how
    to read the figure) on a line of its own."""
    return title or f"{name} — {describe(runs, scale)}" + (f"\n{note}" if note else "")


def run_labels(runs: Sequence[RunRecord]) -> dict[Path, str]:
    """A short legend label per run path: "B=64", plus whatever tells runs of one batch apart
    (micro-batch, BN batch, eta~, seed, network, stopping rule)."""
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
        if len({_model_text([o]) for o in same}) > 1:
            text += f", {_model_text([r])}"
        if len({stopping_rule(o.settings, cap=False) for o in same}) > 1:
            text += f", {stopping_rule(r.settings, cap=False)}"
        if text in labels.values():
            text += f" ({r.name})"
        labels[r.path] = text
    return labels


# --- families: runs that differ only in their batch and their trial ------------------------------

# Settings free to differ within a family: the batch (SB against LB: batch size, micro-batch, BN
# batch), the trial (seed, init_seed) and where or how a run was computed, not what (device, data
# root, kernels, layout, logging, checkpoints kept). Every other setting is the family's, and
# whether a run was warm-started (init_from) is too, though not from where.
FAMILY_FREE = frozenset(
    {
        "batch_size", "full_batch", "micro_batch", "bn_batch", "seed", "init_seed", "init_from",
        "data_root", "download", "device", "deterministic", "compile", "channels_last", "tf32",
        "tensorboard", "checkpoint_every", "noise_scale",
    }
)  # fmt: skip
STOPPING_SETTINGS = ("epochs", "steps", "until_train_loss", "until_plateau", "plateau_tol")
NETWORK_SETTINGS = ("model", "width", "norm")


def family_key(run: RunRecord) -> tuple[tuple[str, str], ...]:
    """What a run's family is: its settings except FAMILY_FREE, plus whether it was warm-started."""
    kept = {k: v for k, v in run.settings.items() if k not in FAMILY_FREE}
    kept["warm_start"] = bool(run.settings.get("init_from"))
    return tuple(sorted((k, json.dumps(v, sort_keys=True, default=str)) for k, v in kept.items()))


def stopping_rule(settings: dict[str, Any], cap: bool = True) -> str:
    """How a run's length was decided: "until plateau (3 evaluations, tol 0.01), at most 40 epochs"
    (without the ", at most ..." when `cap` is False)."""
    parts = []
    if settings.get("until_plateau"):
        tol = settings.get("plateau_tol", 0.01)
        parts.append(f"until plateau ({settings['until_plateau']} evaluations, tol {tol:g})")
    if settings.get("until_train_loss") is not None:
        parts.append(f"until train loss ≤ {settings['until_train_loss']:g}")
    length = (
        f"{settings['steps']} steps"
        if settings.get("steps") is not None
        else (f"{settings['epochs']} epochs" if settings.get("epochs") is not None else None)
    )
    if not parts:
        return f"fixed length, {length}" if length else "fixed length"
    return ", ".join(parts) + (f", at most {length}" if length and cap else "")


@dataclass
class Family:
    """Runs with the same settings except their batch and trial (see FAMILY_FREE), with names for
    the table rows: `network` (model, width, norm), `stopping` (its stopping rule) and `details`
    (the other settings in which it differs from the families it is shown with)."""

    key: tuple[tuple[str, str], ...]
    runs: list[RunRecord]
    network: str
    stopping: str
    details: str

    @property
    def label(self) -> str:
        """Network, stopping rule and details: what tells this family from the others."""
        return "; ".join(p for p in (self.network, self.stopping, self.details) if p)

    def at(self, batch: int) -> list[RunRecord]:
        """The family's runs at batch size `batch` (diverged ones left out)."""
        return [r for r in self.runs if r.batch_size == batch and not r.diverged]


def families(runs: Sequence[RunRecord]) -> list[Family]:
    """The runs grouped by `family_key`, in the order the families first appear; `details` names
    each setting (other than network and stopping rule) that differs between the families."""
    grouped: dict[tuple[tuple[str, str], ...], list[RunRecord]] = {}
    for run in runs:
        grouped.setdefault(family_key(run), []).append(run)
    settings = {key: dict(key) for key in grouped}
    differing = sorted(
        {k for key in grouped for k, v in key if any(other.get(k) != v for other in settings.values())}
    )
    out = []
    for key, members in grouped.items():
        first = members[0]
        details = []
        for name in differing:
            if name in NETWORK_SETTINGS or name in STOPPING_SETTINGS:
                continue
            if name == "warm_start":
                details.append(
                    "warm-started (init_from)" if first.settings.get("init_from") else "from scratch"
                )
            else:
                details.append(f"{name} = {first.settings.get(name)}")
        out.append(
            Family(key, members, _model_text([first]), stopping_rule(first.settings), ", ".join(details))
        )
    return out
