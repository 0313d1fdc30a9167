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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import scipy.linalg
import scipy.optimize
import torch
from torch import nn

from sharp.config import check_choice, check_positive
from sharp.errors import SharpError
from sharp.probes.common import (
    Batch,
    LossFn,
    ProbeModel,
    ProbeResult,
    check_count,
    cross_entropy,
    regroup,
)
from sharp.progress import progress_bar

NORMS = ("linf", "l2")
APGD_MOMENTUM = 0.75  # weight of the new step; 1 - 0.75 goes to the previous step (Croce & Hein 2020)
APGD_MIN_UPDATE_RATIO = 0.75
BOUND_RTOL = 1e-9  # a coordinate within this relative distance of its bound counts as "at the bound"
LBFGS_MAXFUN = 100_000  # evaluations: never the binding limit (maxiter and the line search, 20 each, are)


# --- results ------------------------------------------------------------------------------


@dataclass(kw_only=True)
class SharpnessResult(ProbeResult):
    """Keskar et al. 2017 epsilon-sharpness, phi_{x,f}(eps, A) in percent.

    `sharpness` is the largest phi found over all L-BFGS-B starts; `sharpness_std` the sample
    standard deviation of phi over the starts that count (the start at y = 0, unless it sits
    at a stationary point, and each seeded random start), None with fewer than two;
    `sharpness_zero_start` is the paper's procedure alone (10 iterations from y = 0).
    """

    kind: ClassVar[str] = "epsilon_sharpness"
    sharpness: float
    sharpness_std: float | None = None
    sharpness_zero_start: float | None = None
    uncertainty: str = ""
    f0: float
    fmax: float
    eps: float
    subspace_dim: int | None = None
    start: str = "zero"  # the starts run, joined by "+": "zero", "zero+random1", ...
    starts: list[dict[str, Any]] = field(default_factory=list)  # per start: phi, iterations, stops, ...
    perturbation_norm: float = 0.0  # ||A y*||_2
    box_fraction_at_bound: float = 0.0  # fraction of the coordinates of y* at their bound
    n_at_bound: int = 0  # coordinates of y* at their bound
    box_maximum_reached: bool = False  # y* provably maximizes f over the box (see `_box_maximum`)
    n_params: int = 0
    lbfgs_iterations: int = 0
    lbfgs_evaluations: int = 0  # function-and-gradient evaluations of all starts
    lbfgs_message: str = ""
    perturbation: torch.Tensor | None = field(default=None, metadata={"json": False})  # A y*, float64
    y: np.ndarray | None = field(default=None, metadata={"json": False})  # y* (box coordinates)
    bounds: np.ndarray | None = field(default=None, metadata={"json": False})  # r: |y_i| <= r_i


@dataclass(kw_only=True)
class AdaptiveSharpnessResult(ProbeResult):
    """Andriushchenko et al. 2023 worst-case (adaptive) m-sharpness."""

    kind: ClassVar[str] = "adaptive_sharpness"
    sharpness: float
    stderr: float | None = None  # over chunks (data sampling; the ascent itself is deterministic)
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


def _box_maximum(y: np.ndarray, grad: np.ndarray, bounds: np.ndarray) -> bool:
    """True when y is a provable (local) maximum of f over the box: every coordinate at a bound
    with the gradient of f pointing out of the box (or zero) there, so that no feasible
    direction increases f to first order (the KKT conditions). L-BFGS-B cannot go further."""
    at_bound = np.abs(y) >= bounds * (1 - BOUND_RTOL)
    return bool(at_bound.all() and np.all(grad * np.sign(y) >= 0))


