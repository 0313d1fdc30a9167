"""What every probe shares: the probe set, the exact mean loss over it, BN mode, results.

A probe takes `(model, batches)`: `batches` is a list of `(inputs, targets)` evaluated whole
each time (the "probe set"). The loss over it is exactly the mean over all its examples,
whatever the batch sizes: sum_b n_b * loss_fn(outputs_b, targets_b) / N, where `loss_fn`
returns the mean over its batch.

Probes never touch the caller's model: they work on a copy (`ProbeModel`) in eval mode
(dropout off). Its BN layers normalize by (see `sharp.probes.bn`):
- bn_mode="eval": the model's running statistics;
- bn_mode="recompute": running statistics recomputed at the probed weights from `bn_data`
  (exact mean and unbiased variance over all its examples), computed once before probing;
- bn_mode="batch": the statistics of each BN group, groups of `bn_batch` consecutive
  examples of the probe set (a short last group is its own smaller group, weighted by its
  size), or, with bn_batch=None, each given batch as one group. The probe set is then
  re-cut into its BN groups, one forward pass each.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from sharp.config import BN_MODES
from sharp.errors import SharpError
from sharp.gradients import assign_flat, flat_grad
from sharp.losses import LossFn, cross_entropy
from sharp.probes.bn import (
    bn_layers,
    check_bn_mode,
    describe_bn,
    recompute_bn_statistics,
    use_batch_statistics,
)
from sharp.runtime import TorchFlags

Batch = tuple[torch.Tensor, torch.Tensor]

__all__ = [
    "BN_MODES",
    "Batch",
    "ExamplePool",
    "LossFn",
    "ProbeModel",
    "ProbeResult",
    "TensorPool",
    "as_batches",
    "check_count",
    "cross_entropy",
    "loss_name",
    "model_device",
    "model_dtype",
    "prepare_batches",
    "regroup",
    "working_copy",
]


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
    loss_fn: str = "cross_entropy"  # the loss function's name
    bn_settings: dict[str, Any] = field(default_factory=dict)  # BN details: layers, groups, recompute data
    torch_flags: dict[str, Any] = field(default_factory=dict)  # TF32, determinism, threads in force
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
        from sharp.fileio import atomic_write_json

        atomic_write_json(path, self.to_dict())


# --- argument checks shared by the probes ---------------------------------------------------


def check_count(name: str, value: int, minimum: int = 1) -> int:
    """A whole number >= minimum, else a SharpError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise SharpError(f"{name}={value!r} is not allowed: give an integer >= {minimum}")
    return int(value)


def loss_name(loss_fn: LossFn) -> str:
    return getattr(loss_fn, "__name__", type(loss_fn).__name__)


# --- the working copy -----------------------------------------------------------------------


def working_copy(model: nn.Module, bn_mode: str = "eval") -> nn.Module:
    """A copy of `model` in eval mode; with bn_mode="batch" its BN layers use batch statistics.

    The copy of a "recompute" model still holds the model's statistics: `ProbeModel`
    recomputes them.
    """
    check_bn_mode(model, bn_mode)
    work = copy.deepcopy(model)
    work.eval()
    if bn_mode == "batch":
        use_batch_statistics(work)
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


def regroup(batches: Sequence[Batch], size: int) -> list[Batch]:
    """The examples of `batches`, in order, re-cut into batches of `size` (the last may be shorter)."""
    inputs = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    return list(zip(inputs.split(size), targets.split(size), strict=True))


