"""PyHessian's own eigenvalues() and trace() (Yao et al. 2020, "PyHessian: Neural Networks
Through the Lens of the Hessian") on a ProbeModel's working copy, probe set and BN mode, for
readers who compare with papers that used it.

What this bridge does around pyhessian 0.1 as released (see REFERENCE.md for its defects):
- `cuda=` is set from the model's device (its default `cuda=True` fails on a CPU);
- one probe batch is passed as `data=` (PyHessian keeps that gradient graph), several as a
  loader, which PyHessian weights by batch size (exact); in BN batch mode each batch is one
  BN group, and PyHessian's `model.eval()` leaves the copy's batch-statistics BN as it is;
- its random vectors come from torch's global generator in the default dtype: both are set
  for the call (seeded by `seed`, the model's dtype) and restored afterwards;
- it reports no iteration count: its HVPs are counted by wrapping the two functions that
  compute them for the duration of the call;
- `density()` calls `torch.eig`, removed from torch: `sharp probe` refuses it (ProbeConfig).
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from sharp.errors import SharpError
from sharp.probes.common import ProbeModel


def _module() -> Any:
    """The module pyhessian.hessian (the package's attribute of that name is the class)."""
    try:
        return importlib.import_module("pyhessian.hessian")
    except ImportError:
        raise SharpError(
            "pyhessian is not installed: pip install pyhessian, or use --method lanczos"
        ) from None


@contextlib.contextmanager
def _pyhessian(probe: ProbeModel, seed: int) -> Iterator[tuple[Any, dict[str, int]]]:
    """A pyhessian `hessian` object over the probe set, with its HVPs counted, under a seeded
    global generator and the model's default dtype (both restored on exit)."""
    module = _module()
    counted = {"hvp": 0}
    single_hvp, loader_hvp = module.hessian_vector_product, module.hessian.dataloader_hv_product

    def count_single(*args: Any, **kwargs: Any) -> Any:
        counted["hvp"] += 1
        return single_hvp(*args, **kwargs)

    def count_loader(self: Any, v: Any) -> Any:
        counted["hvp"] += 1
        return loader_hvp(self, v)

    cuda = probe.device.type == "cuda"
    previous_dtype = torch.get_default_dtype()
    devices = [probe.device.index or 0] if cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        torch.set_default_dtype(probe.dtype)
        module.hessian_vector_product = count_single
        module.hessian.dataloader_hv_product = count_loader
        try:
            data = {"data": probe.batches[0]} if len(probe.batches) == 1 else {"dataloader": probe.batches}
            with warnings.catch_warnings():
                # its backward(create_graph=True) warns of a reference cycle through .grad; the
                # gradients are cleared below, which breaks it as the warning recommends
                warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
                yield module.hessian(probe.model, probe.loss_fn, cuda=cuda, **data), counted
        finally:
            module.hessian_vector_product = single_hvp
            module.hessian.dataloader_hv_product = loader_hvp
            torch.set_default_dtype(previous_dtype)
            for p in probe.params:  # PyHessian leaves .grad holding a graph
                p.grad = None


def pyhessian_eigenvalues(
    probe: ProbeModel, k: int, tol: float, maxiter: int, seed: int
) -> tuple[list[float], torch.Tensor, int]:
    """PyHessian's top-k by deflated power iteration: (eigenvalues as it returns them,
    eigenvectors n x k, HVPs used)."""
    with _pyhessian(probe, seed) as (hessian, counted):
        values, vectors = hessian.eigenvalues(maxIter=maxiter, tol=tol, top_n=k)
    flat = torch.stack([torch.cat([t.detach().reshape(-1) for t in v]) for v in vectors], dim=1)
    return [float(v) for v in values], flat / flat.norm(dim=0, keepdim=True), counted["hvp"]


def pyhessian_trace(probe: ProbeModel, maxiter: int, tol: float, seed: int) -> tuple[list[float], int]:
    """PyHessian's Hutchinson samples v^T H v (Rademacher) as it returns them, and HVPs used."""
    with _pyhessian(probe, seed) as (hessian, counted):
        samples = hessian.trace(maxIter=maxiter, tol=tol)
    return [float(x) for x in samples], counted["hvp"]


__all__ = ["pyhessian_eigenvalues", "pyhessian_trace"]
