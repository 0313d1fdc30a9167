"""Rescalings that leave a network's function unchanged (Dinh et al. 2017, "Sharp Minima Can
Generalize For Deep Nets"): the reference for which sharpness measures a reparametrization
moves.

`rescale(model, alpha)` returns a rescaled copy of one of sharp's model families:

- with batch norm (resnet*, convnet, mlp with norm "bn", ghost BN included): every conv or
  linear layer that feeds a BN layer has its weight (and bias) multiplied by alpha, and that
  BN layer's running mean by alpha and running variance by alpha². BN(alpha z) = BN(z) in
  batch mode and, with the statistics scaled, in eval mode, up to the BN eps:
  (x - mu) / sqrt(var + eps / alpha²) instead of (x - mu) / sqrt(var + eps); recomputed
  statistics follow the new weights by themselves;
- with group norm: every conv or linear layer that feeds a GroupNorm has its weight (and
  bias) multiplied by alpha (GroupNorm is scale invariant up to its eps);
- without normalization, through ReLU's positive homogeneity relu(alpha t) = alpha relu(t):
  in each residual block of a ResNet, conv1 (weight and bias) times alpha and conv2's weight
  times 1/alpha; in the conv net, the first conv times alpha and the second conv's weight
  times 1/alpha (max pooling commutes with a positive scale); in the MLP, the first linear
  layer times alpha and the second one's weight times 1/alpha. The function is unchanged
  up to rounding.

Other models are refused: no rescaling is known for them here.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from sharp.config import check_positive
from sharp.errors import SharpError
from sharp.models import MLP, BasicBlock, CifarResNet, ConvNet
from sharp.probes.bn import BatchNorm


def _layer_norm_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(layer, norm) for every conv/linear that feeds a BN or GroupNorm layer directly."""
    pairs: list[tuple[nn.Module, nn.Module]] = []
    for module in model.modules():
        if isinstance(module, CifarResNet):
            pairs.append((module.stem, module.stem_norm))
        elif isinstance(module, BasicBlock):
            pairs += [(module.conv1, module.norm1), (module.conv2, module.norm2)]
        elif isinstance(module, nn.Sequential):
            pairs += list(itertools.pairwise(module.children()))
    return [
        (layer, norm)
        for layer, norm in pairs
        if isinstance(layer, nn.Conv2d | nn.Linear) and isinstance(norm, BatchNorm | nn.GroupNorm)
    ]


def _relu_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(layer scaled by alpha, layer whose weight is scaled by 1/alpha) for a model without norms."""
    if isinstance(model, CifarResNet):
        return [(m.conv1, m.conv2) for m in model.modules() if isinstance(m, BasicBlock)]
    if isinstance(model, ConvNet):
        convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
        return [(convs[0], convs[1])]
    if isinstance(model, MLP):
        linears = [m for m in model.net if isinstance(m, nn.Linear)]
        return [(linears[0], linears[1])]
    return []


def rescale(model: nn.Module, alpha: float) -> tuple[nn.Module, str]:
    """A copy of `model` with the function-preserving rescaling above; and what was done."""
    check_positive(spelling="argument", alpha=alpha)
    alpha = float(alpha)
    if not isinstance(model, CifarResNet | ConvNet | MLP):
        raise SharpError(
            f"no function-preserving rescaling is known for {type(model).__name__}: "
            "--reparam-check covers sharp's resnet, convnet and mlp models"
        )
    out = copy.deepcopy(model)
    pairs = _layer_norm_pairs(out)
    with torch.no_grad():
        if pairs:
            for layer, norm in pairs:
                layer.weight.mul_(alpha)
                if layer.bias is not None:
                    layer.bias.mul_(alpha)
                if isinstance(norm, BatchNorm) and norm.running_mean is not None:
                    norm.running_mean.mul_(alpha)
                    norm.running_var.mul_(alpha**2)
            kinds = sorted({"BN" if isinstance(norm, BatchNorm) else "GroupNorm" for _, norm in pairs})
            return out, (
                f"weight (and bias) of the {len(pairs)} layers feeding a {'/'.join(kinds)} layer times "
                f"{alpha:g}; BN running mean times {alpha:g}, running variance times {alpha**2:g}"
            )
        relu = _relu_pairs(out)
        if not relu:
            raise SharpError(
                f"{type(model).__name__} has no layer pair to rescale: --reparam-check needs one"
            )
        for first, second in relu:
            first.weight.mul_(alpha)
            if first.bias is not None:
                first.bias.mul_(alpha)
            second.weight.div_(alpha)
    text = f"{len(relu)} ReLU layer pair(s): the first layer times {alpha:g}, the next weight / {alpha:g}"
    return out, text


__all__ = ["rescale"]
