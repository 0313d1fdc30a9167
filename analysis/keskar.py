"""Keskar et al. 2017, "On Large-Batch Training for Deep Learning: Generalization Gap and Sharp
Minima": Fig. 4 (accuracy and sharpness against batch size), Fig. 5 (warm-started, "piggybacked"
LB runs against the epoch k of the SB checkpoint they started from) and Fig. 5/6 (sharpness along
training against the training cross-entropy). Fig. 3 is `analysis.interpolation`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from analysis.results import (
    RunRecord,
    batch_sizes,
    checkpoint_epoch,
    checkpoint_of,
    figure_title,
    mean_std,
    run_labels,
)
from analysis.style import (
    LARGE_BATCH_MIN,
    NEUTRAL,
    batch_axis,
    batch_colour,
    finite,
    log_if_positive,
    outputs,
    plain_log_labels,
    run_marker,
    save_figure,
    shade_regimes,
    write_csv,
)
from analysis.tables import BN_MODE_TEXT, final_bn_modes, final_sharpness
from sharp.errors import SharpError

ACCURACY_COLOUR = NEUTRAL


def _eps_text(eps: float, subspace_dim: int | None) -> str:
    space = "full space" if subspace_dim is None else f"random subspace p={subspace_dim}"
    return f"ε={eps:g}, {space}"


def keskar_batch_size(
    runs: Sequence[RunRecord],
    out_dir: str | Path,
    eps: float = 1e-3,
    subspace_dim: int | None = None,
    scale: str | None = None,
    title: str | None = None,
    name: str = "keskar_fig4_batch_size",
) -> list[Path]:
    """Keskar et al. 2017, Fig. 4: final test accuracy (%, left axis) and epsilon-sharpness
    (right axis, log) against batch size (log x), mean ± sample std over the runs (seeds) of each
    batch size. Diverged runs are left out. Writes NAME.png/.csv with columns
    batch_size, n_runs, test_acc_mean, test_acc_std, sharpness_mean, sharpness_std (std empty with
    one run; settings eps and subspace_dim in the extra columns)."""
    kept = [r for r in runs if not r.diverged]
    rows: list[list[Any]] = []
    for batch in batch_sizes(kept):
        group = [r for r in kept if r.batch_size == batch]
        accuracies = [100 * r.evaluations[-1]["test_acc"] for r in group if r.evaluations]
        sharpness = [s for r in group if (s := final_sharpness(r, eps, subspace_dim)) is not None]
        acc_mean, acc_std = mean_std(accuracies)
        sharp_mean, sharp_std = mean_std(sharpness)
        rows.append([batch, len(group), acc_mean, acc_std, sharp_mean, sharp_std, eps, subspace_dim])
    if not any(finite(row[4]) is not None for row in rows):
        raise SharpError(
            f"no run has an epsilon_sharpness probe ({_eps_text(eps, subspace_dim)}) at 'final': "
            f"run `sharp probe RUN --sharpness --eps {eps:g}` first"
        )
    png, csv = outputs(out_dir, name)
    header = ("batch_size", "n_runs", "test_acc_mean", "test_acc_std", "sharpness_mean", "sharpness_std")
    write_csv(
        csv,
        (*header, "eps", "subspace_dim"),
        [[finite(c) if isinstance(c, float) else c for c in row] for row in rows],
    )

    sizes = [row[0] for row in rows]
    fig, acc_axis = plt.subplots(figsize=(6.4, 4.2))
    sharp_axis = acc_axis.twinx()
    lo, hi = min(sizes) / 1.5, max(sizes) * 1.5
    shade_regimes(acc_axis, lo, hi)
    acc = [(row[0], row[2], row[3]) for row in rows if finite(row[2]) is not None]
    sharp = [(row[0], row[4], row[5]) for row in rows if finite(row[4]) is not None]
    for points, axis, marker, style, name in (
        (acc, acc_axis, "o", "-", "test accuracy (%)"),
        (sharp, sharp_axis, "s", "--", f"sharpness ({_eps_text(eps, subspace_dim)})"),
    ):
        if not points:
            continue
        xs, means, stds = zip(*points, strict=True)
        axis.errorbar(
            xs,
            means,
            yerr=[s if finite(s) is not None else 0.0 for s in stds],
            color=ACCURACY_COLOUR,
            linestyle=style,
            linewidth=1.2,
            capsize=3,
            label=name,
            zorder=2,
        )
        axis.scatter(
            xs,
            means,
            c=[batch_colour(x) for x in xs],
            marker=marker,
            s=42,
            zorder=3,
            edgecolors=ACCURACY_COLOUR,
            linewidths=0.6,
        )
    log_if_positive(sharp_axis, [p[1] for p in sharp])
    batch_axis(acc_axis, sizes)
    acc_axis.set_xlim(lo, hi)
    acc_axis.set_xlabel(f"batch size B (log scale; B ≥ {LARGE_BATCH_MIN} large batch, red)")
    acc_axis.set_ylabel("test accuracy (%)  ●, solid")
    sharp_axis.set_ylabel(r"sharpness $\phi_{x,f}(\epsilon)$ (%)  ■, dashed")
    acc_axis.set_title(figure_title(title, "Keskar et al. Fig. 4", kept, scale), fontsize=9)
    handles = acc_axis.get_legend_handles_labels()[0] + sharp_axis.get_legend_handles_labels()[0]
    sharp_axis.legend(handles=handles, fontsize=8, loc="best", framealpha=0.95)  # the twin axis is on top
    return [save_figure(fig, png), csv]


def sharpness_along_training(
    run: RunRecord, eps: float = 1e-3, subspace_dim: int | None = None
) -> list[dict[str, Any]]:
    """(checkpoint, epoch, step, train_loss, sharpness) of `run` at each epoch checkpoint with an
    epsilon-sharpness probe (training loss = eval_train_loss of the evaluation at that epoch;
    epoch-0000 is the step-0 evaluation), then "final" unless it is the same step as an epoch
    checkpoint already listed."""
    newest: dict[str, dict[str, Any]] = {}
    for record in run.probes_of("epsilon_sharpness", eps=eps, subspace_dim=subspace_dim):
        newest[checkpoint_of(record)] = record  # probes are in time order: the last one wins
    points = []
    for label, record in newest.items():
        epoch = checkpoint_epoch(label)
        if epoch is not None:
            metrics = run.record_at_epoch(epoch)
        elif label == "final":
            metrics = run.evaluations[-1] if run.evaluations else None
        else:
            continue
        loss, sharpness = finite((metrics or {}).get("eval_train_loss")), finite(record.get("sharpness"))
        if metrics is None or loss is None or sharpness is None:
            continue
        points.append(
            {
                "checkpoint": label,
                "epoch": metrics.get("epoch"),
                "step": metrics.get("step"),
                "train_loss": loss,
                "sharpness": sharpness,
                "final": label == "final",
            }
        )
    epoch_steps = {p["step"] for p in points if not p["final"]}
    points = [p for p in points if not (p["final"] and p["step"] in epoch_steps)]
    return sorted(points, key=lambda p: (p["step"] if p["step"] is not None else float("inf"), p["final"]))


def keskar_sharpness_along_training(
    runs: Sequence[RunRecord],
    out_dir: str | Path,
    eps: float = 1e-3,
    scale: str | None = None,
    title: str | None = None,
) -> list[Path]:
    """Keskar et al. 2017, Fig. 5/6: full-space epsilon-sharpness at each epoch checkpoint against
    the training cross-entropy at that point, one line per run (small batch blue, large batch red),
    the x-axis reversed so that training proceeds to the right as in the paper. Writes
    keskar_fig5_sharpness_training.png/.csv (run, batch_size, checkpoint, epoch, train_loss,
    sharpness)."""
    series = [(r, sharpness_along_training(r, eps)) for r in sorted(runs, key=lambda r: r.batch_size)]
    series = [(r, points) for r, points in series if any(not p["final"] for p in points)]
    if not series:
        raise SharpError(
            f"no run has epsilon_sharpness probes (ε={eps:g}, full space) at epoch checkpoints: train with "
            f"--checkpoint-every 1 and run `sharp probe RUN --checkpoint all --sharpness --eps {eps:g}`"
        )
    png, csv = outputs(out_dir, "keskar_fig5_sharpness_training")
    rows = [
        [r.name, r.batch_size, p["checkpoint"], p["epoch"], p["train_loss"], p["sharpness"]]
        for r, points in series
        for p in points
    ]
    write_csv(csv, ("run", "batch_size", "checkpoint", "epoch", "train_loss", "sharpness"), rows)

    labels = run_labels([r for r, _ in series])
    fig, axis = plt.subplots(figsize=(6.4, 4.2))
    for r, points in series:
        colour = batch_colour(r.batch_size)
        xs, ys = [p["train_loss"] for p in points], [p["sharpness"] for p in points]
        marker = run_marker(r, [s for s, _ in series])
        axis.plot(xs, ys, color=colour, marker=marker, markersize=4, linewidth=1.3, label=labels[r.path])
        axis.plot(
            xs[:1],
            ys[:1],
            linestyle="none",
            marker="o",
            markersize=8,
            markerfacecolor="white",
            markeredgecolor=colour,
        )
    losses = [row[4] for row in rows]
    log_if_positive(axis, [row[5] for row in rows])
    if min(losses) > 0 and max(losses) / min(losses) > 10:
        axis.set_xscale("log")
        plain_log_labels(axis, "x")
    axis.invert_xaxis()
    axis.set_xlabel("training cross-entropy (reversed axis: decreasing to the right, as training proceeds)")
    axis.set_ylabel(rf"sharpness $\phi_{{x,f}}(\epsilon={eps:g})$ (%), full space")
    axis.set_title(
        figure_title(
            title,
            "Keskar et al. Fig. 5/6",
            [r for r, _ in series],
            scale,
            "open circle: start of training (epoch 0 or first probed checkpoint)",
        ),
        fontsize=9,
    )
    axis.legend(fontsize=8, loc="best")
    return [save_figure(fig, png), csv]


# --- Fig. 5: warm-started ("piggybacked") LB ---------------------------------------------------------


def warm_start_source(run: RunRecord) -> Path | None:
    """The checkpoint a warm-started run started from (derived.init_from, else settings.init_from)."""
    source = run.derived.get("init_from") or run.settings.get("init_from")
    return Path(str(source)) if source else None


def warm_start_epoch(run: RunRecord) -> int | None:
    """k for a run started from another run's checkpoints/epoch-k.pt; None for any other start."""
    source = warm_start_source(run)
    return None if source is None else checkpoint_epoch(source.stem)


