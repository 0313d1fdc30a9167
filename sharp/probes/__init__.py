"""Measures of a solution: each takes `(model, batches)` and returns a JSON-ready result.

`batches` is the probe set, a list of `(inputs, targets)` evaluated whole each time; the
loss over it is exactly the mean over all its examples. Probes work on a copy of the
model, in eval mode unless `bn_mode="batch"`, and never change the caller's model.
"""

from sharp.probes.common import ProbeModel, ProbeResult, cross_entropy
from sharp.probes.hessian import HessianOperator, hessian_density, hessian_top_eigenvalues, hessian_trace
from sharp.probes.landscape import interpolate, make_directions, random_direction_scan
from sharp.probes.noise import OnlineNoiseScale, gradient_noise_scale
from sharp.probes.norms import weight_norms
from sharp.probes.sharpness import adaptive_sharpness, average_sharpness, epsilon_sharpness

__all__ = [
    "HessianOperator",
    "OnlineNoiseScale",
    "ProbeModel",
    "ProbeResult",
    "adaptive_sharpness",
    "average_sharpness",
    "cross_entropy",
    "epsilon_sharpness",
    "gradient_noise_scale",
    "hessian_density",
    "hessian_top_eigenvalues",
    "hessian_trace",
    "interpolate",
    "make_directions",
    "random_direction_scan",
    "weight_norms",
]
