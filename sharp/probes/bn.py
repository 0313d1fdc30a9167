"""Batch normalization in probes: which statistics a BN layer normalizes with.

- "eval": the running statistics the model holds (accumulated during training, so for a
  large-batch run they may lag its final weights).
- "recompute": running statistics recomputed at the probed weights by
  `recompute_bn_statistics`, then used as in eval mode.
- "batch": each BN group normalized by its own mean and variance (Keras BN "mode 2", as
  Keskar et al. 2017 evaluate); the BN layers keep no running statistics.

BN layers built with `track_running_stats=False` hold no running statistics at all: only
"batch" is meaningful for them, and the other modes refuse.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from sharp.config import BN_MODES, check_choice
from sharp.errors import SharpError

Batch = tuple[torch.Tensor, torch.Tensor]
BatchNorm = nn.modules.batchnorm._BatchNorm


def bn_layers(model: nn.Module) -> list[tuple[str, BatchNorm]]:
    """The model's batch-norm layers (any `_BatchNorm`, ghost BN included), by name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BatchNorm)]


def check_bn_mode(model: nn.Module, bn_mode: str) -> None:
    """Refuse an unknown mode, and eval/recompute on BN layers that keep no running statistics."""
    check_choice(bn_mode, "bn_mode", BN_MODES)
    if bn_mode == "batch":
        return
    for name, module in bn_layers(model):
        if module.running_mean is None or module.running_var is None:
            raise SharpError(
                f"bn_mode {bn_mode!r} needs BN running statistics, but layer {name!r} keeps none "
                "(batch-statistics BN): use bn_mode 'batch' with a BN batch size"
            )


def use_batch_statistics(model: nn.Module) -> None:
    """Make every BN layer normalize each forward pass by its own statistics and update nothing."""
    for _, module in bn_layers(model):
        module.track_running_stats = False
        module.running_mean = None
        module.running_var = None


class _Stop(Exception):
    """Raised by a forward pre-hook to end a forward pass at the layer being measured."""


def _forward_order(model: nn.Module, layers: list[tuple[str, BatchNorm]], inputs: torch.Tensor) -> list:
    """BN layers in the order one forward pass calls them (each must run exactly once)."""
    calls: list[str] = []
    handles = [
        m.register_forward_pre_hook(lambda _m, _a, name=name: calls.append(name)) for name, m in layers
    ]
    try:
        model(inputs[:2])
    finally:
        for handle in handles:
            handle.remove()
    for name, _ in layers:
        if calls.count(name) != 1:
            raise SharpError(
                f"BN layer {name!r} runs {calls.count(name)} times in a forward pass: its statistics "
                "cannot be recomputed one layer at a time; use bn_mode 'eval' or 'batch'"
            )
    by_name = dict(layers)
    return [(name, by_name[name]) for name in calls]


class _ChannelMoments:
    """Exact per-channel sums of x and x² in float64, shifted by the first batch's channel means
    (the sums stay exact and the variance does not cancel catastrophically)."""

    def __init__(self) -> None:
        self.shift: torch.Tensor | None = None
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        values = x.detach().transpose(0, 1).reshape(x.shape[1], -1).to(torch.float64)  # channels x values
        if self.shift is None:
            self.shift = values.mean(1)
            self.s1 = torch.zeros_like(self.shift)
            self.s2 = torch.zeros_like(self.shift)
        centred = values - self.shift[:, None]
        self.s1 += centred.sum(1)
        self.s2 += centred.square().sum(1)
        self.n += values.shape[1]

    def mean_and_unbiased_variance(self) -> tuple[torch.Tensor, torch.Tensor]:
        offset = self.s1 / self.n
        variance = (self.s2 / self.n - offset.square()).clamp_min(0) * (self.n / (self.n - 1))
        return self.shift + offset, variance


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, batches: Iterable[Batch]) -> dict[str, Any]:
    """Set every BN layer's running statistics to the exact per-channel mean and unbiased
    variance of its input over all examples of `batches`, at the model's current weights.

    Layer by layer, in forward order, with the model in eval mode: for layer k, layers before
    it already hold their recomputed statistics, one pass over all the batches (stopped at
    layer k) sums x and x² per channel in float64, and the mean and the unbiased variance over
    all N·H·W values follow; then layer k + 1. The result does not depend on how the examples
    are batched, and it is exactly what eval mode sees: each layer's statistics are those of
    its input when the layers before it normalize with their recomputed ones.
    `torch.optim.swa_utils.update_bn` does neither: it runs the model in train mode (the later
    layers see inputs normalized with per-batch statistics, not the ones eval will use) and
    averages the per-batch means and variances with equal weight per batch, which is off
    when the batches are uneven. Cost: one forward pass over the data per BN layer, each
    stopped at its layer.

    `batches` is iterated once per layer (a generator is read into a list first); inputs are
    moved to the model's device and dtype. Returns what was done, for the result record.
    """
    layers = bn_layers(model)
    if not layers:
        return {"layers": 0, "examples": 0}
    data = list(batches) if iter(batches) is batches else batches  # a generator is read once
    param = next(model.parameters())

    def prepared() -> Iterable[torch.Tensor]:
        for inputs, _ in data:
            yield inputs.to(device=param.device, dtype=param.dtype if inputs.is_floating_point() else None)

    first = next(iter(prepared()), None)
    if first is None or len(first) == 0:
        raise SharpError("bn_data is empty: give the batches to recompute BN statistics from")
    training = model.training
    model.eval()
    examples = 0
    try:
        for name, module in _forward_order(model, layers, first):
            moments = _ChannelMoments()

            def measure(_module: nn.Module, args: tuple, moments: _ChannelMoments = moments) -> None:
                moments.add(args[0])
                raise _Stop

            handle = module.register_forward_pre_hook(measure)
            examples = 0
            try:
                for inputs in prepared():
                    examples += len(inputs)
                    with contextlib.suppress(_Stop):
                        model(inputs)
            finally:
                handle.remove()
            if moments.n < 2:
                raise SharpError(
                    f"BN layer {name!r} saw {moments.n} value per channel: give bn_data with more examples"
                )
            mean, variance = moments.mean_and_unbiased_variance()
            module.running_mean.copy_(mean)
            module.running_var.copy_(variance)
    finally:
        model.train(training)
    return {"layers": len(layers), "examples": examples}


def describe_bn(
    model: nn.Module, bn_mode: str, bn_batch: int | None, groups: list[int] | None
) -> dict[str, Any]:
    """The BN part of a probe record."""
    out: dict[str, Any] = {"mode": bn_mode, "layers": len(bn_layers(model))}
    if bn_mode == "batch":
        out["bn_batch"] = bn_batch
        out["groups"] = len(groups or [])
        out["last_group"] = (groups or [0])[-1]
        out["grouping"] = (
            "consecutive examples of the probe set in groups of bn_batch; a short last group is "
            "normalized by its own statistics and weighted by its size"
            if bn_batch is not None
            else "each given batch is one BN group"
        )
    return out


__all__ = [
    "bn_layers",
    "check_bn_mode",
    "describe_bn",
    "recompute_bn_statistics",
    "use_batch_statistics",
]
