"""Keskar et al. as they ran it: input scaling, the dataset's name in titles, and reproduction specs
whose runs start from another run's checkpoint (the piggybacked LB of Fig. 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sharp.config import TrainConfig
from sharp.data import CIFAR10_CLASSES, CIFAR100_CLASSES, Dataset, dataset_label, evaluation_subset
from sharp.errors import SharpError
from sharp.probe_runs import RunData
from sharp.repro import ReproSpec, run_repro
from sharp.sweep import Launcher
from sharp.train import build, train

F64 = torch.float64


# --- input scaling ------------------------------------------------------------------------------


def _probe_images(run: Path, dataset: Dataset, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe set `sharp probe` builds for a run, and the same examples' raw uint8 pixels."""
    data = RunData.open(run, dataset=dataset)
    loader = data.loader("train", n, seed, torch.device("cpu"), F64)
    probed = torch.cat([x for x, _ in loader.batches(64)])
    chosen = data.train_index[evaluation_subset(dataset.train_labels[data.train_index], n, seed)]
    return probed, dataset.train_images[chosen]


@pytest.mark.parametrize("scaling", ["unit", "standardize"])
def test_probes_see_the_inputs_training_saw(tmp_path, synthetic, scaling):
    cfg = TrainConfig(
        dataset="synthetic", model="mlp", norm="none", steps=1, train_subset=128, eval_train_size=64,
        precision="fp64", input_scaling=scaling,
    )  # fmt: skip
    train(cfg, tmp_path / "run", dataset=synthetic, progress_bar=False)
    probed, pixels = _probe_images(tmp_path / "run", synthetic, 50, seed=3)
    if scaling == "unit":  # Keskar et al.'s Keras input: pixels / 255, no mean subtraction
        expected = pixels.to(F64) / 255
    else:
        mean = torch.tensor(synthetic.mean, dtype=F64).view(1, -1, 1, 1)
        std = torch.tensor(synthetic.std, dtype=F64).view(1, -1, 1, 1)
        expected = (pixels.to(F64) / 255 - mean) / std
    # float64: the loader's (x - 255 m) * (1 / (255 s)) differs from the formula by a few rounding
    # errors of 1e-16 relative on values of order 1 (up to ~5 after standardizing)
    assert torch.allclose(probed, expected, rtol=0, atol=1e-14)
    t = build(cfg, dataset=synthetic)  # and training's own loaders scale the same way
    x, _ = next(t.eval_train.batches(64))
    assert torch.allclose(x, t.eval_train.normalize(t.eval_train.images[:64]), rtol=0, atol=0)
    raw = t.eval_train.images[:64].to(F64)
    reference = raw / 255 if scaling == "unit" else (raw / 255 - mean) / std
    assert torch.allclose(x, reference, rtol=0, atol=1e-14)
    derived = json.loads((tmp_path / "run" / "config.json").read_text())["derived"]
    if scaling == "unit":
        assert derived["input_mean"] == [0.0] * 3 and derived["input_std"] == [1.0] * 3
    else:
        assert derived["input_mean"] == list(synthetic.mean) and derived["input_std"] == list(synthetic.std)


def test_an_unknown_input_scaling_is_refused_in_one_line():
    from sharp.config import make_config

    with pytest.raises(SharpError, match="--input-scaling 'raw' is unknown: choose one of standardize, unit"):
        make_config({"input_scaling": "raw"}, {})


# --- the dataset as a reader knows it -------------------------------------------------------------------


def _shaped(name: str, classes, n_train: int, n_test: int, shape=(3, 32, 32)) -> Dataset:
    """A Dataset with the given name, classes and split sizes whose images take no memory."""
    pixel = torch.zeros(1, *shape, dtype=torch.uint8)
    return Dataset(
        name=name,
        train_images=pixel.expand(n_train, *shape),
        train_labels=torch.zeros(n_train, dtype=torch.int64),
        test_images=pixel.expand(n_test, *shape),
        test_labels=torch.zeros(n_test, dtype=torch.int64),
        classes=list(classes),
        mean=(0.5,) * shape[0],
        std=(0.25,) * shape[0],
    )


