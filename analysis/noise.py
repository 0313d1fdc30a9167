"""McCandlish et al. 2018, "An Empirical Model of Large-Batch Training": the gradient noise scale
B_simple over training, and the steps/examples trade-off S = S_min (1 + B_crit / B),
E = E_min (1 + B / B_crit), i.e. (S/S_min - 1)(E/E_min - 1) = 1, with B_crit = E_min / S_min."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from analysis.results import RunRecord, batch_sizes, figure_title, run_labels
from analysis.style import (
    NEUTRAL,
    batch_colour,
    finite,
    outputs,
    plain_log_labels,
    run_marker,
    save_figure,
    write_csv,
)
from sharp.errors import SharpError

GOAL_MARKERS = ("o", "s", "^", "D", "v", "P", "*", "h")
GOAL_LINES = ("-", "--", "-.", ":")


def noise_scale_over_training(
    runs: Sequence[RunRecord], out_dir: str | Path, scale: str | None = None, title: str | None = None
) -> list[Path]:
    """McCandlish et al. 2018: the online B_simple = tr(Sigma)/|G|^2 (metrics noise_b_simple,
    smoothed during training) against examples seen (log y), one line per run, with dotted
    horizontal lines at the batch sizes used: a batch well below B_simple is in the
    perfect-scaling regime, one well above it wastes examples. Writes
    noise_scale_training.png/.csv (run, batch_size, step, examples, noise_b_simple)."""
    series = []
    for r in sorted(runs, key=lambda r: (r.batch_size, r.name)):
        points = [
            (m.get("step"), m.get("examples"), value)
            for m in r.metrics
            if (value := finite(m.get("noise_b_simple"))) is not None and value > 0
        ]
        if points:
            series.append((r, points))
    if not series:
        raise SharpError("no run has noise_b_simple in metrics.jsonl: train with --noise-scale")
    png, csv = outputs(out_dir, "noise_scale_training")
    rows = [
        [r.name, r.batch_size, step, examples, value]
        for r, points in series
        for step, examples, value in points
    ]
    write_csv(csv, ("run", "batch_size", "step", "examples", "noise_b_simple"), rows)

    labels = run_labels([r for r, _ in series])
    fig, axis = plt.subplots(figsize=(6.4, 4.2))
    for r, points in series:
        axis.plot(
            [p[1] for p in points],
            [p[2] for p in points],
            color=batch_colour(r.batch_size),
            marker=run_marker(r, [s for s, _ in series]),
            markersize=3,
            linewidth=1.3,
            label=labels[r.path],
        )
    for batch in batch_sizes([r for r, _ in series]):
        axis.axhline(batch, color=batch_colour(batch), linestyle=":", linewidth=1.2)
        axis.annotate(
            f"B={batch}",
            (1.0, batch),
            xycoords=("axes fraction", "data"),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=7,
            color=batch_colour(batch),
        )
    axis.set_yscale("log")
    plain_log_labels(axis, "y")
    axis.set_xlabel("examples seen")
    axis.set_ylabel(r"gradient noise scale $B_{simple} = \mathrm{tr}(\Sigma)/|G|^2$ (examples)")
    axis.set_title(
        figure_title(
            title,
            "McCandlish et al.: B_simple during training",
            [r for r, _ in series],
            scale,
            "dotted: the batch sizes used",
        ),
        fontsize=9,
    )
    axis.legend(fontsize=7, loc="best")
    return [save_figure(fig, png), csv]


@dataclass
class StepsFit:
    """Least-squares fit of S = S_min + E_min / B at one goal (McCandlish et al. 2018)."""

    goal: float
    s_min: float
    e_min: float
    b_crit: float  # E_min / S_min
    n_runs: int
    batch_sizes: list[int]

    @property
    def physical(self) -> bool:
        """Both S_min and E_min positive: the hyperbola exists."""
        return self.s_min > 0 and self.e_min > 0


def fit_steps_examples(goal: float, steps: Sequence[float], batches: Sequence[float]) -> StepsFit:
    """Fit S = S_min + E_min / B by linear least squares of S on 1/B (McCandlish's
    S = S_min (1 + B_crit / B)); B_crit = E_min / S_min. Needs two or more distinct B."""
    if len(set(batches)) < 2:
        raise SharpError(f"goal loss {goal:g}: the fit needs runs at two or more batch sizes reaching it")
    design = np.column_stack([np.ones(len(batches)), 1.0 / np.asarray(batches, dtype=float)])
    (s_min, e_min), *_ = np.linalg.lstsq(design, np.asarray(steps, dtype=float), rcond=None)
    b_crit = float(e_min / s_min) if s_min != 0 else float("nan")
    return StepsFit(goal, float(s_min), float(e_min), b_crit, len(steps), sorted({int(b) for b in batches}))


def steps_to_goal(run: RunRecord, goal: float) -> int | None:
    """Optimizer steps S at the first evaluation whose eval_train_loss <= goal; None if never."""
    for m in run.evaluations:
        loss = finite(m.get("eval_train_loss"))
        if loss is not None and loss <= goal:
            return int(m["step"])
    return None


def steps_vs_examples(
    runs: Sequence[RunRecord],
    out_dir: str | Path,
    goal_losses: Sequence[float],
    scale: str | None = None,
    title: str | None = None,
    best_per_batch: bool = False,
) -> tuple[list[Path], dict[float, StepsFit]]:
    """McCandlish et al. 2018, the steps/examples trade-off: for each goal training loss, each run's
    steps S to reach it (first evaluation with eval_train_loss <= goal; runs that never reach it
    are skipped) and examples E = S x B, on log-log axes, with the fitted hyperbola
    (S/S_min - 1)(E/E_min - 1) = 1. `best_per_batch` keeps, per batch size, only the run that
    reached the goal in the fewest steps (the tuned learning rate, as in the paper). Runs with a
    batch-size schedule are skipped (B is not constant). S is only as fine as the evaluation
    interval (settings.eval_every): evaluate more often for a finer S. Writes
    steps_vs_examples.png/.csv (goal, run, batch_size, steps, examples) and
    steps_vs_examples_fit.csv (goal, S_min, E_min, B_crit, n_runs); returns
    (paths, {goal: StepsFit}) for the goals with a fit."""
    if not goal_losses:
        raise SharpError("give one or more goal training losses (goal_losses)")
    usable = [r for r in runs if not r.settings.get("batch_schedule")]
    rows: list[list[Any]] = []
    fits: dict[float, StepsFit] = {}
    reached: dict[float, list[tuple[RunRecord, int]]] = {}
    for goal in goal_losses:
        hits = [(r, s) for r in usable if (s := steps_to_goal(r, goal)) is not None]
        if best_per_batch:
            best: dict[int, tuple[RunRecord, int]] = {}
            for r, s in hits:
                if r.batch_size not in best or s < best[r.batch_size][1]:
                    best[r.batch_size] = (r, s)
            hits = list(best.values())
        hits.sort(key=lambda h: (h[0].batch_size, h[0].name))
        reached[goal] = hits
        rows.extend([goal, r.name, r.batch_size, s, s * r.batch_size] for r, s in hits)
        if len({r.batch_size for r, _ in hits}) >= 2:
            fits[goal] = fit_steps_examples(goal, [s for _, s in hits], [r.batch_size for r, _ in hits])
    if not rows:
        raise SharpError(
            f"no run reached any goal training loss {list(goal_losses)}: choose larger goals "
            "(eval_train_loss in metrics.jsonl)"
        )
    png, csv = outputs(out_dir, "steps_vs_examples")
    fit_csv = csv.with_name("steps_vs_examples_fit.csv")
    write_csv(csv, ("goal", "run", "batch_size", "steps", "examples"), rows)
    write_csv(
        fit_csv,
        ("goal", "S_min", "E_min", "B_crit", "n_runs"),
        [[f.goal, f.s_min, f.e_min, f.b_crit, f.n_runs] for f in fits.values()],
    )

    fig, axis = plt.subplots(figsize=(6.4, 4.6))
    for index, goal in enumerate(goal_losses):
        hits = reached[goal]
        marker, line = GOAL_MARKERS[index % len(GOAL_MARKERS)], GOAL_LINES[index % len(GOAL_LINES)]
        steps = [s for _, s in hits]
        examples = [s * r.batch_size for r, s in hits]
        axis.scatter(
            examples,
            steps,
            c=[batch_colour(r.batch_size) for r, _ in hits],
            marker=marker,
            s=36,
            edgecolors=NEUTRAL,
            linewidths=0.5,
            zorder=3,
        )
        fit = fits.get(goal)
        if fit is not None and fit.physical:
            lo, hi = min(fit.batch_sizes) / 4, max(fit.batch_sizes) * 4
            b = np.geomspace(lo, hi, 200)
            axis.plot(
                fit.e_min * (1 + b / fit.b_crit),
                fit.s_min * (1 + fit.b_crit / b),
                color=NEUTRAL,
                linestyle=line,
                linewidth=1,
                label=f"loss ≤ {goal:g}: $S_{{min}}$={fit.s_min:.3g}, $E_{{min}}$={fit.e_min:.3g}, "
                f"$B_{{crit}}$={fit.b_crit:.3g}",
            )
        else:
            axis.scatter(
                [],
                [],
                marker=marker,
                color=NEUTRAL,
                label=f"loss ≤ {goal:g}: no fit (needs 2+ batch sizes and S_min, E_min > 0)",
            )
    axis.set_xscale("log")
    axis.set_yscale("log")
    plain_log_labels(axis, "x")
    plain_log_labels(axis, "y")
    axis.set_xlabel("examples E = S × B to reach the goal loss")
    axis.set_ylabel("optimizer steps S to reach the goal loss")
    axis.set_title(
        figure_title(
            title,
            "McCandlish et al.: steps vs examples",
            usable,
            scale,
            "points coloured by batch size; lines: (S/S_min − 1)(E/E_min − 1) = 1",
        ),
        fontsize=9,
    )
    axis.legend(fontsize=7, loc="best")
    return [save_figure(fig, png), csv, fit_csv], fits
