"""One Markdown report from run directories: Keskar et al. 2017's tables and every figure the runs
support (Keskar et al. 2017, Masters & Luschi 2018, McCandlish et al. 2018, Hessian spectra), the
settings of each run and the probe set and BN mode behind every measurement."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.ablation import keskar_ablation
from analysis.accumulation import accumulation_curves
from analysis.correlate import (
    CorrelationResult,
    Study,
    correlate,
    correlation_table,
    declared_axes,
    notes,
    paper_note,
    settings_text,
    write_correlation,
)
from analysis.edge_of_stability import (
    COHEN_2021,
    SGD_EXPECTED,
    edge_summary,
    sharpness_along_training,
    summary_text,
)
from analysis.headline import FIGURE_ONLY, headlines
from analysis.hessian import DENSITY_FLOOR, hessian_density_plot, hessian_eigenvalues_plot
from analysis.interpolation import plot_interpolation
from analysis.keskar import (
    keskar_batch_size,
    keskar_piggyback,
    keskar_sharpness_along_training,
    warm_start_epoch,
)
from analysis.masters_luschi import ml_accuracy_vs_lr, ml_best_vs_batch, ml_bn_heatmap
from analysis.noise import noise_scale_over_training, steps_vs_examples
from analysis.results import (
    RunRecord,
    batch_sizes,
    checkpoint_epoch,
    checkpoint_of,
    dataset_label,
    describe,
    families,
    stopping_rule,
)
from analysis.sam import sam_comparison, sam_table
from analysis.sam import variant as sam_variant
from analysis.style import LARGE_BATCH_MIN, finite
from analysis.tables import DASH, format_number, keskar_tables, markdown_table, table_families
from sharp.config import check_choice
from sharp.errors import SharpError
from sharp.fileio import atomic_write_bytes

PREFERRED_EPS = 1e-3


@dataclass
class Figure:
    """One figure of the report: section heading, caption, alt text and the files drawn."""

    heading: str
    caption: str
    alt: str
    paths: list[Path]


# --- what the runs support -------------------------------------------------------------------


def _sharpness_eps(runs: Sequence[RunRecord], epoch_checkpoints: bool) -> float | None:
    """The eps to plot: 1e-3 if probed (full space), else the smallest eps probed."""
    found = set()
    for r in runs:
        for record in r.probes_of("epsilon_sharpness", subspace_dim=None):
            label = checkpoint_of(record)
            if (checkpoint_epoch(label) is not None) if epoch_checkpoints else label == "final":
                eps = finite(record.get("eps", record.get("settings", {}).get("eps")))
                if eps is not None:
                    found.add(eps)
    if not found:
        return None
    return next((e for e in found if math.isclose(e, PREFERRED_EPS)), min(found))


def _accumulation_runs(runs: Sequence[RunRecord]) -> list[RunRecord]:
    """Runs of the effective batches that were trained with two or more micro-batch sizes, and the
    true batches whose size is the micro-batch of an accumulated run (a small batch against the
    large one it is accumulated into)."""
    chosen = []
    for batch in batch_sizes(runs):
        group = [r for r in runs if r.batch_size == batch]
        if len({r.micro_batch for r in group}) > 1:
            chosen.extend(group)
    micro_sizes = {r.micro_batch for r in chosen if r.micro_batch < r.batch_size}
    chosen += [
        r for r in runs if r not in chosen and r.micro_batch >= r.batch_size and r.batch_size in micro_sizes
    ]
    return chosen


def _ceil_3(value: float) -> float:
    """`value` rounded up to 3 significant digits (goal losses readable in a legend)."""
    if value <= 0:
        return value
    step = 10 ** (math.floor(math.log10(value)) - 2)
    return round(math.ceil(value / step - 1e-9) * step, 12)


def default_goal_losses(runs: Sequence[RunRecord], count: int = 3) -> list[float]:
    """Goal training losses that the best run of every batch size reaches (McCandlish et al. 2018
    measure S and E per goal, at the best learning rate per batch size): from the highest of those
    best final losses, geometrically up towards the lowest starting loss."""
    ends: dict[int, float] = {}
    starts = []
    for r in runs:
        losses = [v for m in r.evaluations if (v := finite(m.get("eval_train_loss"))) is not None]
        if len(losses) >= 2:
            ends[r.batch_size] = min(ends.get(r.batch_size, math.inf), min(losses))
            starts.append(losses[0])
    if len(ends) < 2:
        return []
    low, high = max(ends.values()), min(starts)
    if not 0 < low < high:
        return []
    ratio = (high / low) ** (1 / count)
    return sorted({_ceil_3(low * ratio**i) for i in range(count)})


# --- text --------------------------------------------------------------------------------------


def _v(value: Any) -> str:
    return DASH if value is None or value == "" else str(value)


def _lr_rule(r: RunRecord) -> str:
    s = r.settings
    if s.get("lr") is not None:
        text = f"lr = {s['lr']:g}"
    elif s.get("base_lr") is not None:
        scaling = s.get("lr_scaling", "none")
        text = f"base_lr = {s['base_lr']:g}, {scaling} scaling"
        if scaling != "none":
            text += f" (reference batch {s.get('reference_batch', 1)})"
        if r.derived.get("lr") is not None:
            text += f" → lr = {r.derived['lr']:g}"
    else:
        text = f"lr = {_v(r.derived.get('lr'))} (default)"
    if s.get("warmup"):
        text += f", warm-up {s['warmup']:g} of steps ({s.get('warmup_style', 'ml')})"
    return text


def _schedule(r: RunRecord) -> str:
    s = r.settings
    name = s.get("schedule", "constant")
    if name == "step":
        name += f" (÷{1 / s['gamma']:g} at {s.get('milestones')})" if s.get("gamma") else ""
    if s.get("batch_schedule"):
        name += f"; batch schedule {s['batch_schedule']}"
    return name


def _length(r: RunRecord) -> str:
    planned = r.derived.get("total_steps")
    return stopping_rule(r.settings) + (f" ({planned} steps planned)" if planned is not None else "")


def _optimizer(r: RunRecord) -> str:
    s = r.settings
    text = str(s.get("optimizer", DASH))
    extras = []
    if s.get("momentum"):
        extras.append(f"momentum {s['momentum']:g}")
    if s.get("weight_decay"):
        extras.append(f"wd {s['weight_decay']:g}")
    return text + (f" ({', '.join(extras)})" if extras else "")


def _dataset(r: RunRecord) -> str:
    s, n, label = r.settings, r.n_train, dataset_label(r.settings, r.derived)
    if s.get("train_subset"):
        return f"{label} (subset {s['train_subset']:,})"
    return f"{label} (full, {n:,})" if n else label


def settings_table(runs: Sequence[RunRecord]) -> str:
    """One Markdown row per run with the settings that define it and its final result."""
    header = (
        "run", "dataset (train set)", "model", "width", "norm", "batch", "micro-batch", "BN batch",
        "optimizer", "learning rate", "schedule", "length", "augment", "seed", "test acc (%)", "test loss",
        "state",
    )  # fmt: skip
    rows = []
    for r in runs:
        final = r.evaluations[-1] if r.evaluations else {}
        augment = r.derived.get("augment", r.settings.get("augment"))
        rows.append(
            [
                r.name,
                _dataset(r),
                _v(r.settings.get("model")),
                _v(r.settings.get("width")),
                _v(r.settings.get("norm")),
                str(r.batch_size),
                str(r.micro_batch),
                _v(r.bn_batch),
                _optimizer(r),
                _lr_rule(r),
                _schedule(r),
                _length(r),
                _v(augment),
                _v(r.seed),
                format_number(100 * final["test_acc"]) if final.get("test_acc") is not None else DASH,
                format_number(final.get("test_loss")) if final.get("test_loss") is not None else DASH,
                r.state + (f" ({r.status['reason']})" if r.status.get("reason") and r.diverged else ""),
            ]
        )
    return markdown_table(header, rows)


def _probe_setting(record: dict[str, Any]) -> str:
    kind, s = record.get("probe"), {**record.get("settings", {}), **record}
    if kind == "epsilon_sharpness":
        space = "full space" if s.get("subspace_dim") is None else f"subspace p={s['subspace_dim']}"
        return f"ε={s.get('eps'):g}, {space}"
    if kind in ("adaptive_sharpness", "average_sharpness"):
        text = f"ρ={s.get('rho')}, ℓ{s.get('norm')}, {'adaptive' if s.get('adaptive') else 'standard'}"
        return (
            text
            + (f", m={s['m']}" if s.get("m") else "")
            + (f", {s['n_draws']} draws" if s.get("n_draws") else "")
        )
    if kind == "hessian_eigenvalues":
        return f"top-{len(s.get('eigenvalues', []))}, {s.get('method', '')}"
    if kind == "hessian_density":
        return f"SLQ, {s.get('n_iter', '?')} steps x {s.get('n_runs', '?')} vectors"
    if kind == "noise_scale":
        return f"B_small={s.get('b_small')}, B_big={s.get('b_big')}, {s.get('n_pairs')} pairs"
    if kind == "random_direction_scan":
        dims = "2-D" if s.get("betas") else "1-D"
        return f"{dims}, {len(s.get('alphas', []))} points, {s.get('normalization')}"
    return ""


def _probe_value(record: dict[str, Any]) -> str:
    numbers = headlines(record)
    if not numbers:
        return "(figure)" if record.get("probe") in FIGURE_ONLY else DASH
    parts = []
    for h in numbers:
        if isinstance(h.value, list):
            text = ", ".join(f"{v:.4g}" for v in h.value)
        else:
            text = format_number(h.value) + (f" ± {format_number(h.stderr)}" if h.stderr is not None else "")
        parts.append(text if len(numbers) == 1 else f"{h.field} {text}")
    return "; ".join(parts)


def _checkpoints(labels: list[str]) -> str:
    epochs = sorted(e for label in labels if (e := checkpoint_epoch(label)) is not None)
    others = sorted({label for label in labels if checkpoint_epoch(label) is None})
    parts = list(others)
    if len(epochs) > 2:
        parts.insert(0, f"epochs {epochs[0]}–{epochs[-1]} ({len(epochs)} checkpoints)")
    else:
        parts[:0] = [f"epoch-{e:04d}" for e in epochs]
    return ", ".join(parts)


def probes_table(runs: Sequence[RunRecord]) -> str:
    """One Markdown row per (run, probe, settings, probe set, BN mode): the checkpoints measured
    and the newest value at the final checkpoint."""
    header = ("run", "batch", "probe", "settings", "checkpoints", "probe set", "BN mode", "at final")
    rows = []
    for r in runs:
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for record in r.probes:
            provenance = record.get("provenance", {})
            key = (
                record.get("probe", "?"),
                _probe_setting(record),
                provenance.get("probe_set", record.get("n_examples")),
                provenance.get("bn_mode", record.get("bn_mode")),
            )
            groups.setdefault(key, []).append(record)
        for (kind, setting, probe_set, bn_mode), records in groups.items():
            finals = [rec for rec in records if checkpoint_of(rec) == "final"]
            rows.append(
                [
                    r.name,
                    str(r.batch_size),
                    str(kind),
                    setting or DASH,
                    _checkpoints([checkpoint_of(rec) for rec in records]),
                    _v(probe_set),
                    _v(bn_mode),
                    _probe_value(finals[-1]) if finals else DASH,
                ]
            )
    return markdown_table(header, rows) if rows else "No probes were run (`sharp probe RUN ...`)."


# --- figures -------------------------------------------------------------------------------------


def _load_interpolation(item: dict[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(item, dict):
        return item
    path = Path(item)
    if path.is_dir():
        path = path / "interp.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SharpError(f"cannot read the interpolation record {path}: {exc}") from exc


def _paper_figure(record: dict[str, Any]) -> str:
    """Keskar et al.'s figure an interpolation record redraws: Fig. 7 for the sine path, else Fig. 3."""
    return "Fig. 7" if record.get("path") == "sin" else "Fig. 3"