def test_dataset_label_names_cifar_however_it_was_read(digits, synthetic):
    assert len(set(CIFAR10_CLASSES)) == 10 and len(set(CIFAR100_CLASSES)) == 100
    assert dataset_label(_shaped("cifar10", CIFAR10_CLASSES, 50_000, 10_000)) == "CIFAR-10"
    assert dataset_label(_shaped("cifar100", CIFAR100_CLASSES, 50_000, 10_000)) == "CIFAR-100"
    jpeg = "folder:/data/local/copies/cifar10-jpeg/"
    assert dataset_label(_shaped(jpeg, CIFAR10_CLASSES, 50_000, 10_000)) == "CIFAR-10"
    assert dataset_label(_shaped(jpeg, reversed(CIFAR100_CLASSES), 50_000, 10_000)) == "CIFAR-100"
    # the classes but not the split (a copy of a subset), or not the images: the folder's own name
    assert dataset_label(_shaped(jpeg, CIFAR10_CLASSES, 5_000, 1_000)) == "cifar10-jpeg"
    assert dataset_label(_shaped(jpeg, CIFAR10_CLASSES, 50_000, 10_000, (1, 32, 32))) == "cifar10-jpeg"
    assert dataset_label(_shaped("folder:/x/pets", ["cat", "dog"], 50_000, 10_000)) == "pets"
    assert dataset_label(digits) == "digits (scikit-learn, 8x8)" and dataset_label(synthetic) == "synthetic"


def test_the_dataset_label_is_recorded_and_titles_never_name_a_path(tmp_path, digits, monkeypatch):
    from analysis import interpolation
    from sharp.probe_runs import run_interpolation

    common = dict(dataset="digits", model="mlp", norm="none", steps=2, train_subset=300)
    train(TrainConfig(**common, batch_size=16), tmp_path / "a", dataset=digits, progress_bar=False)
    train(TrainConfig(**common, batch_size=128), tmp_path / "b", dataset=digits, progress_bar=False)
    derived = json.loads((tmp_path / "a" / "config.json").read_text())["derived"]
    assert derived["dataset_label"] == "digits (scikit-learn, 8x8)"
    titles = []
    draw = interpolation.plot_interpolation
    monkeypatch.setattr(
        interpolation, "plot_interpolation", lambda *a, **k: titles.append(k["title"]) or draw(*a, **k)
    )
    run_interpolation(tmp_path / "a", tmp_path / "b", alphas="0:1:2", path="sin", train_set=64, test_set=64,
                      out=tmp_path / "interp")  # fmt: skip
    data = "digits (scikit-learn, 8x8), 300-image subset"
    assert titles == [f"Keskar et al. Fig. 7 — {data}, mlp, B=16 vs B=128, BN: recompute, sine path"]


# --- reproduction specs: runs that start from another run's checkpoint ------------------------------------


def _warm_spec(**pig):
    """SB (B=16, 2 epochs, a checkpoint each epoch) and LB runs started from its epoch-1 and epoch-2
    checkpoints; the warm-started group comes first, so the order of the spec is not the order of work."""
    starts = [{"group": "sb", "batch_size": 16, "checkpoint": c} for c in ("epoch-0001.pt", "epoch-0002")]
    return {
        "name": "warm",
        "base": {"dataset": "digits", "model": "mlp", "norm": "none", "epochs": 2, "checkpoint_every": 1},
        "groups": {
            "pig": {"base": {"batch_size": 256, "epochs": 1}, "axes": {"init_from": starts}, **pig},
            "sb": {"axes": {"batch_size": [16]}},
        },
        "report": {"figures": ["keskar_piggyback"]},
    }


class RecordingLauncher:
    """The local launcher, remembering which runs each call was given."""

    ensemble = 1  # every run alone, as given

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def run(self, jobs, echo):
        self.calls.append([Path(job[0]).name for job in jobs])
        return Launcher().run(jobs, echo)


