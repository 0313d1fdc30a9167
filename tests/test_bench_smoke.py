"""The benchmark suite runs at toy size (no assertion on timings beyond positive and finite)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is run from the repository root, not installed
    sys.path.insert(0, str(ROOT))

from bench import benchmarks  # noqa: E402
from bench.run import verdict  # noqa: E402
from sharp.data import load_synthetic  # noqa: E402
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
