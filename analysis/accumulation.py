"""Gradient accumulation against true batches: learning curves of runs with one effective batch,
taken in one piece or as k micro-batches of m (exact accumulation, the Goyal et al. 2017 loss
normalization: the sum over the window divided by its example count). Where accumulation is
exact the curves lie on top of each other."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

from analysis.results import RunRecord, figure_title
from analysis.style import finite, outputs, plain_log_labels, save_figure, write_csv
from sharp.errors import SharpError


def accumulation_label(run: RunRecord) -> str:
    """ "B=32 (true batch)" or "B=32 (32 micro-batches of 1)": k micro-batches of m examples
    (across all processes) make one optimizer step."""
    batch, micro = run.batch_size, run.micro_batch
    if micro >= batch:
        return f"B={batch} (true batch)"
    return f"B={batch} ({-(-batch // micro)} micro-batches of {micro})"


def accumulation_curves(
    runs: Sequence[RunRecord], out_dir: str | Path, scale: str | None = None, title: str | None = None
) -> list[Path]:
    """Learning curves against examples seen (training cross-entropy on the fixed evaluation
    subset, left; test accuracy, right) grouped by effective batch: one hue per effective
    batch, true batches (micro_batch == batch) solid, accumulated ones dashed with markers, so
    identical curves visibly overlap. Writes accumulation_curves.png/.csv (run, batch_size,
    micro_batch, examples, eval_train_loss, test_acc in %)."""
    ordered = sorted(runs, key=lambda r: (r.batch_size, -r.micro_batch, r.seed or 0, r.name))
    ordered = [r for r in ordered if r.evaluations]
    if not ordered:
        raise SharpError("no run has evaluation records in metrics.jsonl to draw learning curves from")
    png, csv = outputs(out_dir, "accumulation_curves")
    rows = [
        [
            r.name,
            r.batch_size,
            r.micro_batch,
            m.get("examples"),
            finite(m.get("eval_train_loss")),
            100 * m["test_acc"],
        ]
        for r in ordered
        for m in r.evaluations
    ]
    write_csv(csv, ("run", "batch_size", "micro_batch", "examples", "eval_train_loss", "test_acc"), rows)

    several_seeds = len({r.seed for r in ordered}) > 1
    # Effective batches here are often all "small" (one shade of blue in the house palette), so
    # this figure gives each effective batch its own hue instead.
    hues = {
        b: matplotlib.colormaps["tab10"](i % 10)
        for i, b in enumerate(sorted({r.batch_size for r in ordered}))
    }
    fig, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for r in ordered:
        accumulated = r.micro_batch < r.batch_size
        style = {
            "color": hues[r.batch_size],
            "linestyle": "--" if accumulated else "-",
            "marker": "o" if accumulated else None,
            "markersize": 4,
            "markerfacecolor": "none",
            "linewidth": 1.4 if accumulated else 2.4,
            "alpha": 0.95 if accumulated else 0.6,
            "label": accumulation_label(r) + (f", seed {r.seed}" if several_seeds else ""),
        }
        examples = [m.get("examples") for m in r.evaluations]
        losses = [finite(m.get("eval_train_loss")) for m in r.evaluations]
        loss_axis.plot(examples, [v if v is not None else float("nan") for v in losses], **style)
        acc_axis.plot(examples, [100 * m["test_acc"] for m in r.evaluations], **style)
    loss_axis.set_yscale("log")
    plain_log_labels(loss_axis, "y")
    loss_axis.set_ylabel("training cross-entropy (fixed evaluation subset)")
    acc_axis.set_ylabel("test accuracy (%)")
    for axis in (loss_axis, acc_axis):
        axis.set_xlabel("examples seen")
    acc_axis.legend(fontsize=7, loc="lower right")
    fig.suptitle(
        figure_title(
            title,
            "Accumulation vs true batches",
            ordered,
            scale,
            "solid: true batch; dashed with markers: micro-batches accumulated to the same effective batch",
        ),
        fontsize=9,
    )
    return [save_figure(fig, png), csv]
