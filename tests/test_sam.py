"""SAM, ASAM and m-SAM (sharp.optim, and --sam-* in the training step) against closed forms
on quadratic losses, torch's Adam fed the gradient at w + ε, ghost BN by hand, exact
accumulation, BN running statistics and bad input."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from sharp.config import TrainConfig, make_config
from sharp.errors import SharpError
from sharp.models import set_bn_batch
from sharp.optim import SAM
from sharp.train import build, make_optimizer, train, train_step

F64 = torch.float64


# --- sharp.optim.SAM on f(w) = ½ (w − c)ᵀ H (w − c) ----------------------------------------------


def _quadratic(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=F64)
    h = a @ a.T + n * torch.eye(n, dtype=F64)
    c = torch.randn(n, generator=gen, dtype=F64)
    w0 = torch.randn(n, generator=gen, dtype=F64)
    return h, c, w0


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_optimizer_step_is_the_closed_form(adaptive):
    h, c, w0 = _quadratic()
    w = nn.Parameter(w0.clone())
    lr, rho = 0.01, 0.3
    optimizer = SAM([w], torch.optim.SGD, rho=rho, adaptive=adaptive, lr=lr)

    def loss():
        return 0.5 * (w - c) @ h @ (w - c)

    loss().backward()
    optimizer.first_step(zero_grad=True)
    loss().backward()
    optimizer.second_step(zero_grad=True)
    g = h @ (w0 - c)
    eps = rho * w0.abs() ** 2 * g / (w0.abs() * g).norm() if adaptive else rho * g / g.norm()
    expected = w0 - lr * h @ (w0 + eps - c)  # Foret et al.'s step; Kwon et al.'s with T = |w|
    assert torch.allclose(w.detach(), expected, rtol=0, atol=1e-14)


def test_sam_optimizer_step_with_a_closure_and_its_state():
    h, c, w0 = _quadratic(seed=1)
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    first = SAM([a], torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9)
    second = SAM([b], torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9)
    for _ in range(3):
        (0.5 * (a - c) @ h @ (a - c)).backward()
        first.first_step(zero_grad=True)
        (0.5 * (a - c) @ h @ (a - c)).backward()
        first.second_step(zero_grad=True)

        def closure():
            loss = 0.5 * (b - c) @ h @ (b - c)
            loss.backward()
            return loss

        closure()
        second.step(closure)
        second.zero_grad()
    assert torch.equal(a, b)
    assert "momentum_buffer" in first.base_optimizer.state[a]  # the base optimizer keeps its state


# --- the training step on a linear model with the squared loss: a quadratic in W ----------------


def _linear(cfg, digits):
    """A built run whose model is one bias-free linear layer: with --loss mse the mean loss
    ½ mean_i ‖W x_i − e_{y_i}‖² is quadratic in W with gradient (W X − Y) Xᵀ / n."""
    t = build(cfg, dataset=digits)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10, bias=False)).to(F64)
    t.model = t.forward = model
    t.params = list(model.parameters())
    t.optimizer = make_optimizer(cfg, model, cfg.lr)
    return t


def _gradient(w, x, y, n):
    """(W X − Y) Xᵀ / n for examples x (k, 1, 8, 8), flattened, and one-hot targets of y."""
    x = x.flatten(1)
    targets = torch.nn.functional.one_hot(y, 10).to(F64)
    return (x @ w.T - targets).T @ x / n


def _examples(window):
    """A window's inputs and labels, in micro-batch order."""
    x, y = zip(*window.micro_batches(), strict=True)
    return torch.cat(x), torch.cat(y)


