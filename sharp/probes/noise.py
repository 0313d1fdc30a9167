"""Gradient noise scale B_simple = tr(Σ)/|G|² (McCandlish et al. 2018, "An Empirical Model of
Large-Batch Training", Appendix A), from pairs of batch sizes at the same parameters.

The mean-loss gradient G_B of a batch of B examples drawn from a pool of N examples has
E|G_B|² = |G|² + c(B) tr(Σ), where G is the pool's mean gradient, Σ the (population)
covariance of the per-example gradients, and

    c(B) = 1/B                        for examples drawn independently (with replacement),
    c(B) = (N − B) / (B (N − 1))      for B distinct examples (without replacement).

The second is the finite-population correction: a batch drawn without replacement from a
pool it nearly exhausts is much less noisy than 1/B says (B = N gives G exactly). Two batch
sizes give two equations in |G|² and tr(Σ):

    tr(Σ)_est = (|G_small|² − |G_big|²) / (c_small − c_big)
    |G|²_est  = (c_small |G_big|² − c_big |G_small|²) / (c_small − c_big)

which for c(B) = 1/B are the paper's S_est and |G|²_est. Both are linear in the squared norms,
so averaging the squared norms over many draws and then solving is the same as averaging
the single-draw estimates; B_simple is the ratio of the two averages, never the average of
per-draw ratios (a ratio of noisy estimates is biased).

`gradient_noise_scale` does this offline on a probe set; `OnlineNoiseScale` does it during
training with gradient accumulation, where the micro-batch gradients are the small ones and
the accumulated window gradient the big one, at the same parameters.

What the numbers refer to: the per-example gradients of the model as evaluated (BN in eval
mode by default). With BN using batch statistics (`bn_mode="batch"` here, or the trainer's
ghost BN) a per-example gradient is not defined on its own; the estimates then describe the
batch gradients as computed, with the batch-statistics effect folded in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from sharp.errors import SharpError
from sharp.gradients import flat_grad
from sharp.probes.common import (
    Batch,
    ExamplePool,
    LossFn,
    ProbeModel,
    ProbeResult,
    TensorPool,
    check_count,
    cross_entropy,
)
from sharp.probes.hessian import HessianOperator
from sharp.progress import progress_bar


def noise_coefficient(size: int, population: int | None) -> float:
    """c(B) in E|G_B|² = |G|² + c(B) tr(Σ): 1/B, or (N − B)/(B(N − 1)) without replacement."""
    if population is None:
        return 1.0 / size
    return (population - size) / (size * (population - 1))


def two_batch_estimate(g2_small: float, c_small: float, g2_big: float, c_big: float) -> tuple[float, float]:
    """(|G|², tr Σ) solving E|G_B|² = |G|² + c(B) tr(Σ) for the two batch sizes."""
    gap = c_small - c_big
    return (c_small * g2_big - c_big * g2_small) / gap, (g2_small - g2_big) / gap


@dataclass(kw_only=True)
class NoiseScaleResult(ProbeResult):
    """B_simple = tr(Σ)/|G|² and its parts, from `n_pairs` draws of a small and a big batch."""

    kind: ClassVar[str] = "noise_scale"
    b_simple: float | None = None  # None when the |G|² estimate is not positive (take more pairs)
    b_simple_stderr: float | None = None  # delta-method standard error over the pairs
    b_simple_repeats: list[float | None] = field(default_factory=list)  # one estimate per block of draws
    b_simple_mean: float | None = None  # mean of b_simple_repeats
    b_simple_std: float | None = None  # sample std of b_simple_repeats
    population: int = 0  # N, the examples of the pool the batches are drawn from
    pool: str = "probe set"  # what the pool is ("training split", "probe set", ...)
    g2: float = math.nan  # |G|² estimate
    trace_sigma: float = math.nan  # tr(Σ) estimate (population covariance of the pool)
    b_small: int = 0
    b_big: int = 0
    n_pairs: int = 0
    replacement: bool = False
    g2_small_mean: float = math.nan  # mean over draws of |G_small|²
    g2_big_mean: float = math.nan  # mean over draws of |G_big|²
    c_small: float = math.nan  # c(b_small) used in the estimator
    c_big: float = math.nan
    gradient_examples: int = 0  # examples forwarded and backpropagated in all
    # B_noise = tr(HΣ)/(GᵀHG), H the Hessian of the probe set mean loss (estimate_b_noise=True)
    b_noise: float | None = None
    ghg: float | None = None  # GᵀHG estimate
    trace_h_sigma: float | None = None  # tr(HΣ) estimate


def _squared_norm(vector: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(vector, dtype=torch.float64).square()


def gradient_noise_scale(
    model: nn.Module,
    batches: Iterable[Batch],
    b_small: int,
    b_big: int,
    n_pairs: int = 100,
    seed: int = 0,
    loss_fn: LossFn = cross_entropy,
    bn_mode: str = "eval",
    replacement: bool = False,
    estimate_b_noise: bool = False,
    repeats: int = 5,
    pool: ExamplePool | None = None,
    pool_name: str | None = None,
    bn_data: Iterable[Batch] | None = None,
    bn_batch: int | None = None,
    progress: bool = False,
) -> NoiseScaleResult:
    """The simple noise scale B_simple = tr(Σ)/|G|² of a pool of examples at the model's parameters.

    McCandlish et al. 2018, Appendix A. The pool is `pool` (any `ExamplePool`, e.g. a run's
    whole training split: then G and Σ are the training set's own) or, without one, the
    probe set `batches`. Each of `n_pairs` draws takes a batch of `b_small` and a disjoint
    batch of `b_big` examples (one seeded permutation per draw, so no example repeats in a
    draw) and computes their mean-loss gradients. Drawing without replacement lowers
    E|G_B|² by the finite-population correction (N − B)/(N − 1) on the noise term, N the pool
    size (`population`), which the estimator applies exactly (see the module docstring), so
    the results are the pool's own |G|² and population tr(Σ) even when b_big is close to N.
    `replacement=True` draws every example independently instead (repeats allowed,
    c(B) = 1/B): the same targets.

    `b_simple` is the ratio of the estimates over all draws, with `b_simple_stderr` its
    delta-method standard error; the draws are also cut into `repeats` consecutive blocks,
    each giving its own estimate: `b_simple_mean` ± `b_simple_std` over those blocks is the
    spread of an estimate from n_pairs / repeats draws.

    With `estimate_b_noise=True` the same draws also give B_noise = tr(HΣ)/(GᵀHG), H the
    Hessian of the probe set's mean loss (`HessianOperator`): E[G_Bᵀ H G_B] = GᵀHG +
    c(B) tr(HΣ), so the quadratic forms take the place of the squared norms (two HVPs per draw).

    In the eval modes the drawn batches are run in pieces no larger than the largest probe
    batch (exact); with bn_mode="batch" each drawn batch is normalized in BN groups of
    bn_batch (or as one group without it).
    """
    if not (isinstance(b_small, int) and isinstance(b_big, int) and 1 <= b_small < b_big):
        raise SharpError(f"b_small {b_small} and b_big {b_big}: need whole numbers 1 <= b_small < b_big")
    if not (isinstance(n_pairs, int) and n_pairs >= 1):
        raise SharpError(f"n_pairs {n_pairs} must be a positive whole number")
    repeats = check_count("repeats", repeats, minimum=2)
    if n_pairs < repeats:
        raise SharpError(f"n_pairs {n_pairs} is fewer than repeats {repeats}: give n_pairs >= repeats")
    pm = ProbeModel(model, batches, loss_fn, bn_mode, bn_data=bn_data, bn_batch=bn_batch)
    source = pool if pool is not None else TensorPool.of(pm.batches)
    n = len(source)
    if not replacement and b_small + b_big > n:
        raise SharpError(
            f"b_small + b_big = {b_small + b_big} exceeds the {n} examples of the pool: lower b_big, "
            "give a larger pool, or pass replacement=True"
        )
    population = None if replacement else n
    c_small, c_big = noise_coefficient(b_small, population), noise_coefficient(b_big, population)
    gen = torch.Generator().manual_seed(seed)
    hessian = HessianOperator(pm) if estimate_b_noise else None

    def gradient(index: torch.Tensor) -> torch.Tensor:
        inputs, targets = source.take(index)
        inputs = inputs.to(device=pm.device, dtype=pm.dtype) if inputs.is_floating_point() else inputs
        return pm.batch_gradient((inputs.to(pm.device), targets.to(pm.device)))[1]

    small, big, q_small, q_big = [], [], [], []
    for _ in progress_bar(range(n_pairs), desc="noise scale", enabled=progress, leave=False):
        if replacement:
            index = torch.randint(0, n, (b_small + b_big,), generator=gen)
        else:
            index = torch.randperm(n, generator=gen)[: b_small + b_big]
        g_small, g_big = gradient(index[:b_small]), gradient(index[b_small:])
        small.append(_squared_norm(g_small))
        big.append(_squared_norm(g_big))
        if hessian is not None:
            q_small.append(hessian.quadratic_form(g_small))
            q_big.append(hessian.quadratic_form(g_big))
    small_norms = torch.stack(small).tolist()  # one device sync for all draws
    big_norms = torch.stack(big).tolist()

    g2_small_mean, g2_big_mean = _mean(small_norms), _mean(big_norms)
    g2, trace_sigma = two_batch_estimate(g2_small_mean, c_small, g2_big_mean, c_big)
    blocks = []
    for block in np.array_split(np.arange(n_pairs), repeats):
        block_g2, block_trace = two_batch_estimate(
            _mean([small_norms[i] for i in block]), c_small, _mean([big_norms[i] for i in block]), c_big
        )
        blocks.append(block_trace / block_g2 if block_g2 > 0 else None)
    valid = [b for b in blocks if b is not None]
    fields: dict[str, Any] = {}
    if hessian is not None:
        ghg, trace_h_sigma = two_batch_estimate(_mean(q_small), c_small, _mean(q_big), c_big)
        fields = {
            "ghg": ghg,
            "trace_h_sigma": trace_h_sigma,
            "b_noise": trace_h_sigma / ghg if ghg > 0 else None,
        }
    return NoiseScaleResult(
        **pm.result_fields(
            seed=seed,
            iterations=n_pairs,
            b_small=b_small,
            b_big=b_big,
            n_pairs=n_pairs,
            replacement=replacement,
            estimate_b_noise=estimate_b_noise,
            repeats=repeats,
            uncertainty="b_simple_stderr: delta method over the draws; b_simple_std: sample std of the "
            "estimates of `repeats` blocks of draws",
        ),
        b_simple=trace_sigma / g2 if g2 > 0 else None,
        b_simple_stderr=_ratio_stderr(small_norms, big_norms, c_small, c_big) if g2 > 0 else None,
        b_simple_repeats=blocks,
        b_simple_mean=float(np.mean(valid)) if valid else None,
        b_simple_std=float(np.std(valid, ddof=1)) if len(valid) >= 2 else None,
        g2=g2,
        trace_sigma=trace_sigma,
        b_small=b_small,
        b_big=b_big,
        n_pairs=n_pairs,
        replacement=replacement,
        population=n,
        pool=pool_name or ("probe set" if pool is None else "given pool"),
        g2_small_mean=g2_small_mean,
        g2_big_mean=g2_big_mean,
        c_small=c_small,
        c_big=c_big,
        gradient_examples=n_pairs * (b_small + b_big),
        **fields,
    )


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _ratio_stderr(small: Sequence[float], big: Sequence[float], c_small: float, c_big: float) -> float | None:
    """Delta-method standard error of mean(S_i)/mean(G2_i) over the per-draw estimates."""
    n = len(small)
    if n < 2:
        return None
    per_draw = [two_batch_estimate(s, c_small, b, c_big) for s, b in zip(small, big, strict=True)]
    g2 = _mean([g for g, _ in per_draw])
    ratio = _mean([s for _, s in per_draw]) / g2
    residual = [s - ratio * g for g, s in per_draw]
    mean_residual = _mean(residual)
    variance = math.fsum((r - mean_residual) ** 2 for r in residual) / (n - 1)
    return math.sqrt(variance / n) / g2


class OnlineNoiseScale:
    """B_simple during training from gradient accumulation (McCandlish et al. 2018, App. A).

    Every optimizer step computes K micro-batch gradients and their accumulated window
    gradient at the same parameters. Per step: the small squared norm is the mean over the
    micro-batches of |g_k|², g_k micro-batch k's *mean-loss* gradient, recovered from the
    accumulated `.grad` before and after micro-batch k and multiplied by count/n_k to undo
    the accumulation's 1/count scaling; the big squared norm is |accumulated gradient|².
    Micro-batches of unequal size (a short last one) are handled exactly: the small side's
    coefficient is the mean of c(n_k) over the step's micro-batches, since
    E[mean_k |g_k|²] = |G|² + mean_k c(n_k) tr(Σ). A step with a single micro-batch carries
    no information and is skipped.

    The per-step estimates of |G|² and tr(Σ) (each unbiased at that step's parameters) are
    smoothed by two separate exponential moving averages (bias-corrected, as in Adam) and
    B_simple = EMA(tr Σ)/EMA(|G|²).

    `population` (the number of training examples N) applies the finite-population
    correction for windows drawn without replacement from one epoch's permutation, so the
    estimates refer to the training set's own |G|² and tr(Σ), like `gradient_noise_scale`;
    `None` treats examples as independent draws. With data augmentation the correction
    slightly overcorrects the augmentation part of the noise (fresh crops each epoch).

    Gradients are read from `.grad` within one step, before the optimizer step: of the loss
    only (weight decay lives in the optimizer), and the big gradient never spans two steps.
    They must be true gradients: under an fp16 GradScaler `.grad` holds scale × gradient,
    so divide the squared norms by scale² and feed them to `record` (a changing scale would
    otherwise bias even the ratio). `sharp`'s bf16 autocast uses no scaler.

    The averages live on the training device and are updated without reading anything back
    to the host (a skipped step is a `torch.where`), so the estimator adds no synchronisation
    to a step; the properties read them.

    Use: `begin_step(params, count)`, `after_backward(n_k)` after each micro-batch's
    backward, `end_step()` before `optimizer.step()`; or feed the norms to `record`. Across
    processes (DDP) each rank's micro-batches are small batches of the same step: sum
    `local_sums()` over the ranks and pass it with the all-reduced gradient's squared norm
    to `finish_step`.
    """

    def __init__(self, decay: float = 0.99, population: int | None = None) -> None:
        if not 0 <= decay < 1:
            raise SharpError(f"noise-scale decay {decay} must be in [0, 1)")
        if population is not None and population < 2:
            raise SharpError(f"noise-scale population {population} must be at least 2 examples")
        self.decay = decay
        self.population = population
        # [EMA |G|², EMA tr Σ, EMA of 1 (divides out the zero start), steps that updated them]
        self._values = torch.zeros(4, dtype=torch.float64)
        self._params: list[torch.Tensor] = []
        self._count = 0
        self._start: torch.Tensor | None = None
        self._previous: torch.Tensor | None = None
        self._small: list[torch.Tensor] = []
        self._coefficients: list[float] = []

    # --- results ---------------------------------------------------------------------------

    @property
    def steps(self) -> int:
        return int(self._values[3])

    @property
    def g2(self) -> float | None:
        """The smoothed |G|² estimate (None before the first step)."""
        ema_g2, _, weight, steps = self._values.tolist()
        return ema_g2 / weight if steps else None

    @property
    def trace_sigma(self) -> float | None:
        """The smoothed tr(Σ) estimate (None before the first step)."""
        _, ema_trace, weight, steps = self._values.tolist()
        return ema_trace / weight if steps else None

    @property
    def b_simple(self) -> float | None:
        """EMA(tr Σ)/EMA(|G|²); None before the first step or while EMA(|G|²) is not positive."""
        ema_g2, ema_trace, _, steps = self._values.tolist()
        if not steps or ema_g2 <= 0:
            return None
        return ema_trace / ema_g2

    # --- one optimizer step from the accumulated gradients -----------------------------------

    def begin_step(self, params: Iterable[torch.Tensor], count: int) -> None:
        """Call before the step's first backward; `count` examples in the whole window (all ranks)."""
        self._params = [p for p in params if p.requires_grad]
        self._count = count
        self._small, self._coefficients = [], []
        has_grad = any(p.grad is not None for p in self._params)
        self._start = flat_grad(self._params).clone() if has_grad else None
        self._previous = self._start

    def after_backward(self, size: int) -> None:
        """Call after the backward of a micro-batch of `size` examples (loss sum / count)."""
        current = flat_grad(self._params)
        delta = current if self._previous is None else current - self._previous
        # the micro-batch added (size/count) g_k: undo that before squaring
        self._small.append(_squared_norm(delta) * (self._count / size) ** 2)
        self._coefficients.append(noise_coefficient(size, self.population))
        self._previous = current

    def local_sums(self) -> torch.Tensor:
        """[Σ_k |g_k|², Σ_k c(n_k), K] over this process's micro-batches of the step (float64)."""
        device = self._small[0].device if self._small else self._values.device
        total = torch.stack(self._small).sum() if self._small else torch.zeros((), device=device)
        extra = torch.tensor([math.fsum(self._coefficients), len(self._coefficients)], dtype=torch.float64)
        return torch.cat([total.reshape(1).to(torch.float64), extra.to(device)])

    def window_gradient(self) -> torch.Tensor | None:
        """This process's accumulated gradient of the step (None if it ran no micro-batch)."""
        if self._previous is None:
            return None
        return self._previous if self._start is None else self._previous - self._start

    def finish_step(self, sums: torch.Tensor, big_sq_norm: torch.Tensor) -> torch.Tensor:
        """Update the averages from the step's (all-ranks) `local_sums` and |G_big|²; returns
        whether the step counted, as a device bool."""
        self._small, self._coefficients, self._start, self._previous = [], [], None, None
        sums = sums.to(torch.float64)
        count = sums[2]
        mean_small = sums[0] / count.clamp_min(1)
        c_small = sums[1] / count.clamp_min(1)
        c_big = noise_coefficient(self._count, self.population)
        return self._update(mean_small, c_small, big_sq_norm.to(torch.float64), c_big, count >= 2)

    def end_step(self) -> torch.Tensor:
        """Call after the last micro-batch (one process); updates the averages. A device bool:
        False if the step was skipped (one micro-batch)."""
        big = self.window_gradient()
        if big is None:
            self._small, self._coefficients = [], []
            return torch.zeros((), dtype=torch.bool)
        return self.finish_step(self.local_sums(), _squared_norm(big))

    def record(
        self, small_sq_norms: Sequence[float], small_sizes: Sequence[int], big_sq_norm: float, big_size: int
    ) -> bool:
        """One step's numbers: |g_k|² of each micro-batch's mean-loss gradient and their sizes,
        |G_big|² of the window's mean-loss gradient and its size. False if it carries no
        information (a single micro-batch)."""
        if len(small_sq_norms) != len(small_sizes):
            raise SharpError("record: give one size per micro-batch squared norm")
        if sum(small_sizes) != big_size:
            raise SharpError(f"record: micro-batches of {sum(small_sizes)} examples, window of {big_size}")
        c_small = _mean([noise_coefficient(n, self.population) for n in small_sizes])
        as_tensor = lambda v: torch.tensor(v, dtype=torch.float64, device=self._values.device)  # noqa: E731
        counted = self._update(
            as_tensor(_mean(small_sq_norms)),
            as_tensor(c_small),
            as_tensor(big_sq_norm),
            noise_coefficient(big_size, self.population),
            as_tensor(len(small_sizes) >= 2).bool(),
        )
        return bool(counted)

    def _update(
        self,
        mean_small: torch.Tensor,
        c_small: torch.Tensor,
        big: torch.Tensor,
        c_big: float,
        enough: torch.Tensor,
    ) -> torch.Tensor:
        values = self._values.to(mean_small.device)
        gap = c_small - c_big
        safe_gap = torch.where(gap > 0, gap, torch.ones_like(gap))
        g2 = (c_small * big - c_big * mean_small) / safe_gap  # two_batch_estimate, on the device
        trace_sigma = (mean_small - big) / safe_gap
        counted = enough & (gap > 0) & torch.isfinite(g2) & torch.isfinite(trace_sigma)
        d = self.decay
        one = torch.ones_like(g2)
        updated = torch.stack(
            [
                d * values[0] + (1 - d) * g2,
                d * values[1] + (1 - d) * trace_sigma,
                d * values[2] + (1 - d) * one,
                values[3] + one,
            ]
        )
        self._values = torch.where(counted, updated, values)
        return counted

    # --- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers (loadable with torch.load(weights_only=True))."""
        ema_g2, ema_trace, weight, steps = self._values.tolist()
        return {
            "decay": self.decay,
            "population": self.population,
            "ema_g2": ema_g2,
            "ema_trace_sigma": ema_trace,
            "weight": weight,
            "steps": int(steps),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.population = None if state["population"] is None else int(state["population"])
        values = [state["ema_g2"], state["ema_trace_sigma"], state["weight"], state["steps"]]
        self._values = torch.tensor([float(v) for v in values], dtype=torch.float64)


__all__ = [
    "NoiseScaleResult",
    "OnlineNoiseScale",
    "gradient_noise_scale",
    "noise_coefficient",
    "two_batch_estimate",
]
