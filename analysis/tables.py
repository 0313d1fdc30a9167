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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from analysis.results import Family, RunRecord, checkpoint_of, describe, families, mean_std
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


def bn_mode_text(runs: Sequence[RunRecord], mode: str) -> str:
    """BN_MODE_TEXT[mode], or "no BN" when none of `runs` has BatchNorm (the mode then changes nothing)."""
    return BN_MODE_TEXT[mode] if any(r.settings.get("norm") == "bn" for r in runs) else "no BN"


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


DATA_FREE = ("weight_norms",)  # probe kinds whose numbers depend on neither the probe set nor BN mode


def with_bn_mode(runs: Sequence[RunRecord], mode: str) -> list[RunRecord]:
    """The runs with only their probes measured in BN mode `mode` (and the data-free ones): what a
    report of that mode alone reads."""
    return [
        replace(r, probes=[p for p in r.probes if p.get("probe") in DATA_FREE or bn_mode_of(p) == mode])
        for r in runs
    ]


def bn_mode_of(record: dict[str, Any]) -> str:
    """A probe record's BN mode: its own field, else its provenance's, else "eval" (the only mode
    there was before BN modes were recorded)."""
    return record.get("bn_mode") or record.get("provenance", {}).get("bn_mode") or "eval"


def final_probe(
    run: RunRecord, kind: str, bn_mode: str | None = None, **settings: Any
) -> dict[str, Any] | None:
    """The newest probe record of `kind` at `run`'s final checkpoint whose settings match (and, when
    given, measured in `bn_mode`), or None."""
    found = [
        rec
        for rec in run.probes_of(kind, **settings)
        if checkpoint_of(rec) == "final" and (bn_mode is None or bn_mode_of(rec) == bn_mode)
    ]
    return found[-1] if found else None


def final_sharpness(
    run: RunRecord, eps: float, subspace_dim: int | None = None, bn_mode: str | None = None
) -> float | None:
    """The newest epsilon-sharpness (percent) of `run` at its final checkpoint (in `bn_mode`, when
    given), or None."""
    record = final_probe(run, "epsilon_sharpness", bn_mode, eps=eps, subspace_dim=subspace_dim)
    return None if record is None else finite(record.get("sharpness"))


def final_bn_modes(runs: Sequence[RunRecord], kinds: Sequence[str] = ("epsilon_sharpness",)) -> list[str]:
    """The BN modes of the runs' final probes of `kinds`, in BN_MODE_ORDER ("eval" if none)."""
    found = {
        bn_mode_of(rec)
        for r in runs
        for kind in kinds
        for rec in r.probes_of(kind)
        if checkpoint_of(rec) == "final"
    }
    return [m for m in BN_MODE_ORDER if m in found] or ["eval"]


def final_accuracy(run: RunRecord, field: str = "test_acc") -> float | None:
    """The last evaluation's `field` (test_acc or eval_train_acc) in percent, or None."""
    value = finite(run.evaluations[-1].get(field)) if run.evaluations else None
    return None if value is None else 100 * value


def distance_from_init(run: RunRecord) -> float | None:
    """‖x − x_0‖₂ of `run`'s final weights (its newest final weight_norms probe, any BN mode: no norm
    reads the data), or None when not measured or without checkpoints/epoch-0000.pt."""
    record = final_probe(run, "weight_norms")
    return None if record is None else finite(record.get("distance_from_init"))


def init_seed(run: RunRecord) -> Any:
    """The seed of the run's initial weights: derived.init_seed, else settings.init_seed, else seed."""
    for value in (run.derived.get("init_seed"), run.settings.get("init_seed")):
        if value is not None:
            return value
    return run.seed


def distance_ratios(sb: Sequence[RunRecord], lb: Sequence[RunRecord]) -> tuple[list[float], bool]:
    """Keskar et al.'s ‖x_s − x_0‖ / ‖x_l − x_0‖: one ratio per initial point that SB and LB runs
    share (init seed; the mean distance of each side's runs from it), and True; without a shared
    initial point, the one ratio of the two sides' mean distances, and False. [] when a side has no
    distance."""

    def by_seed(runs: Sequence[RunRecord]) -> dict[Any, list[float]]:
        out: dict[Any, list[float]] = {}
        for r in runs:
            if (d := distance_from_init(r)) is not None:
                out.setdefault(init_seed(r), []).append(d)
        return out

    small, large = by_seed(sb), by_seed(lb)
    shared = [k for k in small if k in large]
    if shared:
        return [
            mean_std(small[k])[0] / mean_std(large[k])[0] for k in shared if mean_std(large[k])[0] > 0
        ], True
    if small and large:
        denominator = mean_std([d for v in large.values() for d in v])[0]
        if denominator > 0:
            return [mean_std([d for v in small.values() for d in v])[0] / denominator], False
    return [], False


def _ratio(recompute: list[float], stale: list[float]) -> str:
    """mean(recompute) / mean(eval), two decimals; "—" when either is missing or eval's is 0."""
    if not recompute or not stale:
        return DASH
    denominator = mean_std(stale)[0]
    return DASH if denominator == 0 else f"{mean_std(recompute)[0] / denominator:.2f}×"


