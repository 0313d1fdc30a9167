"""Sharpness along training (Cohen et al. 2021, "Gradient Descent on Neural Networks Typically
Occurs at the Edge of Stability"; Andreyev & Beneventano 2024, "Edge of Stochastic Stability"):
λ_max and batch sharpness of the rows `sharp train --track-sharpness K` writes to metrics.jsonl,
against optimizer steps with the stability threshold (2/η, 2(1 + β)/η with momentum), the
training loss below, one panel per run; and per run the numbers the papers' claims are about."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from analysis.results import RunRecord, figure_title
from analysis.style import NEUTRAL, batch_colour, finite, outputs, plain_log_labels, save_figure, write_csv
from sharp.errors import SharpError

# Cohen et al. 2021's demonstration (REFERENCE.md, read from the authors' repository figure)
COHEN_2021 = (
    "fc-tanh on the first 5,000 CIFAR-10 images, squared loss, GD at η = 0.01 (2/η = 200): λ_max ≈ 75 "
    "at the start, a shallow dip, a near-linear rise crossing 200 at about step 4,500, then a band of "
    "about 200–212 until 99 % training accuracy near step 9,000; training loss 0.6 → about 0.1"
)
SGD_EXPECTED = (
    "SGD: λ_max below 2/η and lower for smaller batches (Jastrzębski et al. 2020); batch sharpness, not "
    "λ_max, near 2/η (Andreyev & Beneventano 2024)"
)
PANEL_COLUMNS = 4  # panels per row of the figure
LOG_SPAN = 30.0  # a log y axis when the sharpness values span more than this factor


def tracking_rows(run: RunRecord) -> list[dict[str, Any]]:
    """The run's --track-sharpness rows (those with a finite lambda_max), in step order."""
    rows = [m for m in run.metrics if finite(m.get("lambda_max")) is not None]
    return sorted(rows, key=lambda m: m["step"])


@dataclass
class EdgeSummary:
    """Where one run's λ_max and batch sharpness stand against its stability threshold."""

    run: str
    batch_size: int
    lr: float | None
    momentum: float
    schedule: str  # the learning-rate schedule: the threshold follows a decaying rate
    full_batch: bool
    stability_threshold: float  # at the first tracked step
    points: int
    lambda_max_start: float
    lambda_max_peak: float
    first_crossing_step: int | None  # the first tracked step with lambda_max >= threshold
    median_lambda_ratio_after: float | None  # median lambda_max / threshold from that step on
    median_lambda_ratio_last_half: float | None  # over the last half of the tracked steps
    batch_first_crossing_step: int | None
    median_batch_ratio_after: float | None
    median_batch_ratio_last_half: float | None
    median_grad_top_fraction_last_half: float | None
    track_set_size: int | None
    track_bn_mode: str | None


def _first_crossing(rows: Sequence[dict[str, Any]], key: str) -> int | None:
    for row in rows:
        value = finite(row.get(key))
        if value is not None and value >= row["stability_threshold"]:
            return int(row["step"])
    return None


