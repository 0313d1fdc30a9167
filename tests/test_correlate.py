"""`sharp correlate` (analysis/rank.py, analysis/correlate.py): Kendall's τ and Jiang et al.'s Ψ
against hand computations, the bootstrap interval, and the whole command on synthetic run
directories and on a tiny digits sweep."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from test_analysis import make_run

import analysis.correlate as correlate_module
from analysis.correlate import correlate, load_study
from analysis.jiang2020 import PaperValue
from analysis.rank import bootstrap_interval, granulated_tau, kendall_tau
from sharp.cli import cli

# τ and Ψ are ratios of small integers computed in float64: 1e-12 absolute is rounding only
EXACT = 1e-12


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


# --- the hand-computed table -----------------------------------------------------------------------
# Six runs: batch size B in {32, 64, 128} x learning rate in {0.1, 0.01}, one seed (an axis with a
# single value). Measure m and generalization gap g (test error - train error):
#   run  B    lr    m  g
#   1    32   0.1   1  1
#   2    64   0.1   2  3
#   3    128  0.1   3  2
#   4    32   0.01  1  2     (m tied with run 1)
#   5    64   0.01  4  4
#   6    128  0.01  5  4     (g tied with run 5)
M = [1, 2, 3, 1, 4, 5]
G = [1, 3, 2, 2, 4, 4]
POINTS = [(32, 0.1), (64, 0.1), (128, 0.1), (32, 0.01), (64, 0.01), (128, 0.01)]
# Over all 15 pairs: 11 concordant, 1 discordant (2,3), 1 tied in m only (1,4), 2 tied in g only
# (3,4), (5,6). tau_b = (C - D) / sqrt((n0 - ties_m)(n0 - ties_g)) = 10 / sqrt(14 * 13).
TAU = 10 / math.sqrt(14 * 13)
# Axis B, groups by lr: lr=0.1 runs 1,2,3: C=2, D=1 -> 1/3; lr=0.01 runs 4,5,6: C=2 and one tie in g
# -> 2 / sqrt(3 * 2). Axis lr, groups by B: B=32 runs 1,4 have m tied (tau undefined, no group);
# B=64 runs 2,5 and B=128 runs 3,6 are concordant -> 1, 1. Axis seed: one value, no group.
PSI_B = (1 / 3 + 2 / math.sqrt(6)) / 2
PSI_LR = 1.0
PSI = (PSI_B + PSI_LR) / 2


def test_kendall_tau_with_ties_by_hand():
    assert kendall_tau(M, G) == pytest.approx(TAU, abs=EXACT)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0, abs=EXACT)
    assert kendall_tau([1, 1, 1], [1, 2, 3]) is None  # a constant measure ranks nothing
    assert kendall_tau([1], [2]) is None


def test_granulated_tau_by_hand_with_ties_and_a_single_valued_axis():
    values = [(b, lr, 0) for b, lr in POINTS]
    psi, per_axis = granulated_tau(values, ["batch_size", "lr", "seed"], M, G)
    by_axis = {a.axis: a for a in per_axis}
    assert by_axis["batch_size"].psi == pytest.approx(PSI_B, abs=EXACT)
    assert by_axis["batch_size"].n_groups == 2
    assert by_axis["lr"].psi == pytest.approx(PSI_LR, abs=EXACT) and by_axis["lr"].n_groups == 2
    assert by_axis["seed"].psi is None and by_axis["seed"].n_groups == 0
    assert psi == pytest.approx(PSI, abs=EXACT)


def test_bootstrap_interval_holds_the_estimate_shrinks_with_more_runs_and_is_seeded():
    rng = np.random.default_rng(1)
    widths = []
    for n in (10, 40, 160):
        x = rng.normal(size=n)
        y = x + rng.normal(size=n)  # a noisy monotone relation: tau about 0.5
        interval = bootstrap_interval(x, y, n_resamples=400, seed=3)
        tau = kendall_tau(list(x), list(y))
        assert interval.low <= tau <= interval.high
        assert interval.n_resamples == 400 and interval.n_defined == 400 and interval.level == 0.95
        widths.append(interval.high - interval.low)
    assert widths[0] > widths[1] > widths[2]  # ~1/sqrt(n): 10 -> 160 runs shrinks it about 4x
    assert bootstrap_interval(x, y, 50, seed=5) == bootstrap_interval(x, y, 50, seed=5)
    few = bootstrap_interval([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], n_resamples=200, seed=0)
    assert few.n_defined < 200  # resamples repeating one run have no tau: dropped and counted
    assert few.low == pytest.approx(1.0) and few.high == pytest.approx(1.0)


# --- synthetic run directories ---------------------------------------------------------------------


def norms_probe(l2, path=1.0, bn_mode="eval"):
    return {
        "probe": "weight_norms",
        "l2_norm": l2,
        "distance_from_init": l2 / 2,
        "path_norm": path,
        "frobenius_sq_sum": l2**2,
        "provenance": {"checkpoint": "final", "task": "weight-norms", "probe_set": 64, "bn_mode": bn_mode},
    }


def eigen_probe(value, bn_mode="eval", checkpoint="final"):
    return {
        "probe": "hessian_eigenvalues",
        "eigenvalues": [value, value / 2],
        "provenance": {
            "checkpoint": checkpoint, "task": "hessian-top2-lanczos", "probe_set": 64, "bn_mode": bn_mode,
        },
    }  # fmt: skip


def synthetic_run(root, name, *, settings, gap, probes=(), state="finished", train_loss=0.05):
    """A run directory whose final evaluation has train accuracy 0.9 and test accuracy 0.9 - gap."""
    final = {
        "step": 10,
        "epoch": 2.0,
        "eval_train_acc": 0.9,
        "eval_train_loss": train_loss,
        "test_acc": 0.9 - gap,
        "test_loss": train_loss + 2 * gap,
    }
    start = {**final, "step": 0, "epoch": 0.0, "test_acc": 0.1, "eval_train_loss": 2.3}
    batch = settings.get("batch_size", 32)
    return make_run(
        root, name, batch=batch, metrics=[start, final], probes=probes, state=state, settings=settings
    )


def hand_table_runs(root, **extra):
    for i, ((batch, lr), m, g) in enumerate(zip(POINTS, M, G, strict=True), start=1):
        synthetic_run(
            root,
            f"run{i}",
            settings={"batch_size": batch, "micro_batch": batch, "lr": lr, **extra},
            gap=g / 100,
            probes=[norms_probe(float(m))],
        )


def test_correlate_on_the_hand_table_gives_the_hand_values(tmp_path):
    root = tmp_path / "runs"
    hand_table_runs(root)
    # bare run directories: the settings that differ are the axes; batch_size and micro_batch vary
    # together, so they are one axis
    assert [a.name for a in correlate(load_study([root]), n_resamples=1).axes] == [
        "batch_size,micro_batch",
        "lr",
    ]
    out = tmp_path / "out"
    result = invoke("correlate", root, "--out", out, "--bootstrap", "200")
    assert result.exit_code == 0, result.output + result.stderr
    rows = {(r["measure"], r["target"]): r for r in read_csv(out / "correlation.csv")}
    assert list(read_csv(out / "correlation.csv")[0]) == [
        "measure", "target", "tau", "tau_low", "tau_high", "psi", "n_runs",
    ]  # fmt: skip
    for name in ("‖w‖₂", "‖w − w₀‖₂", "Σ‖W‖_F²"):  # monotone in m: the same ranks
        row = rows[name, "error_gap"]
        assert float(row["tau"]) == pytest.approx(TAU, abs=EXACT)
        assert float(row["psi"]) == pytest.approx(PSI_B / 2 + PSI_LR / 2, abs=EXACT)
        assert float(row["tau_low"]) <= float(row["tau"]) <= float(row["tau_high"]) and row["n_runs"] == "6"
    assert rows["path norm", "error_gap"]["tau"] == ""  # constant over the runs: no tau
    loss = rows["‖w‖₂", "loss_gap"]  # test loss - train loss = 2 g: the same ranks as the error gap
    assert float(loss["tau"]) == pytest.approx(TAU, abs=EXACT)
    granulated = {(r["measure"], r["target"], r["axis"]): r for r in read_csv(out / "granulated.csv")}
    batch_axis = granulated["‖w‖₂", "error_gap", "batch_size,micro_batch"]
    assert float(batch_axis["psi_axis"]) == pytest.approx(PSI_B, abs=EXACT)
    assert granulated["‖w‖₂", "error_gap", "lr"]["n_groups"] == "2"
    text = (out / "correlation.md").read_text()
    assert "200 resamples, seed 0" in text and "Ψ" in text and "not shown" in text
    for name in ("correlation_tau.png", "correlation_scatter.png", "correlation_tau.csv", "per_run.csv"):
        assert (out / name).exists()


def test_a_seed_axis_with_one_value_from_a_sweep_manifest_contributes_no_group(tmp_path):
    sweep = tmp_path / "sweep"
    hand_table_runs(sweep / "runs")
    axes = {"batch_size,micro_batch": [[32, 32], [64, 64], [128, 128]], "lr": [0.1, 0.01], "seed": [0]}
    (sweep / "sweep.json").write_text(json.dumps({"name": "s", "axes": axes, "runs": []}))
    study = load_study([sweep])
    assert [a.name for a in study.axes] == ["batch_size,micro_batch", "lr", "seed"]
    result = correlate(study, n_resamples=20)
    assert result.axes == study.axes  # nothing else varies
    c = next(c for c in result.correlations if c.measure == "‖w‖₂" and c.target == "error_gap")
    assert [(a.axis, a.n_groups) for a in c.per_axis] == [("batch_size,micro_batch", 2), ("lr", 2)]
    assert c.psi == pytest.approx(PSI, abs=EXACT)
    assert "seed (0)" in "\n".join(correlate_module.settings_text(result))


def test_runs_short_of_the_stopping_point_diverged_ones_and_missing_measures_are_listed(tmp_path):
    root = tmp_path / "runs"
    settings = {"until_train_loss": 0.1}
    for i, (batch, gap) in enumerate([(16, 0.01), (32, 0.02), (64, 0.03), (128, 0.05)]):
        probes = [norms_probe(float(i))] + ([eigen_probe(float(i) + 1)] if i != 1 else [])
        synthetic_run(root, f"b{batch}", settings={"batch_size": batch, **settings}, gap=gap, probes=probes)
    synthetic_run(root, "short", settings={"batch_size": 256, **settings}, gap=0.2, train_loss=0.4)
    synthetic_run(root, "nan", settings={"batch_size": 512, **settings}, gap=0.2, state="diverged")
    result = correlate(load_study([root]), n_resamples=20)
    assert [row.run.name for row in result.rows] == ["b128", "b16", "b32", "b64"]
    reasons = dict(result.excluded)
    assert "did not reach until_train_loss 0.1: final training loss 0.4" in reasons["short"]
    assert reasons["nan"].startswith("diverged")
    assert result.missing == {"λ_max": ["b32"]}
    lam = next(c for c in result.correlations if c.measure == "λ_max" and c.target == "error_gap")
    assert lam.n_runs == 3 and lam.tau == pytest.approx(1.0)  # b16, b64, b128: 1, 3, 4 against .01, .03, .05

    out = tmp_path / "out"
    cli_result = invoke("correlate", root, "--out", out, "--bootstrap", "20")
    assert cli_result.exit_code == 0
    assert "sharp: left out: λ_max: missing in 1 of 4 runs (b32)" in cli_result.stderr
    assert "short: did not reach" in cli_result.stderr and "Traceback" not in cli_result.stderr
    every = correlate(load_study([root]), n_resamples=20, all_runs=True)
    assert len(every.rows) == 5 and "short" in {row.run.name for row in every.rows}


def test_probes_of_one_kind_at_two_bn_modes_are_two_measures(tmp_path):
    root = tmp_path / "runs"
    for i, batch in enumerate([16, 32, 64]):
        probes = [
            eigen_probe(float(i)),
            eigen_probe(float(10 - i), bn_mode="batch"),
            eigen_probe(99.0, checkpoint="epoch-0001"),
        ]
        synthetic_run(root, f"b{batch}", settings={"batch_size": batch}, gap=0.01 * (i + 1), probes=probes)
    result = correlate(load_study([root]), n_resamples=20)
    taus = {c.measure: c.tau for c in result.correlations if c.target == "error_gap"}
    assert taus == {"λ_max [bn_mode=eval]": pytest.approx(1.0), "λ_max [bn_mode=batch]": pytest.approx(-1.0)}
    rows = read_csv(correlate_module.write_per_run(result, tmp_path / "per_run.csv"))
    assert [float(r["λ_max [bn_mode=batch]"]) for r in rows] == [10.0, 9.0, 8.0]  # not the epoch-0001 probe


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root.mkdir(), "no run directories"),
        (lambda root: synthetic_run(root, "d", settings={}, gap=0.1, state="diverged"), "no finished run"),
        (
            lambda root: [synthetic_run(root, f"r{i}", settings={"batch_size": 8 * (i + 1)}, gap=0.1,
                                        probes=[norms_probe(1.0)]) for i in range(2)],
            "at least 3 finished runs",
        ),
        (
            lambda root: [synthetic_run(root, f"r{i}", settings={"batch_size": 8 * i + 8}, gap=0.1)
                          for i in range(3)],
            "hold no probe results",
        ),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_without_a_traceback(tmp_path, make, message):
    root = tmp_path / "runs"
    make(root)
    result = invoke("correlate", root, "--out", tmp_path / "out")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sharp: error:") and message in lines[0], result.stderr
    assert invoke("correlate", tmp_path / "nowhere", "--out", tmp_path / "o").exit_code == 2


def test_confirmed_paper_numbers_are_printed_labelled_beside_ours(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    hand_table_runs(root)
    monkeypatch.setitem(
        correlate_module.JIANG_2020, "path_norm", PaperValue("path.norm", 0.25, 0.5, "Table X (test entry)")
    )
    result = correlate(load_study([root]), n_resamples=10)
    table = correlate_module.correlation_table(result)
    assert "τ, Jiang et al. 2020 (paper)" in table and "Table X (test entry)" in table
    path_row = next(line for line in table.splitlines() if line.startswith("| path norm"))
    assert "0.250" in path_row and "0.500" in path_row
    assert "Paper columns" in correlate_module.paper_note(result)


# --- end to end on a tiny digits sweep -------------------------------------------------------------

SWEEP = """
[base]
dataset = "digits"
model = "mlp"
width = 0.25
norm = "none"
epochs = 1
eval_every = 1.0
checkpoint_every = 1
[axes]
batch_size = [16, 64, 256]
lr = [0.05, 0.2]
[probe]
probe_set = 64
norms = true
sharpness = true
eps = "1e-3"
maxiter = 2
hessian = true
top_k = 1
subspace = 4
adaptive = true
average = true
trace = true
trace_samples = 4
noise_scale = true
b_small = 16
b_big = 64
"""

# per_run.csv's column of each probe task of SWEEP beside λ_max and the full-space ε-sharpness,
# and the field of its record that holds the number
MEASURE_COLUMNS = {
    "sharpness-eps0.001-sub4": ("ε-sharpness ε=0.001 subspace p=4", "sharpness"),
    "adaptive-linf-rho0.001": ("worst-case adaptive sharpness ρ=0.001 ℓ∞", "sharpness"),
    "average-l2-rho0.05": ("average adaptive sharpness ρ=0.05 ℓ2", "sharpness"),
    "hessian-trace": ("Hessian trace", "trace"),
    "noise-scale-b16-64": ("B_simple (16/64)", "b_simple"),
}


def test_correlate_a_digits_sweep_end_to_end(tmp_path):
    spec = tmp_path / "tiny.toml"
    spec.write_text(SWEEP)
    sweep = tmp_path / "sweep"
    assert invoke("sweep", spec, "--out", sweep).exit_code == 0
    out = tmp_path / "corr"
    result = invoke("correlate", sweep, "--out", out, "--bootstrap", "50", "--scale", "cpu")
    assert result.exit_code == 0, result.output + result.stderr
    rows = {r["run"]: r for r in read_csv(out / "per_run.csv")}
    assert len(rows) == 6 and {r["batch_size"] for r in rows.values()} == {"16", "64", "256"}
    for name, row in rows.items():
        run = sweep / "runs" / name
        final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
        # (1 - test_acc) - (1 - train_acc) against train_acc - test_acc: one rounding of a number <= 1
        assert float(row["error_gap"]) == pytest.approx(
            final["eval_train_acc"] - final["test_acc"], abs=1e-15
        )
        # the comparisons below are exact: per_run.csv writes floats by repr, which reads back to
        # the same float64, and each cell is the record's number (or the same one subtraction of
        # two numbers that JSON round-trips exactly), with no arithmetic in between
        assert float(row["loss_gap"]) == final["test_loss"] - final["eval_train_loss"]
        records = [json.loads(p.read_text()) for p in (run / "probes").glob("final.*.json")]
        probes = {r["provenance"]["task"]: r for r in records}
        assert float(row["λ_max"]) == probes["hessian-top1-lanczos"]["eigenvalues"][0]
        assert float(row["ε-sharpness ε=0.001 full"]) == probes["sharpness-eps0.001-full"]["sharpness"]
        for field, title in correlate_module.NORM_TITLES.items():
            assert float(row[title]) == probes["weight-norms"][field]
        for task, (title, field) in MEASURE_COLUMNS.items():
            assert float(row[title]) == probes[task][field], (task, title)
    measures = {r["measure"] for r in read_csv(out / "correlation.csv")}
    assert {"λ_max", "ε-sharpness ε=0.001 full", "‖w − w₀‖₂", "path norm"} <= measures
    assert "batch_size (16, 64, 256); lr (0.05, 0.2)" in (out / "correlation.md").read_text()

    report = invoke("report", sweep, "--out", tmp_path / "report")
    assert report.exit_code == 0, report.output
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Rank correlation with the generalization gap" in text and "| λ_max | 6 |" in text
    assert (tmp_path / "report" / "figures" / "correlation.csv").exists()


def test_the_generalization_measures_spec_runs_end_to_end_at_toy_size(tmp_path):
    """paper_repro/generalization-measures.toml at cpu scale with its probes as they are, on digits:
    4 runs (2 batch sizes x BN / no BN), 1 epoch, a quarter of the width."""
    from sharp.config import tomllib
    from sharp.repro import SPEC_DIR, ReproSpec, run_repro

    data = tomllib.loads((SPEC_DIR / "generalization-measures.toml").read_text())
    for group in data["scales"]["cpu"]["groups"].values():
        group["axes"] = {"batch_size": [16, 64], "lr": [0.001], "weight_decay": [0.0005], "seed": [0]}
    toy = {
        "dataset": "digits", "train_subset": None, "test_subset": None, "eval_train_size": 256, "width": 0.25,
        "epochs": 1, "until_train_loss": None, "checkpoint_every": 1,
    }  # fmt: skip
    report = run_repro(ReproSpec.from_dict(data, "cpu", overrides=toy), tmp_path / "gm", echo=lambda _: None)
    text = report.read_text()
    assert "Rank correlation with the generalization gap" in text and "not shown beside ours" in text
    rows = read_csv(tmp_path / "gm" / "figures" / "per_run.csv")
    assert sorted((r["norm"], r["batch_size"]) for r in rows) == [
        ("bn", "16"), ("bn", "64"), ("none", "16"), ("none", "64"),
    ]  # fmt: skip
    measures = [r["measure"] for r in read_csv(tmp_path / "gm" / "figures" / "correlation.csv")]
    for name in (
        "ε-sharpness ε=0.001 full", "ε-sharpness ε=0.001 subspace p=100", "λ_max", "Hessian trace",
        "worst-case adaptive sharpness ρ=0.001 ℓ∞", "average adaptive sharpness ρ=0.05 ℓ2",
        "B_simple (16/64)", "‖w‖₂", "‖w − w₀‖₂", "path norm", "Σ‖W‖_F²",
    ):  # fmt: skip
        assert name in measures, (name, measures)
    path_norms = {r["norm"]: r["path norm"] for r in rows}
    assert path_norms["bn"] == "" and float(path_norms["none"]) > 0  # defined without BN only
    assert all(float(r["‖w − w₀‖₂"]) > 0 for r in rows)  # epoch-0000.pt kept by checkpoint_every
    assert "path norm: missing in 2 of 4 runs" in text
