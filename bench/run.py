"""Run the benchmark suite: `python -m bench [--quick] [--json FILE] [--device auto|cpu|cuda]`
(or `python bench/run.py ...`) from the repository root. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from analysis.tables import markdown_table
from bench import benchmarks as B
from bench.timing import load_average, machine
from sharp.data import load_digits, load_synthetic
from sharp.errors import SharpError
from sharp.models import build_model
from sharp.runtime import select_device

GHOST_SIZES = (4, 8, 16)  # ghost BN group sizes of bench_ghost_bn

# key -> (comparison, threshold): the targets set for the project's 2-core CPU
TARGETS: dict[str, tuple[str, float]] = {
    "train_speedup_vs_naive.resnet8": (">=", 3.0),
    "accumulation_overhead": ("<=", 0.05),
    "hvp_over_grad": ("<=", 2.5),
    "hessian_top5_speedup_vs_pyhessian": (">=", 5.0),
    "sharpness_seconds_per_iteration": ("<=", 3.0),
    "tracking_fraction.warm.resnet8": ("<=", 0.15),
    "tracking_fraction.warm.fc-tanh": ("<=", 0.15),
    "ensemble_speedup.B2": (">=", 2.0),
    "ensemble_speedup.B8": (">=", 1.3),
    **{f"ghost_bn_auto_over_fastest.g{g}": ("<=", 1.0) for g in GHOST_SIZES},
    **{
        f"hessian_top5_{kind}_vs_{peer}{net}": (">", 1.0)
        for kind in ("speedup", "hvp_ratio")
        for peer in B.TOP_PEERS
        for net in ("", ".mlp")
    },
    "trace_hvps_sharp_over_hutchpp": ("<=", 1.0),
}
BENCHMARKS = (
    "train", "throughput", "accumulation", "hvp", "hessian", "peers", "trace", "memory", "sharpness", "eval",
    "ghost_bn", "tracking", "ensemble", "sam",
)  # fmt: skip
THROUGHPUT_BATCHES = (8, 128, 1024)  # training images/s at these batch sizes (bench_throughput)


@dataclass
class Scale:
    """Repetitions and lengths: --quick (< 5 min on 2 CPU cores) or the full run (< 20 min)."""

    name: str
    train_steps: dict[str, int] = field(default_factory=dict)  # timed optimizer steps per repetition
    train_reps: int = 5
    accumulation_steps: int = 2
    accumulation_reps: int = 5
    hvp_reps: int = 7
    hessian_reps: int = 3
    hessian_crosscheck: bool = True
    sharpness_reps: int = 3
    eval_reps: int = 5
    probe_epochs: int = 3
    ghost_bn_reps: int = 7
    tracking_reps: int = 3
    sam_reps: int = 5
    ensemble_steps: dict[int, int] = field(default_factory=lambda: {2: 16, 8: 8, 32: 4})  # per member and rep
    ensemble_reps: int = 5
    throughput_images: int = 4096  # images per repetition of bench_throughput, at every batch size
    throughput_reps: int = 3
    peers_reps: int = 3
    trace_seeds: int = 16  # seeded estimates per budget of bench_trace_peers
    memory_examples: int = 2048  # probe set of bench_probe_memory, in batches of memory_batch
    memory_batch: int = 256


QUICK = Scale(
    "quick",
    train_steps={"resnet8": 4, "resnet32": 2},
    train_reps=3,
    accumulation_steps=1,
    accumulation_reps=5,
    hvp_reps=5,
    hessian_reps=1,
    hessian_crosscheck=False,
    sharpness_reps=1,
    eval_reps=3,
    ghost_bn_reps=3,
    tracking_reps=1,
    sam_reps=2,
    ensemble_steps={2: 8, 8: 4, 32: 2},
    ensemble_reps=3,
    throughput_images=1024,
    throughput_reps=1,
    peers_reps=1,
    trace_seeds=6,
    memory_examples=512,
    memory_batch=128,
)
FULL = Scale("full", train_steps={"resnet8": 10, "resnet32": 4})

N_TRAIN = 8192  # synthetic CIFAR-shaped images (test split: 2048)
PROBE_HVP = (512, 256)  # probe set of hvp_over_grad and sharpness: 512 images in 2 batches of 256
PROBE_HESSIAN = 256  # one batch, as pyhessian takes
TRACK_EVERY = 50  # --track-sharpness K of bench_tracking
# bench_tracking's two settings: ResNet-8 (BN, tracked in train mode) at the training benchmark's
# B = 256 as 2 x 128 with the default 1,000-image tracking set; Cohen et al.'s fc-tanh with the
# squared loss, full-batch GD on 5,000 images as 5 x 1,000, tracking the whole set
TRACKING = {
    "resnet8": dict(batch=256, micro=128, track_set="1000"),
    "fc-tanh": dict(
        batch=5000, micro=1000, train_subset=5000, track_set="full", loss="mse", norm="none", lr=0.01
    ),
}
ENSEMBLE_BATCHES = (2, 8, 32)  # batch sizes of bench_ensemble (K = 8 ResNet-8 runs without BN)
ENSEMBLE_HVP_MEMBERS = 4  # ResNet-8s (BN, eval mode) of bench_ensemble_hvp, probe set PROBE_HESSIAN


def _log(message: str, started: float) -> None:
    print(f"[bench {time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)


def run_suite(scale: Scale, device: torch.device, only: tuple[str, ...] = BENCHMARKS) -> dict[str, Any]:
    """Every selected benchmark; returns {"keys": ..., "details": ...}."""
    started = time.perf_counter()
    torch.manual_seed(0)
    ds = load_synthetic(N_TRAIN)
    keys: dict[str, float] = {}
    details: dict[str, Any] = {}

    def keep(detail: str, r: dict[str, Any], key: str | None = None) -> dict[str, Any]:
        """A benchmark's result `r` as details[detail], its headline r["value"] as keys[key or detail]."""
        keys[key or detail] = r["value"]
        details[detail] = r
        return r

    if "train" in only:
        for model, steps in scale.train_steps.items():
            _log(f"train {model}", started)
            r = B.bench_train(ds, device, model, steps=steps, reps=scale.train_reps)
            keys[f"train_speedup_vs_naive.{model}"] = r["speedup"]
            keys[f"train_images_per_s.sharp.{model}"] = r["sharp_images_per_s"]
            keys[f"train_images_per_s.naive.{model}"] = r["naive_images_per_s"]
            keys[f"train_images_per_s.sharp_default_layout.{model}"] = r["sharp_default_layout_images_per_s"]
            keys[f"train_speedup_vs_naive.{model}.bf16_compiled"] = r["fastest_speedup"]
            keys[f"train_images_per_s.sharp_bf16_compiled.{model}"] = r["fastest_images_per_s"]
            details[f"train.{model}"] = r
    if "throughput" in only:
        _log("training throughput at B = " + "/".join(map(str, THROUGHPUT_BATCHES)), started)
        r = B.bench_throughput(
            ds, device, batches=THROUGHPUT_BATCHES, images=scale.throughput_images, reps=scale.throughput_reps
        )
        for b in THROUGHPUT_BATCHES:
            keys[f"train_images_per_s.b{b}"] = r[f"b{b}"]["images_per_s"]
        details["throughput"] = r
    if "accumulation" in only:
        _log("accumulation", started)
        keep(
            "accumulation",
            B.bench_accumulation(ds, device, steps=scale.accumulation_steps, reps=scale.accumulation_reps),
            "accumulation_overhead",
        )
    model = None
    if any(name in only for name in ("hvp", "hessian", "peers", "sharpness", "eval")):
        _log("training the probed ResNet-8", started)
        model, trained = B.train_probe_model(ds, device, epochs=scale.probe_epochs)
        details["probed_model"] = {
            "model": "resnet8",
            "norm": "bn",
            "trained_with": "sharp.train.train",
            **trained,
        }
    if "hvp" in only:
        _log("hvp_over_grad", started)
        batches = B.probe_batches(ds, device, *PROBE_HVP)
        keep("hvp_over_grad", B.bench_hvp_over_grad(model, batches, device, reps=scale.hvp_reps))
        # the same without BN, to show what eval-mode BN's double backward costs
        torch.manual_seed(0)
        plain = build_model("resnet8", ds.in_channels, ds.num_classes, norm="none").to(device)
        keep("hvp_over_grad.norm_none", B.bench_hvp_over_grad(plain, batches, device, reps=scale.hvp_reps))
    if "hessian" in only:
        _log("hessian top-5 vs pyhessian", started)
        batch = B.probe_batches(ds, device, PROBE_HESSIAN, PROBE_HESSIAN)[0]
        r = keep(
            "hessian_top5",
            B.bench_hessian_top5(
                model, batch, device, reps=scale.hessian_reps, crosscheck=scale.hessian_crosscheck
            ),
            "hessian_top5_speedup_vs_pyhessian",
        )
        keys["hessian_top5_hvps.sharp"] = r["sharp"]["hvps"]
        keys["hessian_top5_hvps.pyhessian"] = r["pyhessian"]["hvps"]
    if "peers" in only:
        _log("hessian top-5 vs hessian-eigenthings and curvlinops (ResNet-8, eigsh reference)", started)
        batch = B.probe_batches(ds, device, PROBE_HESSIAN, PROBE_HESSIAN)[0]
        if "hessian_top5" in details:
            reference = details["hessian_top5"]["reference_eigsh"]
        else:
            reference = B.reference_eigenvalues(model, batch)[0]
        peers = {
            "": B.bench_hessian_peers(model, batch, device, reference, "eigsh tol 1e-8", scale.peers_reps)
        }
        _log("hessian top-5 vs the peers (small MLP, dense reference)", started)
        small, small_batch = B.small_curvature_problem(load_digits(), device)
        dense = sorted(np.linalg.eigvalsh(B.dense_hessian(small, small_batch)).tolist(), reverse=True)[:5]
        peers[".mlp"] = B.bench_hessian_peers(
            small, small_batch, device, dense, "dense eigvalsh", scale.peers_reps
        )
        for net, r in peers.items():
            for peer in B.TOP_PEERS:
                if "skipped" not in r[peer]:
                    keys[f"hessian_top5_speedup_vs_{peer}{net}"] = r[peer]["speedup"]
                    keys[f"hessian_top5_hvp_ratio_vs_{peer}{net}"] = r[peer]["hvp_ratio"]
                    keys[f"hessian_top5_hvps.{peer}{net}"] = r[peer]["hvps"]
            keys[f"hessian_top5_hvps.sharp{net}"] = r["sharp"]["hvps"]
            details[f"hessian_peers{net}"] = r
    if "trace" in only:
        _log("trace vs curvlinops' Hutchinson and Hutch++ (small MLP, dense reference)", started)
        small, small_batch = B.small_curvature_problem(load_digits(), device)
        r = B.bench_trace_peers(small, small_batch, device, seeds=scale.trace_seeds)
        for name in B.TRACE_ESTIMATORS:
            if "skipped" not in r[name]:
                keys[f"trace_hvps.{name}"] = r[name]["hvps"]
        if "skipped" not in r["curvlinops_hutchpp"]:
            keys["trace_hvps_sharp_over_hutchpp"] = (
                r["sharp_hutchpp"]["hvps"] / r["curvlinops_hutchpp"]["hvps"]
            )
        keys["trace_hvps_hutchinson_over_hutchpp.sharp"] = (
            r["sharp_hutchinson"]["hvps"] / r["sharp_hutchpp"]["hvps"]
        )
        details["trace"] = r
    if "memory" in only:
        _log("peak memory of HVPs, graph kept and chunked", started)
        r = B.bench_probe_memory(device, scale.memory_examples, scale.memory_batch)
        keys["probe_memory_mib.kept"] = r["kept"]["peak_mib"]
        keys["probe_memory_mib.chunked"] = r["chunked"]["peak_mib"]
        keys["probe_memory_kept_over_chunked"] = r["kept_over_chunked"]
        details["probe_memory"] = r
    if "sharpness" in only:
        _log("sharpness", started)
        batches = B.probe_batches(ds, device, *PROBE_HVP)
        keep(
            "sharpness",
            B.bench_sharpness(model, batches, device, reps=scale.sharpness_reps),
            "sharpness_seconds_per_iteration",
        )
    if "eval" in only:
        _log("eval", started)
        r = keep("eval", B.bench_eval(ds, device, model, reps=scale.eval_reps), "eval_speedup_vs_naive")
        keys["eval_images_per_s.sharp"] = r["sharp_images_per_s"]
        keys["eval_images_per_s.naive"] = r["naive_images_per_s"]
    if "ghost_bn" in only:
        _log("ghost_bn", started)
        r = B.bench_ghost_bn(device, GHOST_SIZES, reps=scale.ghost_bn_reps)
        for g in GHOST_SIZES:
            keys[f"ghost_bn_auto_over_fastest.g{g}"] = r[f"g{g}"]["auto_over_fastest"]
            keys[f"ghost_bn_batched_speedup_vs_loop.g{g}"] = r[f"g{g}"]["batched_speedup_vs_loop"]
            keys[f"ghost_bn_speedup_vs_previous.g{g}"] = r[f"g{g}"]["speedup_vs_previous"]
        details["ghost_bn"] = r
    if "tracking" in only:
        for model, options in TRACKING.items():
            _log(f"tracking {model}", started)
            r = B.bench_tracking(ds, device, model, every=TRACK_EVERY, reps=scale.tracking_reps, **options)
            for measure in ("fraction", "hvps"):
                for start in ("warm", "cold"):
                    keys[f"tracking_{measure}.{start}.{model}"] = r[f"{start}_{measure}"]
            details[f"tracking.{model}"] = r
    if "ensemble" in only:
        _log("ensemble", started)
        r = B.bench_ensemble(ds, device, ENSEMBLE_BATCHES, scale.ensemble_steps, reps=scale.ensemble_reps)
        for batch in ENSEMBLE_BATCHES:
            keys[f"ensemble_speedup.B{batch}"] = r[f"B{batch}"]["speedup"]
            keys[f"ensemble_vmap_speedup.B{batch}"] = r[f"B{batch}"]["vmap_speedup"]
        details["ensemble"] = r
        _log("ensemble_hvp", started)
        models = [build_model("resnet8", 3, 10).to(device) for _ in range(ENSEMBLE_HVP_MEMBERS)]
        batches = B.probe_batches(ds, device, PROBE_HESSIAN, PROBE_HESSIAN)
        r = B.bench_ensemble_hvp(models, batches, device, reps=scale.ensemble_reps)
        keys["ensemble_hvp_speedup"] = r["speedup"]
        details["ensemble_hvp"] = r
    if "sam" in only:
        _log("sam", started)
        keep("sam", B.bench_sam_step(ds, device, reps=scale.sam_reps), "sam_step_over_plain")
    _log("done", started)
    return {"keys": keys, "details": details, "seconds": time.perf_counter() - started}


