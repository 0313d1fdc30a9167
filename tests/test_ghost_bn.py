"""Ghost BN's two implementations (torch's batch norm group by group, the CPU's; one batched
normalization, the GPU's): the same numbers as ghost BN by its definition (`ghost_bn_loop`), as
the previous implementation and as each other, with the running statistics."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is run from the repository root, not installed
    sys.path.insert(0, str(ROOT))

from bench.benchmarks import bench_ghost_bn, ghost_bn_loop, previous_ghost_forward  # noqa: E402
from sharp.errors import SharpError  # noqa: E402
from sharp.models import GhostBatchNorm1d, GhostBatchNorm2d  # noqa: E402

IMPLEMENTATIONS = ("loop", "batched")


def _layer(
    shape: tuple[int, ...], g: int, dtype: torch.dtype, implementation: str = "auto"
) -> torch.nn.Module:
    cls = GhostBatchNorm2d if len(shape) == 4 else GhostBatchNorm1d
    layer = cls(shape[1], ghost_batch=g).to(dtype)
    layer.implementation = implementation
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=gen)
        layer.bias.normal_(generator=gen)
        layer.running_mean.normal_(generator=gen)
        layer.running_var.uniform_(0.5, 2.0, generator=gen)
    return layer


def _input(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    # a mean far from zero and a spread unlike 1, so that centering and scaling are both exercised
    x = (3.0 + 2.0 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _forward_and_grads(fn, layer, x, grad_out):
    x = x.detach().clone().requires_grad_(True)
    y = fn(layer, x)
    grads = torch.autograd.grad(y, (x, layer.weight, layer.bias), grad_out)
    return y.detach(), grads


def _sharp(layer, x):
    return layer(x)


def _assert_same(a, b, atol):
    ya, ga = a
    yb, gb = b
    assert (ya - yb).abs().max() <= atol
    for u, v in zip(ga, gb, strict=True):
        assert (u - v).abs().max() <= atol * max(1.0, float(v.abs().max()))


def _assert_same_stats(a, b, atol):
    assert torch.allclose(a.running_mean, b.running_mean, rtol=0, atol=atol)
    assert torch.allclose(a.running_var, b.running_var, rtol=0, atol=atol)
    assert int(a.num_batches_tracked) == int(b.num_batches_tracked)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("g", [4, 8, 16])
@pytest.mark.parametrize("tail", [0, 3])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "1d"])
def test_ghost_bn_equals_the_group_loop_and_the_previous_code_in_float64(implementation, g, tail, layout):
    n = 3 * g + tail
    shape = (n, 5) if layout == "1d" else (n, 5, 3, 4)
    x = _input(shape, torch.float64, layout == "channels_last")
    grad_out = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    layers = {name: _layer(shape, g, torch.float64) for name in ("loop", "previous")}
    layers["sharp"] = _layer(shape, g, torch.float64, implementation)
    ours = _forward_and_grads(_sharp, layers["sharp"], x, grad_out)
    loop = _forward_and_grads(lambda m, t: ghost_bn_loop(m, t, g), layers["loop"], x, grad_out)
    previous = _forward_and_grads(
        lambda m, t: previous_ghost_forward(m, t, g), layers["previous"], x, grad_out
    )
    # float64: the three differ only in the order of the sums, ~1e-16 relative to values of order 1-10
    _assert_same(ours, loop, atol=1e-12)
    _assert_same(ours, previous, atol=1e-12)
    _assert_same_stats(layers["sharp"], layers["loop"], atol=1e-12)
    _assert_same_stats(layers["sharp"], layers["previous"], atol=1e-12)
    assert int(layers["sharp"].num_batches_tracked) == 3 + (tail > 0)
    assert ours[0].is_contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format
    )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("g", [4, 8, 16])
@pytest.mark.parametrize("tail", [0, 5])
def test_ghost_bn_equals_the_previous_code_in_float32_channels_last(implementation, g, tail):
    n = 4 * g + tail
    shape = (n, 6, 5, 5)
    x = _input(shape, torch.float32, channels_last=True)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(3)).contiguous(
        memory_format=torch.channels_last
    )
    layers = {
        "sharp": _layer(shape, g, torch.float32, implementation),
        "previous": _layer(shape, g, torch.float32),
    }
    ours = _forward_and_grads(_sharp, layers["sharp"], x, grad_out)
    previous = _forward_and_grads(
        lambda m, t: previous_ghost_forward(m, t, g), layers["previous"], x, grad_out
    )
    assert ours[0].is_contiguous(memory_format=torch.channels_last)
    assert ours[1][0].is_contiguous(memory_format=torch.channels_last)
    # float32: a few roundings of eps = 1.2e-7 on outputs of order 1-5 and sums over <= 25 * 16 terms
    _assert_same(ours, previous, atol=2e-5)
    _assert_same_stats(layers["sharp"], layers["previous"], atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("tail", [0, 3])
def test_hessian_vector_products_through_ghost_bn_equal_the_group_loop(implementation, tail):
    """Double backward (as batch sharpness takes it through training-mode BN) of a nonlinear
    loss of the output, with respect to the input and gamma, beta."""
    g, shape = 4, (3 * 4 + tail, 3, 2, 2)
    x = _input(shape, torch.float64, channels_last=True)
    gen = torch.Generator().manual_seed(4)
    vectors = [torch.randn(shape, generator=gen, dtype=torch.float64)] + [
        torch.randn(3, generator=gen, dtype=torch.float64) for _ in range(2)
    ]

    def hvp(fn, layer):
        inputs = (x.detach().clone().requires_grad_(True), layer.weight, layer.bias)
        loss = torch.tanh(fn(layer, inputs[0])).pow(2).sum()
        grads = torch.autograd.grad(loss, inputs, create_graph=True)
        dot = sum((gr * v).sum() for gr, v in zip(grads, vectors, strict=True))
        return torch.autograd.grad(dot, inputs)

    ours = hvp(_sharp, _layer(shape, g, torch.float64, implementation))
    loop = hvp(lambda m, t: ghost_bn_loop(m, t, g), _layer(shape, g, torch.float64))
    # float64 second derivatives of order 1-100: rounding differences only
    for a, b in zip(ours, loop, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_ghost_bn_in_bfloat16_is_the_float32_result_rounded_once(implementation):
    g, shape = 8, (8 * 3 + 2, 4, 3, 3)
    x = _input(shape, torch.bfloat16, channels_last=True)
    bf16 = _layer(shape, g, torch.float32, implementation)
    fp32 = copy.deepcopy(bf16)
    y = bf16(x)
    reference = fp32(x.float())
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    # rounding to bfloat16 (8 significant bits) moves a value by at most 2^-8 of itself;
    # 1e-5 covers float32 rounding of outputs of order 1-5
    assert ((y.float() - reference).abs() <= reference.abs() * 2**-8 + 1e-5).all()
    # statistics are taken in float32 from the same (bf16-exact) inputs
    _assert_same_stats(bf16, fp32, atol=1e-6)
    assert bf16.running_mean.dtype == torch.float32


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_lone_last_example_is_mapped_to_beta_and_adds_a_zero_variance_group(implementation):
    g = 4
    layer = _layer((9, 3), g, torch.float64, implementation)
    previous = copy.deepcopy(layer)
    x = _input((9, 3), torch.float64, channels_last=False)
    y = layer(x)
    # one example is its own mean, so the output is beta; the kernel's mean of one float64 value
    # is off by rounding (~1e-15), which 1/sqrt(var + eps) = 1/sqrt(1e-5) ~ 316 amplifies to ~1e-12
    assert torch.allclose(y[8], layer.bias.detach(), rtol=0, atol=1e-11)
    assert torch.allclose(y, previous_ghost_forward(previous, x, g), rtol=0, atol=1e-12)
    _assert_same_stats(layer, previous, atol=1e-12)


def test_the_implementation_is_chosen_by_device_and_can_be_forced():
    layer = GhostBatchNorm2d(3, ghost_batch=2)
    x = torch.randn(6, 3, 2, 2)
    assert layer._ghost_implementation(x, 2) == "loop"  # CPU: torch's batch norm group by group
    assert layer._ghost_implementation(x.to("meta"), 2) == "batched"  # any other device
    layer.implementation = "batched"
    assert layer._ghost_implementation(x, 2) == "batched"
    # one value per channel and group: only the batched path normalizes it
    one = GhostBatchNorm1d(3, ghost_batch=1)
    one.implementation = "loop"
    assert one._ghost_implementation(torch.randn(4, 3), 1) == "batched"
    layer.implementation = "fast"
    with pytest.raises(SharpError, match="unknown"):
        layer(x)


def test_the_benchmark_runs_at_toy_size():
    result = bench_ghost_bn(torch.device("cpu"), (2, 4), batch=10, channels=3, size=4, reps=1, warmup=0)
    for g in (2, 4):
        r = result[f"g{g}"]
        assert r["auto_implementation"] == "loop"
        assert math.isfinite(r["speedup_vs_previous"]) and r["speedup_vs_previous"] > 0
        assert math.isfinite(r["batched_speedup_vs_loop"]) and r["batched_speedup_vs_loop"] > 0
        assert r["auto_over_fastest"] >= 1.0  # the auto choice's time over the faster of the two
        # float32 outputs and gradients of order 1: rounding only
        assert r["max_abs_diff_vs_loop"] < 1e-4
