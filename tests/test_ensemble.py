"""Ensembles: K runs trained as one equal the same runs trained alone, member by member.

The reference throughout is a run trained alone by `sharp.train.train` (or a model evaluated
alone): in fp64 the grouped layers compute each member's numbers in another summation order
than its own layers, so they agree to rounding (1e-15 per operation, well under 1e-10 after the
few dozen steps of these runs), never bit for bit; an ensemble against itself (resumed or not)
is bit-identical.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal

import pytest
import torch
from click.testing import CliRunner

import sharp.ensemble as ensemble
from sharp.cli import cli
from sharp.config import TrainConfig
from sharp.errors import RunDiverged, SharpError
from sharp.losses import per_example_loss, summed_loss
from sharp.models import build_model, set_bn_batch
from sharp.repro import ReproSpec, run_repro
from sharp.runs import RunDir, read_jsonl
from sharp.signals import StopRequested
from sharp.sweep import Launcher, SweepSpec, collect, run_sweep
from sharp.train import TIMING_KEYS, train

# in fp64, members and their runs alone differ by rounding only (see the module docstring)
TOL = 1e-10
# digits (8x8, one channel): 60 training images, so B = 16 ends each epoch with a short window
# of 12; micro-batches of 8 (accumulation) and BN ghost groups of 4
TINY_DIGITS = dict(dataset="digits", train_subset=60, eval_train_size=30, test_subset=20)
TINY = dict(
    TINY_DIGITS, batch_size=16, micro_batch=8, epochs=2, eval_every=0.5, precision="fp64", deterministic=True
)
CONVNET_BN = dict(TINY, model="convnet", width=0.5, norm="bn", bn_batch=4, augment=True, momentum=0.9)
# three members: other seeds (data order, augmentation, init), learning rates, weight decays
MEMBERS = [dict(seed=0, lr=0.05), dict(seed=1, lr=0.1, weight_decay=1e-3), dict(seed=2, lr=0.02)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    """MEMBERS of CONVNET_BN trained as one ensemble and each alone: (configs, members, alone)."""
    root = tmp_path_factory.mktemp("trained")
    cfgs = _configs(CONVNET_BN, MEMBERS)
    members = [root / f"member{i}" for i in range(len(cfgs))]
    outcomes = ensemble.train_ensemble(cfgs, members, dataset=digits, progress_bar=False)
    assert [o.state for o in outcomes] == ["finished"] * len(cfgs)
    return cfgs, members, _alone(root, cfgs, digits)


def _configs(base: dict, members: list[dict]) -> list[TrainConfig]:
    return [TrainConfig(**{**base, **member}) for member in members]


def _final(path) -> dict[str, torch.Tensor]:
    return torch.load(path / "final.pt", weights_only=True)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _metrics(path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_jsonl(path / "metrics.jsonl")]


def _same_metrics(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], float):
                assert x[key] == pytest.approx(y[key], rel=1e-9, abs=1e-12), key  # rounding, as TOL
            else:
                assert x[key] == y[key], key


def _alone(tmp_path, cfgs, digits, prefix="alone"):
    paths = []
    for index, cfg in enumerate(cfgs):
        path = tmp_path / f"{prefix}{index}"
        with contextlib.suppress(RunDiverged):  # a diverged run's directory is a reference too
            train(cfg, path, dataset=digits, progress_bar=False)
        paths.append(path)
    return paths


# --- the stacked module -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "norm", "ghost"),
    [
        ("resnet8", "bn", None),  # BN, and the shortcut that pads channels
        ("resnet8", "none", None),
        ("convnet", "bn", 4),  # ghost BN: groups of 4 of the 12 examples
        ("convnet", "group", None),
        ("mlp", "bn", 4),  # linear layers and BN1d
        ("fc-tanh", "none", None),
    ],
)
def test_the_stack_computes_each_members_outputs_gradients_and_statistics(name, norm, ghost):
    k, n = 3, 12
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        model = build_model(name, 1, 10, image_size=8, width=0.5, norm=norm, bn_batch=ghost).double()
        set_bn_batch(model, ghost)
        models.append(model)
    alone = [copy.deepcopy(m) for m in models]
    inputs = [torch.randn(n, 1, 8, 8, dtype=torch.float64) for _ in range(k)]
    targets = [torch.randint(0, 10, (n,)) for _ in range(k)]
    stack = ensemble.Stack(copy.deepcopy(models[0]), models)
    out = stack.module(torch.cat(inputs, 1)).reshape(n, k, 10)
    losses = torch.stack([torch.nn.functional.cross_entropy(out[:, i], targets[i]) for i in range(k)])
    losses.sum().backward()
    stack.assign_grads()
    for i, (model, reference) in enumerate(zip(models, alone, strict=True)):
        expected = reference(inputs[i])
        assert (out[:, i] - expected).abs().max() < 1e-12  # rounding of one forward pass
        torch.nn.functional.cross_entropy(expected, targets[i]).backward()
        for (key, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert (p.grad - q.grad).abs().max() < 1e-12, key
        for (key, b), c in zip(model.named_buffers(), reference.buffers(), strict=True):
            assert (b.double() - c.double()).abs().max() < 1e-12, key  # running statistics, counters
    stacked = [p.detach().clone() for p in stack.module.parameters()]
    stack.release()
    with torch.no_grad():
        for p in models[0].parameters():  # released: the member's own copies again
            p.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(stacked, stack.module.parameters(), strict=True))


def test_a_nan_member_leaves_the_others_exactly_unchanged():
    """Grouped layers never mix members: a diverged member's NaNs reach no other member's
    outputs or gradients, to the last bit (fp32, torch's fast kernels)."""
    models = [build_model("resnet8", 3, 10, width=0.25, norm="bn") for _ in range(3)]
    inputs = torch.randn(4, 9, 16, 16).contiguous(memory_format=torch.channels_last)

    def run(poison: bool):
        copies = [copy.deepcopy(m) for m in models]
        if poison:
            with torch.no_grad():
                for p in copies[1].parameters():
                    p.fill_(float("nan"))
        stack = ensemble.Stack(copy.deepcopy(copies[0]), copies)
        out = stack.module(inputs).reshape(4, 3, 10)
        out.sum().backward()
        stack.assign_grads()
        return out.detach(), [[p.grad.clone() for p in m.parameters()] for m in copies]

    clean, clean_grads = run(False)
    poisoned, poisoned_grads = run(True)
    assert poisoned[:, 1].isnan().all()
    for i in (0, 2):
        assert torch.equal(clean[:, i], poisoned[:, i])  # exactly: no arithmetic touches member 1
        assert all(torch.equal(a, b) for a, b in zip(clean_grads[i], poisoned_grads[i], strict=True))


def test_stacked_sgd_is_torchs_sgd_member_by_member():
    models = [build_model("convnet", 1, 10, width=0.5, norm="bn").double() for _ in range(3)]
    settings = [
        dict(lr=0.1, weight_decay=0.0),
        dict(lr=0.01, weight_decay=1e-3),
        dict(lr=1.0, weight_decay=0.5),
    ]
    alone = [copy.deepcopy(m) for m in models]
    stack = ensemble.Stack(copy.deepcopy(models[0]), models)
    optimizers = [torch.optim.SGD(m.parameters(), **kw) for m, kw in zip(models, settings, strict=True)]
    references = [torch.optim.SGD(m.parameters(), **kw) for m, kw in zip(alone, settings, strict=True)]
    assert ensemble.stateless_sgd(optimizers)
    assert not ensemble.stateless_sgd([torch.optim.SGD(alone[0].parameters(), lr=0.1, momentum=0.9)])
    for shared in stack.shared:
        if isinstance(shared.grouped, torch.nn.Parameter):
            shared.grouped.grad = torch.randn_like(shared.grouped)
    stack.assign_grads()
    for model, reference in zip(models, alone, strict=True):
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            q.grad = p.grad.clone()
    ensemble.stacked_sgd(stack, optimizers)
    for opt in references:
        opt.step()
    for model, reference, opt, ref in zip(models, alone, optimizers, references, strict=True):
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            assert (p - q).abs().max() < 1e-15  # one multiply-add per element, in fp64
        assert opt.state_dict() == ref.state_dict()  # no state: a checkpoint cannot tell them apart


def test_per_example_losses_sum_to_the_summed_loss():
    outputs, targets = torch.randn(6, 10, dtype=torch.float64), torch.randint(0, 10, (6,))
    for name in ("ce", "mse"):
        each = per_example_loss(name)(outputs, targets)
        alone = torch.stack([summed_loss(name)(outputs[i : i + 1], targets[i : i + 1]) for i in range(6)])
        assert (each - alone).abs().max() < 1e-15  # the same formula, one example at a time
        assert abs(each.sum() - summed_loss(name)(outputs, targets)) < 1e-14


# --- members against their runs alone ------------------------------------------------------------


def _check_member(member, reference, index: int, names: list[str]) -> None:
    """A member's run directory against the same run's alone."""
    assert _max_diff(_final(member), _final(reference)) < TOL
    _same_metrics(_metrics(member), _metrics(reference))
    config, solo = (json.loads((p / "config.json").read_text()) for p in (member, reference))
    assert config["settings"] == solo["settings"] and config["derived"] == solo["derived"]
    assert config.keys() - solo.keys() == {"ensemble"}
    assert config["ensemble"] == [
        {"members": len(names), "member": index, "runs": names, "from_step": 0, "layout": ensemble.LAYOUT}
    ]
    last, solo_last = (
        torch.load(p / "checkpoints" / "last.pt", weights_only=True) for p in (member, reference)
    )
    assert last.keys() == solo_last.keys() and last["progress"] == solo_last["progress"]
    assert torch.equal(last["rng_cpu"], solo_last["rng_cpu"])  # the member's own stream
    assert last["optimizer"]["param_groups"] == solo_last["optimizer"]["param_groups"]
    assert RunDir(member).status()["state"] == RunDir(reference).status()["state"] == "finished"


def test_members_equal_their_runs_alone(trained):
    _, members, alone = trained
    for index, (member, reference) in enumerate(zip(members, alone, strict=True)):
        _check_member(member, reference, index, [m.name for m in members])
    assert _max_diff(_final(members[0]), _final(members[1])) > 1e-3  # the members are different runs


@pytest.mark.parametrize(
    ("base", "members"),
    [
        # ResNet-8: BN, ghost BN, the shortcut that pads channels; one epoch ends with its short
        # window; SGD without momentum (Masters & Luschi): the stacked update, `stacked_sgd`
        (dict(CONVNET_BN, model="resnet8", width=0.25, epochs=1, momentum=0.0), MEMBERS[:2]),
        # Adam, a cosine schedule with warm-up, another init seed; one member stops after 1 epoch
        (
            dict(TINY, model="mlp", norm="none", optimizer="adam", schedule="cosine", warmup=0.2),
            [dict(seed=3, lr=1e-3), dict(seed=3, lr=3e-3, init_seed=5), dict(seed=4, lr=1e-2, epochs=1)],
        ),
    ],
    ids=["resnet8", "mlp-adam-cosine"],
)
def test_other_members_equal_their_runs_alone(tmp_path, digits, base, members):
    cfgs = _configs(base, members)
    outs = [tmp_path / f"member{i}" for i in range(len(cfgs))]
    outcomes = ensemble.train_ensemble(cfgs, outs, dataset=digits, progress_bar=False)
    assert [o.state for o in outcomes] == ["finished"] * len(cfgs)
    alone = _alone(tmp_path, cfgs, digits)
    for index, (member, reference) in enumerate(zip(outs, alone, strict=True)):
        _check_member(member, reference, index, [o.name for o in outs])
        assert outcomes[index].record == read_jsonl(member / "metrics.jsonl")[-1]


def test_a_diverging_member_stops_alone_and_the_others_go_on(tmp_path, digits, trained):
    # lr 1e200: the first step's weights are ~1e199 and the next forward overflows, so the run
    # alone and the member diverge at the same step whatever the rounding
    cfgs, _, alone = trained
    wild = TrainConfig(**{**CONVNET_BN, "seed": 1, "lr": 1e200})
    outs = [tmp_path / f"member{i}" for i in range(3)]
    outcomes = ensemble.train_ensemble([cfgs[0], wild, cfgs[2]], outs, dataset=digits, progress_bar=False)
    assert [o.state for o in outcomes] == ["finished", "diverged", "finished"]
    reference = RunDir(_alone(tmp_path, [wild], digits)[0])
    diverged = RunDir(outs[1])
    assert diverged.status()["state"] == reference.status()["state"] == "diverged"
    assert diverged.status()["step"] == reference.status()["step"]
    assert read_jsonl(diverged.metrics)[-1] == read_jsonl(reference.metrics)[-1]  # the diverged line
    assert not diverged.final.exists()
    for i in (0, 2):
        assert _max_diff(_final(outs[i]), _final(alone[i])) < TOL


def _interrupt_at(monkeypatch, call: int, graceful: bool):
    original, calls = ensemble.stacked_step, []

    def step(*args):
        calls.append(1)
        if len(calls) == call:
            if not graceful:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)  # a first SIGTERM: stop after this step
        return original(*args)

    monkeypatch.setattr(ensemble, "stacked_step", step)
    return original


