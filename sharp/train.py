"""The training loop: exact gradient accumulation, LR rules, evaluation, checkpoints.

It reads top to bottom: `build` makes everything a run trains with from its settings;
`train_step` runs one optimizer step over a window of micro-batches, with no I/O and no
host synchronisation (losses, counts and the divergence flag stay on the device); `fit` is
the loop, which says in plain `if`s when it evaluates, tracks sharpness (`sharp.tracking`),
checkpoints and stops; `train` owns the run directory around it. `fit` (and `run_steps`
around it) hands each optimizer step it needs to its driver, so that `drive` steps one run
with `train_step` and `sharp.ensemble` steps several runs' loops with one stacked step.

Each optimizer step takes a window of B examples from the epoch's permutation and runs it
as micro-batches of b. Every micro-batch contributes its summed loss divided by the number
of examples in the whole window (a short last window included), so the accumulated gradient
is exactly the mean-loss gradient of the window; with BN, each micro-batch (or ghost group
of `bn_batch`) is normalized with its own statistics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import math
import platform
import socket
import sys
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sharp import __version__, runtime
from sharp.checkpoint import Checkpointer, plain_state
from sharp.config import DEFAULT_EPOCHS, TrainConfig, resolved_micro_batch, track_set_size, validate
from sharp.data import (
    Dataset,
    DeviceLoader,
    Window,
    balanced_subset,
    dataset_label,
    epoch_seed,
    evaluation_subset,
    input_normalization,
    load_dataset,
    steps_per_epoch,
)
from sharp.distributed import Distributed
from sharp.errors import RunDiverged, SharpError
from sharp.fileio import atomic_write_json, read_jsonl
from sharp.gradients import flat_grad
from sharp.losses import LossFn, cross_entropy_sum, summed_loss
from sharp.metrics_log import MetricsLog
from sharp.models import build_model, is_conv_net, set_bn_batch, synchronize_bn
from sharp.optim import sam_perturbation, shift
from sharp.probes.noise import OnlineNoiseScale
from sharp.progress import progress_bar
from sharp.runs import RunDir, git_revision, load_checkpoint
from sharp.schedule import LRSchedule, batch_size_at
from sharp.signals import StopRequested, StopSignals
from sharp.tracking import SharpnessTracker, has_batch_norm

EVAL_BATCH = {"cuda": 1024, "cpu": 256}  # no-grad batch: CPU forward throughput falls beyond ~256
BATCH_STATISTICS_EVAL_BATCH = 5000  # Keskar et al. evaluate their batch-statistics BN nets 5,000 at a time
NOISE_SCALE_DECAY = 0.99  # EMA decay per optimizer step of the online B_simple (--noise-scale)
AUTO_AUGMENT_DATASETS = ("cifar10", "cifar100", "folder")
CHECK_EVERY = 16  # optimizer steps between reads of the divergence flag (and, under DDP, the stop flag)
TRACK_SET_SEED_OFFSET = 3  # the tracking set is drawn with data_seed + 3 (eval subset +1, test +2)
# the metrics that differ between identical runs
TIMING_KEYS = ("wall_time", "train_time", "eval_time", "seconds")


# --- the pieces: accumulation, evaluation, optimizer ---------------------------------------


@dataclass
class StepResult:
    """Summed loss and correct predictions of one optimizer step's window (on device)."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    count: int
    stop: torch.Tensor | None = None  # DDP: how many ranks were asked to stop (on device)


def accumulate_gradients(
    model: nn.Module,
    micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    count: int,
    autocast: Any = None,
    after_backward: Callable[[int], None] | None = None,
    loss_sum: LossFn = cross_entropy_sum,
) -> StepResult:
    """Add to `.grad` the gradient of the mean loss over `count` examples.

    Each micro-batch's loss is its *sum* (`loss_sum`, cross-entropy by default) divided by
    `count`, the size of the whole window, never a mean of micro-batch means: with unequal
    micro-batches the two differ. `after_backward(n)` is called after each micro-batch's
    backward with its size (the online noise scale reads `.grad` there).
    """
    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for inputs, targets in micro_batches:
        with autocast or contextlib.nullcontext():
            outputs = model(inputs)
        if outputs.dtype not in (torch.float32, torch.float64):
            outputs = outputs.float()
        loss = loss_sum(outputs, targets)
        (loss / count).backward()
        if after_backward is not None:
            after_backward(len(targets))
        total = total + loss.detach()
        correct = correct + (outputs.detach().argmax(1) == targets).sum()
    return StepResult(total, correct, count)  # zeros if this rank's share of the window was empty


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    autocast: Any = None,
    loss_sum: LossFn = cross_entropy_sum,
) -> tuple[float, float]:
    """Mean loss and accuracy in eval mode (BN running statistics, or each batch's own where a
    BN layer keeps none); the sums stay on the device and are read once at the end."""
    was_training = model.training
    model.eval()
    total = correct = None
    count = 0
    try:
        for inputs, targets in batches:
            with autocast or contextlib.nullcontext():
                outputs = model(inputs)
            outputs = outputs.float() if outputs.dtype not in (torch.float32, torch.float64) else outputs
            batch_loss = loss_sum(outputs, targets).double()
            batch_correct = (outputs.argmax(1) == targets).sum()
            total = batch_loss if total is None else total + batch_loss
            correct = batch_correct if correct is None else correct + batch_correct
            count += len(targets)
    finally:
        model.train(was_training)
    if total is None:
        return 0.0, 0.0
    return float(total) / count, int(correct) / count


