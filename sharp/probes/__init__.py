"""Measures of a solution: each takes `(model, batches)` and returns a JSON-ready result.

`batches` is the probe set, a list of `(inputs, targets)` evaluated whole each time; the
loss over it is exactly the mean over all its examples. Probes work on a copy of the
model, in eval mode, and never change the caller's model. BN statistics are the running
ones (`bn_mode="eval"`), recomputed at the probed weights from `bn_data`
(`bn_mode="recompute"`), or each BN group's own (`bn_mode="batch"`, groups of `bn_batch`):
see `sharp.probes.bn`. Every result records them, the loss, the torch flags in force, its
iterations and stopping rule, and its uncertainty.
"""

from sharp.probes.bn import recompute_bn_statistics
from sharp.probes.common import ProbeModel, ProbeResult, TensorPool, cross_entropy
from sharp.probes.hessian import HessianOperator, hessian_density, hessian_top_eigenvalues, hessian_trace
from sharp.probes.landscape import interpolate, make_directions, random_direction_scan
from sharp.probes.noise import OnlineNoiseScale, gradient_noise_scale
from sharp.probes.norms import weight_norms
from sharp.probes.reparam import rescale
from sharp.probes.sharpness import adaptive_sharpness, average_sharpness, epsilon_sharpness

__all__ = [
    "HessianOperator",
    "OnlineNoiseScale",
    "ProbeModel",
    "ProbeResult",
    "TensorPool",
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
    "recompute_bn_statistics",
    "rescale",
    "weight_norms",
]
