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

import torch

from bench import benchmarks as B
from bench.timing import load_average, machine
from sharp.data import load_synthetic
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
    **{f"ghost_bn_auto_over_fastest.g{g}": ("<=", 1.0) for g in GHOST_SIZES},
}
BENCHMARKS = ("train", "accumulation", "hvp", "hessian", "sharpness", "eval", "ghost_bn")


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
)
FULL = Scale("full", train_steps={"resnet8": 10, "resnet32": 4})

N_TRAIN = 8192  # synthetic CIFAR-shaped images (test split: 2048)
PROBE_HVP = (512, 256)  # probe set of hvp_over_grad and sharpness: 512 images in 2 batches of 256
PROBE_HESSIAN = 256  # one batch, as pyhessian takes


def _log(message: str, started: float) -> None:
    print(f"[bench {time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)


def run_suite(scale: Scale, device: torch.device, only: tuple[str, ...] = BENCHMARKS) -> dict[str, Any]:
    """Every selected benchmark; returns {"keys": ..., "details": ...}."""
    started = time.perf_counter()
    torch.manual_seed(0)
    ds = load_synthetic(N_TRAIN)
    keys: dict[str, float] = {}
    details: dict[str, Any] = {}

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
    if "accumulation" in only:
        _log("accumulation", started)
        r = B.bench_accumulation(ds, device, steps=scale.accumulation_steps, reps=scale.accumulation_reps)
        keys["accumulation_overhead"] = r["value"]
        details["accumulation"] = r
    model = None
    if any(name in only for name in ("hvp", "hessian", "sharpness", "eval")):
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
        r = B.bench_hvp_over_grad(model, batches, device, reps=scale.hvp_reps)
        keys["hvp_over_grad"] = r["value"]
        details["hvp_over_grad"] = r
        # the same without BN, to show what eval-mode BN's double backward costs
        torch.manual_seed(0)
        plain = build_model("resnet8", ds.in_channels, ds.num_classes, norm="none").to(device)
        r = B.bench_hvp_over_grad(plain, batches, device, reps=scale.hvp_reps)
        keys["hvp_over_grad.norm_none"] = r["value"]
        details["hvp_over_grad.norm_none"] = r
    if "hessian" in only:
        _log("hessian top-5 vs pyhessian", started)
        batch = B.probe_batches(ds, device, PROBE_HESSIAN, PROBE_HESSIAN)[0]
        r = B.bench_hessian_top5(
            model, batch, device, reps=scale.hessian_reps, crosscheck=scale.hessian_crosscheck
        )
        keys["hessian_top5_speedup_vs_pyhessian"] = r["value"]
        keys["hessian_top5_hvps.sharp"] = r["sharp"]["hvps"]
        keys["hessian_top5_hvps.pyhessian"] = r["pyhessian"]["hvps"]
        details["hessian_top5"] = r
    if "sharpness" in only:
        _log("sharpness", started)
        batches = B.probe_batches(ds, device, *PROBE_HVP)
        r = B.bench_sharpness(model, batches, device, reps=scale.sharpness_reps)
        keys["sharpness_seconds_per_iteration"] = r["value"]
        details["sharpness"] = r
    if "eval" in only:
        _log("eval", started)
        r = B.bench_eval(ds, device, model, reps=scale.eval_reps)
        keys["eval_speedup_vs_naive"] = r["value"]
        keys["eval_images_per_s.sharp"] = r["sharp_images_per_s"]
        keys["eval_images_per_s.naive"] = r["naive_images_per_s"]
        details["eval"] = r
    if "ghost_bn" in only:
        _log("ghost_bn", started)
        r = B.bench_ghost_bn(device, GHOST_SIZES, reps=scale.ghost_bn_reps)
        for g in GHOST_SIZES:
            keys[f"ghost_bn_auto_over_fastest.g{g}"] = r[f"g{g}"]["auto_over_fastest"]
            keys[f"ghost_bn_batched_speedup_vs_loop.g{g}"] = r[f"g{g}"]["batched_speedup_vs_loop"]
            keys[f"ghost_bn_speedup_vs_previous.g{g}"] = r[f"g{g}"]["speedup_vs_previous"]
        details["ghost_bn"] = r
    _log("done", started)
    return {"keys": keys, "details": details, "seconds": time.perf_counter() - started}


def verdict(key: str, value: float) -> tuple[str, str]:
    """(target text, "pass"/"miss"/"") for a key."""
    if key not in TARGETS:
        return "", ""
    op, threshold = TARGETS[key]
    ok = math.isfinite(value) and (value >= threshold if op == ">=" else value <= threshold)
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
        "| key | value | target | result |",
        "|---|---|---|---|",
    ]
    for key, value in report["keys"].items():
        target, result = verdict(key, value)
        lines.append(f"| {key} | {_fmt(value)} | {target} | {result} |")
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