def _interpolation_title(record: dict[str, Any], runs: Sequence[RunRecord], scale: str | None) -> str:
    provenance = record.get("provenance", {})
    names = {Path(str(provenance.get(k, ""))).name for k in ("run_a", "run_b")}
    involved = [r for r in runs if r.name in names] or list(runs)
    a, b = provenance.get("batch_size_a", "?"), provenance.get("batch_size_b", "?")
    bn = record.get("bn", "?")
    path = ", sine path" if record.get("path") == "sin" else ""
    figure = _paper_figure(record)
    return f"Keskar et al. {figure} — {describe(involved, scale)}; x_s: B={a}, x_l: B={b}, BN: {bn}{path}"


@dataclass(frozen=True)
class FigureContext:
    """What every figure of the report may draw from."""

    runs: Sequence[RunRecord]
    figures_dir: Path
    scale: str | None
    interpolations: Sequence[dict[str, Any] | str | Path]
    goal_losses: Sequence[float] | None

    @property
    def text(self) -> str:
        return describe(self.runs, self.scale)


@dataclass(frozen=True)
class FigureSpec:
    """One figure of the report. `needs` returns the data it is drawn from, or None when the runs
    hold none (the figure is then listed as not drawn, with `missing`); `draw` writes its PNG and
    CSVs and returns their paths; `heading`, `caption` and `alt` are text or functions of that
    data. With `per_item`, `needs` returns a list and each item is a figure of its own."""

    name: str
    needs: Callable[[FigureContext], Any]
    draw: Callable[[FigureContext, Any], Any]
    heading: str | Callable[[Any], str]
    caption: str | Callable[[Any], str]
    alt: str | Callable[[Any], str]  # a plain string is followed by the runs' description
    missing: str | None = None
    per_item: bool = False
    label: Callable[[Any], str] | None = None  # names the figure in a failure (default: heading)