def _lbfgsb_run(
    objective: Callable[[np.ndarray], tuple[float, np.ndarray]],
    best: Callable[[], tuple[float, np.ndarray, np.ndarray]],
    bounds: np.ndarray,
    y0: np.ndarray,
    maxiter: int,
    on_iteration: Callable[[Any], None],
) -> dict[str, Any]:
    """Maximize f over the box from y0 with exactly `maxiter` L-BFGS-B iterations.

    scipy's L-BFGS-B on -f with ftol = 0 and gtol = 0, so neither a small relative change of f
    nor a small projected gradient ends it. It can still stop early: on an exactly zero
    projected gradient (a box maximum, or an interior stationary point such as y = 0 at a
    minimum), when a step leaves f exactly unchanged, or when its line search fails. Unless the
    point is a provable box maximum (`_box_maximum`), it is then restarted from the best point
    found so far with the iterations left (a fresh curvature memory), until the budget is spent
    or a restart finds nothing better. Returns the iterations, evaluations and stop messages.
    """
    iterations, evaluations, stops = 0, 0, []
    y = y0
    box = scipy.optimize.Bounds(-bounds, bounds)
    proven = False
    while iterations < maxiter:
        before = best()[0]
        result = scipy.optimize.minimize(
            lambda v: tuple(-part for part in objective(v)),
            y,
            method="L-BFGS-B",
            jac=True,
            bounds=box,
            options={"maxiter": maxiter - iterations, "ftol": 0.0, "gtol": 0.0, "maxfun": LBFGS_MAXFUN},
            callback=on_iteration,
        )
        iterations += int(result.nit)
        evaluations += int(result.nfev)
        stops.append(str(result.message))
        f_best, y_best, g_best = best()
        proven = _box_maximum(y_best, g_best, bounds)
        if result.status == 1 or proven or not f_best > before or result.nit == 0:
            break  # budget spent, box maximum, or a restart that found nothing better
        y = y_best
    return {"iterations": iterations, "evaluations": evaluations, "stops": stops, "box_maximum": proven}


