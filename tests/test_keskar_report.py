"""The Keskar parts of the report on synthetic run directories (no torch): tables per family of runs,
the ablation of LB ÷ SB, the distance ratio, the warm-start figure (Fig. 5), dataset names and the
interpolation's figure. Every expected number is worked out by hand below."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from test_analysis import assert_png, evaluations, make_run, number, read_csv, sharpness

from analysis.ablation import keskar_ablation
from analysis.keskar import keskar_piggyback
from analysis.report import build_report
from analysis.results import describe, families, load_runs, stopping_rule
from analysis.tables import keskar_tables
from sharp.errors import SharpError


def probed(record, bn_mode="eval"):
    record["bn_mode"] = bn_mode
    record["provenance"]["bn_mode"] = bn_mode
    return record


def eig(top, bn_mode="eval"):
    return probed({"probe": "hessian_eigenvalues", "eigenvalues": [top, top / 2], "settings": {},
                   "provenance": {"checkpoint": "final"}}, bn_mode)  # fmt: skip


def trace(value, bn_mode="eval"):
    record = {"probe": "hessian_trace", "trace": value, "settings": {}, "provenance": {"checkpoint": "final"}}
    return probed(record, bn_mode)


def norms(distance):
    record = {"probe": "weight_norms", "l2_norm": 10.0, "distance_from_init": distance, "settings": {}}
    return probed({**record, "provenance": {"checkpoint": "final"}})


def patch_derived(path, **derived):
    config = json.loads((path / "config.json").read_text())
    config["derived"].update(derived)
    (path / "config.json").write_text(json.dumps(config))
    return path


def run(root, name, *, batch, model, seed=0, test_acc=0.9, probes=(), settings=None, **derived):
    metrics = evaluations([2.3, 0.6, 0.3], [0.1, 0.7, test_acc], batch=batch)
    path = make_run(root, name, batch=batch, seed=seed, model=model, metrics=metrics, probes=probes,
                    settings=settings)  # fmt: skip
    return patch_derived(path, **derived) if derived else path


# --- families ------------------------------------------------------------------------------------------


def test_two_networks_at_the_same_batch_sizes_are_not_averaged(tmp_path):
    root = tmp_path / "runs"
    values = {  # (model, batch, seed): (test accuracy, full-space sharpness at 1e-3)
        ("keskar-c1", 32, 0): (0.80, 10.0), ("keskar-c1", 32, 1): (0.82, 14.0),
        ("keskar-c1", 1024, 0): (0.76, 300.0), ("keskar-c1", 1024, 1): (0.78, 500.0),
        ("resnet8", 32, 0): (0.60, 1000.0), ("resnet8", 1024, 0): (0.50, 2000.0),
    }  # fmt: skip
    for (model, batch, seed), (acc, value) in values.items():
        run(root, f"{model}-{batch}-{seed}", batch=batch, model=model, seed=seed, test_acc=acc,
            probes=[sharpness(value)])  # fmt: skip
    runs = load_runs([root])
    assert [len(f.runs) for f in families(runs)] == [4, 2]
    markdown = keskar_tables(runs, tmp_path / "t", sb_batch=32, lb_batch=1024)
    table3 = markdown.split("### Table 3")[1].split("### Table 4")[0]
    c1 = next(
        line for line in table3.splitlines() if "**this run** (mlp" not in line and "keskar-c1 (bn)" in line
    )
    resnet = next(line for line in table3.splitlines() if line.startswith("| **this run** (resnet8 (bn)"))
    assert "12.00 ± 2.83 (n=2)" in c1 and "400.00 ± 141.42 (n=2)" in c1  # C1 alone: (10, 14), (300, 500)
    assert "1000.00 (n=1)" in resnet and "2000.00 (n=1)" in resnet  # the ResNet alone
    table2 = markdown.split("### Table 2")[1].split("### Table 3")[0]
    assert "81.00 ± 1.41 (n=2)" in table2 and "60.00 (n=1)" in table2  # never (80 + 82 + 60) / 3
    rows = read_csv(tmp_path / "t" / "keskar_tables.csv")
    full = {
        (r["family"].split(";")[0], r["regime"]): number(r["mean"])
        for r in rows
        if r["source"] == "this run" and r["quantity"] == "sharpness_full" and r["eps"] == "0.001"
    }
    assert full == {
        ("keskar-c1 (bn)", "SB"): 12.0, ("keskar-c1 (bn)", "LB"): 400.0,
        ("resnet8 (bn)", "SB"): 1000.0, ("resnet8 (bn)", "LB"): 2000.0,
    }  # fmt: skip


def test_families_differ_in_anything_but_the_batch_and_the_trial(tmp_path):
    root = tmp_path / "runs"
    plateau = {"until_plateau": 3, "plateau_tol": 0.01, "epochs": 40}
    run(root, "a", batch=32, model="keskar-c1", settings={**plateau, "init_seed": 1, "device": "cuda"})
    run(root, "b", batch=512, model="keskar-c1", settings={**plateau, "micro_batch": 128, "init_seed": 2})
    run(root, "c", batch=32, model="keskar-c1", settings={"until_train_loss": 0.1, "epochs": 40})
    run(
        root,
        "d",
        batch=512,
        model="keskar-c1",
        settings={**plateau, "init_from": "x/checkpoints/epoch-0002.pt"},
    )
    found = families(load_runs([root]))
    assert [[r.name for r in f.runs] for f in found] == [["a", "b"], ["c"], ["d"]]
    assert found[0].stopping == "until plateau (3 evaluations, tol 0.01), at most 40 epochs"
    assert found[1].stopping == "until train loss ≤ 0.1, at most 40 epochs"
    assert found[0].details == "from scratch" and found[2].details == "warm-started (init_from)"
    assert stopping_rule({"epochs": 3}) == "fixed length, 3 epochs"
    with pytest.raises(SharpError, match="no family of runs has finished runs at both batch size 32 and 512"):
        keskar_tables([found[1].runs[0], found[2].runs[0]], tmp_path / "t", 32, 512)


# --- the ablation ---------------------------------------------------------------------------------------

# (model, stopping, batch, seed): {bn_mode: (full 1e-3, full 5e-4, sub 1e-3, sub 5e-4, λ_max, trace)}
ABLATION = {
    ("resnet8", "loss", 32, 0): {"eval": (10, 4, 1, 0.5, 100, 1000), "recompute": (8, 3, 0.8, 0.4, 90, 900)},
    ("resnet8", "loss", 32, 1): {
        "eval": (30, 8, 3, 1.5, 300, 3000),
        "recompute": (12, 5, 1.2, 0.6, 110, 1100),
    },
    ("resnet8", "loss", 500, 0): {"eval": (100, 20, 5, 2, 400, 5000), "recompute": (40, 16, 2, 2, 200, 2000)},
    ("resnet8", "loss", 500, 1): {
        "eval": (300, 60, 15, 6, 800, 7000),
        "recompute": (60, 24, 4, 2, 400, 4000),
    },
    ("keskar-c1", "plateau", 32, 0): {"batch": (2, 1, 0.1, 0.05, 50, 500)},
    ("keskar-c1", "plateau", 500, 0): {"batch": (50, 20, 5, 2, 500, 2500)},
}
ACCURACY = {("resnet8", 32): [0.60, 0.62], ("resnet8", 500): [0.55, 0.53], ("keskar-c1", 32): [0.70],
            ("keskar-c1", 500): [0.64]}  # fmt: skip
STOPPING = {"loss": {"until_train_loss": 0.1, "epochs": 100}, "plateau": {"until_plateau": 3, "epochs": 40}}


@pytest.fixture
def ablation_runs(tmp_path):
    root = tmp_path / "runs"
    for (model, stop, batch, seed), modes in ABLATION.items():
        probes = []
        for mode, (f3, f5, s3, s5, top, tr) in modes.items():
            probes += [
                probed(sharpness(f3), mode), probed(sharpness(f5, eps=5e-4), mode),
                probed(sharpness(s3, p=100), mode), probed(sharpness(s5, eps=5e-4, p=100), mode),
                eig(top, mode), trace(tr, mode),
            ]  # fmt: skip
        acc = ACCURACY[(model, batch)][seed]
        run(root, f"{model}-{stop}-{batch}-{seed}", batch=batch, model=model, seed=seed, test_acc=acc,
            probes=probes, settings=STOPPING[stop])  # fmt: skip
    return load_runs([root])


def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_ablation_ratios_are_the_ratios_of_the_means(ablation_runs, tmp_path):
    markdown = keskar_ablation(ablation_runs, tmp_path / "a", sb_batch=32, lb_batch=500)
    rows = {(c[0].split(",")[0], c[2]): c for c in map(_cells, markdown.splitlines()[2:])}
    # ResNet, running statistics: full 1e-3 mean LB 200 / mean SB 20 = 10; 5e-4 40 / 6; subspace 10 / 2,
    # 4 / 1; λ_max 600 / 200; trace 6000 / 2000; test accuracy 61 − 54 = 7 points
    assert rows[("resnet8 (bn)", "BN: running statistics")][3:] == [
        "10×",
        f"{40 / 6:.3g}×",
        "5×",
        "4×",
        "3×",
        "3×",
        "7.00",
        "2 / 2",
    ]
    # recomputed: 50 / 10, 20 / 4, 3 / 1, 2 / 0.5, 300 / 100, 3000 / 1000
    assert rows[("resnet8 (bn)", "BN: recomputed")][3:9] == ["5×", "5×", "3×", "4×", "3×", "3×"]
    c1 = rows[("keskar-c1 (bn)", "BN: batch statistics")]
    assert c1[1] == "until plateau (3 evaluations, tol 0.01), at most 40 epochs"
    assert c1[3:] == ["25×", "20×", "50×", "40×", "10×", "5×", "6.00", "1 / 1"]
    # the paper's C1: 707.23 / 28.58 in full space at 1e-3, 137.25 / 2.18 in the subspace
    paper = rows[("C1 (shallow conv", "BN: batch statistics")]
    assert paper[3] == f"{707.23 / 28.58:.3g}×" and paper[5] == f"{137.25 / 2.18:.3g}×" and paper[7] == "—"
    csv = read_csv(tmp_path / "a" / "keskar_ablation.csv")
    by = {(r["network"], r["bn_mode"], r["quantity"], r["eps"], r["subspace_dim"]): r for r in csv}
    full = by[("resnet8 (bn)", "eval", "sharpness_full", "0.001", "")]
    assert (number(full["sb_mean"]), number(full["lb_mean"]), number(full["lb_over_sb"])) == (
        20.0,
        200.0,
        10.0,
    )
    assert full["sb_n"] == "2" and full["lb_n"] == "2"
    sub = by[("keskar-c1 (bn)", "batch", "sharpness_subspace", "0.0005", "100")]
    assert number(sub["lb_over_sb"]) == pytest.approx(40.0)
    gap = by[("resnet8 (bn)", "recompute", "test_acc", "", "")]
    assert number(gap["sb_minus_lb"]) == pytest.approx(7.0) and gap["lb_over_sb"] == ""


def test_the_report_holds_the_ablation_beside_the_tables(ablation_runs, tmp_path):
    text = build_report(ablation_runs, tmp_path / "r", sb_batch=32, lb_batch=500).read_text()
    section = text.split("what sets the size of the effect (LB ÷ SB)")[1].split("## Figures")[0]
    assert "keskar-c1 (bn)" in section and "BN: recomputed" in section and "keskar_ablation.csv" in section
    # one Fig. 4 per family, each with its own files
    figures = sorted(p.name for p in (tmp_path / "r" / "figures").glob("keskar_fig4*.png"))
    assert figures == ["keskar_fig4_batch_size-1.png", "keskar_fig4_batch_size-2.png"]
    assert "Fig. 4: accuracy and sharpness against batch size — resnet8 (bn)" in text


# --- ‖x_s − x_0‖ / ‖x_l − x_0‖ --------------------------------------------------------------------------


def test_distance_ratio_is_taken_per_shared_initial_point(tmp_path):
    root = tmp_path / "runs"
    # init seeds 0 and 1 are shared by SB and LB; init seed 2 has an SB run only and is left out
    for name, batch, init, distance in (
        ("sb0", 32, 0, 30.0), ("sb0b", 32, 0, 50.0), ("lb0", 1024, 0, 10.0),
        ("sb1", 32, 1, 60.0), ("lb1", 1024, 1, 10.0), ("sb2", 32, 2, 1000.0),
    ):  # fmt: skip
        run(
            root,
            name,
            batch=batch,
            model="keskar-c1",
            probes=[sharpness(1.0), norms(distance)],
            init_seed=init,
        )
    markdown = keskar_tables(load_runs([root]), tmp_path / "t", sb_batch=32, lb_batch=1024)
    ratios = [40.0 / 10.0, 60.0 / 10.0]  # init seed 0: mean(30, 50) / 10; init seed 1: 60 / 10
    row = next(
        line
        for line in markdown.split("Distance from the initial point")[1].splitlines()
        if "this run" in line
    )
    mean, std = statistics.fmean(ratios), statistics.stdev(ratios)
    assert f"{mean:.2f} ± {std:.2f} (n=2)" in row and "3–10" in markdown
    csv = next(r for r in read_csv(tmp_path / "t" / "keskar_tables.csv") if r["quantity"] == "distance_ratio")
    assert number(csv["mean"]) == pytest.approx(5.0) and number(csv["std"]) == pytest.approx(math.sqrt(2))


def test_distance_ratio_without_a_shared_start_is_the_ratio_of_the_means(tmp_path):
    root = tmp_path / "runs"
    run(root, "sb", batch=32, model="keskar-c1", probes=[sharpness(1.0), norms(12.0)], init_seed=0)
    run(root, "lb", batch=1024, model="keskar-c1", probes=[sharpness(1.0), norms(4.0)], init_seed=9)
    markdown = keskar_tables(load_runs([root]), tmp_path / "t", sb_batch=32, lb_batch=1024)
    assert "3.00 (n=1), ratio of the means" in markdown
    csv = read_csv(tmp_path / "t" / "keskar_tables.csv")
    assert number(next(r for r in csv if r["quantity"] == "distance_ratio_of_means")["mean"]) == 3.0


# --- Fig. 5: warm-started LB ---------------------------------------------------------------------------


def test_piggyback_csv_holds_each_runs_own_numbers(tmp_path):
    root = tmp_path / "runs"
    sb_metrics = evaluations([2.3, 1.0, 0.5, 0.2, 0.1], [0.1, 0.5, 0.6, 0.7, 0.72], batch=32)
    make_run(root, "sb", batch=32, metrics=sb_metrics, probes=[sharpness(5.0)])
    expected = {}  # (k, seed): (test accuracy, sharpness in two BN modes)
    for k, seed, acc, value in (
        (0, 0, 0.55, 400.0),
        (0, 1, 0.57, 600.0),
        (2, 0, 0.66, 90.0),
        (4, 0, 0.71, 20.0),
    ):
        source = str(root / "sb" / "checkpoints" / f"epoch-{k:04d}.pt")
        path = run(root, f"pig-k{k}-s{seed}", batch=1024, model="mlp", seed=seed, test_acc=acc,
                   probes=[probed(sharpness(value), "eval"), probed(sharpness(value / 2), "recompute")],
                   settings={"init_from": source}, init_from=source)  # fmt: skip
        expected[(k, seed)] = (100 * acc, value, value / 2, path.name)
    paths = keskar_piggyback(load_runs([root]), tmp_path / "fig", scale="cpu")
    assert_png(paths[0])
    rows = read_csv(paths[1])
    assert len(rows) == 2 * len(expected)  # one per run and BN mode; the SB source is no row of its own
    for row in rows:
        acc, running, recomputed, name = expected[(int(row["k"]), int(row["seed"]))]
        assert row["run"] == name and row["source_run"] == "sb" and row["source_batch_size"] == "32"
        assert number(row["test_acc"]) == pytest.approx(acc)
        assert number(row["sharpness"]) == (running if row["bn_mode"] == "eval" else recomputed)
        # the SB run's own test accuracy at epoch k: 10, 60 and 72 % at epochs 0, 2 and 4
        assert number(row["source_test_acc_at_k"]) == pytest.approx(
            100 * sb_metrics[int(row["k"])]["test_acc"]
        )
    with pytest.raises(SharpError, match=r"--init-from SB_RUN/checkpoints/epoch-K\.pt"):
        keskar_piggyback(load_runs([root / "sb"]), tmp_path / "none")


# --- titles: the dataset by name, the interpolation's figure ---------------------------------------------


def test_titles_name_the_dataset_not_the_folder_it_was_read_from(tmp_path):
    root = tmp_path / "runs"
    common = dict(
        model="keskar-c1",
        settings={"dataset": "folder:/home/someone/data/cifar10-jpeg", "train_subset": 5000},
    )
    sb = run(root, "sb", batch=25, probes=[sharpness(2.0)], dataset_label="CIFAR-10", n_train=5000, **common)
    lb = run(root, "lb", batch=500, probes=[sharpness(9.0)], dataset_label="CIFAR-10", n_train=5000, **common)
    runs = load_runs([root])
    assert describe(runs, "cpu").startswith("CIFAR-10, 5,000-image subset; keskar-c1 (bn)")
    interp = {
        "probe": "interpolation", "alphas": [0.0, 1.0], "train_loss": [0.1, 0.2], "test_loss": [1.0, 1.1],
        "train_acc": [1.0, 1.0], "test_acc": [0.5, 0.5], "bn": "batch", "path": "sin",
        "provenance": {"run_a": str(sb), "run_b": str(lb), "batch_size_a": 25, "batch_size_b": 500},
    }  # fmt: skip
    text = build_report(runs, tmp_path / "r", scale="cpu", interpolations=[interp]).read_text()
    assert "/home/someone" not in text and "CIFAR-10 (subset 5,000)" in text
    assert "Fig. 7: interpolation #1" in text and "f(sin(απ/2) x_l + cos(απ/2) x_s)" in text
    # a run recorded before dataset_label: the folder's last component, never its path
    legacy = load_runs(
        [make_run(tmp_path / "old", "x", batch=8, settings={"dataset": "folder:/srv/a/pets/"})]
    )
    assert describe(legacy).startswith("pets (full train set, 1,000)")
