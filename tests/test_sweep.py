"""Sweeps: grid expansion, stable run names, local and Ray launchers, skip and resume."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sharp.cli import cli
from sharp.errors import SharpError
from sharp.runs import RunDir
from sharp.sweep import Launcher, SweepSpec, collect, run_sweep

SPEC = """
name = "tiny"
[base]
dataset = "digits"
model = "mlp"
steps = 3
batch_size = 32
[axes]
train_subset = [100, 200, 300, 5000]   # 5000 > 1437 digits: this run fails at start
"""


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_expansion_names_are_readable_and_stable():
    spec = SweepSpec.from_dict(
        {
            "base": {"dataset": "digits", "model": "mlp"},
            "axes": {"batch_size": [32, 128], "base_lr": [0.001], "seed": [0, 1, 2]},
        }
    )
    runs = spec.runs()
    assert len(runs) == 6
    assert runs[0].name.startswith("B32-blr0.001-s0-") and runs[-1].name.startswith("B128-blr0.001-s2-")
    assert [r.name for r in runs] == [r.name for r in spec.runs()]
    assert runs[0].settings["batch_size"] == 32 and runs[0].settings["dataset"] == "digits"
    other = SweepSpec.from_dict(
        {"base": {"dataset": "digits", "model": "mlp", "epochs": 3}, "axes": {"batch_size": [32]}}
    )
    assert other.runs()[0].name != runs[0].name  # different settings, different hash


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"axes": {"batch_size": 32}}, "must be a non-empty list"),
        ({"axes": {"batch_sise": [32]}}, "unknown setting 'batch_sise'"),
        ({"axes": {"micro_batch": [64]}, "base": {"batch_size": 32}}, "--micro-batch 64 is larger"),
        ({"grid": {}}, "unknown table 'grid'"),
        ({"probe": {"eps": "-1"}}, "--eps '-1'"),
    ],
)
def test_bad_specs_are_refused_before_any_work(spec, fragment):
    with pytest.raises(SharpError, match=fragment):
        SweepSpec.from_dict(spec)


def test_local_sweep_records_a_failure_goes_on_and_rerun_skips_finished(tmp_path):
    spec_path = tmp_path / "tiny.toml"
    spec_path.write_text(SPEC + "[probe]\nhessian = true\ntop_k = 2\nprobe_set = 64\n")
    out = tmp_path / "sweep"
    result = invoke("sweep", spec_path, "--out", out)
    assert result.exit_code == 1, result.output
    assert "3 finished, 1 failed" in result.output
    rows = collect(out)
    assert [r["state"] for r in rows] == ["finished", "finished", "finished", "failed"]
    assert "exceeds" in rows[3]["reason"]
    finals = {r["run"]: (out / "runs" / r["run"] / "final.pt").stat().st_mtime_ns for r in rows[:3]}

    again = invoke("sweep", spec_path, "--out", out)
    assert "3 finished, 1 failed" in again.output
    assert finals == {r: (out / "runs" / r / "final.pt").stat().st_mtime_ns for r in finals}

    status = invoke("sweep", "status", out)
    assert status.exit_code == 0 and "train_subset" in status.output and status.output.count("finished") == 3
    table = tmp_path / "all.csv"
    assert invoke("sweep", "collect", out, "--csv", table).exit_code == 0
    with open(table) as handle:
        read = list(csv.DictReader(handle))
    assert [r["train_subset"] for r in read] == ["100", "200", "300", "5000"]
    # exact: the CSV holds each float in its shortest repr, which reads back to the same float
    assert float(read[0]["test_acc"]) == rows[0]["test_acc"]
    assert float(read[0]["hessian-top2-lanczos.lambda_max"]) > 0 and read[0]["probes"] == "1"


def test_a_different_spec_is_refused_in_the_same_directory(tmp_path):
    spec_path = tmp_path / "a.toml"
    spec_path.write_text(SPEC.replace("[100, 200, 300, 5000]", "[100]"))
    assert invoke("sweep", spec_path, "--out", tmp_path / "s").exit_code == 0
    spec_path.write_text(SPEC.replace("[100, 200, 300, 5000]", "[200]"))
    result = invoke("sweep", spec_path, "--out", tmp_path / "s")
    assert result.exit_code == 2 and "holds a different sweep" in result.output


def test_interrupted_run_resumes_when_the_sweep_runs_again(tmp_path, monkeypatch):
    import sharp.train as training

    spec = SweepSpec.from_dict(
        {
            "base": {
                "dataset": "digits",
                "model": "mlp",
                "epochs": 2,
                "batch_size": 100,
                "eval_every": 0.5,
                "deterministic": True,
            },
            "axes": {"seed": [0]},
        }
    )
    clean = run_sweep(spec, tmp_path / "clean", echo=lambda _: None)
    original, calls = training.train_step, []

    def crash(t, window, lr, stop=False):
        calls.append(1)
        if len(calls) == 20:
            raise RuntimeError("node lost")
        return original(t, window, lr, stop)

    monkeypatch.setattr(training, "train_step", crash)
    first = run_sweep(spec, tmp_path / "cut", echo=lambda _: None)
    name = next(iter(first))
    assert first[name] == "failed" and clean[name] == "finished"
    assert RunDir(tmp_path / "cut" / "runs" / name).last_checkpoint.exists()
    monkeypatch.setattr(training, "train_step", original)
    assert run_sweep(spec, tmp_path / "cut", echo=lambda _: None)[name] == "finished"
    a = torch.load(tmp_path / "clean" / "runs" / name / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "runs" / name / "final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_launcher_on_a_local_ray(tmp_path, local_ray):
    spec_path = tmp_path / "tiny.toml"
    spec_path.write_text(SPEC)
    states = run_sweep(SweepSpec.from_toml(spec_path), tmp_path / "ray", Launcher("ray"), echo=lambda _: None)
    assert sorted(states.values()) == ["failed", "finished", "finished", "finished"]
    assert [r["state"] for r in collect(tmp_path / "ray")] == ["finished", "finished", "finished", "failed"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--launcher", "slurm"], "--launcher 'slurm' is unknown"),
        (["--workers", "0"], "--workers 0 must be"),
        (["--cpus-per-run", "0"], "--cpus-per-run must be positive"),
    ],
)
def test_bad_launcher_options(tmp_path, args, fragment):
    spec_path = tmp_path / "tiny.toml"
    spec_path.write_text(SPEC)
    result = invoke("sweep", spec_path, "--out", tmp_path / "s", *args)
    assert (
        result.exit_code == 2 and fragment in result.output and len(result.output.strip().splitlines()) == 1
    )


def _check_in(folder, workers):
    """Run in a pool worker: wait until every worker holds one of these tasks (so each worker
    runs exactly one), then report this worker's pid and visible GPUs."""
    import os
    import time
    from pathlib import Path

    Path(folder, str(os.getpid())).touch()
    deadline = time.monotonic() + 120
    while len(list(Path(folder).iterdir())) < workers and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")


