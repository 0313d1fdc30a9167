"""Which sharpness measures survive a function-preserving reparametrization (Dinh et al. 2017,
"Sharp Minima Can Generalize For Deep Nets"), in float64.

References: the loss of the rescaled net computed directly; the top eigenvalue of the
rescaled net from the dense Hessian of the original, transformed by the known Jacobian of
the rescaling (H' = T⁻¹ H T⁻¹ for θ' = T θ, T diagonal), never by the probe itself.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharp.errors import SharpError
from sharp.models import build_model
from sharp.probes import adaptive_sharpness, average_sharpness, epsilon_sharpness, hessian_top_eigenvalues
from sharp.probes.common import ProbeModel
from sharp.probes.reparam import rescale

F64 = torch.float64
ALPHA = 10.0


def data(n=32, features=6, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, features, generator=gen, dtype=F64), torch.randint(0, classes, (n,), generator=gen))
    ]


def relu_mlp() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(6, 5, bias=False),
        nn.ReLU(),
        nn.Linear(5, 5, bias=False),
        nn.ReLU(),
        nn.Linear(5, 3, bias=False),
    ).double()


def scaled_mlp(model: nn.Sequential, alpha: float) -> tuple[nn.Sequential, torch.Tensor]:
    """Layer 0 times alpha, layer 2 times 1/alpha (by hand); and T with θ' = T θ."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        out[0].weight.mul_(alpha)
        out[2].weight.div_(alpha)
    scale = [
        torch.full((p.numel(),), s, dtype=F64)
        for p, s in zip(model.parameters(), (alpha, 1 / alpha, 1.0), strict=True)
    ]
    return out, torch.cat(scale)


def dense_hessian(model, batches) -> np.ndarray:
    params = list(model.parameters())
    loss = sum(F.cross_entropy(model(x), y) * len(y) for x, y in batches) / sum(len(y) for _, y in batches)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params, create_graph=True)])
    rows = [
        torch.cat([t.reshape(-1) for t in torch.autograd.grad(g[i], params, retain_graph=True)])
        for i in range(len(g))
    ]
    return torch.stack(rows).detach().numpy()


def loss_of(model, batches) -> float:
    with torch.no_grad():
        return ProbeModel(model, batches).loss()


def test_relu_mlp_rescaling_moves_full_space_measures_only():
    batches = data()
    model = relu_mlp()
    scaled, t = scaled_mlp(model, ALPHA)
    # the function is the same: ReLU is positively homogeneous
    assert loss_of(scaled, batches) == pytest.approx(loss_of(model, batches), rel=1e-12)

    # adaptive (|w|-scaled) sharpness sees the same problem in u = delta / |w|: the ascent path and
    # the noise draws are the same up to rounding, so 1e-6 is generous
    for probe in (
        lambda m: adaptive_sharpness(m, batches, rho=0.05, m=16),
        lambda m: adaptive_sharpness(m, batches, rho=0.05, m=16, norm="l2"),
        lambda m: average_sharpness(m, batches, rho=0.1, n_draws=10),
    ):
        before, after = probe(model).sharpness, probe(scaled).sharpness
        assert after == pytest.approx(before, rel=1e-6) and before > 0

    # lambda_max: H' = T⁻¹ H T⁻¹ from the original's dense Hessian
    hessian = dense_hessian(model, batches)
    inverse = 1 / t.numpy()
    expected = np.linalg.eigvalsh(inverse[:, None] * hessian * inverse[None, :])[-1]
    original = np.linalg.eigvalsh(hessian)[-1]
    top = hessian_top_eigenvalues(scaled, batches, k=1, tol=1e-10).eigenvalues[0]
    assert top == pytest.approx(expected, rel=1e-8)
    # it moves: measured lambda_max 0.148 -> 4.20 (x28) at alpha = 10 (layer 2's curvature grows by
    # up to alpha², layer 0's shrinks by as much)
    assert expected > 20 * original

    # full-space epsilon-sharpness: the box eps(|x_i| + 1) is not scale-covariant; measured 0.0211 ->
    # 0.0614 (x2.9) at alpha = 10
    before = epsilon_sharpness(model, batches, eps=1e-3).sharpness
    after = epsilon_sharpness(scaled, batches, eps=1e-3).sharpness
    assert after > 2 * before


def _exact_norms(model: nn.Module) -> nn.Module:
    """BN and GroupNorm with eps = 1e-300 (torch refuses 0), so that their scale invariance holds to
    rounding (with the default eps = 1e-5 it holds up to eps / var)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.GroupNorm):
            m.eps = 1e-300
    return model


def images(n=12, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 8, 8, generator=gen, dtype=F64), torch.randint(0, 3, (n,), generator=gen))]


@pytest.mark.parametrize(
    ("name", "norm"),
    [(m, n) for m in ("resnet8", "convnet", "mlp") for n in ("bn", "group", "none")],
)
def test_rescale_leaves_every_family_unchanged(name, norm):
    torch.manual_seed(3)
    model = _exact_norms(build_model(name, 1, 3, image_size=8, width=0.25, norm=norm).double().eval())
    batches = images()
    if norm == "bn":  # running statistics that are not the identity
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 1.5)
    scaled, rule = rescale(model, ALPHA)
    assert rule and any(
        not torch.equal(p, q) for p, q in zip(model.parameters(), scaled.parameters(), strict=True)
    )
    modes = ("eval", "batch") if norm == "bn" else ("eval",)
    for mode in modes:
        before = ProbeModel(model, batches, bn_mode=mode).loss()
        assert ProbeModel(scaled, batches, bn_mode=mode).loss() == pytest.approx(before, rel=1e-12)


def test_bn_net_rescaling_keeps_adaptive_and_moves_the_others():
    """Scaling the convs before BN layers by c: the loss is invariant in those weights' scale
    (L(cW) = L(W)), so adaptive sharpness stays; lambda_max and full-space sharpness move."""
    torch.manual_seed(4)
    model = _exact_norms(build_model("convnet", 1, 3, image_size=8, width=0.5).double().eval())
    batches = images(16)
    scaled, _ = rescale(model, 0.1)
    kw = {"bn_mode": "batch", "bn_batch": 8}
    assert ProbeModel(scaled, batches, **kw).loss() == pytest.approx(
        ProbeModel(model, batches, **kw).loss(), rel=1e-12
    )
    before = adaptive_sharpness(model, batches, rho=0.05, m=8, **kw).sharpness
    assert adaptive_sharpness(scaled, batches, rho=0.05, m=8, **kw).sharpness == pytest.approx(
        before, rel=1e-6
    )
    lam = hessian_top_eigenvalues(model, batches, k=1, tol=1e-8, **kw).eigenvalues[0]
    lam_scaled = hessian_top_eigenvalues(scaled, batches, k=1, tol=1e-8, **kw).eigenvalues[0]
    # the convs' block of H scales by 1/c² = 100, the classifier's not: measured 0.852 -> 8.20
    assert lam_scaled > 5 * lam
    phi = epsilon_sharpness(model, batches, eps=1e-3, **kw).sharpness
    phi_scaled = epsilon_sharpness(scaled, batches, eps=1e-3, **kw).sharpness
    assert phi_scaled > 2 * phi  # measured 0.126 -> 0.548


def test_rescale_refuses_other_models():
    with pytest.raises(SharpError, match="no function-preserving rescaling") as info:
        rescale(relu_mlp(), 2.0)
    assert "\n" not in str(info.value)
    with pytest.raises(SharpError, match="positive"):
        rescale(build_model("mlp", 1, 3, image_size=8), -1.0)
