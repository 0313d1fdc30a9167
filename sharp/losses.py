"""The losses a run trains on and its probes measure: cross-entropy, or the squared loss of
Cohen et al. 2021 ("Gradient Descent on Neural Networks Typically Occurs at the Edge of
Stability"), ½‖f(x) − onehot(y)‖² per example.

Each loss comes as a sum over the batch (training divides it by the window's example count,
so accumulation is exact), as a mean over the batch (the probes' `loss_fn`) and per example
(an ensemble's members sum their own examples').
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sharp.config import LOSSES, check_choice

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_sum(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="sum")


def _squared_errors(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    onehot = F.one_hot(targets, outputs.shape[1]).to(outputs.dtype)
    return (outputs - onehot).square()


def squared_loss_sum(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over examples of ½‖outputs − onehot(targets)‖²."""
    return 0.5 * _squared_errors(outputs, targets).sum()


def cross_entropy_per_example(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def squared_loss_per_example(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return 0.5 * _squared_errors(outputs, targets).sum(1)


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of a batch (the probes' default loss)."""
    return F.cross_entropy(outputs, targets)


def squared_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ½‖outputs − onehot(targets)‖²."""
    return squared_loss_sum(outputs, targets) / len(targets)


_SUMMED = {"ce": cross_entropy_sum, "mse": squared_loss_sum}
_MEAN = {"ce": cross_entropy, "mse": squared_loss}
_PER_EXAMPLE = {"ce": cross_entropy_per_example, "mse": squared_loss_per_example}


def summed_loss(name: str) -> LossFn:
    """The loss `name` summed over the batch."""
    return _SUMMED[check_choice(name, "--loss", LOSSES)]


def per_example_loss(name: str) -> LossFn:
    """The loss `name` of each example of the batch (an ensemble sums them member by member)."""
    return _PER_EXAMPLE[check_choice(name, "--loss", LOSSES)]


def mean_loss(name: str) -> LossFn:
    """The loss `name` averaged over the batch."""
    return _MEAN[check_choice(name, "--loss", LOSSES)]
