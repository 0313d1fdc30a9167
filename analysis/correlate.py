"""`sharp correlate`: does a measure rank trained runs by their generalization gap?

Jiang et al. 2020 ("Fantastic Generalization Measures and Where to Find Them") score each measure
by Kendall's τ with the generalization gap over many runs stopped at the same training loss, and
by the granulated τ Ψ over the axes of the sweep. Here, for every finished run that reached its
`until_train_loss` (the matched stopping point): the gaps from its final evaluation (test error −
train error, test loss − train loss; train on the run's evaluation subset) and every headline
number of its final probes (`analysis.headline`); then τ with a bootstrap interval over runs and Ψ
per measure and gap (`analysis.rank`). Reads files only: no torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.headline import HEADLINE_FIELDS, headlines
from analysis.jiang2020 import CITATION, JIANG_2020
from analysis.rank import AxisTau, BootstrapInterval, bootstrap_interval, granulated_tau, kendall_tau
from analysis.results import RunRecord, checkpoint_of, describe, load_runs
from analysis.style import write_csv
from analysis.tables import DASH, DATA_FREE, markdown_table
from sharp.errors import SharpError
from sharp.fileio import atomic_write_bytes, read_json

TARGETS = {"error_gap": "test error − train error", "loss_gap": "test loss − train loss"}
MIN_RUNS = 3  # Kendall's τ over two runs is ±1 whatever the measure
# settings that say how a run was computed, not what was trained: never an axis
NOT_AXES = ("data_root", "download", "device", "deterministic", "channels_last", "compile")
# provenance fields that do not change what a probe measured
NOT_PROBE_SETTINGS = (
    "run", "checkpoint", "checkpoint_path", "task", "probe_split", "augment", "sharp", "torch",
)  # fmt: skip
NORM_TITLES = {
    "l2_norm": "‖w‖₂",
    "distance_from_init": "‖w − w₀‖₂",
    "path_norm": "path norm",
    "frobenius_sq_sum": "Σ‖W‖_F²",
}


# --- the study: runs and the axes of their sweep -------------------------------------------------


@dataclass(frozen=True)
class Axis:
    """One hyperparameter axis: one setting, or several that vary together ("batch_size,micro_batch")."""

    settings: tuple[str, ...]

    @property
    def name(self) -> str:
        return ",".join(self.settings)

    def value(self, run: RunRecord) -> tuple[str, ...]:
        """The run's value on this axis, each setting as canonical JSON text (hashable, comparable)."""
        return tuple(json.dumps(run.settings.get(s), sort_keys=True) for s in self.settings)


@dataclass
class Study:
    """The runs to correlate over, the axes their sweep declares and where both came from."""

    runs: list[RunRecord]
    axes: list[Axis]  # from sweep.json / repro.json; `correlate` adds the other settings that vary
    source: str


def declared_axes(path: Path) -> tuple[list[Axis], str] | None:
    """The axes of a sweep (SWEEP/sweep.json) or a reproduction (OUT/repro.json, every group's axes)."""
    for name, kind in (("sweep.json", "sweep"), ("repro.json", "reproduction")):
        manifest = path / name
        if not manifest.exists():
            continue
        record = read_json(manifest)
        if not isinstance(record, dict):
            raise SharpError(f"{manifest} cannot be read as JSON; run the {kind} again to rewrite it")
        if kind == "sweep":
            keys = list(record.get("axes", {}))
        else:
            groups = record.get("spec", {}).get("groups", {})
            keys = [key for group in groups.values() for key in group.get("axes", {})]
        axes = [Axis(tuple(s.strip() for s in key.split(","))) for key in dict.fromkeys(keys)]
        return axes, f"{kind} {path}"
    return None


