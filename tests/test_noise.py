"""Gradient noise scale B_simple = tr(Σ)/|G|² (McCandlish et al. 2018), offline and online.

References are exact for the finite pool: per-example gradients in closed form (linear
regression) or by torch.func.vmap(grad) (digits MLP), their mean G and population
covariance Σ. Tolerances are several standard deviations of the seeded estimators, measured
over seeds when the tests were written (noted at each assert).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import sharp.train as training
from sharp.cli import cli
from sharp.config import TrainConfig
from sharp.data import DeviceLoader
from sharp.errors import SharpError
from sharp.models import build_model
from sharp.probes.common import TensorPool
from sharp.probes.noise import OnlineNoiseScale, gradient_noise_scale, two_batch_estimate
from sharp.runs import RunDir, read_jsonl
from sharp.train import TIMING_KEYS, train

# --- linear regression: per-example gradient x_i (x_iᵀw − y_i) in closed form -------------------


def half_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return 0.5 * (outputs.squeeze(-1) - targets).square().mean()


def linear_problem(n: int = 64, d: int = 20, seed: int = 0):
    """±1 features, targets from a true w plus noise, model away from the optimum."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 2, (n, d), generator=gen).double() * 2 - 1
    w_true = torch.randn(d, generator=gen, dtype=torch.float64)
    y = x @ w_true + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w_true + 0.3 * torch.randn(d, generator=gen, dtype=torch.float64))
    return model, x, y


