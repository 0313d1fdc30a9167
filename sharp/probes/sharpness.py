"""Sharpness of a solution: Keskar et al.'s epsilon-sharpness and Andriushchenko et al.'s
adaptive worst-case and average-case sharpness.

- `epsilon_sharpness`: Keskar et al. 2017, "On Large-Batch Training for Deep Learning:
  Generalization Gap and Sharp Minima", Metric 2.1. The largest loss found by L-BFGS-B
  in a box around the weights (full space or a random p-dimensional subspace), as a
  percentage of 1 + f(x).
- `adaptive_sharpness`, `average_sharpness`: Andriushchenko et al. 2023, "A modern look at
  the relationship between sharpness and generalization". Worst-case m-sharpness by
  APGD-style ascent per chunk of m examples, and the average loss increase under Gaussian
  (or uniform) weight noise, with the perturbation scaled elementwise by |w| (adaptive)
  or not.

Every probe works on a `ProbeModel` copy; the caller's model is never changed, and the copy
is put back at the unperturbed weights before returning (also when an error escapes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import scipy.linalg
import scipy.optimize
import torch
from torch import nn

from sharp.errors import SharpError
from sharp.probes.common import Batch, LossFn, ProbeModel, ProbeResult, cross_entropy
from sharp.progress import progress_bar

NORMS = ("linf", "l2")
APGD_MOMENTUM = 0.75  # weight of the new step; 1 - 0.75 goes to the previous step (Croce & Hein 2020)
APGD_MIN_UPDATE_RATIO = 0.75
BOUND_RTOL = 1e-9  # a coordinate within this relative distance of its bound counts as "at the bound"


# --- results ------------------------------------------------------------------------------


@dataclass(kw_only=True)
class SharpnessResult(ProbeResult):
    """Keskar et al. 2017 epsilon-sharpness, phi_{x,f}(eps, A) in percent."""

    kind: ClassVar[str] = "epsilon_sharpness"
    sharpness: float
    f0: float
    fmax: float
    eps: float
    subspace_dim: int | None = None
    start: str = "zero"  # "zero", or "zero+random" when a second run from a random start was needed
    perturbation_norm: float = 0.0  # ||A y*||_2
    box_fraction_at_bound: float = 0.0  # fraction of the coordinates of y* at their bound
    n_params: int = 0
    lbfgs_iterations: int = 0
    lbfgs_message: str = ""
    perturbation: torch.Tensor | None = field(default=None, metadata={"json": False})  # A y*, float64
    y: np.ndarray | None = field(default=None, metadata={"json": False})  # y* (box coordinates)
    bounds: np.ndarray | None = field(default=None, metadata={"json": False})  # r: |y_i| <= r_i


@dataclass(kw_only=True)
class AdaptiveSharpnessResult(ProbeResult):
    """Andriushchenko et al. 2023 worst-case (adaptive) m-sharpness."""

    kind: ClassVar[str] = "adaptive_sharpness"
    sharpness: float
    per_batch: list[float] = field(default_factory=list)  # max loss increase of each chunk
    chunk_sizes: list[int] = field(default_factory=list)
    chunk_losses: list[float] = field(default_factory=list)  # L_chunk(w) of each chunk
    rho: float
    norm: str
    adaptive: bool
    m: int
    steps: int


@dataclass(kw_only=True)
class AverageSharpnessResult(ProbeResult):
    """Andriushchenko et al. 2023 average-case (adaptive) sharpness."""

    kind: ClassVar[str] = "average_sharpness"
    sharpness: float
    stderr: float
    f0: float
    per_draw: list[float] = field(default_factory=list)  # L(w + delta) - L(w) of each draw
    rho: float
    n_draws: int
    adaptive: bool
    norm: str


# --- argument checks ----------------------------------------------------------------------


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
        raise SharpError(f"{name}={value!r} is not allowed: give a positive finite number")
    if not math.isfinite(value) or value <= 0:
        raise SharpError(f"{name}={value!r} is not allowed: give a positive finite number")
    return float(value)


def _count(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise SharpError(f"{name}={value!r} is not allowed: give an integer >= {minimum}")
    return int(value)


def _norm(norm: str) -> str:
    if norm not in NORMS:
        raise SharpError(f"norm={norm!r} is unknown: choose 'linf' or 'l2'")
    return norm


# --- epsilon-sharpness (Keskar et al. 2017) -----------------------------------------------


class RandomSubspace:
    """The random n x p matrix A of Keskar et al.'s subspace sharpness, kept as A⁺ (p x n).

    A⁺ has i.i.d. entries uniform in [-1, 1], each row scaled to unit norm, drawn from a CPU
    generator seeded with `seed` (so the same on every device). A = pinv(A⁺) is never formed:
    for a full-row-rank A⁺ (almost sure for p <= n), pinv(A⁺) = A⁺ᵀ (A⁺A⁺ᵀ)⁻¹, so
    A y = A⁺ᵀ M⁻¹ y and Aᵀ g = M⁻¹ A⁺ g with M = A⁺A⁺ᵀ (p x p, Cholesky-factored once).
    Memory: A⁺ in float64, 8 p n bytes (800 MB for p = 100, n = 10^6); one product costs
    O(p n).
    """

    def __init__(self, n: int, p: int, seed: int = 0, device: torch.device | str = "cpu") -> None:
        if p > n:
            raise SharpError(f"subspace_dim={p} exceeds the {n} parameters: give subspace_dim <= {n}")
        generator = torch.Generator().manual_seed(seed)
        rows = torch.empty(p, n, dtype=torch.float64)
        for i in range(p):  # row by row: no second p x n temporary
            rows[i] = torch.rand(n, dtype=torch.float64, generator=generator).mul_(2).sub_(1)
            rows[i] /= rows[i].norm()
        self.pinv_matrix = rows.to(device)  # A⁺
        gram = (self.pinv_matrix @ self.pinv_matrix.T).cpu().numpy()
        try:
            self._cho = scipy.linalg.cho_factor(gram)
        except np.linalg.LinAlgError as err:
            raise SharpError(f"the random subspace is rank-deficient: give a subspace_dim below {p}") from err
        self.n, self.p = n, p

    def apply(self, y: np.ndarray) -> torch.Tensor:
        """A y (length n, float64, on A⁺'s device)."""
        z = scipy.linalg.cho_solve(self._cho, np.asarray(y, dtype=np.float64))
        return self.pinv_matrix.T @ torch.from_numpy(z).to(self.pinv_matrix.device)

    def apply_transpose(self, g: torch.Tensor) -> np.ndarray:
        """Aᵀ g (length p, float64 numpy)."""
        projected = (self.pinv_matrix @ g.to(self.pinv_matrix)).cpu().numpy()
        return scipy.linalg.cho_solve(self._cho, projected)

    def project(self, x: torch.Tensor) -> np.ndarray:
        """A⁺ x (length p, float64 numpy)."""
        return (self.pinv_matrix @ x.to(self.pinv_matrix)).cpu().numpy()

    def dense(self) -> np.ndarray:
        """A itself (n x p); for small n only (tests, inspection)."""
        return np.stack([self.apply(e).cpu().numpy() for e in np.eye(self.p)], axis=1)


def epsilon_sharpness(
    model: nn.Module,
    batches: Sequence[Batch] | Batch,
    eps: float = 1e-3,
    subspace_dim: int | None = None,
    maxiter: int = 10,
    seed: int = 0,
    loss_fn: LossFn = cross_entropy,
    bn_mode: str = "eval",
    progress: bool = False,
) -> SharpnessResult:
    """Keskar et al. 2017 epsilon-sharpness (Metric 2.1), in percent.

    phi = (max_{y in C_eps} f(x + A y) - f(x)) / (1 + f(x)) * 100 with
    C_eps = {y : |y_i| <= eps (|(A⁺x)_i| + 1)}; x are the model's trainable parameters as one
    flat vector and f the mean loss over `batches`. `subspace_dim=None` is the full space
    (A = I: weight i may move by eps (|x_i| + 1)); an integer p draws a `RandomSubspace`
    (A⁺ uniform in [-1, 1] with unit rows, A = pinv(A⁺) = A⁺ᵀ(A⁺A⁺ᵀ)⁻¹) seeded by `seed`.

    The maximum is solved inexactly as in the paper: scipy L-BFGS-B on -f from y = 0 with
    `maxiter` iterations, loss and gradient from one pass each evaluation (subspace
    gradient Aᵀ∇f), f in float64 on the scipy side. One deviation, recorded in `settings`:
    gtol = 0, because scipy's default absolute tolerance (1e-5 on the projected gradient)
    stops a well-trained net at y = 0 whenever all its gradient entries are below 1e-5.
    The largest f over all evaluations is kept. At a stationary point L-BFGS-B from y = 0
    stops at once, so when the gradient at 0 is numerically zero (the first-order increase
    it promises over the box, sum_i |(Aᵀ∇f)_i| r_i, is below 64 machine epsilons of the
    model's dtype times 1 + |f(x)|) or the run from 0 found no increase, a second run
    starts from y0 uniform in [-r/2, r/2] (seeded by `seed`), and the larger maximum is
    kept; `start` records "zero" or "zero+random".
    """
    eps = _positive("eps", eps)
    maxiter = _count("maxiter", maxiter)
    pm = ProbeModel(model, batches, loss_fn=loss_fn, bn_mode=bn_mode)
    if subspace_dim is not None:
        subspace_dim = _count("subspace_dim", subspace_dim)
    x = pm.get_vector()
    x64 = x.to(torch.float64)
    try:
        subspace = None
        if subspace_dim is None:
            bounds = eps * (np.abs(x64.cpu().numpy()) + 1.0)
        else:
            subspace = RandomSubspace(pm.n_params, subspace_dim, seed=seed, device=pm.device)
            bounds = eps * (np.abs(subspace.project(x64)) + 1.0)

        def full_vector(y: np.ndarray) -> torch.Tensor:
            if subspace is None:
                return torch.from_numpy(y).to(pm.device)
            return subspace.apply(y)

        best = {"f": -math.inf, "y": np.zeros_like(bounds)}
        cache: dict[str, Any] = {}

        def evaluate(y: np.ndarray) -> tuple[float, np.ndarray]:
            """f(x + A y) and Aᵀ∇f, both float64; the unperturbed point is computed once."""
            if "zero" in cache and not y.any():
                return cache["zero"]
            pm.set_vector(x64 + full_vector(y))
            f, grad = pm.loss_and_grad()
            grad64 = grad.to(torch.float64)
            gy = grad64.cpu().numpy() if subspace is None else subspace.apply_transpose(grad64)
            f = float(f)
            if f > best["f"]:
                best["f"], best["y"] = f, np.array(y, dtype=np.float64, copy=True)
            return f, gy

        f0, g0 = evaluate(np.zeros_like(bounds))
        cache["zero"] = (f0, g0)
        if not math.isfinite(f0):
            raise SharpError(f"the loss at the given weights is {f0}: probe a model with a finite loss")

        bar = progress_bar(total=maxiter, desc="epsilon-sharpness", enabled=progress, leave=False)
        options = {"maxiter": maxiter, "gtol": 0.0}
        runs: list[tuple[str, scipy.optimize.OptimizeResult]] = []

        def run(label: str, y0: np.ndarray) -> None:
            result = scipy.optimize.minimize(
                lambda y: tuple(-v for v in evaluate(y)),
                y0,
                method="L-BFGS-B",
                jac=True,
                bounds=scipy.optimize.Bounds(-bounds, bounds),
                options=options,
                callback=lambda _y: bar.update(1),
            )
            runs.append((label, result))

        try:
            run("zero", np.zeros_like(bounds))
            dtype_eps = torch.finfo(pm.dtype).eps
            gradient_is_zero = float(np.abs(g0) @ bounds) <= 64 * dtype_eps * (1 + abs(f0))
            if gradient_is_zero or not best["f"] > f0:
                bar.total += maxiter
                rng = np.random.default_rng(seed)
                run("random", rng.uniform(-0.5, 0.5, size=bounds.shape) * bounds)
        finally:
            bar.close()

        y_star = best["y"]
        fmax = best["f"]
        perturbation = full_vector(y_star).cpu()
        at_bound = np.abs(y_star) >= bounds * (1 - BOUND_RTOL)
        return SharpnessResult(
            sharpness=(fmax - f0) / (1 + f0) * 100,
            f0=f0,
            fmax=fmax,
            eps=eps,
            subspace_dim=subspace_dim,
            start="+".join(label for label, _ in runs),
            perturbation_norm=float(perturbation.norm()),
            box_fraction_at_bound=float(at_bound.mean()),
            n_params=pm.n_params,
            lbfgs_iterations=sum(int(r.nit) for _, r in runs),
            lbfgs_message="; ".join(f"{label}: {r.message}" for label, r in runs),
            perturbation=perturbation,
            y=y_star,
            bounds=bounds,
            **pm.result_fields(
                seed=seed,
                iterations=sum(int(r.nit) for _, r in runs),
                eps=eps,
                subspace_dim=subspace_dim,
                maxiter=maxiter,
                lbfgs_options=options,
                random_start="uniform in [-r/2, r/2] if the gradient at y=0 is zero or no increase was found",
            ),
        )
    finally:
        pm.set_vector(x)


# --- adaptive worst-case and average-case sharpness (Andriushchenko et al. 2023) -----------


def _scale(x: torch.Tensor, adaptive: bool) -> torch.Tensor:
    """c of the paper: |w| (adaptive) or 1."""
    return x.abs() if adaptive else torch.ones_like(x)


def _chunks(pm: ProbeModel, m: int) -> list[Batch]:
    """The probe set's examples, in order, re-cut into chunks of m (the last may be shorter)."""
    inputs = torch.cat([b[0] for b in pm.batches])
    targets = torch.cat([b[1] for b in pm.batches])
    return list(zip(inputs.split(m), targets.split(m), strict=True))


def _chunk_loss(pm: ProbeModel, chunk: Batch, need_grad: bool) -> tuple[float, torch.Tensor | None]:
    """Mean loss of one chunk (one forward pass, as one batch) and, if asked, its flat gradient."""
    if not need_grad:
        pm.counts["loss"] += 1
        with torch.no_grad():
            return float(pm.batch_loss(chunk)), None
    pm.counts["grad"] += 1
    for p in pm.params:
        p.grad = None
    loss = pm.batch_loss(chunk)
    loss.backward()
    grad = pm.flat_grad()
    for p in pm.params:
        p.grad = None
    return float(loss.detach()), grad


def _project(u: torch.Tensor, rho: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return u.clamp(-rho, rho)
    length = float(u.norm())
    return u * (rho / length) if length > rho else u


def _ascent_direction(g: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return g.sign()
    length = float(g.norm())
    return g / length if length > 0 else torch.zeros_like(g)


def apgd_checkpoints(steps: int) -> set[int]:
    """APGD's step-size checkpoints (Croce & Hein 2020): w_j = ceil(p_j * steps) with p_0 = 0,
    p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06); for 20 steps 5, 9, 12, ..., 20."""
    p = [0.0, 0.22]
    w = [0, math.ceil(round(0.22 * steps, 9))]
    while w[-1] < steps and w[-1] != w[-2]:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
        w.append(math.ceil(round(p[-1] * steps, 9)))  # round: 0.7 * 20 must not become 15
    return {k for k in w[1:] if 0 < k <= steps}


def _worst_case_chunk(
    pm: ProbeModel, chunk: Batch, w: torch.Tensor, c: torch.Tensor, rho: float, norm: str, steps: int
) -> tuple[float, float]:
    """max over visited u of L(w + c u) - L(w) for ||u||_p <= rho by APGD-style ascent from u = 0.

    z = P(u_k + eta s(g_k)), u_{k+1} = P(u_k + a (z - u_k) + (1 - a)(u_k - u_{k-1})) with
    s = sign (linf) or g/||g|| (l2), g the gradient in u (c ⊙ ∇L), a = 1 on the first step
    and 0.75 after, eta = 2 rho at first. At each checkpoint eta is halved, and the iterate
    (momentum cleared) and its gradient reset to the best point, when fewer than 75% of the
    steps since the last checkpoint raised the best loss, or when neither eta nor the best
    loss changed since the last checkpoint (the rule of the authors' code).
    Returns (L(w), max increase).
    """
    checkpoints = apgd_checkpoints(steps)

    def evaluate(u: torch.Tensor, need_grad: bool) -> tuple[float, torch.Tensor | None]:
        pm.set_vector(w + c * u)
        f, grad = _chunk_loss(pm, chunk, need_grad)
        return f, (c * grad if grad is not None else None)

    u = torch.zeros_like(w)
    f0, g = evaluate(u, True)
    best_f, best_u, best_g = f0, u, g
    u_prev = u
    eta = 2 * rho
    last_checkpoint, improved, eta_at_checkpoint, best_at_checkpoint = 0, 0, eta, f0
    for k in range(1, steps + 1):
        z = _project(u + eta * _ascent_direction(g, norm), rho, norm)
        a = 1.0 if k == 1 else APGD_MOMENTUM
        u_prev, u = u, _project(u + a * (z - u) + (1 - a) * (u - u_prev), rho, norm)
        f, g = evaluate(u, need_grad=k < steps)
        if f > best_f:
            best_f, best_u, best_g = f, u, g
            improved += 1
        if k in checkpoints and k < steps:
            reduce = improved < APGD_MIN_UPDATE_RATIO * (k - last_checkpoint) or (
                eta == eta_at_checkpoint and best_f == best_at_checkpoint
            )
            last_checkpoint, improved, eta_at_checkpoint, best_at_checkpoint = k, 0, eta, best_f
            if reduce:
                eta /= 2
                u, u_prev, g = best_u, best_u, best_g
    return f0, best_f - f0


def adaptive_sharpness(
    model: nn.Module,
    batches: Sequence[Batch] | Batch,
    rho: float,
    norm: str = "linf",
    adaptive: bool = True,
    m: int = 128,
    steps: int = 20,
    seed: int = 0,
    loss_fn: LossFn = cross_entropy,
    bn_mode: str = "eval",
    progress: bool = False,
) -> AdaptiveSharpnessResult:
    """Andriushchenko et al. 2023 worst-case (adaptive) m-sharpness.

    The probe set's examples are re-cut, in order, into chunks of `m` (the last may be
    shorter; each chunk is one forward pass, so with bn_mode="batch" one BN batch). For
    each chunk, max_{||delta / c||_p <= rho} L_chunk(w + delta) - L_chunk(w) with c = |w|
    (adaptive; delta = 0 where w = 0) or c = 1, solved in u = delta / c by `steps` steps of
    APGD-style ascent from u = 0 (see `_worst_case_chunk`), keeping the worst loss seen.
    `sharpness` is the mean of the per-chunk maxima weighted by chunk size (the plain mean
    when m divides the probe set). The ascent is deterministic; `seed` is only recorded.
    `evaluations` count passes over one chunk.
    """
    rho = _positive("rho", rho)
    norm = _norm(norm)
    m = _count("m", m)
    steps = _count("steps", steps)
    pm = ProbeModel(model, batches, loss_fn=loss_fn, bn_mode=bn_mode)
    w = pm.get_vector()
    c = _scale(w, adaptive)
    try:
        chunks = _chunks(pm, m)
        per_chunk, losses, sizes = [], [], []
        for chunk in progress_bar(chunks, desc="adaptive sharpness", enabled=progress, leave=False):
            f0, increase = _worst_case_chunk(pm, chunk, w, c, rho, norm, steps)
            per_chunk.append(increase)
            losses.append(f0)
            sizes.append(len(chunk[1]))
        sharpness = float(np.average(per_chunk, weights=sizes))
        return AdaptiveSharpnessResult(
            sharpness=sharpness,
            per_batch=per_chunk,
            chunk_sizes=sizes,
            chunk_losses=losses,
            rho=rho,
            norm=norm,
            adaptive=adaptive,
            m=m,
            steps=steps,
            **pm.result_fields(
                seed=seed,
                iterations=steps,
                rho=rho,
                norm=norm,
                adaptive=adaptive,
                m=m,
                steps=steps,
                momentum=APGD_MOMENTUM,
                initial_step=2 * rho,
                min_update_ratio=APGD_MIN_UPDATE_RATIO,
                checkpoints=sorted(apgd_checkpoints(steps)),
                evaluation_unit="one chunk of m examples",
            ),
        )
    finally:
        pm.set_vector(w)


def average_sharpness(
    model: nn.Module,
    batches: Sequence[Batch] | Batch,
    rho: float,
    n_draws: int = 20,
    adaptive: bool = True,
    seed: int = 0,
    loss_fn: LossFn = cross_entropy,
    bn_mode: str = "eval",
    norm: str = "l2",
    progress: bool = False,
) -> AverageSharpnessResult:
    """Andriushchenko et al. 2023 average-case (adaptive) sharpness over the whole probe set.

    `sharpness` = mean over `n_draws` draws of L(w + delta) - L(w), with delta = rho c ⊙ xi,
    c = |w| (adaptive) or 1, and xi i.i.d. standard normal (norm="l2", the paper's Gaussian
    case: delta ~ N(0, rho² c²)) or uniform in [-1, 1] (norm="linf"). The noise is drawn on
    the CPU from a generator seeded with `seed`, so a seed gives the same draws on every
    device. `stderr` is the sample standard deviation over draws / sqrt(n_draws).
    """
    rho = _positive("rho", rho)
    norm = _norm(norm)
    n_draws = _count("n_draws", n_draws, minimum=2)
    pm = ProbeModel(model, batches, loss_fn=loss_fn, bn_mode=bn_mode)
    w = pm.get_vector()
    c = _scale(w, adaptive)
    generator = torch.Generator().manual_seed(seed)
    try:
        f0 = pm.loss()
        increases = []
        for _ in progress_bar(range(n_draws), desc="average sharpness", enabled=progress, leave=False):
            if norm == "l2":
                xi = torch.randn(w.shape, generator=generator, dtype=torch.float64)
            else:
                xi = torch.rand(w.shape, generator=generator, dtype=torch.float64).mul_(2).sub_(1)
            pm.set_vector(w + rho * c * xi.to(device=pm.device, dtype=pm.dtype))
            increases.append(pm.loss() - f0)
        values = np.asarray(increases)
        return AverageSharpnessResult(
            sharpness=float(values.mean()),
            stderr=float(values.std(ddof=1) / math.sqrt(n_draws)),
            f0=f0,
            per_draw=increases,
            rho=rho,
            n_draws=n_draws,
            adaptive=adaptive,
            norm=norm,
            **pm.result_fields(
                seed=seed,
                rho=rho,
                n_draws=n_draws,
                adaptive=adaptive,
                norm=norm,
                noise="normal" if norm == "l2" else "uniform in [-1, 1]",
            ),
        )
    finally:
        pm.set_vector(w)


__all__ = [
    "AdaptiveSharpnessResult",
    "AverageSharpnessResult",
    "RandomSubspace",
    "SharpnessResult",
    "adaptive_sharpness",
    "apgd_checkpoints",
    "average_sharpness",
    "epsilon_sharpness",
]