def test_warm_started_runs_start_from_the_named_checkpoint_after_their_source(tmp_path):
    spec = ReproSpec.from_dict(_warm_spec())
    (sb,) = spec.groups["sb"].runs
    pig = spec.groups["pig"].runs
    assert [r.name.rsplit("-", 1)[0] for r in pig] == ["initfromepoch-0001", "initfromepoch-0002"]
    assert [spec.warm_starts[r.name].checkpoint for r in pig] == [
        "checkpoints/epoch-0001.pt",
        "checkpoints/epoch-0002.pt",
    ]
    out, launcher = tmp_path / "warm", RecordingLauncher()
    report = run_repro(spec, out, launcher=launcher, echo=lambda _: None)
    assert launcher.calls == [[sb.name], [r.name for r in pig]]  # the source first, in a stage of its own
    for run, epoch in zip(pig, (1, 2), strict=True):
        source = out / "runs" / sb.name / "checkpoints" / f"epoch-{epoch:04d}.pt"
        config = json.loads((out / "runs" / run.name / "config.json").read_text())
        assert config["settings"]["init_from"] == str(source) and config["derived"]["init_from"] == str(
            source
        )
        start = torch.load(out / "runs" / run.name / "checkpoints" / "epoch-0000.pt", weights_only=True)
        expected = torch.load(source, weights_only=True)["model"]
        # the warm start copies the checkpoint's tensors: equal to the last bit
        assert start["model"].keys() == expected.keys()
        assert all(torch.equal(start["model"][k], expected[k]) for k in expected)
    # the piggyback figure's CSV holds the runs' own numbers
    rows = {int(r["k"]): r for r in _csv(out / "figures" / "keskar_fig5_piggyback.csv")}
    sb_metrics = _evaluations(out / "runs" / sb.name)
    for run, epoch in zip(pig, (1, 2), strict=True):
        final = _evaluations(out / "runs" / run.name)[-1]
        assert float(rows[epoch]["test_acc"]) == pytest.approx(100 * final["test_acc"], rel=1e-12)
        at_k = next(m for m in sb_metrics if abs(m["epoch"] - epoch) < 1e-9)
        assert float(rows[epoch]["source_test_acc_at_k"]) == pytest.approx(100 * at_k["test_acc"], rel=1e-12)
        assert rows[epoch]["source_run"] == sb.name and rows[epoch]["run"] == run.name
    assert "Fig. 5: warm-started (piggybacked) large batch" in report.read_text()


def _csv(path):
    import csv

    with open(path) as handle:
        return list(csv.DictReader(handle))


def _evaluations(run):
    return [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "test_acc" in m]


def _two_sb_runs(spec):
    spec["groups"]["sb"]["axes"]["batch_size"] = [16, 32]
    spec["groups"]["pig"]["axes"]["init_from"][0].pop("batch_size")


