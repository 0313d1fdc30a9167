"""Masters & Luschi 2018, "Revisiting Small Batch Training for Deep Neural Networks": test
accuracy against the base learning rate eta~ = eta / m per batch size, the best accuracy over
eta~ against batch size, and the SGD-batch x BN-batch heatmap.

The accuracy of a run is M&L's metric: the median test accuracy of the last 5 evaluations (fewer
if the run has fewer). Runs that share batch size, BN batch and eta~ (seeds) are averaged;
diverged runs (status "diverged") are counted apart and never averaged in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import LogFormatterSciNotation, NullLocator

from analysis.results import RunRecord, figure_title
from analysis.style import (
    batch_axis,
    batch_colour,
    outputs,
    save_figure,
    write_csv,
)
from sharp.errors import SharpError

DIVERGED_MARKER = "X"
FAMILY_MARKERS = (("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."))


def family(run: RunRecord) -> str:
    """The model family a run belongs to in M&L's figures: model, width and normalization."""
    s = run.settings
    width = f" x{s.get('width'):g}" if s.get("width", 1.0) != 1.0 else ""
    norm = {"bn": "BN", "none": "no norm", "group": "GroupNorm"}.get(s.get("norm"), str(s.get("norm")))
    return f"{s.get('model')}{width} ({norm})"


def _ghost(run: RunRecord) -> bool:
    """A run whose BN batch is smaller than its micro-batch (the BN-batch grid, not the eta~ sweep)."""
    return run.bn_batch is not None and run.micro_batch is not None and run.bn_batch < run.micro_batch


def ml_points(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """One point per (family, batch_size, bn_batch, eta~): n_runs, n_diverged, test_acc (% : mean
    over the runs that did not diverge of each run's median of its last 5 test accuracies; None
    if none has one), diverged (True when every run of the point diverged), ghost (BN batch below
    the micro-batch) and the run names."""
    groups: dict[tuple[str, int, int | None, float], list[RunRecord]] = {}
    for r in runs:
        if r.base_lr is None:
            continue
        groups.setdefault((family(r), r.batch_size, r.bn_batch, r.base_lr), []).append(r)
    points = []
    for (name, batch, bn, base), group in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0, kv[0][3])
    ):
        alive = [r for r in group if not r.diverged]
        accuracies = [a for r in alive if (a := r.median_test_acc(5)) is not None]
        points.append(
            {
                "family": name,
                "batch_size": batch,
                "bn_batch": bn,
                "base_lr": base,
                "n_runs": len(group),
                "n_diverged": len(group) - len(alive),
                "test_acc": 100 * float(np.mean(accuracies)) if accuracies else None,
                "diverged": not alive,
                "ghost": any(_ghost(r) for r in group),
                "runs": ";".join(r.name for r in group),
            }
        )
    return points


def _require(points: list[dict[str, Any]], what: str) -> None:
    if not points:
        raise SharpError(f"no run with a learning rate to plot {what}: give runs with settings.lr or base_lr")


def _eta_text(value: float) -> str:
    exponent = math.log2(value)
    return f"$2^{{{exponent:.0f}}}$" if abs(exponent - round(exponent)) < 1e-9 else f"{value:.3g}"


