"""Keskar et al. 2017's Tables 2-4 as Markdown, this project's runs next to the paper's numbers.

Numbers are mean ± sample std (ddof = 1) over the runs (seeds) of each batch size, with the run
count; a run with no matching probe counts as missing, and a cell with no value is "—". When the
sharpness was probed in more than one BN mode (running statistics "eval", statistics
recomputed at the final weights "recompute", batch statistics "batch"), Tables 3 and 4 give one
row per mode and a row of recompute ÷ eval, so a reader sees how much the stale running
statistics moved each number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from analysis.results import RunRecord, checkpoint_of, describe, mean_std
from analysis.style import finite, write_csv
from sharp.errors import SharpError

DASH = "—"
PAPER = "Keskar et al. 2017 (paper)"
THIS_RUN = "this run"

# Keskar, Mudigere, Nocedal, Smelyanskiy, Tang, "On Large-Batch Training for Deep Learning:
# Generalization Gap and Sharp Minima", ICLR 2017: Tables 2, 3 and 4 (means over 5 trials;
# SB = 256, LB = 10% of the training set; Adam). Pairs are (SB, LB).
KESKAR_2017: dict[str, Any] = {
    "citation": (
        "Keskar et al. 2017, On Large-Batch Training for Deep Learning: Generalization Gap and Sharp "
        "Minima (ICLR), Tables 2-4"
    ),
    "networks": {
        "F1": "F1 (MLP, MNIST)",
        "F2": "F2 (MLP, TIMIT)",
        "C1": "C1 (shallow conv, CIFAR-10)",
        "C2": "C2 (VGG-like, CIFAR-10)",
        "C3": "C3 (shallow conv, CIFAR-100)",
        "C4": "C4 (VGG-like, CIFAR-100)",
    },
    # Table 2, accuracy (%): train accuracy as listed in REFERENCE.md (C1, C2 only), test for all six.
    "train_acc": {"C1": (99.89, 99.66), "C2": (99.99, 99.99)},
    "test_acc": {
        "F1": (98.03, 97.81),
        "F2": (64.02, 59.45),
        "C1": (80.04, 77.26),
        "C2": (89.24, 87.26),
        "C3": (49.58, 46.45),
        "C4": (63.08, 57.81),
    },
    # Table 3, full-space epsilon-sharpness (%): {eps: {network: (SB, LB)}}
    "sharpness_full": {
        1e-3: {
            "F1": (1.23, 205.14),
            "F2": (1.39, 310.64),
            "C1": (28.58, 707.23),
            "C2": (8.68, 925.32),
            "C3": (29.85, 258.75),
            "C4": (12.83, 421.84),
        },
        5e-4: {
            "F1": (0.61, 42.90),
            "F2": (0.90, 93.15),
            "C1": (7.08, 227.31),
            "C2": (2.07, 175.31),
            "C3": (8.56, 105.11),
            "C4": (4.07, 109.35),
        },
    },
    # Table 4, epsilon-sharpness in a random subspace of dimension p = 100 (%)
    "subspace_dim": 100,
    "sharpness_subspace": {
        1e-3: {
            "F1": (0.11, 9.22),
            "F2": (0.29, 23.63),
            "C1": (2.18, 137.25),
            "C2": (0.95, 25.09),
            "C3": (17.02, 236.03),
            "C4": (6.05, 72.99),
        },
        5e-4: {
            "F1": (0.05, 9.17),
            "F2": (0.05, 6.28),
            "C1": (0.71, 29.50),
            "C2": (0.31, 5.82),
            "C3": (4.03, 86.96),
            "C4": (1.89, 19.85),
        },
    },
}
TABLE_EPS = (1e-3, 5e-4)
BN_MODE_ORDER = ("eval", "recompute", "batch")
BN_MODE_TEXT = {
    "eval": "BN: running statistics",
    "recompute": "BN: recomputed",
    "batch": "BN: batch statistics",
}


def format_number(value: float | None) -> str:
    """Two decimals (as the paper prints them) between 0.01 and 1e5, else 3 significant digits in
    scientific form; "—" when missing."""
    if value is None or not math.isfinite(value):
        return DASH
    if value == 0 or 0.01 <= abs(value) < 1e5:
        return f"{value:.2f}"
    return f"{value:.2e}"


def format_mean_std(values: Sequence[float]) -> str:
    """ "m ± s (n=k)" over seeds; "m (n=1)" for one run; "—" for none."""
    if not values:
        return DASH
    mean, std = mean_std(values)
    if len(values) == 1:
        return f"{format_number(mean)} (n=1)"
    return f"{format_number(mean)} ± {format_number(std)} (n={len(values)})"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table; a `|` inside a cell is escaped so that it cannot split the cell."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def _bn_mode(record: dict[str, Any]) -> str:
    """A probe record's BN mode: its own field, else its provenance's, else "eval" (the only mode
    there was before BN modes were recorded)."""
    return record.get("bn_mode") or record.get("provenance", {}).get("bn_mode") or "eval"


def _sharpness(run: RunRecord, eps: float, subspace_dim: int | None, bn_mode: str) -> float | None:
    """The newest epsilon-sharpness (percent) of `run` at its final checkpoint in `bn_mode`, or None."""
    found = [
        rec
        for rec in run.probes_of("epsilon_sharpness", eps=eps, subspace_dim=subspace_dim)
        if checkpoint_of(rec) == "final" and _bn_mode(rec) == bn_mode
    ]
    return finite(found[-1].get("sharpness")) if found else None


def _bn_modes(runs: Sequence[RunRecord]) -> list[str]:
    """The BN modes of the runs' final epsilon-sharpness probes, in BN_MODE_ORDER ("eval" if none)."""
    found = {
        _bn_mode(rec)
        for r in runs
        for rec in r.probes_of("epsilon_sharpness")
        if checkpoint_of(rec) == "final"
    }
    return [m for m in BN_MODE_ORDER if m in found] or ["eval"]