def varying_axes(runs: Sequence[RunRecord], covered: set[str]) -> list[Axis]:
    """Settings that differ between runs and no declared axis covers; settings that vary together
    (the same partition of the runs) become one axis."""
    keys = sorted({k for r in runs for k in r.settings} - set(NOT_AXES) - covered)
    by_partition: dict[tuple, list[str]] = {}
    for key in keys:
        values = [json.dumps(r.settings.get(key), sort_keys=True) for r in runs]
        if len(set(values)) > 1:
            first = {v: i for i, v in reversed(list(enumerate(values)))}
            by_partition.setdefault(tuple(first[v] for v in values), []).append(key)
    return [Axis(tuple(group)) for group in by_partition.values()]


def load_study(paths: Iterable[str | Path]) -> Study:
    """Runs of sweep directories (axes from sweep.json), reproductions (axes of repro.json's
    groups) or bare run directories (no declared axes)."""
    runs: dict[Path, RunRecord] = {}
    axes: list[Axis] = []
    sources = []
    for path in map(Path, paths):
        if not path.exists():
            raise SharpError(f"{path} does not exist; give sweep, reproduction or run directories")
        declared = declared_axes(path)
        if declared is not None:
            axes += [a for a in declared[0] if a not in axes]
            sources.append(declared[1])
        else:
            sources.append(f"runs in {path}")
        try:
            found = load_runs([path])
        except (ValueError, OSError) as exc:
            raise SharpError(str(exc)) from None
        runs.update((r.path.resolve(), r) for r in found)
    if not runs:
        raise SharpError(
            f"no run directories in {', '.join(sources)}: give directories made by sharp sweep or sharp train"
        )
    return Study(list(runs.values()), axes, "; ".join(sources))


# --- one row per run: gaps and measures -----------------------------------------------------------


@dataclass(frozen=True)
class MeasureKey:
    """What makes two probe numbers the same measure: the probe task, the number, its settings."""

    kind: str
    task: str
    name: str
    context: tuple[tuple[str, str], ...]


def _measure_keys(record: dict[str, Any]) -> list[tuple[MeasureKey, float]]:
    kind = record.get("probe", "?")
    provenance = record.get("provenance", {})
    context = ()
    if kind not in DATA_FREE:
        context = tuple(
            sorted((k, json.dumps(v)) for k, v in provenance.items() if k not in NOT_PROBE_SETTINGS)
        )
    task = str(provenance.get("task", kind))
    return [
        (MeasureKey(kind, task, h.scalar_name, context), h.scalar)
        for h in headlines(record)
        if h.scalar is not None
    ]


def _title(key: MeasureKey, record: dict[str, Any]) -> str:
    s = {**record.get("settings", {}), **record}
    if key.kind == "epsilon_sharpness":
        space = "full" if s.get("subspace_dim") is None else f"subspace p={s['subspace_dim']}"
        return f"ε-sharpness ε={s.get('eps'):g} {space}"
    if key.kind == "hessian_eigenvalues":
        return "λ_max"
    if key.kind == "hessian_trace":
        return "Hessian trace"
    if key.kind in ("adaptive_sharpness", "average_sharpness"):
        norm = {"linf": "ℓ∞", "l2": "ℓ2"}.get(s.get("norm"), str(s.get("norm")))
        kind = "adaptive" if s.get("adaptive", True) else "standard"
        case = "worst-case" if key.kind == "adaptive_sharpness" else "average"
        return f"{case} {kind} sharpness ρ={s.get('rho'):g} {norm}"
    if key.kind == "noise_scale":
        return f"B_simple ({s.get('b_small')}/{s.get('b_big')})"
    if key.kind == "weight_norms":
        return NORM_TITLES.get(key.name, key.name)
    return f"{key.task} {key.name}"


def _names(examples: dict[MeasureKey, dict[str, Any]]) -> dict[MeasureKey, str]:
    """A unique, readable name per measure: its title, then whatever tells apart measures that
    share a title (the probe task, or the settings in which they differ: BN mode, probe set, ...)."""
    titles = {key: _title(key, record) for key, record in examples.items()}
    names = {}
    for key, title in titles.items():
        same = [k for k, t in titles.items() if t == title]
        extras = []
        if len({k.task for k in same}) > 1:
            extras.append(key.task)
        for field_name, value in key.context:
            if len({dict(k.context).get(field_name) for k in same}) > 1:
                extras.append(f"{field_name}={json.loads(value)}")
        names[key] = title + (f" [{', '.join(extras)}]" if extras else "")
    return names