def _text(value: str | Callable[[Any], str], data: Any) -> str:
    return value(data) if callable(value) else value


@dataclass(frozen=True)
class _FamilyFigure:
    """A Keskar figure drawn for one family of runs (`analysis.results.families`): `index` of
    `count`, so that the files of several families get names of their own."""

    index: int
    count: int
    label: str
    runs: Sequence[RunRecord]
    eps: float

    def name(self, stem: str) -> str:
        return stem if self.count == 1 else f"{stem}-{self.index}"

    def heading(self, text: str) -> str:
        return text if self.count == 1 else f"{text} — {self.label}"


def _fig4_families(c: FigureContext) -> list[Any] | None:
    """Fig. 4 per family (`analysis.results.families`) with final full-space ε-sharpness probes at
    two or more batch sizes: two networks are never averaged at one batch size."""
    found = []
    for family in families(c.runs):
        eps = _sharpness_eps(family.runs, epoch_checkpoints=False)
        probed = [r for r in family.runs if eps and r.probe("epsilon_sharpness", eps=eps, subspace_dim=None)]
        if eps is not None and len(batch_sizes(probed)) >= 2:
            found.append((family.label, family.runs, eps))
    return [_FamilyFigure(i, len(found), *item) for i, item in enumerate(found, start=1)] or None