def _ratio(recompute: list[float], stale: list[float]) -> str:
    """mean(recompute) / mean(eval), two decimals; "—" when either is missing or eval's is 0."""
    if not recompute or not stale:
        return DASH
    denominator = mean_std(stale)[0]
    return DASH if denominator == 0 else f"{mean_std(recompute)[0] / denominator:.2f}×"


def _paper(pair: tuple[float, float] | None) -> tuple[str, str]:
    return (DASH, DASH) if pair is None else (format_number(pair[0]), format_number(pair[1]))


def keskar_tables(
    runs: Sequence[RunRecord],
    out_dir: str | Path,
    sb_batch: int,
    lb_batch: int,
    scale: str | None = None,
) -> str:
    """Keskar et al. 2017's Table 2 (train and test accuracy %, train from the final
    eval_train_acc), Table 3 (full-space epsilon-sharpness at eps = 1e-3 and 5e-4) and Table 4
    (random-subspace sharpness, p from the probes) for the runs at `sb_batch` and `lb_batch`
    (diverged runs left out), each under the paper's six networks. Returns the Markdown and
    writes out_dir/keskar_tables.csv (table, source, network, quantity, eps, p, regime,
    batch_size, n_runs, mean, std)."""
    sb = [r for r in runs if r.batch_size == sb_batch and not r.diverged]
    lb = [r for r in runs if r.batch_size == lb_batch and not r.diverged]
    if not sb and not lb:
        raise SharpError(
            f"no finished run at batch size {sb_batch} or {lb_batch}: choose sb_batch/lb_batch from the runs"
        )
    ours = f"{describe(sb + lb, scale)} (SB: B={sb_batch}, LB: B={lb_batch})"
    networks = KESKAR_2017["networks"]
    csv_rows: list[list[Any]] = []

    def record(
        table: str,
        quantity: str,
        eps: float | None,
        p: int | None,
        values: dict[str, list[float]],
        bn_mode: str | None = None,
    ) -> None:
        for name, batch in (("SB", sb_batch), ("LB", lb_batch)):
            mean, std = mean_std(values[name])
            csv_rows.append(
                [
                    table,
                    THIS_RUN,
                    ours,
                    quantity,
                    eps,
                    p,
                    name,
                    batch,
                    len(values[name]),
                    None if math.isnan(mean) else mean,
                    None if math.isnan(std) else std,
                    bn_mode,
                ]
            )

    def paper_csv(
        table: str, quantity: str, eps: float | None, p: int | None, pairs: dict[str, tuple]
    ) -> None:
        for key, pair in pairs.items():
            for name, value in zip(("SB", "LB"), pair, strict=True):
                csv_rows.append(
                    [table, PAPER, networks[key], quantity, eps, p, name, None, 5, value, None, None]
                )

    # Table 2: accuracy
    accuracy = {
        quantity: {
            name: [
                100 * r.evaluations[-1][field]
                for r in group
                if r.evaluations and r.evaluations[-1].get(field) is not None
            ]
            for name, group in (("SB", sb), ("LB", lb))
        }
        for quantity, field in (("train_acc", "eval_train_acc"), ("test_acc", "test_acc"))
    }
    rows2 = [
        [
            PAPER,
            networks[key],
            *_paper(KESKAR_2017["train_acc"].get(key)),
            *_paper(KESKAR_2017["test_acc"].get(key)),
        ]
        for key in networks
    ]
    rows2.append(
        [
            f"**{THIS_RUN}**",
            ours,
            *(format_mean_std(accuracy[q][n]) for q in ("train_acc", "test_acc") for n in ("SB", "LB")),
        ]
    )
    for quantity in ("train_acc", "test_acc"):
        paper_csv("2", quantity, None, None, KESKAR_2017[quantity])
        record("2", quantity, None, None, accuracy[quantity])
    table2 = markdown_table(("source", "network", "train SB", "train LB", "test SB", "test LB"), rows2)

    modes = _bn_modes(sb + lb)
    several = len(modes) > 1

    def label(mode: str) -> str:
        return f"**{THIS_RUN}**" + (f", {BN_MODE_TEXT[mode]}" if several else "")

    def measured(eps: float, p: int | None, mode: str) -> dict[str, list[float]]:
        return {
            name: [s for r in group if (s := _sharpness(r, eps, p, mode)) is not None]
            for name, group in (("SB", sb), ("LB", lb))
        }

    def our_rows(p: int | None, prefix: list[str], table: str, quantity: str) -> list[list[str]]:
        values = {mode: {eps: measured(eps, p, mode) for eps in TABLE_EPS} for mode in modes}
        rows = [
            [
                label(mode),
                ours,
                *prefix,
                *(format_mean_std(values[mode][e][n]) for e in TABLE_EPS for n in ("SB", "LB")),
            ]
            for mode in modes
        ]
        for mode in modes:
            for eps in TABLE_EPS:
                record(table, quantity, eps, p, values[mode][eps], mode)
        if "eval" in modes and "recompute" in modes:
            ratios = [
                _ratio(values["recompute"][e][n], values["eval"][e][n])
                for e in TABLE_EPS
                for n in ("SB", "LB")
            ]
            rows.append(["recompute ÷ eval", ours, *prefix, *ratios])
        return rows

    # Table 3: full-space sharpness
    rows3 = [
        [
            PAPER,
            networks[key],
            *(c for eps in TABLE_EPS for c in _paper(KESKAR_2017["sharpness_full"][eps][key])),
        ]
        for key in networks
    ]
    for eps in TABLE_EPS:
        paper_csv("3", "sharpness_full", eps, None, KESKAR_2017["sharpness_full"][eps])
    rows3 += our_rows(None, [], "3", "sharpness_full")
    header = ("source", "network", *(f"ε={eps:g} {n}" for eps in TABLE_EPS for n in ("SB", "LB")))
    table3 = markdown_table(header, rows3)

    # Table 4: random-subspace sharpness, one of our rows per subspace dimension p probed
    dims = sorted(
        {
            p
            for r in sb + lb
            for rec in r.probes_of("epsilon_sharpness")
            if checkpoint_of(rec) == "final" and (p := rec.get("subspace_dim")) is not None
        }
    )
    paper_p = KESKAR_2017["subspace_dim"]
    rows4 = [
        [
            PAPER,
            networks[key],
            str(paper_p),
            *(c for eps in TABLE_EPS for c in _paper(KESKAR_2017["sharpness_subspace"][eps][key])),
        ]
        for key in networks
    ]
    for eps in TABLE_EPS:
        paper_csv("4", "sharpness_subspace", eps, paper_p, KESKAR_2017["sharpness_subspace"][eps])
    if dims:
        for p in dims:
            rows4 += our_rows(p, [str(p)], "4", "sharpness_subspace")
    else:
        rows4.append([label(modes[0]), ours, DASH, *([DASH] * 2 * len(TABLE_EPS))])
        for eps in TABLE_EPS:
            record("4", "sharpness_subspace", eps, None, {"SB": [], "LB": []}, modes[0])
    table4 = markdown_table(("source", "network", "p", *header[2:]), rows4)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(
        out_dir / "keskar_tables.csv",
        (
            "table",
            "source",
            "network",
            "quantity",
            "eps",
            "p",
            "regime",
            "batch_size",
            "n_runs",
            "mean",
            "std",
            "bn_mode",
        ),
        csv_rows,
    )
    note = (
        f"Paper numbers: {KESKAR_2017['citation']} (means of 5 trials; SB = 256, LB = 10% of the training "
        "set). This run: mean ± sample std over seeds (n runs), final checkpoint; sharpness in %; "
        "— = not measured."
        + (
            " BN: running statistics = as accumulated in training; recomputed = recomputed at the final "
            "weights from the training split; recompute ÷ eval = ratio of the means."
            if several
            else ""
        )
    )
    return "\n\n".join(
        [
            "### Table 2: accuracy (%)",
            table2,
            "### Table 3: ε-sharpness, full space (%)",
            table3,
            "### Table 4: ε-sharpness in a random subspace of dimension p (%)",
            table4,
            note,
        ]
    )
