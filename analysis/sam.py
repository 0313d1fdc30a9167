"""SGD against SAM and ASAM at small and large batch (Foret et al. 2021; Kwon et al. 2021): does
minimizing sharpness close the small- vs large-batch gap, and does it lower every sharpness
measure or only some? Reads finished runs that differ in `sam_rho`/`sam_adaptive` and batch
size (and seed); torch-free."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt

from analysis.results import RunRecord, batch_sizes, describe, mean_std
from analysis.style import batch_colour, finite, log_if_positive, outputs, save_figure, write_csv
from analysis.tables import markdown_table
from sharp.errors import SharpError

EPS = 1e-3  # the epsilon-sharpness compared (Keskar et al.'s larger one, full space)
# (column, what it is, how to read it from a run): the measures each variant is compared by
MEASURES: tuple[tuple[str, str], ...] = (
    ("test_acc", "test accuracy (%)"),
    ("train_acc", "train accuracy (%)"),
    ("epsilon_sharpness", f"ε-sharpness (ε = {EPS:g}, full space, %)"),
    ("adaptive_sharpness", "adaptive sharpness (worst case)"),
    ("lambda_max", "top Hessian eigenvalue λ_max"),
)


def variant(run: RunRecord) -> str:
    """SGD (the base optimizer alone), SAM ρ or ASAM ρ, with m-SAM's group size when set."""
    s = run.settings
    rho = s.get("sam_rho") or 0.0
    base = str(s.get("optimizer", "sgd")).upper().replace("ADAMW", "AdamW").replace("ADAM", "Adam")
    if not rho:
        return base
    name = f"{'ASAM' if s.get('sam_adaptive') else 'SAM'} ρ={rho:g}"
    return name + (f", m={s['sam_m']}" if s.get("sam_m") else "")


def _measure(run: RunRecord, name: str) -> float | None:
    final = run.final
    if name in ("test_acc", "train_acc"):
        key = "test_acc" if name == "test_acc" else "eval_train_acc"
        value = finite(final.get(key))
        return None if value is None else 100 * value
    if name == "epsilon_sharpness":
        record = run.probe("epsilon_sharpness", eps=EPS, subspace_dim=None)
        return None if record is None else finite(record.get("sharpness"))
    if name == "adaptive_sharpness":
        record = run.probe("adaptive_sharpness")
        return None if record is None else finite(record.get("sharpness"))
    record = run.probe("hessian_eigenvalues")
    values = record.get("eigenvalues") if record else None
    return finite(values[0]) if values else None


def _summary(
    runs: Sequence[RunRecord],
) -> tuple[list[str], list[int], dict[tuple[str, int], dict[str, tuple[float, float]]], list[RunRecord]]:
    """Variants (the plain optimizer first), batch sizes, and mean ± std of every measure for each
    (variant, batch) over its seeds."""
    kept = [r for r in runs if not r.diverged and r.evaluations]
    variants = sorted({variant(r) for r in kept}, key=lambda v: (v not in ("SGD", "Adam", "AdamW"), v))
    if len(variants) < 2:
        raise SharpError(
            "the SAM comparison needs runs with and without --sam-rho (found "
            f"{', '.join(variants) or 'no finished runs'})"
        )
    sizes = batch_sizes(kept)
    summary = {}
    for name in variants:
        for batch in sizes:
            group = [r for r in kept if variant(r) == name and r.batch_size == batch]
            if group:
                summary[name, batch] = {
                    m: mean_std([v for r in group if (v := _measure(r, m)) is not None]) for m, _ in MEASURES
                }
                summary[name, batch]["n_runs"] = (len(group), 0.0)
    return variants, sizes, summary, kept


def sam_table(runs: Sequence[RunRecord]) -> str:
    """The comparison as a Markdown table: every measure per (variant, batch), mean ± std over
    seeds, and each variant's test accuracy minus that at its largest batch (the SB − LB gap)."""
    variants, sizes, summary, _ = _summary(runs)

    def cell(mean: float, std: float) -> str:
        if finite(mean) is None:
            return "—"
        return f"{mean:.4g}" + (f" ± {std:.2g}" if finite(std) is not None else "")

    header = ["variant", "B", "runs", *(label for _, label in MEASURES), "test acc. − largest B (points)"]
    lines = []
    for name in variants:
        largest = summary.get((name, sizes[-1]), {}).get("test_acc", (float("nan"), 0.0))[0]
        for batch in sizes:
            stats = summary.get((name, batch))
            if stats is None:
                continue
            gap = stats["test_acc"][0] - largest
            gap_text = "—" if batch == sizes[-1] or finite(gap) is None else f"{gap:+.2f}"
            row = [
                name,
                str(batch),
                str(stats["n_runs"][0]),
                *(cell(*stats[m]) for m, _ in MEASURES),
                gap_text,
            ]
            lines.append(row)
    return markdown_table(header, lines)


def sam_comparison(runs: Sequence[RunRecord], out_dir: str | Path, scale: str | None = None) -> list[Path]:
    """One bar chart per measure (test accuracy, ε-sharpness, adaptive sharpness, λ_max): a
    group of bars per optimizer variant, one bar per batch size (small-batch blue, large-batch
    red), mean ± std over seeds; and sam_comparison.csv (variant, batch_size, n_runs, then mean
    and std of every measure)."""
    variants, sizes, summary, kept = _summary(runs)
    rows = [
        [name, batch, stats["n_runs"][0], *(finite(x) for m, _ in MEASURES for x in stats[m])]
        for (name, batch), stats in summary.items()
    ]
    png, csv = outputs(out_dir, "sam_comparison")
    header = ["variant", "batch_size", "n_runs", *(f"{m}_{s}" for m, _ in MEASURES for s in ("mean", "std"))]
    write_csv(csv, header, rows)

    shown = [m for m in MEASURES if m[0] != "train_acc"]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.8))
    width = 0.8 / len(sizes)
    for axis, (measure, label) in zip(axes, shown, strict=True):
        values = []
        for j, batch in enumerate(sizes):
            xs, means, stds = [], [], []
            for i, name in enumerate(variants):
                mean, std = summary.get((name, batch), {}).get(measure, (float("nan"), float("nan")))
                if finite(mean) is not None:
                    xs.append(i + (j - (len(sizes) - 1) / 2) * width)
                    means.append(mean)
                    stds.append(std if finite(std) is not None else 0.0)
            axis.bar(
                xs, means, width * 0.9, yerr=stds, color=batch_colour(batch), label=f"B={batch}", capsize=2
            )
            values += means
        if measure != "test_acc":
            log_if_positive(axis, values)
        axis.set_xticks(range(len(variants)), variants, rotation=30, ha="right", fontsize=8)
        axis.set_title(label, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"SGD vs SAM vs ASAM — {describe(kept, scale)}", fontsize=9)
    fig.tight_layout()
    return [save_figure(fig, png), csv]