def epsilon_sharpness(
    model: nn.Module,
    batches: Sequence[Batch] | Batch,
    eps: float = 1e-3,
    subspace_dim: int | None = None,
    maxiter: int = 10,
    random_starts: int = 1,
    seed: int = 0,
    loss_fn: LossFn = cross_entropy,
    bn_mode: str = "eval",
    bn_data: Iterable[Batch] | None = None,
    bn_batch: int | None = None,
    progress: bool = False,
) -> SharpnessResult:
    """Keskar et al. 2017 epsilon-sharpness (Metric 2.1), in percent.

    phi = (max_{y in C_eps} f(x + A y) - f(x)) / (1 + f(x)) * 100 with
    C_eps = {y : |y_i| <= eps (|(A⁺x)_i| + 1)}; x are the model's trainable parameters as one
    flat vector and f the mean loss over `batches`. `subspace_dim=None` is the full space
    (A = I: weight i may move by eps (|x_i| + 1)); an integer p draws a `RandomSubspace`
    (A⁺ uniform in [-1, 1] with unit rows, A = pinv(A⁺) = A⁺ᵀ(A⁺A⁺ᵀ)⁻¹) seeded by `seed`.

    The maximum is solved inexactly as in the paper: scipy L-BFGS-B on -f from y = 0 for
    `maxiter` iterations (loss and gradient from one pass each evaluation, subspace gradient
    Aᵀ∇f, f in float64 on the scipy side), run to the iteration budget: see `_lbfgsb_run`
    (scipy's default tolerances stop next to a minimum after one step that gains almost
    nothing, reporting a well-trained net as flat). Then `random_starts` more runs of the same
    budget start from y0 uniform in [-r/2, r/2] (seeded by `seed`). When the start at y = 0 is
    degenerate (the first-order increase the gradient promises over the box,
    sum_i |(Aᵀ∇f)_i| r_i, is below 64 machine epsilons of the model's dtype times 1 + |f(x)|,
    or it found no increase) it does not count and one more random start is added, so there
    is always at least one informative start. The largest f over all evaluations is kept;
    `sharpness_std` is the spread of phi over the starts that count (its uncertainty: the
    maximization is local, and the starts find different maxima).
    """
    check_positive(spelling="argument", eps=eps)
    eps = float(eps)
    maxiter = check_count("maxiter", maxiter)
    random_starts = check_count("random_starts", random_starts, minimum=0)
    pm = ProbeModel(model, batches, loss_fn=loss_fn, bn_mode=bn_mode, bn_data=bn_data, bn_batch=bn_batch)
    if subspace_dim is not None:
        subspace_dim = check_count("subspace_dim", subspace_dim)
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

        best: dict[str, Any] = {"f": -math.inf}  # the best point over all starts: f, y, gradient
        run_best: dict[str, Any] = {"f": -math.inf}  # the best point of the current start
        cache: dict[str, Any] = {}

        def evaluate(y: np.ndarray) -> tuple[float, np.ndarray]:
            """f(x + A y) and Aᵀ∇f, both float64; the unperturbed point is computed once."""
            if "zero" in cache and not y.any():
                f, gy = cache["zero"]
            else:
                pm.set_vector(x64 + full_vector(y))
                f, grad = pm.loss_and_grad()
                grad64 = grad.to(torch.float64)
                gy = grad64.cpu().numpy() if subspace is None else subspace.apply_transpose(grad64)
                f = float(f)
            for record in (best, run_best):
                if f > record["f"]:
                    record.update(f=f, y=np.array(y, dtype=np.float64, copy=True), g=gy)
            return f, gy

        f0, g0 = evaluate(np.zeros_like(bounds))
        cache["zero"] = (f0, g0)
        if not math.isfinite(f0):
            raise SharpError(f"the loss at the given weights is {f0}: probe a model with a finite loss")

        def phi(f: float) -> float:
            return (f - f0) / (1 + f0) * 100

        bar = progress_bar(total=maxiter * (1 + random_starts), desc="epsilon-sharpness", enabled=progress)
        rng = np.random.default_rng(seed)
        starts: list[dict[str, Any]] = []

        def run(label: str, y0: np.ndarray) -> dict[str, Any]:
            run_best.clear()
            run_best["f"] = -math.inf
            record = _lbfgsb_run(
                evaluate,
                lambda: (run_best["f"], run_best.get("y"), run_best.get("g")),
                bounds,
                y0,
                maxiter,
                lambda _y: bar.update(1),
            )
            record = {"start": label, "sharpness": phi(run_best["f"]), "fmax": run_best["f"], **record}
            starts.append(record)
            return record

        try:
            zero = run("zero", np.zeros_like(bounds))
            dtype_eps = torch.finfo(pm.dtype).eps
            gradient_is_zero = float(np.abs(g0) @ bounds) <= 64 * dtype_eps * (1 + abs(f0))
            zero["counts"] = not (gradient_is_zero or not zero["fmax"] > f0)
            extra = random_starts + (0 if zero["counts"] else 1)
            bar.total = maxiter * (1 + extra)
            for i in range(extra):
                run(f"random{i + 1}", rng.uniform(-0.5, 0.5, size=bounds.shape) * bounds)
                starts[-1]["counts"] = True
        finally:
            bar.close()

        y_star = best["y"]
        fmax = best["f"]
        perturbation = full_vector(y_star).cpu()
        at_bound = np.abs(y_star) >= bounds * (1 - BOUND_RTOL)
        counted = [r["sharpness"] for r in starts if r["counts"]]
        iterations = sum(r["iterations"] for r in starts)
        return SharpnessResult(
            sharpness=phi(fmax),
            sharpness_std=float(np.std(counted, ddof=1)) if len(counted) >= 2 else None,
            sharpness_zero_start=zero["sharpness"],
            uncertainty="sample std of phi over the L-BFGS-B starts that count (y = 0 unless degenerate, "
            "and each seeded random start)",
            f0=f0,
            fmax=fmax,
            eps=eps,
            subspace_dim=subspace_dim,
            start="+".join(r["start"] for r in starts),
            starts=starts,
            perturbation_norm=float(perturbation.norm()),
            box_fraction_at_bound=float(at_bound.mean()),
            n_at_bound=int(at_bound.sum()),
            box_maximum_reached=_box_maximum(y_star, best["g"], bounds),
            n_params=pm.n_params,
            lbfgs_iterations=iterations,
            lbfgs_evaluations=sum(r["evaluations"] for r in starts),
            lbfgs_message="; ".join(f"{r['start']}: {' / '.join(r['stops'])}" for r in starts),
            perturbation=perturbation,
            y=y_star,
            bounds=bounds,
            **pm.result_fields(
                seed=seed,
                iterations=iterations,
                eps=eps,
                subspace_dim=subspace_dim,
                maxiter=maxiter,
                random_starts=random_starts,
                lbfgs_options={"ftol": 0.0, "gtol": 0.0, "maxfun": LBFGS_MAXFUN, "maxls": 20},
                stopping="maxiter iterations per start, or a provable box maximum; an early scipy stop "
                "restarts from the best point with the iterations left",
                random_start="uniform in [-r/2, r/2]; one more when the start at y = 0 is degenerate",
            ),
        )
    finally:
        pm.set_vector(x)


