"""Reproduction specs: parsing, scales, expansion to the paper's settings, and the demo."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from sharp.cli import cli
from sharp.errors import SharpError
from sharp.repro import SPEC_DIR, ReproSpec, deep_merge, run_repro

SPECS = sorted(p.stem for p in SPEC_DIR.glob("*.toml"))


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("scale", ["cpu", "full"])
def test_every_spec_parses_and_expands_at_both_scales(name, scale):
    """Loading resolves every run through make_config (its TrainConfig validated) and every probe
    table through ProbeConfig, so a spec with a bad setting at either scale fails here."""
    spec = ReproSpec.load(name, scale)
    jobs = spec.jobs(Path("/nonexistent"))
    assert jobs and len({j[0] for j in jobs}) == len(jobs)
    assert spec.scale == scale


def _settings(spec, group):
    """The resolved settings of a group's runs. Settings are data, parsed from the spec and
    never computed, so the tests below compare them (floats too) exactly: a setting that comes
    back other than written is the defect."""
    return [run.settings for run in spec.groups[group].runs]


def test_keskar_full_scale_is_the_papers_setup():
    spec = ReproSpec.load("keskar", "full")
    for group, model in (("c1", "keskar-c1"), ("c2", "keskar-c2")):
        runs = _settings(spec, group)
        assert sorted({r["batch_size"] for r in runs}) == [256, 5000]  # SB 256, LB 10% of 50,000
        assert sorted({r["seed"] for r in runs}) == [0, 1, 2, 3, 4]  # 5 trials
        assert all(r["init_seed"] == r["seed"] for r in runs)  # each SB/LB pair from one x_0
        assert all(r["model"] == model and r["norm"] == "bn" for r in runs)
        assert all(r["optimizer"] == "adam" and r["lr"] == 0.001 and r["augment"] is False for r in runs)
        assert all(r["input_scaling"] == "unit" for r in runs)  # pixels / 255, as the Keras code
        assert all(
            r["micro_batch"] == r["batch_size"] and r["train_subset"] is None for r in runs
        )  # one BN batch
        assert all(r["until_plateau"] == 5 and r["epochs"] == 200 and r["eval_batch"] == 5000 for r in runs)
        probes = spec.groups[group].probes_for(spec.groups[group].runs[0])
        assert probes[0]["bn_mode"] == "batch" and probes[0]["bn_batch"] == 5000  # the authors' evaluation
        assert probes[0]["eps"] == "1e-3,5e-4" and probes[0]["subspace"] == 100
    assert {r["model"] for r in _settings(spec, "resnet")} == {"resnet32"}  # kept for comparison
    line, sine = spec.interpolations
    assert line["alphas"] == sine["alphas"] == "-1:2:25" and sine["path"] == "sin" and line["bn"] == "batch"
    (sb,) = [r for r in spec.groups["c1"].runs if r.settings["batch_size"] == 256 and r.settings["seed"] == 0]
    starts = [spec.warm_starts[r.name] for r in spec.groups["piggyback"].runs]
    assert {s.source for s in starts} == {sb.name}
    assert [s.checkpoint for s in starts] == [f"checkpoints/epoch-{k:04d}.pt" for k in (0, 5, 10, 20, 30)]
    assert {r["batch_size"] for r in _settings(spec, "piggyback")} == {5000}


def test_masters_luschi_full_scale_is_the_papers_setup():
    spec = ReproSpec.load("masters-luschi", "full")
    runs = _settings(spec, "resnet8_nobn")
    assert sorted({r["batch_size"] for r in runs}) == [2**k for k in range(1, 12)]  # m = 2 ... 2048
    lrs = sorted({r["base_lr"] for r in runs})
    assert lrs == [2.0**k for k in range(-12, 1)]  # eta~ = 2^-12 ... 2^0, exact binary fractions
    for r in runs:
        assert (r["optimizer"], r["momentum"], r["lr_scaling"], r["reference_batch"]) == (
            "sgd",
            0.0,
            "linear",
            1,
        )
        assert (r["epochs"], r["schedule"], r["milestones"], r["gamma"]) == (82, "step", "0.5,0.75", 0.1)
        assert (r["weight_decay"], r["norm"], r["augment"], r["model"]) == (1e-4, "none", False, "resnet8")
    bn = _settings(spec, "resnet32_bn")
    assert all(r["model"] == "resnet32" and r["norm"] == "bn" and r["augment"] is True for r in bn)
    assert {r["bn_batch"] for r in _settings(spec, "bn_batch")} == {2, 4, 8, 16}


def test_noise_scale_tries_several_rates_per_batch_at_full_scale():
    spec = ReproSpec.load("noise-scale", "full")
    runs = _settings(spec, "tradeoff")
    assert len(runs) == 8 * 3 and all(r["lr_scaling"] == "sqrt" and r["reference_batch"] == 128 for r in runs)
    assert all(r["norm"] == "group" and r["until_train_loss"] == 0.3 for r in runs)
    tracking = _settings(spec, "tracking")
    assert [(r["batch_size"], r["micro_batch"], r["noise_scale"]) for r in tracking] == [(512, 64, True)]
    cpu = _settings(ReproSpec.load("noise-scale", "cpu"), "tradeoff")
    assert sorted(r["batch_size"] for r in cpu) == [16, 64, 256, 1024]
    assert {r["base_lr"] for r in cpu} == {1e-3}


def test_cpu_scale_keeps_the_design_and_shrinks_it():
    spec = ReproSpec.load("keskar", "cpu")
    runs = _settings(spec, "c1")
    assert {r["batch_size"] for r in runs} == {25, 500} and all(r["train_subset"] == 5000 for r in runs)
    assert all(r["optimizer"] == "adam" and r["model"] == "keskar-c1" for r in runs)
    assert all(r["until_plateau"] == 3 and r["augment"] is False and r["eval_batch"] == 500 for r in runs)
    assert (spec.raw["report"]["sb_batch"], spec.raw["report"]["lb_batch"]) == (25, 500)
    assert "c2" not in spec.groups and {r["model"] for r in _settings(spec, "resnet")} == {"resnet8"}
    names = [j[0] for j in spec.jobs(Path("/x"))]  # c1 2, resnet 2, Fig. 5's 2
    assert len(names) == len(set(names)) == 6
    assert [len(stage) for stage in spec.job_stages(Path("/x"))] == [4, 2]  # warm starts after their source


def test_keskar_ablation_crosses_network_stopping_rule_and_probe_bn_mode():
    spec = ReproSpec.load("keskar-ablation", "cpu")
    cells = {
        (r["model"], "plateau" if r["until_plateau"] else "loss", r["batch_size"])
        for group in spec.groups
        for r in _settings(spec, group)
    }
    assert cells == {
        (m, s, b) for m in ("keskar-c1", "resnet8") for s in ("plateau", "loss") for b in (25, 500)
    }
    modes = {group: {p.get("bn_mode", "eval") for p in spec.groups[group].probes} for group in spec.groups}
    assert modes["c1_plateau"] == modes["c1_loss"] == {"batch"}  # C1 keeps no running statistics
    assert modes["resnet_plateau"] == modes["resnet_loss"] == {"eval", "recompute", "batch"}


def test_deep_merge_merges_tables_and_replaces_lists():
    assert deep_merge({"a": {"x": 1, "y": [1, 2]}, "b": 1}, {"a": {"y": [3]}, "c": 2}) == {
        "a": {"x": 1, "y": [3]},
        "b": 1,
        "c": 2,
    }


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"groups": {"g": {"axis": {}}}}, "unknown key 'axis'"),
        (
            {
                "groups": {"g": {"axes": {"batch_size": [8]}}},
                "interpolations": [{"a": {"group": "h"}, "b": {}}],
            },
            "name an existing group",
        ),
        (
            {"groups": {"g": {"axes": {"batch_size": [8, 16]}}}, "interpolations": [{"a": {"group": "g"}}]},
            "matches 2 runs",
        ),
        ({"groups": {"g": {"probes": [{"eps": "x"}]}}}, "--eps 'x'"),
        ({"grid": {}}, "unknown key 'grid'"),
        ({"report": {"goals": [1.0]}}, "unknown key 'goals'"),
        ({"report": {"keskar_tables": "no"}}, "keskar_tables must be true or false"),
        ({"report": {"figures": ["keskar_fig4", "fig9"]}}, "figure 'fig9' is unknown"),
    ],
)
def test_bad_specs(spec, fragment):
    with pytest.raises(SharpError, match=fragment):
        ReproSpec.from_dict({"base": {"dataset": "digits"}, **spec})


def test_unknown_spec_name_lists_the_known_ones():
    with pytest.raises(SharpError, match="keskar"):
        ReproSpec.load("nonexistent")


def _final(run):
    return [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "test_acc" in m][
        -1
    ]


def _probe(run, label):
    (path,) = (run / "probes").glob(f"final.{label}.*.json")
    return json.loads(path.read_text())


def test_demo_quick_reports_the_runs_own_numbers(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    runs = {}
    for run in (out / "runs").iterdir():
        batch = json.loads((run / "config.json").read_text())["settings"]["batch_size"]
        runs["SB" if batch == 16 else "LB"] = run
    acc = {k: _final(run)["test_acc"] for k, run in runs.items()}
    sharp = {k: _probe(run, "sharpness-eps0.001-full")["sharpness"] for k, run in runs.items()}
    top = {k: _probe(run, "hessian-top3-lanczos")["eigenvalues"][0] for k, run in runs.items()}
    lines = result.output.splitlines()
    assert f"test accuracy  SB {100 * acc['SB']:.1f}%  LB {100 * acc['LB']:.1f}%" in lines
    assert f"eps-sharpness (eps 1e-3, full space)  SB {sharp['SB']:.3g}  LB {sharp['LB']:.3g}" in lines
    assert f"top Hessian eigenvalue  SB {top['SB']:.3g}  LB {top['LB']:.3g}" in lines
    report = (out / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| **this run**") and "(n=1)" in line)
    assert f"| {100 * acc['SB']:.2f} (n=1) | {100 * acc['LB']:.2f} (n=1) |" in row  # Table 2, test SB/LB
    table3 = report.split("### Table 3")[1].split("### Table 4")[0]
    assert f"| {sharp['SB']:.2f} (n=1) | {sharp['LB']:.2f} (n=1) |" in table3
    images = re.findall(r"\]\((figures/[^)]+\.png)\)", report)
    assert images and all((out / image).exists() for image in images)
    interp = json.loads((out / "interpolations" / "sb-lb" / "interp.json").read_text())
    assert interp["provenance"]["batch_size_a"] == 16 and interp["provenance"]["batch_size_b"] == 512
    stamps = {k: (run / "final.pt").stat().st_mtime_ns for k, run in runs.items()}
    again = CliRunner().invoke(cli, ["demo", "--quick", "--out", str(out)])
    assert again.exit_code == 0 and "2 runs" in again.output
    assert {k: (run / "final.pt").stat().st_mtime_ns for k, run in runs.items()} == stamps
    # a second demo from nothing prints the same numbers: seeded data, init, order and probes and
    # deterministic kernels make the reruns bit-identical, so the printed lines are compared exactly
    fresh = CliRunner().invoke(cli, ["demo", "--quick", "--out", str(tmp_path / "fresh")])
    starts = ("test accuracy", "eps-sharpness", "top Hessian")
    headline = [line for line in result.output.splitlines() if line.startswith(starts)]
    assert len(headline) == 3
    assert headline == [line for line in fresh.output.splitlines() if line.startswith(starts)]


def _tiny_spec(**report):
    return {
        "name": "tiny",
        "title": "tiny reproduction",
        "base": {"dataset": "digits", "model": "mlp", "norm": "none", "steps": 4, "eval_every": 0.5},
        "groups": {
            "sb_lb": {
                "axes": {"batch_size": [16, 256]},
                "probes": [{"probe_set": 64, "sharpness": True, "eps": "1e-3", "maxiter": 2}],
            },
            "sizes": {"axes": {"batch_size": [16, 64]}},  # B=16 is shared with sb_lb: trained once
        },
        "interpolations": [
            {
                "name": "sb-lb",
                "a": {"group": "sb_lb", "batch_size": 16},
                "b": {"group": "sb_lb", "batch_size": 256},
                "alphas": "0:1:3",
                "train_set": 64,
                "test_set": 64,
            },
        ],
        "report": {"figures": ["keskar_fig4", "interpolation"], **report},
    }


def test_repro_runs_end_to_end_and_a_rerun_only_redraws(tmp_path):
    out = tmp_path / "tiny"
    report = run_repro(ReproSpec.from_dict(_tiny_spec()), out, echo=lambda _: None)
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 3 and all((out / "runs" / r / "final.pt").exists() for r in runs)
    assert sorted(p.name for p in (out / "figures").glob("*.png")) == [
        "interpolation-1.png",
        "keskar_fig4_batch_size.png",
    ]
    assert "Small batch (SB) = B 16, large batch (LB) = B 256." in report.read_text()
    first = (out / "repro.json").read_text()
    stamps = {r: (out / "runs" / r / "final.pt").stat().st_mtime_ns for r in runs}

    # other report options on the same runs: nothing retrained, the first timings kept
    run_repro(ReproSpec.from_dict(_tiny_spec(sb_batch=64)), out, echo=lambda _: None)
    assert {r: (out / "runs" / r / "final.pt").stat().st_mtime_ns for r in runs} == stamps
    manifest = json.loads((out / "repro.json").read_text())
    assert manifest["state"] == "finished" and manifest["history"] == [json.loads(first)["timings"]]
    assert "Small batch (SB) = B 64" in report.read_text()
    run_repro(ReproSpec.from_dict(_tiny_spec(keskar_tables=False)), out, echo=lambda _: None)
    text = report.read_text()
    assert "Tables 2–4" not in text and "what sets the size" not in text and "Fig. 4" in text

    changed = _tiny_spec()
    changed["base"]["steps"] = 5
    with pytest.raises(SharpError, match="holds another reproduction"):
        run_repro(ReproSpec.from_dict(changed), out, echo=lambda _: None)


def test_repro_device_reaches_every_stage_and_is_recorded(tmp_path, monkeypatch):
    from sharp import runtime

    asked, select = [], runtime.select_device

    def spy(name="auto"):
        asked.append(name)
        return select(name)

    monkeypatch.setattr(runtime, "select_device", spy)
    out = tmp_path / "tiny"
    run_repro(ReproSpec.from_dict(_tiny_spec()), out, device="cpu", echo=lambda _: None)
    assert asked and set(asked) == {"cpu"}  # training, probes and interpolation: none left on auto
    manifest = json.loads((out / "repro.json").read_text())
    assert manifest["device"] == "cpu"
    assert manifest["devices"] == {"training": ["cpu"], "probes": ["cpu"], "interpolations": ["cpu"]}


def test_repro_refuses_an_unknown_device(tmp_path):
    result = CliRunner().invoke(cli, ["repro", "keskar", "--device", "tpu", "--out", str(tmp_path / "r")])
    assert (
        result.exit_code == 2 and "--device 'tpu' is unknown: choose one of auto, cpu, cuda" in result.output
    )


def test_edge_of_stability_spec_is_the_papers_setup_and_runs_end_to_end_at_toy_size(tmp_path):
    from sharp.config import tomllib

    full = ReproSpec.load("edge-of-stability", "full")
    gd = _settings(full, "gd")
    assert sorted(r["lr"] for r in gd) == [0.01, 0.02] and all(r["batch_size"] == 5000 for r in gd)
    assert all(r["train_subset"] == 5000 and r["eval_train_size"] == 5000 for r in gd)  # GD on the subset
    assert all(
        (r["model"], r["loss"], r["norm"], r["until_train_acc"]) == ("fc-tanh", "mse", "none", 0.99)
        for r in gd
    )
    assert all(r["track_sharpness"] == 50 and r["track_set"] == "full" for r in gd)
    sgd = _settings(full, "sgd")
    assert sorted({r["batch_size"] for r in sgd}) == [32, 128, 512] and {r["lr"] for r in sgd} == {0.01, 0.02}
    # every run is evaluated about every 50 steps
    assert all(round(r["eval_every"] * 5000 / r["batch_size"]) == 50 for r in sgd)
    cpu = ReproSpec.load("edge-of-stability", "cpu")
    assert all(r["batch_size"] == r["train_subset"] == 1000 for r in _settings(cpu, "gd"))
    assert all(round(r["eval_every"] * 1000 / r["batch_size"]) == 50 for r in _settings(cpu, "sgd"))

    # the spec's own groups at toy size: digits, 200 images, a few steps
    raw = tomllib.loads((SPEC_DIR / "edge-of-stability.toml").read_text())
    raw.pop("scales")
    toy = deep_merge(
        raw,
        {
            "base": {"dataset": "digits", "train_subset": 200, "eval_train_size": 200, "steps": 6},
            "groups": {
                "gd": {
                    "base": {"batch_size": 200, "micro_batch": 100, "eval_every": 3},
                    "axes": {"lr,steps": [[0.05, 6]]},
                },
                "sgd": {"axes": {"batch_size,eval_every": [[50, 0.75]], "lr": [0.05]}},
            },
        },
    )
    toy["base"]["track_sharpness"] = 3
    report = run_repro(ReproSpec.from_dict(toy, "cpu"), tmp_path / "eos", echo=lambda _: None).read_text()
    assert sorted(p.name for p in (tmp_path / "eos" / "figures").iterdir()) == [
        "sharpness_tracking.csv",
        "sharpness_tracking.png",
        "sharpness_tracking_summary.csv",
    ]
    assert "**Paper** (Cohen et al. 2021)" in report and "GD (full batch), η=0.05" in report
    assert "SGD B=50, η=0.05" in report


def test_noise_scale_edge_tracks_sgd_at_a_constant_and_a_decaying_rate():
    for scale, batch in (("full", (512, 64)), ("cpu", (256, 32))):
        runs = _settings(ReproSpec.load("noise-scale-edge", scale), "edge")
        assert sorted(r["schedule"] for r in runs) == ["constant", "step"]
        assert all((r["batch_size"], r["micro_batch"]) == batch and r["optimizer"] == "sgd" for r in runs)
        assert all(r["noise_scale"] and r["track_sharpness"] and r["norm"] == "group" for r in runs)
    # Adam's runs stay untracked (refused), and no SGD run enters the McCandlish fit
    assert {
        r["optimizer"] for g in ("tracking", "tradeoff") for r in _settings(ReproSpec.load("noise-scale"), g)
    } == {"adam"}