def _order(key: MeasureKey) -> tuple:
    kinds = list(HEADLINE_FIELDS)
    fields = [f for f, _ in HEADLINE_FIELDS.get(key.kind, ())]
    return (
        kinds.index(key.kind) if key.kind in kinds else len(kinds),
        fields.index(key.name) if key.name in fields else 0,
        key.task,
        key.context,
    )


@dataclass
class RunRow:
    """One run at its final evaluation: its metrics, gaps and measures (by measure name)."""

    run: RunRecord
    metrics: dict[str, float]  # train_error, test_error, error_gap, train_loss, test_loss, loss_gap
    measures: dict[str, float] = field(default_factory=dict)


def _final_metrics(run: RunRecord) -> dict[str, float] | None:
    final = run.evaluations[-1] if run.evaluations else {}
    keys = ("test_acc", "eval_train_acc", "test_loss", "eval_train_loss")
    values = [final.get(k) for k in keys]
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
        return None
    test_acc, train_acc, test_loss, train_loss = values
    return {
        "train_error": 1 - train_acc,
        "test_error": 1 - test_acc,
        "error_gap": (1 - test_acc) - (1 - train_acc),
        "train_loss": train_loss,
        "test_loss": test_loss,
        "loss_gap": test_loss - train_loss,
    }


def _exclusion(run: RunRecord, metrics: dict[str, float] | None, all_runs: bool) -> str | None:
    if run.state != "finished":
        reason = run.status.get("reason")
        return f"{run.state}" + (f" ({reason})" if reason else "")
    if metrics is None:
        return "no final evaluation with test and training loss and accuracy"
    goal = run.settings.get("until_train_loss")
    if goal is not None and metrics["train_loss"] > goal and not all_runs:
        epoch = run.evaluations[-1].get("epoch")
        at = f" at epoch {epoch:g}" if isinstance(epoch, int | float) else ""
        return (
            f"did not reach until_train_loss {goal:g}: final training loss {metrics['train_loss']:.4g}{at} "
            "(--all-runs includes it)"
        )
    return None


def per_run_rows(
    runs: Sequence[RunRecord], all_runs: bool = False
) -> tuple[list[RunRow], list[tuple[str, str]]]:
    """The rows of the runs compared (finished, and at the matched stopping point unless
    `all_runs`), and (run name, reason) for each run left out."""
    rows, excluded = [], []
    for run in runs:
        metrics = _final_metrics(run)
        reason = _exclusion(run, metrics, all_runs)
        if reason is not None:
            excluded.append((run.name, reason))
        elif metrics is not None:
            rows.append(RunRow(run, metrics))
    values: dict[int, dict[MeasureKey, float]] = {}
    examples: dict[MeasureKey, dict[str, Any]] = {}
    for index, row in enumerate(rows):
        found: dict[MeasureKey, float] = {}
        for record in row.run.probes:  # oldest first: the newest record of a measure wins
            if checkpoint_of(record) == "final":
                for key, value in _measure_keys(record):
                    found[key] = value
                    examples[key] = record
        values[index] = found
    names = _names(examples)
    for index, row in enumerate(rows):
        row.measures = {names[k]: values[index][k] for k in sorted(values[index], key=_order)}
    return rows, excluded


# --- correlations ---------------------------------------------------------------------------------


@dataclass
class Correlation:
    """τ, its bootstrap interval and Ψ of one measure against one gap."""

    measure: str
    target: str
    n_runs: int
    tau: float | None
    interval: BootstrapInterval | None
    psi: float | None
    per_axis: list[AxisTau]
    paper: Any = None  # analysis.jiang2020.PaperValue of a confirmed number, or None


