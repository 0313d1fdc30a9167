"""Sharpness along training (`--track-sharpness`) against independent references: a quadratic
loss with a known Hessian, a dense double-backward Hessian of the squared loss (with train-mode
ghost BN), a cold-start Lanczos, plain full-batch GD by hand, and untracked and uninterrupted runs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import sharp.train as training
from sharp.config import TrainConfig, make_config
from sharp.errors import RunDiverged, SharpError
from sharp.losses import squared_loss, squared_loss_sum
from sharp.models import GhostBatchNorm1d
from sharp.probes.hessian import HessianOperator
from sharp.runs import RunDir, read_jsonl
from sharp.tracking import (
    LANCZOS_TOL,
    SharpnessTracker,
    batch_sharpness,
    stability_threshold,
    tracking_probe,
)
from sharp.train import TIMING_KEYS, build, train, train_step

F64 = torch.float64


def _windows(t):
    return t.train_loader.windows(0, t.cfg.batch_size, t.cfg.micro_batch or t.cfg.batch_size)


def _linear(name, in_channels, num_classes, image_size, *rest):
    """A linear model: under the squared loss the Hessian is I_classes ⊗ mean(x̃ x̃ᵀ), x̃ = [x; 1]."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes))


def _stack(batches):
    inputs, targets = zip(*batches, strict=True)
    x = torch.cat(inputs).flatten(1).to(F64)
    return torch.cat([x, torch.ones(len(x), 1, dtype=F64)], 1), torch.cat(targets)


@pytest.mark.parametrize(
    ("tol", "batch", "micro", "track_set"),
    [
        (LANCZOS_TOL, 100, 40, "300"),  # windows of 40 + 40 + 20, and a short last one of 37
        (1e-10, 100, 40, "300"),
        (LANCZOS_TOL, 1437, 500, "full"),  # full batch on the whole split: the tracking loss is the step's
    ],
)
def test_on_a_quadratic_loss_every_tracked_point_matches_the_closed_form(
    monkeypatch, digits, exact_config, tol, batch, micro, track_set
):
    monkeypatch.setattr(training, "build_model", _linear)
    cfg = exact_config(
        batch_size=batch,
        micro_batch=micro,
        lr=0.05,
        momentum=0.9,
        weight_decay=1e-3,
        track_sharpness=3,
        track_set=track_set,
    )
    t = build(cfg, dataset=digits)
    t.tracker.tol = tol
    a_track, y_track = _stack(t.tracker.tracking_set.batches(1000))
    hessian_block = a_track.T @ a_track / len(a_track)  # the Hessian of each output's (w_c, b_c)
    top = float(torch.linalg.eigvalsh(hessian_block)[-1])
    linear = t.model[1]
    rows = []
    for step, (_, _, window) in zip(range(13), training.windows(t, training.Cursor()), strict=False):
        if t.tracker.due(step):
            row = t.tracker.measure(t.model, window, step, 0.05)
            rows.append(row)
            theta = torch.cat([linear.weight.detach(), linear.bias.detach()[:, None]], 1)  # (10, 65)
            # the step's batch: every micro-batch of the window together
            a_b, y_b = _stack(window.micro_batches())
            residual = a_b @ theta.T - nn.functional.one_hot(y_b, 10).to(F64)
            g = residual.T @ a_b / len(a_b)  # gradient of the window's mean squared loss
            h_g = g @ (a_b.T @ a_b / len(a_b))  # H_B g, H_B = I ⊗ mean(x̃ x̃ᵀ) over the window
            assert row["batch_sharpness"] == pytest.approx(float((g * h_g).sum() / (g * g).sum()), rel=1e-10)
            error = abs(row["lambda_max"] - top)
            assert error <= row["lanczos_residual"] + 1e-12 * top  # a Ritz value is within its residual
            if tol < 1e-8:
                assert row["lambda_max"] == pytest.approx(top, rel=1e-9)
            vector = t.tracker.vector.to(F64)
            v = torch.cat([vector[:640].reshape(10, 64), vector[640:, None]], 1)
            assert float((v @ hessian_block - top * v).norm()) <= 2 * row["lanczos_residual"] + 1e-9
            g_track = (a_track @ theta.T - nn.functional.one_hot(y_track, 10).to(F64)).T @ a_track
            fraction = float((g_track * v).sum()) ** 2 / float((g_track * g_track).sum() * (v * v).sum())
            assert row["grad_top_fraction"] == pytest.approx(fraction, rel=1e-9)
            # 2 (1 + β) / η − weight decay
            assert row["stability_threshold"] == pytest.approx(2 * 1.9 / 0.05 - 1e-3, rel=1e-15)
        train_step(t, window, 0.05)
    assert [r["step"] for r in rows] == [0, 3, 6, 9, 12]
    assert [r["start"] for r in rows] == ["cold"] + ["warm"] * 4