def test_each_local_worker_sees_one_gpu_round_robin(tmp_path, monkeypatch):
    from sharp.sweep import worker_pool

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # a machine with 2 GPUs
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with worker_pool(3) as pool:
        seen = [f.result(timeout=180) for f in [pool.submit(_check_in, str(tmp_path), 3) for _ in range(3)]]
    assert len({pid for pid, _ in seen}) == 3
    assert sorted(gpu for _, gpu in seen) == ["0", "0", "1"]  # workers 0, 1, 2 on GPUs 0, 1, 0


def test_the_gpus_a_sweep_shares_out_are_those_it_may_use(monkeypatch):
    from sharp.sweep import visible_gpus

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert visible_gpus() == ["5", "7"]  # worker 0 gets physical GPU 5, worker 1 GPU 7
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpus() == ["0", "1"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert visible_gpus() == []  # workers keep their environment


KILL_SPEC = """
[base]
dataset = "digits"
model = "mlp"
width = 0.25
batch_size = 32
epochs = 1
eval_every = 0.25
eval_train_size = 256
test_subset = 100
[axes]
seed = [0, 1, 2, 3]
"""


def sweep_command(spec, out):
    """`sharp sweep SPEC` on two worker processes, in a process of its own."""
    return [sys.executable, "-m", "sharp", "sweep", str(spec), "--workers", "2", "--out", str(out)]


@pytest.fixture(scope="module")
def clean_sweep(tmp_path_factory):
    """KILL_SPEC's four runs swept once without interruption, to compare stopped sweeps against."""
    folder = tmp_path_factory.mktemp("clean")
    spec = folder / "spec.toml"
    spec.write_text(KILL_SPEC)
    clean = subprocess.run(sweep_command(spec, folder / "sweep"), capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    return spec, folder / "sweep"


def _start_until_mid_training(spec, cut):
    """Start the sweep into `cut`; return it and {run: its worker's pid} once a run is in mid-training."""
    sweep = subprocess.Popen(
        sweep_command(spec, cut), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    writers = {}
    while sweep.poll() is None and not writers:
        for run in (cut / "runs").glob("*") if (cut / "runs").is_dir() else []:
            lines = (run / "metrics.jsonl").read_text().count("\n") if (run / "metrics.jsonl").exists() else 0
            if 2 <= lines < 5 and (run / "run.lock").exists():
                with contextlib.suppress(ValueError, KeyError, FileNotFoundError):
                    writers[run.name] = json.loads((run / "run.lock").read_text())["pid"]
        time.sleep(0.005)
    assert writers and sweep.pid not in writers.values(), "no run was caught in mid-training"
    return sweep, writers


def _finishes_bit_identical_when_run_again(spec, clean, cut):
    again = subprocess.run(sweep_command(spec, cut), capture_output=True, text=True)
    assert again.returncode == 0 and "4 finished" in again.stdout, again.stdout + again.stderr
    names = sorted(p.name for p in (clean / "runs").iterdir())
    assert names == sorted(p.name for p in (cut / "runs").iterdir()) and len(names) == 4
    for name in names:
        a = torch.load(clean / "runs" / name / "final.pt", weights_only=True)
        b = torch.load(cut / "runs" / name / "final.pt", weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def _alive(pid):
    """Whether process `pid` exists and is not a zombie (Linux's /proc)."""
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def test_a_sweep_whose_worker_is_killed_finishes_bit_identical_when_run_again(tmp_path, clean_sweep):
    spec, clean = clean_sweep
    sweep, writers = _start_until_mid_training(spec, tmp_path / "cut")
    os.kill(next(iter(writers.values())), signal.SIGKILL)
    stdout, stderr = sweep.communicate(timeout=300)
    assert sweep.returncode == 1 and "lost" in stdout and "Traceback" not in stderr, stdout + stderr
    _finishes_bit_identical_when_run_again(spec, clean, tmp_path / "cut")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads worker states from /proc")
def test_a_sigterm_to_the_sweep_stops_its_workers_after_a_step_and_the_rerun_is_bit_identical(
    tmp_path, clean_sweep
):
    spec, clean = clean_sweep
    cut = tmp_path / "cut"
    sweep, writers = _start_until_mid_training(spec, cut)
    sweep.send_signal(signal.SIGTERM)  # to the sweep's own process only, as a scheduler or `kill` does
    stdout, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 130 and "stopped by a signal" in stderr, stdout + stderr
    assert "Traceback" not in stderr and "not started" in stdout, stdout + stderr
    assert not any(_alive(pid) for pid in writers.values())  # no worker trains on, orphaned
    for name in writers:
        status = RunDir(cut / "runs" / name).status()
        if status["state"] != "finished":  # caught in mid-training: saved after a whole step
            assert status["state"] == "interrupted" and "after a whole step" in status["reason"], status
            last = torch.load(cut / "runs" / name / "checkpoints" / "last.pt", weights_only=True)
            assert last["progress"]["step"] == status["step"]
    _finishes_bit_identical_when_run_again(spec, clean, cut)


def test_a_run_another_process_writes_is_left_alone_as_busy(tmp_path):
    from sharp.config import TrainConfig
    from sharp.sweep import execute_run

    run = RunDir(tmp_path / "r")
    settings = TrainConfig(dataset="digits", model="mlp", steps=1).to_dict()
    with run.lock():  # the other writer (a second open file: refused like another process)
        assert execute_run(str(run.path), settings) == "busy"
        assert not run.status_file.exists() and not run.config.exists()  # nothing written
    assert execute_run(str(run.path), settings) == "finished"
