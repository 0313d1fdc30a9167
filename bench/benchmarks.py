"""The benchmarks: sharp against its named baseline, side by side in one process.

Each `bench_*` function takes its data, model and sizes as arguments (so a test can run it
at toy size) and returns a dict: the headline number(s) under `value` (or named fields) and
everything needed to judge it (timings, counts, settings) alongside.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import json
import math
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.timing import median, side_by_side, spread, timed
from sharp.config import TrainConfig
from sharp.data import Dataset, DeviceLoader
from sharp.ensemble import Stack, stacked_step
from sharp.models import GhostBatchNorm2d, build_model
from sharp.probes.common import Batch, ProbeModel
from sharp.probes.hessian import HessianOperator, hessian_top_eigenvalues, hessian_trace
from sharp.probes.sharpness import epsilon_sharpness
from sharp.train import EVAL_BATCH, Training, build, evaluate, train, train_step

BASE_LR = 0.02  # any stable rate: speed does not depend on it, but a diverged run would stop the timing
MOMENTUM = 0.9


# --- the tutorial baseline: torchvision-style Dataset, per-sample transforms, DataLoader ----


class TutorialDataset(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does: a uint8 HWC array, one PIL image per sample,
    then the per-sample `transform` (ToTensor, RandomCrop, ... run in the DataLoader workers)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Any) -> None:
        self.data = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        image = Image.fromarray(self.data[index])
        return self.transform(image), self.targets[index]


def tutorial_transforms(mean: tuple[float, ...], std: tuple[float, ...], augment: bool) -> Any:
    from torchvision import transforms as T

    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def tutorial_loader(
    images: torch.Tensor,
    labels: torch.Tensor,
    ds: Dataset,
    batch_size: int,
    augment: bool,
    num_workers: int,
    shuffle: bool,
) -> torch.utils.data.DataLoader:
    dataset = TutorialDataset(images, labels, tutorial_transforms(ds.mean, ds.std, augment))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        # kept alive between repetitions so no timing pays for starting worker processes
        persistent_workers=num_workers > 0,
        drop_last=shuffle,
    )


# --- sharp's training path ------------------------------------------------------------------


def make_trainer(
    ds: Dataset,
    device: torch.device,
    model: str,
    batch: int,
    micro: int,
    norm: str = "bn",
    width: float = 1.0,
    augment: bool = True,
    channels_last: bool | None = None,
    precision: str = "fp32",
    compile: bool = False,
    seed: int = 0,
    momentum: float = MOMENTUM,
    sam_rho: float = 0.0,
) -> Training:
    """sharp's own training setup (device-resident uint8 data, batched augmentation on the
    device, channels_last, exact accumulation), as `sharp train` builds it; it writes nothing."""
    cfg = TrainConfig(
        dataset="synthetic",
        model=model,
        width=width,
        norm=norm,
        batch_size=batch,
        micro_batch=micro,
        augment=augment,
        lr=BASE_LR,
        momentum=momentum,
        seed=seed,
        eval_train_size=min(256, len(ds.train_labels)),
        device=str(device),
        channels_last=channels_last,
        precision=precision,
        compile=compile,
        sam_rho=sam_rho,
    )
    cfg.validate()
    return build(cfg, dataset=ds)


def trainer_windows(trainer: Training, batch: int, micro: int) -> Iterator[Any]:
    """The optimizer steps' windows, epoch after epoch, as the training loop takes them."""
    epoch = 0
    while True:
        yield from trainer.train_loader.windows(epoch, batch, micro)
        epoch += 1


def sharp_steps(trainer: Training, windows: Iterator[Any], steps: int) -> None:
    """`steps` calls of the training loop's own step function (no host sync inside a step; the
    timing harness synchronizes CUDA around each timed run)."""
    for _ in range(steps):
        train_step(trainer, next(windows), BASE_LR)


# --- benchmarks ---------------------------------------------------------------------------------


def bench_train(
    ds: Dataset,
    device: torch.device,
    model: str = "resnet8",
    steps: int = 10,
    reps: int = 5,
    warmup: int = 1,
    batch: int = 256,
    micro: int = 128,
    num_workers: int = 2,
    width: float = 1.0,
    decompose: bool = True,
    fastest: bool = True,
) -> dict[str, Any]:
    """Training images/s: sharp's Trainer against the tutorial loop (torchvision Dataset of
    PIL images, per-sample RandomCrop/RandomHorizontalFlip/ToTensor/Normalize, DataLoader,
    default memory layout, loss / accum_steps accumulation, the loss read once per optimizer
    step), same model, batch and data.

    With `decompose`, a third side is timed too: sharp's Trainer in the default memory layout,
    which splits the speedup into the layout's share and the data pipeline's share. With
    `fastest`, sharp's fastest settings are timed too: bf16 autocast (AMX on recent Xeons,
    tensor cores on GPUs) and torch.compile where the compiler works (compiled in warm-up)."""
    accum = batch // micro
    if accum * micro != batch:
        raise ValueError("batch must be a multiple of micro")
    trainer = make_trainer(ds, device, model, batch, micro, width=width)
    windows = trainer_windows(trainer, batch, micro)
    runs = {"sharp": lambda: sharp_steps(trainer, windows, steps)}
    setup = {"sharp": lambda: sharp_steps(trainer, windows, 1)}
    if decompose:
        plain = make_trainer(ds, device, model, batch, micro, width=width, channels_last=False)
        plain_windows = trainer_windows(plain, batch, micro)
        runs["sharp_default_layout"] = lambda: sharp_steps(plain, plain_windows, steps)
        setup["sharp_default_layout"] = lambda: sharp_steps(plain, plain_windows, 1)

    compiled = False
    if fastest:
        compiled = compiler_works()
        fast = make_trainer(ds, device, model, batch, micro, width=width, precision="bf16", compile=compiled)
        fast_windows = trainer_windows(fast, batch, micro)
        runs["sharp_fastest"] = lambda: sharp_steps(fast, fast_windows, steps)
        setup["sharp_fastest"] = lambda: sharp_steps(fast, fast_windows, 1)

    torch.manual_seed(0)
    naive_model = build_model(model, ds.in_channels, ds.num_classes, ds.image_size, width, "bn").to(device)
    naive_model.train()
    optimizer = torch.optim.SGD(naive_model.parameters(), lr=BASE_LR, momentum=MOMENTUM)
    criterion = nn.CrossEntropyLoss()
    loader = tutorial_loader(
        ds.train_images, ds.train_labels, ds, micro, augment=True, num_workers=num_workers, shuffle=True
    )
    state: dict[str, Any] = {"it": None, "running_loss": 0.0}  # running_loss: what a user's log line prints

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        if state["it"] is None:
            state["it"] = iter(loader)
        try:
            return next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            return next(state["it"])

    def naive_step() -> None:
        step_loss = torch.zeros((), device=device)
        for _ in range(accum):
            inputs, targets = next_batch()
            inputs, targets = inputs.to(device), targets.to(device)
            loss = criterion(naive_model(inputs), targets) / accum
            loss.backward()
            step_loss += loss.detach()  # on the device: no host sync per micro-batch
        optimizer.step()
        optimizer.zero_grad()
        state["running_loss"] += (
            step_loss.item()
        )  # the loss read once per optimizer step, as a careful loop logs it

    # Start the worker processes now: forking makes the parent's memory copy-on-write, and the
    # first run after the fork (of either side: one process) pays the page copies. Warm-up absorbs it.
    state["it"] = iter(loader)
    next_batch()

    def naive_setup() -> None:
        state["it"] = iter(loader)  # a fresh epoch iterator, then one untimed step to fill the pipeline
        naive_step()

    runs["naive"] = lambda: [naive_step() for _ in range(steps)]
    setup["naive"] = naive_setup
    try:
        times = side_by_side(runs, device, reps=reps, warmup=warmup, setup=setup)
    finally:
        state["it"] = None  # the loader and its persistent workers go when this function returns
    images = steps * batch
    rates = {name: images / median(values) for name, values in times.items()}
    sharp_rate, naive_rate = rates["sharp"], rates["naive"]
    extra: dict[str, Any] = {}
    if decompose:
        plain_rate = rates["sharp_default_layout"]
        extra = {
            "sharp_default_layout_images_per_s": plain_rate,
            "layout_share": sharp_rate / plain_rate,  # channels_last over default layout, same loop
            "pipeline_share": plain_rate / naive_rate,  # sharp's loop over the tutorial's, same layout
            "sharp_default_layout": spread(times["sharp_default_layout"]),
        }
    if fastest:
        extra.update(
            {
                "fastest_images_per_s": rates["sharp_fastest"],
                "fastest_speedup": rates["sharp_fastest"] / naive_rate,
                "fastest_settings": {"precision": "bf16", "compile": compiled, "channels_last": True},
                "sharp_fastest": spread(times["sharp_fastest"]),
            }
        )
    return {
        "speedup": sharp_rate / naive_rate,
        "sharp_images_per_s": sharp_rate,
        "naive_images_per_s": naive_rate,
        **extra,
        "settings": {
            "model": model,
            "width": width,
            "batch": batch,
            "micro_batch": micro,
            "accumulation_steps": accum,
            "timed_steps_per_rep": steps,
            "reps": reps,
            "warmup_rounds": warmup,
            "naive_num_workers": num_workers,
            "naive_persistent_workers": num_workers > 0,
            "n_train": len(ds.train_labels),
            "sharp_channels_last": trainer.channels_last,
            "sharp_augment": trainer.train_loader.augment,
        },
        "sharp": spread(times["sharp"]),
        "naive": spread(times["naive"]),
    }