# --- adaptive worst-case and average-case sharpness (Andriushchenko et al. 2023) -----------


def _scale(x: torch.Tensor, adaptive: bool) -> torch.Tensor:
    """c of the paper: |w| (adaptive) or 1."""
    return x.abs() if adaptive else torch.ones_like(x)


def _chunk_loss(pm: ProbeModel, chunk: Batch, need_grad: bool) -> tuple[float, torch.Tensor | None]:
    """Mean loss of one chunk and, if asked, its flat gradient (`ProbeModel.pieces` decide the
    forward passes: one per BN group in batch mode)."""
    if not need_grad:
        pm.counts["loss"] += 1
        return pm.batch_mean_loss(chunk), None
    return pm.batch_gradient(chunk)


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


def default_rho(kind: str, norm: str, adaptive: bool) -> float:
    """The smallest radius of Andriushchenko et al.'s CIFAR-10 ResNet grid for this measure.

    From the authors' evaluation script (tml-epfl/sharpness-vs-generalization,
    sh/eval_sharpness_final.sh), which sweeps four radii per measure: worst case ℓ∞
    {5e-4, 1e-3, 2e-3, 4e-3} (standard) and {1e-3, 2e-3, 4e-3, 8e-3} (adaptive), worst case
    ℓ2 {0.25, 0.5, 1, 2}; average case ℓ2 {0.05, 0.1, 0.2, 0.4}, average case ℓ∞
    {0.1, 0.2, 0.4, 0.8} (both standard and adaptive). Average-case radii are orders of
    magnitude larger than worst-case ones: at a worst-case radius random noise barely moves
    the loss and the estimate is noise.
    """
    if kind == "worst":
        return {("linf", True): 1e-3, ("linf", False): 5e-4}.get((norm, adaptive), 0.25)
    return 0.05 if norm == "l2" else 0.1


def adaptive_sharpness(
    model: nn.Module,
    batches: Sequence[Batch] | Batch,
    rho: float | None = None,
    norm: str = "linf",
    adaptive: bool = True,
    m: int = 128,
    steps: int = 20,
    seed: int = 0,
    loss_fn: LossFn = cross_entropy,
    bn_mode: str = "eval",
    bn_data: Iterable[Batch] | None = None,
    bn_batch: int | None = None,
    progress: bool = False,
) -> AdaptiveSharpnessResult:
    """Andriushchenko et al. 2023 worst-case (adaptive) m-sharpness.

    The probe set's examples are re-cut, in order, into chunks of `m` (the last may be
    shorter; with bn_mode="batch" each chunk is normalized in BN groups of bn_batch within
    it, or as one group without bn_batch). For each chunk,
    max_{||delta / c||_p <= rho} L_chunk(w + delta) - L_chunk(w) with c = |w| (adaptive;
    delta = 0 where w = 0) or c = 1, solved in u = delta / c by `steps` steps of APGD-style
    ascent from u = 0 (see `_worst_case_chunk`), keeping the worst loss seen. `sharpness` is
    the mean of the per-chunk maxima weighted by chunk size (the plain mean when m divides
    the probe set); `stderr` is their sample std / sqrt(chunks) (data sampling: the ascent
    is deterministic, `seed` is only recorded). `rho=None` takes `default_rho`.
    `evaluations` count passes over one chunk.

    Where this differs from the authors' code (sharpness.py, eval_APGD_sharpness): the ascent
    runs in u = delta / c, so the ℓ2 step is c⊙g / ||c⊙g|| and the projection is the exact
    Euclidean one onto the ball in u (theirs steps by c⊙g / ||g|| and projects onto the
    ellipsoid by a bisection on a Lagrange multiplier, to 1e-5); the momentum is Croce &
    Hein's APGD update u_{k+1} = P(u_k + a(z - u_k) + (1 - a)(u_k - u_{k-1})), a = 1 on the
    first step (theirs mixes 0.75 z + 0.25 u_{k-1} from the first step on); at a step-size
    reduction the iterate, its momentum and its gradient restart from the best point (theirs
    reloads the best weights but keeps the current perturbation and momentum); each step
    takes one pass (the loss and gradient at the new point together; theirs two); chunks
    are weighted by size (theirs: equal weights, with n divisible by m enforced).
    """
    norm = check_choice(norm, "norm", NORMS)
    rho_rule = "given" if rho is not None else "default_rho"
    rho = default_rho("worst", norm, adaptive) if rho is None else rho
    check_positive(spelling="argument", rho=rho)
    rho = float(rho)
    m = check_count("m", m)
    steps = check_count("steps", steps)
    pm = ProbeModel(model, batches, loss_fn=loss_fn, bn_mode=bn_mode, bn_data=bn_data, bn_batch=bn_batch)
    w = pm.get_vector()
    c = _scale(w, adaptive)
    try:
        chunks = regroup(pm.batches, m)
        per_chunk, losses, sizes = [], [], []
        for chunk in progress_bar(chunks, desc="adaptive sharpness", enabled=progress, leave=False):
            f0, increase = _worst_case_chunk(pm, chunk, w, c, rho, norm, steps)
            per_chunk.append(increase)
            losses.append(f0)
            sizes.append(len(chunk[1]))
        sharpness = float(np.average(per_chunk, weights=sizes))
        count = len(per_chunk)
        stderr = float(np.std(per_chunk, ddof=1) / math.sqrt(count)) if count >= 2 else None
        return AdaptiveSharpnessResult(
            sharpness=sharpness,
            stderr=stderr,
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
                rho_rule=rho_rule,
                norm=norm,
                adaptive=adaptive,
                m=m,
                steps=steps,
                momentum=APGD_MOMENTUM,
                initial_step=2 * rho,
                min_update_ratio=APGD_MIN_UPDATE_RATIO,
                checkpoints=sorted(apgd_checkpoints(steps)),
                evaluation_unit="one chunk of m examples",
                uncertainty="sample std of the per-chunk maxima / sqrt(chunks)",
            ),
        )
    finally:
        pm.set_vector(w)


