"""One peak-memory measurement of Hessian-vector products, in a process of its own (started by
`bench.benchmarks.bench_probe_memory`, one per keep-graph mode, so that neither inherits the
other's high-water mark): prints one JSON line.

python -m bench.probe_memory [--keep-graph] [--examples 1024] [--batch 256] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/probe_memory.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.timing import synchronize
from sharp.data import DeviceLoader, load_synthetic
from sharp.models import build_model
from sharp.probes.common import ProbeModel
from sharp.probes.hessian import HessianOperator


def peak_bytes(device: torch.device) -> int:
    """The process's peak memory so far: resident set on CPU (ru_maxrss is in KiB on Linux),
    allocated tensors on CUDA."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_bytes(device: torch.device) -> int:
    """Memory in use now: resident set on CPU (/proc/self/statm), allocated tensors on CUDA."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(
    device: torch.device, model_name: str, examples: int, batch: int, keep_graph: bool, hvps: int
) -> dict:
    ds = load_synthetic(max(examples, 2))
    torch.manual_seed(0)
    model = build_model(model_name, ds.in_channels, ds.num_classes, ds.image_size).to(device).eval()
    loader = DeviceLoader(
        ds.train_images[:examples], ds.train_labels[:examples], ds.mean, ds.std, device=device
    )
    batches = list(loader.batches(batch))
    probe = ProbeModel(model, batches)
    v = torch.randn(probe.n_params, generator=torch.Generator().manual_seed(0)).to(device)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before, earlier_peak = current_bytes(device), peak_bytes(device)
    start = time.perf_counter()
    op = HessianOperator(probe, keep_graph=keep_graph)
    for _ in range(hvps):
        op.matvec(v)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "keep_graph": keep_graph,
        "peak_mib": (peak_bytes(device) - before) / 2**20,
        "baseline_mib": before / 2**20,
        # on CPU the peak so far may predate the operator (loading): a peak_mib equal to this is a bound only
        "earlier_peak_mib": (earlier_peak - before) / 2**20,
        "measure": "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "ru_maxrss over current RSS",
        "seconds": seconds,
        "hvps": hvps,
        "n_examples": examples,
        "batches": len(batches),
        "n_params": probe.n_params,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.probe_memory", description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="resnet8")
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--hvps", type=int, default=2)
    parser.add_argument("--keep-graph", action="store_true")
    args = parser.parse_args(argv)
    result = measure(
        torch.device(args.device), args.model, args.examples, args.batch, args.keep_graph, args.hvps
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
