"""Keskar et al. 2017, Fig. 3: the parametric plot f(alpha * x_l + (1 - alpha) * x_s), and Fig. 7, the
same along the sine path f(sin(alpha pi/2) x_l + cos(alpha pi/2) x_s) (the record's `path`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from analysis.style import LARGE_BATCH, SMALL_BATCH, batch_colour, save_figure, write_csv

LOSS_COLOUR = "#222222"
ACCURACY_COLOUR = "#2e8b57"


def plot_interpolation(record: dict[str, Any], png: str | Path, csv: str | Path, title: str = "") -> Path:
    """Cross-entropy (left axis) and accuracy (right axis), train solid and test dashed; the
    small-batch solution at alpha = 0 and the large-batch one at alpha = 1 are marked, in the
    colours of their batch sizes (provenance batch_size_a/b) by the rule in analysis.style."""
    alphas = record["alphas"]
    columns = ("train_loss", "test_loss", "train_acc", "test_acc")
    write_csv(csv, ("alpha", *columns), [(a, *(record[c][i] for c in columns)) for i, a in enumerate(alphas)])
    fig, loss_axis = plt.subplots(figsize=(6.4, 4.2))
    acc_axis = loss_axis.twinx()
    loss_axis.plot(alphas, record["train_loss"], color=LOSS_COLOUR, label="train cross-entropy")
    loss_axis.plot(alphas, record["test_loss"], color=LOSS_COLOUR, linestyle="--", label="test cross-entropy")
    acc_axis.plot(
        alphas, [100 * a for a in record["train_acc"]], color=ACCURACY_COLOUR, label="train accuracy"
    )
    acc_axis.plot(
        alphas,
        [100 * a for a in record["test_acc"]],
        color=ACCURACY_COLOUR,
        linestyle="--",
        label="test accuracy",
    )
    provenance = record.get("provenance", {})
    colours = [
        batch_colour(provenance[key]) if provenance.get(key) else default
        for key, default in (("batch_size_a", SMALL_BATCH), ("batch_size_b", LARGE_BATCH))
    ]
    for x, colour, name in ((0, colours[0], "SB ($x_s$)"), (1, colours[1], "LB ($x_l$)")):
        loss_axis.axvline(x, color=colour, linewidth=1, alpha=0.7)
        loss_axis.annotate(
            name,
            (x, 1.0),
            xycoords=("data", "axes fraction"),
            color=colour,
            ha="center",
            va="bottom",
            fontsize=9,
        )
    if record.get("path") == "sin":  # Keskar et al.'s Fig. 7
        loss_axis.set_xlabel(r"$\alpha$ in $f(\sin(\alpha\pi/2)\, x_l + \cos(\alpha\pi/2)\, x_s)$")
    else:
        loss_axis.set_xlabel(r"$\alpha$ in $f(\alpha x_l + (1-\alpha) x_s)$")
    loss_axis.set_ylabel("cross-entropy")
    loss_axis.set_yscale("log")
    acc_axis.set_ylabel("accuracy (%)", color=ACCURACY_COLOUR)
    acc_axis.set_ylim(0, 100)
    handles = loss_axis.get_legend_handles_labels()[0] + acc_axis.get_legend_handles_labels()[0]
    loss_axis.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.12, 0.5))
    if title:
        loss_axis.set_title(title, fontsize=10, pad=16)
    return save_figure(fig, png)