@dataclass
class CorrelationResult:
    """Everything `sharp correlate` computed, and the settings behind it."""

    study: Study
    rows: list[RunRow]
    excluded: list[tuple[str, str]]
    measures: list[str]
    correlations: list[Correlation]
    missing: dict[str, list[str]]  # measure -> runs (of those compared) without it
    n_resamples: int
    seed: int
    level: float
    all_runs: bool
    axes: list[Axis]  # the declared axes, then the other settings that differ between the runs compared
    active_axes: list[Axis]  # the axes with two or more values among the runs compared


def _paper_value(measure: str, target: str) -> Any:
    if target != "error_gap":
        return None
    for name, title in NORM_TITLES.items():
        if measure == title and name in JIANG_2020:
            return JIANG_2020[name]
    return None


def correlate(
    study: Study, n_resamples: int = 1000, seed: int = 0, level: float = 0.95, all_runs: bool = False
) -> CorrelationResult:
    """τ (with its percentile bootstrap interval over runs) and Ψ of every measure against both
    gaps, over the runs at the matched stopping point. A measure missing in some runs is computed
    over the others (listed in `missing`); one found in fewer than 3 runs has no τ."""
    if n_resamples < 1:
        raise SharpError(f"--bootstrap {n_resamples}: draw at least one resample")
    rows, excluded = per_run_rows(study.runs, all_runs)
    if not rows:
        why = "; ".join(f"{name}: {reason}" for name, reason in excluded[:3])
        raise SharpError(f"no finished run to compare in {study.source}" + (f" ({why}, ...)" if why else ""))
    if len(rows) < MIN_RUNS:
        raise SharpError(
            f"{len(rows)} run(s) to compare in {study.source}, {len(excluded)} left out: a rank "
            f"correlation needs at least {MIN_RUNS} finished runs at the matched stopping point"
        )
    measures = list(dict.fromkeys(m for row in rows for m in row.measures))
    if not measures:
        raise SharpError(
            f"the runs in {study.source} hold no probe results at their final checkpoint: run "
            "sharp probe RUN --norms --sharpness --hessian ... (or a [probe] table in the sweep) first"
        )
    covered = {s for a in study.axes for s in a.settings}
    axes = study.axes + varying_axes([row.run for row in rows], covered)
    active = [a for a in axes if len({a.value(row.run) for row in rows}) > 1]
    correlations, missing = [], {}
    for measure in measures:
        used = [row for row in rows if measure in row.measures]
        if len(used) < len(rows):
            missing[measure] = [row.run.name for row in rows if measure not in row.measures]
        x = [row.measures[measure] for row in used]
        for target in TARGETS:
            y = [row.metrics[target] for row in used]
            enough = len(used) >= MIN_RUNS
            tau = kendall_tau(x, y) if enough else None
            interval = bootstrap_interval(x, y, n_resamples, seed, level) if enough else None
            values = [[a.value(row.run) for a in active] for row in used]
            psi, per_axis = granulated_tau(values, [a.name for a in active], x, y)
            correlations.append(
                Correlation(
                    measure, target, len(used), tau, interval, psi, per_axis, _paper_value(measure, target)
                )
            )
    return CorrelationResult(
        study,
        rows,
        excluded,
        measures,
        correlations,
        missing,
        n_resamples,
        seed,
        level,
        all_runs,
        axes,
        active,
    )


# --- output ---------------------------------------------------------------------------------------


def _cell(value: float | None, digits: int = 3) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def _sort_key(value: tuple[str, ...]) -> tuple:
    decoded = [json.loads(v) for v in value]
    return tuple((0, float(v), "") if isinstance(v, int | float) else (1, 0.0, str(v)) for v in decoded)


def _axis_values(result: CorrelationResult, axis: Axis) -> str:
    """The values the axis takes among the compared runs, in order ("32, 128"; "32/32, 500/500")."""
    values = sorted({axis.value(row.run) for row in result.rows}, key=_sort_key)
    return ", ".join("/".join(str(json.loads(v)) for v in value) for value in values)