def _median_ratio(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    ratios = [v / r["stability_threshold"] for r in rows if (v := finite(r.get(key))) is not None]
    return statistics.median(ratios) if ratios else None


def _crossing(rows: Sequence[dict[str, Any]], key: str) -> tuple[int | None, float | None, float | None]:
    """The first tracked step with `key` >= threshold, the median `key` / threshold from that step
    on, and that median over the last half of the tracked steps."""
    crossing = _first_crossing(rows, key)
    after = None if crossing is None else _median_ratio([r for r in rows if r["step"] >= crossing], key)
    return crossing, after, _median_ratio(rows[len(rows) // 2 :], key)


def edge_summary(run: RunRecord) -> EdgeSummary | None:
    """The run's EdgeSummary, or None if it has no tracking rows."""
    rows = tracking_rows(run)
    if not rows:
        return None
    crossing, after, last_half = _crossing(rows, "lambda_max")
    batch_crossing, batch_after, batch_last_half = _crossing(rows, "batch_sharpness")
    half = rows[len(rows) // 2 :]
    fractions = [v for r in half if (v := finite(r.get("grad_top_fraction"))) is not None]
    tracking = run.derived.get("tracking") or {}
    return EdgeSummary(
        run=run.name,
        batch_size=run.batch_size,
        lr=run.lr,
        momentum=float(run.settings.get("momentum") or 0.0),
        schedule=str(run.settings.get("schedule") or "constant"),
        full_batch=bool(run.n_train) and run.batch_size >= run.n_train,
        stability_threshold=float(rows[0]["stability_threshold"]),
        points=len(rows),
        lambda_max_start=float(rows[0]["lambda_max"]),
        lambda_max_peak=max(float(r["lambda_max"]) for r in rows),
        first_crossing_step=crossing,
        median_lambda_ratio_after=after,
        median_lambda_ratio_last_half=last_half,
        batch_first_crossing_step=batch_crossing,
        median_batch_ratio_after=batch_after,
        median_batch_ratio_last_half=batch_last_half,
        median_grad_top_fraction_last_half=statistics.median(fractions) if fractions else None,
        track_set_size=tracking.get("set_size"),
        track_bn_mode=tracking.get("bn_mode"),
    )


def _run_title(s: EdgeSummary) -> str:
    kind = "GD (full batch)" if s.full_batch else f"SGD B={s.batch_size}"
    momentum = f", β={s.momentum:g}" if s.momentum else ""
    schedule = f", {s.schedule} schedule" if s.schedule != "constant" else ""
    return f"{kind}, η={s.lr:g}{momentum}{schedule}" if s.lr is not None else kind


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def summary_text(summaries: Sequence[EdgeSummary]) -> str:
    """One sentence per run: λ_max at the start, its first crossing of the threshold and the median
    ratio after it, and the batch sharpness against the threshold (the report's "ours")."""
    parts = []
    for s in summaries:
        crossing = (
            f"first ≥ threshold at step {s.first_crossing_step:,}, median λ_max/threshold after "
            f"{_fmt(s.median_lambda_ratio_after)}"
            if s.first_crossing_step is not None
            else f"never ≥ threshold (peak {_fmt(s.lambda_max_peak, 4)}; median ratio over the last half "
            f"{_fmt(s.median_lambda_ratio_last_half)})"
        )
        parts.append(
            f"{_run_title(s)} (threshold {s.stability_threshold:.4g}): λ_max {s.lambda_max_start:.4g} at the "
            f"start, {crossing}; batch sharpness/threshold median over the last half "
            f"{_fmt(s.median_batch_ratio_last_half)}"
        )
    return "; ".join(parts)


def sharpness_along_training(
    runs: Sequence[RunRecord], out_dir: str | Path, scale: str | None = None, title: str | None = None
) -> list[Path]:
    """λ_max (line) and batch sharpness (dots) against optimizer steps with the stability threshold
    (dashed), the evaluated training loss below, one panel per run (GD first, then SGD by batch
    size). Writes sharpness_tracking.png, sharpness_tracking.csv (run, batch_size, lr, step,
    lambda_max, batch_sharpness, grad_top_fraction, stability_threshold, hvps, eval_train_loss:
    the tracked rows and the evaluations, blanks where a row has no value) and
    sharpness_tracking_summary.csv (the EdgeSummary of each run)."""
    tracked = [(r, s) for r in runs if (s := edge_summary(r)) is not None]
    if not tracked:
        raise SharpError("no run has lambda_max rows in metrics.jsonl: train with --track-sharpness K")
    tracked.sort(key=lambda item: (not item[1].full_batch, item[0].batch_size, item[1].lr or 0, item[0].name))
    png, csv = outputs(out_dir, "sharpness_tracking")
    rows = []
    for r, _ in tracked:
        for m in tracking_rows(r):
            values = [m["lambda_max"], m.get("batch_sharpness"), m.get("grad_top_fraction")]
            rows.append(
                [
                    r.name,
                    r.batch_size,
                    r.lr,
                    m["step"],
                    *values,
                    m["stability_threshold"],
                    m.get("hvps"),
                    None,
                ]
            )
        for m in r.evaluations:
            rows.append(
                [r.name, r.batch_size, r.lr, m["step"], *([None] * 5), finite(m.get("eval_train_loss"))]
            )
    header = ("run", "batch_size", "lr", "step", "lambda_max", "batch_sharpness", "grad_top_fraction")
    write_csv(csv, (*header, "stability_threshold", "hvps", "eval_train_loss"), rows)
    summaries = [s for _, s in tracked]
    fields = list(asdict(summaries[0]))
    summary_csv = Path(out_dir) / "sharpness_tracking_summary.csv"
    write_csv(summary_csv, fields, [[asdict(s)[f] for f in fields] for s in summaries])

    columns = min(len(tracked), PANEL_COLUMNS)
    panel_rows = math.ceil(len(tracked) / columns)
    fig, axes = plt.subplots(
        2 * panel_rows,
        columns,
        figsize=(max(7.0, 3.6 * columns), 4.6 * panel_rows + 0.8),
        gridspec_kw={"height_ratios": [2, 1] * panel_rows},
        squeeze=False,
        layout="constrained",
    )
    for index, (r, s) in enumerate(tracked):
        top, bottom = (
            axes[2 * (index // columns)][index % columns],
            axes[2 * (index // columns) + 1][index % columns],
        )
        bottom.sharex(top)
        colour = batch_colour(r.batch_size)
        points = tracking_rows(r)
        steps = [m["step"] for m in points]
        lam = [float(m["lambda_max"]) for m in points]
        batch = [(m["step"], v) for m in points if (v := finite(m.get("batch_sharpness"))) is not None]
        threshold = [float(m["stability_threshold"]) for m in points]
        top.plot(
            steps, lam, color=colour, linewidth=1.4, marker="o", markersize=2.5, label=r"$\lambda_{max}$"
        )
        if batch:
            top.plot(
                *zip(*batch, strict=True),
                color=colour,
                linestyle="none",
                marker="x",
                markersize=3.5,
                alpha=0.7,
                label="batch sharpness",
            )
        threshold_label = r"$2(1+\beta)/\eta$" if s.momentum else r"$2/\eta$"
        top.plot(steps, threshold, color=NEUTRAL, linestyle="--", linewidth=1.0, label=threshold_label)
        values = [v for v in lam + [b for _, b in batch] + threshold if v > 0]
        if values and max(values) / min(values) > LOG_SPAN:
            top.set_yscale("log")
            plain_log_labels(top, "y")
        top.set_title(_run_title(s), fontsize=8)
        top.tick_params(labelbottom=False)
        if index % columns == 0:
            top.set_ylabel("sharpness (loss / parameter²)")
            bottom.set_ylabel(f"training loss ({r.settings.get('loss', 'ce')})")
        top.legend(fontsize=6, loc="best")
        losses = [
            (m["step"], v) for m in r.evaluations if (v := finite(m.get("eval_train_loss"))) is not None
        ]
        if losses:
            bottom.plot(*zip(*losses, strict=True), color=colour, linewidth=1.2)
        bottom.set_xlabel("optimizer step")
    for index in range(len(tracked), panel_rows * columns):
        axes[2 * (index // columns)][index % columns].axis("off")
        axes[2 * (index // columns) + 1][index % columns].axis("off")
    fig.suptitle(
        figure_title(
            title,
            "Sharpness along training",
            [r for r, _ in tracked],
            scale,
            "line: λ_max of the tracking-set loss; x: batch sharpness of the step's batch; dashed: the "
            "stability threshold; below: evaluated training loss",
        ),
        fontsize=9,
    )
    return [save_figure(fig, png), csv, summary_csv]
