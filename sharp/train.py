"""The training loop: exact gradient accumulation, LR rules, evaluation, checkpoints.

Each optimizer step takes a window of B examples from the epoch's permutation and runs it
as micro-batches of b. Every micro-batch contributes its summed loss divided by the number
of examples in the whole window (a short last window included), so the accumulated gradient
is exactly the mean-loss gradient of the window; with BN, each micro-batch (or ghost group
of `bn_batch`) is normalized with its own statistics.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import platform
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sharp import __version__, runtime
from sharp.config import DEFAULT_EPOCHS, TrainConfig, resolved_micro_batch
from sharp.data import Dataset, DeviceLoader, balanced_subset, load_dataset, steps_per_epoch
from sharp.distributed import Distributed
from sharp.errors import RunDiverged, SharpError
from sharp.models import build_model, is_conv_net, set_bn_batch
from sharp.probes.noise import OnlineNoiseScale
from sharp.progress import progress_bar
from sharp.runs import (
    RunDir,
    append_jsonl,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    git_revision,
    keep_previous,
    load_checkpoint,
    read_jsonl,
)
from sharp.schedule import LRSchedule, batch_size_at

EVAL_BATCH = {"cuda": 1024, "cpu": 256}  # no-grad batch: CPU forward throughput falls beyond ~256
NOISE_SCALE_DECAY = 0.99  # EMA decay per optimizer step of the online B_simple (--noise-scale)
AUTO_AUGMENT_DATASETS = ("cifar10", "cifar100", "folder")


@dataclass
class StepResult:
    """Summed loss and correct predictions of one optimizer step's window (on device)."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    count: int


def accumulate_gradients(
    model: nn.Module,
    micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    count: int,
    autocast: Any = None,
    after_backward: Callable[[int], None] | None = None,
) -> StepResult:
    """Add to `.grad` the gradient of the mean cross-entropy over `count` examples.

    Each micro-batch's loss is its *sum* divided by `count`, the size of the whole window,
    never a mean of micro-batch means: with unequal micro-batches the two differ.
    `after_backward(n)` is called after each micro-batch's backward with its size (the
    online noise scale reads `.grad` there).
    """
    loss_sum = correct = None
    for inputs, targets in micro_batches:
        with autocast or contextlib.nullcontext():
            outputs = model(inputs)
        if outputs.dtype not in (torch.float32, torch.float64):
            outputs = outputs.float()
        loss = F.cross_entropy(outputs, targets, reduction="sum")
        (loss / count).backward()
        if after_backward is not None:
            after_backward(len(targets))
        batch_correct = (outputs.detach().argmax(1) == targets).sum()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        correct = batch_correct if correct is None else correct + batch_correct
    if loss_sum is None:  # this rank's share of a short window was empty
        device = next(model.parameters()).device
        return StepResult(
            torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device), count
        )
    return StepResult(loss_sum, correct, count)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], autocast: Any = None
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in eval mode (BN running statistics)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = total = 0
    try:
        for inputs, targets in batches:
            with autocast or contextlib.nullcontext():
                outputs = model(inputs)
            outputs = outputs.float() if outputs.dtype not in (torch.float32, torch.float64) else outputs
            loss_sum += F.cross_entropy(outputs, targets, reduction="sum").double().cpu()
            correct += int((outputs.argmax(1) == targets).sum())
            total += len(targets)
    finally:
        model.train(was_training)
    return float(loss_sum) / max(total, 1), correct / max(total, 1)