# m: None (one ascent per window of 48), 1 (per example), 4 and 8, 16 = the micro-batch (one
# ascent per micro-batch)
@pytest.mark.parametrize(
    ("adaptive", "m"),
    [(False, None), (True, None), (False, 1), (False, 4), (True, 8), (False, 16), (True, 16)],
)
def test_training_step_is_the_closed_form(digits, exact_config, adaptive, m):
    lr, rho = 0.1, 0.05
    cfg = exact_config(
        batch_size=48,
        micro_batch=16,
        lr=lr,
        sam_rho=rho,
        sam_adaptive=adaptive,
        sam_m=m,
    )
    t = _linear(cfg, digits)
    w = t.params[0].detach().clone()
    window = next(t.train_loader.windows(0, 48, 16))
    x, y = _examples(window)

    def ascent(g):
        if adaptive:
            return rho * w.abs() ** 2 * g / (w.abs() * g).norm()
        return rho * g / g.norm()

    if m is None:  # one ascent from the window's gradient
        expected = w - lr * _gradient(w + ascent(_gradient(w, x, y, 48)), x, y, 48)
    else:  # one ascent per group of m consecutive examples, each group's loss at its own w + ε
        step = sum(
            _gradient(w + ascent(_gradient(w, xg, yg, len(yg))), xg, yg, 48)
            for xg, yg in zip(x.split(m), y.split(m), strict=True)
        )
        expected = w - lr * step
    train_step(t, window, lr)
    assert torch.allclose(t.params[0].detach(), expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_sam_steps_adam_with_the_gradient_at_w_plus_epsilon(digits, exact_config, kind):
    # torch's optimizer as the reference, fed by hand the gradient at w + ε of each window; its
    # weight decay (L2 for Adam, decoupled for AdamW) then acts at w, as SAM's descent step does
    lr, rho, decay = 0.01, 0.05, 0.1
    cfg = exact_config(batch_size=48, micro_batch=16, lr=lr, optimizer=kind, weight_decay=decay, sam_rho=rho)
    t = _linear(cfg, digits)
    base = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    w, w_plain = (nn.Parameter(t.params[0].detach().clone()) for _ in range(2))
    reference, plain = (base([p], lr=lr, weight_decay=decay) for p in (w, w_plain))
    for window in itertools.islice(t.train_loader.windows(0, 48, 16), 3):
        x, y = _examples(window)
        g = _gradient(w.detach(), x, y, 48)
        w.grad = _gradient(w.detach() + rho * g / g.norm(), x, y, 48)
        w_plain.grad = _gradient(w_plain.detach(), x, y, 48)
        reference.step()
        plain.step()
        train_step(t, window, lr)
    assert torch.allclose(t.params[0].detach(), w.detach(), rtol=0, atol=1e-13)  # fp64 rounding
    assert (w - w_plain).abs().max() > 1e-3  # without the ascent the steps differ: the test shows it


@pytest.mark.parametrize("m", [None, 4])
def test_sam_is_exact_under_accumulation(tmp_path, digits, digits_config, m):
    # 1437 examples in windows of 60: micro-batches 16,16,16,12 (and 4 groups of 4 each), and a
    # short last window of 57 (16,16,16,9: groups ..., 4, 4, 1), the same groups as one batch of 60
    def final(name, micro):
        cfg = digits_config(
            precision="fp64",
            batch_size=60,
            micro_batch=micro,
            epochs=1,
            lr=0.3,
            momentum=0.9,
            sam_rho=0.05,
            sam_m=m,
        )
        train(cfg, tmp_path / name, dataset=digits, progress_bar=False)
        return torch.load(tmp_path / name / "final.pt", weights_only=True)

    split, whole = final("split", 16), final("whole", 60)
    assert max((split[k] - whole[k]).abs().max().item() for k in split) < 1e-10  # fp64 rounding only


def test_sam_updates_bn_running_statistics_in_its_first_pass_only(synthetic):
    common = dict(dataset="synthetic", model="convnet", batch_size=32, micro_batch=16, lr=0.1, augment=False)
    plain = build(TrainConfig(**common), dataset=synthetic)
    sharp_aware = build(TrainConfig(**common, sam_rho=0.5), dataset=synthetic)
    for t in (plain, sharp_aware):
        train_step(t, next(t.train_loader.windows(0, 32, 16)), 0.1)
    for a, b in zip(plain.model.buffers(), sharp_aware.model.buffers(), strict=True):
        assert torch.equal(a, b)  # the same first pass: bit for bit
    moved = [p for p, q in zip(plain.params, sharp_aware.params, strict=True) if not torch.equal(p, q)]
    assert moved  # while the weights did take a different step


@pytest.mark.parametrize("m", [None, 8])
def test_sam_second_pass_normalizes_the_same_ghost_bn_groups(digits, m):
    # the reference: each ghost group of 4 through a copy of the net on its own (torch's plain
    # batch norm over the group); the ascent from the window's gradient (or each m-SAM group's)
    # and the descent from the gradient at w + ε over the same ghost groups
    lr, rho, ghost, n = 0.1, 0.5, 4, 32
    cfg = TrainConfig(
        dataset="digits",
        model="convnet",
        norm="bn",
        bn_batch=ghost,
        batch_size=n,
        micro_batch=16,
        lr=lr,
        precision="fp64",
        sam_rho=rho,
        sam_m=m,
    )
    t = build(cfg, dataset=digits)
    reference = copy.deepcopy(t.model)
    set_bn_batch(reference, None)
    names = [name for name, _ in reference.named_parameters()]
    w = [p.detach().clone() for p in t.params]
    window = next(t.train_loader.windows(0, n, 16))
    x, y = _examples(window)

    def gradient(params, xs, ys, groups):
        values = [p.clone().requires_grad_(True) for p in params]
        loss = sum(
            F.cross_entropy(
                functional_call(reference, dict(zip(names, values, strict=True)), (xg,)), yg, reduction="sum"
            )
            for xg, yg in zip(xs.split(groups), ys.split(groups), strict=True)
        )
        return torch.autograd.grad(loss / n, values)

    def expected(second_groups):
        step = [torch.zeros_like(p) for p in w]
        for xb, yb in zip(x.split(m or n), y.split(m or n), strict=True):
            g = gradient(w, xb, yb, ghost)
            norm = torch.linalg.vector_norm(torch.stack([gi.norm() for gi in g]))
            ascended = [p + rho * gi / norm for p, gi in zip(w, g, strict=True)]
            step = [s + gi for s, gi in zip(step, gradient(ascended, xb, yb, second_groups), strict=True)]
        return [p - lr * s for p, s in zip(w, step, strict=True)]

    train_step(t, window, lr)
    for p, q in zip(t.params, expected(ghost), strict=True):
        assert torch.allclose(p.detach(), q, rtol=0, atol=1e-13)  # fp64 rounding
    # a second pass over groups of the whole micro-batch (or m-SAM group) would differ
    other = expected(m or 16)
    assert max((p.detach() - q).abs().max().item() for p, q in zip(t.params, other, strict=True)) > 1e-5


def test_sam_second_pass_draws_the_same_dropout_masks(synthetic):
    # at a vanishing radius the second pass's gradient is the first's, but only if its
    # dropout masks are the same: with fresh masks the two gradients differ at O(1)
    common = dict(
        dataset="synthetic",
        model="keskar-c1",
        width=0.125,
        batch_size=16,
        lr=0.01,
        augment=False,
        precision="fp64",
        optimizer="sgd",
    )
    plain = build(TrainConfig(**common), dataset=synthetic)
    tiny = build(TrainConfig(**common, sam_rho=1e-9), dataset=synthetic)
    for t in (plain, tiny):
        torch.manual_seed(5)
        train_step(t, next(t.train_loader.windows(0, 16, 16)), 0.01)
    for p, q in zip(plain.params, tiny.params, strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-9)


SAM_RECORD = {
    "passes": 2,
    "bn_running_statistics": "first pass only",
    "dropout": "the same masks in both passes",
}


@pytest.mark.parametrize(
    ("flags", "settings", "record"),
    [
        ([], (0.0, False, None), None),
        (
            ["--sam-rho", "0.05"],
            (0.05, False, None),
            {**SAM_RECORD, "rho": 0.05, "perturbation": "rho g / ||g|| (SAM)", "ascent_per": "whole window"},
        ),
        (
            ["--sam-rho", "0.05", "--sam-adaptive", "--sam-m", "4"],
            (0.05, True, 4),
            {
                **SAM_RECORD,
                "rho": 0.05,
                "perturbation": "rho |w|^2 g / || |w| g || (ASAM)",
                "ascent_per": "group of 4 examples (m-SAM)",
            },
        ),
    ],
    ids=["off", "sam", "asam-m"],
)
def test_config_json_records_sam_and_reruns_the_same_steps(tmp_path, flags, settings, record):
    from click.testing import CliRunner

    from sharp.cli import cli

    args = ["train", "--dataset", "digits", "--model", "mlp", "--norm", "none", "--precision", "fp64"]
    args += ["--batch-size", "64", "--micro-batch", "16", "--steps", "3", "--lr", "0.2", "--quiet"]
    first = CliRunner().invoke(cli, [*args, *flags, "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(
        cli, [*args, "--config", str(tmp_path / "a" / "config.json"), "--out", str(tmp_path / "b")]
    )
    assert again.exit_code == 0, again.output
    # the run, and its rerun from config.json alone; ρ compared with ==: JSON's shortest repr
    # reads back the very float given
    for run in "ab":
        config = json.loads((tmp_path / run / "config.json").read_text())
        assert tuple(config["settings"][k] for k in ("sam_rho", "sam_adaptive", "sam_m")) == settings
        assert config["derived"]["sam"] == record
    a, b = (torch.load(tmp_path / run / "final.pt", weights_only=True) for run in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same settings, seed and process: bit for bit


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"sam_rho": -0.1}, "--sam-rho -0.1 must be zero or positive"),
        ({"sam_m": 4}, "--sam-m modifies SAM: give --sam-rho"),
        ({"sam_adaptive": True}, "--sam-adaptive modifies SAM"),
        ({"sam_rho": 0.05, "sam_m": 5, "batch_size": 64, "micro_batch": 16}, "--sam-m 5 does not divide"),
        ({"sam_rho": 0.05, "sam_m": 0}, "--sam-m 0 must be positive"),
        (
            {"sam_rho": 0.05, "sam_m": 4, "noise_scale": True, "batch_size": 64, "micro_batch": 16},
            "m-SAM never forms",
        ),
    ],
)
def test_bad_sam_settings_are_one_line_errors(settings, fragment):
    with pytest.raises(SharpError, match=fragment) as error:
        make_config(settings, {})
    assert "\n" not in str(error.value)


