"""Jiang et al. 2020's own τ and Ψ, printed beside ours only once confirmed against the paper.

Jiang, Neyshabur, Mobahi, Krishnan, Bengio, "Fantastic Generalization Measures and Where to Find
Them", ICLR 2020. Each entry is keyed by the name of our measure (`analysis.headline`: l2_norm,
distance_from_init, path_norm, frobenius_sq_sum, ...) and says, in a comment, the table of the
paper it was read from. A number recalled but not re-read in the paper does not belong here:
a report then says that the paper's numbers are not shown.
"""

from __future__ import annotations

from dataclasses import dataclass

CITATION = (
    "Jiang, Neyshabur, Mobahi, Krishnan, Bengio 2020, Fantastic Generalization Measures and Where to "
    "Find Them (ICLR)"
)


@dataclass(frozen=True)
class PaperValue:
    """The paper's τ and Ψ of one measure against the generalization gap, and where they stand."""

    paper_measure: str  # the measure's name in the paper
    tau: float | None
    psi: float | None
    table: str  # e.g. "Table 5 (CIFAR-10)"


# Confirmed numbers only (none yet: the paper's tables could not be read from the sources at hand).
JIANG_2020: dict[str, PaperValue] = {}