# 4 steps an epoch (16, 16, 16, 12), saved after steps 2, 4, 6 and 8 (evaluations every 30 examples):
# a SIGTERM during step 3 saves after it; a KeyboardInterrupt before step 6 leaves step 4's save
@pytest.mark.parametrize(("call", "graceful", "saved"), [(3, True, 3), (6, False, 4)])
def test_an_interrupted_ensemble_resumes_bit_identically(
    tmp_path, digits, trained, monkeypatch, call, graceful, saved
):
    cfgs, whole, _ = trained
    cut = [tmp_path / f"cut{i}" for i in range(3)]
    original = _interrupt_at(monkeypatch, call, graceful)
    with pytest.raises(KeyboardInterrupt) as stopped:
        ensemble.train_ensemble(cfgs, cut, dataset=digits, progress_bar=False)
    assert isinstance(stopped.value, StopRequested) == graceful
    monkeypatch.setattr(ensemble, "stacked_step", original)
    assert {RunDir(p).status()["state"] for p in cut} == {"interrupted"}
    steps = {torch.load(p / "checkpoints" / "last.pt", weights_only=True)["progress"]["step"] for p in cut}
    assert steps == {saved}

    # two members resume as an ensemble, the third alone (`sharp train --resume`)
    outcomes = ensemble.train_ensemble(cfgs[:2], cut[:2], resume=True, dataset=digits, progress_bar=False)
    assert [o.state for o in outcomes] == ["finished", "finished"]
    train(cfgs[2], cut[2], resume=True, dataset=digits, progress_bar=False)
    for a, b in zip(whole[:2], cut[:2], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(_final(a).values(), _final(b).values(), strict=True))
        assert _metrics(a) == _metrics(b)
    assert _max_diff(_final(whole[2]), _final(cut[2])) < TOL  # resumed alone: its own kernels
    _same_metrics(_metrics(whole[2]), _metrics(cut[2]))
    sessions = json.loads((cut[0] / "config.json").read_text())["ensemble"]
    assert [(e["members"], e["from_step"]) for e in sessions] == [(3, 0), (2, saved)]


