"""The training loop's settings against independent references: precision, compile, norms,
initialization, stopping rules, warm starts, losses, TensorBoard, divergence and restarts."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import sharp.train as training
from sharp.checkpoint import Checkpointer
from sharp.config import TrainConfig
from sharp.errors import RunDiverged
from sharp.losses import squared_loss, squared_loss_sum
from sharp.models import build_model
from sharp.runs import RunDir, read_jsonl
from sharp.train import (
    CHECK_EVERY,
    TIMING_KEYS,
    Cursor,
    accumulate_gradients,
    build,
    optimizer_options,
    plateaued,
    train,
)

F64 = torch.float64


def test_bf16_autocast_tracks_fp32_and_really_computes_in_bf16(synthetic, step_losses):
    common = dict(dataset="synthetic", model="convnet", batch_size=32, lr=0.05, augment=False)
    fp32 = build(TrainConfig(**common), dataset=synthetic)
    bf16 = build(TrainConfig(**common, precision="bf16"), dataset=synthetic)
    seen = []
    bf16.model.fc.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    reference, ours = step_losses(fp32, 5), step_losses(bf16, 5)
    assert seen and all(dtype == torch.bfloat16 for dtype in seen)  # autocast is really on
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # weights stay fp32
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.2 % per operation); over 5 steps
    # of a two-layer net the losses agree to a few percent, not to fp32's 1e-6
    assert ours == pytest.approx(reference, rel=3e-2)
    assert max(abs(a - b) for a, b in zip(ours, reference, strict=True)) > 0  # not secretly fp32


def _compiler_works() -> bool:
    import torch._dynamo

    try:
        torch.compile(torch.nn.Linear(2, 2))(torch.randn(3, 2))
        return True
    except Exception:  # any failure of the toolchain means "not here"
        return False
    finally:
        torch._dynamo.reset()


def test_compiled_and_eager_runs_agree(digits, compiled_agrees):
    if not _compiler_works():
        pytest.skip("torch.compile does not work on this machine")
    common = dict(
        dataset="digits", model="mlp", width=0.5, batch_size=64, micro_batch=32, lr=0.1, momentum=0.9
    )
    eager = build(TrainConfig(**common), dataset=digits)
    compiled = build(TrainConfig(**common, compile=True), dataset=digits)
    compiled_agrees(eager, compiled, 4)
    assert not any(k.startswith("_orig_mod") for k in compiled.model.state_dict())


def test_group_norm_layer_equals_the_formula():
    torch.manual_seed(0)
    model = build_model("resnet8", 3, 10, norm="group").to(F64)
    layer = next(m for m in model.modules() if isinstance(m, torch.nn.GroupNorm))
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, layer.num_channels, 5, 6, dtype=F64)
    groups = x.reshape(4, layer.num_groups, -1)
    by_hand = (groups - groups.mean(-1, keepdim=True)) / torch.sqrt(
        groups.var(-1, unbiased=False, keepdim=True) + layer.eps
    )
    shape = (1, -1, 1, 1)
    by_hand = by_hand.reshape_as(x) * layer.weight.view(shape) + layer.bias.view(shape)
    functional = F.group_norm(x, layer.num_groups, layer.weight, layer.bias, layer.eps)
    assert torch.allclose(layer(x), by_hand, atol=1e-12) and torch.allclose(layer(x), functional, atol=1e-12)


def test_one_init_seed_gives_one_starting_point_whatever_the_batch(tmp_path, digits):
    def start(name, **settings):
        cfg = TrainConfig(dataset="digits", model="mlp", steps=2, checkpoint_every=1, **settings)
        train(cfg, tmp_path / name, dataset=digits, progress_bar=False)
        return torch.load(tmp_path / name / "checkpoints" / "epoch-0000.pt", weights_only=True)["model"]

    sb = start("sb", init_seed=7, seed=1, batch_size=16)
    lb = start("lb", init_seed=7, seed=2, batch_size=512)
    other = start("other", init_seed=8, seed=1, batch_size=16)
    assert all(torch.equal(sb[k], lb[k]) for k in sb)
    assert not all(torch.equal(sb[k], other[k]) for k in sb)
    derived = json.loads((tmp_path / "lb" / "config.json").read_text())["derived"]
    assert derived["init_seed"] == 7


def test_plateau_rule_on_a_known_curve():
    # best: 1.0, 0.5, 0.4; then 0.399, 0.398 (< 1 % better), 0.45: the third evaluation
    # without a 1 % improvement, index 5, stops
    curve = [1.0, 0.5, 0.4, 0.399, 0.398, 0.45]
    cursor = Cursor()
    stops = [plateaued(cursor, loss, patience=3, tol=0.01) for loss in curve]
    assert stops == [False] * 5 + [True] and cursor.best_loss == 0.4
    assert not plateaued(cursor, 0.1, patience=3, tol=0.01) and cursor.evals_since_best == 0  # improved again
    assert not any(plateaued(Cursor(), loss, 3, 0.01) for loss in [1.0, 0.9, 0.8, 0.7])


def test_until_plateau_stops_where_the_rule_says(tmp_path, digits, digits_config):
    cfg = digits_config(batch_size=256, lr=0.5, epochs=60, eval_every=0.5, until_plateau=2, plateau_tol=0.05)
    train(cfg, tmp_path / "p", dataset=digits, progress_bar=False)
    losses = [m["eval_train_loss"] for m in read_jsonl(tmp_path / "p" / "metrics.jsonl")]
    cursor = Cursor()
    expected = next(i for i, loss in enumerate(losses) if plateaued(cursor, loss, 2, 0.05))
    assert expected == len(losses) - 1  # the run stopped at the evaluation the rule names
    status = RunDir(tmp_path / "p").status()
    assert "--until-plateau" in status["reason"] and status["epoch"] < 60


def test_init_from_takes_the_weights_and_a_fresh_optimizer(tmp_path, digits):
    base = dict(dataset="digits", model="mlp", norm="none", precision="fp64", batch_size=100, momentum=0.9)
    train(TrainConfig(**base, lr=0.1, epochs=1), tmp_path / "a", dataset=digits, progress_bar=False)
    warm = TrainConfig(**base, lr=0.2, steps=1, init_from=str(tmp_path / "a"))
    train(warm, tmp_path / "b", dataset=digits, progress_bar=False)
    start = torch.load(tmp_path / "a" / "final.pt", weights_only=True)
    # the reference step: a fresh SGD with momentum takes w - lr * g on its first step
    model = build_model("mlp", 1, 10, 8, norm="none").to(F64)
    model.load_state_dict(start)
    t = build(warm, dataset=digits)
    window = next(t.train_loader.windows(0, 100, 100))
    accumulate_gradients(model, window.micro_batches(), window.count)
    expected = {k: p.detach() - 0.2 * p.grad for k, p in model.named_parameters()}
    final = torch.load(tmp_path / "b" / "final.pt", weights_only=True)
    assert max((final[k] - expected[k]).abs().max().item() for k in expected) < 1e-12
    assert json.loads((tmp_path / "b" / "config.json").read_text())["derived"]["init_from"].endswith(
        "final.pt"
    )


def test_squared_loss_is_half_the_squared_distance_to_the_one_hot_target():
    outputs = torch.tensor([[0.2, -1.0, 3.0], [1.0, 1.0, 1.0]], dtype=F64)
    targets = torch.tensor([2, 0])
    by_hand = 0.5 * ((0.2**2 + 1.0**2 + 2.0**2) + (0.0 + 1.0 + 1.0))
    assert float(squared_loss_sum(outputs, targets)) == pytest.approx(by_hand, rel=1e-15)
    assert float(squared_loss(outputs, targets)) == pytest.approx(by_hand / 2, rel=1e-15)


@pytest.mark.parametrize(("batch", "micro"), [(64, 16), (60, 16)])
def test_squared_loss_accumulates_exactly(tmp_path, digits, exact_config, batch, micro):
    def final(name, micro_batch):
        cfg = exact_config(
            batch_size=batch,
            micro_batch=micro_batch,
            epochs=1,
            lr=0.2,
            momentum=0.9,
        )
        train(cfg, tmp_path / name, dataset=digits, progress_bar=False)
        return torch.load(tmp_path / name / "final.pt", weights_only=True)

    split, whole = final("split", micro), final("whole", batch)
    assert max((split[k] - whole[k]).abs().max().item() for k in split) < 1e-10  # fp64: rounding only
    metrics = read_jsonl(tmp_path / "split" / "metrics.jsonl")
    assert metrics[-1]["eval_train_loss"] < metrics[0]["eval_train_loss"]


def test_tensorboard_holds_the_metrics(tmp_path, digits):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig(
        dataset="digits", model="mlp", steps=6, batch_size=128, eval_every=0.2, tensorboard=True
    )
    train(cfg, tmp_path / "tb", dataset=digits, progress_bar=False)
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    metrics = read_jsonl(tmp_path / "tb" / "metrics.jsonl")
    for key in ("test_acc", "eval_train_loss", "lr", "batch_size"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert sorted(logged) == [m["step"] for m in metrics]
        # TensorBoard stores float32: equal to 1e-6 relative
        assert [logged[m["step"]] for m in metrics] == pytest.approx([m[key] for m in metrics], rel=1e-6)


def test_divergence_is_caught_within_the_check_interval_and_names_its_step(tmp_path, digits, monkeypatch):
    original, calls = training.train_step, []

    def poisoned(t, window, lr, stop=False):
        result = original(t, window, lr, stop)
        calls.append(1)
        if len(calls) > 5:  # the sixth step (index 5) and every later one
            result.loss_sum = result.loss_sum * math.nan
        return result

    monkeypatch.setattr(training, "train_step", poisoned)
    cfg = TrainConfig(dataset="digits", model="mlp", steps=100, batch_size=32)
    with pytest.raises(RunDiverged, match="step 5:"):
        train(cfg, tmp_path / "d", dataset=digits, progress_bar=False)
    assert len(calls) <= 5 + CHECK_EVERY  # stopped within one check interval
    assert RunDir(tmp_path / "d").status()["step"] == 5
    assert read_jsonl(tmp_path / "d" / "metrics.jsonl")[-1] == {
        "step": 5,
        "diverged": True,
        "reason": RunDir(tmp_path / "d").status()["reason"],
    }
    assert not (tmp_path / "d" / "final.pt").exists()


def test_fused_optimizers_on_cuda_only():
    cfg = TrainConfig(optimizer="adam", weight_decay=1e-4)
    assert optimizer_options(cfg, torch.device("cuda"))["fused"] is True
    assert "fused" not in optimizer_options(cfg, torch.device("cpu"))


def test_a_kill_before_final_pt_leaves_no_duplicate_final_evaluation(tmp_path, digits, monkeypatch):
    cfg = TrainConfig(
        dataset="digits", model="mlp", epochs=2, batch_size=128, eval_every=0.5, deterministic=True
    )
    train(cfg, tmp_path / "full", dataset=digits, progress_bar=False)

    def killed(self, model):
        raise KeyboardInterrupt

    monkeypatch.setattr(Checkpointer, "save_final", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", dataset=digits, progress_bar=False)
    monkeypatch.undo()
    assert not (tmp_path / "cut" / "final.pt").exists()
    train(cfg, tmp_path / "cut", resume=True, dataset=digits, progress_bar=False)
    strip = lambda ms: [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in ms]  # noqa: E731
    cut = strip(read_jsonl(tmp_path / "cut" / "metrics.jsonl"))
    assert len({m["step"] for m in cut}) == len(cut)  # no step evaluated twice
    assert cut == strip(read_jsonl(tmp_path / "full" / "metrics.jsonl"))
    a = torch.load(tmp_path / "full" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batch_statistics_nets_evaluate_in_batches_of_5000_unless_told(synthetic):
    cfg = TrainConfig(dataset="synthetic", model="keskar-c1", width=0.125, batch_size=32)
    t = build(cfg, dataset=synthetic)
    assert t.eval_batch == 5000
    assert build(TrainConfig(**{**cfg.to_dict(), "eval_batch": 64}), dataset=synthetic).eval_batch == 64
    # with batch statistics the evaluation really depends on that batch
    whole = training.evaluate(t.model, t.test.batches(5000))
    pieces = training.evaluate(t.model, t.test.batches(8))
    assert abs(whole[0] - pieces[0]) > 1e-4


def test_full_batch_is_one_step_of_plain_gradient_descent(tmp_path, digits):
    from click.testing import CliRunner

    from sharp.cli import cli

    out = tmp_path / "gd"
    args = ["train", "--dataset", "digits", "--model", "mlp", "--norm", "none", "--precision", "fp64"]
    args += ["--batch-size", "full", "--micro-batch", "500", "--steps", "1", "--lr", "0.5", "--out", str(out)]
    result = CliRunner().invoke(cli, [*args, "--quiet"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["full_batch"] and config["derived"]["effective_batch"] == 1437
    # the reference: the gradient of the mean loss over all 1437 examples, in one pass
    t = build(TrainConfig(dataset="digits", model="mlp", norm="none", precision="fp64", lr=0.5), digits)
    x = t.train_loader.normalize(t.train_loader.images)
    start = {k: v.detach().clone() for k, v in t.model.named_parameters()}
    F.cross_entropy(t.model(x), t.train_loader.labels).backward()
    final = torch.load(out / "final.pt", weights_only=True)
    for name, p in t.model.named_parameters():
        assert torch.allclose(final[name], start[name] - 0.5 * p.grad, rtol=0, atol=1e-13)  # fp64 rounding
    line = CliRunner().invoke(cli, [*args[:-2], "--lr-scaling", "linear", "--base-lr", "0.1"])
    assert line.exit_code == 2 and "--batch-size full takes no --lr-scaling" in line.output