def exact_linear(model: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    w = model.weight.detach()[0]
    per_example = x * (x @ w - y)[:, None]
    g = per_example.mean(0)
    deviations = per_example - g
    sigma = deviations.T @ deviations / len(y)  # population covariance of the pool
    hessian = x.T @ x / len(y)
    return {
        "g2": float(g @ g),
        "trace_sigma": float(sigma.trace()),
        "b_simple": float(sigma.trace() / (g @ g)),
        "b_noise": float((hessian @ sigma).trace() / (g @ hessian @ g)),
    }


def rel(a: float, b: float) -> float:
    return abs(a / b - 1)


def test_offline_without_replacement_matches_the_exact_pool_values():
    model, x, y = linear_problem()
    exact = exact_linear(model, x, y)
    assert 10 < exact["b_simple"] < 15  # a noise scale between the two batch sizes
    # b_big = 56 of the 64 examples: the finite-population correction is large here.
    result = gradient_noise_scale(
        model,
        list(zip(x.split(32), y.split(32), strict=True)),
        4,
        56,
        n_pairs=1500,
        seed=1,
        loss_fn=half_squared_error,
        estimate_b_noise=True,
    )
    # Standard deviations over seeds at 1500 pairs: b_simple 2%, g2 0.4%, tr Σ 2%, B_noise 2.5%.
    assert rel(result.b_simple, exact["b_simple"]) < 0.08
    assert rel(result.g2, exact["g2"]) < 0.03
    assert rel(result.trace_sigma, exact["trace_sigma"]) < 0.08
    assert rel(result.b_noise, exact["b_noise"]) < 0.1
    assert result.b_simple_stderr < 0.05 * result.b_simple
    assert abs(result.b_simple - exact["b_simple"]) < 4 * result.b_simple_stderr
    # the same two numbers divided: rounding only, 1e-12 is ample
    assert result.b_simple == pytest.approx(result.trace_sigma / result.g2, rel=1e-12)
    # two gradients and two HVPs per draw, plus the one gradient whose graph the HVPs reuse
    assert result.evaluations == {"grad": 3001, "hvp": 3000} and result.gradient_examples == 1500 * 60
    assert result.population == 64 and result.pool == "probe set"
    # the blocks of draws: 5 estimates from 300 draws each, their spread larger than the pooled stderr
    assert len(result.b_simple_repeats) == 5 and result.b_simple_std > result.b_simple_stderr
    assert abs(result.b_simple_mean - exact["b_simple"]) < 4 * result.b_simple_std / 5**0.5
    assert result.n_pairs == 1500 and result.b_small == 4 and result.b_big == 56
    assert result.settings["replacement"] is False and result.to_dict()["probe"] == "noise_scale"

    # The same draws read with the infinite-pool formula (no correction) are 20-33% off.
    g2, trace = two_batch_estimate(result.g2_small_mean, 1 / 4, result.g2_big_mean, 1 / 56)
    assert rel(trace / g2, exact["b_simple"]) > 0.15


def test_offline_with_replacement_matches_the_exact_pool_values():
    model, x, y = linear_problem()
    exact = exact_linear(model, x, y)
    result = gradient_noise_scale(
        model, (x, y), 4, 56, n_pairs=2000, seed=2, loss_fn=half_squared_error, replacement=True
    )
    # Standard deviations over seeds at 2000 pairs: b_simple 4%, g2 1.5%, tr Σ 3%.
    assert rel(result.b_simple, exact["b_simple"]) < 0.15
    assert rel(result.g2, exact["g2"]) < 0.06
    assert rel(result.trace_sigma, exact["trace_sigma"]) < 0.12
    assert result.c_big == pytest.approx(1 / 56) and result.b_noise is None


def test_offline_estimate_refers_to_the_pool_it_draws_from():
    """With the whole training split as the pool, the estimate is the training set's B_simple, not
    the probe set's (the probe set only supplies the Hessian for B_noise)."""
    model, x, y = linear_problem(n=200, seed=5)
    training = exact_linear(model, x, y)
    probe_set = exact_linear(model, x[:48], y[:48])
    assert rel(probe_set["b_simple"], training["b_simple"]) > 0.3  # the two targets are apart
    result = gradient_noise_scale(
        model,
        [(x[:48], y[:48])],
        4,
        120,
        n_pairs=1500,
        seed=5,
        loss_fn=half_squared_error,
        pool=TensorPool(x, y),
        pool_name="training split",
    )
    assert result.population == 200 and result.pool == "training split"
    assert result.c_big == pytest.approx((200 - 120) / (120 * 199), rel=1e-15)  # the correction with N = 200
    # Its standard error at 1500 pairs is 2.5% (0.4-1.9% off over five problems): 4 standard
    # errors, and 10% (a third of the gap to the probe set's value) bound it
    assert abs(result.b_simple - training["b_simple"]) < 4 * result.b_simple_stderr
    assert rel(result.b_simple, training["b_simple"]) < 0.1


def _online_steps(estimator, model, x, y, steps, count, micro, seed):
    """Windows of `count` distinct examples at fixed parameters, accumulated as the trainer does.

    Also returns the same steps read the wrong way: accumulated-gradient differences
    squared without undoing the 1/count scaling of each micro-batch's loss."""
    wrong = OnlineNoiseScale(estimator.decay, estimator.population)
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    for _ in range(steps):
        window = torch.randperm(len(y), generator=gen)[:count]
        model.zero_grad(set_to_none=True)
        estimator.begin_step(params, count)
        previous, squares, sizes = torch.zeros_like(model.weight).flatten(), [], []
        for chunk in window.split(micro):
            (0.5 * (model(x[chunk]).squeeze(-1) - y[chunk]).square().sum() / count).backward()
            estimator.after_backward(len(chunk))
            current = model.weight.grad.flatten().clone()
            squares.append(float((current - previous).square().sum()))
            sizes.append(len(chunk))
            previous = current
        assert estimator.end_step()
        wrong.record(squares, sizes, float(previous.square().sum()), count)
    return wrong


def test_online_estimator_at_fixed_parameters_matches_the_exact_pool_values():
    model, x, y = linear_problem()
    exact = exact_linear(model, x, y)
    estimator = OnlineNoiseScale(decay=0.99, population=len(y))
    # windows of 30 as micro-batches 8, 8, 8, 6: unequal sizes enter through mean c(n_k)
    wrong = _online_steps(estimator, model, x, y, steps=800, count=30, micro=8, seed=3)
    # Standard deviations over seeds: b_simple 2%, g2 2%, tr Σ 1.5%.
    assert rel(estimator.b_simple, exact["b_simple"]) < 0.08
    assert rel(estimator.g2, exact["g2"]) < 0.08
    assert rel(estimator.trace_sigma, exact["trace_sigma"]) < 0.06
    assert estimator.steps == 800
    # forgetting to undo the accumulation scaling makes the small gradients K² too small
    assert wrong.b_simple is None or rel(wrong.b_simple, exact["b_simple"]) > 0.5

    # A step with one micro-batch carries no information; the averages stay as they were.
    before = estimator.state_dict()
    assert not estimator.record([1.0], [30], 1.0, 30)
    assert estimator.state_dict() == before
    again = OnlineNoiseScale()
    again.load_state_dict(before)
    assert again.b_simple == estimator.b_simple and again.g2 == estimator.g2


def test_online_estimator_is_none_until_it_has_a_step():
    estimator = OnlineNoiseScale()
    assert estimator.b_simple is None and estimator.g2 is None and estimator.trace_sigma is None
    # |G_small|² = 3, |G_big|² = 1.5 for b = 2, B = 4 (no correction): tr Σ = 6, |G|² = 0
    assert estimator.record([3.0, 3.0], [2, 2], 1.5, 4)
    assert estimator.trace_sigma == pytest.approx(6.0) and estimator.g2 == pytest.approx(0.0, abs=1e-12)
    assert estimator.b_simple is None  # |G|² estimate not positive


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"b_small": 8, "b_big": 8}, "1 <= b_small < b_big"),
        ({"b_small": 8, "b_big": 60}, "exceeds the 64 examples of the pool"),
        ({"repeats": 1}, "repeats=1"),
        ({"n_pairs": 0}, "n_pairs 0"),
        ({"bn_mode": "train"}, "bn_mode 'train'"),
    ],
)
def test_bad_arguments_are_sharp_errors(kwargs, fragment):
    model, x, y = linear_problem()
    args = {"b_small": 4, "b_big": 16, **kwargs}
    with pytest.raises(SharpError, match=fragment.replace("(", r"\(")):
        gradient_noise_scale(model, (x, y), loss_fn=half_squared_error, **args)
    with pytest.raises(SharpError, match="decay"):
        OnlineNoiseScale(decay=1.0)


