"""What sets the size of Keskar et al. 2017's result: LB ÷ SB of every sharpness measure, per family of
runs (network, stopping rule, ...) and per probe BN mode, with the test-accuracy gap.

Each cell is mean(LB) / mean(SB) over the family's finished runs at the two batch sizes, from the
runs' own final probe records: ε-sharpness in full space and in a random subspace at ε = 1e-3 and
5e-4, the top Hessian eigenvalue λ_max and the Hessian trace. The paper's own ratios (C1, C2:
Tables 2-4) head the table, so a reader sees how far from them each configuration is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.results import Family, RunRecord, mean_std
from analysis.style import finite, write_csv
from analysis.tables import (
    BN_MODE_TEXT,
    DASH,
    KESKAR_2017,
    TABLE_EPS,
    bn_mode_text,
    final_accuracy,
    final_bn_modes,
    final_probe,
    markdown_table,
    table_families,
)

PAPER_SUBSPACE = 100
MEASURE_KINDS = ("epsilon_sharpness", "hessian_eigenvalues", "hessian_trace")
PAPER_NETWORKS = ("C1", "C2")  # the CIFAR-10 nets; the tables' C3/C4 are the same nets on CIFAR-100


@dataclass(frozen=True)
class Measure:
    """One column of the ablation: a probe kind, the settings its record must have, the value read."""

    name: str  # CSV quantity
    heading: str
    kind: str
    eps: float | None = None
    subspace: bool = False

    def value(self, run: RunRecord, bn_mode: str, subspace_dim: int | None) -> float | None:
        """The run's final value of this measure in `bn_mode` (None when not probed)."""
        if self.kind == "epsilon_sharpness":
            settings = {"eps": self.eps, "subspace_dim": subspace_dim if self.subspace else None}
            if self.subspace and subspace_dim is None:
                return None
            record = final_probe(run, self.kind, bn_mode, **settings)
            return None if record is None else finite(record.get("sharpness"))
        record = final_probe(run, self.kind, bn_mode)
        if record is None:
            return None
        if self.kind == "hessian_eigenvalues":
            values = record.get("eigenvalues") or []
            return finite(values[0]) if values else None
        return finite(record.get("trace"))


MEASURES = (
    *(Measure("sharpness_full", f"full ε={eps:g}", "epsilon_sharpness", eps) for eps in TABLE_EPS),
    *(
        Measure("sharpness_subspace", f"subspace ε={eps:g}", "epsilon_sharpness", eps, True)
        for eps in TABLE_EPS
    ),
    Measure("lambda_max", "λ_max", "hessian_eigenvalues"),
    Measure("trace", "trace", "hessian_trace"),
)


def _subspace_dim(runs: Sequence[RunRecord]) -> int | None:
    """The paper's p = 100 when probed, else the smallest random-subspace dimension probed, else None."""
    dims = {
        p
        for r in runs
        for rec in r.probes_of("epsilon_sharpness")
        if (p := rec.get("subspace_dim")) is not None
    }
    return PAPER_SUBSPACE if PAPER_SUBSPACE in dims else (min(dims) if dims else None)


def _times(value: float | None) -> str:
    return DASH if value is None or not math.isfinite(value) else f"{value:.3g}×"


def _ratio(lb: list[float], sb: list[float]) -> float | None:
    """mean(LB) / mean(SB); None when a side is missing or SB's mean is not positive."""
    if not lb or not sb:
        return None
    denominator = mean_std(sb)[0]
    return mean_std(lb)[0] / denominator if denominator > 0 else None


CSV_COLUMNS = (
    "family", "network", "stopping", "bn_mode", "quantity", "eps", "subspace_dim",
    "sb_mean", "sb_n", "lb_mean", "lb_n", "lb_over_sb", "sb_minus_lb",
)  # fmt: skip
PAPER_STOPPING = "until the loss ceased to improve"


@dataclass(frozen=True)
class _Row:
    """Where a CSV row's numbers come from: a family (or the paper's network) in one probe BN mode."""

    family: str
    network: str
    stopping: str
    bn_mode: str

    def csv(
        self,
        quantity: str,
        sb: tuple[float | None, int],
        lb: tuple[float | None, int],
        eps: float | None = None,
        subspace_dim: int | None = None,
        ratio: float | None = None,
        gap: float | None = None,
    ) -> list[Any]:
        return [self.family, self.network, self.stopping, self.bn_mode, quantity, eps, subspace_dim,
                *sb, *lb, ratio, gap]  # fmt: skip


