"""Parameters and their gradients as one flat vector: written once for the probes (and for
anything else that reduces or compares whole gradients).

A parameter that a loss does not reach has no gradient (`None`); it counts as zeros, so
every flat vector has one entry per parameter entry, in parameter order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def flatten(tensors: Iterable[torch.Tensor | None], like: Sequence[torch.Tensor]) -> torch.Tensor:
    """One 1-D tensor of `tensors` in order; a None stands for zeros shaped like its `like` entry."""
    return torch.cat(
        [(torch.zeros_like(p) if t is None else t).reshape(-1) for t, p in zip(tensors, like, strict=True)]
    )


def flat_grad(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The `.grad` of every parameter as one flat vector (zeros where there is none)."""
    return flatten([p.grad for p in params], params)


def autograd_flat_grad(
    output: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    grad_outputs: torch.Tensor | None = None,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> torch.Tensor:
    """d(output)/d(params) by `torch.autograd.grad`, flat; unreached parameters give zeros.

    With a flat `output` (a gradient) and `grad_outputs` v this is the vector-Jacobian product
    vᵀ d(output)/d(params), a Hessian-vector product when `output` is a gradient.
    """
    grads = torch.autograd.grad(
        output,
        params,
        grad_outputs=grad_outputs,
        create_graph=create_graph,
        retain_graph=retain_graph,
        allow_unused=True,
    )
    return flatten(grads, params)


def assign_flat(params: Sequence[torch.Tensor], vector: torch.Tensor) -> None:
    """Copy a flat vector into the parameters in place (cast to each parameter's dtype/device).

    `copy_` rather than `torch.nn.utils.vector_to_parameters`, which makes the parameters views
    of `vector` (later edits of it would move the model) and drops channels_last.
    """
    with torch.no_grad():
        for p, chunk in zip(params, vector.split([p.numel() for p in params]), strict=True):
            p.copy_(chunk.view_as(p))


__all__ = ["assign_flat", "autograd_flat_grad", "flat_grad", "flatten"]