def test_a_stop_at_once_in_one_members_evaluation_stops_every_member(tmp_path, digits, monkeypatch):
    import sharp.train as training

    original, calls = training.evaluation_record, []

    def evaluation(*args):
        calls.append(1)
        if len(calls) == 5:  # the second member's evaluation after step 2
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(training, "evaluation_record", evaluation)
    cfgs = _configs(dict(TINY, model="mlp"), MEMBERS)
    outs = [tmp_path / f"member{i}" for i in range(3)]
    with pytest.raises(KeyboardInterrupt) as stopped:
        ensemble.train_ensemble(cfgs, outs, dataset=digits, progress_bar=False)
    assert not isinstance(stopped.value, StopRequested)
    assert [RunDir(p).status()["state"] for p in outs] == ["interrupted"] * 3
    assert len(calls) == 5  # nobody evaluated after it


# --- which runs can share --------------------------------------------------------------------------


def test_runs_group_by_what_they_share():
    base = TrainConfig(dataset="digits", model="mlp", batch_size=8, device="cpu").to_dict()
    runs = [
        {**base, "seed": 0},
        {**base, "seed": 1, "lr": 0.3, "weight_decay": 1e-4},
        {**base, "batch_size": 4},  # another batch: another ensemble
        {**base, "seed": 2, "optimizer": "adam", "init_seed": 4},
        {**base, "noise_scale": True, "micro_batch": 2},  # alone: reads one run's gradients
        {**base, "model": "keskar-c1", "norm": "bn"},  # alone: dropout
        {**base, "seed": 3},
        {**base, "seed": 4, "batch_size": 4},
        {**base, "batch_size": 32},  # alone: on the CPU an ensemble pays for small micro-batches only
        {**base, "batch_size": 32, "seed": 1},
        {**base, "batch_size": 32, "micro_batch": 8, "seed": 2},
        {**base, "batch_size": 32, "micro_batch": 8, "seed": 3},
    ]
    assert ensemble.group_runs(runs, 3) == [[0, 1, 3], [2, 7], [4], [5], [6], [8], [9], [10, 11]]
    assert ensemble.group_runs(runs, 1) == [[i] for i in range(len(runs))]
    assert ensemble.ensemble_key(runs[4]) is None and ensemble.ensemble_key(runs[5]) is None
    assert ensemble.ensemble_key(runs[8]) == ensemble.ensemble_key(runs[9])  # they could share
    assert not ensemble.ensemble_pays(runs[8]) and ensemble.ensemble_pays(runs[10])


