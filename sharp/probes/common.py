"""What every probe shares: the probe set, the exact mean loss over it, BN mode, results.

A probe takes `(model, batches)`: `batches` is a list of `(inputs, targets)` evaluated whole
each time (the "probe set"). The loss over it is exactly the mean over all its examples,
whatever the batch sizes: sum_b n_b * loss_fn(outputs_b, targets_b) / N, where `loss_fn`
returns the mean over its batch.

Probes never touch the caller's model: they work on a copy (`ProbeModel`), in eval mode
(BN running statistics) or, with `bn_mode="batch"`, with BN layers that normalize each
probe batch by its own statistics and keep no running statistics.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from sharp.errors import SharpError
from sharp.losses import LossFn, cross_entropy

Batch = tuple[torch.Tensor, torch.Tensor]
BN_MODES = ("eval", "batch")


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the information as text
    return value


@dataclass(kw_only=True)
class ProbeResult:
    """Numbers of one probe plus the settings that produced them.

    Fields marked `metadata={"json": False}` (eigenvectors, say) stay in memory only.
    """

    kind: ClassVar[str] = "probe"
    n_examples: int
    bn_mode: str
    dtype: str
    device: str
    seed: int | None = None
    iterations: int | None = None
    evaluations: dict[str, int] = field(default_factory=dict)  # counts of loss / grad / hvp passes
    wall_time: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"probe": self.kind}
        for f in dataclasses.fields(self):
            if f.metadata.get("json", True):
                out[f.name] = _jsonable(getattr(self, f.name))
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        from sharp.runs import atomic_write_json

        atomic_write_json(path, self.to_dict())


def working_copy(model: nn.Module, bn_mode: str = "eval") -> nn.Module:
    """A copy of `model` in eval mode; with bn_mode="batch", its BN layers use batch statistics.

    In "batch" mode the copy's BN layers track no running statistics, so each probe batch
    is normalized by its own mean and variance (as in training, without ghost groups) and
    nothing is updated.
    """
    if bn_mode not in BN_MODES:
        raise SharpError(f"bn_mode {bn_mode!r} is unknown: choose 'eval' or 'batch'")
    work = copy.deepcopy(model)
    work.eval()
    if bn_mode == "batch":
        for module in work.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.track_running_stats = False
                module.running_mean = None
                module.running_var = None
    return work


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def prepare_batches(model: nn.Module, batches: Iterable[Batch]) -> list[Batch]:
    """The probe set on the model's device, float inputs in the model's dtype."""
    device, dtype = model_device(model), model_dtype(model)
    prepared = []
    for inputs, targets in as_batches(batches):
        inputs = inputs.to(device=device, dtype=dtype) if inputs.is_floating_point() else inputs.to(device)
        prepared.append((inputs, targets.to(device)))
    if not prepared or sum(len(t) for _, t in prepared) == 0:
        raise SharpError("the probe set is empty: give at least one batch with examples")
    return prepared


class ProbeModel:
    """A working copy of a model over a fixed probe set, seen as a function of its parameters.

    Counts its own work: `counts["loss"]` forward passes over the whole probe set,
    `counts["grad"]` forward+backward passes, `counts["hvp"]` Hessian-vector products.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Batch],
        loss_fn: LossFn = cross_entropy,
        bn_mode: str = "eval",
    ) -> None:
        self.model = working_copy(model, bn_mode)
        self.bn_mode = bn_mode
        self.loss_fn = loss_fn
        self.batches = prepare_batches(self.model, batches)
        self.n_examples = sum(len(t) for _, t in self.batches)
        self.weights = [len(t) / self.n_examples for _, t in self.batches]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.n_params = sum(p.numel() for p in self.params)
        self.dtype = model_dtype(self.model)
        self.device = model_device(self.model)
        self.counts = {"loss": 0, "grad": 0, "hvp": 0}
        self.started = time.perf_counter()

    # --- parameters as one flat vector ----------------------------------------------------

    def get_vector(self) -> torch.Tensor:
        return nn.utils.parameters_to_vector(self.params).detach().clone()

    def set_vector(self, vector: torch.Tensor) -> None:
        # copy_ rather than nn.utils.vector_to_parameters, which makes the parameters views
        # of `vector` (later edits of it would move the model) and drops channels_last.
        vector = vector.to(device=self.device, dtype=self.dtype)
        with torch.no_grad():
            for p, chunk in zip(self.params, vector.split([p.numel() for p in self.params]), strict=True):
                p.copy_(chunk.view_as(p))

    def flat_grad(self) -> torch.Tensor:
        return torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params]
        )

    # --- evaluations -----------------------------------------------------------------------

    def batch_loss(self, batch: Batch) -> torch.Tensor:
        inputs, targets = batch
        return self.loss_fn(self.model(inputs), targets)

    @torch.no_grad()
    def loss(self) -> float:
        """Mean loss over the probe set."""
        self.counts["loss"] += 1
        total = sum(w * self.batch_loss(b).double() for w, b in zip(self.weights, self.batches, strict=True))
        return float(total)

    @torch.no_grad()
    def loss_and_accuracy(self) -> tuple[float, float]:
        """Mean loss and top-1 accuracy over the probe set."""
        self.counts["loss"] += 1
        loss, correct = 0.0, 0
        for weight, (inputs, targets) in zip(self.weights, self.batches, strict=True):
            outputs = self.model(inputs)
            loss += weight * float(self.loss_fn(outputs, targets))
            correct += int((outputs.argmax(1) == targets).sum())
        return loss, correct / self.n_examples

    def loss_and_grad(self) -> tuple[float, torch.Tensor]:
        """Mean loss and its gradient (flat) over the probe set, from one pass."""
        self.counts["grad"] += 1
        for p in self.params:
            p.grad = None
        total = 0.0
        for weight, batch in zip(self.weights, self.batches, strict=True):
            loss = weight * self.batch_loss(batch)
            loss.backward()
            total += float(loss.detach())
        grad = self.flat_grad()
        for p in self.params:
            p.grad = None
        return total, grad

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def result_fields(
        self, seed: int | None = None, iterations: int | None = None, **settings: Any
    ) -> dict[str, Any]:
        """The common fields of a ProbeResult for work done on this ProbeModel."""
        return {
            "n_examples": self.n_examples,
            "bn_mode": self.bn_mode,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "seed": seed,
            "iterations": iterations,
            "evaluations": {k: v for k, v in self.counts.items() if v},
            "wall_time": self.elapsed(),
            "settings": settings,
        }


def as_batches(batches: Sequence[Batch] | Batch) -> list[Batch]:
    """Accept one `(inputs, targets)` pair as a one-batch probe set."""
    if isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[0], torch.Tensor):
        return [batches]
    return list(batches)