def _source_run(run: RunRecord, runs: Sequence[RunRecord]) -> RunRecord | None:
    """The run (among `runs`) whose directory holds the checkpoint `run` started from."""
    source = warm_start_source(run)
    if source is None:
        return None
    folder = source.parent.parent if source.parent.name == "checkpoints" else source.parent
    return next((r for r in runs if r.name == folder.name), None)


PIGGYBACK_COLUMNS = (
    "run", "seed", "batch_size", "k", "source_run", "source_batch_size", "source_test_acc_at_k",
    "test_acc", "bn_mode", "eps", "sharpness",
)  # fmt: skip


def piggyback_rows(warm: Sequence[RunRecord], runs: Sequence[RunRecord], eps: float) -> list[dict[str, Any]]:
    """One row (PIGGYBACK_COLUMNS) per warm-started run of `warm` and BN mode of its final
    full-space ε-sharpness probes: k (the epoch of the SB checkpoint it started from), its source
    run, the source's test accuracy (%) at epoch k, its own final test accuracy (%) and sharpness."""
    rows = []
    for run in sorted(warm, key=lambda r: (warm_start_epoch(r), r.seed or 0, r.name)):
        k = warm_start_epoch(run)
        source = _source_run(run, runs)
        at_k = source.record_at_epoch(float(k)) if source is not None and k is not None else None
        source_acc = finite((at_k or {}).get("test_acc"))
        test_acc = finite(run.evaluations[-1].get("test_acc")) if run.evaluations else None
        for mode in final_bn_modes(warm):
            rows.append(
                {
                    "run": run.name,
                    "seed": run.seed,
                    "batch_size": run.batch_size,
                    "k": k,
                    "source_run": source.name if source else None,
                    "source_batch_size": source.batch_size if source else None,
                    "source_test_acc_at_k": None if source_acc is None else 100 * source_acc,
                    "test_acc": None if test_acc is None else 100 * test_acc,
                    "bn_mode": mode,
                    "eps": eps,
                    "sharpness": final_sharpness(run, eps, None, mode),
                }
            )
    return rows