def _paper(pair: tuple[float, float] | None) -> tuple[str, str]:
    return (DASH, DASH) if pair is None else (format_number(pair[0]), format_number(pair[1]))


def table_families(runs: Sequence[RunRecord], sb_batch: int, lb_batch: int) -> list[Family]:
    """The families (see `analysis.results.families`) with finished runs at both `sb_batch` and
    `lb_batch`: Keskar's tables compare runs that differ in their batch and trial alone."""
    return [f for f in families(runs) if f.at(sb_batch) and f.at(lb_batch)]


@dataclass
class _FamilyRows:
    """One family's rows of Tables 2, 3 and 4 and of the distance table, and its CSV rows."""

    table2: list[str]
    table3: list[list[str]]
    table4: list[list[str]]
    distance: list[str]
    csv: list[list[Any]]
    several_modes: bool


def _family_rows(family: Family, sb_batch: int, lb_batch: int, scale: str | None, named: bool) -> _FamilyRows:
    """The rows of one family; `named`: the row labels name the family (several are shown)."""
    sb, lb = family.at(sb_batch), family.at(lb_batch)
    ours = f"{describe(sb + lb, scale)} (SB: B={sb_batch}, LB: B={lb_batch})"
    source = f"**{THIS_RUN}**" + (f" ({family.label})" if named else "")
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
                    family.label,
                ]
            )

    # Table 2: accuracy
    accuracy = {
        quantity: {
            name: [a for r in group if (a := final_accuracy(r, field)) is not None]
            for name, group in (("SB", sb), ("LB", lb))
        }
        for quantity, field in (("train_acc", "eval_train_acc"), ("test_acc", "test_acc"))
    }
    table2 = [
        source,
        ours,
        *(format_mean_std(accuracy[q][n]) for q in ("train_acc", "test_acc") for n in ("SB", "LB")),
    ]
    for quantity in ("train_acc", "test_acc"):
        record("2", quantity, None, None, accuracy[quantity])

    modes = final_bn_modes(sb + lb)
    several = len(modes) > 1 or named  # beside other families, every row names its BN mode

    def label(mode: str) -> str:
        return source + (f", {bn_mode_text(sb + lb, mode)}" if several else "")

    def our_rows(p: int | None, prefix: list[str], table: str, quantity: str) -> list[list[str]]:
        values = {
            mode: {
                eps: {
                    name: [v for r in group if (v := final_sharpness(r, eps, p, mode)) is not None]
                    for name, group in (("SB", sb), ("LB", lb))
                }
                for eps in TABLE_EPS
            }
            for mode in modes
        }
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
    table3 = our_rows(None, [], "3", "sharpness_full")

    # Table 4: random-subspace sharpness, one of our rows per subspace dimension p probed
    dims = sorted(
        {
            p
            for r in sb + lb
            for rec in r.probes_of("epsilon_sharpness")
            if checkpoint_of(rec) == "final" and (p := rec.get("subspace_dim")) is not None
        }
    )
    table4 = [row for p in dims for row in our_rows(p, [str(p)], "4", "sharpness_subspace")]
    if not dims:
        table4.append([label(modes[0]), ours, DASH, *([DASH] * 2 * len(TABLE_EPS))])
        for eps in TABLE_EPS:
            record("4", "sharpness_subspace", eps, None, {"SB": [], "LB": []}, modes[0])

    # ‖x_s − x_0‖ / ‖x_l − x_0‖ from the weight-norm probes
    distances = {
        name: [d for r in group if (d := distance_from_init(r)) is not None]
        for name, group in (("SB", sb), ("LB", lb))
    }
    record("distance", "distance_from_init", None, None, distances)
    ratios, paired = distance_ratios(sb, lb)
    mean, std = mean_std(ratios)
    csv_rows.append(
        [
            "distance",
            THIS_RUN,
            ours,
            "distance_ratio" if paired else "distance_ratio_of_means",
            None,
            None,
            "SB/LB",
            None,
            len(ratios),
            None if math.isnan(mean) else mean,
            None if math.isnan(std) else std,
            None,
            family.label,
        ]
    )
    ratio_text = format_mean_std(ratios) + ("" if paired or not ratios else ", ratio of the means")
    distance = [source, ours, format_mean_std(distances["SB"]), format_mean_std(distances["LB"]), ratio_text]
    return _FamilyRows(table2, table3, table4, distance, csv_rows, several)


