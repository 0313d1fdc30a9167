"""Loss landscapes: interpolation between two models and filter-normalized random scans.

References are independent: evaluation by a summed-loss loop over the batches, BN
statistics by torch.optim.swa_utils.update_bn on a copy, interpolated or perturbed models
built by hand from state_dicts, filter norms by a per-slice Python loop.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn

from sharp.errors import SharpError
from sharp.models import build_model
from sharp.probes.landscape import (
    filter_normalize,
    interpolate,
    load_directions,
    make_directions,
    parse_alphas,
    random_direction_scan,
    save_directions,
)

TOL = 1e-12  # float64 losses of tiny nets computed two ways (batch order, summation): rounding only
# Accuracies are compared with ==: both sides count correct predictions of the same float64
# outputs (ratios of the same integers), and no logit lies within rounding of a tie here.


def make_batches(sizes, seed, classes=3, size=8):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, 1, size, size, generator=gen, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=gen),
        )
        for n in sizes
    ]


def bn_net(seed: int, warm_seed: int):
    """A tiny conv net with BN in float64, with its own parameters and running statistics."""
    torch.manual_seed(seed)
    model = build_model("convnet", 1, 3, image_size=8, width=0.5).double()
    gen = torch.Generator().manual_seed(warm_seed)
    model.train()
    with torch.no_grad():
        for _ in range(2 + warm_seed % 3):  # different num_batches_tracked too
            model(torch.randn(6, 1, 8, 8, generator=gen, dtype=torch.float64) * 2 + 0.5)
    model.eval()
    return model


def plain_net(seed: int):
    torch.manual_seed(seed)
    return build_model("convnet", 1, 3, image_size=8, width=0.5, norm="none").double().eval()


def direct_eval(model, batches):
    """Mean loss (summed over examples, divided by N) and accuracy, in eval mode on a copy."""
    work = copy.deepcopy(model).eval()
    total, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in batches:
            out = work(x)
            total += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            n += len(y)
    return total / n, correct / n


def with_state(model, state):
    out = copy.deepcopy(model)
    out.load_state_dict(state)
    return out


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.training


def assert_unchanged(model, snap):
    state, training = snap
    assert model.training == training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.fixture
def probe_sets():
    return make_batches([5, 3, 7], seed=1), make_batches([4, 6], seed=2)


# --- interpolation --------------------------------------------------------------------------


def test_interpolate_endpoints_with_own_or_blended_buffers(probe_sets):
    train, test = probe_sets
    a, b = bn_net(0, 1), bn_net(1, 2)
    assert not torch.equal(a.features[1].running_mean, b.features[1].running_mean)
    for mode in ("interpolate", "a"):
        res = interpolate(a, b, train, test, [0.0, 0.5, 1.0], bn=mode)
        assert res.bn == mode and res.alphas == [0.0, 0.5, 1.0]
        for batches, loss, acc in (
            (train, res.train_loss, res.train_acc),
            (test, res.test_loss, res.test_acc),
        ):
            ref_loss, ref_acc = direct_eval(a, batches)
            assert loss[0] == pytest.approx(ref_loss, abs=TOL) and acc[0] == ref_acc
            if mode == "interpolate":
                ref_loss, ref_acc = direct_eval(b, batches)
            else:  # b's parameters with a's buffers
                sd = {
                    k: (b.state_dict()[k] if "running" not in k and "num_batches" not in k else v)
                    for k, v in a.state_dict().items()
                }
                ref_loss, ref_acc = direct_eval(with_state(a, sd), batches)
            assert loss[2] == pytest.approx(ref_loss, abs=TOL) and acc[2] == ref_acc
    # the midpoint with blended buffers: floating tensors averaged, running variances blended in
    # log space (their geometric mean), counters from a
    res = interpolate(a, b, train, test, [0.5], bn="interpolate")
    sd = {
        k: (0.5 * v + 0.5 * b.state_dict()[k] if v.is_floating_point() else v)
        for k, v in a.state_dict().items()
    }
    for k in sd:
        if k.endswith("running_var"):
            sd[k] = (a.state_dict()[k] * b.state_dict()[k]).sqrt()
    assert res.train_loss[0] == pytest.approx(direct_eval(with_state(a, sd), train)[0], abs=TOL)
    assert res.n_examples == 15 and res.settings["n_test_examples"] == 10
    diff = torch.cat(
        [(pb - pa).detach().flatten() for pa, pb in zip(a.parameters(), b.parameters(), strict=True)]
    )
    assert res.distance == pytest.approx(float(diff.norm()), rel=1e-12)


def exact_bn_statistics(model, batches):
    """A copy of `model` whose BN running statistics are the mean and unbiased variance of each BN
    layer's input over all examples, computed by concatenating every input in eval mode (no
    streaming sums), layer after layer in forward order, each with the layers before it set."""
    model = copy.deepcopy(model).eval()
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for layer in layers:  # definition order is forward order in these nets
        seen = []
        handle = layer.register_forward_pre_hook(lambda _m, args, seen=seen: seen.append(args[0].detach()))
        with torch.no_grad():
            for x, _ in batches:
                model(x)
        handle.remove()
        values = torch.cat(seen).transpose(0, 1).reshape(layer.num_features, -1).double()
        with torch.no_grad():
            layer.running_mean.copy_(values.mean(1))
            layer.running_var.copy_(values.var(1, unbiased=True))
    return model


def test_interpolate_recompute_uses_exact_statistics(probe_sets):
    train, test = probe_sets
    a, b = bn_net(0, 1), bn_net(1, 2)
    a.train()  # the caller's mode must survive
    snaps = snapshot(a), snapshot(b)
    res = interpolate(a, b, train, test, parse_alphas("-1:2:4"), bn="recompute")
    assert_unchanged(a, snaps[0])
    assert_unchanged(b, snaps[1])
    assert res.alphas == [-1.0, 0.0, 1.0, 2.0]
    for i, model in ((1, a), (2, b)):
        ref = exact_bn_statistics(model, train)
        # float64 nets, sums over 15 examples: agreement to rounding, 1e-12 is ample
        assert res.train_loss[i] == pytest.approx(direct_eval(ref, train)[0], abs=TOL)
        assert res.test_loss[i] == pytest.approx(direct_eval(ref, test)[0], abs=TOL)
        assert res.test_acc[i] == direct_eval(ref, test)[1]  # counts of correct predictions: exact
        # and it is not the model with its own buffers, nor update_bn's train-mode average
        assert abs(res.train_loss[i] - direct_eval(model, train)[0]) > 1e-6
        swa = copy.deepcopy(model)
        update_bn(train, swa)
        assert abs(res.train_loss[i] - direct_eval(swa, train)[0]) > 1e-6
    # an extrapolated point: params 2·b − a, BN statistics recomputed on the train batches
    sd = {k: (2 * b.state_dict()[k] - v if v.is_floating_point() else v) for k, v in a.state_dict().items()}
    ref = exact_bn_statistics(with_state(a, sd), train)
    assert res.train_loss[3] == pytest.approx(direct_eval(ref, train)[0], abs=1e-10)
    # bn_data replaces the train batches for the statistics only
    other = make_batches([8, 2], seed=3)
    res2 = interpolate(a, b, train, test, [0.0], bn="recompute", bn_data=other)
    assert res2.train_loss[0] == pytest.approx(direct_eval(exact_bn_statistics(a, other), train)[0], abs=TOL)
    assert res2.evaluations["bn_update"] == 1 and res2.settings["n_bn_examples"] == 10


def test_blended_variances_stay_positive_outside_the_segment(probe_sets):
    """A linear blend of two running variances that differ by more than 2x goes negative at
    alpha = -1 or 2 (NaN losses); the log-space blend var_a^(1-alpha) var_b^alpha does not."""
    train, test = probe_sets
    a, b = bn_net(0, 1), bn_net(1, 2)
    with torch.no_grad():
        a.features[1].running_var.fill_(0.2)
        b.features[1].running_var.fill_(2.0)  # linear blend at alpha = 2: 3.8 (fine), at -1: -1.6 (NaN)
    alphas = [-1.0, -0.5, 2.0]
    res = interpolate(a, b, train, test, alphas, bn="interpolate")
    assert all(math.isfinite(v) for v in res.train_loss + res.test_loss)
    for alpha, loss in zip(alphas, res.train_loss, strict=True):
        sd = {
            k: ((1 - alpha) * v + alpha * b.state_dict()[k] if v.is_floating_point() else v)
            for k, v in a.state_dict().items()
        }
        for k in sd:
            if k.endswith("running_var"):
                sd[k] = a.state_dict()[k] ** (1 - alpha) * b.state_dict()[k] ** alpha
        assert loss == pytest.approx(direct_eval(with_state(a, sd), train)[0], abs=1e-10)


def test_sine_path_ends_at_the_two_solutions(probe_sets):
    """Keskar et al. Fig. 7: f(sin(alpha pi/2) x_l + cos(alpha pi/2) x_s)."""
    train, test = probe_sets
    a, b = plain_net(0), plain_net(1)
    res = interpolate(a, b, train, test, [0.0, 0.5, 1.0, 1.5], path="sin", bn="a")
    assert res.path == "sin" and res.settings["interpolation"].startswith("cos(alpha pi / 2)")
    # the endpoints are the models themselves: cos and sin are set to exactly 1 and 0 there
    assert res.train_loss[0] == pytest.approx(direct_eval(a, train)[0], abs=TOL)
    assert res.test_loss[2] == pytest.approx(direct_eval(b, test)[0], abs=TOL)
    for i, alpha in ((1, 0.5), (3, 1.5)):
        ca, cb = math.cos(alpha * math.pi / 2), math.sin(alpha * math.pi / 2)
        sd = {k: ca * v + cb * b.state_dict()[k] for k, v in a.state_dict().items()}
        assert res.train_loss[i] == pytest.approx(direct_eval(with_state(a, sd), train)[0], abs=1e-10)
    line = interpolate(a, b, train, test, [0.5], bn="a")
    assert abs(line.train_loss[0] - res.train_loss[1]) > 1e-6  # the two paths differ off the ends
    with pytest.raises(SharpError, match="along the line only"):
        interpolate(a, b, train, test, [0.5], path="sin", bn="interpolate")
    with pytest.raises(SharpError, match="path"):
        interpolate(a, b, train, test, [0.5], path="arc")


def test_interpolate_without_bn_modes_agree_and_callers_untouched(probe_sets):
    train, test = probe_sets
    a, b = plain_net(0), plain_net(1)
    a.train()
    snaps = snapshot(a), snapshot(b)
    alphas = [-0.5, 0.0, 0.5, 1.0, 1.5]
    results = [interpolate(a, b, train, test, alphas, bn=mode) for mode in ("recompute", "interpolate", "a")]
    for res in results[1:]:
        # without BN the three modes run the same arithmetic: bit-for-bit equality is the claim
        assert res.train_loss == results[0].train_loss and res.test_loss == results[0].test_loss
        assert res.train_acc == results[0].train_acc and res.test_acc == results[0].test_acc
    sd = {k: 0.5 * v + 0.5 * b.state_dict()[k] for k, v in a.state_dict().items()}
    mid = with_state(a, sd)
    assert results[0].train_loss[2] == pytest.approx(direct_eval(mid, train)[0], abs=TOL)
    assert results[0].test_loss[2] == pytest.approx(direct_eval(mid, test)[0], abs=TOL)
    assert results[0].train_loss[3] == pytest.approx(direct_eval(b, train)[0], abs=TOL)
    assert_unchanged(a, snaps[0])
    assert_unchanged(b, snaps[1])
    assert results[0].to_dict()["probe"] == "interpolation"


def test_interpolate_rejects_mismatched_architectures(probe_sets):
    train, test = probe_sets
    a = plain_net(0)
    wider = build_model("convnet", 1, 3, image_size=8, width=1.0, norm="none").double()
    with pytest.raises(SharpError, match=r"features\.0\.weight") as info:
        interpolate(a, wider, train, test, [0.0, 1.0])
    assert "\n" not in str(info.value)
    with pytest.raises(SharpError, match="features") as info:
        interpolate(a, build_model("mlp", 1, 3, image_size=8).double(), train, test, [0.0])
    assert "\n" not in str(info.value)
    with pytest.raises(SharpError, match="bn"):
        interpolate(a, plain_net(1), train, test, [0.0], bn="running")


def test_parse_alphas():
    grid = parse_alphas("-1:2:25")
    # linspace returns its endpoints exactly, and 0 and 1 are snapped: exact by construction
    assert len(grid) == 25 and grid[0] == -1.0 and grid[-1] == 2.0
    assert 0.0 in grid and 1.0 in grid
    assert grid == pytest.approx([-1 + 3 * i / 24 for i in range(25)], abs=1e-15)
    assert parse_alphas("-1:2:4") == [-1.0, 0.0, 1.0, 2.0]
    assert parse_alphas("0,0.5,1") == [0.0, 0.5, 1.0]
    assert parse_alphas(" 0.25 ") == [0.25]
    third = parse_alphas("-1:2:31")  # 0.1 steps: 0 and 1 land exactly
    assert third[10] == 0.0 and third[20] == 1.0
    for bad in ("", "a:b:3", "1:2", "0:1:1", "0:1:2.5", "0,,1", "0:1:2:3", "nan,1"):
        with pytest.raises(SharpError):
            parse_alphas(bad)


# --- random directions ----------------------------------------------------------------------


def reference_normalize(raw, model, ignore="biasbn"):
    """Filter normalization by a loop over output slices (Li et al. 2018)."""
    out = {}
    for name, w in model.named_parameters():
        w = w.detach()
        if w.dim() <= 1:
            out[name] = torch.zeros_like(w) if ignore == "biasbn" else w.clone()
            continue
        d = raw[name].to(w.dtype).clone()
        for i in range(w.shape[0]):
            d[i] = d[i] / d[i].norm() * w[i].norm()
        out[name] = d
    return out


def perturbed(model, *terms):
    """A copy with parameters θ + Σ c·d for (c, d) in terms."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            value = p.clone()
            for c, d in terms:
                value = value + c * d[name]
            p.copy_(value)
    return out