def test_the_sam_spec_runs_end_to_end_and_reports_each_variant(tmp_path):
    import re

    import tomllib

    from analysis.results import load_runs
    from analysis.sam import variant
    from sharp.repro import SPEC_DIR, ReproSpec, run_repro

    data = tomllib.loads((SPEC_DIR / "sam.toml").read_text())
    cpu = data["scales"]["cpu"]
    cpu["base"].update(dataset="digits", model="convnet", width=0.5, train_subset=400, epochs=1)
    cpu["base"].update(test_subset=100, eval_train_size=128, eval_every=1.0)
    cpu["groups"]["sam"]["axes"]["batch_size,micro_batch"] = [[16, 16], [128, 64]]
    cpu["groups"]["sam"]["probes"] = [
        {
            "probe_set": 64,
            "bn_mode": "recompute",
            "bn_set": 128,
            "sharpness": True,
            "eps": "1e-3",
            "maxiter": 2,
            "adaptive": True,
            "hessian": True,
            "top_k": 1,
        },
    ]
    report = run_repro(ReproSpec.from_dict(data, "cpu"), tmp_path / "sam", echo=lambda _: None)
    runs = load_runs([tmp_path / "sam" / "runs"])
    assert sorted({variant(r) for r in runs}) == ["ASAM ρ=0.5", "SAM ρ=0.05", "SGD"] and len(runs) == 6
    text = report.read_text()
    for run in runs:  # every table row holds the run's own final test accuracy (one seed: no ±)
        row = next(
            line for line in text.splitlines() if line.startswith(f"| {variant(run)} | {run.batch_size} |")
        )
        assert f"| {100 * run.final['test_acc']:.4g} |" in row
    assert re.search(r"\(figures/sam_comparison\.png\)", text)
