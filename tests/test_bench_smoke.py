"""The benchmark suite runs at toy size (no assertion on timings beyond positive and finite); the
peers' baselines run where their packages (the `bench` extra) are installed and say why not elsewhere."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is run from the repository root, not installed
    sys.path.insert(0, str(ROOT))

from bench import benchmarks  # noqa: E402
from bench.run import verdict  # noqa: E402
from sharp.data import load_digits, load_synthetic  # noqa: E402
from sharp.models import build_model  # noqa: E402


def _positive_finite(x: float) -> bool:
    return math.isfinite(x) and x > 0


def test_hvp_over_grad_runs_at_toy_size():
    ds = load_synthetic(64)
    model = build_model("convnet", 3, 10, width=0.5)
    batches = benchmarks.probe_batches(ds, torch.device("cpu"), 16, 8)
    result = benchmarks.bench_hvp_over_grad(model, batches, torch.device("cpu"), reps=2)
    assert _positive_finite(result["value"])
    assert result["settings"]["n_examples"] == 16
    assert len(result["hvp"]["times_s"]) == 2


def test_accumulation_benchmark_runs_at_toy_size():
    ds = load_synthetic(64)
    result = benchmarks.bench_accumulation(
        ds, torch.device("cpu"), steps=1, reps=1, warmup=0, batch=32, micro=8, model="convnet", width=0.5
    )
    assert math.isfinite(result["value"])
    assert _positive_finite(result["images_per_s_accumulated"])
    assert _positive_finite(result["images_per_s_one_batch"])


def test_ensemble_benchmark_runs_at_toy_size():
    ds = load_synthetic(64)
    result = benchmarks.bench_ensemble(
        ds, torch.device("cpu"), (2, 4), {2: 2, 4: 1}, reps=1, members=2, model="convnet", width=0.5, warmup=0
    )
    for batch in (2, 4):
        r = result[f"B{batch}"]
        assert _positive_finite(r["speedup"]) and _positive_finite(r["vmap_speedup"])
        assert len(r["ensemble"]["times_s"]) == 1
        # the three ways took the same steps from the same starts: the same weights, to fp32 rounding
        assert max(r["max_abs_diff_vs_sequential"].values()) < 1e-5


def test_stacked_hvp_benchmark_runs_at_toy_size_and_agrees_with_each_model():
    ds = load_synthetic(64)
    models = [build_model("convnet", 3, 10, width=0.5).double() for _ in range(3)]
    batches = [(x.double(), y) for x, y in benchmarks.probe_batches(ds, torch.device("cpu"), 16, 8)]
    result = benchmarks.bench_ensemble_hvp(models, batches, torch.device("cpu"), reps=1, warmup=0)
    assert _positive_finite(result["speedup"])
    assert result["max_rel_diff"] < 1e-12  # each member's block of the stacked Hessian is its own, in fp64


def test_verdict_reads_the_target_direction():
    assert verdict("accumulation_overhead", 0.01)[1] == "pass"
    assert verdict("accumulation_overhead", 0.2)[1] == "miss"
    assert verdict("train_speedup_vs_naive.resnet8", 3.5)[1] == "pass"
    assert verdict("train_speedup_vs_naive.resnet8", float("nan"))[1] == "miss"
    assert verdict("eval_speedup_vs_naive", 2.0) == ("", "")


def test_tracking_benchmark_runs_at_toy_size():
    ds = load_synthetic(64)
    result = benchmarks.bench_tracking(
        ds, torch.device("cpu"), "convnet", batch=16, micro=8, every=2, reps=2, track_set="32", width=0.5
    )
    assert _positive_finite(result["warm_fraction"]) and _positive_finite(result["cold_fraction"])
    assert result["settings"]["track_set"] == 32 and len(result["train"]["times_s"]) == 2
    assert all(h >= 1 for h in result["hvps"]["warm"] + result["hvps"]["cold"])
    assert result["max_rel_diff_warm_cold"] < 1e-2  # both stop at a 1e-3 Ritz residual of the same operator


def test_throughput_benchmark_runs_at_toy_size():
    ds = load_synthetic(64)
    result = benchmarks.bench_throughput(
        ds, torch.device("cpu"), "convnet", batches=(4, 16), images=16, reps=1
    )
    assert result["b4"]["steps_per_rep"] == 4 and result["b16"]["steps_per_rep"] == 1
    assert all(_positive_finite(result[k]["images_per_s"]) for k in ("b4", "b16"))


def _small_problem():
    model, batch = benchmarks.small_curvature_problem(load_digits(), torch.device("cpu"), n=32)
    return model, batch


def test_dense_hessian_of_the_small_problem_matches_sharps_hvps():
    """The peers' reference: the dense Hessian's columns are sharp's HVPs of unit vectors."""
    from sharp.probes.common import ProbeModel
    from sharp.probes.hessian import HessianOperator

    model, batch = _small_problem()
    dense = benchmarks.dense_hessian(model, batch)
    op = HessianOperator(ProbeModel(model, [batch]))
    for i in (0, 17, op.n - 1):
        e = torch.zeros(op.n, dtype=torch.float64)
        e[i] = 1.0
        # float64 double backward both ways, summed in other orders: rounding only
        np.testing.assert_allclose(dense[:, i], op.matvec(e).numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dense, dense.T, atol=1e-12)