def compiler_works() -> bool:
    """Whether torch.compile runs here (it needs a C++ toolchain on CPU)."""
    import torch._dynamo

    try:
        torch.compile(nn.Linear(2, 2))(torch.randn(3, 2))
        return True
    except Exception:  # any failure of the toolchain means "not here"
        return False
    finally:
        torch._dynamo.reset()


def bench_accumulation(
    ds: Dataset,
    device: torch.device,
    steps: int = 2,
    reps: int = 5,
    warmup: int = 1,
    batch: int = 1024,
    micro: int = 128,
    model: str = "resnet8",
    width: float = 1.0,
) -> dict[str, Any]:
    """Time per example of B as B/micro micro-batches over B as one batch, minus 1 (no BN, so
    both compute the same gradient)."""
    split = make_trainer(ds, device, model, batch, micro, norm="none", width=width)
    whole = make_trainer(ds, device, model, batch, batch, norm="none", width=width)
    split_windows = trainer_windows(split, batch, micro)
    whole_windows = trainer_windows(whole, batch, batch)
    times = side_by_side(
        {
            "accumulated": lambda: sharp_steps(split, split_windows, steps),
            "one_batch": lambda: sharp_steps(whole, whole_windows, steps),
        },
        device,
        reps=reps,
        warmup=warmup,
    )
    return {
        "value": median(times["accumulated"]) / median(times["one_batch"]) - 1,
        "settings": {
            "model": model,
            "norm": "none",
            "width": width,
            "batch": batch,
            "micro_batch": micro,
            "accumulation_steps": batch // micro,
            "timed_steps_per_rep": steps,
            "reps": reps,
        },
        "accumulated": spread(times["accumulated"]),
        "one_batch": spread(times["one_batch"]),
        "images_per_s_accumulated": steps * batch / median(times["accumulated"]),
        "images_per_s_one_batch": steps * batch / median(times["one_batch"]),
    }