def _piggyback_families(c: FigureContext) -> list[Any] | None:
    """Fig. 5 (warm start) per family of warm-started runs that started at two or more epochs k."""
    warm = [r for r in c.runs if warm_start_epoch(r) is not None]
    found = [
        (family.label, family.runs, _sharpness_eps(family.runs, epoch_checkpoints=False) or PREFERRED_EPS)
        for family in families(warm)
        if len({warm_start_epoch(r) for r in family.runs}) >= 2
    ]
    return [_FamilyFigure(i, len(found), *item) for i, item in enumerate(found, start=1)] or None


def _goals(c: FigureContext) -> tuple[list[float], bool] | None:
    goals = list(c.goal_losses) if c.goal_losses is not None else default_goal_losses(c.runs)
    if not goals or len(batch_sizes(c.runs)) < 3:  # two points determine the two-parameter fit exactly
        return None
    several = any(len([r for r in c.runs if r.batch_size == b]) > 1 for b in batch_sizes(c.runs))
    return goals, several


def _any(condition: bool) -> bool | None:
    return True if condition else None


def _decoupled_bn(c: FigureContext) -> bool | None:
    sizes = batch_sizes(c.runs)
    return _any(any(len({r.bn_batch for r in c.runs if r.batch_size == b and r.bn_batch}) > 1 for b in sizes))


def _path_formula(record: dict[str, Any]) -> str:
    if record.get("path") == "sin":
        return "f(sin(απ/2) x_l + cos(απ/2) x_s)"
    return "f(α x_l + (1 − α) x_s)"


@dataclass
class _Interpolation:
    """One `sharp interp` record of the report, read when first needed."""

    index: int
    item: dict[str, Any] | str | Path
    runs: Sequence[RunRecord]
    scale: str | None

    @functools.cached_property
    def record(self) -> dict[str, Any]:
        return _load_interpolation(self.item)

    @functools.cached_property
    def title(self) -> str:
        return _interpolation_title(self.record, self.runs, self.scale)


def _draw_interpolation(c: FigureContext, interp: _Interpolation) -> list[Path]:
    png = c.figures_dir / f"interpolation-{interp.index}.png"
    csv = c.figures_dir / f"interpolation-{interp.index}.csv"
    try:
        plot_interpolation(interp.record, png, csv, title=interp.title)
    except KeyError as exc:  # a record without one of the fields the plot needs
        raise SharpError(str(exc)) from None
    return [png, csv]


@dataclass
class _Correlation:
    """The rank correlations of a sweep's runs with their generalization gap, computed when first needed."""

    study: Study
    scale: str | None

    @functools.cached_property
    def result(self) -> CorrelationResult:
        return correlate(self.study)