def test_directions_are_filter_normalized():
    model = bn_net(0, 1)
    (d,) = make_directions(model, 1, seed=5)
    names = [n for n, _ in model.named_parameters()]
    assert list(d) == names
    for name, w in model.named_parameters():
        if w.dim() > 1:
            for i in range(w.shape[0]):
                assert float(d[name][i].norm()) == pytest.approx(
                    float(w[i].detach().norm()), rel=TOL, abs=TOL
                )
            assert not torch.allclose(d[name], w)
        else:
            assert torch.count_nonzero(d[name]) == 0  # biases and BN γ/β ignored
    (d_none,) = make_directions(model, 1, seed=5, ignore="none")
    for name, w in model.named_parameters():
        if w.dim() <= 1:
            assert torch.equal(d_none[name], w.detach())
        else:
            assert torch.equal(d_none[name], d[name])
    # same seed, same directions; another seed, others; two directions differ
    again = make_directions(model, 2, seed=5)
    assert all(torch.equal(again[0][k], d[k]) for k in names)
    assert not torch.equal(again[1]["fc.weight"], d["fc.weight"])
    assert not torch.equal(make_directions(model, 1, seed=6)[0]["fc.weight"], d["fc.weight"])
    # against a slice-by-slice reference from the raw draws
    (raw,) = make_directions(model, 1, seed=5, normalize=False)
    ref = reference_normalize(raw, model)
    for k in names:
        torch.testing.assert_close(d[k], ref[k], rtol=1e-13, atol=1e-14)