class ProbeModel:
    """A working copy of a model over a fixed probe set, seen as a function of its parameters.

    Counts its own work: `counts["loss"]` forward passes over the whole probe set,
    `counts["grad"]` forward+backward passes, `counts["hvp"]` Hessian-vector products.
    With bn_mode="recompute" the copy's BN statistics are recomputed from `bn_data` (see
    `sharp.probes.bn.recompute_bn_statistics`) once, at the given weights, before anything
    else; with bn_mode="batch" the probe set is re-cut into BN groups of `bn_batch`.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Batch],
        loss_fn: LossFn = cross_entropy,
        bn_mode: str = "eval",
        *,
        bn_data: Iterable[Batch] | None = None,
        bn_batch: int | None = None,
    ) -> None:
        if bn_batch is not None:
            bn_batch = check_count("bn_batch", bn_batch, minimum=2)
            if bn_mode != "batch":
                raise SharpError(f"bn_batch={bn_batch} applies to bn_mode 'batch' only, not {bn_mode!r}")
        self.model = working_copy(model, bn_mode)
        self.bn_mode = bn_mode
        self.bn_batch = bn_batch
        self.loss_fn = loss_fn
        self.batches = prepare_batches(self.model, batches)
        self.chunk = max(len(t) for _, t in self.batches)  # memory unit of forward passes in eval modes
        self.started = time.perf_counter()
        self.bn = {"mode": bn_mode}
        self.recompute: dict[str, Any] | None = None
        if bn_mode == "recompute":
            if bn_data is None and bn_layers(self.model):
                raise SharpError(
                    "bn_mode 'recompute' needs bn_data: the training batches to recompute BN statistics from"
                )
            self.recompute = recompute_bn_statistics(self.model, bn_data or [])
        elif bn_data is not None:
            raise SharpError(f"bn_data is used by bn_mode 'recompute' only, not {bn_mode!r}")
        groups = None
        if bn_mode == "batch":
            if bn_batch is not None:
                self.batches = regroup(self.batches, bn_batch)
            groups = [len(t) for _, t in self.batches]
            if bn_layers(self.model) and min(groups) < 2:
                raise SharpError(
                    f"a BN group of the probe set has {min(groups)} example: batch statistics need at least "
                    "2; choose a probe set size or bn_batch that leaves no group of one"
                )
        self.bn = describe_bn(self.model, bn_mode, bn_batch, groups)
        if self.recompute is not None:
            self.bn["recomputed_from_examples"] = self.recompute["examples"]
            self.bn["recompute"] = "exact per-channel mean and unbiased variance, layer by layer in eval mode"
        self.n_examples = sum(len(t) for _, t in self.batches)
        self.weights = [len(t) / self.n_examples for _, t in self.batches]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.n_params = sum(p.numel() for p in self.params)
        self.dtype = model_dtype(self.model)
        self.device = model_device(self.model)
        self.counts = {"loss": 0, "grad": 0, "hvp": 0}

    # --- parameters as one flat vector ----------------------------------------------------

    def get_vector(self) -> torch.Tensor:
        return nn.utils.parameters_to_vector(self.params).detach().clone()

    def set_vector(self, vector: torch.Tensor) -> None:
        assign_flat(self.params, vector.to(device=self.device, dtype=self.dtype))

    # --- evaluations -----------------------------------------------------------------------

    def batch_loss(self, batch: Batch) -> torch.Tensor:
        inputs, targets = batch
        return self.loss_fn(self.model(inputs), targets)

    def pieces(self, batch: Batch) -> list[Batch]:
        """One batch cut into forward passes: BN groups of bn_batch in batch mode (each group is
        normalized on its own), else pieces of at most the largest probe batch (memory only)."""
        size = self.bn_batch if self.bn_mode == "batch" else self.chunk
        inputs, targets = batch
        if size is None or len(targets) <= size:
            return [batch]
        return list(zip(inputs.split(size), targets.split(size), strict=True))

    def gradient(self, batches: Sequence[Batch], weights: Sequence[float]) -> tuple[float, torch.Tensor]:
        """sum_b w_b loss_b and its flat gradient: zero the grads, backward each weighted batch
        loss in turn, read the accumulated gradient. One "grad" evaluation."""
        self.counts["grad"] += 1
        for p in self.params:
            p.grad = None
        total = 0.0
        for weight, batch in zip(weights, batches, strict=True):
            loss = weight * self.batch_loss(batch)
            loss.backward()
            total += float(loss.detach())
        grad = flat_grad(self.params)
        for p in self.params:
            p.grad = None
        return total, grad

    def batch_gradient(self, batch: Batch) -> tuple[float, torch.Tensor]:
        """Mean loss over one batch of examples and its flat gradient, run as `pieces`."""
        pieces = self.pieces(batch)
        n = len(batch[1])
        return self.gradient(pieces, [len(t) / n for _, t in pieces])

    @torch.no_grad()
    def batch_mean_loss(self, batch: Batch) -> float:
        """Mean loss over one batch of examples (no gradient), run as `pieces`."""
        n = len(batch[1])
        return float(sum(len(p[1]) / n * self.batch_loss(p).double() for p in self.pieces(batch)))

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
        return self.gradient(self.batches, self.weights)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def result_fields(
        self, seed: int | None = None, iterations: int | None = None, **settings: Any
    ) -> dict[str, Any]:
        """The common fields of a ProbeResult for work done on this ProbeModel."""
        flags = TorchFlags.current()
        return {
            "n_examples": self.n_examples,
            "bn_mode": self.bn_mode,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "seed": seed,
            "iterations": iterations,
            "evaluations": {k: v for k, v in self.counts.items() if v},
            "wall_time": self.elapsed(),
            "loss_fn": loss_name(self.loss_fn),
            "bn_settings": dict(self.bn),
            "torch_flags": {
                "deterministic": flags.deterministic,
                "cudnn_benchmark": flags.cudnn_benchmark,
                "tf32_matmul": flags.tf32_matmul,
                "tf32_cudnn": flags.tf32_cudnn,
                "threads": flags.threads,
            },
            "settings": settings,
        }


class ExamplePool(Protocol):
    """Examples drawn by index (the pool a noise-scale estimate samples its batches from)."""

    def __len__(self) -> int: ...

    def take(self, index: torch.Tensor) -> Batch:
        """(inputs, targets) of the examples at `index` (a CPU LongTensor)."""
        ...


class TensorPool:
    """An ExamplePool over examples held as two tensors."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    @classmethod
    def of(cls, batches: Sequence[Batch]) -> TensorPool:
        return cls(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))

    def __len__(self) -> int:
        return len(self.targets)

    def take(self, index: torch.Tensor) -> Batch:
        index = index.to(self.targets.device)
        return self.inputs[index], self.targets[index]


def as_batches(batches: Sequence[Batch] | Batch) -> list[Batch]:
    """Accept one `(inputs, targets)` pair as a one-batch probe set."""
    if isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[0], torch.Tensor):
        return [batches]
    return list(batches)