def optimizer_options(cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Keyword arguments of the torch optimizer: fused kernels on CUDA (one launch per step)."""
    options: dict[str, Any] = {"weight_decay": cfg.weight_decay}
    if cfg.optimizer == "sgd":
        options["momentum"] = cfg.momentum
    if device.type == "cuda":
        options["fused"] = True
    return options


def make_optimizer(
    cfg: TrainConfig, model: nn.Module, lr: float, device: torch.device | None = None
) -> torch.optim.Optimizer:
    kinds = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    options = optimizer_options(cfg, device or torch.device("cpu"))
    return kinds[cfg.optimizer](model.parameters(), lr=lr, **options)


def total_steps(cfg: TrainConfig, n_train: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    epochs = cfg.epochs if cfg.epochs is not None else DEFAULT_EPOCHS
    return sum(steps_per_epoch(n_train, batch_size_at(cfg, e), cfg.drop_last) for e in range(epochs))


def resolve_augment(cfg: TrainConfig) -> bool:
    if cfg.augment is not None:
        return cfg.augment
    return cfg.dataset.split(":", 1)[0] in AUTO_AUGMENT_DATASETS


def uses_batch_statistics(model: nn.Module) -> bool:
    """Whether a BN layer normalizes with the batch's statistics at evaluation too (no running
    statistics, Keras' BN mode 2): evaluation then depends on the evaluation batch."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats for m in model.modules()
    )


def resolve_eval_batch(cfg: TrainConfig, model: nn.Module, device: torch.device) -> int:
    if cfg.eval_batch is not None:
        return cfg.eval_batch
    if uses_batch_statistics(model):
        return BATCH_STATISTICS_EVAL_BATCH
    return EVAL_BATCH.get(device.type, 256)


def compile_options(cfg: TrainConfig) -> dict[str, Any] | None:
    """torch.compile's arguments (None: eager): dynamic shapes, so that the short last window and
    the evaluation batch do not recompile; with --cuda-graphs, CUDA graphs over fixed shapes."""
    if cfg.cuda_graphs:
        return {"mode": "reduce-overhead", "dynamic": False}
    return {"dynamic": True} if cfg.compile else None