def test_runs_that_cannot_share_are_refused_with_the_setting_named(tmp_path, digits):
    a, b = TrainConfig(**TINY, model="mlp"), TrainConfig(**{**TINY, "batch_size": 20}, model="mlp")
    with pytest.raises(SharpError, match="--batch-size"):
        ensemble.train_ensemble([a, b], [tmp_path / "a", tmp_path / "b"], dataset=digits)
    with pytest.raises(SharpError, match="--noise-scale"):
        ensemble.train_ensemble([TrainConfig(**TINY, model="mlp", noise_scale=True)], [tmp_path / "c"])
    with pytest.raises(SharpError, match="distinct"):
        ensemble.train_ensemble([a, a], [tmp_path / "a", tmp_path / "a"], dataset=digits)


def test_members_resuming_from_different_steps_are_refused(tmp_path, digits):
    cfgs = _configs(dict(TINY, model="mlp"), [dict(seed=0, steps=4), dict(seed=1, steps=2)])
    for cfg, path in zip(cfgs, ("a", "b"), strict=True):
        train(cfg, tmp_path / path, dataset=digits, progress_bar=False)
        RunDir(tmp_path / path).set_status("interrupted")  # as if stopped after 4 and 2 steps
    with pytest.raises(SharpError, match=r"different steps \(\[2, 4\]\)"):
        ensemble.train_ensemble(cfgs, [tmp_path / "a", tmp_path / "b"], resume=True, dataset=digits)