def ml_accuracy_vs_lr(
    runs: Sequence[RunRecord], out_dir: str | Path, scale: str | None = None, title: str | None = None
) -> list[Path]:
    """Masters & Luschi 2018, Figs. 3-6: test accuracy (median of the last 5 evaluations)
    against the base learning rate eta~ (log2 x), one curve per batch size and one panel per
    model family; diverged points are an X at the bottom of the axes (stacked by batch size).
    Runs of the BN-batch grid (BN batch below the micro-batch) belong to the heatmap and are
    left out. Writes
    ml_accuracy_vs_lr.png/.csv (family, batch_size, bn_batch, base_lr, n_runs, n_diverged,
    test_acc, diverged, runs; test_acc empty where diverged=1)."""
    points = [p for p in ml_points(runs) if not p["ghost"]]
    _require(points, "accuracy against eta~")
    png, csv = outputs(out_dir, "ml_accuracy_vs_lr")
    columns = (
        "family",
        "batch_size",
        "bn_batch",
        "base_lr",
        "n_runs",
        "n_diverged",
        "test_acc",
        "diverged",
        "runs",
    )
    write_csv(csv, columns, [[int(p[c]) if c == "diverged" else p[c] for c in columns] for p in points])

    families = list(dict.fromkeys(p["family"] for p in points))
    fig, axes = plt.subplots(
        1, len(families), figsize=(5.2 * len(families) + 1.2, 4.2), sharey=True, squeeze=False
    )
    for axis, name in zip(axes[0], families, strict=True):
        bottom = axis.get_xaxis_transform()  # x in data, y in axes fraction
        diverged_shown = False
        mine = [p for p in points if p["family"] == name]
        for rank, batch in enumerate(sorted({p["batch_size"] for p in mine})):
            curve = [p for p in mine if p["batch_size"] == batch]
            colour = batch_colour(batch)
            ok = [p for p in curve if p["test_acc"] is not None]
            axis.plot(
                [p["base_lr"] for p in ok],
                [p["test_acc"] for p in ok],
                color=colour,
                marker="o",
                markersize=4,
                linewidth=1.3,
                label=f"m={batch}",
            )
            failed = [p["base_lr"] for p in curve if p["diverged"]]
            if failed:
                axis.plot(
                    failed,
                    [0.03 + 0.035 * rank] * len(failed),  # stacked by batch size: coinciding X's stay visible
                    transform=bottom,
                    linestyle="none",
                    marker=DIVERGED_MARKER,
                    color=colour,
                    markersize=7,
                    clip_on=False,
                    label=None if diverged_shown else "diverged",
                )
                diverged_shown = True
        axis.set_xscale("log", base=2)
        axis.xaxis.set_major_formatter(LogFormatterSciNotation(base=2))
        axis.xaxis.set_minor_locator(NullLocator())
        axis.set_xlabel(r"base learning rate $\tilde\eta = \eta / m$ (log$_2$)")
        axis.set_title(name, fontsize=9)
        axis.legend(fontsize=7, loc="best")
    axes[0][0].set_ylabel("test accuracy (%)\nmedian of the last 5 evaluations")
    fig.suptitle(figure_title(title, "Masters & Luschi: accuracy vs η̃", runs, scale), fontsize=9)
    return [save_figure(fig, png), csv]