def initial_weights(path: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """The model weights of `--init-from`: a run directory (its final.pt) or a checkpoint file."""
    source = Path(path)
    if source.is_dir():
        source = source / "final.pt"
    if not source.is_file():
        raise SharpError(
            f"--init-from {path}: no such run or checkpoint (give RUN, RUN/final.pt or a .pt file)"
        )
    state = load_checkpoint(source)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    return source, state


# --- building a run -------------------------------------------------------------------------


@dataclass
class Training:
    """Everything one run trains with, made once by `build` from its settings."""

    cfg: TrainConfig
    dist: Distributed
    device: torch.device
    dtype: torch.dtype
    dataset: Dataset
    model: nn.Module  # the module whose state is saved
    forward: nn.Module  # the model, or its compiled form
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    loss_sum: LossFn
    autocast: Any
    train_loader: DeviceLoader
    eval_train: DeviceLoader
    test: DeviceLoader
    total_steps: int
    eval_batch: int
    channels_last: bool
    noise: OnlineNoiseScale | None = None
    tracker: SharpnessTracker | None = None
    init_source: str | None = None
    random_layers: bool = False  # the model draws random numbers in training (dropout)

    @property
    def n_train(self) -> int:
        return len(self.train_loader)


def build(cfg: TrainConfig, dataset: Dataset | None = None, dist: Distributed | None = None) -> Training:
    """Data on the device, model (initialized from `init_seed`, or another run's weights),
    optimizer, schedule and loss of one run."""
    dist = dist or Distributed()
    device = dist.device(runtime.select_device(cfg.device))
    if cfg.cuda_graphs and device.type != "cuda":
        raise SharpError(f"--cuda-graphs needs a CUDA device, and this run's device is {device.type}")
    data = dataset if dataset is not None else load_dataset(cfg.dataset, cfg.data_root, cfg.download)
    if cfg.train_subset and cfg.train_subset > len(data.train_labels):
        raise SharpError(
            f"--train-subset {cfg.train_subset} exceeds the {len(data.train_labels)} training images"
        )
    train_index = (
        balanced_subset(data.train_labels, cfg.train_subset, cfg.data_seed)
        if cfg.train_subset
        else torch.arange(len(data.train_labels))
    )
    if cfg.full_batch:  # full-batch GD: the batch is the training split, known now
        cfg = dataclasses.replace(cfg, batch_size=len(train_index))
        validate(dataclasses.replace(cfg, full_batch=False))  # the checks that needed the batch
    dtype = runtime.parameter_dtype(cfg.precision)

    torch.manual_seed(cfg.seed if cfg.init_seed is None else cfg.init_seed)
    model = build_model(
        cfg.model, data.in_channels, data.num_classes, data.image_size, cfg.width, cfg.norm, cfg.bn_batch
    )
    model = model.to(device=device, dtype=dtype)  # before loading: fp64 weights must not pass through fp32
    init_source = None
    if cfg.init_from:
        path, state = initial_weights(cfg.init_from)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise SharpError(f"--init-from {path} does not fit --model {cfg.model} ({first})") from None
        init_source = str(path)
    torch.manual_seed(epoch_seed(cfg.seed, 0, 2))  # the run's own stream (dropout), apart from the init
    set_bn_batch(model, cfg.bn_batch)
    if cfg.sync_bn and dist.enabled:
        synchronize_bn(model)
    dist.broadcast_parameters(model.state_dict().values())
    channels_last = cfg.channels_last if cfg.channels_last is not None else is_conv_net(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    options = compile_options(cfg)
    forward = torch.compile(model, **options) if options is not None else model

    loader_args = dict(device=device, dtype=dtype, channels_last=channels_last)
    mean, std = input_normalization(data, cfg.input_scaling)  # the probes' loaders take it from there too
    train_images, train_labels = data.train_images[train_index], data.train_labels[train_index]
    train_loader = DeviceLoader(
        train_images,
        train_labels,
        mean,
        std,
        seed=cfg.seed,
        augment=resolve_augment(cfg),
        rank=dist.rank,
        world_size=dist.world_size,
        share_micro_batches=cfg.sync_bn,
        **loader_args,
    )
    eval_index = evaluation_subset(train_labels, cfg.eval_train_size, cfg.data_seed + 1)
    eval_train = DeviceLoader(train_images[eval_index], train_labels[eval_index], mean, std, **loader_args)
    test_index = evaluation_subset(data.test_labels, cfg.test_subset, cfg.data_seed + 2)
    test = DeviceLoader(data.test_images[test_index], data.test_labels[test_index], mean, std, **loader_args)

    tracker = None
    if cfg.track_sharpness:
        if dist.enabled:
            raise SharpError(
                "--track-sharpness needs the whole batch of each step in one process: drop torchrun/--nproc"
            )
        size = track_set_size(cfg.track_set)
        if size is not None and size > len(train_labels):
            raise SharpError(
                f"--track-set {size} exceeds the {len(train_labels)} training images: lower it or use full"
            )
        track_index = evaluation_subset(train_labels, size, cfg.data_seed + TRACK_SET_SEED_OFFSET)
        tracking_set = DeviceLoader(
            train_images[track_index], train_labels[track_index], mean, std, **loader_args
        )
        tracker = SharpnessTracker(
            cfg.track_sharpness,
            tracking_set,
            cfg.loss,
            cfg.track_bn_mode,
            cfg.seed,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )

    steps = total_steps(cfg, len(train_loader))
    if steps == 0:
        raise SharpError(
            f"--drop-last with --batch-size {cfg.batch_size} larger than the {len(train_loader)} training "
            "images leaves no steps: lower the batch or drop --drop-last"
        )
    schedule = LRSchedule.from_config(cfg, steps)
    return Training(
        cfg=cfg,
        dist=dist,
        device=device,
        dtype=dtype,
        dataset=data,
        model=model,
        forward=forward,
        params=[p for p in model.parameters() if p.requires_grad],
        optimizer=make_optimizer(cfg, model, schedule(0), device),
        schedule=schedule,
        loss_sum=summed_loss(cfg.loss),
        autocast=runtime.autocast(device, cfg.precision),
        train_loader=train_loader,
        eval_train=eval_train,
        test=test,
        total_steps=steps,
        eval_batch=resolve_eval_batch(cfg, model, device),
        channels_last=channels_last,
        # B_simple from each step's micro-batch and window gradients (McCandlish et al. 2018)
        noise=OnlineNoiseScale(NOISE_SCALE_DECAY, len(train_loader)) if cfg.noise_scale else None,
        tracker=tracker,
        init_source=init_source,
        random_layers=any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()),
    )


# --- one optimizer step -------------------------------------------------------------------------


def train_step(t: Training, window: Window, lr: float, stop: bool = False) -> StepResult:
    """One optimizer step at rate `lr` over `window`: accumulate every micro-batch's gradient,
    sum over ranks (one all-reduce, carrying loss, count, `stop` and the noise-scale sums),
    update the online noise scale, step the optimizer. Nothing is read back to the host.

    With `--sam-rho` this is SAM's two passes (Foret et al. 2021): the first accumulates the
    window's gradient g exactly as without SAM (the noise scale reads it); the second
    accumulates, over the same micro-batches, the gradient at w + ε(g), which the optimizer
    applies at w. With `--sam-m` the ascent is taken per group of M examples instead
    (m-sharpness), each group's two passes in turn, with one all-reduce in all.
    """
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    t.optimizer.zero_grad(set_to_none=True)
    cfg, noise = t.cfg, t.noise
    if cfg.sam_rho and cfg.sam_m:
        return _finish(t, _m_sam_gradients(t, window), stop)
    random_state = _random_state(t) if cfg.sam_rho else None
    if noise is not None:  # micro-batch and window gradients at the same parameters
        noise.begin_step(t.model.parameters(), window.count)
    result = accumulate_gradients(
        t.forward,
        window.micro_batches(),
        window.count,
        t.autocast,
        noise.after_backward if noise is not None else None,
        t.loss_sum,
    )
    result = _summed_over_ranks(t, result, stop)
    if cfg.sam_rho:
        _sam_second_pass(t, window, random_state)
    t.optimizer.step()
    return result


def _finish(t: Training, result: StepResult, stop: bool) -> StepResult:
    result = _summed_over_ranks(t, result, stop)
    t.optimizer.step()
    return result


def _summed_over_ranks(t: Training, result: StepResult, stop: bool) -> StepResult:
    """The step's gradients, loss and counts over every rank (and the noise scale's update)."""
    noise = t.noise
    if not t.dist.enabled:
        if noise is not None:
            noise.end_step()
        return result
    extras = [result.loss_sum.reshape(1), result.correct.reshape(1), torch.tensor([float(stop)])]
    if noise is not None:
        extras.append(noise.local_sums())
    summed = t.dist.all_reduce_step(t.params, torch.cat([e.to(t.device, torch.float64) for e in extras]))
    if noise is not None:
        window_grad = flat_grad(t.params)
        noise.finish_step(summed[3:6], torch.linalg.vector_norm(window_grad, dtype=torch.float64).square())
    return StepResult(summed[0], summed[1].round().long(), result.count, summed[2])


def _random_state(t: Training) -> tuple[torch.Tensor, ...] | None:
    """The RNG state before a SAM pass, so that the second pass draws the same dropout masks."""
    if not t.random_layers:
        return None
    if t.device.type == "cuda":
        return torch.get_rng_state(), torch.cuda.get_rng_state(t.device)
    return (torch.get_rng_state(),)


def _set_random_state(t: Training, state: tuple[torch.Tensor, ...] | None) -> None:
    if state is not None:
        torch.set_rng_state(state[0])
        if len(state) > 1:
            torch.cuda.set_rng_state(state[1], t.device)


@contextlib.contextmanager
def _running_statistics_kept(model: nn.Module) -> Iterator[None]:
    """BN running statistics (every buffer) as they were on entry, whatever ran inside: SAM's
    second pass must not update them a second time."""
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(model.buffers(), saved, strict=True):
                buffer.copy_(value)


def _sam_second_pass(t: Training, window: Window, random_state: tuple[torch.Tensor, ...] | None) -> None:
    """Replace `.grad` (g, summed over ranks) by the window's gradient at w + ε(g)."""
    cfg = t.cfg
    deltas = sam_perturbation(t.params, [p.grad for p in t.params], cfg.sam_rho, cfg.sam_adaptive)
    with _running_statistics_kept(t.model):
        _set_random_state(t, random_state)
        shift(t.params, deltas)
        t.optimizer.zero_grad(set_to_none=True)
        accumulate_gradients(t.forward, window.micro_batches(), window.count, t.autocast, None, t.loss_sum)
        if t.dist.enabled:
            t.dist.all_reduce_step(t.params, torch.zeros(0, device=t.device))
        shift(t.params, deltas, -1.0)


def _m_sam_gradients(t: Training, window: Window) -> StepResult:
    """m-SAM: for each group of `sam_m` consecutive examples of each micro-batch, the gradient
    of the group's loss at w gives its own ascent ε_g, and the group's loss at w + ε_g adds
    its gradient (its sum divided by the window's count) to `.grad`. Each group is one forward
    pass (so BN normalizes over the group), its running statistics updated by the first pass
    only; no communication until the step's one all-reduce."""
    cfg = t.cfg
    device = t.params[0].device
    total = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for inputs, targets in window.micro_batches():
        for x, y in zip(inputs.split(cfg.sam_m), targets.split(cfg.sam_m), strict=True):
            random_state = _random_state(t)
            with t.autocast or contextlib.nullcontext():
                outputs = t.forward(x)
            outputs = outputs.float() if outputs.dtype not in (torch.float32, torch.float64) else outputs
            loss = t.loss_sum(outputs, y)
            grads = torch.autograd.grad(loss, t.params, allow_unused=True)
            total = total + loss.detach()
            correct = correct + (outputs.detach().argmax(1) == y).sum()
            deltas = sam_perturbation(t.params, grads, cfg.sam_rho, cfg.sam_adaptive)
            with _running_statistics_kept(t.model):
                _set_random_state(t, random_state)
                shift(t.params, deltas)
                accumulate_gradients(t.forward, [(x, y)], window.count, t.autocast, None, t.loss_sum)
                shift(t.params, deltas, -1.0)
    return StepResult(total, correct, window.count)


# --- where a run stands -------------------------------------------------------------------------


@dataclass
class Cursor:
    """Where training stands, saved in every checkpoint so that a resume continues exactly."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # examples of the current epoch already used
    examples: int = 0
    next_eval: float = 0.0  # examples seen at which the next evaluation happens
    last_eval_step: int = -1  # the step of the last evaluation written to metrics.jsonl
    best_loss: float = math.inf  # --until-plateau: the best evaluated training loss so far
    evals_since_best: int = 0
    stop_reason: str = ""

    def advance(self, window: Window) -> None:
        self.step += 1
        self.position = window.end
        self.examples += window.count


@dataclass
class Interval:
    """Training loss and accuracy summed since the last evaluation (on the device)."""

    loss_sum: torch.Tensor | float = 0.0
    correct: torch.Tensor | int = 0
    count: int = 0

    def add(self, result: StepResult) -> None:
        self.loss_sum = self.loss_sum + result.loss_sum
        self.correct = self.correct + result.correct
        self.count += result.count

    def means(self) -> tuple[float | None, float | None]:
        if not self.count:
            return None, None
        return float(self.loss_sum) / self.count, int(self.correct) / self.count

    def state(self) -> dict[str, Any]:
        return {
            "interval_loss": float(self.loss_sum),
            "interval_correct": int(self.correct),
            "count": self.count,
        }


@dataclass
class Clock:
    """Seconds spent in optimizer steps and in evaluations, over every session of the run."""

    train: float = 0.0
    eval: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    earlier: float = 0.0  # wall time of the sessions before a resume

    @property
    def wall(self) -> float:
        return self.earlier + time.perf_counter() - self.started


def plateaued(cursor: Cursor, loss: float, patience: int, tol: float) -> bool:
    """Keskar et al.'s "until the loss ceased to improve": a loss improves when it is below
    best × (1 − tol); True once `patience` evaluations in a row have not improved."""
    if loss < cursor.best_loss * (1 - tol):
        cursor.best_loss, cursor.evals_since_best = loss, 0
        return False
    cursor.evals_since_best += 1
    return cursor.evals_since_best >= patience


# --- checkpoints ------------------------------------------------------------------------------


def checkpoint_state(t: Training, state: RunState) -> dict[str, Any]:
    """Everything a resume needs: model, optimizer, RNG states, cursor, partial interval, clock."""
    clock = state.clock
    saved = {
        "model": plain_state(t.model),
        "optimizer": t.optimizer.state_dict(),
        "progress": {**asdict(state.cursor), **state.interval.state()},
        "clock": {"train": clock.train, "eval": clock.eval, "wall": clock.wall},
        "rng_cpu": torch.get_rng_state(),
    }
    if t.device.type == "cuda":
        saved["rng_cuda"] = torch.cuda.get_rng_state(t.device)
    if t.noise is not None:
        saved["noise_scale"] = t.noise.state_dict()
    if t.tracker is not None:  # the warm-start vector: a resumed run tracks identically
        saved["tracking"] = t.tracker.state_dict()
    return saved


def restore(t: Training, saved: dict[str, Any]) -> RunState:
    """Put a checkpoint's model, optimizer, RNG and estimator states back; return its RunState."""
    t.model.load_state_dict(saved["model"])
    t.optimizer.load_state_dict(saved["optimizer"])
    progress = dict(saved["progress"])
    interval = Interval(
        progress.pop("interval_loss"), progress.pop("interval_correct"), progress.pop("count")
    )
    cursor = Cursor(**{k: v for k, v in progress.items() if k in Cursor.__dataclass_fields__})
    times = saved.get("clock", {})
    clock = Clock(train=times.get("train", 0.0), eval=times.get("eval", 0.0), earlier=times.get("wall", 0.0))
    torch.set_rng_state(saved["rng_cpu"])
    if "rng_cuda" in saved and t.device.type == "cuda":
        torch.cuda.set_rng_state(saved["rng_cuda"], t.device)
    if t.noise is not None and "noise_scale" in saved:
        t.noise.load_state_dict(saved["noise_scale"])
    if t.tracker is not None and "tracking" in saved:
        t.tracker.load_state_dict(saved["tracking"])
    return RunState(cursor, interval, clock)


# --- evaluation -----------------------------------------------------------------------------------


def evaluation_record(
    t: Training, cursor: Cursor, interval: Interval, clock: Clock, lr: float, batch: int
) -> dict[str, Any]:
    """One metrics.jsonl line: where training stands, the running training loss since the
    last evaluation, and eval-mode loss and accuracy on the training subset and the test set."""
    mark = time.perf_counter()
    train_loss, train_acc = evaluate(t.forward, t.eval_train.batches(t.eval_batch), t.autocast, t.loss_sum)
    test_loss, test_acc = evaluate(t.forward, t.test.batches(t.eval_batch), t.autocast, t.loss_sum)
    clock.eval += time.perf_counter() - mark
    running_loss, running_acc = interval.means()
    record = {
        "step": cursor.step,
        "epoch": cursor.epoch + cursor.position / t.n_train,
        "examples": cursor.examples,
        "lr": lr,
        "batch_size": batch,
        "wall_time": round(clock.wall, 3),
        "train_time": round(clock.train, 3),
        "eval_time": round(clock.eval, 3),
        "train_loss": running_loss,
        "train_acc": running_acc,
        "eval_train_loss": train_loss,
        "eval_train_acc": train_acc,
        "test_loss": test_loss,
        "test_acc": test_acc,
    }
    if t.noise is not None:
        record["noise_b_simple"] = t.noise.b_simple
        record["noise_g2"] = t.noise.g2
        record["noise_trace_sigma"] = t.noise.trace_sigma
    return record


def stop_reason(cfg: TrainConfig, cursor: Cursor, train_loss: float, train_acc: float) -> str:
    """Why training stops after an evaluation with this training loss and accuracy ('' to go on)."""
    if cfg.until_train_loss is not None and train_loss <= cfg.until_train_loss:
        return "the evaluated training loss reached --until-train-loss"
    if cfg.until_train_acc is not None and train_acc >= cfg.until_train_acc:
        return "the evaluated training accuracy reached --until-train-acc"
    if cfg.until_plateau is not None and plateaued(cursor, train_loss, cfg.until_plateau, cfg.plateau_tol):
        return (
            f"the evaluated training loss did not improve by more than {cfg.plateau_tol:g} (relative) "
            f"in {cfg.until_plateau} evaluations (--until-plateau)"
        )
    return ""


# --- the loop ---------------------------------------------------------------------------------------


def windows(t: Training, cursor: Cursor) -> Iterator[tuple[int, int, Window]]:
    """(epoch, batch size, window) of every remaining optimizer step, epoch after epoch; pure:
    the loop itself moves the cursor."""
    epoch = cursor.epoch
    while True:
        batch = batch_size_at(t.cfg, epoch)
        micro = resolved_micro_batch(t.cfg, batch)
        start = cursor.position if epoch == cursor.epoch else 0
        for window in t.train_loader.windows(epoch, batch, micro, t.cfg.drop_last, start):
            yield epoch, batch, window
        epoch += 1


# what the loop asks its driver for (the window, its lr, whether a stop was asked) and is sent
# back (the step's result and the seconds it took)
StepRequest = tuple[Window, float, bool]
Steps = Generator[StepRequest, tuple[StepResult, float], dict[str, Any]]


@dataclass
class RunState:
    """A run's progress: cursor, the interval's running sums and the clock (all checkpointed)."""

    cursor: Cursor = field(default_factory=Cursor)
    interval: Interval = field(default_factory=Interval)
    clock: Clock = field(default_factory=Clock)


def fit(
    t: Training,
    checkpoints: Checkpointer,
    log: MetricsLog,
    signals: StopSignals,
    state: RunState,
    fresh: bool = True,
    bar: bool = True,
) -> Steps:
    """Train from `state` to the end, or until stopped; return the last evaluation. A `fresh`
    run first records its starting point. Every rank runs this loop; rank 0 alone writes.
    A generator: it yields each optimizer step as a `StepRequest` and is sent its result."""
    cfg, dist, cursor, clock = t.cfg, t.dist, state.cursor, state.clock
    diverged_at = torch.full((), -1, dtype=torch.long, device=t.device)
    stops = torch.zeros((), device=t.device)
    last: dict[str, Any] = {}

    def evaluate_now(lr: float, batch: int) -> None:
        nonlocal last
        dist.average_buffers(t.model)
        reason = ""
        if dist.is_main:
            last = evaluation_record(t, cursor, state.interval, clock, lr, batch)
            log.append(last)
            reason = stop_reason(cfg, cursor, last["eval_train_loss"], last["eval_train_acc"])
        if dist.agree(bool(reason)):
            cursor.stop_reason = reason or "rank 0 reached its stopping rule"
        state.interval, cursor.last_eval_step = Interval(), cursor.step
        cursor.next_eval += cfg.eval_every * t.n_train

    def check_finite() -> None:
        bad = int(diverged_at)
        if bad >= 0:
            message = f"training diverged at step {bad}: the loss was not finite at lr {t.schedule(bad):g}"
            raise RunDiverged(message, step=bad)

    def save() -> None:
        check_finite()
        dist.average_buffers(t.model)
        checkpoints.save_last(checkpoint_state(t, state))

    if fresh:  # the starting point: step-0 evaluation and checkpoints
        if cfg.checkpoint_every:
            checkpoints.save_epoch(0, t.model, 0, 0)
        evaluate_now(t.schedule(0), batch_size_at(cfg, 0))
        save()
    t.model.train()
    rate_mark, rate_examples = time.perf_counter(), cursor.examples
    shown = progress_bar(
        total=t.total_steps, initial=cursor.step, unit="step", enabled=bar, desc=log.run.path.name
    )
    with shown:
        for epoch, batch, window in windows(t, cursor):
            if cursor.step >= t.total_steps or cursor.stop_reason:
                break
            if epoch != cursor.epoch:  # an epoch without a window (drop_last, batch > data)
                cursor.epoch, cursor.position = epoch, 0
            lr = t.schedule(cursor.step)
            if t.tracker is not None and t.tracker.due(cursor.step):  # at the weights this step starts from
                check_finite()  # a diverged run stops as diverged, not inside Lanczos
                log.append(t.tracker.measure(t.model, window, cursor.step, lr))
            result, seconds = yield window, lr, signals.requested
            clock.train += seconds
            bad = ~torch.isfinite(result.loss_sum) & (diverged_at < 0)
            diverged_at = torch.where(bad, cursor.step, diverged_at)
            if result.stop is not None:
                stops = stops + result.stop
            cursor.advance(window)
            state.interval.add(result)
            shown.update()
            if time.perf_counter() - rate_mark > 1.0:  # one read of the loss a second, for the bar
                shown.set_postfix(
                    img_s=f"{(cursor.examples - rate_examples) / (time.perf_counter() - rate_mark):.0f}",
                    loss=f"{float(result.loss_sum) / window.count:.3f}",
                    lr=f"{lr:.3g}",
                )
                rate_mark, rate_examples = time.perf_counter(), cursor.examples
            if window.last:
                cursor.epoch, cursor.position = epoch + 1, 0
            if cursor.step % CHECK_EVERY == 0:
                check_finite()
            if window.last and cfg.checkpoint_every and cursor.epoch % cfg.checkpoint_every == 0:
                check_finite()
                dist.average_buffers(t.model)
                checkpoints.save_epoch(cursor.epoch, t.model, cursor.step, cursor.examples)
            evaluated = cursor.examples >= cursor.next_eval or cursor.step >= t.total_steps
            if evaluated:
                check_finite()
                evaluate_now(lr, batch)
            if evaluated or window.last:
                save()
            if (
                signals.requested
                if not dist.enabled
                else (cursor.step % CHECK_EVERY == 0 and float(stops) > 0)
            ):
                save()
                raise StopRequested
    check_finite()
    if cursor.last_eval_step != cursor.step:  # only when the loop ended without evaluating its last step
        evaluate_now(t.schedule(max(cursor.step - 1, 0)), batch_size_at(cfg, cursor.epoch))
    return last or _last_evaluation(log)


def _last_evaluation(log: MetricsLog) -> dict[str, Any]:
    """The final evaluation of a run resumed after it had evaluated its last step."""
    records = [r for r in read_jsonl(log.run.metrics) if "test_acc" in r]
    return records[-1] if records else {}


# --- the run directory around it ------------------------------------------------------------------


def derived_settings(t: Training, flags: runtime.TorchFlags) -> dict[str, Any]:
    """What the settings resolve to for this run (recorded in config.json)."""
    cfg = t.cfg
    batch = batch_size_at(cfg, 0)
    micro = resolved_micro_batch(cfg, batch)
    world = t.dist.world_size
    mean, std = input_normalization(t.dataset, cfg.input_scaling)
    return {
        "lr": t.schedule.peak,
        "total_steps": t.total_steps,
        "effective_batch": batch,
        "micro_batch": micro,
        "world_size": world,
        "accumulation_steps": math.ceil(batch / world / micro),  # per rank
        "effective_batch_rule": "world_size shares of a batch, each as accumulation_steps micro-batches",
        "bn_batch": ((cfg.bn_batch or micro) * (world if cfg.sync_bn else 1)) if cfg.norm == "bn" else None,
        "bn_statistics": "batch (no running statistics)" if uses_batch_statistics(t.model) else "running",
        "bn_across_ranks": (
            (
                "synchronized: statistics over all ranks' micro-batches"
                if cfg.sync_bn
                else "per rank; buffers averaged before every evaluation and checkpoint"
            )
            if world > 1
            else None
        ),
        "eval_batch": t.eval_batch,
        "loss": cfg.loss,
        "init_seed": cfg.seed if cfg.init_seed is None else cfg.init_seed,
        "init_from": t.init_source,
        "augment": t.train_loader.augment,
        "channels_last": t.channels_last,
        "n_train": t.n_train,
        "n_test": len(t.test),
        "n_eval_train": len(t.eval_train),
        "num_classes": t.dataset.num_classes,
        "in_channels": t.dataset.in_channels,
        "image_size": t.dataset.image_size,
        "dataset_label": dataset_label(t.dataset),
        "dataset_mean": list(t.dataset.mean),
        "dataset_std": list(t.dataset.std),
        "input_mean": list(mean),  # what every loader of the run subtracts, then divides by input_std
        "input_std": list(std),
        "parameters": sum(p.numel() for p in t.model.parameters()),
        "warmup_steps": t.schedule.warmup_steps,
        "noise_scale_decay": NOISE_SCALE_DECAY if t.noise is not None else None,
        "sam": (
            {
                "rho": cfg.sam_rho,
                "perturbation": "rho |w|^2 g / || |w| g || (ASAM)"
                if cfg.sam_adaptive
                else "rho g / ||g|| (SAM)",
                "ascent_per": f"group of {cfg.sam_m} examples (m-SAM)" if cfg.sam_m else "whole window",
                "passes": 2,
                "bn_running_statistics": "first pass only",
                "dropout": "the same masks in both passes",
            }
            if cfg.sam_rho
            else None
        ),
        "tracking": None
        if t.tracker is None
        else t.tracker.describe(micro, cfg.bn_batch, has_batch_norm(t.model), t.dtype),
        "optimizer_options": optimizer_options(cfg, t.device),
        "torch_compile": compile_options(cfg),
        "torch_flags": asdict(flags),
    }


def environment(device: torch.device) -> dict[str, Any]:
    return {
        "sharp": __version__,
        "torch": torch.__version__,
        "torchvision": importlib.metadata.version("torchvision"),
        "python": platform.python_version(),
        "device": runtime.describe_device(device),
        "threads": torch.get_num_threads(),
        "host": socket.gethostname(),
        "git": git_revision(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    dataset: Dataset | None = None,
    progress_bar: bool = True,
) -> dict[str, Any]:
    """Train one run into `out` and return its final evaluation.

    Records the run's state in status.json whatever happens. Under torchrun every process
    calls this; rank 0 alone writes the run directory.
    """
    run = RunDir(out)
    dist = Distributed.from_env()
    device = dist.device(runtime.select_device(cfg.device))
    with (
        dist.session(device),
        runtime.torch_settings(device, deterministic=cfg.deterministic, tf32=cfg.tf32) as flags,
    ):
        if dist.is_main and not resume:
            run.prepare_new(overwrite)
        with run.lock() if dist.is_main else contextlib.nullcontext():
            dist.barrier()
            t = build(cfg, dataset, dist)
            checkpoints = Checkpointer(run, dist.is_main)
            log = MetricsLog(run, dist.is_main, cfg.tensorboard)
            try:
                with StopSignals() as signals:
                    bar = progress_bar and dist.is_main
                    return drive(run_steps(t, run, checkpoints, log, flags, resume, bar, signals), t)
            finally:
                log.close()


def drive(steps: Steps, t: Training) -> dict[str, Any]:
    """Run a loop's steps with `train_step` and return its last evaluation. An exception in a step
    is thrown into the loop, which records it in the run's status and raises it again."""
    try:
        request = next(steps)
        while True:
            try:
                mark = time.perf_counter()
                done = train_step(t, *request), time.perf_counter() - mark
            except BaseException as exc:
                steps.throw(exc)
                raise
            request = steps.send(done)
    except StopIteration as done:
        return done.value


def run_steps(
    t: Training,
    run: RunDir,
    checkpoints: Checkpointer,
    log: MetricsLog,
    flags: runtime.TorchFlags,
    resume: bool,
    bar: bool,
    signals: StopSignals,
) -> Steps:
    """`fit` inside the run directory: config.json (or the resumed checkpoint) first, status.json
    whatever happens, final.pt at the end. A generator, as `fit` is."""
    main = t.dist.is_main
    if resume:
        state = restore(t, checkpoints.load_last())
        log.truncate_after(state.cursor.step)
    else:
        state = RunState()
        if main:
            record = {
                "settings": t.cfg.to_dict(),
                "derived": derived_settings(t, flags),
                "environment": environment(t.device),
                "command": sys.argv,
            }
            atomic_write_json(run.config, record)

    def status(name: str, **details: Any) -> None:
        if main:
            run.set_status(name, **{"step": state.cursor.step, **details})

    status("running")
    try:
        last = yield from fit(t, checkpoints, log, signals, state, fresh=not resume, bar=bar)
    except RunDiverged as exc:
        log.append({"step": exc.step, "diverged": True, "reason": str(exc)})
        status("diverged", step=exc.step, reason=str(exc))
        raise
    except StopRequested:
        status("interrupted", reason="stopped by a signal after a whole step; continue with --resume")
        raise
    except KeyboardInterrupt:
        status("interrupted", reason="stopped at once; --resume continues from the last checkpoint")
        raise
    except BaseException as exc:
        status("failed", reason=f"{type(exc).__name__}: {exc}")
        raise
    checkpoints.save_final(t.model)  # buffers averaged over ranks at the last evaluation
    keys = ("epoch", "examples", "test_loss", "test_acc", "eval_train_loss", "eval_train_acc")
    status(
        "finished", reason=state.cursor.stop_reason or "trained to the end", **{k: last.get(k) for k in keys}
    )
    return last