def _sweep_correlation(c: FigureContext) -> _Correlation | None:
    """The runs' sweep (SWEEP/sweep.json or OUT/repro.json above every run), or None."""
    roots = {r.path.parent.parent for r in c.runs}
    declared = declared_axes(roots.pop()) if len(roots) == 1 else None
    return None if declared is None else _Correlation(Study(list(c.runs), *declared), c.scale)


def _correlation_caption(corr: _Correlation) -> str:
    result = corr.result
    left_out = notes(result)
    parts = [
        "Kendall's τ of each measure with the generalization gap over the sweep's runs (filled circles: "
        "test − train error; open squares: test − train loss), with percentile bootstrap intervals; Ψ is "
        "Jiang et al. 2020's granulated τ, ψ per axis in granulated.csv.",
        "\n".join(settings_text(result, corr.scale)),
        correlation_table(result),
        paper_note(result),
        "![Each measure against the test − train error gap, by batch size](figures/correlation_scatter.png)",
    ]
    if left_out:
        parts.append("Left out:\n\n" + "\n".join(left_out))
    return "\n\n".join(parts)


_ML_LR_MISSING = "Masters & Luschi accuracy vs η̃: needs runs at two or more base_lr values"

FIGURE_TABLE: tuple[FigureSpec, ...] = (
    FigureSpec(
        "keskar_fig4",
        _fig4_families,
        lambda c, f: keskar_batch_size(
            f.runs, c.figures_dir, eps=f.eps, scale=c.scale, name=f.name("keskar_fig4_batch_size")
        ),
        lambda f: f.heading("Keskar et al. 2017, Fig. 4: accuracy and sharpness against batch size"),
        lambda f: (
            f"Final test accuracy (left axis, circles) and full-space ε-sharpness with ε = {f.eps:g} "
            "(right axis, squares) against batch size, mean ± std over seeds. Keskar et al. see "
            f"accuracy fall and sharpness rise past B ≈ {LARGE_BATCH_MIN}."
        ),
        lambda f: f"Test accuracy and epsilon-sharpness against batch size ({describe(f.runs)})",
        "Keskar Fig. 4: needs final ε-sharpness probes at two or more batch sizes",
        per_item=True,
        label=lambda f: f.heading("Keskar Fig. 4"),
    ),
    FigureSpec(
        "keskar_piggyback",
        _piggyback_families,
        lambda c, f: keskar_piggyback(
            f.runs + [r for r in c.runs if r not in f.runs],
            c.figures_dir,
            eps=f.eps,
            scale=c.scale,
            name=f.name("keskar_fig5_piggyback"),
        ),
        lambda f: f.heading("Keskar et al. 2017, Fig. 5: warm-started (piggybacked) large batch"),
        lambda f: (
            "Large-batch runs started from a small-batch run's checkpoint after k epochs (fresh optimizer), "
            "against k. Top: test accuracy of the small-batch run at epoch k (blue) and of the large-batch "
            "run started there, at its end (red; points per run, lines through the means over seeds). "
            f"Bottom: the large-batch solutions' full-space ε-sharpness (ε = {f.eps:g}), one line per probe "
            "BN mode. In the paper, LB started late enough reaches SB's accuracy and a flat solution."
        ),
        lambda f: (
            f"Test accuracy and sharpness of warm-started large-batch runs against k ({describe(f.runs)})"
        ),
        "Keskar Fig. 5 (warm start): needs runs started from epoch-k checkpoints at two or more k",
        per_item=True,
        label=lambda f: f.heading("Keskar Fig. 5 (warm start)"),
    ),
    FigureSpec(
        "keskar_fig5",
        lambda c: _sharpness_eps(c.runs, epoch_checkpoints=True),
        lambda c, eps: keskar_sharpness_along_training(c.runs, c.figures_dir, eps=eps, scale=c.scale),
        "Keskar et al. 2017, Fig. 5/6: sharpness along training",
        lambda eps: (
            f"Full-space ε-sharpness (ε = {eps:g}) at each epoch checkpoint against the training "
            "cross-entropy there; the x-axis is reversed so training proceeds to the right. In the paper "
            "small-batch sharpness falls as training proceeds and large-batch sharpness rises."
        ),
        "Sharpness against training cross-entropy along training, one line per run",
        "Keskar Fig. 5/6: needs ε-sharpness probes at epoch checkpoints (--checkpoint all)",
    ),
    FigureSpec(
        "interpolation",
        lambda c: [_Interpolation(i, x, c.runs, c.scale) for i, x in enumerate(c.interpolations, start=1)],
        _draw_interpolation,
        lambda interp: f"Keskar et al. 2017, {_paper_figure(interp.record)}: interpolation #{interp.index}",
        lambda interp: (
            f"Cross-entropy (left, log) and accuracy (right) along {_path_formula(interp.record)}: train "
            "solid, test dashed; α = 0 is the small-batch solution x_s, α = 1 the large-batch x_l. "
            f"{interp.title}."
        ),
        lambda interp: f"Loss and accuracy from the small-batch to the large-batch solution ({interp.title})",
        per_item=True,
        label=lambda interp: f"Keskar interpolation #{interp.index}",
    ),
    FigureSpec(
        "hessian_eigenvalues",
        lambda c: _any(any(r.probe("hessian_eigenvalues") for r in c.runs)),
        lambda c, _: hessian_eigenvalues_plot(c.runs, c.figures_dir, scale=c.scale),
        "Hessian: top eigenvalues",
        "Top-k Hessian eigenvalues at the final checkpoint, runs ordered by batch size (log scale).",
        "Top Hessian eigenvalues per run ordered by batch size",
        "Hessian eigenvalues: no hessian_eigenvalues probe at 'final' (sharp probe --hessian)",
    ),
    FigureSpec(
        "hessian_density",
        lambda c: _any(any(r.probe("hessian_density") for r in c.runs)),
        lambda c, _: hessian_density_plot(c.runs, c.figures_dir, scale=c.scale),
        "Hessian: spectral density",
        "Smoothed Hessian spectral density (stochastic Lanczos quadrature) at the final checkpoint, one "
        f"panel per batch size, log density with a floor of {DENSITY_FLOOR:g}.",
        "Hessian eigenvalue density, small and large batch side by side",
        "Hessian density: no hessian_density probe at 'final' (sharp probe --density)",
    ),
    FigureSpec(
        "noise_scale",
        lambda c: _any(any(finite(m.get("noise_b_simple")) for r in c.runs for m in r.metrics)),
        lambda c, _: noise_scale_over_training(c.runs, c.figures_dir, scale=c.scale),
        "McCandlish et al. 2018: gradient noise scale during training",
        "Online B_simple = tr(Σ)/|G|² against examples seen; dotted lines are the batch sizes used. "
        "Batches well below B_simple scale almost perfectly; batches well above it waste examples.",
        "Gradient noise scale B_simple against examples seen, with the batch sizes used",
        "Noise scale: no noise_b_simple in metrics.jsonl (sharp train --noise-scale)",
    ),
    FigureSpec(
        "steps_vs_examples",
        _goals,
        lambda c, g: steps_vs_examples(c.runs, c.figures_dir, g[0], scale=c.scale, best_per_batch=g[1]),
        "McCandlish et al. 2018: steps against examples",
        lambda g: (
            "Optimizer steps S and examples E = S × B each run needed to reach each goal training loss "
            f"({', '.join(f'{v:g}' for v in g[0])}), with the fitted (S/S_min − 1)(E/E_min − 1) = 1; "
            "B_crit = E_min / S_min is in the legend and in steps_vs_examples_fit.csv. S is the step of "
            "the first evaluation at or below the goal, so it is only as fine as the evaluation interval"
            + (" (per batch size, the run that reached the goal first)." if g[1] else ".")
        ),
        "Steps against examples to reach goal training losses, with fitted hyperbolas",
        "Steps vs examples: needs three or more batch sizes and a goal loss the runs reach",
    ),
    FigureSpec(
        "ml_accuracy_vs_lr",
        lambda c: _any(len({r.settings.get("base_lr") for r in c.runs} - {None}) >= 2),
        lambda c, _: ml_accuracy_vs_lr(c.runs, c.figures_dir, scale=c.scale),
        "Masters & Luschi 2018: test accuracy against base learning rate",
        "Test accuracy (median of the last 5 evaluations) against η̃ = η/m, one curve per batch "
        "size; X at the bottom marks diverged runs.",
        "Test accuracy against base learning rate per batch size",
        _ML_LR_MISSING,
    ),
    FigureSpec(
        "ml_best_vs_batch",
        lambda c: _any(len({r.settings.get("base_lr") for r in c.runs} - {None}) >= 2),
        lambda c, _: ml_best_vs_batch(c.runs, c.figures_dir, scale=c.scale),
        "Masters & Luschi 2018: best test accuracy against batch size",
        "The best test accuracy over η̃ at each batch size, labelled with the η̃ that gave it.",
        "Best test accuracy over learning rates against batch size",
        _ML_LR_MISSING,
    ),
    FigureSpec(
        "ml_bn_heatmap",
        _decoupled_bn,
        lambda c, _: ml_bn_heatmap(c.runs, c.figures_dir, scale=c.scale),
        "Masters & Luschi 2018: BN batch against SGD batch",
        "Test accuracy (best over η̃) for each SGD batch (x) and BN batch (y); X: every run diverged; "
        "—: not run.",
        "Heatmap of test accuracy over SGD batch size and BN batch size",
        "Masters & Luschi BN heatmap: needs one SGD batch size run at two or more BN batch sizes",
    ),
    FigureSpec(
        "accumulation",
        lambda c: _accumulation_runs(c.runs) or None,
        lambda c, accumulated: accumulation_curves(accumulated, c.figures_dir, scale=c.scale),
        "Gradient accumulation against true batches",
        "Training cross-entropy and test accuracy against examples seen for runs with the same effective "
        "batch: true batches solid, accumulated micro-batches dashed with markers, one colour per "
        "effective batch. Exact accumulation makes the curves overlap (exactly so without BN and "
        "augmentation).",
        "Learning curves of true and accumulated batches of the same effective size",
        "Accumulation curves: needs one effective batch trained with two micro-batch sizes",
    ),
    FigureSpec(
        "sharpness_tracking",
        lambda c: [s for r in c.runs if (s := edge_summary(r)) is not None] or None,
        lambda c, _: sharpness_along_training(c.runs, c.figures_dir, scale=c.scale),
        "Cohen et al. 2021: sharpness along training (edge of stability)",
        lambda summaries: (
            "λ_max of the tracking-set loss (line) and batch sharpness of each tracked step's own batch "
            "(x) against optimizer steps, with the stability threshold (dashed); evaluated training loss "
            f"below. **Paper** (Cohen et al. 2021): {COHEN_2021}. {SGD_EXPECTED}. **Ours**: "
            f"{summary_text(summaries)}."
        ),
        "Sharpness and batch sharpness against steps with the stability threshold",
        "Sharpness along training: no lambda_max rows in metrics.jsonl (sharp train --track-sharpness K)",
    ),
    FigureSpec(
        "sam",
        lambda c: c.runs if len({sam_variant(r) for r in c.runs}) > 1 else None,
        lambda c, runs: sam_comparison(runs, c.figures_dir, scale=c.scale),
        "SGD vs SAM vs ASAM at small and large batch (Foret et al. 2021; Kwon et al. 2021)",
        lambda runs: (
            "Test accuracy and sharpness of each solution by optimizer variant and batch size, mean ± "
            "std over seeds (bars: blue small batch, red large batch). Does SAM close the small- vs "
            "large-batch gap, and does it lower every sharpness measure or only some?\n\n" + sam_table(runs)
        ),
        "Test accuracy, epsilon-sharpness, adaptive sharpness and top eigenvalue per optimizer and batch",
        "SAM comparison: needs runs with and without --sam-rho",
    ),
    FigureSpec(
        "correlation",
        _sweep_correlation,
        lambda c, corr: write_correlation(corr.result, c.figures_dir, scale=c.scale)[1:],
        "Rank correlation with the generalization gap (Jiang et al. 2020)",
        _correlation_caption,
        "Kendall's tau of each measure with the generalization gap, with bootstrap intervals",
    ),
)
FIGURES = tuple(spec.name for spec in FIGURE_TABLE)


