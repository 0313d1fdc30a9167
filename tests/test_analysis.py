"""analysis/: figures, tables and the report, from small synthetic run directories (no torch)."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.colors import to_rgb

from analysis.accumulation import accumulation_curves, accumulation_label
from analysis.hessian import hessian_density_plot, hessian_eigenvalues_plot
from analysis.keskar import keskar_batch_size, keskar_sharpness_along_training
from analysis.masters_luschi import ml_accuracy_vs_lr, ml_best_vs_batch, ml_bn_heatmap
from analysis.noise import fit_steps_examples, noise_scale_over_training, steps_vs_examples
from analysis.report import build_report
from analysis.results import describe, load_run, load_runs
from analysis.style import batch_colour
from analysis.tables import KESKAR_2017, keskar_tables
from sharp.errors import SharpError

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_clock = itertools.count(1_000_000)  # probe files get increasing mtimes: load order = write order


# --- synthetic run directories ---------------------------------------------------------------------


def evaluations(losses, accs, *, batch, n_train=1000, steps=None, train_accs=None, **extra):
    """Evaluation records, one per epoch from epoch 0 (step 0), like metrics.jsonl."""
    per_epoch = -(-n_train // batch)
    steps = steps if steps is not None else [i * per_epoch for i in range(len(losses))]
    records = []
    for i, (step, loss, acc) in enumerate(zip(steps, losses, accs, strict=True)):
        record = {
            "step": step,
            "epoch": float(i),
            "examples": step * batch,
            "batch_size": batch,
            "eval_train_loss": loss,
            "eval_train_acc": train_accs[i] if train_accs else min(1.0, acc + 0.02),
            "test_loss": loss * 1.1,
            "test_acc": acc,
        }
        for key, values in extra.items():
            record[key] = values[i]
        records.append(record)
    return records


def make_run(
    root,
    name,
    *,
    batch,
    micro=None,
    seed=0,
    metrics=None,
    probes=(),
    state="finished",
    bn_batch="micro",
    norm="bn",
    lr=None,
    base_lr=None,
    lr_scaling="none",
    train_subset=None,
    n_train=1000,
    dataset="digits",
    model="mlp",
    settings=None,
):
    """One run directory: config.json (settings/derived/environment), metrics.jsonl, status.json,
    probes/*.json; `settings` adds or replaces settings."""
    path = Path(root) / name
    (path / "probes").mkdir(parents=True)
    micro = micro or batch
    bn = (micro if bn_batch == "micro" else bn_batch) if norm == "bn" else None
    derived_lr = lr if lr is not None else (base_lr * batch if lr_scaling == "linear" else base_lr) or 0.1
    settings = {
        "dataset": dataset,
        "train_subset": train_subset,
        "augment": None,
        "model": model,
        "width": 1.0,
        "norm": norm,
        "bn_batch": None if bn_batch == "micro" else bn_batch,
        "batch_size": batch,
        "micro_batch": micro,
        "batch_schedule": None,
        "optimizer": "sgd",
        "momentum": 0.0,
        "weight_decay": 0.0,
        "lr": lr,
        "base_lr": base_lr,
        "lr_scaling": lr_scaling,
        "reference_batch": 1,
        "warmup": 0.0,
        "warmup_style": "ml",
        "schedule": "constant",
        "milestones": "0.5,0.75",
        "gamma": 0.1,
        "epochs": 3,
        "steps": None,
        "seed": seed,
        **(settings or {}),
    }
    derived = {
        "lr": derived_lr,
        "effective_batch": batch,
        "micro_batch": micro,
        "bn_batch": bn,
        "n_train": n_train,
        "augment": False,
        "total_steps": 100,
    }
    config = {"settings": settings, "derived": derived, "environment": {"device": "cpu"}}
    (path / "config.json").write_text(json.dumps(config))
    metrics = metrics if metrics is not None else evaluations([2.3, 0.5, 0.2], [0.1, 0.8, 0.9], batch=batch)
    if state == "diverged":
        metrics = [*metrics, {"step": 999, "diverged": True, "reason": "loss is nan"}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    status = {"state": state, "reason": "loss is nan" if state == "diverged" else "trained to the end"}
    (path / "status.json").write_text(json.dumps(status))
    for i, record in enumerate(probes):
        file = path / "probes" / f"{i:03d}.{record['probe']}.json"
        file.write_text(json.dumps(record))
        tick = next(_clock)
        os.utime(file, (tick, tick))
    return path


def provenance(checkpoint="final", probe_set=256, bn_mode="eval"):
    return {"checkpoint": checkpoint, "probe_set": probe_set, "bn_mode": bn_mode}


def sharpness(value, eps=1e-3, p=None, checkpoint="final"):
    return {
        "probe": "epsilon_sharpness",
        "sharpness": value,
        "eps": eps,
        "subspace_dim": p,
        "settings": {"eps": eps, "subspace_dim": p, "maxiter": 10},
        "provenance": provenance(checkpoint),
    }


def eigenvalues(values, checkpoint="final"):
    return {
        "probe": "hessian_eigenvalues",
        "eigenvalues": values,
        "settings": {"k": len(values), "method": "lanczos"},
        "provenance": provenance(checkpoint),
    }


def density(grid, values):
    return {
        "probe": "hessian_density",
        "grid": grid,
        "density": values,
        "settings": {},
        "provenance": provenance(),
    }


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def assert_png(path):
    path = Path(path)
    assert path.suffix == ".png" and path.read_bytes()[:8] == PNG_MAGIC


def number(cell):
    return None if cell == "" else float(cell)


# --- import hygiene, colours, captions ---------------------------------------------------------------


def test_analysis_never_imports_torch():
    modules = ", ".join(
        f"analysis.{m}"
        for m in (
            "results",
            "style",
            "interpolation",
            "keskar",
            "masters_luschi",
            "accumulation",
            "noise",
            "hessian",
            "tables",
            "report",
            "headline",
            "rank",
            "correlate",
            "correlation_figures",
            "jiang2020",
            "ablation",
        )
    )
    code = f"import sys, analysis, {modules}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _luminance(colour):
    r, g, b = to_rgb(colour)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_colour_rule_blue_below_500_red_from_500_darker_towards_the_extremes():
    for batch in (2, 32, 256, 499):
        r, _, b = to_rgb(batch_colour(batch))
        assert b > r, batch
    for batch in (500, 1024, 8192, 10**6):
        r, _, b = to_rgb(batch_colour(batch))
        assert r > b, batch
    assert _luminance(batch_colour(8)) < _luminance(batch_colour(64)) < _luminance(batch_colour(256))
    assert _luminance(batch_colour(8192)) < _luminance(batch_colour(2048)) < _luminance(batch_colour(512))
    assert batch_colour(64) == batch_colour(64.0)  # a function of B alone


def test_describe_names_dataset_subset_model_batches_and_scale(tmp_path):
    a = load_run(
        make_run(tmp_path, "a", batch=32, train_subset=5000, n_train=5000, dataset="cifar10", model="resnet8")
    )
    b = load_run(
        make_run(
            tmp_path, "b", batch=5000, train_subset=5000, n_train=5000, dataset="cifar10", model="resnet8"
        )
    )
    text = describe([b, a], "cpu")
    for piece in ("cifar10", "5,000", "subset", "resnet8", "32, 5000", "cpu"):
        assert piece in text
    full = describe([load_run(make_run(tmp_path, "c", batch=64, n_train=1437))], "full")
    assert "full train set, 1,437" in full and "full" in full


# --- Keskar -------------------------------------------------------------------------------------------


@pytest.fixture
def keskar_runs(tmp_path):
    """B=32 and B=1024, two seeds each; a diverged B=32 run; an older and a 5e-4 probe to ignore."""
    root = tmp_path / "runs"
    spec = {
        ("sb0", 32, 0): (0.90, 0.99, 2.0),
        ("sb1", 32, 1): (0.92, 0.97, 4.0),
        ("lb0", 1024, 0): (0.85, 0.95, 100.0),
        ("lb1", 1024, 1): (0.80, 0.93, 300.0),
    }
    for (name, batch, seed), (test_acc, train_acc, value) in spec.items():
        metrics = evaluations(
            [2.3, 0.6, 0.3], [0.1, 0.7, test_acc], batch=batch, train_accs=[0.1, 0.7, train_acc]
        )
        probes = [
            sharpness(value * 7),
            sharpness(value),
            sharpness(value / 3, eps=5e-4),
            sharpness(value / 50, p=100),
        ]
        make_run(root, name, batch=batch, seed=seed, metrics=metrics, probes=probes)
    make_run(root, "sb-diverged", batch=32, seed=2, state="diverged", probes=[sharpness(1e6)])
    return load_runs([root])


def test_keskar_batch_size_csv_holds_mean_and_std_over_seeds(keskar_runs, tmp_path):
    paths = keskar_batch_size(keskar_runs, tmp_path / "fig", eps=1e-3, scale="cpu")
    assert_png(paths[0])
    rows = {int(r["batch_size"]): r for r in read_csv(paths[1])}
    assert set(rows) == {32, 1024}
    assert rows[32]["n_runs"] == "2"  # the diverged run is left out
    assert number(rows[32]["test_acc_mean"]) == pytest.approx(91.0)
    assert number(rows[32]["test_acc_std"]) == pytest.approx(math.sqrt(2))  # (90, 92): sample std
    assert number(rows[32]["sharpness_mean"]) == pytest.approx(3.0)  # the newest probe, not 7x
    assert number(rows[32]["sharpness_std"]) == pytest.approx(math.sqrt(2))
    assert number(rows[1024]["test_acc_mean"]) == pytest.approx(82.5)
    assert number(rows[1024]["test_acc_std"]) == pytest.approx(statistics.stdev([85.0, 80.0]))
    assert number(rows[1024]["sharpness_mean"]) == pytest.approx(200.0)
    assert number(rows[1024]["sharpness_std"]) == pytest.approx(statistics.stdev([100.0, 300.0]))


def test_keskar_batch_size_without_probes_raises(tmp_path):
    runs = [load_run(make_run(tmp_path, "a", batch=32)), load_run(make_run(tmp_path, "b", batch=1024))]
    with pytest.raises(SharpError, match="sharp probe"):
        keskar_batch_size(runs, tmp_path / "fig")


def test_keskar_sharpness_along_training_pairs_checkpoints_with_training_loss(tmp_path):
    losses = [2.3, 0.9, 0.4]
    metrics = evaluations(losses, [0.1, 0.7, 0.9], batch=32)
    probes = [sharpness(v, checkpoint=f"epoch-{i:04d}") for i, v in enumerate([0.5, 8.0, 5.0])]
    probes += [sharpness(5.0), sharpness(9.9, eps=5e-4, checkpoint="epoch-0001")]
    sb = make_run(tmp_path, "sb", batch=32, metrics=metrics, probes=probes)
    # LB: checkpoints at epochs 0 and 1 only; its final evaluation (epoch 2) is a separate point
    lb_metrics = evaluations([2.3, 1.5, 1.0], [0.1, 0.5, 0.6], batch=1024)
    lb_probes = [
        sharpness(0.6, checkpoint="epoch-0000"),
        sharpness(20.0, checkpoint="epoch-0001"),
        sharpness(40.0),
    ]
    lb = make_run(tmp_path, "lb", batch=1024, metrics=lb_metrics, probes=lb_probes)
    paths = keskar_sharpness_along_training(load_runs([sb, lb]), tmp_path / "fig", scale="cpu")
    assert_png(paths[0])
    rows = [
        (r["run"], r["checkpoint"], number(r["epoch"]), number(r["train_loss"]), number(r["sharpness"]))
        for r in read_csv(paths[1])
    ]
    assert rows == [
        ("sb", "epoch-0000", 0.0, 2.3, 0.5),
        ("sb", "epoch-0001", 1.0, 0.9, 8.0),
        ("sb", "epoch-0002", 2.0, 0.4, 5.0),  # "final" is the same step: not repeated
        ("lb", "epoch-0000", 0.0, 2.3, 0.6),
        ("lb", "epoch-0001", 1.0, 1.5, 20.0),
        ("lb", "final", 2.0, 1.0, 40.0),
    ]


def test_keskar_tables_show_paper_numbers_and_this_runs_mean_std(keskar_runs, tmp_path):
    markdown = keskar_tables(keskar_runs, tmp_path / "tables", sb_batch=32, lb_batch=1024)
    assert "Keskar et al. 2017 (paper)" in markdown and "this run" in markdown
    for paper_number in (
        "98.03",
        "97.81",
        "205.14",
        "707.23",
        "925.32",
        "421.84",
        "137.25",
        "236.03",
        "19.85",
    ):
        assert paper_number in markdown
    for key in ("F1", "F2", "C1", "C2", "C3", "C4"):
        assert KESKAR_2017["networks"][key] in markdown
    assert "91.00 ± 1.41 (n=2)" in markdown  # test SB (Table 2)
    assert "82.50 ± 3.54 (n=2)" in markdown  # test LB
    assert "98.00 ± 1.41 (n=2)" in markdown  # train SB from eval_train_acc
    assert "3.00 ± 1.41 (n=2)" in markdown  # Table 3, eps = 1e-3, SB
    assert "200.00 ± 141.42 (n=2)" in markdown  # Table 3, eps = 1e-3, LB
    assert "1.00 ± 0.47 (n=2)" in markdown  # Table 3, eps = 5e-4, SB (2/3 and 4/3)
    assert "0.06 ± 0.03 (n=2)" in markdown  # Table 4, p = 100, eps = 1e-3, SB (0.04, 0.08)
    table4 = markdown.split("Table 4")[1]
    our_row = next(line for line in table4.splitlines() if "**this run**" in line)
    assert our_row.count("—") == 2  # no subspace probe at eps = 5e-4
    rows = read_csv(tmp_path / "tables" / "keskar_tables.csv")
    sb_test = [
        r for r in rows if r["source"] == "this run" and r["quantity"] == "test_acc" and r["regime"] == "SB"
    ]
    assert number(sb_test[0]["mean"]) == pytest.approx(91.0) and number(sb_test[0]["std"]) == pytest.approx(
        2**0.5
    )


# --- Masters & Luschi --------------------------------------------------------------------------------


@pytest.fixture
def ml_runs(tmp_path):
    root = tmp_path / "ml"
    seven = [0.50, 0.60, 0.70, 0.91, 0.80, 0.95, 0.85]  # last 5: .70 .91 .80 .95 .85 -> median .85
    linear = [  # name, batch, base learning rate, test accuracies (losses 2.0), or None: diverged
        ("b16-a", 16, 2**-6, seven),
        ("b16-b", 16, 2**-4, [0.2, 0.9, 0.7]),  # 3 records: median .7
        ("b16-c", 16, 2**-2, None),
        ("b256-a", 256, 2**-6, [0.3, 0.6, 0.8]),  # median .6
        ("b256-b", 256, 2**-4, [0.3, 0.7, 0.75]),  # median .7
    ]
    for name, batch, base_lr, accs in linear:
        metrics = evaluations([2.0] * len(accs), accs, batch=batch) if accs else None
        state = "finished" if accs else "diverged"
        make_run(root, name, batch=batch, base_lr=base_lr, lr_scaling="linear", metrics=metrics, state=state)
    make_run(
        root, "b256-lr", batch=256, lr=0.4, metrics=evaluations([2.0], [0.5], batch=256)
    )  # eta~ = 0.4/256
    return load_runs([root])


def test_ml_accuracy_vs_lr_median_of_last_five_and_diverged_rows(ml_runs, tmp_path):
    paths = ml_accuracy_vs_lr(ml_runs, tmp_path / "fig", scale="cpu")
    assert_png(paths[0])
    rows = {(int(r["batch_size"]), number(r["base_lr"])): r for r in read_csv(paths[1])}
    assert number(rows[16, 2**-6]["test_acc"]) == pytest.approx(85.0)
    assert number(rows[16, 2**-4]["test_acc"]) == pytest.approx(70.0)
    diverged = rows[16, 2**-2]
    assert diverged["test_acc"] == "" and diverged["diverged"] == "1" and diverged["n_diverged"] == "1"
    assert rows[16, 2**-6]["diverged"] == "0"
    assert number(rows[256, 2**-6]["test_acc"]) == pytest.approx(60.0)
    assert number(rows[256, 0.4 / 256]["test_acc"]) == pytest.approx(50.0)  # eta~ = lr / B without base_lr


def test_ml_best_vs_batch_takes_the_best_over_lr(ml_runs, tmp_path):
    paths = ml_best_vs_batch(ml_runs, tmp_path / "fig")
    assert_png(paths[0])
    rows = {int(r["batch_size"]): r for r in read_csv(paths[1])}
    assert number(rows[16]["best_test_acc"]) == pytest.approx(85.0)
    assert number(rows[16]["best_base_lr"]) == 2**-6
    assert rows[16]["n_base_lr"] == "3" and rows[16]["n_diverged"] == "1"
    assert number(rows[256]["best_test_acc"]) == pytest.approx(70.0)
    assert number(rows[256]["best_base_lr"]) == 2**-4


def test_ml_bn_heatmap_best_over_lr_with_diverged_and_missing_cells(tmp_path):
    root = tmp_path / "bn"
    for batch, bn, base, acc in [
        (32, 4, 2**-6, 0.90),
        (32, 4, 2**-4, 0.93),
        (32, 16, 2**-6, 0.88),
        (128, 16, 2**-6, 0.80),
    ]:
        make_run(
            root,
            f"b{batch}-g{bn}-{base}",
            batch=batch,
            micro=16,
            bn_batch=bn,
            base_lr=base,
            lr_scaling="linear",
            metrics=evaluations([1.0], [acc], batch=batch),
        )
    make_run(
        root, "b128-g4", batch=128, micro=16, bn_batch=4, base_lr=2**-6, lr_scaling="linear", state="diverged"
    )
    make_run(
        root,
        "b512-g16",
        batch=512,
        micro=16,
        bn_batch=16,
        base_lr=2**-6,
        lr_scaling="linear",
        metrics=evaluations([1.0], [0.7], batch=512),
    )
    paths = ml_bn_heatmap(load_runs([root]), tmp_path / "fig")
    assert_png(paths[0])
    cells = {(int(r["batch_size"]), int(r["bn_batch"])): r for r in read_csv(paths[1])}
    assert (
        number(cells[32, 4]["test_acc"]) == pytest.approx(93.0)
        and number(cells[32, 4]["best_base_lr"]) == 2**-4
    )
    assert number(cells[32, 16]["test_acc"]) == pytest.approx(88.0)
    assert number(cells[128, 16]["test_acc"]) == pytest.approx(80.0)
    assert cells[128, 4]["cell"] == "diverged" and cells[128, 4]["test_acc"] == ""
    assert cells[512, 4]["cell"] == "missing" and cells[512, 16]["cell"] == "ok"


# --- accumulation and noise ----------------------------------------------------------------------------


def test_accumulation_curves_csv_and_labels(tmp_path):
    curves = {
        32: evaluations([2.3, 1.0, 0.5], [0.1, 0.6, 0.8], batch=32),
        64: evaluations([2.3, 1.2], [0.1, 0.5], batch=64),
    }
    specs = [("true", 32, None), ("acc", 32, 4), ("b64", 64, 64)]
    runs = load_runs(
        [
            make_run(tmp_path, name, batch=b, micro=micro, norm="none", metrics=curves[b])
            for name, b, micro in specs
        ]
    )
    assert accumulation_label(runs[0]) == "B=32 (true batch)"
    assert accumulation_label(runs[1]) == "B=32 (8 micro-batches of 4)"
    paths = accumulation_curves(runs, tmp_path / "fig", scale="cpu")
    assert_png(paths[0])
    rows = read_csv(paths[1])
    got = [
        (
            r["run"],
            int(r["micro_batch"]),
            int(r["examples"]),
            number(r["eval_train_loss"]),
            number(r["test_acc"]),
        )
        for r in rows
    ]
    expected = [
        (run.name, run.micro_batch, m["examples"], m["eval_train_loss"], 100 * m["test_acc"])
        for run in sorted(runs, key=lambda r: (r.batch_size, -r.micro_batch))
        for m in run.evaluations
    ]
    assert [g[:3] for g in got] == [e[:3] for e in expected]
    assert [x for g in got for x in g[3:]] == pytest.approx([x for e in expected for x in e[3:]])


def test_noise_scale_over_training_skips_missing_values(tmp_path):
    values = [None, 50.0, 120.0, 400.0]
    metrics = evaluations([2.3, 1.0, 0.6, 0.4], [0.1, 0.5, 0.7, 0.8], batch=64, noise_b_simple=values)
    run = make_run(tmp_path, "a", batch=64, micro=16, metrics=metrics)
    paths = noise_scale_over_training(load_runs([run]), tmp_path / "fig", scale="cpu")
    assert_png(paths[0])
    rows = read_csv(paths[1])
    assert [number(r["noise_b_simple"]) for r in rows] == values[1:]
    assert [int(r["examples"]) for r in rows] == [m["examples"] for m in metrics[1:]]
    with pytest.raises(SharpError, match="noise-scale"):
        noise_scale_over_training(load_runs([make_run(tmp_path, "b", batch=64)]), tmp_path / "fig2")


def test_steps_vs_examples_recovers_s_min_and_e_min(tmp_path):
    """Runs built from S(B) = S_min + E_min / B for two goals: the fit gives back S_min, E_min, B_crit."""
    truth = {1.0: (400.0, 12_800.0), 0.5: (1000.0, 64_000.0)}  # B_crit = 32 and 64
    batches = (16, 32, 64, 128, 256)
    root = tmp_path / "steps"
    for batch in batches:
        s1, s2 = (int(s + e / batch) for s, e in (truth[1.0], truth[0.5]))
        steps = [0, s1 // 2, s1, s2, s2 + 10]
        losses = [2.3, 1.2, 0.9, 0.45, 0.3]  # first <= 1.0 at s1, first <= 0.5 at s2
        make_run(
            root, f"b{batch}", batch=batch, metrics=evaluations(losses, [0.1] * 5, batch=batch, steps=steps)
        )
    slow = evaluations([2.3, 1.5, 0.8, 0.6], [0.1] * 4, batch=32, steps=[0, 100, 5000, 9000])
    make_run(root, "never-reaches-0.5", batch=32, seed=1, metrics=slow)
    runs = load_runs([root])
    # best_per_batch keeps, per batch size, the run that reached the goal first: the slow B=32 run
    # (goal 1.0 at step 5000) is dropped, so the points lie exactly on the model
    paths, fits = steps_vs_examples(runs, tmp_path / "fig", [1.0, 0.5], scale="cpu", best_per_batch=True)
    assert_png(paths[0])
    for goal, (s_min, e_min) in truth.items():
        fit = fits[goal]
        assert fit.s_min == pytest.approx(s_min, rel=1e-9)
        assert fit.e_min == pytest.approx(e_min, rel=1e-9)
        assert fit.b_crit == pytest.approx(e_min / s_min, rel=1e-9)
    fit_rows = {number(r["goal"]): r for r in read_csv(paths[2])}
    assert number(fit_rows[0.5]["B_crit"]) == pytest.approx(64.0, rel=1e-9)
    assert number(fit_rows[1.0]["S_min"]) == pytest.approx(400.0, rel=1e-9)
    # every run is a point by default: the slow run enters goal 1.0 and skips goal 0.5
    paths, fits = steps_vs_examples(runs, tmp_path / "fig-all", [1.0, 0.5])
    rows = read_csv(paths[1])
    assert "never-reaches-0.5" not in {r["run"] for r in rows if number(r["goal"]) == 0.5}
    slow_row = next(r for r in rows if number(r["goal"]) == 1.0 and r["run"] == "never-reaches-0.5")
    assert int(slow_row["steps"]) == 5000
    assert fits[1.0].n_runs == len(batches) + 1 and fits[0.5].n_runs == len(batches)
    for r in rows:
        assert int(r["examples"]) == int(r["steps"]) * int(r["batch_size"])


def test_fit_steps_examples_needs_two_batch_sizes():
    with pytest.raises(SharpError, match="two or more batch sizes"):
        fit_steps_examples(0.5, [10, 12], [32, 32])


# --- Hessian -------------------------------------------------------------------------------------------


def test_hessian_eigenvalues_plot_orders_runs_by_batch_size(tmp_path):
    lb = make_run(
        tmp_path, "lb", batch=2048, probes=[eigenvalues([1.0, 0.5]), eigenvalues([90.0, 40.0, 10.0])]
    )
    sb = make_run(
        tmp_path,
        "sb",
        batch=64,
        probes=[eigenvalues([5.0, 2.0, 1.0], checkpoint="epoch-0001"), eigenvalues([9.0, 4.0, 3.0])],
    )
    none = make_run(tmp_path, "none", batch=128)
    paths = hessian_eigenvalues_plot(load_runs([lb, sb, none]), tmp_path / "fig", scale="cpu")
    assert_png(paths[0])
    rows = [(r["run"], int(r["rank"]), number(r["eigenvalue"]), r["bn_mode"]) for r in read_csv(paths[1])]
    assert rows == [
        ("sb", 1, 9.0, "eval"),
        ("sb", 2, 4.0, "eval"),
        ("sb", 3, 3.0, "eval"),
        ("lb", 1, 90.0, "eval"),
        ("lb", 2, 40.0, "eval"),
        ("lb", 3, 10.0, "eval"),
    ]


def test_hessian_density_plot_clips_at_the_floor(tmp_path):
    grid = [-1.0, 0.0, 1.0, 2.0]
    sb = make_run(tmp_path, "sb", batch=64, probes=[density(grid, [1e-12, 0.5, 0.01, 0.0])])
    lb = make_run(tmp_path, "lb", batch=4096, probes=[density(grid, [0.001, 0.3, 1e-10, 0.2])])
    paths = hessian_density_plot(load_runs([sb, lb]), tmp_path / "fig", scale="cpu")
    assert_png(paths[0])
    rows = read_csv(paths[1])
    assert [number(r["density_plotted"]) for r in rows] == [1e-9, 0.5, 0.01, 1e-9, 0.001, 0.3, 1e-9, 0.2]
    assert [number(r["density"]) for r in rows] == [1e-12, 0.5, 0.01, 0.0, 0.001, 0.3, 1e-10, 0.2]
    assert [r["run"] for r in rows] == ["sb"] * 4 + ["lb"] * 4


# --- the report ----------------------------------------------------------------------------------------


def _interp_record():
    alphas = [-1.0, 0.0, 1.0, 2.0]
    return {
        "probe": "interpolation",
        "alphas": alphas,
        "train_loss": [0.5, 0.1, 0.3, 2.0],
        "test_loss": [0.6, 0.2, 0.4, 2.2],
        "train_acc": [0.8, 0.99, 0.95, 0.3],
        "test_acc": [0.7, 0.9, 0.85, 0.25],
        "bn": "recompute",
        "provenance": {"run_a": "x/sb0", "run_b": "x/lb0", "batch_size_a": 32, "batch_size_b": 1024},
    }


def test_report_embeds_supported_figures_and_lists_settings(keskar_runs, tmp_path):
    out = tmp_path / "report"
    report = build_report(keskar_runs, out, scale="cpu", interpolations=[_interp_record()], notes=["a note"])
    text = report.read_text()
    embedded = [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert "figures/keskar_fig4_batch_size.png" in embedded
    assert "figures/interpolation-1.png" in embedded
    assert all(line.split("](")[0] != "![" for line in text.splitlines() if line.startswith("!["))  # alt text
    for path in embedded:
        assert_png(out / path)
        assert (out / path).with_suffix(".csv").exists()
    assert "ml_accuracy_vs_lr" not in text and "hessian_density.png" not in text  # no data: not drawn
    assert "Not drawn" in text
    assert "Keskar et al. 2017 (paper)" in text and "91.00 ± 1.41 (n=2)" in text
    assert "a note" in text and "scale: cpu" in text
    settings = text.split("## Runs")[1]
    for piece in ("sb0", "lb1", "digits", "mlp", "sgd", "constant", "diverged (loss is nan)", "256", "eval"):
        assert piece in settings


def test_report_with_little_data_skips_figures_without_error(tmp_path):
    run = make_run(tmp_path / "runs", "only", batch=64, lr=0.05)
    out = tmp_path / "report"
    report = build_report(load_runs([tmp_path / "runs"]), out, scale="full")
    text = report.read_text()
    assert "![" not in text and "No figure" in text
    assert "lr = 0.05" in text and "only" in text and "No probes were run" in text
    assert run.exists()


def test_report_draws_ml_hessian_noise_and_accumulation_figures(tmp_path):
    root = tmp_path / "runs"
    noise = {"noise_b_simple": [None, 40.0, 80.0]}
    for batch, micro, base in [
        (32, 32, 2**-6),
        (32, 8, 2**-6),
        (256, 256, 2**-6),
        (256, 256, 2**-4),
        (64, 64, 2**-6),
    ]:
        make_run(
            root,
            f"b{batch}-m{micro}-{base}",
            batch=batch,
            micro=micro,
            base_lr=base,
            lr_scaling="linear",
            probes=[eigenvalues([3.0, 1.0]), density([0.0, 1.0], [0.9, 0.1])],
            metrics=evaluations([2.3, 0.8, 0.4], [0.1, 0.7, 0.8], batch=batch, **noise),
        )
    text = build_report(load_runs([root]), tmp_path / "report", scale="cpu").read_text()
    for name in (
        "ml_accuracy_vs_lr",
        "ml_best_vs_batch",
        "hessian_eigenvalues",
        "hessian_density",
        "noise_scale_training",
        "accumulation_curves",
        "steps_vs_examples",
        "ml_bn_heatmap",
    ):
        assert f"figures/{name}.png" in text, name
    assert "keskar_fig4" not in text.split("Not drawn")[0]

    chosen = build_report(
        load_runs([root]), tmp_path / "only", figures=["hessian_density", "keskar_fig4"]
    ).read_text()
    drawn = {p.name for p in (tmp_path / "only" / "figures").glob("*.png")}
    assert drawn == {"hessian_density.png"}  # keskar_fig4 asked for, but the runs hold no sharpness
    assert "Keskar Fig. 4" in chosen and "Hessian eigenvalues" not in chosen
    with pytest.raises(SharpError, match="figure 'fig9' is unknown"):
        build_report(load_runs([root]), tmp_path / "bad", figures=["fig9"])


def test_report_uses_the_given_sb_and_lb_batches(keskar_runs, tmp_path):
    default = build_report(keskar_runs, tmp_path / "d").read_text()
    assert "Small batch (SB) = B 32, large batch (LB) = B 1024." in default
    chosen = build_report(keskar_runs, tmp_path / "r", sb_batch=1024, lb_batch=32).read_text()
    assert "Small batch (SB) = B 1024, large batch (LB) = B 32." in chosen


# --- headline numbers ----------------------------------------------------------------------------------


def test_headline_numbers_of_each_probe_kind_for_the_terminal_the_sweep_table_and_the_report():
    from analysis.headline import headlines, scalars
    from analysis.report import _probe_value
    from sharp.probe_runs import summarize

    noise = {"probe": "noise_scale", "b_simple": None, "b_simple_stderr": None}  # |G|^2 estimate <= 0
    assert summarize(noise) == "b_simple —" and scalars(noise) == {}
    trace = {"probe": "hessian_trace", "trace": 12.5, "stderr": 0.25}
    assert summarize(trace) == "trace 12.5 ± 0.25" and scalars(trace) == {"trace": 12.5, "stderr": 0.25}
    assert _probe_value(trace) == "12.50 ± 0.25"
    eig = eigenvalues([3.0, 1.5])
    assert summarize(eig) == "eigenvalues 3, 1.5" and scalars(eig) == {"lambda_max": 3.0}
    norms = {"probe": "weight_norms", "l2_norm": 2.0, "distance_from_init": None, "path_norm": "nan"}
    assert [h.field for h in headlines(norms)] == [
        "l2_norm",
        "distance_from_init",
        "path_norm",
        "frobenius_sq_sum",
    ]
    assert scalars(norms) == {"l2_norm": 2.0}  # None and NaN (kept in JSON as text) are not numbers
    assert _probe_value(norms) == "l2_norm 2.00; distance_from_init —; path_norm —; frobenius_sq_sum —"
    scan = {"probe": "random_direction_scan", "loss": [1.0, 2.0]}
    assert summarize(scan) == "2 points" and _probe_value(scan) == "(figure)" and headlines(scan) == []


# --- sharpness along training (--track-sharpness rows) ---------------------------------------------


def tracked_rows(steps, lambdas, batch_values, threshold):
    return [
        {
            "step": s,
            "lambda_max": lam,
            "batch_sharpness": b,
            "grad_top_fraction": 0.5,
            "stability_threshold": threshold,
            "hvps": 4,
            "start": "warm" if i else "cold",
            "seconds": 0.1,
        }
        for i, (s, lam, b) in enumerate(zip(steps, lambdas, batch_values, strict=True))
    ]


def _edge_runs(tmp_path):
    steps = [0, 50, 100, 150, 200, 250, 300, 350]
    gd = tracked_rows(
        steps, [75, 70, 120, 199, 201, 206, 199, 210], [10, 20, 30, 150, 190, 200, 195, 205], 200.0
    )
    sgd = tracked_rows(
        steps, [60, 62, 64, 66, 70, 72, 71, 73], [90, 150, 190, 210, 205, 198, 202, 199], 200.0
    )
    evals = evaluations([0.6, 0.3, 0.1], [0.1, 0.5, 0.6], batch=1000, steps=[0, 200, 350])
    runs = [
        make_run(tmp_path, "gd", batch=1000, lr=0.01, norm="none", metrics=[*evals, *gd], model="fc-tanh"),
        make_run(tmp_path, "sgd", batch=32, lr=0.01, norm="none", metrics=[*evals, *sgd], model="fc-tanh"),
    ]
    return load_runs(runs)


def test_edge_summary_finds_the_first_crossing_and_the_median_ratio_after_it(tmp_path):
    from analysis.edge_of_stability import edge_summary

    gd, sgd = _edge_runs(tmp_path)
    s = edge_summary(gd)
    assert s.full_batch and s.points == 8 and s.lambda_max_start == 75
    assert s.first_crossing_step == 200  # 199 at step 150 is still below 200
    # steps 200-350: ratios 1.005, 1.03, 0.995, 1.05 -> median (1.005 + 1.03) / 2
    assert s.median_lambda_ratio_after == pytest.approx(1.0175, rel=1e-12)
    assert s.batch_first_crossing_step == 250
    assert s.median_batch_ratio_last_half == pytest.approx(
        statistics.median([0.95, 1.0, 0.975, 1.025]), rel=1e-12
    )
    t = edge_summary(sgd)
    assert not t.full_batch and t.first_crossing_step is None and t.median_lambda_ratio_after is None
    assert t.median_lambda_ratio_last_half == pytest.approx(
        statistics.median([70, 72, 71, 73]) / 200, rel=1e-12
    )
    assert t.batch_first_crossing_step == 150
    # the tracking rows are not evaluations: every evaluation reader sees the three evaluations
    assert [m["step"] for m in gd.evaluations] == [0, 200, 350] and gd.final["test_acc"] == 0.6


def test_sharpness_figure_writes_the_plotted_numbers_and_the_report_states_paper_and_ours(tmp_path):
    from analysis.edge_of_stability import sharpness_along_training

    runs = _edge_runs(tmp_path / "runs")
    png, data, summary = sharpness_along_training(runs, tmp_path / "fig", scale="cpu")
    assert png.read_bytes()[:8] == PNG_MAGIC
    with open(data) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * (8 + 3)  # every tracked row and every evaluation of both runs
    gd_lambdas = [float(r["lambda_max"]) for r in rows if r["run"] == "gd" and r["lambda_max"]]
    assert gd_lambdas == [75, 70, 120, 199, 201, 206, 199, 210]
    with open(summary) as handle:
        first = {r["run"]: r["first_crossing_step"] for r in csv.DictReader(handle)}
    assert first == {"gd": "200", "sgd": ""}
    report = build_report(runs, tmp_path / "report", scale="cpu").read_text()
    assert "**Paper** (Cohen et al. 2021)" in report and "crossing 200 at about step 4,500" in report
    assert (
        "GD (full batch), η=0.01 (threshold 200): λ_max 75 at the start, first ≥ threshold at step 200"
        in report
    )
    assert "median λ_max/threshold after 1.02" in report and "SGD B=32, η=0.01" in report


def test_run_labels_tell_runs_of_one_batch_apart_by_network_and_stopping_rule(tmp_path):
    from analysis.results import run_labels

    make_run(tmp_path / "runs", "c1", batch=25, model="keskar-c1", settings={"until_plateau": 3})
    make_run(tmp_path / "runs", "rn-plateau", batch=25, model="resnet8", settings={"until_plateau": 3})
    make_run(tmp_path / "runs", "rn-loss", batch=25, model="resnet8", settings={"until_train_loss": 0.1})
    make_run(tmp_path / "runs", "lb", batch=500, model="resnet8", settings={"until_plateau": 3})
    runs = load_runs([tmp_path / "runs"])
    by_path = run_labels(runs)
    labels = {r.name: by_path[r.path] for r in runs}
    assert labels == {
        "c1": "B=25, keskar-c1 (bn), until plateau (3 evaluations, tol 0.01)",
        "rn-plateau": "B=25, resnet8 (bn), until plateau (3 evaluations, tol 0.01)",
        "rn-loss": "B=25, resnet8 (bn), until train loss ≤ 0.1",
        "lb": "B=500",  # alone at its batch: nothing to tell apart
    }