# --- the trainer's online estimate on digits ---------------------------------------------------


def exact_cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Per-example gradients by vmap(grad): the pool's G and population tr Σ."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(torch.func.functional_call(model, p, (xi[None],)), yi[None])

    per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([v.reshape(len(y), -1) for v in per_example.values()], 1)
    g = flat.mean(0)
    trace = float((flat - g).square().sum(1).mean())
    return {"g2": float(g @ g), "trace_sigma": trace, "b_simple": trace / float(g @ g)}


def _noise_run(**settings) -> TrainConfig:
    """A run of the MLP on unaugmented digits that logs the online noise scale, with `settings`."""
    return TrainConfig(dataset="digits", model="mlp", augment=False, noise_scale=True, **settings)


def test_trainer_online_estimate_agrees_with_the_direct_one(tmp_path, digits):
    # lr 1e-12: the parameters stay put, so every step measures the same point.
    # 1,437 examples in windows of 60 (micro-batches 16, 16, 16, 12) and a last one of 57.
    cfg = _noise_run(
        norm="none", batch_size=60, micro_batch=16, epochs=9, eval_every=3, precision="fp64", lr=1e-12
    )
    train(cfg, tmp_path / "run", dataset=digits, progress_bar=False)
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 72, 144, 216]
    assert metrics[0]["noise_b_simple"] is None and metrics[0]["noise_g2"] is None
    online = metrics[-1]

    model = build_model("mlp", 1, 10, 8, norm="none").double()
    model.load_state_dict(torch.load(tmp_path / "run" / "final.pt", weights_only=True))
    loader = DeviceLoader(
        digits.train_images, digits.train_labels, digits.mean, digits.std, dtype=torch.float64
    )
    exact = exact_cross_entropy(model, loader.normalize(loader.images), loader.labels)
    # Over seeds, the online estimate after 216 steps (EMA decay 0.99) has standard deviations
    # b_simple 3.5%, |G|² 3%, tr Σ 1.5%.
    assert rel(online["noise_b_simple"], exact["b_simple"]) < 0.15
    assert rel(online["noise_g2"], exact["g2"]) < 0.15
    assert rel(online["noise_trace_sigma"], exact["trace_sigma"]) < 0.06

    direct = gradient_noise_scale(model, list(loader.batches(512)), 16, 60, n_pairs=1000, seed=0)
    assert abs(direct.b_simple - exact["b_simple"]) < 4 * direct.b_simple_stderr
    assert (
        rel(online["noise_b_simple"], direct.b_simple) < 0.15 + 4 * direct.b_simple_stderr / direct.b_simple
    )