def settings_text(result: CorrelationResult, scale: str | None = None) -> list[str]:
    """The settings behind the numbers, as Markdown bullet points."""
    runs = [row.run for row in result.rows]
    goals = sorted({g for r in runs if (g := r.settings.get("until_train_loss")) is not None})
    if result.all_runs:
        stopping = "every finished run, at its last evaluation (--all-runs: stopping points not matched)"
    elif goals:
        stopping = (
            "runs that reached their until_train_loss ("
            + ", ".join(f"{g:g}" for g in goals)
            + "), at the first evaluation at or below it"
        )
    else:
        stopping = "every finished run at its last evaluation (the runs set no until_train_loss)"
    level = f"{100 * result.level:g} %"
    lines = [
        f"- Runs: {describe(runs, scale)}; {len(result.rows)} compared, {len(result.excluded)} left out.",
        f"- From: {result.study.source}.",
        f"- Matched stopping point: {stopping}.",
        "- Gaps from each run's final evaluation: test error − train error and test loss − train loss, "
        "train on the run's evaluation subset of the training split (eval_train_size), test on its test "
        "split (or test_subset).",
        "- Measures: the newest probe of each kind and setting at the final checkpoint (RUN/probes).",
        "- τ: Kendall's τ_b (scipy.stats.kendalltau) over the runs; interval: percentile bootstrap over "
        f"runs, {level}, {result.n_resamples} resamples, seed {result.seed} (resamples where τ is not "
        "defined are dropped).",
        "- Ψ: the granulated τ of Jiang et al. 2020, the mean over axes of ψ_axis, the mean τ over the "
        "groups of runs in which only that axis varies; an axis with one value among the compared runs "
        "has no group and is left out.",
    ]
    axes = [f"{a.name} ({_axis_values(result, a)})" for a in result.axes]
    lines.append(
        "- Axes: " + ("; ".join(axes) if axes else "none (no setting differs between the runs)") + "."
    )
    return lines


def correlation_table(result: CorrelationResult) -> str:
    """One Markdown row per measure: τ [interval] and Ψ against each gap, and the run count; the
    paper's numbers (Jiang et al. 2020) in their own labelled columns when any is confirmed."""
    by = {(c.measure, c.target): c for c in result.correlations}
    with_paper = any(c.paper is not None for c in result.correlations)
    header = ["measure", "n runs"]
    for target in TARGETS:
        header += [f"τ ({TARGETS[target]}) [{100 * result.level:g} % CI]", f"Ψ ({TARGETS[target]})"]
    if with_paper:
        header += ["τ, Jiang et al. 2020 (paper)", "Ψ, Jiang et al. 2020 (paper)", "paper source"]
    rows = []
    for measure in result.measures:
        first = by[measure, next(iter(TARGETS))]
        row = [measure, str(first.n_runs)]
        for target in TARGETS:
            c = by[measure, target]
            interval = c.interval
            ci = (
                f" [{_cell(interval.low)}, {_cell(interval.high)}]"
                if interval is not None and interval.low is not None
                else ""
            )
            row += [_cell(c.tau) + ci, _cell(c.psi)]
        if with_paper:
            paper = first.paper
            row += [_cell(paper.tau), _cell(paper.psi), paper.table] if paper else [DASH, DASH, DASH]
        rows.append(row)
    return markdown_table(header, rows)


def axes_table(result: CorrelationResult) -> str:
    """ψ per axis (the mean τ over the groups in which only that axis varies), with the group count."""
    if not result.active_axes:
        return "No axis has two or more values among the compared runs: no Ψ."
    header = ["measure", "gap", *(a.name for a in result.active_axes)]
    rows = []
    for c in result.correlations:
        cells = [f"{_cell(a.psi)} ({a.n_groups})" for a in c.per_axis]
        rows.append([c.measure, TARGETS[c.target], *cells])
    return markdown_table(header, rows)


