"""Sharpness along training: λ_max every K optimizer steps, the batch sharpness of the step's own
batch, and the share of the gradient along the sharpest direction (Cohen et al. 2021, "Gradient
Descent on Neural Networks Typically Occurs at the Edge of Stability"; Andreyev & Beneventano
2024, "Edge of Stochastic Stability: Revisiting the Edge of Stability for SGD").

At a tracked step t (t a multiple of K), at the weights the step starts from, before the
optimizer moves them:

- `lambda_max`: the top eigenvalue of the Hessian of the mean loss over the tracking set (a
  fixed, seeded, class-balanced, unaugmented subset of the training split, or all of it), by
  Lanczos with full reorthogonalization started from the previous tracked eigenvector (a seeded
  Gaussian at the first point), stopped when the Ritz residual is at most `LANCZOS_TOL` x λ;
  `hvps` counts its Hessian-vector products. A warm start finds the top eigenvalue of the
  Krylov space of the previous direction: a sharp direction that appears orthogonal to it
  shows up only as Lanczos proceeds (`start` says which start a row used).
- `batch_sharpness`: g_Bᵀ H_B g_B / ‖g_B‖² of the loss L_B of the step's batch B (all the
  window's micro-batches, each summed loss divided by the window's count, as the step weighs
  them), so it does not depend on how B is cut into micro-batches; one HVP per micro-batch
  (`batch_hvps`; for a full-batch step on the whole split without train-mode BN the step's loss
  is the tracking loss, whose kept graph gives it). Andreyev & Beneventano's batch sharpness
  is its expectation over batches of size B; each row is one draw, at the step's own batch.
- `grad_top_fraction`: (gᵀv)² / ‖g‖² for the tracking-set gradient g and the unit top
  eigenvector v: near 1 when the gradient is the oscillation across the sharpest direction.
- `stability_threshold`: the λ_max of the loss beyond which the step diverges along the top
  eigenvector on a quadratic: 2(1 + β)/η − weight decay for SGD with heavy-ball momentum β
  (2/η without; weight decay adds itself to every eigenvalue the step sees). Adam is refused
  at validation: its edge is on the preconditioned Hessian (Cohen et al. 2022), not tracked.

The loss is the run's own (`--loss`) in one of two BN modes: `train` (BN layers in training
mode, each batch normalized by its own ghost statistics as the step sees them, the tracking
set in batches of the step's micro-batch) or `eval` (running statistics); where the batching
does not change the loss, the tracking set goes in batches of `TRACK_BATCH`. Dropout is off in
both: Lanczos needs one fixed function. Everything runs on copies of the model inside a forked
RNG, so no running statistic, gradient or random stream of the run is touched and the training
trajectory is bit-identical with and without tracking.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from sharp.data import Window
from sharp.errors import RunDiverged
from sharp.losses import mean_loss
from sharp.probes.common import Batch, ProbeModel
from sharp.probes.hessian import HessianOperator, lanczos

LANCZOS_TOL = 1e-3  # Ritz residual bound relative to λ: eigenvalue error near its square (1e-6)
# examples per tracking-set forward where the batch does not change the loss (no train-mode BN):
# on a CPU, 32 batches of 32 cost several times one batch of 1,000
TRACK_BATCH = 1000


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def stability_threshold(lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> float:
    """2(1 + β)/η − wd: on a quadratic of curvature λ, heavy-ball SGD (w <- w − η v,
    v <- β v + g + wd w) is stable iff η (λ + wd) < 2 (1 + β) (Cohen et al. 2021, Sec. 2)."""
    return 2 * (1 + momentum) / lr - weight_decay


def tracking_probe(model: nn.Module, batches: Iterable[Batch], loss: str, bn_mode: str) -> ProbeModel:
    """A ProbeModel (a copy of `model`) whose loss is the mean `loss` over `batches` in BN mode
    `bn_mode`: `eval` (running statistics), or `train` (BN layers in training mode with their
    ghost-batch size and no running statistics, so each batch is normalized by its own ghost
    statistics, exactly as the training step normalizes it, and nothing is updated)."""
    probe = ProbeModel(
        model, batches, loss_fn=mean_loss(loss), bn_mode="batch" if bn_mode == "train" else "eval"
    )
    if bn_mode == "train":
        for module in probe.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train()  # ghost groups apply in training mode only; no running statistics kept
    return probe


def batch_sharpness(
    model: nn.Module, micro_batches: Iterable[Batch], loss: str, bn_mode: str
) -> tuple[float | None, int]:
    """g_Bᵀ H_B g_B / ‖g_B‖² of the mean loss over all `micro_batches` together (one optimizer
    step's window), and the number of micro-batch HVPs it took (one per micro-batch). A window
    of one micro-batch keeps its gradient graph (one gradient, one backward); a longer one is
    done micro-batch by micro-batch (one gradient pass, then forward and double backward per
    micro-batch), so memory stays that of one micro-batch. None if the gradient is zero."""
    batches = list(micro_batches)
    probe = tracking_probe(model, batches, loss, bn_mode)
    op = HessianOperator(probe, keep_graph=len(batches) == 1)
    grad = op.gradient()
    norm2 = float(grad @ grad)
    if norm2 == 0:
        return None, len(batches)
    return float(grad @ op.matvec(grad)) / norm2, len(batches)


def gradient_fraction_along(grad: torch.Tensor, direction: torch.Tensor) -> float | None:
    """(gᵀv)² / (‖g‖² ‖v‖²): the share of ‖g‖² along v (None for a zero gradient)."""
    norm2 = float(grad @ grad) * float(direction @ direction)
    return float(grad @ direction) ** 2 / norm2 if norm2 > 0 else None


def _finite(value: float, step: int, what: str) -> None:
    """A non-finite tracked quantity means the weights the step starts from have blown up."""
    if not math.isfinite(value):
        raise RunDiverged(
            f"training diverged before step {step}: the tracked {what} was not finite", step=step
        )


class SharpnessTracker:
    """λ_max, batch sharpness and grad_top_fraction every `every` optimizer steps of one run.

    Holds the tracking set (`batches(size)` gives it, unaugmented, in batches of `size`) and the
    warm-start vector, which `state_dict` carries into the run's checkpoint."""

    def __init__(
        self,
        every: int,
        tracking_set: Any,  # a DeviceLoader over the tracking examples
        loss: str,
        bn_mode: str,
        seed: int,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        tol: float = LANCZOS_TOL,
    ) -> None:
        self.every = every
        self.tracking_set = tracking_set
        self.loss = loss
        self.bn_mode = bn_mode
        self.seed = seed
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.tol = tol
        self.vector: torch.Tensor | None = None  # the previous tracked top eigenvector (flat, on the CPU)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def measure(self, model: nn.Module, window: Window, step: int, lr: float) -> dict[str, Any]:
        """The metrics.jsonl row of step `step`: `model` at the weights the step starts from and
        `window` the step's batch. Leaves the model, its buffers and every RNG as they were."""
        started = time.perf_counter()
        device = next(model.parameters()).device
        ghost = self.bn_mode == "train" and has_batch_norm(model)  # the loss depends on the batching
        size = window.micro_batch if ghost else max(window.micro_batch, TRACK_BATCH)
        # a full-batch step on the whole split: without batch-dependent BN its loss is the tracking loss
        whole = not ghost and window.count == len(window.loader) == len(self.tracking_set)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            probe = tracking_probe(model, self.tracking_set.batches(size), self.loss, self.bn_mode)
            op = HessianOperator(probe, keep_graph=True)
            _finite(op.loss, step, "loss")

            def matvec(v: torch.Tensor) -> torch.Tensor:
                hv = op.matvec(v)
                _finite(float(hv.abs().max()), step, "Hessian-vector product")
                return hv

            start = None if self.vector is None else self.vector.to(device=op.device, dtype=op.dtype)
            solve = lanczos(
                matvec, op.n, 1, tol=self.tol, seed=self.seed, dtype=op.dtype, device=op.device, v0=start
            )
            top = solve.eigenvectors[:, 0]
            grad = op.gradient()
            fraction = gradient_fraction_along(grad, top)
            if whole:
                norm2 = float(grad @ grad)
                sharpness = float(grad @ op.matvec(grad)) / norm2 if norm2 > 0 else None
                batch_hvps = len(probe.batches)
            else:
                del op, probe  # free the tracking set's graph before the window's
                sharpness, batch_hvps = batch_sharpness(
                    model, window.micro_batches(), self.loss, self.bn_mode
                )
            _finite(0.0 if sharpness is None else sharpness, step, "batch sharpness")
        self.vector = top.detach().cpu().clone()
        return {
            "step": step,
            "lambda_max": solve.eigenvalues[0],
            "batch_sharpness": sharpness,
            "grad_top_fraction": fraction,
            "stability_threshold": stability_threshold(lr, self.momentum, self.weight_decay),
            "hvps": solve.iterations,
            "batch_hvps": batch_hvps,
            "lanczos_residual": solve.residuals[0],
            "lanczos_converged": solve.converged,
            "start": "cold" if start is None else "warm",
            "seconds": round(time.perf_counter() - started, 4),
        }

    def describe(
        self, micro_batch: int, bn_batch: int | None, has_bn: bool, dtype: torch.dtype
    ) -> dict[str, Any]:
        """What config.json records of the tracking (set size, BN mode, solver settings)."""
        if not has_bn:
            statistics = "no BN layers"
        elif self.bn_mode == "train":
            statistics = (
                f"each batch of {micro_batch} normalized by its own statistics in ghost groups of "
                f"{bn_batch or micro_batch}, no running statistics updated"
            )
        else:
            statistics = "running statistics"
        return {
            "every": self.every,
            "set_size": len(self.tracking_set),
            "set": "the seeded class-balanced subset (or all) of the run's training split, unaugmented",
            "bn_mode": self.bn_mode,
            "bn_statistics": statistics,
            "batch": micro_batch,
            "loss": self.loss,
            "dropout": "off",
            "precision": f"{str(dtype).replace('torch.', '')} (the parameters' dtype, no autocast)",
            "lanczos_tol": self.tol,
            "lanczos_start": f"the previous tracked eigenvector; a Gaussian seeded {self.seed} at the first",
            "batch_sharpness": "g_B^T H_B g_B / |g_B|^2 of the step's whole batch, before the step",
            "stability_threshold": "2 (1 + momentum) / lr - weight_decay",
        }

    def state_dict(self) -> dict[str, Any]:
        return {"vector": self.vector}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vector = state.get("vector")
