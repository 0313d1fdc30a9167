"""`sharp probe` and `sharp interp` on run directories."""

from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from sharp.cli import cli
from sharp.runs import RunDir


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    common = ["--dataset", "digits", "--model", "mlp", "--norm", "none", "--epochs", "2", "--quiet"]
    small = invoke("train", *common, "--batch-size", "32", "--checkpoint-every", "1", "--out", root / "sb")
    large = invoke("train", *common, "--batch-size", "512", "--micro-batch", "128", "--out", root / "lb")
    assert small.exit_code == 0 and large.exit_code == 0, small.output + large.output
    return root


def test_probe_writes_one_json_per_probe_and_skips_existing(runs):
    args = [
        "probe",
        runs / "sb",
        "--probe-set",
        "200",
        "--probe-batch",
        "64",
        "--sharpness",
        "--eps",
        "1e-3",
        "--subspace",
        "5",
        "--hessian",
        "--top-k",
        "2",
        "--trace",
        "--noise-scale",
        "--b-small",
        "8",
        "--b-big",
        "64",
    ]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in (runs / "sb" / "probes").glob("*.json"))
    assert [".".join(f.split(".")[1:-2]) for f in files] == [
        "hessian-top2-lanczos",
        "hessian-trace",
        "noise-scale-b8-64",
        "sharpness-eps0.001-full",
        "sharpness-eps0.001-sub5",
    ]
    record = json.loads(next((runs / "sb" / "probes").glob("final.hessian-top2*")).read_text())
    assert record["probe"] == "hessian_eigenvalues" or "eigenvalues" in record
    assert len(record["eigenvalues"]) == 2 and record["eigenvalues"][0] >= record["eigenvalues"][1]
    assert record["n_examples"] == 200 and record["bn_mode"] == "eval"
    assert record["provenance"]["probe_set"] == 200 and record["provenance"]["checkpoint"] == "final"
    sharp = json.loads(next((runs / "sb" / "probes").glob("final.sharpness-eps0.001-full*")).read_text())
    assert sharp["fmax"] >= sharp["f0"] and sharp["sharpness"] >= 0

    again = invoke(*args)
    assert again.exit_code == 0 and again.output.count("skip") == 5
    other = invoke("probe", runs / "sb", "--probe-set", "100", "--hessian", "--top-k", "2")
    assert other.exit_code == 0 and "wrote" in other.output  # other settings: a new file, none replaced
    assert len(list((runs / "sb" / "probes").glob("*.json"))) == 6


