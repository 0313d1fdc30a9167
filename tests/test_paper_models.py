"""Keskar et al.'s C1/C2 as their Keras code builds them, Cohen et al.'s fc-tanh/fc-relu, and the
initialization schemes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sharp import config
from sharp.errors import SharpError
from sharp.models import (
    KERAS_BN_EPS,
    MODEL_NAMES,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    KerasSameMaxPool2d,
    build_model,
    default_init,
    model_norms,
    set_bn_batch,
)

C2_STACKS = [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]  # the paper's deepnet, by hand


def _conv(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k + c_out  # weights and bias


def _dense(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def _c1_count(classes: int, bn: bool = True) -> int:
    bn_params = 2 * (64 + 64 + 384 + 192) if bn else 0  # gamma and beta
    return (
        _conv(3, 64, 5) + _conv(64, 64, 5) + _dense(64 * 8 * 8, 384) + _dense(384, 192) + _dense(192, classes)
    ) + bn_params


def _c2_count(classes: int, bn: bool = True) -> int:
    total, current = 0, 3
    for channels, convs in C2_STACKS:
        for _ in range(convs):
            total += _conv(current, channels, 3) + (2 * channels if bn else 0)
            current = channels
    return total + _dense(512 * 1 * 1, 512) + (2 * 512 if bn else 0) + _dense(512, classes)


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_hand_counts_are_the_papers():
    assert _c1_count(10) == 1_757_834
    assert _c2_count(10) == 14_991_946


@pytest.mark.parametrize("classes", [10, 100])
@pytest.mark.parametrize("norm", ["bn", "none"])
def test_keskar_parameter_counts_and_no_running_statistics(classes, norm):
    c1 = build_model("keskar-c1", 3, classes, norm=norm)
    c2 = build_model("keskar-c2", 3, classes, norm=norm)
    assert _trainable(c1) == _c1_count(classes, bn=norm == "bn")
    assert _trainable(c2) == _c2_count(classes, bn=norm == "bn")
    # Keras mode 2 keeps no running statistics: the nets have no buffers at all
    assert list(c1.buffers()) == [] and list(c2.buffers()) == []


def _pool_sizes(model: nn.Module, x: torch.Tensor) -> list[int]:
    sizes: list[int] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: sizes.append(out.shape[-1]))
        for m in model.modules()
        if isinstance(m, KerasSameMaxPool2d)
    ]
    out = model(x)
    for h in hooks:
        h.remove()
    assert out.shape == (len(x), model.classifier[-1].out_features)
    return sizes


def test_keskar_output_and_pooling_shapes():
    x = torch.rand(2, 3, 32, 32)
    c1 = build_model("keskar-c1", 3, 10).eval()
    c2 = build_model("keskar-c2", 3, 100).eval()
    assert _pool_sizes(c1, x) == [16, 8]
    assert _pool_sizes(c2, x) == [16, 8, 4, 2, 1]
    assert c1.classifier[0].in_features == 64 * 8 * 8
    assert c2.classifier[1].in_features == 512
    # other image sizes: 'same' pooling rounds up (ceil(n / 2)) at every stage
    small = build_model("keskar-c2", 1, 10, image_size=9, width=0.125).eval()
    assert _pool_sizes(small, torch.rand(2, 1, 9, 9)) == [5, 3, 2, 1, 1]


def test_keskar_c1_layer_order():
    model = build_model("keskar-c1", 3, 10)
    kinds = [type(m).__name__ for m in [*model.features, *model.classifier]]
    block = ["Conv2d", "GhostBatchNorm2d", "ReLU", "KerasSameMaxPool2d"]
    dense = ["Linear", "GhostBatchNorm1d", "ReLU", "Dropout"]
    assert kinds == [*block, *block, "Flatten", *dense, *dense, "Linear"]
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.padding) for c in convs] == [(64, (5, 5), (2, 2))] * 2
    assert [m.out_features for m in model.classifier if isinstance(m, nn.Linear)] == [384, 192, 10]
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.5, 0.5]
    assert [(p.kernel, p.stride, p.padding) for p in model.features if isinstance(p, KerasSameMaxPool2d)] == [
        (3, 2, 1)
    ] * 2


def test_keskar_c2_layer_order():
    model = build_model("keskar-c2", 3, 10)
    expected: list[tuple] = []
    for stack, (channels, convs) in enumerate(C2_STACKS):
        for index in range(convs):
            expected += [("Conv2d", channels), ("GhostBatchNorm2d", channels), ("ReLU",)]
            if index < convs - 1:
                expected.append(("Dropout", 0.3 if stack == 0 else 0.4))
        expected.append(("KerasSameMaxPool2d", 2))
    expected += [("Flatten",), ("Dropout", 0.5), ("Linear", 512), ("GhostBatchNorm1d", 512), ("ReLU",)]
    expected += [("Dropout", 0.5), ("Linear", 10)]

    def describe(m: nn.Module) -> tuple:
        size = {
            "Conv2d": lambda: m.out_channels,
            "GhostBatchNorm2d": lambda: m.num_features,
            "GhostBatchNorm1d": lambda: m.num_features,
            "Dropout": lambda: m.p,
            "KerasSameMaxPool2d": lambda: m.kernel,
            "Linear": lambda: m.out_features,
        }.get(type(m).__name__)
        return (type(m).__name__,) + ((size(),) if size else ())

    assert [describe(m) for m in [*model.features, *model.classifier]] == expected
    assert all(
        c.kernel_size == (3, 3) and c.padding == (1, 1) for c in model.modules() if isinstance(c, nn.Conv2d)
    )


def _theano_same_pool(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """Keras 1 / Theano max pooling, border_mode='same', by brute force: zero padding of p on each
    side, windows starting at i*s - p, the first ceil(n/s) of them kept."""
    p = k - 2 if k % 2 else k - 1
    n_rows, n_cols = x.shape[-2:]
    padded = torch.zeros(*x.shape[:-2], n_rows + 2 * p, n_cols + 2 * p, dtype=x.dtype)
    padded[..., p : p + n_rows, p : p + n_cols] = x
    rows, cols = math.ceil(n_rows / s), math.ceil(n_cols / s)
    out = torch.empty(*x.shape[:-2], rows, cols, dtype=x.dtype)
    for i in range(rows):
        for j in range(cols):
            out[..., i, j] = padded[..., i * s : i * s + k, j * s : j * s + k].amax(dim=(-2, -1))
    return out


@pytest.mark.parametrize(("k", "s"), [(3, 2), (2, 2)])
@pytest.mark.parametrize("n", [32, 16, 7, 2, 1])
def test_keras_same_pooling_equals_theanos_windows(k, s, n):
    x = torch.relu(torch.randn(2, 3, n, n, dtype=torch.float64))  # every pool follows a ReLU
    ours = KerasSameMaxPool2d(k, s)(x)
    assert ours.shape[-2:] == (math.ceil(n / s),) * 2
    assert torch.equal(ours, _theano_same_pool(x, k, s))  # a max selects an input: exact


def test_keras_same_2x2_pooling_starts_one_pixel_early():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # windows rows {-1, 0} and {1, 2}: row and column 3 never reach the output
    assert KerasSameMaxPool2d(2, 2)(x).flatten().tolist() == [0.0, 2.0, 8.0, 10.0]


@pytest.mark.parametrize("name", ["keskar-c1", "keskar-c2"])
def test_mode_2_bn_evaluates_with_the_batch_statistics(name):
    model = build_model(name, 3, 10, width=0.125).double()
    x = torch.rand(6, 3, 32, 32, dtype=torch.float64)
    model.eval()
    evaluated = model(x)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()  # dropout off, BN in training mode
    trained = model(x)
    # float64, the same operations in the same order: equal to rounding
    assert torch.allclose(evaluated, trained, rtol=0, atol=1e-12)
    # and the evaluation of one example depends on the rest of its batch
    model.eval()
    other = model(torch.cat([x[:1], torch.rand(5, 3, 32, 32, dtype=torch.float64)]))
    assert (other[0] - evaluated[0]).abs().max() > 1e-6


def test_mode_2_bn_layer_is_kerass_formula():
    model = build_model("keskar-c1", 3, 10)
    layers = [m for m in model.modules() if isinstance(m, GhostBatchNorm1d | GhostBatchNorm2d)]
    assert len(layers) == 4
    assert all(m.eps == KERAS_BN_EPS == 1e-5 and not m.track_running_stats for m in layers)
    layer = layers[0].double().eval()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    x = 2 + 3 * torch.randn(5, 64, 4, 4, dtype=torch.float64)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)  # Theano's var: biased
    expected = (x - mean) / torch.sqrt(var + 1e-5) * layer.weight.view(1, -1, 1, 1) + layer.bias.view(
        1, -1, 1, 1
    )
    assert torch.allclose(layer(x), expected, rtol=0, atol=1e-12)


def test_mode_2_bn_with_ghost_batches_in_training():
    model = build_model("keskar-c1", 3, 10, width=0.125).double()
    set_bn_batch(model, 4)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    x = torch.rand(8, 3, 32, 32, dtype=torch.float64)
    whole = model(x)
    halves = torch.cat([model(x[:4]), model(x[4:])])
    assert torch.allclose(whole, halves, rtol=0, atol=1e-12)


def test_keskar_channels_last_gives_the_same_output():
    model = build_model("keskar-c1", 3, 10, width=0.25).double().eval()
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    plain = model(x)
    fast = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(plain, fast, rtol=0, atol=1e-12)


def _fans(weight: torch.Tensor) -> tuple[int, int]:
    area = math.prod(weight.shape[2:])  # kernel area (1 for a linear layer)
    return weight.shape[1] * area, weight.shape[0] * area


@pytest.mark.parametrize("name", ["keskar-c1", "keskar-c2"])
def test_keskar_default_init_is_kerass_glorot_uniform_with_zero_biases(name):
    assert default_init(name) == "glorot"
    model = build_model(name, 3, 10)
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            fan_in, fan_out = _fans(m.weight)
            bound = math.sqrt(6 / (fan_in + fan_out))
            w = m.weight.detach()
            assert w.abs().max() <= bound
            if w.numel() >= 10_000:  # the largest of 10,000 uniform draws is within 0.1 % of the bound
                assert w.abs().max() > 0.99 * bound
                # std of U(-b, b) is b / sqrt(3); with >= 10,000 draws the sample std is within ~1 %
                assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
            assert not m.bias.any()
        elif isinstance(m, GhostBatchNorm1d | GhostBatchNorm2d):
            assert (m.weight == 1).all() and not m.bias.any()


def test_init_choices_apply_to_any_model():
    he = build_model("keskar-c1", 3, 10, init="he")
    conv = he.features[0]
    # He normal: std sqrt(2 / fan_in), 4,800 draws: sample std within a few percent
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (3 * 25)), rel=0.05)
    torch_default = build_model("keskar-c1", 3, 10, init="torch")
    assert torch_default.features[0].bias.abs().max() > 0  # torch draws conv biases
    glorot = build_model("resnet8", 3, 10, init="glorot")
    fan_in, fan_out = _fans(glorot.stem.weight)
    assert glorot.stem.weight.abs().max() <= math.sqrt(6 / (fan_in + fan_out))
    assert not glorot.fc.bias.any()
    assert [default_init(n) for n in ("resnet20", "convnet", "mlp", "fc-tanh")] == [
        "he",
        "he",
        "torch",
        "torch",
    ]
    with pytest.raises(SharpError, match="init 'xavier' is unknown"):
        build_model("resnet8", 3, 10, init="xavier")


@pytest.mark.parametrize(("name", "activation"), [("fc-tanh", nn.Tanh), ("fc-relu", nn.ReLU)])
def test_fc_nets_are_cohen_et_als(name, activation):
    model = build_model(name, 3, 10, norm="none")
    layers = list(model.net)
    assert [type(m) for m in layers] == [nn.Flatten, nn.Linear, activation, nn.Linear, activation, nn.Linear]
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3072, 200), (200, 200), (200, 10)]
    assert all(m.bias is not None for m in linears)
    assert _trainable(model) == _dense(3072, 200) + _dense(200, 200) + _dense(200, 10) == 656_810
    assert model(torch.rand(5, 3, 32, 32)).shape == (5, 10)


def test_fc_nets_keep_torchs_default_init():
    torch.manual_seed(7)
    model = build_model("fc-tanh", 3, 10, norm="none")
    for m in model.modules():
        if isinstance(m, nn.Linear):
            # kaiming_uniform(a=sqrt(5)): gain sqrt(2 / (1 + 5)), bound gain * sqrt(3 / fan_in),
            # i.e. 1/sqrt(fan_in); biases U(+-1/sqrt(fan_in))
            bound = 1 / math.sqrt(m.in_features)
            assert m.weight.abs().max() <= bound and m.bias.abs().max() <= bound
            assert m.weight.abs().max() > 0.99 * bound  # >= 2,000 draws reach within 0.5 % of the bound
            assert m.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    # and it is exactly what torch builds for the same layers from the same seed (bit-identical draws)
    torch.manual_seed(7)
    reference = nn.Sequential(
        nn.Flatten(), nn.Linear(3072, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh(), nn.Linear(200, 10)
    )
    ours, theirs = model.net.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize(
    ("name", "norm", "message"),
    [
        ("keskar-c1", "group", "--model keskar-c1 takes --norm bn or none, not --norm group"),
        ("keskar-c2", "group", "--model keskar-c2 takes --norm bn or none, not --norm group"),
        ("fc-tanh", "bn", "--model fc-tanh takes --norm none, not --norm bn"),
        ("fc-relu", "group", "--model fc-relu takes --norm none, not --norm group"),
    ],
)
def test_norms_a_model_does_not_take_are_refused_in_one_line(name, norm, message):
    with pytest.raises(SharpError) as info:
        build_model(name, 3, 10, norm=norm)
    assert str(info.value) == message
    assert norm not in model_norms(name)


def test_config_offers_every_model():
    assert set(config.MODELS) == set(MODEL_NAMES)
    assert set(config.NORMS) >= {n for name in MODEL_NAMES for n in model_norms(name)}