def test_hessian_peer_benchmark_runs_at_toy_size_or_says_why_a_peer_is_skipped():
    model, batch = _small_problem()
    dense = benchmarks.dense_hessian(model, batch)
    reference = sorted(np.linalg.eigvalsh(dense).tolist(), reverse=True)[:3]
    # one setting each that is accurate here (the full ladders are the benchmark's), no warm-up
    ladders = {"eigenthings": (40,), "curvlinops": (1e-4,)}
    result = benchmarks.bench_hessian_peers(
        model, batch, torch.device("cpu"), reference, "dense", k=3, ladders=ladders, warmup=False
    )
    assert result["sharp"]["accurate"] and result["sharp"]["hvps"] > 0
    for peer, (module, *_rest) in benchmarks.TOP_PEERS.items():
        r = result[peer]
        if benchmarks.peer_missing(module) is not None:
            assert r["skipped"].count("\n") == 0 and "cannot be imported" in r["skipped"]
            continue
        # each peer, at the setting its ladder accepted, is within the accuracy of the dense reference
        assert r["accurate"] and r["max_rel_error"] <= 1e-3, (peer, r["ladder"])
        assert _positive_finite(r["speedup"]) and _positive_finite(r["hvp_ratio"])


def test_trace_peer_benchmark_runs_at_toy_size():
    model, batch = _small_problem()
    result = benchmarks.bench_trace_peers(
        model, batch, torch.device("cpu"), target=0.2, seeds=2, ladder=(6, 12)
    )
    for name in benchmarks.TRACE_ESTIMATORS:
        r = result[name]
        if "skipped" in r:
            continue
        assert r["ladder"] and all(t["hvps"] == t["budget"] for t in r["ladder"])  # HVPs counted, not assumed
    assert result["sharp_hutchpp_adaptive"]["mean_hvps"] > 0


def test_probe_memory_benchmark_runs_in_fresh_processes():
    result = benchmarks.bench_probe_memory(
        torch.device("cpu"), n_examples=16, batch=8, model="convnet", hvps=1
    )
    for mode, keep in (("kept", True), ("chunked", False)):
        assert result[mode]["keep_graph"] is keep and result[mode]["batches"] == 2
        assert result[mode]["peak_mib"] >= 0 and result[mode]["measure"] == "ru_maxrss over current RSS"


def _gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), *args], capture_output=True, text=True, check=False
    )


def test_gpu_check_reads_its_arguments_and_fails_fast_without_a_gpu(tmp_path):
    assert _gpu_check("--help").returncode == 0
    for bad in (["--bogus"], ["--budget", "5m"]):
        done = _gpu_check(*bad)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("gpu_check:")
    if torch.cuda.is_available():
        return  # the rest is the no-GPU path
    done = _gpu_check("--python", sys.executable, "--out", str(tmp_path / "g.json"))
    assert done.returncode == 2 and "no CUDA device" in done.stderr and done.stderr.count("\n") == 1
    assert not (tmp_path / "g.json").exists()


def test_gpu_report_merges_each_benchmark_and_the_cuda_tests(tmp_path):
    from bench.gpu_report import gpu_report

    (tmp_path / "bench-hvp.rc").write_text("0\n")
    (tmp_path / "bench-hvp.json").write_text(json.dumps({"keys": {"hvp_over_grad": 2.3}, "details": {}}))
    (tmp_path / "bench-trace.rc").write_text("124\n")
    (tmp_path / "bench-trace.log").write_text("x" * 5000 + "killed")
    (tmp_path / "pytest.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="0">'
        '<testcase classname="tests.test_cuda" name="test_a"/>'
        '<testcase classname="tests.test_cuda" name="test_b"><failure message="no"/></testcase>'
        '<testcase classname="tests.test_cuda" name="test_c"/></testsuite></testsuites>'
    )
    report = gpu_report(tmp_path, ["hvp", "trace"], pytest_exit=1, seconds=42)
    assert report["keys"] == {"hvp_over_grad": 2.3}
    assert report["benchmarks"]["trace"]["timed_out"] and report["benchmarks"]["trace"]["log_tail"].endswith(
        "killed"
    )
    assert len(report["benchmarks"]["trace"]["log_tail"]) == 4000
    assert report["pytest_cuda"]["tests"] == 3 and report["pytest_cuda"]["failed"] == [
        "tests.test_cuda::test_b"
    ]
    assert report["ensemble"].startswith("not registered") and report["ok"] is False


def test_sam_step_benchmark_runs_at_toy_size():
    ds = load_synthetic(64)
    result = benchmarks.bench_sam_step(
        ds, torch.device("cpu"), model="convnet", batch=16, micro=8, steps=1, reps=1, warmup=0, width=0.5
    )
    assert _positive_finite(result["value"]) and result["settings"]["sam_rho"] == 0.05
