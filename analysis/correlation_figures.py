"""Figures of `sharp correlate`: Kendall's τ of each measure with its bootstrap interval, and each
measure against the generalization gap, one panel per measure, coloured by batch size."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D

from analysis.results import batch_sizes, describe
from analysis.style import NEUTRAL, batch_colour, log_if_positive, outputs, save_figure, write_csv

if TYPE_CHECKING:
    from analysis.correlate import CorrelationResult

TARGET_MARKERS = {"error_gap": "o", "loss_gap": "s"}
SCATTER_TARGET = "error_gap"


def tau_figure(result: CorrelationResult, out_dir: str | Path, scale: str | None = None) -> list[Path]:
    """τ of every measure against both gaps, with the bootstrap interval as a bar. Writes
    correlation_tau.png/.csv (measure, target, tau, tau_low, tau_high, n_runs)."""
    from analysis.correlate import TARGETS

    png, csv = outputs(out_dir, "correlation_tau")
    write_csv(
        csv,
        ("measure", "target", "tau", "tau_low", "tau_high", "n_runs"),
        [
            [c.measure, c.target, c.tau, c.interval.low if c.interval else None,
             c.interval.high if c.interval else None, c.n_runs]
            for c in result.correlations
        ],
    )  # fmt: skip
    measures = result.measures
    fig, axis = plt.subplots(figsize=(7.0, 1.2 + 0.42 * len(measures)))
    offsets = {target: (i - (len(TARGETS) - 1) / 2) * 0.3 for i, target in enumerate(TARGETS)}
    for c in result.correlations:
        if c.tau is None:
            continue
        y = measures.index(c.measure) + offsets[c.target]
        if c.interval is not None and c.interval.low is not None:
            axis.plot([c.interval.low, c.interval.high], [y, y], color=NEUTRAL, linewidth=1.2)
        axis.plot(c.tau, y, marker=TARGET_MARKERS[c.target], color=NEUTRAL, linestyle="none",
                  markerfacecolor="white" if c.target == "loss_gap" else NEUTRAL)  # fmt: skip
    axis.axvline(0, color="#999999", linewidth=0.8, linestyle=":")
    axis.set_xlim(-1.05, 1.05)
    axis.set_ylim(len(measures) - 0.5, -0.5)
    axis.set_yticks(range(len(measures)), measures, fontsize=8)
    axis.set_xlabel("Kendall's τ with the generalization gap")
    handles = [
        Line2D([], [], marker=TARGET_MARKERS[t], color=NEUTRAL, linestyle="none",
               markerfacecolor="white" if t == "loss_gap" else NEUTRAL, label=TARGETS[t])
        for t in TARGETS
    ]  # fmt: skip
    axis.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    level = f"{100 * result.level:g}%"
    axis.set_title(
        f"Rank correlation with the generalization gap ({level} bootstrap intervals, "
        f"{result.n_resamples} resamples)\n{describe([row.run for row in result.rows], scale)}",
        fontsize=9,
    )
    return [save_figure(fig, png), csv]


def scatter_figure(result: CorrelationResult, out_dir: str | Path, scale: str | None = None) -> list[Path]:
    """Each measure (x, log where positive) against the test − train error gap (y, percentage
    points), one panel per measure, every run a point coloured by its batch size. Writes
    correlation_scatter.png/.csv (run, batch_size, measure, value, error_gap)."""
    png, csv = outputs(out_dir, "correlation_scatter")
    rows = [
        [row.run.name, row.run.batch_size, measure, row.measures[measure], row.metrics[SCATTER_TARGET]]
        for measure in result.measures
        for row in result.rows
        if measure in row.measures
    ]
    write_csv(csv, ("run", "batch_size", "measure", "value", "error_gap"), rows)
    taus = {c.measure: c.tau for c in result.correlations if c.target == SCATTER_TARGET}
    columns = min(4, len(result.measures))
    lines = math.ceil(len(result.measures) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 2.8 * lines + 0.6), squeeze=False)
    for index, measure in enumerate(result.measures):
        axis = axes[index // columns][index % columns]
        points = [(row.measures[measure], row.metrics[SCATTER_TARGET], row.run.batch_size)
                  for row in result.rows if measure in row.measures]  # fmt: skip
        for x, y, batch in points:
            axis.plot(x, 100 * y, marker="o", color=batch_colour(batch), linestyle="none", markersize=5)
        log_if_positive(axis, [x for x, _, _ in points], which="x")
        tau = taus.get(measure)
        axis.set_title(f"{measure}\nτ = {'—' if tau is None else f'{tau:.2f}'}", fontsize=8)
        axis.tick_params(labelsize=7)
        if index % columns == 0:
            axis.set_ylabel("test − train error (points)", fontsize=8)
    for index in range(len(result.measures), lines * columns):
        axes[index // columns][index % columns].set_visible(False)
    sizes = batch_sizes([row.run for row in result.rows])
    handles = [
        Line2D([], [], marker="o", color=batch_colour(b), linestyle="none", label=f"B={b}") for b in sizes
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle(
        f"Measures against the generalization gap — {describe([row.run for row in result.rows], scale)}",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    return [save_figure(fig, png), csv]