def bench_throughput(
    ds: Dataset,
    device: torch.device,
    model: str = "resnet8",
    batches: tuple[int, ...] = (8, 128, 1024),
    images: int = 2048,
    reps: int = 3,
    warmup: int = 1,
) -> dict[str, Any]:
    """Training images/s of sharp's Trainer (fp32, channels_last, BN, each batch one micro-batch)
    at each batch size B, timed side by side: max(1, images // B) optimizer steps per repetition,
    so small batches show their per-step overhead (kernel launches on a GPU, Python on a CPU)."""
    trainers = {b: make_trainer(ds, device, model, b, b) for b in batches}
    windows = {b: trainer_windows(t, b, b) for b, t in trainers.items()}
    steps = {b: max(1, images // b) for b in batches}
    runs = {f"b{b}": functools.partial(sharp_steps, trainers[b], windows[b], steps[b]) for b in batches}
    times = side_by_side(runs, device, reps=reps, warmup=warmup)
    return {
        **{
            f"b{b}": {
                "images_per_s": steps[b] * b / median(times[f"b{b}"]),
                "steps_per_rep": steps[b],
                **spread(times[f"b{b}"]),
            }
            for b in batches
        },
        "settings": {
            "model": model,
            "precision": "fp32",
            "channels_last": trainers[batches[0]].channels_last,
            "micro_batch": "= batch",
            "reps": reps,
        },
    }


def bench_hvp_over_grad(
    model: nn.Module, batches: list[Batch], device: torch.device, reps: int = 5, warmup: int = 1
) -> dict[str, Any]:
    """One HVP (HessianOperator.matvec, gradient graph kept) over one gradient
    (ProbeModel.loss_and_grad), same probe set, eval-mode BN."""
    probe = ProbeModel(model, batches)
    op = HessianOperator(probe, keep_graph=True)
    v = torch.randn(op.n, generator=torch.Generator().manual_seed(0)).to(device=op.device, dtype=op.dtype)
    times = side_by_side({"grad": probe.loss_and_grad, "hvp": lambda: op.matvec(v)}, device, reps, warmup)
    return {
        "value": median(times["hvp"]) / median(times["grad"]),
        "settings": {"n_examples": probe.n_examples, "batches": len(batches), "n_params": op.n, "reps": reps},
        "grad": spread(times["grad"]),
        "hvp": spread(times["hvp"]),
    }


@contextlib.contextmanager
def counting_pyhessian_hvps() -> Iterator[list[int]]:
    """Count pyhessian's Hessian-vector products (one per power iteration) by wrapping the
    function its `hessian` class calls."""
    import pyhessian  # noqa: F401  (registers the module)

    module = sys.modules["pyhessian.hessian"]
    original = module.hessian_vector_product
    count = [0]

    def counted(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return original(*args, **kwargs)

    module.hessian_vector_product = counted
    try:
        yield count
    finally:
        module.hessian_vector_product = original


def run_pyhessian(
    model: nn.Module, batch: Batch, device: torch.device, tol: float, max_iter: int, seed: int, top_n: int = 5
) -> tuple[float, list[float]]:
    """Wall time and top eigenvalues (descending) of pyhessian's deflated power iteration on
    a copy of `model` (pyhessian leaves the gradient graph in the model's `.grad`)."""
    from pyhessian import hessian

    work = copy.deepcopy(model)
    inputs, targets = batch

    def solve() -> list[float]:
        torch.manual_seed(seed)  # pyhessian draws its start vectors from the global generator
        h = hessian(work, nn.CrossEntropyLoss(), data=(inputs, targets), cuda=device.type == "cuda")
        values, _ = h.eigenvalues(maxIter=max_iter, tol=tol, top_n=top_n)
        return values

    seconds, values = timed(solve, device)
    for p in work.parameters():  # break pyhessian's parameter <-> graph cycle
        p.grad = None
    return seconds, sorted((float(v) for v in values), reverse=True)


def run_sharp_top(
    model: nn.Module, batch: Batch, device: torch.device, tol: float, seed: int, k: int = 5
) -> tuple[float, list[float], int]:
    seconds, result = timed(lambda: hessian_top_eigenvalues(model, [batch], k=k, tol=tol, seed=seed), device)
    return seconds, list(result.eigenvalues), int(result.iterations)


def reference_eigenvalues(
    model: nn.Module, batch: Batch, k: int = 5, tol: float = 1e-8
) -> tuple[list[float], int]:
    """The top k eigenvalues by scipy's eigsh (ARPACK, implicitly restarted Lanczos) on
    the HVP operator: independent of both solvers compared."""
    import scipy.sparse.linalg as sla

    op = HessianOperator(ProbeModel(model, [batch]))
    count = [0]

    def matvec(u: np.ndarray) -> np.ndarray:
        count[0] += 1
        v = torch.from_numpy(np.asarray(u, dtype=np.float64).ravel())
        return op.matvec(v).to(device="cpu", dtype=torch.float64).numpy()

    linear = sla.LinearOperator((op.n, op.n), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(op.n)
    values = sla.eigsh(linear, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    return sorted((float(v) for v in values), reverse=True), count[0]


def relative_error(values: list[float], reference: list[float]) -> float:
    if len(values) < len(reference):
        return math.inf
    return max(abs(v - r) / abs(r) for v, r in zip(values, reference, strict=False))


PYHESSIAN_LADDER = ((1e-3, 100), (1e-4, 100), (1e-5, 100), (1e-6, 100), (1e-6, 1000), (1e-7, 1000))
SHARP_LADDER = (1e-3, 1e-4, 1e-5, 1e-6)


def bench_hessian_top5(
    model: nn.Module,
    batch: Batch,
    device: torch.device,
    reps: int = 3,
    accuracy: float = 1e-3,
    k: int = 5,
    seed: int = 0,
    crosscheck: bool = False,
    pyhessian_ladder: tuple[tuple[float, int], ...] = PYHESSIAN_LADDER,
    sharp_ladder: tuple[float, ...] = SHARP_LADDER,
) -> dict[str, Any]:
    """Wall time of pyhessian's top-k over sharp's `hessian_top_eigenvalues`, both at the
    loosest setting of their ladders whose top k are all within `accuracy` (relative) of an
    eigsh reference. The calibration runs are timed too, alternating pyhessian and sharp;
    the accepted settings are then re-run until each has `reps` timings."""
    reference, reference_hvps = reference_eigenvalues(model, batch, k)
    out: dict[str, Any] = {"reference_eigsh": reference, "reference_hvps": reference_hvps}
    if crosscheck:  # sharp's Lanczos taken far past the accuracy asked, against eigsh
        _, tight, tight_hvps = run_sharp_top(model, batch, device, 1e-10, seed, k)
        out["crosscheck_sharp_lanczos_tol1e-10"] = {
            "eigenvalues": tight,
            "hvps": tight_hvps,
            "max_rel_diff_vs_eigsh": relative_error(tight, reference),
        }
    with counting_pyhessian_hvps() as counter:
        run_pyhessian(model, batch, device, 1e-3, 3, seed, top_n=1)  # warm-up: kernels, allocator
        run_sharp_top(model, batch, device, 1e-3, seed, 1)
        py_trials: list[dict[str, Any]] = []
        sharp_trials: list[dict[str, Any]] = []
        py_ok = sharp_ok = False
        py_i = sharp_i = 0
        while not (py_ok and sharp_ok):
            if not py_ok and py_i < len(pyhessian_ladder):
                tol, max_iter = pyhessian_ladder[py_i]
                counter[0] = 0
                seconds, values = run_pyhessian(model, batch, device, tol, max_iter, seed, k)
                error = relative_error(values, reference)
                py_trials.append(
                    {
                        "tol": tol,
                        "maxIter": max_iter,
                        "seconds": seconds,
                        "hvps": counter[0],
                        "eigenvalues": values,
                        "max_rel_error": error,
                    }
                )
                py_ok = error <= accuracy
                py_i += 1
            if not sharp_ok and sharp_i < len(sharp_ladder):
                tol = sharp_ladder[sharp_i]
                seconds, values, hvps = run_sharp_top(model, batch, device, tol, seed, k)
                error = relative_error(values, reference)
                sharp_trials.append(
                    {
                        "tol": tol,
                        "seconds": seconds,
                        "hvps": hvps,
                        "eigenvalues": values,
                        "max_rel_error": error,
                    }
                )
                sharp_ok = error <= accuracy
                sharp_i += 1
            if (py_ok or py_i >= len(pyhessian_ladder)) and (sharp_ok or sharp_i >= len(sharp_ladder)):
                break
        py_best, sharp_best = py_trials[-1], sharp_trials[-1]
        py_times, sharp_times = [py_best["seconds"]], [sharp_best["seconds"]]
        while len(py_times) < reps:  # more timings of the accepted settings, alternating order
            pair = [
                (
                    "py",
                    lambda: run_pyhessian(model, batch, device, py_best["tol"], py_best["maxIter"], seed, k),
                ),
                ("sharp", lambda: run_sharp_top(model, batch, device, sharp_best["tol"], seed, k)),
            ]
            for name, fn in pair if len(py_times) % 2 else pair[::-1]:
                counter[0] = 0
                result = fn()
                (py_times if name == "py" else sharp_times).append(result[0])
    py_median, sharp_median = median(py_times), median(sharp_times)
    out.update(
        {
            "value": py_median / sharp_median,
            "accurate": bool(py_ok and sharp_ok),
            "accuracy": accuracy,
            "pyhessian": {
                "tol": py_best["tol"],
                "maxIter": py_best["maxIter"],
                "hvps": py_best["hvps"],
                "max_rel_error": py_best["max_rel_error"],
                **spread(py_times),
                "ladder": py_trials,
            },
            "sharp": {
                "tol": sharp_best["tol"],
                "hvps": sharp_best["hvps"],
                "max_rel_error": sharp_best["max_rel_error"],
                **spread(sharp_times),
                "ladder": sharp_trials,
            },
            "settings": {"k": k, "n_examples": len(batch[1]), "seed": seed, "bn_mode": "eval", "reps": reps},
        }
    )
    return out


def bench_sharpness(
    model: nn.Module,
    batches: list[Batch],
    device: torch.device,
    reps: int = 3,
    eps: float = 1e-3,
    maxiter: int = 10,
) -> dict[str, Any]:
    """Seconds per L-BFGS-B iteration of full-space epsilon_sharpness over seconds per
    probe-set gradient (ProbeModel.loss_and_grad), interleaved."""
    probe = ProbeModel(model, batches)
    for _ in range(2):  # warm-up: the same forward/backward kernels the sharpness run uses
        timed(probe.loss_and_grad, device)
    results: list[Any] = []

    def sharpness() -> None:
        results.append(epsilon_sharpness(model, batches, eps=eps, maxiter=maxiter))

    times = side_by_side({"sharpness": sharpness, "grad": probe.loss_and_grad}, device, reps, warmup=0)
    per_iteration = [t / max(r.lbfgs_iterations, 1) for t, r in zip(times["sharpness"], results, strict=True)]
    grad = median(times["grad"])
    return {
        "value": median(per_iteration) / grad,
        "seconds_per_iteration": median(per_iteration),
        "seconds_per_grad": grad,
        "lbfgs_iterations": [r.lbfgs_iterations for r in results],
        "grads_per_run": [r.evaluations.get("grad", 0) for r in results],
        "start": [r.start for r in results],
        "sharpness_percent": [r.sharpness for r in results],
        "sharpness_total": spread(times["sharpness"]),
        "grad": spread(times["grad"]),
        "settings": {"eps": eps, "maxiter": maxiter, "subspace_dim": None, "n_examples": probe.n_examples},
    }


def bench_eval(
    ds: Dataset,
    device: torch.device,
    model: nn.Module,
    reps: int = 5,
    warmup: int = 2,
    naive_batch: int = 256,
    num_workers: int = 2,
) -> dict[str, Any]:
    """Test-set evaluation images/s: DeviceLoader.batches + sharp.train.evaluate (channels_last,
    the trainer's evaluation batch for the device) against a DataLoader loop (ToTensor +
    Normalize per sample, default layout, model.eval(), no_grad)."""
    sharp_batch = EVAL_BATCH.get(device.type, 256)
    sharp_model = copy.deepcopy(model).to(device=device, memory_format=torch.channels_last)
    test = DeviceLoader(ds.test_images, ds.test_labels, ds.mean, ds.std, device=device, channels_last=True)
    naive_model = copy.deepcopy(model).to(device=device, memory_format=torch.contiguous_format)
    loader = tutorial_loader(
        ds.test_images, ds.test_labels, ds, naive_batch, augment=False, num_workers=num_workers, shuffle=False
    )
    criterion = nn.CrossEntropyLoss(reduction="sum")

    def naive() -> tuple[float, float]:
        naive_model.eval()
        loss_sum, correct, total = 0.0, 0, 0
        with torch.no_grad():
            for inputs, targets in loader:
                inputs, targets = inputs.to(device), targets.to(device)
                outputs = naive_model(inputs)
                loss_sum += criterion(outputs, targets).item()
                correct += (outputs.argmax(1) == targets).sum().item()
                total += len(targets)
        return loss_sum / total, correct / total

    next(iter(loader))  # start the persistent workers (fork) before any warm-up; see bench_train
    results: dict[str, Any] = {}

    def sharp_eval() -> None:
        results["sharp"] = evaluate(sharp_model, test.batches(sharp_batch))

    def naive_eval() -> None:
        results["naive"] = naive()

    times = side_by_side({"sharp": sharp_eval, "naive": naive_eval}, device, reps, warmup)
    n = len(ds.test_labels)
    sharp_rate, naive_rate = n / median(times["sharp"]), n / median(times["naive"])
    return {
        "value": sharp_rate / naive_rate,
        "sharp_images_per_s": sharp_rate,
        "naive_images_per_s": naive_rate,
        "sharp_loss_acc": list(results["sharp"]),
        "naive_loss_acc": list(results["naive"]),
        "settings": {
            "n_test": n,
            "sharp_batch": sharp_batch,
            "naive_batch": naive_batch,
            "naive_num_workers": num_workers,
            "naive_persistent_workers": num_workers > 0,
            "reps": reps,
        },
        "sharp": spread(times["sharp"]),
        "naive": spread(times["naive"]),
    }


def train_probe_model(
    ds: Dataset, device: torch.device, epochs: int = 3, subset: int = 2048
) -> tuple[nn.Module, dict[str, Any]]:
    """A ResNet-8 (BN) trained for a few epochs with sharp's `train` on the synthetic data,
    returned in the default memory layout, in a temporary run directory that is deleted."""
    cfg = TrainConfig(
        dataset="synthetic",
        model="resnet8",
        batch_size=128,
        epochs=epochs,
        lr=0.05,
        momentum=MOMENTUM,
        augment=False,
        train_subset=min(subset, len(ds.train_labels)),
        eval_train_size=512,
        eval_every=float(epochs),
        device=str(device),
    )
    cfg.validate()
    with tempfile.TemporaryDirectory(prefix="sharp-bench-") as tmp:
        run = Path(tmp) / "run"
        last = train(cfg, run, dataset=ds, progress_bar=False)
        state = torch.load(run / "final.pt", map_location=device, weights_only=True)
    model = build_model("resnet8", ds.in_channels, ds.num_classes, ds.image_size).to(device)
    model.load_state_dict(state)
    return model, {
        k: last.get(k) for k in ("epoch", "test_loss", "test_acc", "eval_train_loss", "eval_train_acc")
    }


def probe_batches(ds: Dataset, device: torch.device, n: int, batch: int) -> list[Batch]:
    """The first n test images, normalized, default layout, in batches of `batch`."""
    loader = DeviceLoader(ds.test_images[:n], ds.test_labels[:n], ds.mean, ds.std, device=device)
    return list(loader.batches(batch))


# --- ghost batch norm: one batched normalization against the previous code and a group loop ---


def previous_ghost_forward(layer: nn.Module, x: torch.Tensor, g: int) -> torch.Tensor:
    """Ghost BN's training forward as sharp computed it before it was batched into one reduction
    (kept as the baseline of `bench_ghost_bn` and as a reference in tests/test_ghost_bn.py):
    the full groups as one view and the short last group, each through mean, var, normalize,
    then the outputs concatenated and the affine applied."""
    n = x.shape[0]
    dims = [0, *range(2, x.dim())]
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    full = (n // g) * g
    outputs, means, variances = [], [], []
    pieces = [x[:full].reshape(n // g, g, *x.shape[1:])] if full else []
    if full < n:
        pieces.append(x[full:].unsqueeze(0))
    for piece in pieces:
        piece = piece.to(work)
        reduce = [d + 1 for d in dims]
        mean = piece.mean(dim=reduce, keepdim=True)
        var = piece.var(dim=reduce, unbiased=False, keepdim=True)
        outputs.append(((piece - mean) * torch.rsqrt(var + layer.eps)).flatten(0, 1))
        count = piece[0].numel() // piece.shape[2]
        means.append(mean.flatten(1))
        variances.append(var.flatten(1) * (count / max(count - 1, 1)))
    y = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    if layer.affine:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = y * layer.weight.view(shape) + layer.bias.view(shape)
    y = y.to(x.dtype)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        y = y.contiguous(memory_format=torch.channels_last)
    if layer.track_running_stats:
        layer._update_running_stats(torch.cat(means), torch.cat(variances))
    return y


def ghost_bn_loop(layer: nn.Module, x: torch.Tensor, g: int) -> torch.Tensor:
    """Ghost BN by its definition (Hoffer et al. 2017): torch's batch norm applied to each group
    of g examples in turn, each group updating the running statistics once (half-precision
    input in float32, as sharp's layer computes it). The reference that tests/test_ghost_bn.py
    and `bench_ghost_bn` compare both of sharp's implementations with."""
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    outputs = []
    for chunk in x.split(g):
        out = F.batch_norm(
            chunk.to(work),
            layer.running_mean,
            layer.running_var,
            layer.weight,
            layer.bias,
            training=True,
            momentum=layer.momentum,
            eps=layer.eps,
        )
        outputs.append(out.to(x.dtype))
        if layer.num_batches_tracked is not None:
            layer.num_batches_tracked.add_(1)
    y = torch.cat(outputs)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        y = y.contiguous(memory_format=torch.channels_last)
    return y


def bench_ghost_bn(
    device: torch.device,
    ghost_sizes: tuple[int, ...] = (4, 8, 16),
    batch: int = 128,
    channels: int = 16,
    size: int = 32,
    reps: int = 5,
    warmup: int = 1,
) -> dict[str, Any]:
    """Forward and backward of one ghost BN layer in training mode (channels_last input of
    ResNet-8's first stage: micro-batch 128, 16 channels, 32 x 32) at each ghost size: sharp's
    two implementations ("loop": torch's batch norm group by group; "batched": one fused
    group-norm call) and `previous_ghost_forward`, side by side. Reports which one
    `implementation="auto"` takes on this device, the batched one's speedup over the loop, the
    auto choice's time over the faster one's (1 when the rule picks the faster), its speedup
    over the previous code, and the largest difference of output and input gradient from
    `ghost_bn_loop` (computed once, untimed)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=gen).to(device, memory_format=torch.channels_last)
    grad_out = torch.randn(x.shape, generator=gen).to(device, memory_format=torch.channels_last)
    results: dict[str, Any] = {"settings": {"batch": batch, "channels": channels, "size": size, "reps": reps}}
    for g in ghost_sizes:
        results[f"g{g}"] = _ghost_bn_side_by_side(x.requires_grad_(True), grad_out, g, device, reps, warmup)
    return results


def _ghost_bn_side_by_side(
    x: torch.Tensor, grad_out: torch.Tensor, g: int, device: torch.device, reps: int, warmup: int
) -> dict[str, Any]:
    layers = {name: GhostBatchNorm2d(x.shape[1], ghost_batch=g).to(device) for name in ("loop", "batched")}
    for name, layer in layers.items():
        layer.implementation = name
    previous = GhostBatchNorm2d(x.shape[1], ghost_batch=g).to(device)
    forwards = {
        "loop": lambda: layers["loop"](x),
        "batched": lambda: layers["batched"](x),
        "previous": lambda: previous_ghost_forward(previous, x, g),
    }
    outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward_backward(name: str) -> None:
        y = forwards[name]()
        outputs[name] = (y.detach(), torch.autograd.grad(y, x, grad_out)[0])

    times = side_by_side(
        {name: functools.partial(forward_backward, name) for name in forwards}, device, reps, warmup
    )
    reference = GhostBatchNorm2d(x.shape[1], ghost_batch=g).to(device)
    y = ghost_bn_loop(reference, x, g)
    expected = (y.detach(), torch.autograd.grad(y, x, grad_out)[0])
    auto = GhostBatchNorm2d(x.shape[1], ghost_batch=g)._ghost_implementation(x, g)
    medians = {name: median(t) for name, t in times.items()}
    return {
        "auto_implementation": auto,
        "batched_speedup_vs_loop": medians["loop"] / medians["batched"],
        "auto_over_fastest": medians[auto] / min(medians["loop"], medians["batched"]),
        "speedup_vs_previous": medians["previous"] / medians[auto],
        "max_abs_diff_vs_loop": max(
            float((a - b).abs().max())
            for name in ("loop", "batched")
            for a, b in zip(outputs[name], expected, strict=True)
        ),
        **{name: spread(t) for name, t in times.items()},
    }


# --- sharpness tracking ---------------------------------------------------------------------------


def bench_tracking(
    ds: Dataset,
    device: torch.device,
    model: str,
    *,
    batch: int,
    micro: int,
    every: int = 50,
    reps: int = 3,
    train_subset: int | None = None,
    track_set: str = "1000",
    loss: str = "ce",
    norm: str = "bn",
    width: float = 1.0,
    lr: float = BASE_LR,
) -> dict[str, Any]:
    """The cost of `--track-sharpness every` as a fraction of training time: per repetition,
    `every` optimizer steps (timed), then one tracked point at the weights reached, warm-started
    from the eigenvector of the point `every` steps before (as the run does) and, in alternating
    order, a cold start (seeded Gaussian) at the same weights and on the same batch. One untimed
    tracked point first gives the first warm vector."""
    cfg = TrainConfig(
        dataset="synthetic",
        model=model,
        width=width,
        norm=norm,
        loss=loss,
        train_subset=train_subset,
        batch_size=batch,
        micro_batch=micro,
        augment=False,
        lr=lr,
        eval_train_size=min(256, train_subset or len(ds.train_labels)),
        device=str(device),
        track_sharpness=every,
        track_set=track_set,
    )
    cfg.validate()
    trainer = build(cfg, dataset=ds)
    tracker = trainer.tracker
    cold = copy.copy(tracker)
    windows = trainer_windows(trainer, batch, micro)
    window = next(windows)
    tracker.measure(trainer.model, window, 0, lr)  # untimed: the first warm vector
    train_step(trainer, window, lr)
    times: dict[str, list[float]] = {"train": [], "warm": [], "cold": []}
    hvps: dict[str, list[int]] = {"warm": [], "cold": []}
    lambdas: dict[str, list[float]] = {"warm": [], "cold": []}
    for rep in range(reps):
        previous = tracker.vector
        seconds, _ = timed(lambda: sharp_steps(trainer, windows, every - 1), device)
        window = next(windows)
        for name in ("warm", "cold") if rep % 2 == 0 else ("cold", "warm"):
            solver = tracker if name == "warm" else cold
            solver.vector = previous if name == "warm" else None
            measure = functools.partial(solver.measure, trainer.model, window, every * (rep + 1), lr)
            elapsed, row = timed(measure, device)
            times[name].append(elapsed)
            hvps[name].append(row["hvps"])
            lambdas[name].append(row["lambda_max"])
        step_seconds, _ = timed(lambda w=window: train_step(trainer, w, lr), device)
        times["train"].append(seconds + step_seconds)  # the `every` steps between two tracked points
    train_median = median(times["train"])
    return {
        "warm_fraction": median(times["warm"]) / train_median,
        "cold_fraction": median(times["cold"]) / train_median,
        "warm_hvps": float(np.median(hvps["warm"])),
        "cold_hvps": float(np.median(hvps["cold"])),
        "max_rel_diff_warm_cold": max(
            abs(w - c) / abs(c) for w, c in zip(lambdas["warm"], lambdas["cold"], strict=True)
        ),
        "settings": {
            "model": model,
            "norm": norm,
            "width": width,
            "loss": loss,
            "batch": batch,
            "micro_batch": micro,
            "every": every,
            "train_subset": train_subset,
            "track_set": len(tracker.tracking_set),
            "bn_mode": tracker.bn_mode,
            "lanczos_tol": tracker.tol,
            "reps": reps,
        },
        "train": spread(times["train"]),
        "warm": spread(times["warm"]),
        "cold": spread(times["cold"]),
        "hvps": hvps,
        "lambda_max": lambdas,
    }


# --- ensembles: K runs as one against K runs in turn ---------------------------------------------


def vmap_ensemble_step(base: nn.Module, params: dict, buffers: dict, windows: list[Iterator[Any]]) -> None:
    """The torch.func way (stack_module_state + functional_call + vmap) of one step of K runs:
    each run's window side by side on a leading member axis, one vmapped forward, one backward,
    plain SGD on the stacked parameters (the design baseline of `sharp.ensemble`)."""

    def forward(p: dict, b: dict, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(base, (p, b), (x,))

    steps = [next(w) for w in windows]
    for p in params.values():
        p.grad = None
    for batches in zip(*(w.micro_batches() for w in steps), strict=True):
        inputs = torch.stack([x for x, _ in batches])
        targets = torch.stack([y for _, y in batches])
        outputs = torch.vmap(forward)(params, buffers, inputs)
        loss = F.cross_entropy(outputs.flatten(0, 1), targets.flatten(), reduction="sum")
        (loss / steps[0].count).backward()
    with torch.no_grad():
        for p in params.values():
            p.sub_(BASE_LR * p.grad)


def bench_ensemble(
    ds: Dataset,
    device: torch.device,
    batches: tuple[int, ...],
    steps: dict[int, int],
    reps: int,
    members: int = 8,
    model: str = "resnet8",
    width: float = 1.0,
    warmup: int = 1,
) -> dict[str, Any]:
    """K runs of one model (no BN, SGD without momentum, no augmentation: Masters & Luschi's
    ResNet-8) at each batch B, `steps[B]` optimizer steps each, three ways side by side: one
    after another with `train_step` (a sweep without --ensemble), as one ensemble with
    `sharp.ensemble.stacked_step`, and with torch.func's vmap. Speed-up = sequential time over
    ensemble time; each way has its own K freshly built runs (seeds 0..K-1)."""
    out: dict[str, Any] = {
        "settings": {
            "members": members,
            "model": model,
            "width": width,
            "norm": "none",
            "optimizer": "sgd",
            "momentum": 0.0,
            "augment": False,
            "steps": steps,
            "reps": reps,
        }
    }
    for batch in batches:
        runs = [
            [
                make_trainer(
                    ds,
                    device,
                    model,
                    batch,
                    batch,
                    norm="none",
                    width=width,
                    augment=False,
                    seed=s,
                    momentum=0.0,
                )
                for s in range(members)
            ]
            for _ in range(3)
        ]
        out[f"B{batch}"] = _ensemble_side_by_side(runs, device, batch, steps[batch], reps, warmup)
    return out


def _ensemble_side_by_side(
    runs: list[list[Training]], device: torch.device, batch: int, steps: int, reps: int, warmup: int
) -> dict[str, Any]:
    alone, together, vmapped = runs
    windows = {
        name: [trainer_windows(t, batch, batch) for t in ts] for name, ts in zip("atv", runs, strict=True)
    }
    stack = Stack(copy.deepcopy(together[0].model), [t.model for t in together])
    base = copy.deepcopy(vmapped[0].model).to("meta")
    params, buffers = torch.func.stack_module_state([t.model for t in vmapped])

    def sequential() -> None:
        for t, each in zip(alone, windows["a"], strict=True):
            sharp_steps(t, each, steps)

    def ensemble() -> None:
        for _ in range(steps):
            stacked_step(stack, together, [(next(w), BASE_LR, False) for w in windows["t"]])

    def vmap() -> None:
        for _ in range(steps):
            vmap_ensemble_step(base, params, buffers, windows["v"])

    times = side_by_side(
        {"sequential": sequential, "ensemble": ensemble, "vmap": vmap}, device, reps=reps, warmup=warmup
    )
    stack.release()
    images = len(alone) * steps * batch
    medians = {name: median(t) for name, t in times.items()}

    def max_diff(models: list[dict[str, torch.Tensor]]) -> float:  # the same steps, the same weights?
        return max(
            (m[k] - t.model.state_dict()[k]).abs().max().item()
            for m, t in zip(models, alone, strict=True)
            for k in m
        )

    vmapped_states = [{k: v[i] for k, v in params.items()} for i in range(len(vmapped))]
    return {
        **{name: spread(t) for name, t in times.items()},
        "max_abs_diff_vs_sequential": {
            "ensemble": max_diff([t.model.state_dict() for t in together]),
            "vmap": max_diff(vmapped_states),
        },
        "speedup": medians["sequential"] / medians["ensemble"],
        "vmap_speedup": medians["sequential"] / medians["vmap"],
        **{f"{name}_images_per_s": images / m for name, m in medians.items()},
    }


def bench_ensemble_hvp(
    models: list[nn.Module], batches: list[Batch], device: torch.device, reps: int = 5, warmup: int = 1
) -> dict[str, Any]:
    """Would a probe pay batched over K runs' models? One Hessian-vector product of each of K
    models over one probe set (eval-mode BN), through sharp's HessianOperator with the gradient
    graph kept: K times one after another, against once over the K models stacked
    (`sharp.ensemble.Stack`, the probe batches given to every member, loss = the sum of the
    members' losses, whose Hessian is block-diagonal: one block per member). Speed-up =
    sequential time over stacked time; `max_rel_diff` compares the two answers."""
    k = len(models)
    alone = [HessianOperator(ProbeModel(m, batches), keep_graph=True) for m in models]
    stack = Stack(copy.deepcopy(models[0]), [copy.deepcopy(m) for m in models])
    stack.module.eval()

    def summed(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        per_member = outputs.reshape(len(targets), k, -1).flatten(0, 1)
        return k * F.cross_entropy(per_member, targets.repeat_interleave(k))  # sum of the K mean losses

    repeated = [(x.repeat(1, k, *([1] * (x.dim() - 2))), y) for x, y in batches]
    together = HessianOperator(ProbeModel(stack.module, repeated, loss_fn=summed), keep_graph=True)
    sizes = [p.numel() for p in alone[0].params]
    gen = torch.Generator().manual_seed(0)
    vectors = [torch.randn(op.n, generator=gen).to(device=op.device, dtype=op.dtype) for op in alone]
    pieces = [v.split(sizes) for v in vectors]
    stacked = torch.cat(
        [piece[j] for j in range(len(sizes)) for piece in pieces]
    )  # param by param, member by member

    def unstack(flat: torch.Tensor) -> list[torch.Tensor]:
        chunks = flat.split([size for size in sizes for _ in range(k)])
        return [torch.cat([chunks[j * k + i] for j in range(len(sizes))]) for i in range(k)]

    times = side_by_side(
        {
            "sequential": lambda: [op.matvec(v) for op, v in zip(alone, vectors, strict=True)],
            "stacked": lambda: together.matvec(stacked),
        },
        device,
        reps,
        warmup,
    )
    answers = [op.matvec(v) for op, v in zip(alone, vectors, strict=True)]
    diff = max(
        float((a - b).norm() / b.norm())
        for a, b in zip(unstack(together.matvec(stacked)), answers, strict=True)
    )
    return {
        "speedup": median(times["sequential"]) / median(times["stacked"]),
        "max_rel_diff": diff,
        "settings": {
            "members": k,
            "n_examples": alone[0].probe.n_examples,
            "batches": len(batches),
            "reps": reps,
        },
        "sequential": spread(times["sequential"]),
        "stacked": spread(times["stacked"]),
    }


# --- curvature against every peer: hessian-eigenthings, curvlinops (the `bench` extra) ------------

PEER_PACKAGES = {"hessian_eigenthings": "hessian-eigenthings", "curvlinops": "curvlinops-for-pytorch"}


def peer_missing(module: str) -> str | None:
    """None when the peer imports here, else a one-line reason to skip its baseline."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # not installed, or broken by this torch: either way it cannot run
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return f"{PEER_PACKAGES[module]} cannot be imported ({reason}); pip install -e '.[bench]'"
    return None


def _counted(fn: Any) -> tuple[Any, list[int]]:
    """`fn` wrapped to count its calls (one call = one HVP for the matvecs wrapped here)."""
    count = [0]

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return fn(*args, **kwargs)

    return wrapped, count


def run_eigenthings_top(
    model: nn.Module, batch: Batch, device: torch.device, max_iter: int, seed: int, k: int = 5
) -> tuple[float, list[float], int]:
    """hessian-eigenthings 1.0's Lanczos for `max_iter` steps (its default is 2k, 21-42 % off:
    REFERENCE.md), with the settings it needs to be right: the model in eval mode (in train mode
    it normalizes with batch statistics and moves BN's running statistics), which="LA" (its
    default "LM" ranks by magnitude, so a large negative eigenvalue could take a top-k place),
    full reorthogonalization forced on (its default turns it off above 50 steps), one batch (it
    averages batches with equal weight whatever their size)."""
    from hessian_eigenthings import HessianOperator as EigenthingsHessian
    from hessian_eigenthings import lanczos as eigenthings_lanczos
    from hessian_eigenthings import supervised_loss

    work = copy.deepcopy(model).eval()
    op = EigenthingsHessian(work, [batch], supervised_loss(nn.CrossEntropyLoss()))
    op.matvec, count = _counted(op.matvec)

    def solve() -> Any:
        return eigenthings_lanczos(op, k=k, max_iter=max_iter, which="LA", reorthogonalize=True, seed=seed)

    seconds, result = timed(solve, device)
    return seconds, sorted((float(v) for v in result.eigenvalues), reverse=True), count[0]


def curvlinops_hessian(model: nn.Module, batch: Batch) -> Any:
    """curvlinops 3.0's HessianLinearOperator of the mean cross-entropy on one batch, the model
    in eval mode (its jvp(jacrev) HVPs are wrong through batch-statistics BN: REFERENCE.md; eval
    BN is an affine map). check_deterministic=False: its check costs extra passes at build time,
    and the answer is checked against the reference here instead (this favours the baseline)."""
    from curvlinops import HessianLinearOperator

    work = copy.deepcopy(model).eval()
    params = [p for p in work.parameters() if p.requires_grad]
    return HessianLinearOperator(
        work, nn.CrossEntropyLoss(), params, [batch], check_deterministic=False, num_data=len(batch[1])
    )


def run_curvlinops_top(
    model: nn.Module, batch: Batch, device: torch.device, tol: float, seed: int, k: int = 5
) -> tuple[float, list[float], int]:
    """curvlinops' operator through `to_scipy` into scipy's eigsh (which="LA", float64 on the
    scipy side: ARPACK in single precision stalls near 1e-4), seeded start vector, at `tol`
    (eigsh's default 0 means machine precision)."""
    import scipy.sparse.linalg as sla

    count = [0]

    def solve() -> np.ndarray:
        scipy_op = curvlinops_hessian(model, batch).to_scipy(dtype=np.float64)
        matvec, calls = _counted(scipy_op.matvec)
        linear = sla.LinearOperator(scipy_op.shape, matvec=matvec, dtype=np.float64)
        v0 = np.random.default_rng(seed).standard_normal(scipy_op.shape[0])
        values = sla.eigsh(linear, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
        count[0] = calls[0]
        return values

    seconds, values = timed(solve, device)
    return seconds, sorted((float(v) for v in values), reverse=True), count[0]


EIGENTHINGS_LADDER = (10, 15, 20, 25, 30, 40, 50, 60, 80, 100)  # Lanczos steps; its default is 2k = 10
CURVLINOPS_LADDER = (1e-1, 1e-2, 1e-3, 1e-4, 1e-6, 1e-8)  # eigsh tol
TOP_PEERS = {
    "eigenthings": ("hessian_eigenthings", run_eigenthings_top, EIGENTHINGS_LADDER, "max_iter"),
    "curvlinops": ("curvlinops", run_curvlinops_top, CURVLINOPS_LADDER, "eigsh_tol"),
}


def _calibrate(run: Any, ladder: tuple[Any, ...], reference: list[float], accuracy: float) -> list[dict]:
    """Run each setting of the ladder in turn until one's top k are all within `accuracy`
    (relative) of the reference; every trial is recorded (and timed)."""
    trials = []
    for setting in ladder:
        seconds, values, hvps = run(setting)
        error = relative_error(values, reference)
        trials.append(
            {
                "setting": setting,
                "seconds": seconds,
                "hvps": hvps,
                "eigenvalues": values,
                "max_rel_error": error,
            }
        )
        if error <= accuracy:
            break
    return trials


def bench_hessian_peers(
    model: nn.Module,
    batch: Batch,
    device: torch.device,
    reference: list[float],
    reference_name: str,
    reps: int = 1,
    accuracy: float = 1e-3,
    k: int = 5,
    seed: int = 0,
    peers: tuple[str, ...] = tuple(TOP_PEERS),
    ladders: dict[str, tuple[Any, ...]] | None = None,
    warmup: bool = True,
) -> dict[str, Any]:
    """Top-k eigenvalues by sharp's Lanczos against each peer, each at the loosest setting of its
    ladder whose top k are within `accuracy` of `reference` (eigsh to 1e-8 on the ResNet, or the
    dense Hessian's eigenvalues on a small net): HVPs and wall time of each. A peer that does not
    import is skipped with its reason. Calibration runs are timed; `reps` > 1 adds timings of the
    accepted settings, alternating sharp and the peer. `ladders` replaces a peer's ladder (tests
    use one known-good setting); `warmup=False` drops the untimed first runs."""
    sharp_run = functools.partial(run_sharp_top, model, batch, device, seed=seed, k=k)
    if warmup:
        sharp_run(tol=1e-3)  # kernels, allocator
    sharp_trials = _calibrate(lambda tol: sharp_run(tol=tol), SHARP_LADDER, reference, accuracy)
    sharp_best = sharp_trials[-1]
    sharp_times = [sharp_best["seconds"]]
    out: dict[str, Any] = {
        "reference": reference,
        "reference_name": reference_name,
        "accuracy": accuracy,
        "settings": {"k": k, "n_examples": len(batch[1]), "seed": seed, "bn_mode": "eval", "reps": reps},
    }
    for name in peers:
        module, runner, ladder, setting_name = TOP_PEERS[name]
        ladder = (ladders or {}).get(name, ladder)
        missing = peer_missing(module)
        if missing is not None:
            out[name] = {"skipped": missing}
            continue
        peer_run = functools.partial(runner, model, batch, device, seed=seed, k=k)
        if warmup:
            peer_run(ladder[0])
        trials = _calibrate(peer_run, ladder, reference, accuracy)
        best = trials[-1]
        times = [best["seconds"]]
        while len(times) < reps:  # more timings of the accepted settings, alternating the order
            for who in ("peer", "sharp") if len(times) % 2 else ("sharp", "peer"):
                if who == "peer":
                    times.append(peer_run(best["setting"])[0])
                else:
                    sharp_times.append(sharp_run(tol=sharp_best["setting"])[0])
        out[name] = {
            setting_name: best["setting"],
            "hvps": best["hvps"],
            "max_rel_error": best["max_rel_error"],
            "accurate": best["max_rel_error"] <= accuracy,
            **spread(times),
            "ladder": trials,
        }
    sharp_median = median(sharp_times)
    out["sharp"] = {
        "tol": sharp_best["setting"],
        "hvps": sharp_best["hvps"],
        "max_rel_error": sharp_best["max_rel_error"],
        "accurate": sharp_best["max_rel_error"] <= accuracy,
        **spread(sharp_times),
        "ladder": sharp_trials,
    }
    for name in peers:
        if "skipped" not in out[name]:
            out[name]["speedup"] = out[name]["median_s"] / sharp_median  # peer's time over sharp's
            out[name]["hvp_ratio"] = out[name]["hvps"] / sharp_best["hvps"]  # peer's HVPs over sharp's
    return out


def dense_hessian(model: nn.Module, batch: Batch) -> np.ndarray:
    """The Hessian of the mean cross-entropy on one batch, model in eval mode, by double backward
    (never torch.func.hessian: REFERENCE.md), all rows in one `torch.autograd.grad` call over the
    identity's columns (`is_grads_batched`: 9x faster than a call per row, the same numbers)."""
    work = copy.deepcopy(model).eval()
    params = [p for p in work.parameters() if p.requires_grad]
    x, y = batch
    grads = torch.autograd.grad(F.cross_entropy(work(x), y), params, create_graph=True)
    g = torch.cat([t.reshape(-1) for t in grads])
    eye = torch.eye(g.numel(), dtype=g.dtype, device=g.device)
    rows = torch.autograd.grad(g, params, grad_outputs=eye, is_grads_batched=True)
    return torch.cat([r.reshape(g.numel(), -1) for r in rows], dim=1).detach().cpu().double().numpy()


def small_curvature_problem(ds: Dataset, device: torch.device, n: int = 256) -> tuple[nn.Module, Batch]:
    """The small net whose dense Hessian is the trace benchmark's reference: sharp's MLP (width
    0.1: 526 parameters) on the first n digit images, float64, eval-mode BN at its initial
    statistics (an HVP costs ~5 ms on one CPU thread: a convnet in float64 costs 20 times more)."""
    torch.manual_seed(0)
    model = build_model("mlp", ds.in_channels, ds.num_classes, ds.image_size, width=0.1).double().to(device)
    loader = DeviceLoader(
        ds.test_images[:n], ds.test_labels[:n], ds.mean, ds.std, device=device, dtype=torch.float64
    )
    return model.eval(), next(iter(loader.batches(n)))


TRACE_LADDER = (6, 12, 24, 48, 96, 192, 384)  # HVPs per estimate; multiples of 3 for Hutch++


def _sharp_trace(estimator: str) -> Any:
    def run(model: nn.Module, batch: Batch, budget: int, seed: int) -> tuple[float, int]:
        sketch = budget // 3 if estimator == "hutch++" else 0
        result = hessian_trace(
            model,
            [batch],
            tol=1e-12,
            maxiter=budget,
            min_samples=budget - 2 * sketch,
            seed=seed,
            estimator=estimator,
        )
        return result.trace, result.evaluations["hvp"]

    return run


def _curvlinops_trace(estimator: str) -> Any:
    def run(model: nn.Module, batch: Batch, budget: int, seed: int) -> tuple[float, int]:
        from curvlinops import hutchinson_trace, hutchpp_trace

        torch.manual_seed(seed)  # curvlinops draws its vectors from the global generator
        op = curvlinops_hessian(model, batch)
        op._matmat_batch, count = _counted_columns(op._matmat_batch)
        value = (hutchpp_trace if estimator == "hutch++" else hutchinson_trace)(op, budget)
        return float(value), count[0]

    return run


def _counted_columns(fn: Any) -> tuple[Any, list[int]]:
    """curvlinops' per-batch matrix product wrapped to count the vectors it multiplies (its HVPs
    run vmapped over the columns of a matrix)."""
    count = [0]

    def wrapped(x: Any, y: Any, matrix: list[torch.Tensor]) -> Any:
        count[0] += matrix[0].shape[-1]
        return fn(x, y, matrix)

    return wrapped, count


TRACE_ESTIMATORS = {
    "sharp_hutchinson": (None, _sharp_trace("hutchinson")),
    "sharp_hutchpp": (None, _sharp_trace("hutch++")),
    "curvlinops_hutchinson": ("curvlinops", _curvlinops_trace("hutchinson")),
    "curvlinops_hutchpp": ("curvlinops", _curvlinops_trace("hutch++")),
}


def bench_trace_peers(
    model: nn.Module,
    batch: Batch,
    device: torch.device,
    target: float = 2e-2,
    seeds: int = 8,
    ladder: tuple[int, ...] = TRACE_LADDER,
) -> dict[str, Any]:
    """HVPs each trace estimator needs for a standard error of `target` x |tr(H)|, measured: at
    each budget of the ladder, `seeds` seeded estimates against the dense Hessian's trace, and the
    first budget whose root-mean-square error is within the target is each one's answer (with
    the median wall time of one estimate there). sharp's adaptive Hutch++ (`hessian_trace(tol=
    target, estimator="hutch++")`, stopped on its own standard error) is reported beside it:
    its mean HVPs, and its RMS error against its mean reported standard error."""
    exact = float(np.trace(dense_hessian(model, batch)))
    goal = target * abs(exact)
    out: dict[str, Any] = {
        "dense_trace": exact,
        "target_rel_stderr": target,
        "settings": {
            "n_params": sum(p.numel() for p in model.parameters()),
            "n_examples": len(batch[1]),
            "seeds": seeds,
            "ladder": list(ladder),
            "bn_mode": "eval",
            "dtype": "float64",
        },
    }
    for name, (module, run) in TRACE_ESTIMATORS.items():
        missing = peer_missing(module) if module else None
        if missing is not None:
            out[name] = {"skipped": missing}
            continue
        trials = []
        for budget in ladder:
            if budget >= sum(p.numel() for p in model.parameters()):
                break  # curvlinops refuses budgets >= the dimension (the dense trace is then as cheap)
            results = [
                timed(functools.partial(run, model, batch, budget, seed), device) for seed in range(seeds)
            ]
            errors = np.array([value - exact for _, (value, _) in results])
            rms = float(np.sqrt(np.mean(errors**2)))
            trials.append(
                {
                    "budget": budget,
                    "hvps": results[0][1][1],
                    "rms_error": rms,
                    "rel_rms_error": rms / abs(exact),
                    "median_s": median([s for s, _ in results]),
                }
            )
            if rms <= goal:
                break
        best = trials[-1]
        reached = best["rms_error"] <= goal
        out[name] = {
            "hvps": best["hvps"] if reached else math.inf,
            "reached": reached,
            "median_s": best["median_s"] if reached else math.inf,
            "ladder": trials,
        }
    most = ladder[-1]
    residual = most - 2 * (most // 3)
    adaptive = [
        hessian_trace(
            model,
            [batch],
            tol=target,
            maxiter=most,
            min_samples=min(10, residual),
            seed=seed,
            estimator="hutch++",
        )
        for seed in range(seeds)
    ]
    errors = np.array([r.trace - exact for r in adaptive])
    out["sharp_hutchpp_adaptive"] = {
        "mean_hvps": float(np.mean([r.evaluations["hvp"] for r in adaptive])),
        "converged": sum(r.converged for r in adaptive),
        "rel_rms_error": float(np.sqrt(np.mean(errors**2))) / abs(exact),
        "mean_reported_rel_stderr": float(np.mean([r.stderr for r in adaptive])) / abs(exact),
    }
    return out


# --- peak memory of HVPs: the graph of the whole probe set kept, or chunk by chunk -------------


def bench_probe_memory(
    device: torch.device, n_examples: int = 1024, batch: int = 256, model: str = "resnet8", hvps: int = 2
) -> dict[str, Any]:
    """Peak memory of `HessianOperator(keep_graph=True|False)` and `hvps` HVPs on a probe set
    of n_examples synthetic CIFAR-shaped images in batches of `batch` (an untrained ResNet-8 in
    eval mode: memory does not depend on the weights), each measured in a fresh process
    (`python -m bench.probe_memory`): on CPU the growth of the peak resident set
    (ru_maxrss) over its value once model and data are in memory, on CUDA
    torch.cuda.max_memory_allocated over the allocation before the operator is built."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    out: dict[str, Any] = {
        "settings": {"model": model, "n_examples": n_examples, "batch": batch, "hvps": hvps}
    }
    for keep in (True, False):
        command = [
            sys.executable,
            "-m",
            "bench.probe_memory",
            "--device",
            str(device),
            "--model",
            model,
            "--examples",
            str(n_examples),
            "--batch",
            str(batch),
            "--hvps",
            str(hvps),
        ]
        command += ["--keep-graph"] if keep else []
        done = subprocess.run(command, cwd=root, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"bench.probe_memory failed: {done.stderr.strip().splitlines()[-1:]}")
        out["kept" if keep else "chunked"] = json.loads(done.stdout.strip().splitlines()[-1])
    out["kept_over_chunked"] = out["kept"]["peak_mib"] / max(out["chunked"]["peak_mib"], 1e-9)
    return out


# --- SAM: the cost of its second pass ---------------------------------------------------------


def bench_sam_step(
    ds: Dataset,
    device: torch.device,
    model: str = "resnet8",
    batch: int = 128,
    micro: int = 128,
    steps: int = 4,
    reps: int = 5,
    warmup: int = 1,
    width: float = 1.0,
) -> dict[str, Any]:
    """Time of a SAM step (`--sam-rho 0.05`: the window's gradient, the ascent, the gradient at
    w + ε, the base step) over a plain step of the same run, side by side; two passes should
    cost about 2x."""
    plain = make_trainer(ds, device, model, batch, micro, width=width)
    sam = make_trainer(ds, device, model, batch, micro, width=width, sam_rho=0.05)
    windows = {"plain": trainer_windows(plain, batch, micro), "sam": trainer_windows(sam, batch, micro)}
    times = side_by_side(
        {
            "plain": lambda: sharp_steps(plain, windows["plain"], steps),
            "sam": lambda: sharp_steps(sam, windows["sam"], steps),
        },
        device,
        reps=reps,
        warmup=warmup,
    )
    return {
        "value": median(times["sam"]) / median(times["plain"]),
        "settings": {
            "model": model,
            "width": width,
            "batch": batch,
            "micro_batch": micro,
            "steps": steps,
            "reps": reps,
            "sam_rho": 0.05,
        },
        "plain": spread(times["plain"]),
        "sam": spread(times["sam"]),
    }