def notes(result: CorrelationResult) -> list[str]:
    """What was left out, and why, as Markdown bullet points."""
    lines = [f"- {name}: {reason}" for name, reason in result.excluded]
    for measure, names in result.missing.items():
        lines.append(
            f"- {measure}: missing in {len(names)} of {len(result.rows)} runs ({', '.join(names)}); "
            "those runs are left out of this measure"
        )
    for c in result.correlations:
        if c.target != next(iter(TARGETS)) or c.tau is not None:
            continue
        if c.n_runs < MIN_RUNS:
            lines.append(f"- {c.measure}: found in {c.n_runs} run(s), fewer than {MIN_RUNS}: no τ")
        else:
            lines.append(f"- {c.measure}: takes one value over the runs (or the gap does): τ is not defined")
    return lines


def paper_note(result: CorrelationResult) -> str:
    if any(c.paper is not None for c in result.correlations):
        return (
            f"Paper columns: {CITATION}, the table named in each row; their runs, measures' exact "
            "definitions and scale differ from these, so compare signs and order, not values."
        )
    return (
        f"{CITATION}: their τ and Ψ are not shown beside ours, because none of their numbers has been "
        "confirmed against the paper's tables yet (analysis/jiang2020.py holds the confirmed ones)."
    )


def write_per_run(result: CorrelationResult, path: Path) -> Path:
    settings = list(dict.fromkeys([*(s for a in result.axes for s in a.settings), "until_train_loss"]))
    metrics = ["train_error", "test_error", "error_gap", "train_loss", "test_loss", "loss_gap"]
    header = ["run", *settings, "epoch", *metrics, *result.measures]
    rows = []
    for row in result.rows:
        r = row.run
        rows.append(
            [
                r.name,
                *(r.settings.get(s) for s in settings),
                r.evaluations[-1].get("epoch"),
                *(row.metrics[m] for m in metrics),
                *(row.measures.get(m) for m in result.measures),
            ]
        )
    return write_csv(path, header, rows)


def write_correlation_csv(result: CorrelationResult, path: Path) -> Path:
    header = ("measure", "target", "tau", "tau_low", "tau_high", "psi", "n_runs")
    rows = [
        [
            c.measure,
            c.target,
            c.tau,
            c.interval.low if c.interval else None,
            c.interval.high if c.interval else None,
            c.psi,
            c.n_runs,
        ]
        for c in result.correlations
    ]
    return write_csv(path, header, rows)


def write_granulated_csv(result: CorrelationResult, path: Path) -> Path:
    header = ("measure", "target", "axis", "psi_axis", "n_groups")
    rows = [[c.measure, c.target, a.axis, a.psi, a.n_groups] for c in result.correlations for a in c.per_axis]
    return write_csv(path, header, rows)


def write_correlation(
    result: CorrelationResult, out_dir: str | Path, scale: str | None = None, title: str | None = None
) -> list[Path]:
    """per_run.csv, correlation.csv, granulated.csv (ψ per axis), correlation.md and the figures
    (correlation_tau.png, correlation_scatter.png, each with its CSV) in `out_dir`."""
    from analysis.correlation_figures import scatter_figure, tau_figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tau_paths = tau_figure(result, out_dir, scale)
    scatter_paths = scatter_figure(result, out_dir, scale)
    written = [
        write_per_run(result, out_dir / "per_run.csv"),
        write_correlation_csv(result, out_dir / "correlation.csv"),
        write_granulated_csv(result, out_dir / "granulated.csv"),
    ]
    left_out = notes(result)
    lines = [
        f"# {title or 'Rank correlation of measures with the generalization gap'}",
        "",
        *settings_text(result, scale),
        "",
        correlation_table(result),
        "",
        paper_note(result),
        "",
        "## ψ per axis (groups with a defined τ in parentheses)",
        "",
        axes_table(result),
        "",
        f"![Kendall's τ per measure with its interval]({tau_paths[0].name})",
        "",
        f"![Each measure against the test − train error gap, by batch size]({scatter_paths[0].name})",
    ]
    if left_out:
        lines += ["", "## Left out", "", *left_out]
    markdown = out_dir / "correlation.md"
    atomic_write_bytes(markdown, ("\n".join(lines) + "\n").encode())
    return [markdown, *written, *tau_paths, *scatter_paths]
