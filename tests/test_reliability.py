"""Nothing lost: kills at random points, corrupt files, a second writer, bad input anywhere."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sharp.cli import cli
from sharp.config import FIELDS, TrainConfig, field_types, make_config
from sharp.errors import SharpError
from sharp.runs import RunDir, read_jsonl
from sharp.train import TIMING_KEYS

TRAIN = [sys.executable, "-m", "sharp", "train"]
RUN_ARGS = [
    "--dataset",
    "synthetic:512",
    "--model",
    "resnet8",
    "--width",
    "0.5",
    "--batch-size",
    "32",
    "--micro-batch",
    "16",
    "--epochs",
    "5",
    "--eval-every",
    "0.25",
    "--augment",
    "--momentum",
    "0.9",
    "--deterministic",
    "--quiet",
]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _tiny_run(out, *length):
    """Train a small MLP on digits into `out` (`length`: --steps N or --epochs N)."""
    result = invoke("train", "--dataset", "digits", "--model", "mlp", *length, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    return out


def _one_line_error(result, code=2):
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sharp: error: ") and "Traceback" not in result.output
    return lines[0]


def _lines(path):
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path):
    reference = subprocess.run(
        [*TRAIN, *RUN_ARGS, "--out", str(tmp_path / "full")], capture_output=True, text=True
    )
    assert reference.returncode == 0, reference.stderr
    cut = tmp_path / "cut"
    rng = random.Random(7)
    command = [*TRAIN, *RUN_ARGS, "--out", str(cut)]
    kills = 0
    for _ in range(12):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        target = _lines(cut / "metrics.jsonl") + rng.randint(1, 5)  # a random point of the run
        while process.poll() is None and _lines(cut / "metrics.jsonl") < target:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
            assert RunDir(cut).status()["state"] == "running"  # what a kill leaves behind
            command = [*TRAIN, "--resume", str(cut), "--quiet"]
            continue
        assert process.returncode == 0, process.stderr.read()
        break
    assert kills >= 3
    assert RunDir(cut).status()["state"] == "finished"
    a = torch.load(tmp_path / "full" / "final.pt", weights_only=True)
    b = torch.load(cut / "final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _strip(read_jsonl(tmp_path / "full" / "metrics.jsonl")) == _strip(
        read_jsonl(cut / "metrics.jsonl")
    )


def test_sigterm_saves_a_checkpoint_and_exits_130(tmp_path):
    process = subprocess.Popen(
        [*TRAIN, *RUN_ARGS, "--out", str(tmp_path / "t")], stderr=subprocess.PIPE, text=True
    )
    while process.poll() is None and _lines(tmp_path / "t" / "metrics.jsonl") < 3:
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "--resume" in stderr and "Traceback" not in stderr
    status = RunDir(tmp_path / "t").status()
    assert status["state"] == "interrupted"
    state = torch.load(tmp_path / "t" / "checkpoints" / "last.pt", weights_only=True)
    assert state["progress"]["step"] == status["step"]


def test_a_second_writer_process_is_refused(tmp_path):
    first = subprocess.Popen([*TRAIN, *RUN_ARGS, "--out", str(tmp_path / "r")], stderr=subprocess.PIPE)
    while first.poll() is None and not (tmp_path / "r" / "config.json").exists():
        time.sleep(0.01)
    second = invoke("train", "--resume", tmp_path / "r")
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert "being written by process" in _one_line_error(second)


DIGITS_RUN = ["--dataset", "digits", "--model", "mlp", "--batch-size", "16", "--eval-every", "0.5", "--quiet"]


def test_two_writers_started_at_once_one_trains_and_the_other_is_refused(tmp_path):
    out = tmp_path / "r"
    command = [*TRAIN, *DIGITS_RUN, "--epochs", "4", "--out", str(out)]
    pair = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in pair]
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    lines = [line for line in refused.splitlines() if line.strip()]
    assert len(lines) == 1 and "is being written by process" in lines[0], refused
    # the run directory is the winner's alone: every evaluation once, final = last checkpoint
    run = RunDir(out)
    assert run.status()["state"] == "finished" and not run.lock_file.exists()
    steps = [m["step"] for m in read_jsonl(run.metrics)]
    assert steps == [45 * k for k in range(9)]  # ceil(1437 / 16) = 90 steps an epoch, evaluated twice
    final = torch.load(run.final, weights_only=True)
    last = torch.load(run.last_checkpoint, weights_only=True)["model"]
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)


def test_after_sigkill_a_resume_takes_the_run_over_at_once(tmp_path):
    out = tmp_path / "r"
    writer = subprocess.Popen([*TRAIN, *DIGITS_RUN, "--epochs", "3", "--out", str(out)])
    while writer.poll() is None and _lines(out / "metrics.jsonl") < 2:
        time.sleep(0.005)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert str(writer.pid) in RunDir(out).lock_file.read_text()  # what the killed writer left
    result = invoke("train", "--resume", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert RunDir(out).status()["state"] == "finished"
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [45 * k for k in range(7)]


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_step_0(tmp_path, monkeypatch):
    from sharp.checkpoint import Checkpointer

    reference = _tiny_run(tmp_path / "reference", "--epochs", "1")

    def stopped(self, state):
        raise KeyboardInterrupt  # a stop before the first checkpoint was written

    monkeypatch.setattr(Checkpointer, "save_last", stopped)
    out = tmp_path / "r"
    result = invoke(
        "train", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--out", out, "--quiet"
    )
    assert result.exit_code == 130 and not RunDir(out).last_checkpoint.exists()
    monkeypatch.undo()
    result = invoke("train", "--resume", out, "--quiet")
    assert result.exit_code == 0, result.output
    a = torch.load(reference / "final.pt", weights_only=True)
    b = torch.load(out / "final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _strip(read_jsonl(reference / "metrics.jsonl")) == _strip(read_jsonl(out / "metrics.jsonl"))


def test_corrupt_last_checkpoint_names_the_fallback(tmp_path):
    out = _tiny_run(tmp_path / "r", "--epochs", "2")
    RunDir(out).set_status("running")  # as if killed
    last = out / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:300])
    line = _one_line_error(invoke("train", "--resume", out))
    assert "last.pt is truncated or corrupt" in line and "last.prev.pt" in line
    os.replace(out / "checkpoints" / "last.prev.pt", last)
    assert invoke("train", "--resume", out, "--quiet").exit_code == 0


def test_hostile_final_checkpoint_is_refused_by_probe(tmp_path):
    out = _tiny_run(tmp_path / "r", "--steps", "2")

    class Hostile:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    import pickle

    (out / "final.pt").write_bytes(pickle.dumps({"net.0.weight": Hostile()}))
    line = _one_line_error(invoke("probe", out, "--hessian"))
    assert "refused" in line and not (tmp_path / "pwned").exists()


def _folder(root, classes=("a", "b"), size=8, odd=None):
    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(3):
                side = odd if (odd and split == "train" and name == classes[-1] and i == 2) else size
                Image.fromarray(np.full((side, side, 3), 40 * i, np.uint8)).save(
                    root / split / name / f"{i}.png"
                )


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda root: _folder(root, classes=("only",)), "need at least 2"),
        (lambda root: _folder(root, odd=12), "mixed sizes"),
        (
            lambda root: [(root / s / c).mkdir(parents=True) for s in ("train", "test") for c in "ab"],
            "no images",
        ),
    ],
)
def test_bad_folder_datasets_through_the_cli(tmp_path, make, fragment):
    make(tmp_path / "data")
    result = invoke(
        "train", "--dataset", f"folder:{tmp_path / 'data'}", "--steps", "1", "--out", tmp_path / "r"
    )
    assert fragment in _one_line_error(result)


@pytest.mark.parametrize(("alphas", "fragment"), [("1:0:0", "alpha"), ("a:b:c", "alpha"), ("", "alpha")])
def test_empty_or_bad_alpha_range(tmp_path, alphas, fragment):
    out = _tiny_run(tmp_path / "r", "--steps", "1")
    line = _one_line_error(invoke("interp", out, out, "--alphas", alphas, "--out", tmp_path / "i"))
    assert fragment in line.lower()


def test_probe_of_a_directory_that_is_not_a_run(tmp_path):
    assert "not a run directory" in _one_line_error(invoke("probe", tmp_path, "--hessian"))
    assert "not a run directory" in _one_line_error(
        invoke("interp", tmp_path, tmp_path, "--out", tmp_path / "i")
    )


# --- property-based: the validator never crashes and never lets an invalid setting through ---

_VALUES = {
    "int": st.one_of(st.none(), st.integers(-3, 3000)),
    "float": st.one_of(
        st.none(), st.floats(-2, 2), st.sampled_from([float("nan"), float("inf"), -float("inf")])
    ),
    "str": st.one_of(
        st.none(),
        st.sampled_from(
            [
                "",
                "x",
                "0.5,0.75",
                "0:32,2:64",
                "bn",
                "sgd",
                "digits",
                "resnet8",
                "linear",
                "fp64",
                "step",
                "folder:",
                "synthetic:3",
            ]
        ),
    ),
    "bool": st.one_of(st.none(), st.booleans()),
}


def _strategy(name):
    kind = field_types(TrainConfig)[name][0].__name__
    choices = FIELDS[name].metadata.get("choices")
    base = _VALUES[kind]
    return st.one_of(base, st.sampled_from(choices)) if choices else base


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional={name: _strategy(name) for name in FIELDS}))
def test_validator_accepts_only_consistent_settings(overrides):
    try:
        cfg = make_config({}, overrides, TrainConfig)
    except SharpError as exc:
        message = str(exc)
        assert "\n" not in message and message
        return
    micro = cfg.micro_batch
    assert cfg.batch_size > 0 and (micro is None or micro <= cfg.batch_size or cfg.batch_schedule)
    assert cfg.bn_batch is None or (cfg.norm == "bn" and cfg.bn_batch <= (micro or cfg.batch_size))
    assert not (cfg.lr is not None and cfg.base_lr is not None)
    assert 0 <= cfg.warmup < 1 and cfg.width > 0
    assert cfg.epochs is None or cfg.steps is None
    for value in (cfg.lr, cfg.base_lr, cfg.eval_every, cfg.gamma):
        assert value is None or value > 0


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(sorted(FIELDS)),
        st.one_of(st.integers(), st.text(max_size=5), st.floats(), st.booleans(), st.none()),
    )
)
def test_config_files_with_any_values_give_one_line_errors(table):
    try:
        make_config(table, {}, TrainConfig)
    except SharpError as exc:
        assert "\n" not in str(exc)


# Every setting at a value other than its default, but for those in NOT_SET, so that any one
# that config.json failed to carry would change the run it reproduces.
NON_DEFAULT = {
    "dataset": "digits",  # the default, but written out: the run must not depend on defaults
    "train_subset": 600,
    "data_seed": 3,
    "augment": True,
    "eval_train_size": 300,
    "test_subset": 200,
    "model": "convnet",
    "width": 0.5,
    "bn_batch": 8,
    "batch_size": 64,
    "micro_batch": 32,
    "drop_last": True,
    "batch_schedule": "0:64,1:128",
    "momentum": 0.9,
    "weight_decay": 1e-3,
    "base_lr": 0.05,
    "lr_scaling": "linear",
    "reference_batch": 32,
    "warmup": 0.2,
    "warmup_style": "goyal",
    "schedule": "step",
    "milestones": "0.6,0.8",
    "gamma": 0.5,
    "epochs": 2,
    "until_train_loss": 1e-6,
    "eval_every": 0.5,
    "checkpoint_every": 1,
    "noise_scale": True,
    "seed": 5,
    "deterministic": True,
    "device": "cpu",
    "precision": "fp64",
    "channels_last": False,
    "until_plateau": 3,
    "plateau_tol": 0.05,
    "eval_batch": 100,
    "tensorboard": True,
    "loss": "mse",
    "init_seed": 11,
    "tf32": True,
    "sam_rho": 0.05,
    "sam_adaptive": True,
    "until_train_acc": 0.999,
    "track_sharpness": 3,
    "track_set": "64",
    "track_bn_mode": "eval",
    "input_scaling": "unit",
}
NOT_SET = {
    "data_root": "cifar only",
    "download": "cifar only",
    "norm": "--bn-batch needs bn, the default",
    "optimizer": "--momentum is SGD's, the default",
    "lr": "exclusive with --base-lr",
    "steps": "exclusive with --epochs",
    "compile": "compiling takes most of a minute",
    "init_from": "needs another run",
    "sync_bn": "exclusive with --bn-batch; needs several processes to matter",
    "sam_m": "exclusive with --noise-scale",
    "full_batch": "exclusive with --batch-schedule",
    "cuda_graphs": "needs a CUDA device (tests/test_cuda.py)",
}


def _flags(settings):
    args = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return args


def test_a_runs_config_json_reproduces_it_bit_for_bit(tmp_path):
    assert set(NON_DEFAULT) | set(NOT_SET) == set(FIELDS)  # a new setting belongs in one of them
    assert all(NON_DEFAULT[k] != FIELDS[k].default for k in NON_DEFAULT if k != "dataset")
    first = invoke("train", *_flags(NON_DEFAULT), "--out", tmp_path / "a", "--quiet")
    assert first.exit_code == 0, first.output
    again = invoke("train", "--config", tmp_path / "a" / "config.json", "--out", tmp_path / "b", "--quiet")
    assert again.exit_code == 0, again.output
    a = torch.load(tmp_path / "a" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "final.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _strip(read_jsonl(tmp_path / "a" / "metrics.jsonl")) == _strip(
        read_jsonl(tmp_path / "b" / "metrics.jsonl")
    )


_RANK_LOADING_CIFAR = """
import os, sys, time
from pathlib import Path
import numpy as np
import torchvision.datasets