# --- sweeps and the command line ----------------------------------------------------------------------


def _sweep_spec() -> SweepSpec:
    base = {k: v for k, v in CONVNET_BN.items() if k != "epochs"}
    return SweepSpec.from_dict(
        {
            "base": {**base, "steps": 4, "eval_every": 1.0},
            "axes": {"lr": [0.02, 0.05, 0.1]},
            "probe": {"hessian": True, "top_k": 1, "probe_set": 16, "probe_batch": 16, "precision": "fp64"},
        }
    )


def test_a_sweep_with_ensembles_writes_the_runs_of_a_sweep_without(tmp_path):
    spec = _sweep_spec()
    quiet = lambda _: None  # noqa: E731
    grouped = run_sweep(spec, tmp_path / "grouped", Launcher(ensemble=2), echo=quiet)
    alone = run_sweep(spec, tmp_path / "alone", echo=quiet)
    assert grouped == alone == {name: "finished" for name in alone}
    for name in alone:
        a, b = tmp_path / "grouped" / "runs" / name, tmp_path / "alone" / "runs" / name
        assert _max_diff(_final(a), _final(b)) < TOL
        assert (a / "probes").is_dir() and sorted(os.listdir(a / "probes")) == sorted(
            os.listdir(b / "probes")
        )
    configs = [json.loads((tmp_path / "grouped" / "runs" / n / "config.json").read_text()) for n in alone]
    sizes = sorted(c["ensemble"][0]["members"] if "ensemble" in c else 1 for c in configs)
    assert sizes == [1, 2, 2]  # 3 runs: an ensemble of 2 and a run alone
    rows = {r["run"]: r for r in collect(tmp_path / "grouped")}
    for row in collect(tmp_path / "alone"):
        other = rows[row["run"]]
        assert other["state"] == row["state"] and other["probes"] == row["probes"]
        assert other["test_acc"] == pytest.approx(row["test_acc"], abs=1e-9)
    assert run_sweep(spec, tmp_path / "grouped", Launcher(ensemble=2), echo=quiet) == grouped  # all skipped