def test_warm_started_lanczos_agrees_with_a_cold_start_in_fewer_hvps(digits, exact_config):
    cfg = exact_config(
        model="fc-tanh",
        batch_size=256,
        lr=0.1,
        track_sharpness=5,
        track_set="300",
    )
    t = build(cfg, dataset=digits)
    windows = _windows(t)
    first = next(windows)
    assert t.tracker.measure(t.model, first, 0, 0.1)["start"] == "cold"
    train_step(t, first, 0.1)
    for _ in range(4):
        train_step(t, next(windows), 0.1)
    window = next(windows)
    warm = t.tracker.measure(t.model, window, 5, 0.1)
    fresh = SharpnessTracker(5, t.tracker.tracking_set, "mse", "train", seed=1)
    cold = fresh.measure(t.model, window, 5, 0.1)
    assert (warm["start"], cold["start"]) == ("warm", "cold")
    assert warm["lambda_max"] == pytest.approx(cold["lambda_max"], rel=1e-4)
    assert warm["hvps"] < cold["hvps"]
    assert warm["batch_sharpness"] == pytest.approx(
        cold["batch_sharpness"], rel=1e-12
    )  # same batch, same weights


class _GhostNet(nn.Module):
    """A tanh net with a ghost BN layer (groups of 4) and dropout, small enough for a dense Hessian."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 4), GhostBatchNorm1d(4, ghost_batch=4), nn.Tanh(), nn.Dropout(0.5)
        )
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        return self.head(self.body(x))


def _dense_hessian(loss_of, params):
    """The Hessian of `loss_of()` by double backward, row by row (the reference, not torch.func)."""
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_of(), params, create_graph=True)])
    rows = [
        torch.cat([h.reshape(-1) for h in torch.autograd.grad(g_i, params, retain_graph=True)])
        for g_i in grad
    ]
    return grad.detach(), torch.stack(rows)


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
@pytest.mark.parametrize("micro", [12, 24])
def test_squared_loss_hvps_and_batch_sharpness_match_a_dense_hessian(digits, bn_mode, micro):
    torch.manual_seed(3)
    model = _GhostNet().to(F64)
    with torch.no_grad():  # running statistics away from their initial values
        model.train()(torch.randn(32, 1, 8, 8, dtype=F64))
    assert float(model.body[2].running_var.sub(1).abs().max()) > 0.01
    x = (digits.train_images[:24].to(F64) / 255 - 0.3) / 0.4
    y = digits.train_labels[:24]
    batches = [(x[i : i + micro], y[i : i + micro]) for i in range(0, 24, micro)]
    buffers = {k: v.clone() for k, v in model.state_dict().items()}

    reference = copy.deepcopy(model)
    reference.train(bn_mode == "train")
    reference.body[4].eval()  # dropout off, as the tracking loss has it
    params = list(reference.parameters())

    def window_loss():  # each micro-batch's summed loss over the window's count, as the step has it
        return sum(squared_loss_sum(reference(xb), yb) for xb, yb in batches) / 24

    grad, dense = _dense_hessian(window_loss, params)
    assert torch.allclose(dense, dense.T, atol=1e-12)
    op = HessianOperator(tracking_probe(model, batches, "mse", bn_mode))
    v = torch.randn(op.n, dtype=F64)
    # fp64: double backward in two orders, rounding only
    assert torch.allclose(op.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)
    assert op.loss == pytest.approx(float(window_loss().detach()), rel=1e-12)
    value, hvps = batch_sharpness(model, batches, "mse", bn_mode)
    assert value == pytest.approx(float(grad @ dense @ grad / (grad @ grad)), rel=1e-10)
    assert hvps == len(batches)
    # the tracked model's running statistics are untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())


def test_squared_loss_of_the_tracking_probe_is_the_mean_half_squared_distance(digits):
    model = _GhostNet().to(F64).eval()
    x = digits.train_images[:10].to(F64) / 255
    y = digits.train_labels[:10]
    probe = tracking_probe(model, [(x[:7], y[:7]), (x[7:], y[7:])], "mse", "eval")
    assert probe.loss() == pytest.approx(float(squared_loss(model(x), y).detach()), rel=1e-12)


def test_a_full_batch_run_takes_one_step_of_plain_gradient_descent(tmp_path, digits, exact_config):
    cfg = exact_config(
        model="fc-tanh",
        batch_size=1437,  # the whole training split, as 500 + 500 + 437
        micro_batch=500,
        lr=0.3,
        steps=1,
    )
    start = build(cfg, dataset=digits)
    model = copy.deepcopy(start.model)
    x, y = digits.train_images.to(F64), digits.train_labels
    x = (x - 255 * torch.tensor(digits.mean, dtype=F64).view(1, -1, 1, 1)) / (
        255 * torch.tensor(digits.std, dtype=F64).view(1, -1, 1, 1)
    )
    loss = 0.5 * (model(x) - nn.functional.one_hot(y, 10).to(F64)).square().sum(1).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    by_hand = {
        name: (p - 0.3 * g).detach() for (name, p), g in zip(model.named_parameters(), grads, strict=True)
    }
    train(cfg, tmp_path / "gd", dataset=digits, progress_bar=False)
    final = torch.load(tmp_path / "gd" / "final.pt", weights_only=True)
    for name, expected in by_hand.items():
        assert torch.allclose(final[name], expected, rtol=0, atol=1e-13)  # fp64: summation order only
    assert any(not torch.equal(final[k], v) for k, v in start.model.state_dict().items())  # it moved


def _tracked(model: str, **extra):
    common = dict(dataset="digits", model=model, batch_size=100, micro_batch=50, steps=13, eval_every=0.25)
    common.update(lr=0.05, momentum=0.9, deterministic=True, track_sharpness=4, track_set="200")
    if model == "convnet":
        common.update(norm="bn", augment=True, width=0.5)
    else:
        common.update(norm="bn", width=0.125)  # Keskar's C1: BN without running statistics, dropout
    common.update(extra)
    return TrainConfig(**common)


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.mark.parametrize(
    ("model", "bn_mode"), [("convnet", "train"), ("convnet", "eval"), ("keskar-c1", "train")]
)
def test_tracking_does_not_change_the_trajectory(tmp_path, digits, model, bn_mode):
    tracked = _tracked(model, track_bn_mode=bn_mode)
    plain = _tracked(model, track_sharpness=None)
    train(tracked, tmp_path / "tracked", dataset=digits, progress_bar=False)
    train(plain, tmp_path / "plain", dataset=digits, progress_bar=False)
    a = torch.load(tmp_path / "tracked" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "plain" / "final.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # BN buffers included
    rows = read_jsonl(tmp_path / "tracked" / "metrics.jsonl")
    tracking_rows = [r for r in rows if "lambda_max" in r]
    assert [r["step"] for r in tracking_rows] == [0, 4, 8, 12]
    for row in tracking_rows:  # the cost of each point: its time and its Lanczos HVPs
        assert math.isfinite(row["seconds"]) and row["seconds"] >= 0
        assert type(row["hvps"]) is int and row["hvps"] > 0
    assert _strip([r for r in rows if "lambda_max" not in r]) == _strip(
        read_jsonl(tmp_path / "plain" / "metrics.jsonl")
    )
    settings = RunDir(tmp_path / "tracked").read_config()["derived"]["tracking"]
    assert settings["bn_mode"] == bn_mode and settings["set_size"] == 200


@pytest.mark.parametrize("interrupt_at", [5, 12])
def test_a_resumed_tracked_run_is_bit_identical_to_an_uninterrupted_one(
    tmp_path, digits, monkeypatch, interrupt_at
):
    cfg = _tracked("convnet")
    train(cfg, tmp_path / "full", dataset=digits, progress_bar=False)
    original, calls = training.train_step, []

    def interrupted(t, window, lr, stop=False):
        calls.append(1)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt  # at once: resume from the last checkpoint, later rows dropped
        return original(t, window, lr, stop)

    monkeypatch.setattr(training, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", dataset=digits, progress_bar=False)
    monkeypatch.setattr(training, "train_step", original)
    train(cfg, tmp_path / "cut", resume=True, dataset=digits, progress_bar=False)
    a = torch.load(tmp_path / "full" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    full, cut = (_strip(read_jsonl(tmp_path / n / "metrics.jsonl")) for n in ("full", "cut"))
    assert cut == full  # every tracked row once, with the same HVP counts (warm vector from last.pt)
    assert [r["start"] for r in full if "lambda_max" in r] == ["cold", "warm", "warm", "warm"]


def test_until_train_acc_stops_at_the_first_evaluation_that_reaches_it(tmp_path, digits):
    cfg = TrainConfig(
        dataset="digits", model="mlp", batch_size=64, lr=0.1, epochs=20, eval_every=0.25, until_train_acc=0.6
    )
    train(cfg, tmp_path / "acc", dataset=digits, progress_bar=False)
    accuracies = [r["eval_train_acc"] for r in read_jsonl(tmp_path / "acc" / "metrics.jsonl")]
    assert accuracies[-1] >= 0.6 and all(a < 0.6 for a in accuracies[:-1])
    assert len(accuracies) < 20 * 4 + 1  # it stopped early
    assert "--until-train-acc" in RunDir(tmp_path / "acc").status()["reason"]


def test_stability_threshold_is_the_heavy_ball_bound():
    assert stability_threshold(0.01) == pytest.approx(200.0, rel=1e-15)
    assert stability_threshold(0.02, momentum=0.9) == pytest.approx(190.0, rel=1e-15)
    assert stability_threshold(0.1, weight_decay=5e-4) == pytest.approx(20.0 - 5e-4, rel=1e-15)


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"track_sharpness": 10, "optimizer": "adam"}, "preconditioned Hessian"),
        ({"track_sharpness": 0}, "--track-sharpness 0 must be positive"),
        ({"track_sharpness": 10, "track_set": "half"}, "--track-set 'half'"),
        ({"until_train_acc": 99.0}, "is a fraction"),
    ],
)
def test_bad_tracking_settings_are_one_line_errors(settings, fragment):
    with pytest.raises(SharpError, match=fragment) as caught:
        make_config(settings, {})
    assert "\n" not in str(caught.value)


def test_track_set_larger_than_the_training_split_is_refused(digits):
    with pytest.raises(SharpError, match="exceeds the 500 training images"):
        build(TrainConfig(dataset="digits", train_subset=500, track_sharpness=5), dataset=digits)


def test_track_set_accepts_a_toml_count_and_full():
    assert make_config({"track_sharpness": 5, "track_set": 200}, {}).track_set == "200"
    assert make_config({"track_sharpness": 5, "track_set": "full"}, {}).track_set == "full"


def test_a_run_that_diverges_under_tracking_is_reported_as_diverged(tmp_path, digits):
    cfg = TrainConfig(
        dataset="digits", model="mlp", batch_size=64, lr=1e8, steps=40, track_sharpness=1, track_set="100"
    )
    with pytest.raises(RunDiverged):
        train(cfg, tmp_path / "div", dataset=digits, progress_bar=False)
    assert RunDir(tmp_path / "div").status()["state"] == "diverged"