def _first_start(**change):
    return lambda s: s["groups"]["pig"]["axes"]["init_from"][0].update(**change)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (_first_start(group="nope"), "init_from names no group 'nope'"),
        (_first_start(checkpoint="last"), "checkpoint 'last' is unknown"),
        (_first_start(checkpoint="epoch-0003.pt"), "trains at most 2 epochs"),
        (_two_sb_runs, "matches 2 runs of group 'sb'"),
        (lambda s: s["base"].update(checkpoint_every=2), "keeps no epoch-0001.pt (checkpoint_every = 2)"),
        (
            lambda s: s["groups"]["sb"].update(base={"init_from": {"group": "pig", "checkpoint": "final"}}),
            "start from each other's runs in a circle",
        ),
        (
            lambda s: s.update(interpolations=[{"a": {"group": "sb"}, "b": {"group": "sb"}, "paths": "sin"}]),
            "unknown key 'paths'",
        ),
    ],
)
def test_bad_warm_starts_are_refused_when_the_spec_loads(change, fragment):
    data = _warm_spec()
    change(data)
    with pytest.raises(SharpError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        ReproSpec.from_dict(data)


# --- the keskar specs end to end, at toy size ----------------------------------------------------------


def _toy(name: str) -> dict:
    """paper_repro/NAME.toml at cpu scale on digits, every group, probe kind and BN mode as they are,
    made small: one trial, nets at an eighth of their width, 1 epoch with a checkpoint every epoch
    (the warm starts from epochs 0 and 1), probes on 100 images (BN groups of 50) with 2 L-BFGS-B
    iterations, 2 trace samples and Lanczos to 10%, interpolations on 100 images."""
    from sharp.config import tomllib
    from sharp.repro import SPEC_DIR

    data = tomllib.loads((SPEC_DIR / f"{name}.toml").read_text())
    cpu = data["scales"]["cpu"]
    for group in cpu["groups"].values():
        group.get("base", {}).pop("epochs", None)  # the toy's 1 epoch everywhere
        axes = group.get("axes", {})
        if "seed,init_seed" in axes:
            axes["seed,init_seed"] = axes["seed,init_seed"][:1]
        for k, start in enumerate(axes.get("init_from", [])):
            start["checkpoint"] = f"epoch-{k:04d}.pt"
        for probe in group.get("probes", []):
            probe.update(probe_set=100, maxiter=2, random_starts=0)
            probe.update({k: v for k, v in (("bn_batch", 50), ("trace_samples", 2)) if k in probe})
            if probe.get("hessian"):
                probe["tol"] = 0.1
    for interp in cpu.get("interpolations", []):
        interp.update(train_set=100, test_set=100, bn_batch=50)
    return data


TOY = {
    "dataset": "digits", "train_subset": None, "test_subset": 100, "eval_train_size": 100, "width": 0.125,
    "epochs": 1, "checkpoint_every": 1, "eval_batch": 100,
}  # fmt: skip


def test_the_keskar_spec_runs_end_to_end_at_toy_size(tmp_path):
    spec = ReproSpec.from_dict(_toy("keskar"), "cpu", overrides=TOY)
    report = run_repro(spec, tmp_path / "k", echo=lambda _: None).read_text()
    figures = tmp_path / "k" / "figures"
    fig4 = ("keskar_fig4_batch_size-1", "keskar_fig4_batch_size-2")  # C1 and the ResNet, apart
    for name in (*fig4, "keskar_fig5_piggyback", "interpolation-1", "interpolation-2"):
        assert (figures / f"{name}.png").exists() and (figures / f"{name}.csv").exists(), name
    assert "Fig. 7: interpolation #2" in report and "Fig. 3: interpolation #1" in report
    sine = json.loads((tmp_path / "k" / "interpolations" / "sb-lb-sine" / "interp.json").read_text())
    assert sine["path"] == "sin" and sine["bn"] == "batch" and sine["provenance"]["batch_size_a"] == 25
    tables = _csv(figures / "keskar_tables.csv")
    families = {r["family"].split(";")[0] for r in tables if r["source"] == "this run"}
    assert families == {"keskar-c1 x0.125 (bn)", "resnet8 x0.125 (bn)"}  # C1 and the ResNet apart
    ratio = [r for r in tables if r["quantity"] == "distance_ratio" and r["family"].startswith("keskar-c1")]
    assert len(ratio) == 1 and float(ratio[0]["mean"]) > 0  # x_0 kept, SB and LB from one init seed
    for config in (tmp_path / "k" / "runs").glob("*/config.json"):
        record = json.loads(config.read_text())
        assert record["settings"]["input_scaling"] == "unit" and record["derived"]["input_mean"] == [0.0]


def test_the_keskar_ablation_spec_runs_end_to_end_at_toy_size(tmp_path):
    spec = ReproSpec.from_dict(_toy("keskar-ablation"), "cpu", overrides=TOY)
    run_repro(spec, tmp_path / "a", echo=lambda _: None)
    rows = _csv(tmp_path / "a" / "figures" / "keskar_ablation.csv")
    cells = {(r["network"], r["stopping"].split(" (")[0].split(",")[0], r["bn_mode"]) for r in rows}
    ours = {c for c in cells if "paper" not in c[0]}
    expected = {
        ("keskar-c1 x0.125 (bn)", rule, "batch") for rule in ("until plateau", "until train loss ≤ 0.1")
    }
    expected |= {
        ("resnet8 x0.125 (bn)", rule, mode)
        for rule in ("until plateau", "until train loss ≤ 0.1")
        for mode in ("eval", "recompute", "batch")
    }
    assert ours == expected
    full = [r for r in rows if r["quantity"] == "sharpness_full" and "paper" not in r["network"]]
    assert full and all(r["lb_over_sb"] != "" for r in full)  # every cell probed