def best_over_lr(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per family and batch size: the best test accuracy over eta~ (and BN batch), the eta~ that
    gave it, how many eta~ were tried and how many points diverged entirely."""
    best = []
    for name, batch in sorted({(p["family"], p["batch_size"]) for p in points}):
        group = [p for p in points if p["family"] == name and p["batch_size"] == batch]
        ok = [p for p in group if p["test_acc"] is not None]
        top = max(ok, key=lambda p: p["test_acc"]) if ok else None
        best.append(
            {
                "family": name,
                "batch_size": batch,
                "best_test_acc": top["test_acc"] if top else None,
                "best_base_lr": top["base_lr"] if top else None,
                "best_bn_batch": top["bn_batch"] if top else None,
                "n_base_lr": len({p["base_lr"] for p in group}),
                "n_diverged": sum(p["diverged"] for p in group),
            }
        )
    return best


def ml_best_vs_batch(
    runs: Sequence[RunRecord], out_dir: str | Path, scale: str | None = None, title: str | None = None
) -> list[Path]:
    """Masters & Luschi 2018: the best test accuracy over eta~ against
    batch size (log2 x), each point labelled with its eta~. Writes ml_best_vs_batch.png/.csv
    (family, batch_size, best_test_acc, best_base_lr, best_bn_batch, n_base_lr, n_diverged); one
    line per model family."""
    points = ml_points(runs)
    _require(points, "the best accuracy against batch size")
    best = best_over_lr(points)
    png, csv = outputs(out_dir, "ml_best_vs_batch")
    columns = (
        "family",
        "batch_size",
        "best_test_acc",
        "best_base_lr",
        "best_bn_batch",
        "n_base_lr",
        "n_diverged",
    )
    write_csv(csv, columns, [[b[c] for c in columns] for b in best])

    fig, axis = plt.subplots(figsize=(6.4, 4.2))
    bottom = axis.get_xaxis_transform()
    for index, name in enumerate(dict.fromkeys(b["family"] for b in best)):
        mine = [b for b in best if b["family"] == name]
        ok = [b for b in mine if b["best_test_acc"] is not None]
        marker, style = FAMILY_MARKERS[index % len(FAMILY_MARKERS)]
        axis.plot(
            [b["batch_size"] for b in ok],
            [b["best_test_acc"] for b in ok],
            color="#777777",
            linewidth=1,
            linestyle=style,
            label=name,
        )
        for b in ok:
            axis.plot(
                b["batch_size"],
                b["best_test_acc"],
                marker=marker,
                markersize=7,
                color=batch_colour(b["batch_size"]),
            )
            axis.annotate(
                f"η̃={_eta_text(b['best_base_lr'])}",
                (b["batch_size"], b["best_test_acc"]),
                textcoords="offset points",
                xytext=(0, 7),
                ha="center",
                fontsize=7,
            )
        for b in mine:
            if b["best_test_acc"] is None:
                axis.plot(
                    b["batch_size"],
                    0.03,
                    transform=bottom,
                    marker=DIVERGED_MARKER,
                    markersize=8,
                    color=batch_colour(b["batch_size"]),
                    clip_on=False,
                )
    axis.legend(fontsize=7, loc="best")
    batch_axis(axis, [b["batch_size"] for b in best])
    axis.margins(x=0.1, y=0.15)
    axis.set_xlabel("batch size m (log$_2$)")
    axis.set_ylabel(r"best test accuracy over $\tilde\eta$ (%)")
    axis.set_title(
        figure_title(
            title,
            "Masters & Luschi: best accuracy vs batch size",
            runs,
            scale,
            "X at the bottom: every η̃ diverged",
        ),
        fontsize=9,
    )
    return [save_figure(fig, png), csv]


def ml_bn_heatmap(
    runs: Sequence[RunRecord], out_dir: str | Path, scale: str | None = None, title: str | None = None
) -> list[Path]:
    """Masters & Luschi 2018 (BN batch decoupled from the SGD batch): test accuracy (best over
    eta~ where several) with the SGD batch m on x and the BN batch m_BN (derived.bn_batch) on y;
    cells where every run diverged show X, cells with no run are blank with a dash. Writes
    ml_bn_heatmap.png/.csv (batch_size, bn_batch, test_acc, best_base_lr, n_runs, n_diverged, cell)."""
    points = [p for p in ml_points(runs) if p["bn_batch"] is not None]
    if not points:
        raise SharpError("no run has a BN batch (derived.bn_batch): the heatmap needs runs with --norm bn")
    gridded = [p["family"] for p in points if p["ghost"]]
    chosen = gridded[0] if gridded else points[0]["family"]  # the family that has a BN-batch grid
    points = [p for p in points if p["family"] == chosen]
    xs = sorted({p["batch_size"] for p in points})
    ys = sorted({p["bn_batch"] for p in points})
    rows, grid = [], np.full((len(ys), len(xs)), np.nan)
    states = {}
    for i, bn in enumerate(ys):
        for j, batch in enumerate(xs):
            cell = [p for p in points if p["batch_size"] == batch and p["bn_batch"] == bn]
            ok = [p for p in cell if p["test_acc"] is not None]
            top = max(ok, key=lambda p: p["test_acc"]) if ok else None
            state = "ok" if top else ("diverged" if cell and all(p["diverged"] for p in cell) else "missing")
            if top:
                grid[i, j] = top["test_acc"]
            states[i, j] = state
            rows.append(
                [
                    batch,
                    bn,
                    top["test_acc"] if top else None,
                    top["base_lr"] if top else None,
                    sum(p["n_runs"] for p in cell),
                    sum(p["n_diverged"] for p in cell),
                    state,
                ]
            )
    png, csv = outputs(out_dir, "ml_bn_heatmap")
    write_csv(
        csv, ("batch_size", "bn_batch", "test_acc", "best_base_lr", "n_runs", "n_diverged", "cell"), rows
    )

    fig, axis = plt.subplots(figsize=(1.2 + 0.9 * len(xs), 1.4 + 0.7 * len(ys)))
    axis.set_facecolor("#f2f2f2")
    image = axis.imshow(np.ma.masked_invalid(grid), origin="lower", cmap="viridis", aspect="auto")
    finite_values = grid[np.isfinite(grid)]
    middle = float(np.mean([finite_values.min(), finite_values.max()])) if finite_values.size else 0.0
    for (i, j), state in states.items():
        if state == "ok":
            axis.text(
                j,
                i,
                f"{grid[i, j]:.1f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if grid[i, j] < middle else "black",
            )
        else:
            axis.text(
                j,
                i,
                "X" if state == "diverged" else "—",
                ha="center",
                va="center",
                fontsize=10,
                color="#c0392b" if state == "diverged" else "#888888",
            )
    axis.set_xticks(range(len(xs)), [str(x) for x in xs])
    for tick, batch in zip(axis.get_xticklabels(), xs, strict=True):
        tick.set_color(batch_colour(batch))
    axis.set_yticks(range(len(ys)), [str(y) for y in ys])
    axis.set_xlabel("SGD batch size m")
    axis.set_ylabel("BN batch size $m_{BN}$")
    fig.colorbar(image, ax=axis, label="test accuracy (%)")
    axis.set_title(
        figure_title(
            title,
            f"Masters & Luschi: BN batch vs SGD batch, {chosen}",
            runs,
            scale,
            "best over η̃; X every run diverged; — not run",
        ),
        fontsize=8,
    )
    return [save_figure(fig, png), csv]
