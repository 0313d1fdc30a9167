"""CIFAR ResNets (He et al. 2016) and ghost batch norm."""

from __future__ import annotations

import copy

import pytest
import torch

from sharp.errors import SharpError
from sharp.models import CifarResNet, GhostBatchNorm1d, GhostBatchNorm2d, build_model


@pytest.mark.parametrize(
    ("name", "millions"),
    [("resnet20", 0.27), ("resnet32", 0.46), ("resnet44", 0.66), ("resnet56", 0.85), ("resnet110", 1.7)],
)
def test_parameter_counts_match_he_et_al_table_6(name, millions):
    model = build_model(name, 3, 10)
    count = sum(p.numel() for p in model.parameters())
    assert round(count / 1e6, 2 if millions < 1 else 1) == millions


def test_resnet8_has_three_blocks_and_runs_on_small_images():
    model = build_model("resnet8", 1, 10, image_size=8)
    assert len(model.blocks) == 3
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    assert build_model("resnet8", 3, 100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_width_scales_channels():
    model = build_model("resnet20", 3, 10, width=0.5)
    assert model.stem.out_channels == 8 and model.fc.in_features == 32


def test_norm_none_has_biases_and_no_normalization():
    model = build_model("resnet8", 3, 10, norm="none")
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.bias is not None and not c.bias.any() for c in convs)
    # He init keeps the first activations at unit scale
    std = model.stem.weight.std().item()
    assert std == pytest.approx((2 / (3 * 9)) ** 0.5, rel=0.25)
    out = model(torch.randn(64, 3, 32, 32))
    assert torch.isfinite(out).all() and out.std() < 100


def test_bad_depth_and_name():
    with pytest.raises(SharpError, match="6n\\+2"):
        CifarResNet(10)
    with pytest.raises(SharpError, match="unknown"):
        build_model("resnet9", 3, 10)


@pytest.mark.parametrize(("cls", "shape"), [(GhostBatchNorm2d, (22, 5, 4, 3)), (GhostBatchNorm1d, (22, 5))])
def test_ghost_bn_equals_bn_applied_group_by_group(cls, shape):
    x = torch.randn(*shape, dtype=torch.float64)
    ghost = cls(5, ghost_batch=4).double()
    ghost.weight.data.uniform_(0.5, 1.5)
    ghost.bias.data.normal_()
    plain = copy.deepcopy(ghost)
    plain.ghost_batch = None
    y_ghost = ghost(x)  # groups 4,4,4,4,4,2
    y_plain = torch.cat([plain(chunk) for chunk in x.split(4)])
    assert torch.allclose(y_ghost, y_plain, atol=1e-12)
    assert torch.allclose(ghost.running_mean, plain.running_mean, atol=1e-14)
    assert torch.allclose(ghost.running_var, plain.running_var, atol=1e-14)
    assert ghost.num_batches_tracked == plain.num_batches_tracked == 6
    ghost.eval()
    plain.eval()
    assert torch.allclose(ghost(x), plain(x))


def test_ghost_bn_under_bf16_autocast_keeps_float_statistics():
    layer = GhostBatchNorm2d(4, ghost_batch=8)
    x = torch.randn(32, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    reference = torch.cat([torch.nn.functional.batch_norm(c, None, None, training=True) for c in x.split(8)])
    assert (y.float() - reference).abs().max() < 0.05


def test_eval_mode_affine_form_equals_batch_norm_with_gradients():
    layer = GhostBatchNorm2d(5, ghost_batch=4).double()
    layer.running_mean.normal_()
    layer.running_var.uniform_(0.5, 2.0)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    layer.eval()
    x = torch.randn(6, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    ours = layer(x)
    reference = torch.nn.functional.batch_norm(
        x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.1, layer.eps
    )
    assert torch.allclose(ours, reference, atol=1e-12)
    g_ours = torch.autograd.grad(ours.square().sum(), (x, layer.weight, layer.bias))
    g_ref = torch.autograd.grad(reference.square().sum(), (x, layer.weight, layer.bias))
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(g_ours, g_ref, strict=True))


def test_without_running_stats_eval_uses_the_whole_batch_not_ghost_groups():
    layer = GhostBatchNorm2d(3, ghost_batch=2, track_running_stats=False).double().eval()
    x = torch.randn(8, 3, 2, 2, dtype=torch.float64)
    assert torch.allclose(layer(x), torch.nn.functional.batch_norm(x, None, None, training=True), atol=1e-12)