def make_optimizer(cfg: TrainConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def total_steps(cfg: TrainConfig, n_train: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    epochs = cfg.epochs if cfg.epochs is not None else DEFAULT_EPOCHS
    return sum(steps_per_epoch(n_train, batch_size_at(cfg, e), cfg.drop_last) for e in range(epochs))


def resolve_augment(cfg: TrainConfig) -> bool:
    if cfg.augment is not None:
        return cfg.augment
    return cfg.dataset.split(":", 1)[0] in AUTO_AUGMENT_DATASETS


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint so a resume continues exactly."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # examples of the current epoch already used
    examples: int = 0
    next_eval: float = 0.0  # examples seen at which the next evaluation happens
    elapsed: float = 0.0  # training wall time so far, seconds
    interval_loss: float = 0.0
    interval_correct: int = 0
    interval_count: int = 0
    stop_reason: str = ""


class Trainer:
    """One run: builds data, model and optimizer from a TrainConfig and trains into a RunDir."""

    def __init__(
        self,
        cfg: TrainConfig,
        run: RunDir,
        dataset: Dataset | None = None,
        progress_bar: bool = True,
        dist: Distributed | None = None,
    ) -> None:
        self.cfg = cfg
        self.run = run
        self.dist = dist or Distributed()
        self.progress_bar = progress_bar and self.dist.is_main
        self.device = self.dist.device(runtime.select_device(cfg.device))
        self.dataset = (
            dataset if dataset is not None else load_dataset(cfg.dataset, cfg.data_root, cfg.download)
        )
        data = self.dataset
        if cfg.train_subset and cfg.train_subset > len(data.train_labels):
            raise SharpError(
                f"--train-subset {cfg.train_subset} exceeds the {len(data.train_labels)} training images"
            )
        train_index = (
            balanced_subset(data.train_labels, cfg.train_subset, cfg.data_seed)
            if cfg.train_subset
            else torch.arange(len(data.train_labels))
        )
        self.dtype = runtime.parameter_dtype(cfg.precision)
        torch.manual_seed(cfg.seed)
        self.model = build_model(
            cfg.model, data.in_channels, data.num_classes, data.image_size, cfg.width, cfg.norm, cfg.bn_batch
        ).to(device=self.device, dtype=self.dtype)
        set_bn_batch(self.model, cfg.bn_batch)
        self.dist.broadcast_parameters(self.model.state_dict().values())
        self.channels_last = cfg.channels_last if cfg.channels_last is not None else is_conv_net(self.model)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward_model = torch.compile(self.model) if cfg.compile else self.model
        loader_args = dict(device=self.device, dtype=self.dtype, channels_last=self.channels_last)
        self.train_loader = DeviceLoader(
            data.train_images[train_index],
            data.train_labels[train_index],
            data.mean,
            data.std,
            seed=cfg.seed,
            augment=resolve_augment(cfg),
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            **loader_args,
        )
        eval_index = balanced_subset(self.train_loader.labels.cpu(), cfg.eval_train_size, cfg.data_seed + 1)
        self.eval_train = DeviceLoader(
            data.train_images[train_index][eval_index],
            data.train_labels[train_index][eval_index],
            data.mean,
            data.std,
            **loader_args,
        )
        test_index = balanced_subset(
            data.test_labels, cfg.test_subset or len(data.test_labels), cfg.data_seed + 2
        )
        self.test = DeviceLoader(
            data.test_images[test_index], data.test_labels[test_index], data.mean, data.std, **loader_args
        )
        self.n_train = len(self.train_loader)
        self.total_steps = total_steps(cfg, self.n_train)
        if self.total_steps == 0:
            raise SharpError(
                f"--drop-last with --batch-size {cfg.batch_size} larger than the {self.n_train} training "
                "images leaves no steps: lower the batch or drop --drop-last"
            )
        self.schedule = LRSchedule.from_config(cfg, self.total_steps)
        self.optimizer = make_optimizer(cfg, self.model, self.schedule(0))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.autocast = runtime.autocast(self.device, cfg.precision)
        self.eval_batch = EVAL_BATCH.get(self.device.type, 256)
        self.state = Progress()
        self.signals = StopSignals()  # replaced by the live handler while fitting
        self.stop_agreed = False
        # B_simple from each step's micro-batch and window gradients (McCandlish et al. 2018)
        self.noise = OnlineNoiseScale(NOISE_SCALE_DECAY, self.n_train) if cfg.noise_scale else None

    # --- settings ----------------------------------------------------------------------

    def derived(self) -> dict[str, Any]:
        cfg = self.cfg
        batch = batch_size_at(cfg, 0)
        micro = resolved_micro_batch(cfg, batch)
        world = self.dist.world_size
        return {
            "lr": self.schedule.peak,
            "total_steps": self.total_steps,
            "effective_batch": batch,
            "micro_batch": micro,
            "world_size": world,
            "accumulation_steps": math.ceil(batch / world / micro),  # per rank
            "effective_batch_rule": "world_size shares of a batch, each as accumulation_steps micro-batches",
            "bn_batch": (cfg.bn_batch or micro) if cfg.norm == "bn" else None,
            "augment": self.train_loader.augment,
            "channels_last": self.channels_last,
            "n_train": self.n_train,
            "n_test": len(self.test),
            "n_eval_train": len(self.eval_train),
            "num_classes": self.dataset.num_classes,
            "in_channels": self.dataset.in_channels,
            "image_size": self.dataset.image_size,
            "dataset_mean": list(self.dataset.mean),
            "dataset_std": list(self.dataset.std),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "warmup_steps": self.schedule.warmup_steps,
            "noise_scale_decay": NOISE_SCALE_DECAY if self.noise is not None else None,
        }

    def environment(self) -> dict[str, Any]:
        return {
            "sharp": __version__,
            "torch": torch.__version__,
            "torchvision": importlib.metadata.version("torchvision"),
            "python": platform.python_version(),
            "device": runtime.describe_device(self.device),
            "threads": torch.get_num_threads(),
            "host": socket.gethostname(),
            "git": git_revision(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def write_config(self) -> None:
        if not self.dist.is_main:
            return
        atomic_write_json(
            self.run.config,
            {
                "settings": self.cfg.to_dict(),
                "derived": self.derived(),
                "environment": self.environment(),
                "command": sys.argv,
            },
        )

    # --- checkpoints -------------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "progress": vars(self.state).copy(),
            "rng_cpu": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        if self.noise is not None:
            state["noise_scale"] = self.noise.state_dict()
        return state

    def save_last(self) -> None:
        if not self.dist.is_main:
            return
        keep_previous(self.run.last_checkpoint, self.run.previous_checkpoint)
        atomic_torch_save(self.run.last_checkpoint, self.checkpoint_state())

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.state = Progress(**state["progress"])
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        if self.noise is not None and "noise_scale" in state:
            self.noise.load_state_dict(state["noise_scale"])

    def save_epoch_checkpoint(self, epoch: int) -> None:
        if not self.dist.is_main:
            return
        atomic_torch_save(
            self.run.epoch_checkpoint(epoch),
            {
                "model": self.model.state_dict(),
                "epoch": epoch,
                "step": self.state.step,
                "examples": self.state.examples,
            },
        )

    # --- the loop ----------------------------------------------------------------------

    def evaluate_now(self, lr: float, batch: int) -> dict[str, Any]:
        """Evaluate (rank 0), append to metrics.jsonl, and decide with every rank whether to stop."""
        s = self.state
        record: dict[str, Any] = {}
        reached = False
        if self.dist.is_main:
            record = self.evaluation_record(lr, batch)
            append_jsonl(self.run.metrics, record)
            limit = self.cfg.until_train_loss
            reached = limit is not None and record["eval_train_loss"] <= limit
        s.interval_loss, s.interval_correct, s.interval_count = 0.0, 0, 0
        s.next_eval += self.cfg.eval_every * self.n_train
        self.evaluated_at = s.step
        if self.dist.agree(reached):
            s.stop_reason = "the evaluated training loss reached --until-train-loss"
        return record

    def evaluation_record(self, lr: float, batch: int) -> dict[str, Any]:
        s = self.state
        train_loss, train_acc = evaluate(
            self.forward_model, self.eval_train.batches(self.eval_batch), self.autocast
        )
        test_loss, test_acc = evaluate(self.forward_model, self.test.batches(self.eval_batch), self.autocast)
        record = {
            "step": s.step,
            "epoch": s.epoch + s.position / self.n_train,
            "examples": s.examples,
            "lr": lr,
            "batch_size": batch,
            "wall_time": round(s.elapsed, 3),
            "train_loss": s.interval_loss / s.interval_count if s.interval_count else None,
            "train_acc": s.interval_correct / s.interval_count if s.interval_count else None,
            "eval_train_loss": train_loss,
            "eval_train_acc": train_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
        }
        if self.noise is not None:
            record["noise_b_simple"] = self.noise.b_simple
            record["noise_g2"] = self.noise.g2
            record["noise_trace_sigma"] = self.noise.trace_sigma
        return record

    def windows(self) -> Iterator[tuple[int, int, Any]]:
        """(batch size, micro-batch, window) for every remaining step, across epochs."""
        s = self.state
        while True:
            batch = batch_size_at(self.cfg, s.epoch)
            micro = resolved_micro_batch(self.cfg, batch)
            for window in self.train_loader.windows(s.epoch, batch, micro, self.cfg.drop_last, s.position):
                yield batch, micro, window
            self.end_epoch()

    def end_epoch(self) -> None:
        s = self.state
        s.epoch += 1
        s.position = 0
        if self.cfg.checkpoint_every and s.epoch % self.cfg.checkpoint_every == 0:
            self.save_epoch_checkpoint(s.epoch)
        self.save_last()

    def train_step(self, window: Any, lr: float) -> StepResult:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        noise = self.noise
        if noise is not None:  # micro-batch and window gradients at the same parameters
            noise.begin_step(self.model.parameters(), window.count)
        result = accumulate_gradients(
            self.forward_model,
            window.micro_batches(),
            window.count,
            self.autocast,
            noise.after_backward if noise is not None else None,
        )
        result.loss_sum, result.correct, self.stop_agreed = self.dist.all_reduce_step(
            self.params, result.loss_sum, result.correct, self.signals.requested
        )
        loss = float(result.loss_sum) / window.count
        if not math.isfinite(loss):
            raise RunDiverged(f"training diverged at step {self.state.step}: loss {loss} at lr {lr:g}")
        if noise is not None:
            noise.end_step()
        self.optimizer.step()
        return result

    def fit(self, fresh: bool = True) -> dict[str, Any]:
        """Train to the end (or until stopped) and return the last evaluation; a `fresh` run
        first records its initial state (step-0 evaluation and checkpoints)."""
        s = self.state
        self.evaluated_at = -1
        last: dict[str, Any] = {}
        if fresh:
            if self.cfg.checkpoint_every:
                self.save_epoch_checkpoint(0)
            last = self.evaluate_now(self.schedule(0), batch_size_at(self.cfg, 0))
            self.save_last()
        self.model.train()
        bar = progress_bar(
            total=self.total_steps,
            initial=s.step,
            unit="step",
            enabled=self.progress_bar,
            desc=self.run.path.name,
        )
        started = time.perf_counter() - s.elapsed
        rate_mark, rate_examples = time.perf_counter(), s.examples
        with bar:
            for batch, _micro, window in self.windows():
                if s.step >= self.total_steps or s.stop_reason:
                    break
                lr = self.schedule(s.step)
                result = self.train_step(window, lr)
                s.step += 1
                s.position = window.end
                s.examples += window.count
                s.interval_loss += float(result.loss_sum)
                s.interval_correct += int(result.correct)
                s.interval_count += window.count
                s.elapsed = time.perf_counter() - started
                bar.update()
                now = time.perf_counter()
                if now - rate_mark > 1.0:
                    bar.set_postfix(
                        img_s=f"{(s.examples - rate_examples) / (now - rate_mark):.0f}",
                        loss=f"{float(result.loss_sum) / window.count:.3f}",
                        lr=f"{lr:.3g}",
                    )
                    rate_mark, rate_examples = now, s.examples
                if s.examples >= s.next_eval or s.step >= self.total_steps:
                    last = self.evaluate_now(lr, batch)
                    self.save_last()
                if self.stop_agreed:
                    raise StopRequested
        if self.evaluated_at != s.step:
            last = self.evaluate_now(self.schedule(max(s.step - 1, 0)), batch_size_at(self.cfg, s.epoch))
        return last


class StopRequested(KeyboardInterrupt):
    """A stop asked for by a signal, raised between two optimizer steps (the state is whole)."""


class StopSignals:
    """SIGINT and SIGTERM ask the loop to stop after the current step and save a checkpoint;
    a second signal stops at once (the last checkpoint written stays the one to resume from)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopSignals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                break
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    dataset: Dataset | None = None,
    progress_bar: bool = True,
) -> dict[str, Any]:
    """Train one run into `out` and return its final evaluation (see `Trainer`).

    Under torchrun every process calls this; rank 0 alone writes the run directory.
    """
    run = RunDir(out)
    dist = Distributed.from_env()
    device = dist.device(runtime.select_device(cfg.device))
    with dist.session(device), runtime.torch_settings(device, deterministic=cfg.deterministic):
        if dist.is_main and not resume:
            run.prepare_new(overwrite)
        with run.lock() if dist.is_main else contextlib.nullcontext():
            dist.barrier()
            trainer = Trainer(cfg, run, dataset, progress_bar, dist)
            return _run(trainer, resume)


def _run(trainer: Trainer, resume: bool) -> dict[str, Any]:
    """Fit, recording the run's state in status.json (rank 0) whatever happens."""
    run, main = trainer.run, trainer.dist.is_main

    def status(state: str, **details: Any) -> None:
        if main:
            run.set_status(state, step=trainer.state.step, **details)

    if resume:
        trainer.restore(load_checkpoint(run.last_checkpoint, fallback=run.previous_checkpoint))
        if main:
            _truncate_metrics(run, trainer.state.step)
    else:
        trainer.write_config()
    status("running")
    try:
        with StopSignals() as signals:
            trainer.signals = signals
            last = trainer.fit(fresh=not resume)
    except RunDiverged as exc:
        if main:
            append_jsonl(run.metrics, {"step": trainer.state.step, "diverged": True, "reason": str(exc)})
        status("diverged", reason=str(exc))
        raise
    except StopRequested:
        trainer.save_last()
        status("interrupted", reason="stopped by a signal after a whole step; continue with --resume")
        raise
    except KeyboardInterrupt:
        status("interrupted", reason="stopped at once; --resume continues from the last checkpoint")
        raise
    except BaseException as exc:
        status("failed", reason=f"{type(exc).__name__}: {exc}")
        raise
    if main:
        atomic_torch_save(run.final, {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()})
    trainer.save_last()
    keys = ("epoch", "examples", "test_loss", "test_acc", "eval_train_loss", "eval_train_acc")
    status(
        "finished", reason=trainer.state.stop_reason or "trained to the end", **{k: last.get(k) for k in keys}
    )
    return last


def _truncate_metrics(run: RunDir, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from."""
    kept = [r for r in read_jsonl(run.metrics) if r.get("step", 0) <= step and not r.get("diverged")]
    atomic_write_bytes(run.metrics, "".join(json.dumps(r) + "\n" for r in kept).encode())