def check_figure_names(names: Iterable[str]) -> list[str]:
    """The figure names as a list, or a SharpError naming the first unknown one."""
    names = list(names)
    for name in names:
        check_choice(name, "figure", FIGURES)
    return names


def _figures(context: FigureContext, only: Collection[str] | None = None) -> tuple[list[Figure], list[str]]:
    """Draw what the runs support (of the figures named in `only`, when given); return the
    figures and why the others were not drawn."""
    drawn: list[Figure] = []
    skipped: list[str] = []
    for spec in FIGURE_TABLE:
        if only is not None and spec.name not in only:
            continue
        data = spec.needs(context)
        if data is None:
            if spec.missing and spec.missing not in skipped:  # figures sharing a condition say it once
                skipped.append(spec.missing)
            continue
        for item in data if spec.per_item else [data]:
            heading = _text(spec.heading, item)
            try:
                result = spec.draw(context, item)
            except SharpError as exc:
                skipped.append(f"{spec.label(item) if spec.label else heading}: {exc}")
                continue
            paths = result[0] if isinstance(result, tuple) else result
            alt = spec.alt(item) if callable(spec.alt) else f"{spec.alt} ({context.text})"
            drawn.append(Figure(heading, _text(spec.caption, item), alt, [Path(p) for p in paths]))
    return drawn, skipped