def verdict(key: str, value: float) -> tuple[str, str]:
    """(target text, "pass"/"miss"/"") for a key."""
    if key not in TARGETS:
        return "", ""
    op, threshold = TARGETS[key]
    compare = {">=": value >= threshold, ">": value > threshold, "<=": value <= threshold}[op]
    ok = math.isfinite(value) and compare
    return f"{op} {threshold:g}", "pass" if ok else "miss"


def _fmt(value: float) -> str:
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 10):
        return f"{int(value)}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3f}"


def table(report: dict[str, Any]) -> str:
    """The report as Markdown: machine, then one row per key with its target and verdict."""
    m = report["machine"]
    lines = [
        f"- command: `{m['command']}` ({report['scale']})",
        f"- date: {m['date']}; git {m.get('git')}",
        f"- CPU: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable); torch threads {m['threads']}",
        f"- device: {m['device']}" + (f" ({m['gpu']})" if m.get("gpu") else ""),
        f"- torch {m['torch']}, torchvision {m['torchvision']}, pyhessian {m['pyhessian']}, "
        f"python {m['python']}",
        f"- load average (1, 5, 15 min) at start {m['load_average_start']}, at end {m['load_average_end']}",
        f"- wall time {report['seconds']:.0f} s",
        "",
        markdown_table(
            ["key", "value", "target", "result"],
            [[key, _fmt(value), *verdict(key, value)] for key, value in report["keys"].items()],
        ),
    ]
    notes = _notes(report["details"])
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def _notes(details: dict[str, Any]) -> list[str]:
    out = []
    for name, r in details.items():
        if name.startswith("train.") and "layout_share" in r:
            out.append(
                f"- {name}: sharp {r['sharp_images_per_s']:.0f} img/s = channels_last x"
                f"{r['layout_share']:.2f} over sharp's own loop in the default layout "
                f"({r['sharp_default_layout_images_per_s']:.0f} img/s), which is x{r['pipeline_share']:.2f} "
                f"over the tutorial loop ({r['naive_images_per_s']:.0f} img/s, DataLoader num_workers "
                f"{r['settings']['naive_num_workers']}); sharp's fastest settings (bf16 autocast, "
                f"torch.compile {r['fastest_settings']['compile']}): {r['fastest_images_per_s']:.0f} img/s, "
                f"x{r['fastest_speedup']:.2f}"
            )
    if "eval" in details:
        e = details["eval"]
        out.append(
            f"- eval: sharp at batch {e['settings']['sharp_batch']} {e['sharp_images_per_s']:.0f} img/s; "
            f"tutorial loop at batch {e['settings']['naive_batch']} {e['naive_images_per_s']:.0f} img/s; "
            "same loss and accuracy: "
            f"{_same(e['sharp_loss_acc'], e['naive_loss_acc'])}"
        )
    if "hessian_top5" in details:
        h = details["hessian_top5"]
        py, sh = h["pyhessian"], h["sharp"]
        out.append(
            f"- hessian top-5: pyhessian tol {py['tol']:g} maxIter {py['maxIter']}: {py['hvps']} HVPs, "
            f"{py['median_s']:.2f} s, max rel. error {py['max_rel_error']:.1e}; sharp Lanczos tol "
            f"{sh['tol']:g}: {sh['hvps']} HVPs, {sh['median_s']:.2f} s, max rel. error "
            f"{sh['max_rel_error']:.1e} (reference: eigsh, {h['reference_hvps']} HVPs); pyhessian at its "
            f"default tol 1e-3: {py['ladder'][0]['hvps']} HVPs, "
            f"max rel. error {py['ladder'][0]['max_rel_error']:.1e}"
            + ("" if h["accurate"] else "; NOT both within the accuracy asked")
        )
    for net in ("", ".mlp"):
        if f"hessian_peers{net}" not in details:
            continue
        h = details[f"hessian_peers{net}"]
        parts = [
            f"sharp Lanczos tol {h['sharp']['tol']:g}: {h['sharp']['hvps']} HVPs, "
            f"{h['sharp']['median_s']:.2f} s"
        ]
        for peer in B.TOP_PEERS:
            r = h[peer]
            if "skipped" in r:
                parts.append(f"{peer} skipped: {r['skipped']}")
                continue
            setting = next(k for k in r if k in ("max_iter", "eigsh_tol"))
            parts.append(
                f"{peer} {setting} {r[setting]:g}: {r['hvps']} HVPs, {r['median_s']:.2f} s, max rel. error "
                f"{r['max_rel_error']:.1e}" + ("" if r["accurate"] else " (NOT within the accuracy asked)")
            )
        out.append(f"- hessian top-5 vs peers{net} (reference: {h['reference_name']}): " + "; ".join(parts))
    if "trace" in details:
        t = details["trace"]
        parts = [
            f"{name} {r['hvps']} HVPs, {r['median_s'] * 1e3:.0f} ms"
            if "skipped" not in r
            else f"{name} skipped"
            for name, r in t.items()
            if name in B.TRACE_ESTIMATORS
        ]
        a = t["sharp_hutchpp_adaptive"]
        out.append(
            f"- trace to a standard error of {t['target_rel_stderr']:g} x |tr H| "
            f"(dense: {t['dense_trace']:.4g}, "
            f"{t['settings']['n_params']} parameters, {t['settings']['seeds']} seeds per budget): "
            + "; ".join(parts)
            + f"; sharp's adaptive Hutch++: {a['mean_hvps']:.0f} HVPs on average, RMS error "
            f"{a['rel_rms_error']:.2g} against a reported {a['mean_reported_rel_stderr']:.2g}"
        )
    if "probe_memory" in details:
        m = details["probe_memory"]
        out.append(
            f"- probe memory ({m['kept']['measure']}, {m['settings']['n_examples']} images in batches of "
            f"{m['settings']['batch']}, {m['settings']['model']}): "
            f"graph kept {m['kept']['peak_mib']:.0f} MiB, "
            f"chunked {m['chunked']['peak_mib']:.0f} MiB"
        )
    if "throughput" in details:
        r = details["throughput"]
        rates = [f"B = {k[1:]}: {v['images_per_s']:.0f} img/s" for k, v in r.items() if k.startswith("b")]
        out.append("- training throughput (fp32, one micro-batch per step): " + ", ".join(rates))
    if "sharpness" in details:
        s = details["sharpness"]
        out.append(
            f"- sharpness: {s['seconds_per_iteration']:.3f} s per L-BFGS-B iteration, "
            f"{s['seconds_per_grad']:.3f} s per gradient; iterations {s['lbfgs_iterations']}, "
            f"gradient passes {s['grads_per_run']}"
        )
    if "hvp_over_grad" in details:
        s = details["hvp_over_grad"]
        out.append(
            f"- hvp_over_grad: HVP {s['hvp']['median_s']:.3f} s, gradient {s['grad']['median_s']:.3f} s "
            f"over {s['settings']['n_examples']} images"
        )
    if "ghost_bn" in details:
        s = details["ghost_bn"]
        shape = f"{s['settings']['batch']} x {s['settings']['channels']} x {s['settings']['size']}^2"

        def ms(g: int, name: str) -> str:
            return f"{s[f'g{g}'][name]['median_s'] * 1e3:.2f} ms"

        per_size = [
            f"g = {g}: loop {ms(g, 'loop')}, batched {ms(g, 'batched')}, previous {ms(g, 'previous')}, "
            f"auto takes the {s[f'g{g}']['auto_implementation']}, max |diff| from torch's batch norm "
            f"group by group {s[f'g{g}']['max_abs_diff_vs_loop']:.1e}"
            for g in GHOST_SIZES
        ]
        out.append(
            f"- ghost_bn: forward + backward of one layer on {shape} (channels_last); " + "; ".join(per_size)
        )
    for name, r in details.items():
        if name.startswith("tracking."):
            s = r["settings"]
            out.append(
                f"- {name}: {s['every']} steps of B = {s['batch']} (micro {s['micro_batch']}) take "
                f"{r['train']['median_s']:.2f} s; a tracked point on {s['track_set']} images "
                f"{r['warm']['median_s']:.2f} s warm ({r['warm_hvps']:.0f} HVPs), "
                f"{r['cold']['median_s']:.2f} s cold ({r['cold_hvps']:.0f} HVPs); "
                f"lambda_max warm vs cold within "
                f"{r['max_rel_diff_warm_cold']:.1e}"
            )
    if "ensemble" in details:
        s = details["ensemble"]
        per_batch = [
            f"B = {b}: sequential {s[f'B{b}']['sequential_images_per_s']:.0f} img/s, ensemble "
            f"{s[f'B{b}']['ensemble_images_per_s']:.0f}, vmap {s[f'B{b}']['vmap_images_per_s']:.0f}"
            for b in ENSEMBLE_BATCHES
            if f"B{b}" in s
        ]
        out.append(
            f"- ensemble: K = {s['settings']['members']} ResNet-8 runs without BN; " + "; ".join(per_batch)
        )
    if "ensemble_hvp" in details:
        s = details["ensemble_hvp"]
        out.append(
            f"- ensemble_hvp: {s['settings']['members']} ResNet-8 HVPs over {s['settings']['n_examples']} "
            f"images: one after another {s['sequential']['median_s']:.3f} s, stacked "
            f"{s['stacked']['median_s']:.3f} s; max relative difference {s['max_rel_diff']:.1e}"
        )
    return out


def _same(a: list[float], b: list[float]) -> bool:
    return all(math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-6) for x, y in zip(a, b, strict=True))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="fewer repetitions: under 5 minutes on 2 CPU cores"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)"
    )
    parser.add_argument(
        "--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {','.join(BENCHMARKS)}"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = [s for s in only if s not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"--only: unknown benchmark(s) {unknown}; choose from {','.join(BENCHMARKS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = select_device(args.device)
    except SharpError as exc:
        raise SystemExit(f"bench: {exc}") from None
    scale = QUICK if args.quick else FULL
    info = machine(device)
    suite = run_suite(scale, device, only)
    info["load_average_end"] = load_average()
    report = {
        "scale": "--quick" if args.quick else "full",
        "machine": info,
        "settings": asdict(scale),
        "targets": {k: f"{op} {t:g}" for k, (op, t) in TARGETS.items()},
        "pass": {k: verdict(k, v)[1] == "pass" for k, v in suite["keys"].items() if k in TARGETS},
        **suite,
    }
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


if __name__ == "__main__":
    main()