def _means_by_k(rows: Sequence[dict[str, Any]], column: str) -> tuple[list[int], list[float]]:
    """The k values and the mean of `column` over the rows at each k (rows without a value left out)."""
    by_k: dict[int, list[float]] = {}
    for row in rows:
        if row[column] is not None:
            by_k.setdefault(row["k"], []).append(row[column])
    ks = sorted(by_k)
    return ks, [mean_std(by_k[k])[0] for k in ks]


def _points(rows: Sequence[dict[str, Any]], column: str) -> tuple[list[int], list[float]]:
    found = [(row["k"], row[column]) for row in rows if row[column] is not None]
    return [k for k, _ in found], [v for _, v in found]


def keskar_piggyback(
    runs: Sequence[RunRecord],
    out_dir: str | Path,
    eps: float = 1e-3,
    scale: str | None = None,
    title: str | None = None,
    name: str = "keskar_fig5_piggyback",
) -> list[Path]:
    """Keskar et al. 2017, Fig. 5 (warm starting): LB runs started from an SB run's epoch-k
    checkpoint ("piggybacked"), against k. Top: test accuracy (%) of the SB run at epoch k (blue)
    and of the LB run started there, at its end (red; points per run, line through the means over
    seeds). Bottom: the LB runs' final full-space ε-sharpness (log), one line per probe BN mode.
    `runs` may hold the source runs too; the warm-started ones are picked out by their init_from.
    Writes NAME.png/.csv (PIGGYBACK_COLUMNS, one row per run and BN mode)."""
    warm = [r for r in runs if warm_start_epoch(r) is not None and not r.diverged]
    if not warm:
        raise SharpError(
            "no run was started from another run's epoch checkpoint: train LB runs with "
            "--init-from SB_RUN/checkpoints/epoch-K.pt (a spec's init_from = {group = ..., checkpoint = ...})"
        )
    rows = piggyback_rows(warm, runs, eps)
    png, csv = outputs(out_dir, name)
    write_csv(csv, PIGGYBACK_COLUMNS, [[row[c] for c in PIGGYBACK_COLUMNS] for row in rows])

    fig, (acc_axis, sharp_axis) = plt.subplots(2, 1, figsize=(6.4, 6.0), sharex=True)
    lb_colour = batch_colour(max(r.batch_size for r in warm))
    sources = sorted({row["source_batch_size"] for row in rows if row["source_batch_size"] is not None})
    sb_colour = batch_colour(sources[0]) if sources else ACCURACY_COLOUR
    modes = list(dict.fromkeys(row["bn_mode"] for row in rows))
    once = [row for row in rows if row["bn_mode"] == modes[0]]  # accuracy does not depend on the probe mode
    ks, means = _means_by_k(once, "source_test_acc_at_k")
    if ks:
        acc_axis.plot(ks, means, color=sb_colour, marker="o", label="SB at epoch k")
    acc_axis.scatter(*_points(once, "test_acc"), color=lb_colour, s=14, alpha=0.6)
    ks, means = _means_by_k(once, "test_acc")
    acc_axis.plot(ks, means, color=lb_colour, marker="s", label="LB started from SB's epoch k, at its end")
    acc_axis.set_ylabel("test accuracy (%)")
    acc_axis.legend(fontsize=8, loc="best")
    drawn: list[float] = []
    for style, mode in zip(("-", "--", ":"), modes, strict=False):
        mode_rows = [row for row in rows if row["bn_mode"] == mode]
        ks, means = _means_by_k(mode_rows, "sharpness")
        if not ks:
            continue
        sharp_axis.scatter(*_points(mode_rows, "sharpness"), color=lb_colour, s=14, alpha=0.6)
        label = BN_MODE_TEXT.get(mode, mode)
        sharp_axis.plot(ks, means, color=lb_colour, linestyle=style, marker="s", label=label)
        drawn += means
    if drawn:
        log_if_positive(sharp_axis, drawn)
        sharp_axis.legend(fontsize=8, loc="best")
    else:
        message = "no ε-sharpness probe at the LB runs' final checkpoints"
        sharp_axis.text(0.5, 0.5, message, ha="center", transform=sharp_axis.transAxes, fontsize=8)
    sharp_axis.set_ylabel(rf"sharpness $\phi_{{x,f}}(\epsilon={eps:g})$ (%), full space")
    sharp_axis.set_xlabel("k: epochs of small-batch training before the large batch takes over")
    batches = "/".join(str(b) for b in sorted({r.batch_size for r in warm}))
    origin = f" from SB (B={'/'.join(str(b) for b in sources)})" if sources else ""
    acc_axis.set_title(
        figure_title(title, f"Keskar et al. Fig. 5 — LB (B={batches}) warm-started{origin}", warm, scale),
        fontsize=9,
    )
    return [save_figure(fig, png), csv]
