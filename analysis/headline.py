"""The headline numbers of a probe record (RUN/probes/*.json), read in one place for the terminal
(`sharp probe`), the sweep table (`sharp sweep collect`), the report and the rank correlations.

Each probe kind has its headline fields and, where it measures one, the field of each number's
standard error. Torch-free: a record is plain JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# kind -> ((field, field of its standard error or None), ...), in the order they are shown
HEADLINE_FIELDS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "epsilon_sharpness": (("sharpness", "sharpness_std"),),  # spread over its L-BFGS-B starts
    "adaptive_sharpness": (("sharpness", "stderr"),),
    "average_sharpness": (("sharpness", "stderr"),),
    "hessian_eigenvalues": (("eigenvalues", None),),
    "hessian_trace": (("trace", "stderr"),),
    "noise_scale": (("b_simple", "b_simple_std"),),  # spread over repeated blocks of draws
    "weight_norms": (
        ("l2_norm", None),
        ("distance_from_init", None),
        ("path_norm", None),
        ("frobenius_sq_sum", None),
    ),
}
FIGURE_ONLY = ("hessian_density", "random_direction_scan")  # their result is a curve, not a number
SCALAR_NAMES = {"eigenvalues": "lambda_max"}  # a list field is summarized by its first (largest) entry


def finite_number(value: Any) -> float | None:
    """`value` as a float when it is a finite number (JSON keeps NaN and inf as text), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class Headline:
    """One headline number of a probe record: its field, value and standard error (if measured)."""

    field: str
    value: float | list[float] | None  # a list for the eigenvalues (descending); None when missing
    stderr: float | None = None
    stderr_field: str | None = None

    @property
    def scalar_name(self) -> str:
        return SCALAR_NAMES.get(self.field, self.field)

    @property
    def scalar(self) -> float | None:
        """The number itself, or the first entry of a list (the top eigenvalue)."""
        if isinstance(self.value, list):
            return self.value[0] if self.value else None
        return self.value


def headlines(record: dict[str, Any]) -> list[Headline]:
    """The headline numbers of `record`, in order; [] for a figure-only or unknown probe kind."""
    out = []
    for name, error in HEADLINE_FIELDS.get(record.get("probe", ""), ()):
        raw = record.get(name)
        if isinstance(raw, list):
            value: float | list[float] | None = [v for v in map(finite_number, raw) if v is not None]
        else:
            value = finite_number(raw)
        stderr = finite_number(record.get(error)) if error else None
        out.append(Headline(name, value, stderr, error))
    return out


def scalars(record: dict[str, Any], errors: bool = True) -> dict[str, float]:
    """The finite headline numbers of `record` by name (`lambda_max` for the eigenvalues), and,
    with `errors`, their standard errors under their own field names."""
    out = {}
    for headline in headlines(record):
        if headline.scalar is not None:
            out[headline.scalar_name] = headline.scalar
        if errors and headline.stderr_field and headline.stderr is not None:
            out[headline.stderr_field] = headline.stderr
    return out