root = Path(sys.argv[1])


class FakeCIFAR10:
    classes = [str(c) for c in range(10)]

    def __init__(self, root, train=True, download=False):
        done = Path(root) / "downloaded"
        if download and not done.exists():
            with open(Path(root) / "downloads.log", "a") as log:
                log.write(f"{os.getpid()}\\n")
            time.sleep(1.0)  # a download takes a while: without a lock the other rank starts one too
            done.write_text("")
        if not done.exists():
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        self.data = np.zeros((20, 8, 8, 3), np.uint8)
        self.targets = [i % 10 for i in range(20)]


torchvision.datasets.CIFAR10 = FakeCIFAR10
(root / f"ready-{os.getpid()}").touch()
while len(list(root.glob("ready-*"))) < 2:  # both ranks reach the loader together
    time.sleep(0.01)
from sharp.data import load_cifar

print(len(load_cifar("cifar10", root, download=True).train_labels))
"""


def test_ranks_asking_for_a_download_at_once_download_it_once(tmp_path):
    ranks = [
        subprocess.Popen([sys.executable, "-c", _RANK_LOADING_CIFAR, str(tmp_path)], stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = [rank.communicate(timeout=120)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0]
    assert [out.strip() for out in outputs] == [b"20", b"20"]
    assert len((tmp_path / "downloads.log").read_text().splitlines()) == 1
    assert not (tmp_path / ".sharp-download.lock").exists()