def test_noise_scale_state_resumes_exactly(tmp_path, monkeypatch, digits):
    cfg = _noise_run(
        batch_size=100, micro_batch=25, epochs=2, eval_every=0.5, momentum=0.9, lr=0.05, deterministic=True
    )
    train(cfg, tmp_path / "full", dataset=digits, progress_bar=False)

    original, calls = training.train_step, []

    def interrupted(t, window, lr, stop=False):
        calls.append(1)
        if len(calls) == 11:
            raise KeyboardInterrupt
        return original(t, window, lr, stop)

    monkeypatch.setattr(training, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", dataset=digits, progress_bar=False)
    monkeypatch.setattr(training, "train_step", original)
    saved = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["noise_scale"]["steps"] == saved["progress"]["step"] > 0
    train(cfg, tmp_path / "cut", resume=True, dataset=digits, progress_bar=False)

    strip = lambda ms: [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in ms]  # noqa: E731
    full = strip(read_jsonl(tmp_path / "full" / "metrics.jsonl"))
    assert full == strip(read_jsonl(tmp_path / "cut" / "metrics.jsonl"))
    assert all(m["noise_b_simple"] > 0 for m in full[1:])


# --- the command line --------------------------------------------------------------------------


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_noise_scale_writes_the_fields(tmp_path):
    base = ["train", "--dataset", "digits", "--model", "mlp", "--steps", "6", "--batch-size", "32"]
    result = _invoke(
        *base,
        "--micro-batch",
        "8",
        "--noise-scale",
        "--eval-every",
        "0.1",
        "--out",
        tmp_path / "n",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    metrics = read_jsonl(tmp_path / "n" / "metrics.jsonl")
    assert len(metrics) >= 2 and metrics[-1]["step"] == 6
    assert metrics[0]["noise_b_simple"] is metrics[0]["noise_g2"] is metrics[0]["noise_trace_sigma"] is None
    assert all(m["noise_g2"] > 0 and m["noise_trace_sigma"] > 0 for m in metrics[1:])
    # b_simple is EMA(tr S)/EMA(|G|^2); the logged parts divide the same two EMAs by the same bias
    # correction first, so the two quotients differ only by rounding: a few ulps, 1e-12 is ample
    for m in metrics[1:]:
        assert m["noise_b_simple"] == pytest.approx(m["noise_trace_sigma"] / m["noise_g2"], rel=1e-12)
    assert RunDir(tmp_path / "n").read_config()["derived"]["noise_scale_decay"] == 0.99

    plain = _invoke(*base, "--micro-batch", "8", "--out", tmp_path / "p", "--quiet")
    assert plain.exit_code == 0, plain.output
    assert "noise_b_simple" not in read_jsonl(tmp_path / "p" / "metrics.jsonl")[-1]


@pytest.mark.parametrize(
    "args",
    [
        ["--batch-size", "32"],  # the micro-batch defaults to the whole batch
        ["--batch-size", "32", "--micro-batch", "32"],
        ["--batch-size", "32", "--micro-batch", "8", "--batch-schedule", "0:32,1:8"],
    ],
)
def test_cli_noise_scale_without_micro_batches_is_one_line_and_exit_2(tmp_path, args):
    result = _invoke(
        "train",
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--steps",
        "2",
        "--noise-scale",
        *args,
        "--out",
        tmp_path / "bad",
        "--quiet",
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sharp: error: --noise-scale needs --micro-batch smaller")