def test_probe_every_epoch_checkpoint(runs):
    result = invoke(
        "probe",
        runs / "sb",
        "--checkpoint",
        "all",
        "--probe-set",
        "100",
        "--sharpness",
        "--eps",
        "5e-4",
        "--maxiter",
        "3",
    )
    assert result.exit_code == 0, result.output
    labels = sorted(p.name.split(".")[0] for p in (runs / "sb" / "probes").glob("*sharpness-eps0.0005*"))
    assert labels == ["epoch-0000", "epoch-0001", "epoch-0002", "final"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--probe-set", "50"], "choose at least one probe"),
        (["--sharpness", "--eps", "0"], "--eps '0'"),
        (["--hessian", "--method", "arnoldi"], "--method 'arnoldi' is unknown"),
        (["--hessian", "--bn-mode", "train"], "--bn-mode 'train' is unknown"),
        (["--noise-scale", "--noise-pool", "probe-set", "--probe-set", "64"], "exceed --probe-set 64"),
        (["--hessian", "--checkpoint", "nope.pt"], "--checkpoint nope.pt: no such file"),
        (["--sharpness", "--no-full-space"], "--no-full-space needs --subspace"),
        (["--hessian", "--top-k", "0"], "--top-k 0 must be positive"),
    ],
)
def test_probe_bad_input(runs, args, fragment):
    result = invoke("probe", runs / "sb", *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.output


def test_probe_refuses_what_is_not_a_finished_run(tmp_path, runs):
    result = invoke("probe", tmp_path, "--hessian")
    assert result.exit_code == 2 and "not a run directory" in result.output
    unfinished = tmp_path / "u"
    unfinished.mkdir()
    for name in ("config.json", "status.json"):
        (unfinished / name).write_text((runs / "lb" / name).read_text())
    result = invoke("probe", unfinished, "--hessian")
    assert result.exit_code == 2 and "no final.pt" in result.output


def test_interp_between_two_runs(runs, tmp_path):
    out = tmp_path / "interp"
    result = invoke(
        "interp",
        runs / "sb",
        runs / "lb",
        "--alphas",
        "-1:2:7",
        "--bn",
        "a",
        "--train-set",
        "300",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "interp.json").read_text())
    assert record["alphas"] == [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0]
    # endpoints: the trainer's own final evaluation of each run on the whole test split
    assert record["test_acc"][2] == pytest.approx(RunDir(runs / "sb").status()["test_acc"])
    assert record["test_acc"][4] == pytest.approx(RunDir(runs / "lb").status()["test_acc"])
    assert record["test_loss"][2] == pytest.approx(RunDir(runs / "sb").status()["test_loss"], rel=1e-5)
    with open(out / "interp.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 7 and float(rows[0]["alpha"]) == -1.0
    assert (out / "interp.png").stat().st_size > 10_000
    again = invoke("interp", runs / "sb", runs / "lb", "--out", out)
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_interp_refuses_different_models(runs, tmp_path):
    other = tmp_path / "conv"
    assert (
        invoke(
            "train", "--dataset", "digits", "--model", "convnet", "--steps", "2", "--out", other, "--quiet"
        ).exit_code
        == 0
    )
    result = invoke("interp", runs / "sb", other, "--out", tmp_path / "i")
    assert result.exit_code == 2 and "differ in model" in result.output


def test_report_command_on_runs_and_an_interpolation(runs, tmp_path):
    interp_out = tmp_path / "interp"
    assert (
        invoke(
            "interp", runs / "sb", runs / "lb", "--alphas", "0:1:3", "--bn", "a", "--out", interp_out
        ).exit_code
        == 0
    )
    result = invoke(
        "report",
        runs / "sb",
        runs / "lb",
        "--out",
        tmp_path / "rep",
        "--interp",
        interp_out,
        "--scale",
        "cpu",
        "--title",
        "two runs",
    )
    assert result.exit_code == 0, result.output
    text = (tmp_path / "rep" / "report.md").read_text()
    assert text.startswith("# two runs") and "figures/interpolation-1.png" in text
    assert "sb" in text and "lb" in text and (tmp_path / "rep" / "figures" / "interpolation-1.png").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    only = invoke(
        "report",
        runs / "sb",
        runs / "lb",
        "--interp",
        interp_out,
        "--figure",
        "hessian_density",
        "--out",
        tmp_path / "r3",
    )
    assert only.exit_code == 0, only.output
    assert not (tmp_path / "r3" / "figures" / "interpolation-1.png").exists()  # drawn above, not chosen here
    assert "![" not in (tmp_path / "r3" / "report.md").read_text()
    bad_args = (
        [tmp_path / "missing"],
        [empty],
        [runs / "sb", "--scale", "huge"],
        [runs / "sb", "--figure", "x"],
    )
    for args in bad_args:
        bad = invoke("report", *args, "--out", tmp_path / "r2")
        assert bad.exit_code == 2 and bad.output.startswith("sharp: error:"), bad.output


def test_trace_samples_and_density_iterations_are_options(runs):
    result = invoke(
        "probe",
        runs / "lb",
        "--probe-set",
        "64",
        "--trace",
        "--trace-samples",
        "4",
        "--density",
        "--density-iter",
        "7",
        "--density-runs",
        "2",
    )
    assert result.exit_code == 0, result.output
    trace = json.loads(next((runs / "lb" / "probes").glob("final.hessian-trace.*")).read_text())
    density = json.loads(next((runs / "lb" / "probes").glob("final.hessian-density.*")).read_text())
    assert len(trace["samples"]) == 4 and trace["evaluations"]["hvp"] == 4
    assert len(density["ritz_values"]) == 2 and all(len(r) == 7 for r in density["ritz_values"])
    bad = invoke("probe", runs / "lb", "--trace", "--trace-samples", "1")
    assert bad.exit_code == 2 and "at least 2 samples" in bad.output
    bad = invoke("probe", runs / "lb", "--density", "--density-runs", "0")
    assert bad.exit_code == 2 and "--density-runs" in bad.output
