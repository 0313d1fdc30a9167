"""Sharpness probes (Keskar et al. 2017; Andriushchenko et al. 2023) against closed forms and brute force.

The references are independent of the probes: a separable quadratic whose maximum over a box
is at a known corner, all 2^p corners of a subspace box enumerated, a loss linear in the
weights whose worst case over an l_inf / l_2 ball is known, and the expectation of a
quadratic under Gaussian or uniform noise.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F
from torch import nn

import sharp.probes.sharpness as sharpness_module
from sharp.errors import SharpError
from sharp.models import build_model
from sharp.probes.common import ProbeModel
from sharp.probes.sharpness import (
    RandomSubspace,
    adaptive_sharpness,
    apgd_checkpoints,
    average_sharpness,
    default_rho,
    epsilon_sharpness,
)

F64 = torch.float64


# --- test problems ------------------------------------------------------------------------


class Vector(nn.Module):
    """A model that is one parameter vector x; forward gives x - a_j for each input row a_j."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.x = nn.Parameter(x.clone())

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.x - inputs


class Quadratic:
    """f(x) = mean_j ½ Σ_i h_i (x_i - a_ji - c_i)² over a probe set of two unequal batches
    = ½ Σ h_i (x_i - c'_i)² + K with c' = c + mean_j a_j and K = ½ Σ h_i var_j(a_ji).

    Batches of 5 and 3 examples: a wrong batch weighting would move the minimum c'.
    """

    def __init__(self, n: int = 10, seed: int = 1, centered: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.n = n
        self.h = torch.rand(n, generator=g, dtype=F64) * 2 + 0.5
        self.c = torch.randn(n, generator=g, dtype=F64)
        a = torch.randn(8, n, generator=g, dtype=F64)
        self.a = a - a.mean(0) if centered else a
        self.batches = [(self.a[:5], torch.zeros(5)), (self.a[5:], torch.zeros(3))]
        self.center = self.c + self.a.mean(0)
        self.K = float(0.5 * (self.h * self.a.var(0, unbiased=False)).sum())
        self.x = torch.randn(n, generator=g, dtype=F64) * 2

    def loss_fn(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.h * (outputs - self.c) ** 2).sum(1).mean()

    def f(self, x: torch.Tensor) -> float:
        return float(0.5 * (self.h * (x - self.center) ** 2).sum()) + self.K

    def model(self, x: torch.Tensor | None = None) -> Vector:
        return Vector(self.x if x is None else x)


def keskar(fmax: float, f0: float) -> float:
    return (fmax - f0) / (1 + f0) * 100


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# --- epsilon-sharpness ---------------------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-3, 1e-2, 1e-1])
def test_full_space_matches_the_corner_of_the_box(eps):
    q = Quadratic()
    res = epsilon_sharpness(q.model(), q.batches, eps=eps, loss_fn=q.loss_fn)
    r = eps * (q.x.abs() + 1)
    corner = r * torch.sign(q.x - q.center)
    fmax = q.f(q.x + corner)
    f0 = q.f(q.x)
    assert rel(res.f0, f0) < 1e-12
    assert rel(res.fmax, fmax) < 1e-8
    assert rel(res.sharpness, keskar(fmax, f0)) < 1e-8
    assert res.start == "zero+random1"
    assert torch.allclose(res.perturbation, corner, rtol=1e-8, atol=0)
    assert res.n_at_bound == q.n and res.box_fraction_at_bound == 1.0  # q.n / q.n: exact
    assert res.box_maximum_reached  # the corner with the gradient pointing outward: provably the max
    assert res.perturbation_norm == pytest.approx(float(corner.norm()), rel=1e-8)
    assert res.n_params == q.n and res.subspace_dim is None and res.eps == eps
    # a separable quadratic is maximized at this corner from any start: both starts find it, so
    # their spread is rounding only (phi ~ 1e-2 .. 1e2, computed in float64)
    assert [r["start"] for r in res.starts] == ["zero", "random1"] and all(r["counts"] for r in res.starts)
    assert all(rel(r["fmax"], fmax) < 1e-8 for r in res.starts)
    assert res.sharpness_std < 1e-8 * res.sharpness
    assert res.sharpness_zero_start == pytest.approx(res.sharpness, rel=1e-8)
    # a provable box maximum ends a start before its 10 iterations
    assert all(r["box_maximum"] and r["iterations"] <= 10 for r in res.starts)
    assert res.lbfgs_iterations == sum(r["iterations"] for r in res.starts)
    assert res.lbfgs_evaluations == sum(r["evaluations"] for r in res.starts) >= res.lbfgs_iterations


@pytest.mark.parametrize("eps", [1e-3, 5e-2])
def test_at_the_minimum_the_random_start_finds_a_corner(eps):
    q = Quadratic(centered=True)  # mean_j a_j = 0 exactly, so c' = c and ∇f(c) = 0
    res = epsilon_sharpness(q.model(q.center), q.batches, eps=eps, loss_fn=q.loss_fn, random_starts=0)
    r = eps * (q.center.abs() + 1)
    fmax = q.f(q.center + r)  # any corner: f is even about c' per coordinate
    # the start at y = 0 sits at a stationary point: it does not count, and a random start is added
    assert res.start == "zero+random1" and [r["counts"] for r in res.starts] == [False, True]
    assert res.sharpness_zero_start == pytest.approx(0.0, abs=1e-12)
    assert res.sharpness_std is None  # one start counts: no spread to report
    assert "random1" in res.lbfgs_message
    assert rel(res.f0, q.K) < 1e-12
    assert rel(res.fmax, fmax) < 1e-8
    assert rel(res.sharpness, keskar(fmax, q.K)) < 1e-8
    assert torch.allclose(res.perturbation.abs(), r, rtol=1e-8, atol=0)


def test_subspace_matches_brute_force_over_the_corners():
    q = Quadratic(n=10, seed=3)
    p, eps = 4, 5e-2
    res = epsilon_sharpness(q.model(), q.batches, eps=eps, subspace_dim=p, maxiter=50, loss_fn=q.loss_fn)
    # independent reference: A = pinv(A⁺) by SVD, the box from A⁺x, all 2^p corners
    pinv = RandomSubspace(q.n, p, seed=0).pinv_matrix.numpy()
    a_ref = np.linalg.pinv(pinv)
    r = eps * (np.abs(pinv @ q.x.numpy()) + 1)
    corners = [np.array(s) * r for s in itertools.product([-1.0, 1.0], repeat=p)]
    fmax = max(q.f(q.x + torch.from_numpy(a_ref @ y)) for y in corners)
    assert rel(res.fmax, fmax) < 1e-8
    assert rel(res.sharpness, keskar(fmax, q.f(q.x))) < 1e-8
    assert np.allclose(res.bounds, r, rtol=1e-12)
    assert res.subspace_dim == p and res.y.shape == (p,)
    assert torch.allclose(res.perturbation, torch.from_numpy(a_ref @ res.y), rtol=1e-8, atol=1e-12)


def test_random_subspace_is_a_pseudo_inverse_pair_and_seeded():
    sub = RandomSubspace(12, 3, seed=5)
    pinv, a = sub.pinv_matrix.numpy(), sub.dense()
    assert np.allclose(pinv @ a, np.eye(3), atol=1e-12)  # A⁺A = I_p
    assert np.allclose(a, np.linalg.pinv(pinv), atol=1e-12)
    assert np.allclose(np.linalg.norm(pinv, axis=1), 1.0)
    assert np.abs(pinv).max() <= 1.0
    assert np.array_equal(pinv, RandomSubspace(12, 3, seed=5).pinv_matrix.numpy())
    assert not np.allclose(pinv, RandomSubspace(12, 3, seed=6).pinv_matrix.numpy())
    q = Quadratic(n=12)
    runs = [
        epsilon_sharpness(q.model(), q.batches, eps=1e-2, subspace_dim=3, seed=s, loss_fn=q.loss_fn)
        for s in (7, 7, 8)
    ]
    # the same seed repeats the same computation: bit-for-bit equal is the claim
    assert runs[0].fmax == runs[1].fmax and np.array_equal(runs[0].y, runs[1].y)
    assert runs[0].fmax != runs[2].fmax


def test_the_perturbation_respects_the_box_and_sharpness_grows_with_eps():
    q = Quadratic(n=16, seed=4)
    previous = -1.0
    for eps in [1e-3, 5e-3, 2e-2, 1e-1, 3e-1]:
        for subspace_dim in (None, 3):
            res = epsilon_sharpness(
                q.model(), q.batches, eps=eps, subspace_dim=subspace_dim, loss_fn=q.loss_fn
            )
            assert np.all(np.abs(res.y) <= res.bounds * (1 + 1e-12))
        res = epsilon_sharpness(q.model(), q.batches, eps=eps, loss_fn=q.loss_fn)
        assert np.all(np.abs(res.perturbation.numpy()) <= eps * (np.abs(q.x.numpy()) + 1) * (1 + 1e-12))
        assert res.sharpness >= previous
        previous = res.sharpness


def _failing_loss(q: Quadratic, fail_at: int):
    calls = {"n": 0}

    def loss_fn(outputs, targets):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError("loss failed on purpose")
        return q.loss_fn(outputs, targets)

    return loss_fn


class RecordingProbeModel(ProbeModel):
    made: list[ProbeModel] = []  # noqa: RUF012

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        RecordingProbeModel.made.append(self)


@pytest.mark.parametrize(
    "probe",
    [
        lambda m, b, f: epsilon_sharpness(m, b, eps=0.1, loss_fn=f),
        lambda m, b, f: epsilon_sharpness(m, b, eps=0.1, subspace_dim=3, loss_fn=f),
        lambda m, b, f: adaptive_sharpness(m, b, rho=0.1, m=4, loss_fn=f),
        lambda m, b, f: average_sharpness(m, b, rho=0.1, loss_fn=f),
    ],
)
@pytest.mark.parametrize("fail_at", [None, 3])
def test_models_are_unchanged_and_restored_even_on_error(monkeypatch, probe, fail_at):
    q = Quadratic()
    model = q.model()
    before = model.x.detach().clone()
    monkeypatch.setattr(sharpness_module, "ProbeModel", RecordingProbeModel)
    RecordingProbeModel.made.clear()
    if fail_at is None:
        probe(model, q.batches, q.loss_fn)
    else:
        with pytest.raises(RuntimeError, match="on purpose"):
            probe(model, q.batches, _failing_loss(q, fail_at))
    assert torch.equal(model.x.detach(), before)
    (work,) = RecordingProbeModel.made
    assert torch.equal(work.get_vector(), before)  # the working copy is back at x


def test_runs_on_a_small_real_net():
    torch.manual_seed(0)
    model = build_model("mlp", 1, 3, image_size=4).to(F64)
    batches = [(torch.randn(24, 1, 4, 4, dtype=F64), torch.randint(0, 3, (24,))) for _ in range(2)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = epsilon_sharpness(model, batches, eps=1e-3)
    # independent check: the loss at x + A y* recomputed by a plain forward of a hand-perturbed copy
    x = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    ref = build_model("mlp", 1, 3, image_size=4).to(F64).eval()

    def loss_at(vector):
        torch.nn.utils.vector_to_parameters(vector.clone(), ref.parameters())
        with torch.no_grad():
            return float(sum(F.cross_entropy(ref(a), b) * len(b) for a, b in batches) / 48)

    assert res.fmax == pytest.approx(loss_at(x + res.perturbation), rel=1e-12)  # same weights, float64
    assert res.f0 == pytest.approx(loss_at(x), rel=1e-12)
    assert res.lbfgs_iterations == 10 * len(res.starts)  # no early stop: the full budget per start
    assert res.evaluations["grad"] >= res.lbfgs_iterations
    sub = epsilon_sharpness(model, batches, eps=1e-3, subspace_dim=5)
    assert sub.fmax == pytest.approx(loss_at(x + sub.perturbation), rel=1e-12)
    data = json.loads(res.to_json())
    assert data["probe"] == "epsilon_sharpness" and "perturbation" not in data and "y" not in data
    assert data["settings"]["eps"] == 1e-3 and data["dtype"] == "float64"
    assert data["settings"]["lbfgs_options"] == {"ftol": 0.0, "gtol": 0.0, "maxfun": 100_000, "maxls": 20}
    assert {"lbfgs_evaluations", "n_at_bound", "box_maximum_reached", "sharpness_std"} <= set(data)
    assert data["torch_flags"]["tf32_matmul"] is False and data["loss_fn"] == "cross_entropy"
    worst = adaptive_sharpness(model, batches, rho=0.05, m=16)
    average = average_sharpness(model, batches, rho=0.05, n_draws=5)
    assert len(worst.per_batch) == 3 and worst.chunk_sizes == [16, 16, 16]
    # stderr over chunks: the sample std of the three chunk maxima / sqrt(3), recomputed here
    assert worst.stderr == pytest.approx(np.std(worst.per_batch, ddof=1) / np.sqrt(3), rel=1e-12)
    assert average.stderr == pytest.approx(np.std(average.per_draw, ddof=1) / np.sqrt(5), rel=1e-12)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_default_radii_are_the_papers_and_recorded():
    q = Quadratic()
    worst = adaptive_sharpness(q.model(), q.batches, m=8, steps=2, loss_fn=q.loss_fn)
    average = average_sharpness(q.model(), q.batches, n_draws=2, loss_fn=q.loss_fn)
    # the smallest radius of each of the authors' CIFAR-10 ResNet grids (sh/eval_sharpness_final.sh)
    assert (worst.rho, worst.settings["rho_rule"]) == (1e-3, "default_rho")
    assert (average.rho, average.settings["rho_rule"]) == (0.05, "default_rho")
    assert default_rho("worst", "linf", False) == 5e-4 and default_rho("worst", "l2", True) == 0.25
    assert default_rho("average", "linf", True) == 0.1
    given = adaptive_sharpness(q.model(), q.batches, rho=0.01, m=8, steps=2, loss_fn=q.loss_fn)
    assert (given.rho, given.settings["rho_rule"]) == (0.01, "given")


def test_bad_arguments_raise_sharp_error():
    q = Quadratic()
    with pytest.raises(SharpError, match="eps"):
        epsilon_sharpness(q.model(), q.batches, eps=0.0, loss_fn=q.loss_fn)
    with pytest.raises(SharpError, match="subspace_dim"):
        epsilon_sharpness(q.model(), q.batches, subspace_dim=q.n + 1, loss_fn=q.loss_fn)
    with pytest.raises(SharpError, match="maxiter"):
        epsilon_sharpness(q.model(), q.batches, maxiter=0, loss_fn=q.loss_fn)
    with pytest.raises(SharpError, match="norm"):
        adaptive_sharpness(q.model(), q.batches, rho=0.1, norm="l1", loss_fn=q.loss_fn)
    with pytest.raises(SharpError, match="rho"):
        adaptive_sharpness(q.model(), q.batches, rho=-1.0, loss_fn=q.loss_fn)
    with pytest.raises(SharpError, match="m="):
        adaptive_sharpness(q.model(), q.batches, rho=0.1, m=0, loss_fn=q.loss_fn)
    with pytest.raises(SharpError, match="n_draws"):
        average_sharpness(q.model(), q.batches, rho=0.1, n_draws=1, loss_fn=q.loss_fn)


# --- adaptive worst-case sharpness ---------------------------------------------------------


class Linear(nn.Module):
    """L(w) = mean_j a_jᵀ w: a loss linear in the weights, with gradient the chunk's mean a_j."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs @ self.w


def mean_output(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return outputs.mean()


def linear_problem(n: int = 12, sizes=(7, 5, 4), seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g, dtype=F64)
    w[[2, 7]] = 0.0  # zero weights: an adaptive perturbation may not move them
    a = torch.randn(sum(sizes), n, generator=g, dtype=F64) + 0.3
    batches = [(x, torch.zeros(len(x))) for x in a.split(list(sizes))]
    return w, a, batches


def linear_worst_case(grad: torch.Tensor, c: torch.Tensor, rho: float, norm: str) -> float:
    scaled = grad * c
    return float(rho * (scaled.abs().sum() if norm == "linf" else scaled.norm()))


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("adaptive", [True, False])
def test_worst_case_of_a_linear_loss_matches_the_dual_norm(norm, adaptive):
    w, a, batches = linear_problem()
    rho = 0.05
    res = adaptive_sharpness(
        Linear(w), batches, rho=rho, norm=norm, adaptive=adaptive, m=len(a), loss_fn=mean_output
    )
    c = w.abs() if adaptive else torch.ones_like(w)
    expected = linear_worst_case(a.mean(0), c, rho, norm)
    assert rel(res.sharpness, expected) < 1e-6
    # one chunk: the size-weighted mean of one value, x·n/n, may round by an ulp
    assert res.per_batch == [pytest.approx(res.sharpness, rel=1e-15)] and res.chunk_sizes == [len(a)]
    assert (res.rho, res.norm, res.adaptive, res.m, res.steps) == (rho, norm, adaptive, len(a), 20)
    assert res.evaluations == {"grad": 20, "loss": 1}


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_m_sharpness_cuts_the_probe_set_into_chunks(norm):
    w, a, batches = linear_problem()  # batches 7, 5, 4; chunks of 6 cross their borders
    rho, m = 0.02, 6
    res = adaptive_sharpness(Linear(w), batches, rho=rho, norm=norm, m=m, loss_fn=mean_output)
    chunks = a.split(m)
    assert res.chunk_sizes == [6, 6, 4]
    for value, chunk in zip(res.per_batch, chunks, strict=True):
        assert rel(value, linear_worst_case(chunk.mean(0), w.abs(), rho, norm)) < 1e-6
    assert res.chunk_losses == pytest.approx([float(chunk.mean(0) @ w) for chunk in chunks], rel=1e-12)
    assert rel(res.sharpness, np.average(res.per_batch, weights=[6, 6, 4])) < 1e-12


def test_worst_case_of_a_quadratic_is_the_corner_of_the_linf_ball():
    q = Quadratic(n=8, seed=6)
    rho = 0.03
    res = adaptive_sharpness(
        q.model(), q.batches, rho=rho, norm="linf", adaptive=True, m=8, loss_fn=q.loss_fn
    )
    delta = rho * q.x.abs() * torch.sign(q.x - q.center)
    assert rel(res.sharpness, q.f(q.x + delta) - q.f(q.x)) < 1e-8


@pytest.mark.parametrize("rho", [0.03, 1.0])
def test_worst_case_of_a_quadratic_over_the_l2_ball_solves_the_trust_region_problem(rho):
    q = Quadratic(n=8, seed=7)
    res = adaptive_sharpness(q.model(), q.batches, rho=rho, norm="l2", m=8, loss_fn=q.loss_fn)
    # reference: max ½uᵀQu + bᵀu over ||u|| <= rho (u = δ/|x|) is on the sphere, at
    # u = (λI - Q)⁻¹ b with λ > max Q chosen by root finding so that ||u|| = rho
    c, h, d = q.x.abs().numpy(), q.h.numpy(), (q.x - q.center).numpy()
    quad, lin = c * h * c, c * h * d

    def u_of(lam):
        return lin / (lam - quad)

    top = quad.max()
    lam = scipy.optimize.brentq(
        lambda lam: np.linalg.norm(u_of(lam)) - rho, top + 1e-9, top + np.abs(lin).sum() / rho + 1, xtol=1e-14
    )
    u = u_of(lam)
    exact = 0.5 * (u * quad * u).sum() + (lin * u).sum()
    assert rel(res.sharpness, exact) < 1e-8


def test_apgd_checkpoints_follow_croce_and_hein():
    assert sorted(apgd_checkpoints(20)) == [5, 9, 12, 14, 16, 18, 19, 20]
    assert sorted(apgd_checkpoints(100)) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert max(apgd_checkpoints(3)) <= 3


# --- average-case sharpness ----------------------------------------------------------------


@pytest.mark.parametrize(("norm", "variance"), [("l2", 1.0), ("linf", 1 / 3)])
@pytest.mark.parametrize("adaptive", [True, False])
def test_average_sharpness_of_a_quadratic_matches_its_expectation(norm, variance, adaptive):
    q = Quadratic()
    # near the minimum, so that the linear term (mean zero) does not swamp the curvature term
    q.x = q.center + 0.05 * torch.randn(q.n, generator=torch.Generator().manual_seed(9), dtype=F64)
    rho = 0.1
    res = average_sharpness(
        q.model(), q.batches, rho=rho, n_draws=400, adaptive=adaptive, norm=norm, loss_fn=q.loss_fn
    )
    c = q.x.abs() if adaptive else torch.ones_like(q.x)
    expected = 0.5 * rho**2 * variance * float((q.h * c**2).sum())  # E[f(x+δ) - f(x)], δ_i of variance ρ²c²v
    assert abs(res.sharpness - expected) < 4 * res.stderr
    assert res.stderr < 0.2 * expected  # enough draws for the check to mean something
    assert rel(res.f0, q.f(q.x)) < 1e-12
    assert res.evaluations == {"loss": 401} and len(res.per_draw) == 400
    again = average_sharpness(
        q.model(), q.batches, rho=rho, n_draws=400, adaptive=adaptive, norm=norm, loss_fn=q.loss_fn
    )
    assert again.per_draw == res.per_draw  # same seed, same draws: bit-for-bit is the claim


# --- epsilon-sharpness next to a minimum ---------------------------------------------------


class LogisticRegression:
    """Multinomial logistic regression in float64 (40 examples, 3 features, 3 classes: 12
    parameters), driven to its minimum by Newton's method.

    Cross-entropy is convex in the weights, so its maximum over a box is at one of the box's
    2^12 vertices: enumerating them gives the exact maximum, an independent reference.
    """

    n, d, k = 40, 3, 3

    def __init__(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(self.n, self.d, generator=gen, dtype=F64)
        self.y = torch.randint(0, self.k, (self.n,), generator=gen)
        self.direction = torch.randn(self.k * self.d + self.k, generator=gen, dtype=F64)
        w = torch.zeros(self.k * self.d + self.k, dtype=F64)
        for _ in range(40):  # Newton steps (least squares: softmax makes H singular along shifts)
            step = torch.linalg.lstsq(torch.autograd.functional.hessian(self.loss, w), self.grad(w)[:, None])
            w = w - step.solution[:, 0]
        self.minimum = w
        self.corners = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=len(w))), dtype=F64)

    def loss(self, w: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy at w, or at each row of a batch of weight vectors."""
        weight, bias = w[..., : self.k * self.d].unflatten(-1, (self.k, self.d)), w[..., self.k * self.d :]
        logits = torch.einsum("...kd,nd->...nk", weight, self.x) + bias[..., None, :]
        log_p = logits.log_softmax(-1).gather(-1, self.y.expand(*logits.shape[:-1])[..., None])
        return -log_p[..., 0].mean(-1)

    def grad(self, w: torch.Tensor) -> torch.Tensor:
        w = w.clone().requires_grad_(True)
        return torch.autograd.grad(self.loss(w), w)[0]

    def at_gradient_norm(self, target: float) -> torch.Tensor:
        """The minimum moved along a seeded direction until ||∇f|| = target (to 1 %)."""
        if target == 0:
            return self.minimum.clone()
        h = torch.autograd.functional.hessian(self.loss, self.minimum)
        return self.minimum + target / float((h @ self.direction).norm()) * self.direction

    def exact_sharpness(self, w: torch.Tensor, eps: float) -> float:
        f0 = float(self.loss(w))
        fmax = float(self.loss(w + self.corners * eps * (w.abs() + 1)).max())
        return (fmax - f0) / (1 + f0) * 100

    def model(self, w: torch.Tensor) -> nn.Linear:
        model = nn.Linear(self.d, self.k).double()
        with torch.no_grad():
            model.weight.copy_(w[: self.k * self.d].view(self.k, self.d))
            model.bias.copy_(w[self.k * self.d :])
        return model


def test_epsilon_sharpness_does_not_collapse_next_to_a_minimum():
    problem = LogisticRegression()
    assert float(problem.grad(problem.minimum).norm()) < 1e-14  # Newton converged
    found = []
    for target in (0.0, 1e-7, 1e-6, 1e-5, 1e-4):
        w = problem.at_gradient_norm(target)
        assert float(problem.grad(w).norm()) == pytest.approx(target, rel=1e-2, abs=1e-14)
        res = epsilon_sharpness(problem.model(w), [(problem.x, problem.y)], eps=1e-3)
        exact = problem.exact_sharpness(w, 1e-3)
        # L-BFGS-B is a local method: on this problem it found 0.84-1.00 of the exact maximum
        # (at the exact minimum only the two random starts search; over ten seeds of this
        # problem they found 0.76-1.00). The bound is the 20 % the measurement must meet; with
        # scipy's default ftol the values here were 1e-9 to 1e-5 of the exact maximum.
        assert 0.8 * exact <= res.sharpness <= exact * (1 + 1e-9)
        # the iteration budget is spent unless a start proves it sits at a box maximum
        assert all(r["iterations"] == 10 or r["box_maximum"] or not r["counts"] for r in res.starts)
        found.append(res.sharpness)
    # no collapse between neighbouring gradient norms (the bug: orders of magnitude)
    assert all(0.5 < b / a < 2 for a, b in itertools.pairwise(found))
