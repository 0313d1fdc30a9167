"""Rank correlation of a measure with generalization over trained runs: Kendall's τ, a bootstrap
interval over runs, and the granulated τ Ψ of Jiang et al. 2020 ("Fantastic Generalization
Measures and Where to Find Them", ICLR): for each hyperparameter axis, the mean τ over the groups
of runs in which only that axis varies; then the mean over the axes.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.stats


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's τ_b of x and y (`scipy.stats.kendalltau`, which corrects for ties); None when it
    is not defined: fewer than two pairs, or x or y constant."""
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length ({len(x)} and {len(y)})")
    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    tau = float(scipy.stats.kendalltau(x, y).statistic)
    return tau if math.isfinite(tau) else None


@dataclass(frozen=True)
class BootstrapInterval:
    """A percentile bootstrap interval of τ over runs and how it was made."""

    low: float | None
    high: float | None
    level: float
    n_resamples: int  # resamples drawn
    n_defined: int  # resamples with a defined τ (a resample of few runs may hold one value only)
    seed: int


def bootstrap_interval(
    x: Sequence[float], y: Sequence[float], n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> BootstrapInterval:
    """Percentile interval of Kendall's τ over `n_resamples` resamples of the runs (pairs drawn
    with replacement, numpy's seeded default generator). Written here rather than with
    scipy.stats.bootstrap because a resample of few runs can be constant in x or y, where τ is
    not defined: such resamples are dropped and counted, not allowed to make the interval NaN."""
    if not 0 < level < 1:
        raise ValueError(f"level {level} must be between 0 and 1")
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    rng = np.random.default_rng(seed)
    taus = []
    for _ in range(n_resamples):
        index = rng.integers(0, len(x), len(x))
        tau = kendall_tau(list(x[index]), list(y[index]))
        if tau is not None:
            taus.append(tau)
    if not taus:
        return BootstrapInterval(None, None, level, n_resamples, 0, seed)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(taus, [tail, 100 - tail])
    return BootstrapInterval(float(low), float(high), level, n_resamples, len(taus), seed)


@dataclass(frozen=True)
class AxisTau:
    """ψ_i of one axis: the mean τ over its groups, and how many groups had a defined τ."""

    axis: str
    psi: float | None
    n_groups: int


def granulated_tau(
    axis_values: Sequence[Sequence[Hashable]],
    axes: Sequence[str],
    x: Sequence[float],
    y: Sequence[float],
) -> tuple[float | None, list[AxisTau]]:
    """Jiang et al. 2020's Ψ and its ψ_i per axis. `axis_values[r][i]` is run r's value on axis
    `axes[i]`. For axis i, the runs are grouped by their values on every other axis; each group
    of two or more runs with a defined τ contributes its τ, and ψ_i is their mean. An axis with
    one value (or no group with a defined τ) has no ψ_i and is left out of Ψ, the mean of the
    others; Ψ is None when no axis has one."""
    per_axis = []
    for i, axis in enumerate(axes):
        groups: dict[tuple, list[int]] = {}
        for r, values in enumerate(axis_values):
            groups.setdefault(tuple(v for j, v in enumerate(values) if j != i), []).append(r)
        taus = [
            tau
            for members in groups.values()
            if len(members) >= 2
            and (tau := kendall_tau([x[r] for r in members], [y[r] for r in members])) is not None
        ]
        per_axis.append(AxisTau(axis, sum(taus) / len(taus) if taus else None, len(taus)))
    defined = [a.psi for a in per_axis if a.psi is not None]
    return (sum(defined) / len(defined) if defined else None), per_axis
