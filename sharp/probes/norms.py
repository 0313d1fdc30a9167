"""Norms of the weights: the cheap measures that every comparison of generalization measures
includes (Jiang et al. 2020, "Fantastic Generalization Measures and Where to Find Them", ICLR).

- `l2_norm`: ‖w‖₂ over every trainable parameter (biases and normalization parameters included);
- `distance_from_init`: ‖w − w₀‖₂ over the same parameters, w₀ the weights at initialization;
- `frobenius_sq_sum`: Σ_layers ‖W‖_F² over the weight tensors of the convolutional and linear
  layers (biases and normalization parameters left out);
- `path_norm`: Σ_out f_{w²}(1), the output of the network with every parameter squared, summed,
  on an all-ones input (Neyshabur et al. 2015; Jiang et al.'s "path-norm"). For a ReLU network
  of convolutional and linear layers and average pooling, every pre-activation is then
  non-negative, so each ReLU passes its input and the output sum is the sum over all input-output
  paths of the product of the squared weights along the path: the squared ℓ2 path norm (a
  bias is an edge from a unit fixed at 1). It is defined only for networks without
  normalization layers (and without max pooling, which is not a sum over paths); for others it
  is None, with the reason. Average pooling enters with its own coefficients 1/(h·w), not
  squared, as in the usual computation of this measure.

All four are accumulated in float64 from the model's parameters; the model is not changed.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from sharp.config import check_choice
from sharp.errors import SharpError
from sharp.probes.common import BN_MODES, Batch, ProbeResult, as_batches, model_device, model_dtype

WEIGHTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMALIZATION_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
MAX_POOLING = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)


@dataclass(kw_only=True)
class NormsResult(ProbeResult):
    """Weight norms of one model; a measure that cannot be computed is None with its reason."""

    kind: ClassVar[str] = "weight_norms"
    l2_norm: float
    distance_from_init: float | None
    distance_from_init_reason: str | None = None
    init_source: str | None = None  # where w0 came from (a checkpoint path), when given
    frobenius_sq_sum: float
    path_norm: float | None
    path_norm_reason: str | None = None
    input_shape: list[int] | None = None  # the all-ones input of the path norm (one example)
    n_params: int = 0  # trainable parameters in l2_norm and distance_from_init
    n_weight_tensors: int = 0  # conv and linear weight tensors in frobenius_sq_sum


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _distance(model: nn.Module, init: Mapping[str, torch.Tensor]) -> tuple[float | None, str | None]:
    total = torch.zeros((), dtype=torch.float64)
    for name, p in _trainable(model):
        start = init.get(name)
        if start is None or tuple(start.shape) != tuple(p.shape):
            found = "missing" if start is None else f"shape {tuple(start.shape)}"
            return None, f"the initial weights do not fit the model: {name} is {found}, not {tuple(p.shape)}"
        diff = p.detach().to("cpu", torch.float64) - start.detach().to("cpu", torch.float64)
        total += diff.square().sum()
    return float(total.sqrt()), None


def path_norm_obstacle(model: nn.Module) -> str | None:
    """Why the path norm of `model` is not defined (a layer that is not a sum over paths), or None."""
    for name, module in model.named_modules():
        if isinstance(module, NORMALIZATION_LAYERS):
            return (
                f"defined for networks without normalization layers; {name or 'the model'} is "
                f"{type(module).__name__}"
            )
        if isinstance(module, MAX_POOLING):
            return f"max pooling ({name}, {type(module).__name__}) is not a sum over paths"
    return None


@torch.no_grad()
def path_norm(model: nn.Module, input_shape: Iterable[int]) -> float:
    """Σ_out f_{w²}(1): the output of a float64 copy of `model` with every parameter squared, on one
    all-ones input of `input_shape` (no batch dimension), summed. See the module docstring."""
    squared = copy.deepcopy(model).to(dtype=torch.float64).eval()
    for p in squared.parameters():
        p.copy_(p.square())
    ones = torch.ones((1, *input_shape), dtype=torch.float64, device=model_device(model))
    return float(squared(ones).sum())


def weight_norms(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    init: Mapping[str, torch.Tensor] | None = None,
    init_source: str | None = None,
    init_missing: str = "no initial weights given",
    bn_mode: str = "eval",
) -> NormsResult:
    """ℓ2 norm, distance from `init` (a state dict of the initial weights; None: the distance is
    None with `init_missing` as its reason), sum of squared Frobenius norms and path norm of
    `model` (module docstring). `batches` give the input shape of the path norm; `bn_mode` is
    recorded only: no measure here evaluates the network on data."""
    check_choice(bn_mode, "bn_mode", BN_MODES)
    started = time.perf_counter()
    batches = as_batches(batches)
    if not batches:
        raise SharpError("the probe set is empty: give at least one batch (it sets the input shape)")
    params = _trainable(model)
    l2 = torch.zeros((), dtype=torch.float64)
    for _, p in params:
        l2 += p.detach().to("cpu", torch.float64).square().sum()
    weights = [m.weight for m in model.modules() if isinstance(m, WEIGHTED_LAYERS)]
    frobenius = sum(float(w.detach().to("cpu", torch.float64).square().sum()) for w in weights)
    distance, distance_reason = _distance(model, init) if init is not None else (None, init_missing)
    input_shape = list(batches[0][0].shape[1:])
    obstacle = path_norm_obstacle(model)
    path = None if obstacle else path_norm(model, input_shape)
    return NormsResult(
        l2_norm=float(l2.sqrt()),
        distance_from_init=distance,
        distance_from_init_reason=distance_reason,
        init_source=init_source,
        frobenius_sq_sum=frobenius,
        path_norm=path,
        path_norm_reason=obstacle,
        input_shape=input_shape,
        n_params=sum(p.numel() for _, p in params),
        n_weight_tensors=len(weights),
        n_examples=sum(len(t) for _, t in batches),
        bn_mode=bn_mode,
        dtype=str(model_dtype(model)).replace("torch.", ""),
        device=str(model_device(model)),
        evaluations={} if obstacle else {"forward": 1},
        wall_time=time.perf_counter() - started,
    )