def test_scans_match_hand_perturbed_models(tmp_path):
    model = bn_net(0, 1)
    batches = make_batches([5, 7], seed=4)
    own_loss, own_acc = direct_eval(model, batches)
    alphas, betas = [-0.5, 0.0, 0.25], [-0.3, 0.0, 0.6]

    one = random_direction_scan(model, batches, alphas, seed=3)
    (d,) = make_directions(model, 1, seed=3)
    assert one.betas is None and len(one.loss) == 3
    assert one.loss[1] == pytest.approx(own_loss, abs=TOL) and one.accuracy[1] == own_acc
    for i, alpha in enumerate(alphas):
        ref_loss, ref_acc = direct_eval(perturbed(model, (alpha, d)), batches)
        assert one.loss[i] == pytest.approx(ref_loss, abs=1e-10) and one.accuracy[i] == ref_acc
    assert abs(one.loss[0] - own_loss) > 1e-4  # the direction moves the loss

    two = random_direction_scan(model, batches, alphas, betas, seed=3)
    d1, d2 = make_directions(model, 2, seed=3)
    assert two.betas == betas and len(two.loss) == 3 and all(len(row) == 3 for row in two.loss)
    assert two.loss[1][1] == pytest.approx(own_loss, abs=TOL)
    ref_loss, _ = direct_eval(perturbed(model, (alphas[0], d1), (betas[2], d2)), batches)
    assert two.loss[0][2] == pytest.approx(ref_loss, abs=1e-10)
    assert two.ignore == "biasbn" and two.normalization == "filter"
    assert two.evaluations["loss"] == 9 and "directions" not in two.to_dict()

    # saved and loaded draws reproduce the scan exactly
    path = tmp_path / "dirs.pt"
    save_directions(path, two.directions, {"seed": 3, "model": "convnet"})
    loaded, meta = load_directions(path)
    assert meta == {"seed": 3, "model": "convnet"}
    again = random_direction_scan(model, batches, alphas, betas, directions=loaded)
    assert again.loss == two.loss and again.accuracy == two.accuracy  # the same draws: bit-for-bit

    # another model of the same architecture gets the draws normalized to ITS filters
    other = bn_net(7, 2)
    ref1 = reference_normalize(loaded[0], other)
    norm1 = filter_normalize(loaded[0], other)
    for name, w in other.named_parameters():
        torch.testing.assert_close(norm1[name], ref1[name], rtol=1e-13, atol=1e-14)
        if w.dim() > 1:
            for i in range(w.shape[0]):
                assert float(norm1[name][i].norm()) == pytest.approx(float(w[i].detach().norm()), rel=TOL)
    scan_other = random_direction_scan(other, batches, alphas, betas, directions=loaded)
    ref2 = reference_normalize(loaded[1], other)
    ref_loss, _ = direct_eval(perturbed(other, (alphas[2], ref1), (betas[0], ref2)), batches)
    assert scan_other.loss[2][0] == pytest.approx(ref_loss, abs=1e-10)
    assert scan_other.loss[1][1] == pytest.approx(direct_eval(other, batches)[0], abs=TOL)


def test_scan_rejects_bad_directions():
    model = bn_net(0, 1)
    batches = make_batches([4], seed=4)
    with pytest.raises(SharpError, match="2-D"):
        random_direction_scan(model, batches, [0.0], [0.0], directions=make_directions(model, 1, 0))
    wrong = make_directions(plain_net(0), 1, 0, normalize=False)
    with pytest.raises(SharpError, match="features"):
        random_direction_scan(model, batches, [0.0], directions=wrong)
    with pytest.raises(SharpError, match="ignore"):
        make_directions(model, 1, 0, ignore="bias")
