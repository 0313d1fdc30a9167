"""Hessian-vector products against central differences of gradients, in float64:
(∇f(θ + hv) − ∇f(θ − hv)) / 2h = Hv + O(h²), a reference that uses autograd's first
derivative only (the dense references elsewhere use the same double backward as the operator).

Every model family (resnet, convnet, mlp, Keskar et al.'s C1 and C2, Cohen et al.'s fc-tanh
and fc-relu) with every normalization it takes (bn, ghost bn, group, none), every BN mode
(eval, recompute, batch; batch only for the Keskar nets, whose BN keeps no running statistics),
both HVP paths (kept graph, chunked), and the eval-mode BN written as its affine map against
torch's own F.batch_norm.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sharp.models import KESKAR_NETS, build_model, model_norms
from sharp.probes.common import ProbeModel
from sharp.probes.hessian import HessianOperator

F64 = torch.float64
H = 1e-6  # step: truncation O(h²) ~ 1e-12, rounding ~ 1e-16 / h ~ 1e-10 of the gradient's scale
RTOL = 1e-6  # relative error allowed on ||Hv||: measured 2e-10 to 8e-9 over the cases (no ReLU kink crossed)


def _data(sizes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 1, 8, 8, generator=gen, dtype=F64), torch.randint(0, 3, (n,), generator=gen))
        for n in sizes
    ]


def _model(family: str, norm: str) -> nn.Module:
    torch.manual_seed(11)
    widths = {"resnet8": 0.25, "convnet": 0.5, "mlp": 0.25, "keskar-c1": 1 / 16, "keskar-c2": 1 / 32}
    kw = {"width": widths.get(family, 0.05)}  # fc nets: 10 of their 200 hidden units
    if norm == "ghost":
        kw.update(norm="bn", bn_batch=2)
    else:
        kw["norm"] = norm
    # Keras' Glorot init (the Keskar nets' own) zeroes every bias: a unit whose inputs are all
    # dead ReLUs then sits exactly on its own ReLU's kink, where central differences jump (C2
    # without BN at this width); torch's init draws the biases
    init = "torch" if family in KESKAR_NETS else None
    model = build_model(family, 1, 3, image_size=8, init=init, **kw).double()
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.GroupNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen, dtype=F64))
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen, dtype=F64) - 0.5)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen, dtype=F64) - 0.5)
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen, dtype=F64))
    return model.eval()


def _central_difference(pm: ProbeModel, v: torch.Tensor) -> torch.Tensor:
    theta = pm.get_vector()
    try:
        pm.set_vector(theta + H * v)
        _, plus = pm.loss_and_grad()
        pm.set_vector(theta - H * v)
        _, minus = pm.loss_and_grad()
    finally:
        pm.set_vector(theta)
    return (plus - minus) / (2 * H)


def _check(pm: ProbeModel, keep_graph: bool) -> None:
    v = torch.randn(pm.n_params, generator=torch.Generator().manual_seed(13), dtype=F64)
    v /= v.norm()
    hv = HessianOperator(pm, keep_graph=keep_graph).matvec(v)
    fd = _central_difference(pm, v)
    assert float((hv - fd).norm()) <= RTOL * float(hv.norm()), float((hv - fd).norm() / hv.norm())


FAMILIES = ("resnet8", "convnet", "mlp", "keskar-c1", "keskar-c2", "fc-tanh", "fc-relu")
CHUNKED = ("resnet8", "keskar-c2")  # probed by the chunked HVP path; the others keep the graph


def _norms(family: str) -> tuple[str, ...]:
    """The normalizations a family takes, with ghost BN wherever it takes BN."""
    norms = model_norms(family)
    return (*norms, "ghost") if "bn" in norms else norms


def _bn_modes(family: str, norm: str) -> tuple[str, ...]:
    """The BN modes a case is probed in: the Keskar nets' BN keeps no running statistics, so
    eval and recompute are refused there."""
    if norm not in ("bn", "ghost"):
        return ("eval",)
    return ("batch",) if family in KESKAR_NETS else ("eval", "recompute", "batch")


CASES = [
    (family, norm, mode) for family in FAMILIES for norm in _norms(family) for mode in _bn_modes(family, norm)
]


@pytest.mark.parametrize(("family", "norm", "mode"), CASES)
def test_hvp_matches_central_differences(family, norm, mode):
    model = _model(family, norm)
    data = _data([5, 7], seed=14)
    kw = {"recompute": {"bn_data": _data([9], seed=15)}, "batch": {"bn_batch": 4}}.get(mode, {})
    pm = ProbeModel(model, data, bn_mode=mode, **kw)
    _check(pm, keep_graph=family not in CHUNKED)


class PlainBN2d(nn.BatchNorm2d):
    """torch's own eval-mode batch norm (F.batch_norm), not the affine map of sharp.models."""


def test_eval_bn_affine_map_has_torchs_hessian():
    model = _model("convnet", "bn")
    plain = copy.deepcopy(model)
    for index in (1, 5):  # the BN layers of ConvNet.features
        old = plain.features[index]
        new = PlainBN2d(old.num_features).double().eval()
        new.load_state_dict(old.state_dict())
        plain.features[index] = new
    data = _data([6, 6], seed=16)
    ours, theirs = ProbeModel(model, data), ProbeModel(plain, data)
    v = torch.randn(ours.n_params, generator=torch.Generator().manual_seed(17), dtype=F64)
    hv_ours = HessianOperator(ours).matvec(v)
    hv_theirs = HessianOperator(theirs).matvec(v)
    # the same function written two ways: equal Hessians to rounding
    torch.testing.assert_close(hv_ours, hv_theirs, rtol=1e-10, atol=1e-12)
    _check(theirs, keep_graph=True)
