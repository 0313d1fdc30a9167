"""The benchmarks: sharp against its named baseline, side by side in one process.

Each `bench_*` function takes its data, model and sizes as arguments (so a test can run it
at toy size) and returns a dict: the headline number(s) under `value` (or named fields) and
everything needed to judge it (timings, counts, settings) alongside.
"""

from __future__ import annotations

import contextlib
import copy
import functools
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
from sharp.models import GhostBatchNorm2d, build_model
from sharp.probes.common import Batch, ProbeModel
from sharp.probes.hessian import HessianOperator, hessian_top_eigenvalues
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
        momentum=MOMENTUM,
        eval_train_size=min(256, len(ds.train_labels)),
        device=str(device),
        channels_last=channels_last,
        precision=precision,
        compile=compile,
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
    default memory layout, loss / accum_steps accumulation), same model, batch and data.

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
    state: dict[str, Any] = {"it": None, "running_loss": 0.0}

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        if state["it"] is None:
            state["it"] = iter(loader)
        try:
            return next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            return next(state["it"])

    def naive_step() -> None:
        for _ in range(accum):
            inputs, targets = next_batch()
            inputs, targets = inputs.to(device), targets.to(device)
            loss = criterion(naive_model(inputs), targets) / accum
            loss.backward()
            state["running_loss"] += loss.item()
        optimizer.step()
        optimizer.zero_grad()

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