def average_sharpness(
    model: nn.Module,
    batches: Sequence[Batch] | Batch,
    rho: float | None = None,
    n_draws: int = 20,
    adaptive: bool = True,
    seed: int = 0,
    loss_fn: LossFn = cross_entropy,
    bn_mode: str = "eval",
    norm: str = "l2",
    bn_data: Iterable[Batch] | None = None,
    bn_batch: int | None = None,
    progress: bool = False,
) -> AverageSharpnessResult:
    """Andriushchenko et al. 2023 average-case (adaptive) sharpness over the whole probe set.

    `sharpness` = mean over `n_draws` draws of L(w + delta) - L(w), with delta = rho c ⊙ xi,
    c = |w| (adaptive) or 1, and xi i.i.d. standard normal (norm="l2", the paper's Gaussian
    case: delta ~ N(0, rho² c²)) or uniform in [-1, 1] (norm="linf"). The noise is drawn on
    the CPU from a generator seeded with `seed`, so a seed gives the same draws on every
    device. `stderr` is the sample standard deviation over draws / sqrt(n_draws).
    `rho=None` takes `default_rho` (0.05 for ℓ2: 100 times the worst-case ℓ∞ default).
    Unlike the authors' code, which draws 20 perturbations per batch of 128 and averages
    over batches, each draw here perturbs the loss over the whole probe set (the same
    expectation, one shared draw for all examples).
    """
    norm = check_choice(norm, "norm", NORMS)
    rho_rule = "given" if rho is not None else "default_rho"
    rho = default_rho("average", norm, adaptive) if rho is None else rho
    check_positive(spelling="argument", rho=rho)
    rho = float(rho)
    n_draws = check_count("n_draws", n_draws, minimum=2)
    pm = ProbeModel(model, batches, loss_fn=loss_fn, bn_mode=bn_mode, bn_data=bn_data, bn_batch=bn_batch)
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
                rho_rule=rho_rule,
                n_draws=n_draws,
                adaptive=adaptive,
                norm=norm,
                noise="normal" if norm == "l2" else "uniform in [-1, 1]",
                uncertainty="standard error over the noise draws",
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
    "default_rho",
    "epsilon_sharpness",
]