def test_the_ensemble_option_of_sweep(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(
        'name = "tiny"\n[base]\ndataset = "digits"\nmodel = "mlp"\nsteps = 2\nbatch_size = 8\n'
        "train_subset = 64\n[axes]\nseed = [0, 1, 2]\n"
    )
    result = CliRunner().invoke(cli, ["sweep", str(spec), "--out", str(tmp_path / "s"), "--ensemble", "2"])
    assert result.exit_code == 0, result.output
    assert "+1: finished,finished" in result.output and "3 finished" in result.output
    result = CliRunner().invoke(cli, ["sweep", str(spec), "--out", str(tmp_path / "t"), "--ensemble", "0"])
    assert result.exit_code == 2 and "--ensemble 0 must be at least 1" in result.output


def test_a_reproduction_spec_names_its_ensembles_and_the_option_overrides_it(tmp_path):
    assert ReproSpec.load("masters-luschi", "full").ensemble == 8
    spec = {
        "name": "tiny",
        "ensemble": 2,
        "base": {"dataset": "digits", "model": "mlp", "steps": 2, "batch_size": 8, "train_subset": 64},
        "groups": {"lrs": {"axes": {"lr": [0.1, 0.2]}}},
        "report": {"figures": []},
    }
    for launcher, members in ((None, 2), (Launcher(ensemble=1), None)):
        out = tmp_path / f"with-{members}"
        run_repro(ReproSpec.from_dict(spec), out, launcher, echo=lambda _: None)
        configs = [json.loads((run / "config.json").read_text()) for run in (out / "runs").iterdir()]
        assert [c["ensemble"][0]["members"] if "ensemble" in c else None for c in configs] == [members] * 2
    with pytest.raises(SharpError, match="ensemble = 0"):
        ReproSpec.from_dict({**spec, "ensemble": 0})