def _paper_rows() -> tuple[list[list[str]], list[list[Any]]]:
    rows, csv = [], []
    for key in PAPER_NETWORKS:
        name = f"{KESKAR_2017['networks'][key]} (paper)"
        row = _Row(name, name, PAPER_STOPPING, "batch")
        cells = []
        for measure in MEASURES:
            if measure.kind != "epsilon_sharpness":
                cells.append(DASH)  # the paper gives no Hessian numbers
                continue
            sb, lb = KESKAR_2017["sharpness_subspace" if measure.subspace else "sharpness_full"][measure.eps][
                key
            ]
            cells.append(_times(lb / sb))
            p = PAPER_SUBSPACE if measure.subspace else None
            csv.append(row.csv(measure.name, (sb, 5), (lb, 5), measure.eps, p, ratio=lb / sb))
        sb_acc, lb_acc = KESKAR_2017["test_acc"][key]
        csv.append(row.csv("test_acc", (sb_acc, 5), (lb_acc, 5), gap=sb_acc - lb_acc))
        rows.append([name, PAPER_STOPPING, BN_MODE_TEXT["batch"], *cells, f"{sb_acc - lb_acc:.2f}", "5 / 5"])
    return rows, csv


def keskar_ablation(runs: Sequence[RunRecord], out_dir: str | Path, sb_batch: int, lb_batch: int) -> str:
    """The ablation table as Markdown, one row per (family, probe BN mode) with runs at both batch
    sizes, under the paper's C1 and C2 rows; writes out_dir/keskar_ablation.csv (CSV_COLUMNS:
    lb_over_sb on the measures' rows, sb_minus_lb, the test-accuracy gap in points, on the
    test_acc rows)."""
    rows, csv_rows = _paper_rows()
    for family in table_families(runs, sb_batch, lb_batch):
        family_rows, family_csv = _family_rows(family, sb_batch, lb_batch)
        rows += family_rows
        csv_rows += family_csv
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "keskar_ablation.csv", CSV_COLUMNS, csv_rows)
    headings = [m.heading for m in MEASURES]
    header = ("network", "stopping", "probe BN", *headings, "test acc SB − LB (points)", "runs SB / LB")
    return markdown_table(header, rows)


def _mean_n(values: list[float]) -> tuple[float | None, int]:
    return (mean_std(values)[0] if values else None), len(values)


def _family_rows(family: Family, sb_batch: int, lb_batch: int) -> tuple[list[list[str]], list[list[Any]]]:
    sb, lb = family.at(sb_batch), family.at(lb_batch)
    network = family.network + (f", {family.details}" if family.details else "")
    p = _subspace_dim(sb + lb)
    accuracy = {
        name: [a for r in group if (a := final_accuracy(r)) is not None]
        for name, group in (("SB", sb), ("LB", lb))
    }
    gap = None
    if accuracy["SB"] and accuracy["LB"]:
        gap = mean_std(accuracy["SB"])[0] - mean_std(accuracy["LB"])[0]
    rows, csv = [], []
    for mode in final_bn_modes(sb + lb, MEASURE_KINDS):
        row = _Row(family.label, network, family.stopping, mode)
        cells = []
        for measure in MEASURES:
            values = {
                name: [v for r in group if (v := measure.value(r, mode, p)) is not None]
                for name, group in (("SB", sb), ("LB", lb))
            }
            ratio = _ratio(values["LB"], values["SB"])
            cells.append(_times(ratio))
            dim = p if measure.subspace else None
            csv.append(
                row.csv(measure.name, _mean_n(values["SB"]), _mean_n(values["LB"]), measure.eps, dim, ratio)
            )
        csv.append(row.csv("test_acc", _mean_n(accuracy["SB"]), _mean_n(accuracy["LB"]), gap=gap))
        gap_text = DASH if gap is None else f"{gap:.2f}"
        rows.append(
            [
                network,
                family.stopping,
                bn_mode_text(sb + lb, mode),
                *cells,
                gap_text,
                f"{len(sb)} / {len(lb)}",
            ]
        )
    return rows, csv