def build_report(
    runs: Sequence[RunRecord],
    out_dir: str | Path,
    scale: str | None = None,
    title: str | None = None,
    interpolations: Iterable[dict[str, Any] | str | Path] = (),
    notes: Iterable[str] = (),
    goal_losses: Sequence[float] | None = None,
    sb_batch: int | None = None,
    lb_batch: int | None = None,
    figures: Iterable[str] | None = None,
    keskar_section: bool = True,
) -> Path:
    """Write out_dir/report.md and out_dir/figures/*.png/.csv: Keskar et al. 2017's Tables 2-4 (when
    two or more batch sizes have sharpness probes, unless `keskar_section` is False) and every figure
    the runs support, decided from the data (figures without data are listed as not drawn, never an
    error), then each run's settings and the probe set and BN mode of every probe. `interpolations`
    are `sharp interp` records (dicts, interp.json files or their folders); `goal_losses` are
    McCandlish's goal training losses (default: chosen so that every run reaches them); `sb_batch`
    and `lb_batch` are the batch sizes of Keskar's tables (default: the smallest and largest);
    `figures` names the figures to draw (from FIGURES; default: all the runs support)."""
    runs = list(runs)
    only = None if figures is None else check_figure_names(figures)
    if not runs:
        raise SharpError(
            "no runs to report on: give run directories (or sweep folders) that hold config.json"
        )
    out_dir = Path(out_dir)
    figures_dir = out_dir / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    text = describe(runs, scale)
    lines = [
        f"# {title or 'sharp report'}",
        "",
        f"**What was run:** {text}; {len(runs)} run(s).",
        "",
        f"Colours: batch size B < {LARGE_BATCH_MIN} is small batch (blues, darker = smaller), "
        f"B ≥ {LARGE_BATCH_MIN} large batch (reds, darker = larger), in every figure. Each figure's numbers "
        "are in the CSV beside it.",
    ]
    notes = list(notes)
    if notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in notes)]

    sizes = batch_sizes([r for r in runs if not r.diverged])
    if keskar_section and len(sizes) >= 2 and any(r.probes_of("epsilon_sharpness") for r in runs):
        small, large = sb_batch or sizes[0], lb_batch or sizes[-1]
        lines += ["", "## Keskar et al. 2017, Tables 2–4", ""]
        if table_families(runs, small, large):
            lines += [
                f"Small batch (SB) = B {small}, large batch (LB) = B {large}.",
                "",
                keskar_tables(runs, figures_dir, small, large, scale=scale),
                "",
                "Data: [keskar_tables.csv](figures/keskar_tables.csv).",
                "",
                "## Keskar et al. 2017: what sets the size of the effect (LB ÷ SB)",
                "",
                keskar_ablation(runs, figures_dir, small, large),
                "",
                "mean(LB) ÷ mean(SB) of each measure at the final checkpoint, per family of runs (network, "
                "stopping rule, and any other setting in which the families differ) and per BN mode of the "
                "probes; the paper's own ratios (its Tables 2–4) first. Subspace: p = 100 where probed. The "
                "test-accuracy gap is mean SB − mean LB test accuracy in points, from training's own "
                "evaluation (the same in every BN-mode row). Data: "
                "[keskar_ablation.csv](figures/keskar_ablation.csv).",
            ]
        else:
            lines.append(
                f"Not tabulated: no family of runs (the same settings but batch size, micro-batch, BN batch "
                f"and seeds) has finished runs at both B {small} and B {large}."
            )

    context = FigureContext(runs, figures_dir, scale, list(interpolations), goal_losses)
    drawn, skipped = _figures(context, only)
    lines += ["", "## Figures"]
    for figure in drawn:
        png = next(p for p in figure.paths if p.suffix == ".png")
        data = ", ".join(f"[{p.name}](figures/{p.name})" for p in figure.paths if p.suffix == ".csv")
        lines += ["", f"### {figure.heading}", "", f"![{figure.alt}](figures/{png.name})", "", figure.caption]
        lines += ["", f"Data: {data}."] if data else []
    if not drawn:
        lines += ["", "No figure: the runs hold no data any figure needs (see below)."]
    if skipped:
        lines += ["", "Not drawn:", "", *(f"- {reason}" for reason in skipped)]

    lines += ["", "## Runs", "", settings_table(runs), "", "## Probes", "", probes_table(runs), ""]
    report = out_dir / "report.md"
    atomic_write_bytes(report, "\n".join(lines).encode())
    return report
