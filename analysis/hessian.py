"""Hessian spectra of small- and large-batch solutions: top eigenvalues (Lanczos) and the
smoothed spectral density (stochastic Lanczos quadrature, as in PyHessian, Yao et al. 2020),
the curvature view of Keskar et al. 2017's sharp-minima claim."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D

from analysis.results import RunRecord, batch_sizes, figure_title, run_labels
from analysis.style import (
    NEUTRAL,
    batch_colour,
    finite,
    log_if_positive,
    outputs,
    regime,
    save_figure,
    write_csv,
)
from sharp.errors import SharpError

DENSITY_FLOOR = 1e-9  # densities below this are drawn at it (log axis)
RANK_MARKERS = ("o", "s", "^", "D", "v", "P", "*", "h", "X", "<", ">", "p")


def _provenance(record: dict) -> tuple[object, object]:
    provenance = record.get("provenance", {})
    return provenance.get("probe_set", record.get("n_examples")), provenance.get(
        "bn_mode", record.get("bn_mode")
    )


def hessian_eigenvalues_plot(
    runs: Sequence[RunRecord], out_dir: str | Path, scale: str | None = None, title: str | None = None
) -> list[Path]:
    """Top-k Hessian eigenvalues of each run at its final checkpoint (newest hessian_eigenvalues
    probe), runs ordered by batch size, small batch blue and large batch red, log y (linear if
    an eigenvalue is not positive). Writes hessian_eigenvalues.png/.csv (run, batch_size, rank,
    eigenvalue, probe_set, bn_mode)."""
    found = []
    for r in sorted(runs, key=lambda r: (r.batch_size, r.seed or 0, r.name)):
        record = r.probe("hessian_eigenvalues", "final")
        if record and record.get("eigenvalues"):
            found.append((r, record))
    if not found:
        raise SharpError("no run has a hessian_eigenvalues probe at 'final': run `sharp probe RUN --hessian`")
    png, csv = outputs(out_dir, "hessian_eigenvalues")
    rows = [
        [r.name, r.batch_size, rank, float(value), *_provenance(record)]
        for r, record in found
        for rank, value in enumerate(record["eigenvalues"], start=1)
    ]
    write_csv(csv, ("run", "batch_size", "rank", "eigenvalue", "probe_set", "bn_mode"), rows)

    labels = run_labels([r for r, _ in found])
    fig, axis = plt.subplots(figsize=(max(4.8, 1.0 + 0.8 * len(found)), 4.2))
    for index, (r, record) in enumerate(found):
        colour = batch_colour(r.batch_size)
        values = [float(v) for v in record["eigenvalues"]]
        axis.plot([index] * len(values), values, color=colour, linewidth=1, alpha=0.5)
        for rank, value in enumerate(values):
            axis.plot(
                index,
                value,
                marker=RANK_MARKERS[rank % len(RANK_MARKERS)],
                color=colour,
                markersize=8 if rank == 0 else 5,
                linestyle="none",
            )
    log_if_positive(axis, [row[3] for row in rows])
    axis.set_xticks(
        range(len(found)), [labels[r.path] for r, _ in found], rotation=30, ha="right", fontsize=8
    )
    for tick, (r, _) in zip(axis.get_xticklabels(), found, strict=True):
        tick.set_color(batch_colour(r.batch_size))
    axis.set_xlim(-0.6, len(found) - 0.4)
    axis.set_ylabel(r"Hessian eigenvalue $\lambda_i$ (top-k, final checkpoint)")
    axis.set_title(figure_title(title, "Top Hessian eigenvalues", [r for r, _ in found], scale), fontsize=9)
    k = max(len(record["eigenvalues"]) for _, record in found)
    proxies = [
        Line2D(
            [],
            [],
            marker=RANK_MARKERS[rank % len(RANK_MARKERS)],
            color=NEUTRAL,
            linestyle="none",
            markersize=8 if rank == 0 else 5,
            label=f"λ{rank + 1}",
        )
        for rank in range(k)
    ]
    axis.legend(
        handles=proxies,
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        title="rank",
        title_fontsize=7,
    )
    return [save_figure(fig, png), csv]


def hessian_density_plot(
    runs: Sequence[RunRecord],
    out_dir: str | Path,
    scale: str | None = None,
    title: str | None = None,
    floor: float = DENSITY_FLOOR,
) -> list[Path]:
    """Smoothed Hessian spectral density at the final checkpoint (newest hessian_density probe),
    one panel per batch size side by side (small batch left, large batch right) sharing both axes,
    log y with densities below `floor` drawn at `floor`. Writes hessian_density.png/.csv (run,
    batch_size, eigenvalue, density, density_plotted = max(density, floor))."""
    found = []
    for r in sorted(runs, key=lambda r: (r.batch_size, r.seed or 0, r.name)):
        record = r.probe("hessian_density", "final")
        if record and record.get("grid") and record.get("density"):
            found.append((r, record))
    if not found:
        raise SharpError("no run has a hessian_density probe at 'final': run `sharp probe RUN --density`")
    png, csv = outputs(out_dir, "hessian_density")
    rows = []
    for r, record in found:
        for x, d in zip(record["grid"], record["density"], strict=True):
            value = finite(d)
            rows.append(
                [r.name, r.batch_size, float(x), value, max(value, floor) if value is not None else None]
            )
    write_csv(csv, ("run", "batch_size", "eigenvalue", "density", "density_plotted"), rows)

    sizes = batch_sizes([r for r, _ in found])
    labels = run_labels([r for r, _ in found])
    fig, axes = plt.subplots(
        1, len(sizes), figsize=(3.6 * len(sizes) + 0.8, 3.8), sharex=True, sharey=True, squeeze=False
    )
    for axis, batch in zip(axes[0], sizes, strict=True):
        for r, record in found:
            if r.batch_size != batch:
                continue
            density = [
                max(d, floor) if (d := finite(v)) is not None else float("nan") for v in record["density"]
            ]
            _, bn_mode = _provenance(record)
            same = [o for o, _ in found if o.batch_size == batch]
            axis.plot(
                record["grid"],
                density,
                linestyle=("-", "--", "-.", ":")[same.index(r) % 4],
                color=batch_colour(batch),
                linewidth=1.2,
                label=f"{labels[r.path]} (BN {bn_mode})",
            )
        axis.set_yscale("log")
        axis.set_title(f"B={batch} ({regime(batch)})", fontsize=9, color=batch_colour(batch))
        axis.set_xlabel(r"eigenvalue $\lambda$")
        axis.legend(fontsize=6, loc="upper right")
    axes[0][0].set_ylabel(f"spectral density (smoothed; floor {floor:g})")
    fig.suptitle(
        figure_title(title, "Hessian spectral density (SLQ)", [r for r, _ in found], scale), fontsize=9
    )
    return [save_figure(fig, png), csv]