def keskar_tables(
    runs: Sequence[RunRecord],
    out_dir: str | Path,
    sb_batch: int,
    lb_batch: int,
    scale: str | None = None,
) -> str:
    """Keskar et al. 2017's Table 2 (train and test accuracy %, train from the final
    eval_train_acc), Table 3 (full-space epsilon-sharpness at eps = 1e-3 and 5e-4), Table 4
    (random-subspace sharpness, p from the probes) and the distance ratio ‖x_s − x_0‖ / ‖x_l − x_0‖,
    each under the paper's six networks, with rows of their own for each family of runs (same
    settings but batch and trial, `table_families`) with finished runs at `sb_batch` and `lb_batch`
    (diverged runs left out): runs of two networks are never averaged. Returns the Markdown and
    writes out_dir/keskar_tables.csv (table, source, network, quantity, eps, p, regime, batch_size,
    n_runs, mean, std, bn_mode, family)."""
    chosen = table_families(runs, sb_batch, lb_batch)
    if not chosen:
        raise SharpError(
            f"no family of runs has finished runs at both batch size {sb_batch} and {lb_batch} (a family: "
            "the same settings but batch and seeds): choose sb_batch/lb_batch from the runs"
        )
    several_families = len(chosen) > 1
    networks = KESKAR_2017["networks"]
    csv_rows: list[list[Any]] = []
    rows2: list[list[str]] = [
        [
            PAPER,
            networks[key],
            *_paper(KESKAR_2017["train_acc"].get(key)),
            *_paper(KESKAR_2017["test_acc"].get(key)),
        ]
        for key in networks
    ]
    rows3: list[list[str]] = [
        [
            PAPER,
            networks[key],
            *(c for eps in TABLE_EPS for c in _paper(KESKAR_2017["sharpness_full"][eps][key])),
        ]
        for key in networks
    ]
    paper_p = KESKAR_2017["subspace_dim"]
    rows4: list[list[str]] = [
        [
            PAPER,
            networks[key],
            str(paper_p),
            *(c for eps in TABLE_EPS for c in _paper(KESKAR_2017["sharpness_subspace"][eps][key])),
        ]
        for key in networks
    ]
    distance_rows: list[list[str]] = [[PAPER, "F1–C4 (stated in the text)", DASH, DASH, "3–10"]]

    def paper_csv(
        table: str, quantity: str, eps: float | None, p: int | None, pairs: dict[str, tuple]
    ) -> None:
        for key, pair in pairs.items():
            for name, value in zip(("SB", "LB"), pair, strict=True):
                csv_rows.append(
                    [table, PAPER, networks[key], quantity, eps, p, name, None, 5, value, None, None, None]
                )

    for quantity in ("train_acc", "test_acc"):
        paper_csv("2", quantity, None, None, KESKAR_2017[quantity])
    for eps in TABLE_EPS:
        paper_csv("3", "sharpness_full", eps, None, KESKAR_2017["sharpness_full"][eps])
    for eps in TABLE_EPS:
        paper_csv("4", "sharpness_subspace", eps, paper_p, KESKAR_2017["sharpness_subspace"][eps])

    several_modes = False
    for family in chosen:
        rows = _family_rows(family, sb_batch, lb_batch, scale, several_families)
        rows2.append(rows.table2)
        rows3 += rows.table3
        rows4 += rows.table4
        distance_rows.append(rows.distance)
        csv_rows += rows.csv
        several_modes = several_modes or rows.several_modes

    header = ("source", "network", *(f"ε={eps:g} {n}" for eps in TABLE_EPS for n in ("SB", "LB")))
    table2 = markdown_table(("source", "network", "train SB", "train LB", "test SB", "test LB"), rows2)
    table3 = markdown_table(header, rows3)
    table4 = markdown_table(("source", "network", "p", *header[2:]), rows4)
    distance = markdown_table(
        ("source", "network", "‖x_s − x_0‖₂", "‖x_l − x_0‖₂", "‖x_s − x_0‖ / ‖x_l − x_0‖"), distance_rows
    )

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
            "family",
        ),
        csv_rows,
    )
    note = (
        f"Paper numbers: {KESKAR_2017['citation']} (means of 5 trials; SB = 256, LB = 10% of the training "
        "set). This run: mean ± sample std over seeds (n runs), final checkpoint; sharpness in %; "
        "— = not measured."
        + (
            " BN: running statistics = as accumulated in training; recomputed = recomputed at the final "
            "weights from the training split; batch statistics = each group of bn_batch probe examples "
            "normalized by its own; recompute ÷ eval = ratio of the means."
            if several_modes
            else ""
        )
        + (
            " Each family of runs (the same settings but batch size, micro-batch, BN batch and seeds) has "
            "rows of its own, named by what tells it from the others."
            if several_families
            else ""
        )
    )
    distance_note = (
        "x_0 is each run's checkpoints/epoch-0000.pt (`sharp probe --norms`); the ratio is taken per initial "
        "point that SB and LB runs share (their init seed), mean ± std over those points."
    )
    return "\n\n".join(
        [
            "### Table 2: accuracy (%)",
            table2,
            "### Table 3: ε-sharpness, full space (%)",
            table3,
            "### Table 4: ε-sharpness in a random subspace of dimension p (%)",
            table4,
            "### Distance from the initial point: ‖x_s − x_0‖ / ‖x_l − x_0‖",
            distance,
            distance_note,
            note,
        ]
    )
