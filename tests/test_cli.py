"""`sharp train` end to end through click, and its one-line errors."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from click.testing import CliRunner

from sharp.cli import cli
from sharp.runs import RunDir, read_jsonl
from sharp.train import TIMING_KEYS

MLP_ON_DIGITS = ["train", "--dataset", "digits", "--model", "mlp"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_line_error(result, code=2):
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sharp: error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_train_on_synthetic_writes_a_complete_run(tmp_path):
    out = tmp_path / "run"
    result = invoke(
        "train",
        "--dataset",
        "synthetic:200",
        "--model",
        "resnet8",
        "--width",
        "0.5",
        "--epochs",
        "2",
        "--batch-size",
        "50",
        "--micro-batch",
        "25",
        "--checkpoint-every",
        "1",
        "--eval-every",
        "0.5",
        "--augment",
        "--out",
        out,
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert "finished" in result.output
    run = RunDir(out)
    config = json.loads(run.config.read_text())
    assert config["settings"]["batch_size"] == 50
    assert config["derived"]["accumulation_steps"] == 2 and config["derived"]["bn_batch"] == 25
    assert config["derived"]["augment"] is True is config["derived"]["channels_last"]
    assert config["environment"]["torch"] == torch.__version__
    metrics = read_jsonl(run.metrics)
    assert [m["step"] for m in metrics] == [0, 2, 4, 6, 8]
    assert all(key in metrics[-1] for key in ("test_acc", "eval_train_loss", "lr", "wall_time", "examples"))
    assert run.status()["state"] == "finished"
    assert [p.name for p in run.epoch_checkpoints()] == ["epoch-0000.pt", "epoch-0001.pt", "epoch-0002.pt"]
    final = torch.load(run.final, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in final.values())
    last = torch.load(run.last_checkpoint, weights_only=True)
    assert last["progress"]["step"] == 8 and last["progress"]["epoch"] == 2


def test_train_on_digits_learns(tmp_path):
    result = invoke(*MLP_ON_DIGITS, "--epochs", "4", "--batch-size", "32", "--out", tmp_path / "d", "--quiet")
    assert result.exit_code == 0, result.output
    assert RunDir(tmp_path / "d").status()["test_acc"] > 0.8


def test_config_file_supplies_settings_and_the_command_line_overrides(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(
        'dataset = "digits"\nmodel = "mlp"\nbatch_size = 64\nsteps = 3\nlr = 0.05\nmilestones = [0.5, 0.9]\n'
    )
    result = invoke("train", "--config", config, "--batch-size", "32", "--out", tmp_path / "r", "--quiet")
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "r" / "config.json").read_text())["settings"]
    # settings are recorded as given, so even the float lr comes back exactly
    assert settings["batch_size"] == 32 and settings["lr"] == 0.05 and settings["steps"] == 3
    assert settings["milestones"] == "0.5,0.9"
    # a run's own config.json reproduces it
    again = invoke("train", "--config", tmp_path / "r" / "config.json", "--out", tmp_path / "r2", "--quiet")
    assert again.exit_code == 0, again.output
    a = torch.load(tmp_path / "r" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "r2" / "final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_settings_same_metrics_and_weights(tmp_path):
    args = [
        "train",
        "--dataset",
        "synthetic:100",
        "--model",
        "convnet",
        "--epochs",
        "2",
        "--batch-size",
        "20",
        "--micro-batch",
        "10",
        "--deterministic",
        "--quiet",
    ]
    invoke(*args, "--out", tmp_path / "a")
    invoke(*args, "--out", tmp_path / "b")
    strip = lambda ms: [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in ms]  # noqa: E731
    assert strip(read_jsonl(tmp_path / "a" / "metrics.jsonl")) == strip(
        read_jsonl(tmp_path / "b" / "metrics.jsonl")
    )
    a = torch.load(tmp_path / "a" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    invoke(*args, "--seed", "1", "--out", tmp_path / "c")
    c = torch.load(tmp_path / "c" / "final.pt", weights_only=True)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--batch-size", "32", "--micro-batch", "64"], "--micro-batch 64 is larger than --batch-size 32"),
        (["--model", "resnet9"], "--model 'resnet9' is unknown"),
        (["--dataset", "imagenet"], "--dataset 'imagenet' is unknown"),
        (["--micro-batch", "16", "--bn-batch", "32"], "--bn-batch 32 is larger than the micro-batch 16"),
        (["--norm", "none", "--bn-batch", "4"], "--bn-batch applies to --norm bn"),
        (["--batch-size", "0"], "--batch-size 0 must be positive"),
        (["--batch-size", "abc"], "--batch-size 'abc': give a whole number of examples or `full`"),
        (["--lr", "0.1", "--base-lr", "0.1"], "either --lr"),
        (["--lr-scaling", "linear"], "give --base-lr"),
        (["--epochs", "2", "--steps", "3"], "either --epochs or --steps"),
        (["--schedule", "step", "--milestones", "0.8,0.2"], "increasing fractions"),
        (["--batch-schedule", "5:64"], "must start at epoch 0"),
        (["--warmup", "1.5"], "--warmup 1.5"),
        (["--optimizer", "lbfgs"], "--optimizer 'lbfgs' is unknown"),
        (["--dataset", "folder:/nonexistent/x"], "needs train/<class>/"),
        (["--train-subset", "5000"], "--train-subset 5000 exceeds"),
        (["--no-such-option"], "No such option"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, fragment):
    result = invoke(*MLP_ON_DIGITS, "--steps", "1", "--out", tmp_path / "bad", "--quiet", *args)
    assert fragment in _one_line_error(result)


def test_finished_run_is_not_overwritten_without_overwrite(tmp_path):
    args = [*MLP_ON_DIGITS, "--steps", "2", "--out", tmp_path / "r", "--quiet"]
    assert invoke(*args).exit_code == 0
    before = (tmp_path / "r" / "final.pt").read_bytes()
    line = _one_line_error(invoke(*args, "--lr", "0.5"))
    assert "--overwrite" in line
    assert (tmp_path / "r" / "final.pt").read_bytes() == before
    assert invoke(*args, "--lr", "0.5", "--overwrite").exit_code == 0
    assert (tmp_path / "r" / "final.pt").read_bytes() != before


def test_a_foreign_directory_is_not_used(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    line = _one_line_error(invoke("train", "--dataset", "digits", "--steps", "1", "--out", tmp_path / "mine"))
    assert "not a sharp run" in line


def test_unknown_config_key(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("batchsize = 3\n")
    assert "unknown setting 'batchsize'" in _one_line_error(invoke("train", "--config", config))
    config.write_text("batch_size = 'big'\n")
    assert "batch_size = 'big' must be int" in _one_line_error(invoke("train", "--config", config))


def test_divergence_is_recorded_with_its_own_exit_code(tmp_path):
    result = invoke(
        *MLP_ON_DIGITS, "--norm", "none", "--lr", "1e6", "--steps", "50", "--out", tmp_path / "div", "--quiet"
    )
    line = _one_line_error(result, code=3)
    assert "diverged" in line
    status = RunDir(tmp_path / "div").status()
    assert status["state"] == "diverged"
    assert read_jsonl(tmp_path / "div" / "metrics.jsonl")[-1]["diverged"] is True


@pytest.mark.parametrize(
    ("interrupt_at", "graceful"), [(3, True), (15, True), (29, True), (3, False), (20, False)]
)
def test_interrupted_run_resumes_to_bit_identical_weights(tmp_path, monkeypatch, interrupt_at, graceful):
    """A signal during step k stops after it with a checkpoint (graceful); a second signal
    stops at once, and the run resumes from the last checkpoint written before."""
    import sharp.train as training

    base = [
        "--dataset",
        "digits",
        "--model",
        "convnet",
        "--batch-size",
        "100",
        "--micro-batch",
        "50",
        "--epochs",
        "3",
        "--eval-every",
        "0.5",
        "--augment",
        "--momentum",
        "0.9",
        "--deterministic",
        "--quiet",
    ]
    assert invoke("train", *base, "--out", tmp_path / "full").exit_code == 0

    original, calls = training.train_step, []

    def interrupted(t, window, lr, stop=False):
        calls.append(1)
        if len(calls) == interrupt_at:
            if not graceful:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)  # a first SIGTERM: stop after this step
        return original(t, window, lr, stop)

    monkeypatch.setattr(training, "train_step", interrupted)
    result = invoke("train", *base, "--out", tmp_path / "cut")
    assert result.exit_code == 130 and "--resume" in result.output
    assert RunDir(tmp_path / "cut").status()["state"] == "interrupted"
    monkeypatch.setattr(training, "train_step", original)

    conflict = _one_line_error(invoke("train", "--resume", tmp_path / "cut", "--lr", "3"))
    assert "conflicts" in conflict
    assert invoke("train", "--resume", tmp_path / "cut", "--quiet").exit_code == 0
    a = torch.load(tmp_path / "full" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda ms: [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in ms]  # noqa: E731
    assert strip(read_jsonl(tmp_path / "full" / "metrics.jsonl")) == strip(
        read_jsonl(tmp_path / "cut" / "metrics.jsonl")
    )
    assert "already finished" in _one_line_error(invoke("train", "--resume", tmp_path / "cut"))


def test_python_dash_m_and_help():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "sharp", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--micro-batch" in out.stdout


def test_batch_schedule_and_early_stop(tmp_path):
    result = invoke(
        *MLP_ON_DIGITS, "--epochs", "6", "--batch-schedule", "0:32,2:128", "--out", tmp_path / "bs", "--quiet"
    )
    assert result.exit_code == 0, result.output
    metrics = read_jsonl(tmp_path / "bs" / "metrics.jsonl")
    assert [m["batch_size"] for m in metrics[1:]] == [32, 32, 128, 128, 128, 128]
    steps = [m["step"] for m in metrics]
    assert steps[2] - steps[1] == 45 and steps[4] - steps[3] == 12  # ceil(1437/32), ceil(1437/128)

    result = invoke(
        *MLP_ON_DIGITS, "--epochs", "50", "--until-train-loss", "0.5", "--out", tmp_path / "stop", "--quiet"
    )
    assert result.exit_code == 0, result.output
    status = RunDir(tmp_path / "stop").status()
    assert "until-train-loss" in status["reason"] and status["epoch"] < 50
    assert status["eval_train_loss"] <= 0.5


def test_test_subset_is_balanced_and_recorded(tmp_path):
    result = invoke(
        *MLP_ON_DIGITS, "--steps", "2", "--test-subset", "100", "--out", tmp_path / "t", "--quiet"
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "t" / "config.json").read_text())["derived"]["n_test"] == 100
    assert "--test-subset 0 must be positive" in _one_line_error(
        invoke("train", "--dataset", "digits", "--test-subset", "0", "--out", tmp_path / "u")
    )


def test_field_types_are_read_from_the_annotations():
    from sharp.config import ProbeConfig, TrainConfig, field_types

    types = field_types(TrainConfig)
    assert types["micro_batch"] == (int, True) and types["batch_size"] == (int, False)
    assert types["momentum"] == (float, False) and types["lr"] == (float, True)
    assert types["augment"] == (bool, True) and types["dataset"] == (str, False)
    assert field_types(ProbeConfig)["subspace"] == (int, True)
    for cls in (TrainConfig, ProbeConfig):  # every default is of its field's type
        for name, (kind, optional) in field_types(cls).items():
            default = cls.__dataclass_fields__[name].default
            assert (default is None and optional) or type(default) is kind, name


def test_a_few_settings_of_a_class_get_its_defaults_and_checks():
    from sharp.config import ProbeConfig, TrainConfig, resolve_settings
    from sharp.errors import SharpError

    assert resolve_settings(ProbeConfig, device=None, precision="fp64", seed=None) == {
        "device": "auto",
        "precision": "fp64",
        "seed": 0,
    }
    with pytest.raises(SharpError, match="--precision 'bf16' is unknown: choose one of fp32, fp64"):
        resolve_settings(ProbeConfig, precision="bf16")
    with pytest.raises(SharpError, match="setting seed = 'x' must be int"):
        resolve_settings(TrainConfig, seed="x")


@pytest.mark.parametrize(
    ("command", "text", "fragment"),
    [
        ("train --config", "batch_size = [", "--config {} is not valid TOML"),
        ("sweep", "[base\n", "sweep spec {} is not valid TOML"),
        ("repro", "name = \n", "reproduction spec {} is not valid TOML"),
    ],
)
def test_a_bad_toml_file_is_one_line_naming_it(tmp_path, command, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    out = ["--out", tmp_path / "o"]
    assert fragment.format(path) in _one_line_error(invoke(*command.split(), path, *out))
    if command != "repro":  # repro takes a missing path for a spec name
        assert "cannot read it" in _one_line_error(invoke(*command.split(), tmp_path / "missing.toml", *out))
