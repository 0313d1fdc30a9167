"""`sharp probe` and `sharp interp` on run directories."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from sharp.cli import cli
from sharp.data import evaluation_subset, load_digits
from sharp.losses import squared_loss
from sharp.models import build_model
from sharp.probes import hessian_top_eigenvalues
from sharp.probes.bn import recompute_bn_statistics
from sharp.runs import RunDir

DIGITS_TRAIN = 1437  # scikit-learn's digits: 1,797 images, the first 80 % the training split


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def interp_record(first, second, out, *options):
    """`sharp interp FIRST SECOND OPTIONS --out OUT`, which must succeed; its interp.json."""
    result = invoke("interp", first, second, *options, "--out", out)
    assert result.exit_code == 0, result.output
    return json.loads((out / "interp.json").read_text())


def final_model_and_probe_set(run, n, dtype=torch.float64):
    """The run's final model and its probe set (seeded balanced subset of the training split),
    rebuilt here from the dataset and config without sharp.probe_runs."""
    config = json.loads((run / "config.json").read_text())
    s, d = config["settings"], config["derived"]
    data = load_digits()
    model = build_model(
        s["model"], d["in_channels"], d["num_classes"], d["image_size"], s["width"], s["norm"]
    )
    model.load_state_dict(torch.load(run / "final.pt", weights_only=True))
    model = model.to(dtype).eval()
    index = evaluation_subset(data.train_labels, n, 0)
    mean = torch.tensor(data.mean, dtype=dtype).view(1, -1, 1, 1)
    std = torch.tensor(data.std, dtype=dtype).view(1, -1, 1, 1)
    images = (data.train_images[index].to(dtype) / 255 - mean) / std
    labels = data.train_labels[index]
    return model, list(zip(images.split(64), labels.split(64), strict=True))


def mean_loss_of(model, batches, loss=F.cross_entropy):
    with torch.no_grad():
        return float(sum(loss(model(x), y) * len(y) for x, y in batches) / sum(len(y) for _, y in batches))


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
    assert record["n_examples"] == 200 and record["bn_mode"] == "eval"
    assert record["provenance"]["probe_set"] == 200 and record["provenance"]["checkpoint"] == "final"
    # the glue against a probe set and model rebuilt by hand: the final weights, the seeded
    # class-balanced subset, normalized here; the eigenvalues by the Python API in float64 at a
    # tight tolerance (the algorithm itself is checked against dense Hessians in test_hessian)
    model, batches = final_model_and_probe_set(runs / "sb", 200)
    reference = hessian_top_eigenvalues(model, batches, k=2, tol=1e-9).eigenvalues
    # the CLI ran in float32 at tol 1e-3 (a residual bound relative to each eigenvalue)
    assert record["eigenvalues"] == pytest.approx(reference, rel=5e-3)
    sharp = json.loads(next((runs / "sb" / "probes").glob("final.sharpness-eps0.001-full*")).read_text())
    assert sharp["f0"] == pytest.approx(mean_loss_of(model, batches), rel=1e-5)  # float32 against float64
    assert sharp["sharpness"] == pytest.approx(
        (sharp["fmax"] - sharp["f0"]) / (1 + sharp["f0"]) * 100, rel=1e-12
    )
    assert sharp["lbfgs_iterations"] == 10 * len(sharp["starts"])  # the full budget for every start
    assert sharp["loss_fn"] == "cross_entropy" and sharp["torch_flags"]["tf32_matmul"] is False
    noise = json.loads(next((runs / "sb" / "probes").glob("final.noise-scale*")).read_text())
    assert noise["pool"] == "training split" and noise["population"] == DIGITS_TRAIN

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
    record = interp_record(
        runs / "sb", runs / "lb", out, "--alphas", "-1:2:7", "--bn", "a", "--train-set", "300"
    )
    assert record["alphas"] == [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0]
    # endpoints: the trainer's own final evaluation of each run on the whole test split
    assert record["test_acc"][2] == pytest.approx(RunDir(runs / "sb").status()["test_acc"])
    assert record["test_acc"][4] == pytest.approx(RunDir(runs / "lb").status()["test_acc"])
    assert record["test_loss"][2] == pytest.approx(RunDir(runs / "sb").status()["test_loss"], rel=1e-5)
    with open(out / "interp.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 7 and float(rows[0]["alpha"]) == -1.0  # a grid endpoint, written exactly
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


def test_trace_estimator_hutch_plus_plus_is_an_option(runs):
    args = ["--probe-set", "64", "--trace", "--trace-samples", "12", "--trace-estimator", "hutch++"]
    result = invoke("probe", runs / "lb", *args)
    assert result.exit_code == 0, result.output
    trace = json.loads(next((runs / "lb" / "probes").glob("final.hessian-trace-hutchpp.*")).read_text())
    # 12 HVPs: a sketch of 4, 4 more for its exact trace, then Hutchinson on the residual
    assert trace["settings"]["sketch"] == 4 and trace["evaluations"]["hvp"] <= 12
    assert trace["trace"] == pytest.approx(
        trace["settings"]["low_rank_trace"] + sum(trace["samples"]) / len(trace["samples"]), rel=1e-12
    )
    bad = invoke("probe", runs / "lb", "--trace", "--trace-estimator", "hutch++", "--trace-samples", "5")
    assert bad.exit_code == 2 and "at least 6" in bad.output
    bad = invoke("probe", runs / "lb", "--trace", "--trace-estimator", "hutch++", "--method", "pyhessian")
    assert bad.exit_code == 2 and "drop it or --trace-estimator" in bad.output


@pytest.fixture(scope="module")
def bn_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bn_runs")
    common = [
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--norm",
        "bn",
        "--width",
        "0.5",
        "--epochs",
        "1",
        "--quiet",
    ]
    for name, batch in (("sb", "32"), ("lb", "256")):
        result = invoke("train", *common, "--batch-size", batch, "--out", root / name)
        assert result.exit_code == 0, result.output
    return root


def test_probe_bn_modes_recompute_and_batch(bn_runs):
    run = bn_runs / "sb"
    base = ["probe", run, "--probe-set", "100", "--precision", "fp64", "--sharpness", "--eps", "1e-3"]
    base += ["--maxiter", "2", "--random-starts", "0"]
    for mode in ("eval", "recompute"):
        result = invoke(*base, "--bn-mode", mode)
        assert result.exit_code == 0, result.output
    records = {
        json.loads(p.read_text())["bn_mode"]: json.loads(p.read_text())
        for p in (run / "probes").glob("*.json")
    }
    model, batches = final_model_and_probe_set(run, 100)
    assert records["eval"]["f0"] == pytest.approx(mean_loss_of(model, batches), rel=1e-12)
    # recompute: the statistics of the whole training split at the final weights; the reference is
    # the exactness property of recompute_bn_statistics (tested in test_bn_modes) on a hand-built split
    _, split = final_model_and_probe_set(run, DIGITS_TRAIN)
    recompute_bn_statistics(model, split)
    assert records["recompute"]["f0"] == pytest.approx(mean_loss_of(model, batches), rel=1e-12)
    assert records["recompute"]["bn_settings"]["recomputed_from_examples"] == DIGITS_TRAIN
    assert abs(records["recompute"]["f0"] - records["eval"]["f0"]) > 1e-6  # stale statistics move the loss

    result = invoke(
        "probe",
        run,
        "--probe-set",
        "100",
        "--hessian",
        "--top-k",
        "1",
        "--bn-mode",
        "batch",
        "--bn-batch",
        "30",
    )
    assert result.exit_code == 0, result.output
    record = json.loads(next((run / "probes").glob("final.hessian-top1-lanczos.*")).read_text())
    assert record["bn_settings"]["groups"] == 4 and record["bn_settings"]["last_group"] == 10
    assert record["provenance"]["bn_batch"] == 30
    default = invoke("probe", run, "--trace", "--trace-samples", "2", "--bn-mode", "batch")
    assert default.exit_code == 0, default.output
    record = json.loads(next((run / "probes").glob("final.hessian-trace.*")).read_text())
    derived = json.loads((run / "config.json").read_text())["derived"]
    assert record["provenance"]["bn_batch"] == derived["eval_batch"]  # without --bn-batch: the run's own
    for args, fragment in (
        (["--bn-batch", "30"], "use it with --bn-mode batch"),
        (["--bn-set", "50"], "use it with --bn-mode recompute"),
    ):
        bad = invoke("probe", run, "--hessian", *args)
        lines = [line for line in bad.output.splitlines() if line.strip()]
        assert bad.exit_code == 2 and len(lines) == 1 and fragment in lines[0], bad.output


def test_probe_reparam_check_reports_both_weights(runs):
    result = invoke(
        "probe",
        runs / "lb",
        "--probe-set",
        "100",
        "--precision",
        "fp64",
        "--reparam-check",
        "10",
        "--sharpness",
        "--eps",
        "1e-3",
        "--maxiter",
        "3",
        "--hessian",
        "--top-k",
        "1",
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("reparam-check") == 2 and "rescaled by 10" in result.output
    probes = runs / "lb" / "probes"
    original = json.loads(next(probes.glob("final.sharpness-eps0.001-full.*")).read_text())
    rescaled = json.loads(next(probes.glob("final.sharpness-eps0.001-full-reparam10.*")).read_text())
    assert rescaled["reparam"]["alpha"] == 10 and "ReLU layer pair" in rescaled["reparam"]["rule"]
    assert rescaled["f0"] == pytest.approx(original["f0"], rel=1e-12)  # the same function, float64
    top = json.loads(next(probes.glob("final.hessian-top1-lanczos.*")).read_text())["eigenvalues"][0]
    top_rescaled = json.loads(next(probes.glob("final.hessian-top1-lanczos-reparam10.*")).read_text())
    assert abs(top_rescaled["eigenvalues"][0] / top - 1) > 0.1  # lambda_max is not invariant


def test_probe_pyhessian_method(runs):
    pytest.importorskip("pyhessian")
    result = invoke(
        "probe",
        runs / "lb",
        "--probe-set",
        "64",
        "--precision",
        "fp64",
        "--hessian",
        "--top-k",
        "1",
        "--trace",
        "--trace-samples",
        "5",
        "--method",
        "pyhessian",
    )
    assert result.exit_code == 0, result.output
    probes = runs / "lb" / "probes"
    eigen = json.loads(next(probes.glob("final.hessian-top1-pyhessian.*")).read_text())
    trace = json.loads(next(probes.glob("final.hessian-trace-pyhessian.*")).read_text())
    assert eigen["method"] == "pyhessian" and trace["method"] == "pyhessian" and len(trace["samples"]) <= 5
    model, batches = final_model_and_probe_set(runs / "lb", 64)
    reference = hessian_top_eigenvalues(model, batches, k=1, tol=1e-9).eigenvalues[0]
    # PyHessian stops when successive Rayleigh quotients change by less than tol (1e-3) relative:
    # with this probe set's small eigengap that was 1.2 % low (at tol 1e-6 its 100 iterations end
    # 0.18 % low); 2 % bounds it. Our Lanczos stops on a residual bound instead.
    assert eigen["eigenvalues"][0] == pytest.approx(reference, rel=2e-2)
    bad = invoke("probe", runs / "lb", "--density", "--method", "pyhessian")
    assert bad.exit_code == 2 and "torch.eig" in bad.output and len(bad.output.strip().splitlines()) == 1


def test_probe_honours_the_runs_loss_and_torch_settings(runs, tmp_path):
    run = tmp_path / "mse"
    shutil.copytree(runs / "lb", run, ignore=shutil.ignore_patterns("probes"))
    config = json.loads((run / "config.json").read_text())
    config["settings"]["loss"] = "mse"
    (run / "config.json").write_text(json.dumps(config))
    threads = torch.get_num_threads()
    result = invoke(
        "probe",
        run,
        "--probe-set",
        "64",
        "--precision",
        "fp64",
        "--sharpness",
        "--eps",
        "1e-3",
        "--maxiter",
        "1",
        "--random-starts",
        "0",
        "--threads",
        "1",
        "--deterministic",
    )
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == threads  # restored after the probe
    record = json.loads(next((run / "probes").glob("*.json")).read_text())
    model, batches = final_model_and_probe_set(run, 64)
    assert record["loss_fn"] == "squared_loss" and record["provenance"]["loss"] == "mse"
    assert record["f0"] == pytest.approx(mean_loss_of(model, batches, squared_loss), rel=1e-12)
    assert record["torch_flags"] == {
        "deterministic": True,
        "cudnn_benchmark": False,
        "tf32_matmul": False,
        "tf32_cudnn": False,
        "threads": 1,
    }


def test_interp_sine_path_and_batch_statistics(runs, bn_runs, tmp_path):
    record = interp_record(
        runs / "sb",
        runs / "lb",
        tmp_path / "sin",
        "--alphas",
        "0,0.5,1",
        "--path",
        "sin",
        "--bn",
        "a",
        "--train-set",
        "300",
    )
    assert record["path"] == "sin"
    # the endpoints are the two solutions: the trainer's own final test evaluation of each
    assert record["test_acc"][0] == pytest.approx(RunDir(runs / "sb").status()["test_acc"], abs=1e-12)
    assert record["test_acc"][2] == pytest.approx(RunDir(runs / "lb").status()["test_acc"], abs=1e-12)
    record = interp_record(
        bn_runs / "sb",
        bn_runs / "lb",
        tmp_path / "rec",
        "--alphas",
        "0,1",
        "--bn",
        "recompute",
        "--train-set",
        "100",
        "--precision",
        "fp64",
    )
    model, batches = final_model_and_probe_set(bn_runs / "sb", 100)
    _, split = final_model_and_probe_set(bn_runs / "sb", DIGITS_TRAIN)
    recompute_bn_statistics(model, split)
    assert record["train_loss"][0] == pytest.approx(mean_loss_of(model, batches), rel=1e-12)
    assert record["provenance"]["bn_set"] == DIGITS_TRAIN
    record = interp_record(
        bn_runs / "sb",
        bn_runs / "lb",
        tmp_path / "batch",
        "--alphas",
        "0,1",
        "--bn",
        "batch",
        "--bn-batch",
        "50",
        "--train-set",
        "100",
    )
    assert record["bn"] == "batch" and record["bn_settings"]["groups"] == 2
    bad = invoke("interp", runs / "sb", runs / "lb", "--path", "arc", "--out", tmp_path / "x")
    assert bad.exit_code == 2 and "--path 'arc' is unknown" in bad.output
