"""The Hessian of the probe loss: HVPs, top eigenvalues, trace and spectral density.

All of it rests on Hessian-vector products (Pearlmutter 1994) of the exact mean loss over
the probe set (see `sharp.probes.common`). `HessianOperator` computes them by double
backward; by default it keeps the gradient graph of each probe batch, so one HVP costs one
extra backward per batch instead of a fresh forward and double backward.

- `hessian_top_eigenvalues`: Lanczos with full reorthogonalization (default; without it,
  ghost copies of λ1 appear after a few steps), or PyHessian's deflated power iteration
  (Yao et al. 2020, "PyHessian: Neural Networks Through the Lens of the Hessian") for
  comparison.
- `hessian_trace`: Hutchinson's estimator with Rademacher vectors, or Hutch++ (Meyer, Musco,
  Musco & Woodruff 2021, "Hutch++: Optimal Stochastic Trace Estimation"), stopped on the
  standard error.
- `hessian_density`: stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017, "Fast
  estimation of tr(f(A)) via stochastic Lanczos quadrature"; Ghorbani et al. 2019).

Unlike pyhessian, probes here work on a copy of the model, in any dtype and device, with the
batches of the probe set weighted by their sizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from scipy.integrate import trapezoid  # numpy's own needs numpy >= 2
from scipy.linalg import eigh_tridiagonal

from sharp.config import HESSIAN_METHODS as METHODS
from sharp.config import TRACE_ESTIMATORS, check_choice, check_positive
from sharp.errors import SharpError
from sharp.gradients import autograd_flat_grad
from sharp.probes.common import Batch, LossFn, ProbeModel, ProbeResult, cross_entropy
from sharp.progress import progress_bar

__all__ = [
    "DensityResult",
    "EigenResult",
    "EigenSolve",
    "HessianOperator",
    "TraceResult",
    "hessian_density",
    "hessian_top_eigenvalues",
    "hessian_trace",
    "lanczos",
    "power_iteration",
    "stochastic_trace",
]

MatVec = Callable[[torch.Tensor], torch.Tensor]
TRACE_METHODS = ("hutchinson", "pyhessian")
STARTS = ("rademacher", "gaussian")
DENSITY_SIGMA_FRACTION = 0.01  # default σ of the density: this fraction of the Ritz-value range
DENSITY_PAD_SIGMAS = 5.0  # the density grid extends this many σ beyond the extreme Ritz values


# --- the operator ----------------------------------------------------------------------------


KEEP_GRAPH_MAX_EXAMPLES = 1024  # keep_graph=None keeps the double-backward graph up to this many examples


class HessianOperator:
    """v -> H v for the mean loss over a ProbeModel's probe set (Pearlmutter 1994).

    H is the Hessian of sum_b (n_b / N) loss_b with respect to `probe.params`, so batches of
    unequal sizes are weighted exactly. With `keep_graph=True` the weighted gradient of each
    batch is computed once with `create_graph=True` (counted as one "grad" pass) and its
    graph kept: each HVP is then a single backward through the kept graphs, without any
    forward pass, but the graphs of the whole probe set stay in memory (tens of GB for 10,000
    CIFAR images on a ResNet-32). With `keep_graph=False` each HVP recomputes forward and
    double backward batch by batch and sums the weighted results, so memory is that of one
    batch (1.3-1.7x slower per HVP on a CPU ResNet-8); the results are the same to rounding.
    `keep_graph=None` (default) keeps the graph for probe sets of at most
    KEEP_GRAPH_MAX_EXAMPLES examples. Every `matvec` adds 1 to `probe.counts["hvp"]`.
    """

    def __init__(self, probe: ProbeModel, keep_graph: bool | None = None) -> None:
        self.probe = probe
        self.keep_graph = probe.n_examples <= KEEP_GRAPH_MAX_EXAMPLES if keep_graph is None else keep_graph
        self.keep_graph_rule = (
            "given" if keep_graph is not None else f"auto (<= {KEEP_GRAPH_MAX_EXAMPLES} examples)"
        )
        self.params = probe.params
        self.n = probe.n_params
        self.dtype = probe.dtype
        self.device = probe.device
        if self.n == 0:
            raise SharpError("the model has no trainable parameters: the Hessian is empty")
        self._grad: torch.Tensor | None = None
        self._graph: torch.Tensor | None = None  # flat gradient of the whole probe loss, with graph
        self.loss: float | None = None
        if self.keep_graph:
            probe.counts["grad"] += 1
            flat_sum, total = None, 0.0
            with torch.enable_grad():
                for weight, batch in zip(probe.weights, probe.batches, strict=True):
                    loss = weight * probe.batch_loss(batch)
                    flat = autograd_flat_grad(loss, self.params, create_graph=True)
                    flat_sum = flat if flat_sum is None else flat_sum + flat
                    total += float(loss.detach())
            self._graph = flat_sum
            self._grad = flat_sum.detach().clone()
            self.loss = total

    def _backward(self, flat_grad: torch.Tensor, v: torch.Tensor, retain: bool) -> torch.Tensor:
        """The vector-Jacobian product v^T d(flat_grad)/d(params) = H v, flat."""
        if not flat_grad.requires_grad:  # the gradient does not depend on the parameters: H = 0
            return torch.zeros_like(v)
        return autograd_flat_grad(flat_grad, self.params, grad_outputs=v, retain_graph=retain)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat vector v of length n (returned in the model's dtype and device)."""
        if v.dim() != 1 or v.numel() != self.n:
            raise SharpError(f"matvec needs a flat vector of {self.n} entries, not shape {tuple(v.shape)}")
        v = v.detach().to(device=self.device, dtype=self.dtype)
        self.probe.counts["hvp"] += 1
        with torch.enable_grad():
            if self._graph is not None:
                return self._backward(self._graph, v, retain=True).detach()
            probe, out = self.probe, None
            for weight, batch in zip(probe.weights, probe.batches, strict=True):
                flat = autograd_flat_grad(weight * probe.batch_loss(batch), self.params, create_graph=True)
                hv = self._backward(flat, v, retain=False)
                out = hv if out is None else out + hv
            return out.detach()

    __call__ = matvec

    def quadratic_form(self, v: torch.Tensor) -> float:
        """vᵀHv in float64 (one HVP)."""
        return float(self.matvec(v).double() @ v.detach().double().to(self.device))

    def gradient(self) -> torch.Tensor:
        """The flat gradient of the probe loss (from the kept graph, or one gradient pass)."""
        if self._grad is None:
            self.loss, self._grad = self.probe.loss_and_grad()
        return self._grad.clone()


# --- eigensolvers on any symmetric matvec ---------------------------------------------------


@dataclass
class EigenSolve:
    """What `lanczos` and `power_iteration` return.

    `eigenvectors` is n x k with unit-norm columns; `iterations` is the number of matvecs
    used; `residuals[i]` bounds ||H y_i - θ_i y_i|| (Lanczos: |β_m s_{m,i}|; power
    iteration: the residual of its last iterate).
    """

    eigenvalues: list[float]
    eigenvectors: torch.Tensor
    iterations: int
    residuals: list[float]
    converged: bool


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _random_vector(
    gen: torch.Generator, n: int, kind: str, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """A seeded random vector, drawn on the CPU in float64 so it is the same on every device."""
    if kind == "rademacher":
        v = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
    else:
        v = torch.randn(n, generator=gen, dtype=torch.float64)
    return v.to(device=device, dtype=dtype)


class _Lanczos:
    """Symmetric Lanczos with full reorthogonalization (two passes of classical Gram-Schmidt
    against the whole basis at every step; Paige 1971 shows why without it Ritz values
    repeat). Hand-written because scipy's eigsh (ARPACK) restarts implicitly and cannot
    give the SLQ quadrature weights or take seeded torch vectors on a GPU.
    """

    def __init__(self, matvec: MatVec, n: int, v0: torch.Tensor, capacity: int) -> None:
        self.matvec, self.n = matvec, n
        self.dtype, self.device = v0.dtype, v0.device
        self.basis = torch.empty(max(1, min(capacity, n)), n, dtype=self.dtype, device=self.device)
        self.basis[0] = v0 / v0.norm()
        self.alpha: list[float] = []
        self.beta: list[float] = []  # beta[j] couples basis[j] and basis[j + 1]; 0 after a restart
        self.anorm = 0.0  # running estimate of ||H|| for the breakdown test
        self.broken = False

    @property
    def m(self) -> int:
        return len(self.alpha)

    def _orthogonalize(self, w: torch.Tensor, count: int) -> torch.Tensor:
        basis = self.basis[:count]
        for _ in range(2):  # "twice is enough" (Giraud et al. 2005)
            w = w - basis.T @ (basis @ w)
        return w

    def step(self, restart: Callable[[], torch.Tensor] | None = None) -> None:
        """One Lanczos step: one matvec, one new α and β (and the next basis vector).

        On breakdown (β ~ 0: the Krylov space is invariant) the process stops, unless
        `restart` gives a new random vector, which is orthogonalized against the basis and
        continues it with β = 0 (T stays the exact projection of H, block by block).
        """
        j = self.m
        v = self.basis[j]
        w = self.matvec(v).to(device=self.device, dtype=self.dtype)
        a = float(w @ v)
        w = w - a * v
        if j > 0:
            w = w - self.beta[j - 1] * self.basis[j - 1]
        w = self._orthogonalize(w, j + 1)
        b = float(w.norm())
        self.alpha.append(a)
        self.anorm = max(self.anorm, abs(a) + b + (self.beta[-1] if self.beta else 0.0))
        if j + 1 >= self.n:
            self.beta.append(b)
            return
        if b <= 100 * _eps(self.dtype) * self.anorm:
            if restart is None:
                self.beta.append(0.0)
                self.broken = True
                return
            w = self._orthogonalize(restart(), j + 1)
            w = w / w.norm()
            b = 0.0
        else:
            w = w / b
        self.beta.append(b)
        if j + 1 >= self.basis.shape[0]:  # grow the basis storage
            grown = torch.empty(
                min(2 * self.basis.shape[0], self.n), self.n, dtype=self.dtype, device=self.device
            )
            grown[: j + 1] = self.basis[: j + 1]
            self.basis = grown
        self.basis[j + 1] = w

    def ritz(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues (ascending) and eigenvectors of the m x m tridiagonal T."""
        d = np.asarray(self.alpha, dtype=np.float64)
        e = np.asarray(self.beta[: self.m - 1], dtype=np.float64)
        return eigh_tridiagonal(d, e)


def _check_k(k: int, n: int) -> int:
    if not isinstance(k, int | np.integer) or k < 1:
        raise SharpError(f"k={k!r}: ask for at least one eigenvalue (k >= 1)")
    return min(k, n)


def default_lanczos_maxiter(n: int, k: int) -> int:
    """min(n, max(100, 10 k)): Lanczos with full reorthogonalization needed 18 steps for the
    top 5 of an untrained ResNet-8 at tol 1e-3 (about 3k to 4k); 10k leaves room for clustered
    eigenvalues while bounding the basis kept in memory (maxiter x n numbers)."""
    return min(n, max(100, 10 * k))


def lanczos(
    matvec: MatVec,
    n: int,
    k: int,
    *,
    tol: float = 1e-3,
    maxiter: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    progress: bool = False,
    v0: torch.Tensor | None = None,
) -> EigenSolve:
    """The k algebraically largest eigenpairs of a symmetric operator by Lanczos with full
    reorthogonalization (Lanczos 1950; Golub & Van Loan, "Matrix Computations", 10.1).

    Starts from a seeded Gaussian vector. After each step the Ritz pairs (θ_i, y_i) of the
    tridiagonal T_m are computed (scipy `eigh_tridiagonal`); it stops when the residual bound
    |β_m s_{m,i}| = ||H y_i - θ_i y_i|| is at most tol * |θ_i| for each of the top k (the
    eigenvalue error is at most the residual, and usually near its square over the gap), or
    at `maxiter` steps (default `default_lanczos_maxiter`). Uses exactly one matvec per step.
    A breakdown (β ~ 0, an invariant subspace) with fewer than k Ritz values restarts from a
    new random vector orthogonal to the basis; with at least k it ends the run, the Ritz
    values then being exact eigenvalues (as with any single-vector Krylov method, exactly
    repeated eigenvalues are seen once per invariant subspace). k > n is reduced to n.

    `v0`, when given, is the start instead (a warm start, e.g. the eigenvector of a nearby
    operator; nonzero, normalized here); restarts still draw seeded Gaussian vectors.
    """
    k = _check_k(k, n)
    check_positive(spelling="argument", tol=tol)
    maxiter = default_lanczos_maxiter(n, k) if maxiter is None else maxiter
    if maxiter < 1:
        raise SharpError(f"maxiter={maxiter}: give at least 1 iteration")
    maxiter = min(maxiter, n)
    gen = torch.Generator().manual_seed(seed)

    def draw() -> torch.Tensor:
        return _random_vector(gen, n, "gaussian", dtype, device)

    if v0 is not None:
        if v0.dim() != 1 or v0.numel() != n or not bool(v0.any()):
            raise SharpError(f"v0 must be a nonzero flat vector of {n} entries, not shape {tuple(v0.shape)}")
        start = v0.detach().to(device=device, dtype=dtype)
    else:
        start = draw()
    process = _Lanczos(matvec, n, start, capacity=min(maxiter, max(2 * k + 20, 32)) + 1)
    converged = False
    bar = progress_bar(total=maxiter, desc="lanczos", enabled=progress, leave=False)
    try:
        while True:
            process.step(restart=draw if process.m + 1 < k else None)
            bar.update(1)
            m = process.m
            if m < k and m < maxiter and not process.broken:
                continue
            theta, s = process.ritz()
            top = np.argsort(theta)[::-1][:k]
            residuals = np.abs(process.beta[m - 1] * s[m - 1, top])
            floor = 10 * _eps(dtype) * float(np.abs(theta).max())
            ok = residuals <= np.maximum(tol * np.abs(theta[top]), floor)
            converged = bool(ok.all()) and len(top) == k
            if progress:
                worst = (residuals / np.maximum(np.abs(theta[top]), floor or 1e-300)).max()
                bar.set_postfix(top=f"{theta[top[0]]:.4g}", worst=f"{worst:.1e}")
            if converged or m >= maxiter or process.broken:
                break
    finally:
        bar.close()
    converged = converged or m == n  # T_n is H in an orthonormal basis
    s_top = torch.as_tensor(np.ascontiguousarray(s[:, top]), dtype=dtype, device=device)
    vectors = process.basis[:m].T @ s_top
    vectors = vectors / vectors.norm(dim=0, keepdim=True)
    return EigenSolve(
        eigenvalues=[float(x) for x in theta[top]],
        eigenvectors=vectors,
        iterations=m,
        residuals=[float(r) for r in residuals],
        converged=converged,
    )


def power_iteration(
    matvec: MatVec,
    n: int,
    k: int,
    *,
    tol: float = 1e-3,
    maxiter: int = 100,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> EigenSolve:
    """The top k eigenpairs by PyHessian's deflated power iteration (Yao et al. 2020).

    For each eigenvalue in turn: from a seeded Gaussian vector, iterate v <- H v, with v
    orthogonalized against the eigenvectors already found and normalized, until the
    Rayleigh quotient v^T H v changes by less than tol relative to its previous value, or
    for `maxiter` matvecs. Unlike PyHessian it reports the last Rayleigh quotient (not the
    one before) with the vector it belongs to. Power iteration finds the eigenvalues of
    largest magnitude, so a large negative one can appear; they are returned in descending
    order. `iterations` is the total number of matvecs.
    """
    k = _check_k(k, n)
    check_positive(spelling="argument", tol=tol)
    if maxiter < 1:
        raise SharpError(f"maxiter={maxiter}: give at least 1 iteration")
    gen = torch.Generator().manual_seed(seed)
    found: list[torch.Tensor] = []
    values, residuals, total, converged = [], [], 0, True

    def deflate(v: torch.Tensor) -> torch.Tensor:
        if found:
            basis = torch.stack(found)
            for _ in range(2):
                v = v - basis.T @ (basis @ v)
        return v / v.norm()

    bar = progress_bar(total=k, desc="power iteration", enabled=progress, leave=False)
    try:
        for _ in range(k):
            v = deflate(_random_vector(gen, n, "gaussian", dtype, device))
            value, done = None, False
            for _ in range(maxiter):
                v = deflate(v)
                hv = matvec(v).to(device=device, dtype=dtype)
                total += 1
                new = float(hv @ v)
                residual = float((hv - new * v).norm())
                done = value is not None and abs(new - value) <= tol * abs(value)
                value, vector = new, v
                if done or not bool(hv.any()):  # H v = 0: v is an eigenvector for 0
                    done = True
                    break
                v = hv
            values.append(value)
            residuals.append(residual)
            found.append(vector)
            converged = converged and done
            bar.update(1)
    finally:
        bar.close()
    order = np.argsort(values)[::-1]
    return EigenSolve(
        eigenvalues=[values[i] for i in order],
        eigenvectors=torch.stack([found[i] for i in order], dim=1),
        iterations=total,
        residuals=[residuals[i] for i in order],
        converged=converged,
    )


# --- probes -----------------------------------------------------------------------------------


@dataclass(kw_only=True)
class EigenResult(ProbeResult):
    """Top Hessian eigenvalues (descending), their residual bounds, and optionally vectors."""

    kind: ClassVar[str] = "hessian_eigenvalues"
    eigenvalues: list[float] = field(default_factory=list)
    eigenvectors: torch.Tensor | None = field(default=None, metadata={"json": False})  # k x n
    residuals: list[float] = field(default_factory=list)
    converged: bool = False
    method: str = "lanczos"


@dataclass(kw_only=True)
class TraceResult(ProbeResult):
    """Trace estimate and its standard error: Hutchinson's mean of the samples v^T H v, or
    Hutch++'s exact trace on a sketched subspace plus that mean on the rest."""

    kind: ClassVar[str] = "hessian_trace"
    trace: float = 0.0
    stderr: float = 0.0
    samples: list[float] = field(default_factory=list)
    converged: bool = False
    method: str = "hutchinson"


@dataclass(kw_only=True)
class DensityResult(ProbeResult):
    """Smoothed spectral density on a grid, the Ritz values and weights behind it, and its
    spread over the runs: `density_std` (pointwise sample std of the runs' densities) and the
    runs' quadrature estimates of tr(H) = n sum_j w_j θ_j (`trace_mean` ± `trace_std`)."""

    kind: ClassVar[str] = "hessian_density"
    grid: list[float] = field(default_factory=list)
    density: list[float] = field(default_factory=list)
    density_std: list[float] | None = None  # None with a single run
    ritz_values: list[list[float]] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)
    sigma: float = 0.0
    trace_estimates: list[float] = field(default_factory=list)  # one per run
    trace_mean: float = 0.0
    trace_std: float | None = None  # sample std over runs; None with a single run


def _operator(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    loss_fn: LossFn,
    bn_mode: str,
    keep_graph: bool | None,
    bn_data: Iterable[Batch] | None,
    bn_batch: int | None,
) -> tuple[ProbeModel, HessianOperator]:
    probe = ProbeModel(model, batches, loss_fn=loss_fn, bn_mode=bn_mode, bn_data=bn_data, bn_batch=bn_batch)
    return probe, HessianOperator(probe, keep_graph=keep_graph)


def _common_settings(op: HessianOperator) -> dict[str, Any]:
    return {
        "n_params": op.n,
        "keep_graph": op.keep_graph,
        "keep_graph_rule": op.keep_graph_rule,
    }


def hessian_top_eigenvalues(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    k: int = 5,
    method: str = "lanczos",
    tol: float = 1e-3,
    maxiter: int | None = None,
    seed: int = 0,
    loss_fn: LossFn = cross_entropy,
    bn_mode: str = "eval",
    return_eigenvectors: bool = False,
    keep_graph: bool | None = None,
    bn_data: Iterable[Batch] | None = None,
    bn_batch: int | None = None,
    progress: bool = False,
) -> EigenResult:
    """The k largest eigenvalues of the Hessian of the probe loss.

    `method="lanczos"` (default): `lanczos` with full reorthogonalization, stopped on the
    Ritz residual bound (maxiter default `default_lanczos_maxiter`). `method="power"`:
    PyHessian's deflated power iteration (Yao et al. 2020) as written here, `maxiter` per
    eigenvalue (default 100). `method="pyhessian"`: PyHessian's own `eigenvalues()` on the
    same working copy, probe set and BN mode (`sharp.probes.pyhessian_bridge`); its residuals
    ||H y - θ y|| are then measured with this module's operator (k more HVPs, counted).
    `iterations` and `evaluations["hvp"]` are the number of HVPs; `evaluations["grad"]` is 1
    when the graph is kept (the gradient whose graph is kept).
    """
    check_choice(method, "method", METHODS)
    probe, op = _operator(model, batches, loss_fn, bn_mode, keep_graph, bn_data, bn_batch)
    k_eff = _check_k(k, op.n)
    kw = {"tol": tol, "seed": seed, "dtype": op.dtype, "device": op.device, "progress": progress}
    extra: dict[str, Any] = {}
    if method == "lanczos":
        maxiter = default_lanczos_maxiter(op.n, k_eff) if maxiter is None else maxiter
        solve = lanczos(op.matvec, op.n, k_eff, maxiter=maxiter, **kw)
    elif method == "power":
        maxiter = 100 if maxiter is None else maxiter
        solve = power_iteration(op.matvec, op.n, k_eff, maxiter=maxiter, **kw)
    else:
        from sharp.probes.pyhessian_bridge import pyhessian_eigenvalues

        maxiter = 100 if maxiter is None else maxiter
        values, vectors, hvps = pyhessian_eigenvalues(probe, k_eff, tol=tol, maxiter=maxiter, seed=seed)
        order = np.argsort(values)[::-1]
        vectors = vectors[:, order.copy()]
        values = [values[i] for i in order]
        residuals = [
            float((op.matvec(vectors[:, i]) - values[i] * vectors[:, i]).norm()) for i in range(k_eff)
        ]
        probe.counts["pyhessian_hvp"] = hvps
        solve = EigenSolve(
            values,
            vectors,
            hvps,
            residuals,
            all(r <= tol * abs(v) for r, v in zip(residuals, values, strict=True)),
        )
        extra = {
            "pyhessian_stopping": "relative change of successive Rayleigh quotients < tol, per eigenvalue",
            "residuals": "||H y - theta y|| measured after PyHessian, with HessianOperator",
        }
    return EigenResult(
        eigenvalues=solve.eigenvalues,
        eigenvectors=solve.eigenvectors.T.contiguous() if return_eigenvectors else None,
        residuals=solve.residuals,
        converged=solve.converged,
        method=method,
        **probe.result_fields(
            seed=seed,
            iterations=solve.iterations,
            k=k_eff,
            k_requested=k,
            method=method,
            tol=tol,
            maxiter=maxiter,
            **extra,
            **_common_settings(op),
        ),
    )


@dataclass
class TraceEstimate:
    """What `stochastic_trace` returns: the estimate, its standard error, the Hutchinson samples
    (for Hutch++ those of the deflated residual), the low-rank part (Hutch++; 0 for Hutchinson),
    the sketch size and the number of matvecs."""

    trace: float
    stderr: float
    samples: list[float]
    converged: bool
    low_rank_trace: float
    sketch: int
    matvecs: int


def stochastic_trace(
    matvec: MatVec,
    n: int,
    estimator: str = "hutchinson",
    tol: float = 1e-3,
    maxiter: int = 100,
    min_samples: int = 10,
    sketch: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> TraceEstimate:
    """tr(A) of a symmetric matvec from at most `maxiter` matvecs, stopped once the standard
    error is at most tol * |trace| (after `min_samples` Hutchinson samples).

    "hutchinson" (Hutchinson 1990): the mean of v^T A v over seeded Rademacher v; standard
    error = sample std / sqrt(count). "hutch++" (Meyer et al. 2021): `sketch` matvecs (default
    maxiter // 3, the paper's split) on Rademacher S give an orthonormal basis Q of A S (QR in
    float64), `sketch` more give the exact tr(Q^T A Q), and Hutchinson runs on the deflated
    residual, v^T (I - QQ^T) A (I - QQ^T) v. Given Q the first part is exact and the residual
    samples are i.i.d. with mean tr(A) - tr(Q^T A Q), so their standard error is the estimate's
    (conditional on the sketch drawn). Where A's spectrum decays, the residual's variance is far
    smaller than A's own: fewer matvecs for the same standard error.
    """
    check_choice(estimator, "trace estimator", TRACE_ESTIMATORS)
    m = 0
    if estimator == "hutch++":
        m = maxiter // 3 if sketch is None else sketch
        if m < 1 or maxiter - 2 * m < min_samples:
            raise SharpError(
                f"hutch++ with sketch {m} and {maxiter} matvecs leaves {maxiter - 2 * m} residual samples, "
                f"fewer than min_samples={min_samples}: raise maxiter or lower the sketch"
            )
    gen = torch.Generator().manual_seed(seed)
    bar = progress_bar(total=maxiter, desc=estimator, enabled=progress, leave=False)
    try:
        q, low = None, 0.0
        if m:
            columns = [matvec(_random_vector(gen, n, "rademacher", dtype, device)).double() for _ in range(m)]
            bar.update(m)
            q = torch.linalg.qr(torch.stack(columns, dim=1)).Q  # n x min(n, m), orthonormal
            low = sum(float(q[:, i] @ matvec(q[:, i].to(dtype)).double()) for i in range(q.shape[1]))
            bar.update(m)
        samples: list[float] = []
        converged = False
        while 2 * m + len(samples) < maxiter:
            v = _random_vector(gen, n, "rademacher", torch.float64, device)
            if q is not None:
                v = v - q @ (q.T @ v)
            samples.append(float(matvec(v.to(dtype)).double() @ v))
            bar.update(1)
            if len(samples) >= min_samples:
                mean, stderr = _mean_stderr(samples)
                bar.set_postfix(trace=f"{low + mean:.4g}", stderr=f"{stderr:.2g}")
                if stderr <= tol * abs(low + mean):
                    converged = True
                    break
    finally:
        bar.close()
    mean, stderr = _mean_stderr(samples)
    return TraceEstimate(
        low + mean,
        stderr,
        samples,
        converged,
        low,
        m,
        m + (q.shape[1] if q is not None else 0) + len(samples),
    )


def hessian_trace(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    tol: float = 1e-3,
    maxiter: int = 100,
    min_samples: int = 10,
    seed: int = 0,
    loss_fn: LossFn = cross_entropy,
    bn_mode: str = "eval",
    keep_graph: bool | None = None,
    method: str = "hutchinson",
    bn_data: Iterable[Batch] | None = None,
    bn_batch: int | None = None,
    progress: bool = False,
    estimator: str = "hutchinson",
    sketch: int | None = None,
) -> TraceResult:
    """tr(H) from at most `maxiter` HVPs with seeded Rademacher vectors, by `stochastic_trace`:
    `estimator="hutchinson"` (Hutchinson 1990), or `"hutch++"` (Meyer et al. 2021: `sketch`
    HVPs, default maxiter // 3, find the top of the spectrum, as many more take its trace
    exactly, Hutchinson on the rest).

    `trace` is the estimate and `stderr` its standard error (Hutchinson: sample standard
    deviation / sqrt(count); Hutch++: that of the residual samples, given the sketch); `samples`
    are the Hutchinson samples (Hutch++: of the residual, with `low_rank_trace` in the
    settings). After `min_samples` samples it stops as soon as stderr <= tol * |trace|, else
    after `maxiter` HVPs in all (`converged` False).
    `method="pyhessian"` runs PyHessian's own `trace()` instead (same probe set and BN mode):
    it stops when the running mean changes by less than tol relative to the mean, without
    abs(), so a negative mean stops it at once; the mean and standard error of the samples it
    returns are reported the same way, and `converged` says whether its rule stopped it.
    """
    check_positive(spelling="argument", tol=tol)
    if min_samples < 2 or maxiter < min_samples:
        raise SharpError(f"min_samples={min_samples}, maxiter={maxiter}: choose 2 <= min_samples <= maxiter")
    check_choice(method, "trace method", TRACE_METHODS)
    if method == "pyhessian" and estimator != "hutchinson":
        raise SharpError(
            f"PyHessian's trace() is Hutchinson's estimator: drop estimator={estimator!r} or the method"
        )
    probe, op = _operator(model, batches, loss_fn, bn_mode, keep_graph, bn_data, bn_batch)
    extra: dict[str, Any] = {}
    if method == "pyhessian":
        from sharp.probes.pyhessian_bridge import pyhessian_trace

        samples, hvps = pyhessian_trace(probe, maxiter=maxiter, tol=tol, seed=seed)
        probe.counts["pyhessian_hvp"] = hvps
        trace, stderr = _mean_stderr(samples)
        converged = len(samples) < maxiter
        name = "pyhessian trace()"
    else:
        kw = {"tol": tol, "maxiter": maxiter, "min_samples": min_samples, "sketch": sketch, "seed": seed}
        found = stochastic_trace(
            op.matvec, op.n, estimator, dtype=op.dtype, device=op.device, progress=progress, **kw
        )
        trace, stderr, samples, converged = found.trace, found.stderr, found.samples, found.converged
        name = "hutchinson-rademacher"
        if estimator == "hutch++":
            name = "hutch++ (Meyer et al. 2021), Rademacher"
            extra = {"sketch": found.sketch, "low_rank_trace": found.low_rank_trace}
    return TraceResult(
        trace=trace,
        stderr=stderr,
        samples=samples,
        converged=converged,
        method=method,
        **probe.result_fields(
            seed=seed,
            iterations=len(samples) if method == "pyhessian" else found.matvecs,
            tol=tol,
            maxiter=maxiter,
            min_samples=min_samples,
            estimator=name,
            **extra,
            uncertainty="sample std of the samples / sqrt(count)"
            + (" (of the deflated residual, given the sketch)" if estimator == "hutch++" else ""),
            **_common_settings(op),
        ),
    )


def _mean_stderr(samples: list[float]) -> tuple[float, float]:
    if len(samples) < 2:
        return (float(samples[0]) if samples else math.nan), math.nan
    return float(np.mean(samples)), float(np.std(samples, ddof=1) / math.sqrt(len(samples)))


def hessian_density(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    n_runs: int = 1,
    n_iter: int = 100,
    sigma: float | None = None,
    grid_size: int = 1000,
    seed: int = 0,
    loss_fn: LossFn = cross_entropy,
    bn_mode: str = "eval",
    start: str = "rademacher",
    keep_graph: bool | None = None,
    bn_data: Iterable[Batch] | None = None,
    bn_batch: int | None = None,
    progress: bool = False,
) -> DensityResult:
    """The Hessian's spectral density by stochastic Lanczos quadrature (Ubaru, Chen & Saad
    2017; as used by Ghorbani et al. 2019 and PyHessian).

    Each of `n_runs` runs starts Lanczos (full reorthogonalization) from a seeded
    Rademacher (or Gaussian, `start="gaussian"`) vector and takes `n_iter` steps (fewer if
    the Krylov space becomes invariant; at most n). The Ritz values θ_j of T and weights
    w_j = (first component of T's j-th eigenvector)^2 (summing to 1) give the quadrature;
    the density is the average over runs of sum_j w_j N(x; θ_j, σ²), tabulated on
    `grid_size` points over [min θ - 5σ, max θ + 5σ] and scaled so that its trapezoid
    integral on the grid is exactly 1. Its mean sum_j w_j θ_j = v^T H v / v^T v estimates
    tr(H) / n. Default σ: 1 % of the Ritz-value range (of max |θ| if the range is 0); a σ
    below the grid spacing is refused (the Gaussians are then not resolved and the
    density's moments are off). The spread over runs is reported (`density_std`,
    `trace_std`). `iterations` is the total number of Lanczos steps (= HVPs).
    """
    if n_runs < 1 or n_iter < 1:
        raise SharpError(f"n_runs={n_runs}, n_iter={n_iter}: both must be at least 1")
    if grid_size < 2:
        raise SharpError(f"grid_size={grid_size}: the grid needs at least 2 points")
    check_positive(spelling="argument", sigma=sigma)
    check_choice(start, "start", STARTS)
    probe, op = _operator(model, batches, loss_fn, bn_mode, keep_graph, bn_data, bn_batch)
    sigma_given = sigma
    gen = torch.Generator().manual_seed(seed)
    steps = min(n_iter, op.n)
    ritz_values: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    bar = progress_bar(total=n_runs * steps, desc="SLQ", enabled=progress, leave=False)
    try:
        for _ in range(n_runs):
            v0 = _random_vector(gen, op.n, start, op.dtype, op.device)
            process = _Lanczos(op.matvec, op.n, v0, capacity=steps + 1)
            while process.m < steps and not process.broken:
                process.step()
                bar.update(1)
            theta, s = process.ritz()
            ritz_values.append(theta)
            weights.append(s[0] ** 2)
    finally:
        bar.close()
    all_theta = np.concatenate(ritz_values)
    lo, hi = float(all_theta.min()), float(all_theta.max())
    if sigma is None:
        width = hi - lo
        sigma = DENSITY_SIGMA_FRACTION * (width if width > 0 else max(abs(hi), abs(lo), 1e-12))
    pad = DENSITY_PAD_SIGMAS * sigma
    spacing = (hi - lo + 2 * pad) / (grid_size - 1)
    if sigma < spacing:
        raise SharpError(
            f"sigma={sigma:.3g} is below the grid spacing {spacing:.3g}: raise grid_size (--density-grid) "
            "or sigma, so that each Gaussian spans grid points"
        )
    grid = np.linspace(lo - pad, hi + pad, grid_size)
    per_run = []
    for theta, w in zip(ritz_values, weights, strict=True):
        z = (grid[:, None] - theta[None, :]) / sigma
        per_run.append((np.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi))) @ w)
    runs = np.stack(per_run)
    norm = trapezoid(runs.mean(0), grid)
    density = runs.mean(0) / norm
    traces = [float(op.n * np.dot(t, w)) for t, w in zip(ritz_values, weights, strict=True)]
    return DensityResult(
        grid=grid.tolist(),
        density=density.tolist(),
        density_std=(runs.std(0, ddof=1) / norm).tolist() if n_runs >= 2 else None,
        ritz_values=[t.tolist() for t in ritz_values],
        weights=[w.tolist() for w in weights],
        sigma=float(sigma),
        trace_estimates=traces,
        trace_mean=float(np.mean(traces)),
        trace_std=float(np.std(traces, ddof=1)) if n_runs >= 2 else None,
        **probe.result_fields(
            seed=seed,
            iterations=sum(len(t) for t in ritz_values),
            n_runs=n_runs,
            n_iter=n_iter,
            sigma=float(sigma),
            sigma_rule="given" if sigma_given is not None else f"{DENSITY_SIGMA_FRACTION} x Ritz range",
            grid_size=grid_size,
            start=start,
            uncertainty="pointwise sample std of the runs' densities; sample std of their trace estimates",
            **_common_settings(op),
        ),
    )
