"""Ensembles: K runs trained as one, each still its own ordinary run directory.

Runs that share model, data set, batch sizes and micro-batch but differ in seed, learning rate
(and its schedule), weight decay, optimizer or initialization train together in one process.
Every layer becomes one grouped layer over the K members (`Stack`): a convolution with K times
the groups, batch or group norm over K times the channels, a batched matrix product for a
linear layer. Its tensors hold all members' weights, and each member's own model holds views of
its slice of them, so one forward and backward pass over the members' micro-batches side by
side in the channels computes every member's gradient, and every member's model is always
current. Each member keeps everything else a run alone has: its own DeviceLoader (data order
and augmentation), its own torch optimizer over its own views (state and checkpoint format
those of a run alone; SGD without momentum, which keeps no state, is applied to all members'
stacked weights at once, `stacked_sgd`), learning rate and schedule, BN running statistics,
RNG state, and its own loop: `sharp.train.run_steps`, unchanged, yields each step it needs, and
`train_ensemble` answers all members' requests with one stacked step. Evaluation,
checkpoints, stop rules, the divergence check and status.json are therefore exactly a run
alone's. A member that diverges or stops leaves the ensemble: its slice is copied out and the
others are stacked again.

Why grouped layers and not `torch.func` (stack_module_state + functional_call + vmap): vmap's
rule for a convolution over batched weights is itself a grouped convolution, reached through a
copy of the input into the grouped layout at every convolution and a fallback loop for
adaptive pooling, plus functional_call's re-parametrization at every call; grouped layers also
keep BN's in-place running statistics, ghost BN and channels_last exactly as a run alone has
them. Measured side by side on ResNet-8 without BN, K = 8, forward and backward only, one
thread of this project's 2-core CPU (median of 3): sequential 44.4 / 99.0 / 192 ms at
B = 2 / 8 / 32, vmap 47.8 / 118 / 318 ms, grouped layers 35.2 / 107 / 297 ms: grouped layers
the faster at every B. `python -m bench --only ensemble` times whole steps (data, loss,
update) of both against sequential training; on the loaded machine this was written on they
came out within noise of each other (one thread: x1.73 / 1.13 / 0.78 grouped, x1.79 / 1.06 /
0.76 vmap, before the per-example loss and the stacked SGD update), to be measured again quiet.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sharp import runtime
from sharp.checkpoint import Checkpointer
from sharp.config import TrainConfig, batch_sizes, make_config, resolved_micro_batch
from sharp.data import Dataset, load_dataset
from sharp.distributed import Distributed
from sharp.errors import RunDiverged, SharpError
from sharp.fileio import atomic_write_json
from sharp.losses import per_example_loss
from sharp.metrics_log import MetricsLog
from sharp.models import (
    KESKAR_NETS,
    MLP,
    BasicBlock,
    CifarResNet,
    ConvNet,
    KerasSameMaxPool2d,
    _GhostBatchNorm,
)
from sharp.progress import progress_bar as make_progress_bar
from sharp.runs import RunDir, RunLocked, load_checkpoint
from sharp.signals import StopRequested, StopSignals
from sharp.train import StepRequest, StepResult, Steps, Training, build, run_steps

# settings in which the members of one ensemble may differ; every other setting is shared
MEMBER_SETTINGS = frozenset(
    {
        "seed",
        "data_seed",
        "init_seed",
        "init_from",
        "augment",
        "optimizer",
        "momentum",
        "weight_decay",
        "lr",
        "base_lr",
        "lr_scaling",
        "reference_batch",
        "warmup",
        "warmup_style",
        "schedule",
        "milestones",
        "gamma",
        "epochs",
        "steps",
        "until_train_loss",
        "until_plateau",
        "plateau_tol",
        "eval_every",
        "checkpoint_every",
        "eval_batch",
        "eval_train_size",
        "test_subset",
        "tensorboard",
        "download",
    }
)
# settings that keep a run out of any ensemble: a compiled or DDP model, and the online noise
# scale, which reads every micro-batch's gradient of one run
# each of these needs a run's own step or model: a compiled forward, BN across ranks, the online
# noise scale's micro-batch gradients, SAM's second pass, the tracker's HVPs of its own model
SOLO_SETTINGS = ("compile", "sync_bn", "noise_scale", "sam_rho", "track_sharpness")
# on the CPU an ensemble pays for small micro-batches only: grouped convolutions are no faster per
# image than separate ones there, so what it saves is the per-run overhead of small ones (bench/)
CPU_MAX_MICRO_BATCH = 8
LAYOUT = "grouped layers (sharp.ensemble.Stack)"
# layers that act on each channel (or each example) alone, hence on each member's channels alone
CHANNELWISE = (
    nn.ReLU,
    nn.Tanh,
    nn.Identity,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Sequential,
    KerasSameMaxPool2d,
    CifarResNet,
    ConvNet,
    MLP,
)


# --- which runs can share -------------------------------------------------------------------


def ensemble_key(settings: dict[str, Any]) -> tuple | None:
    """What runs must share to train as one ensemble: every setting but MEMBER_SETTINGS. None for
    a run that trains alone: compiled, DDP, online noise scale, or a model with dropout (its masks
    come from its run's own random stream, one per run)."""
    if any(settings.get(name) for name in SOLO_SETTINGS) or settings.get("model") in KESKAR_NETS:
        return None
    return tuple(sorted((k, json.dumps(v)) for k, v in settings.items() if k not in MEMBER_SETTINGS))


def ensemble_pays(settings: dict[str, Any]) -> bool:
    """Whether training this run in an ensemble is expected to be faster than alone: on a GPU
    always, on the CPU with micro-batches of at most CPU_MAX_MICRO_BATCH."""
    try:
        device = runtime.select_device(settings.get("device", "auto"))
    except SharpError:  # no such device here: the run will say so when it trains
        return False
    if device.type != "cpu":
        return True
    cfg = TrainConfig(**settings)
    return max(resolved_micro_batch(cfg, b) for b in batch_sizes(cfg)) <= CPU_MAX_MICRO_BATCH


def group_runs(settings: Sequence[dict[str, Any]], size: int) -> list[list[int]]:
    """Indices of the runs, grouped: runs with one `ensemble_key` for which an ensemble pays
    (`ensemble_pays`), in order, in ensembles of at most `size`, each other run alone; groups
    in the order of their first run."""
    groups: list[list[int]] = []
    open_groups: dict[tuple, list[int]] = {}
    for index, run in enumerate(settings):
        key = ensemble_key(run) if size > 1 and ensemble_pays(run) else None
        group = open_groups.get(key) if key is not None else None
        if group is None or len(group) >= size:
            group = [index]
            groups.append(group)
            if key is not None:
                open_groups[key] = group
        else:
            group.append(index)
    return groups


def _check_shared(cfgs: Sequence[TrainConfig]) -> None:
    first = cfgs[0].to_dict()
    if ensemble_key(first) is None:
        reason = next((f"--{n.replace('_', '-')}" for n in SOLO_SETTINGS if first.get(n)), None)
        raise SharpError(
            f"an ensemble cannot train {reason or f'--model {cfgs[0].model} (it has dropout)'}: "
            "train these runs alone"
        )
    for cfg in cfgs[1:]:
        other = cfg.to_dict()
        for name, value in first.items():
            if name not in MEMBER_SETTINGS and other[name] != value:
                raise SharpError(
                    f"ensemble members must share --{name.replace('_', '-')} ({value!r} and "
                    f"{other[name]!r}): train them in separate ensembles"
                )
        if ensemble_key(other) is None:
            raise SharpError("an ensemble member trains alone (compiled, DDP or --noise-scale)")


# --- K models as one grouped module -------------------------------------------------------------


class _StackedLinear(nn.Linear):
    """K linear layers on (n, K * in) inputs, member by member: one batched matrix product."""

    members: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        per_member = x.reshape(n, self.members, -1).transpose(0, 1)  # (K, n, in)
        weight = self.weight.transpose(1, 2)  # (K, in, out)
        if self.bias is None:
            out = torch.bmm(per_member, weight)
        else:
            out = torch.baddbmm(self.bias.unsqueeze(1), per_member, weight)
        return out.transpose(0, 1).reshape(n, -1)


class _StackedBlock(BasicBlock):
    """A ResNet block over K members' channels: the shortcut pads each member's channels."""

    members: int

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad_channels:
            n, channels, height, width = x.shape
            memory_format = (
                torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else None
            )
            per_member = x.reshape(n, self.members, channels // self.members, height, width)
            x = F.pad(per_member, (0, 0, 0, 0, 0, self.pad_channels)).reshape(n, -1, height, width)
            if memory_format is not None:
                x = x.contiguous(memory_format=memory_format)
        return x


@dataclass
class _Shared:
    """One tensor of the grouped module and the members' tensors that view its slices."""

    grouped: torch.Tensor
    members: list[torch.Tensor]
    stacked: bool  # (K, ...) with member k at [k]; otherwise member k's rows at [k * rows, (k + 1) * rows)

    def slice(self, tensor: torch.Tensor, k: int) -> torch.Tensor:
        if self.stacked:
            return tensor[k]
        rows = tensor.shape[0] // len(self.members)
        return tensor.narrow(0, k * rows, rows)

    def per_member(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor as (K, ...): member k's slice at [k] (a view)."""
        return tensor if self.stacked else tensor.unflatten(0, (len(self.members), -1))


class Stack:
    """K models of one architecture as one grouped module, `module`, whose parameters and buffers
    hold every member's; each member's own tensors become views of its slice (`Tensor.data` is
    re-pointed, so the members' optimizers, which hold their parameters, step the stacked weights
    in place). Inputs are the members' inputs side by side in the channels, (n, K * C, ...);
    outputs are (n, K * classes). `release` gives the members their own copies again."""

    def __init__(self, template: nn.Module, models: Sequence[nn.Module]) -> None:
        self.models = list(models)
        self.shared: list[_Shared] = []
        self.module = copy.deepcopy(template)
        named = [dict(m.named_modules()) for m in self.models]
        for name, layer in self.module.named_modules():
            self._group(layer, [modules[name] for modules in named])
        self.module.train()

    def _group(self, layer: nn.Module, parts: list[nn.Module]) -> None:
        k = len(parts)
        if isinstance(layer, nn.Conv2d):
            layer.in_channels, layer.out_channels, layer.groups = (
                layer.in_channels * k,
                layer.out_channels * k,
                layer.groups * k,
            )
            self._share(layer, parts, ("weight", "bias"))
        elif isinstance(layer, nn.Linear):
            layer.__class__ = _StackedLinear
            layer.members = k
            self._share(layer, parts, ("weight", "bias"), stacked=True)
        elif isinstance(layer, _GhostBatchNorm):
            layer.num_features *= k
            self._share(layer, parts, ("weight", "bias", "running_mean", "running_var"))
            self._share_counter(layer, parts)
        elif isinstance(layer, nn.GroupNorm):
            layer.num_groups, layer.num_channels = layer.num_groups * k, layer.num_channels * k
            self._share(layer, parts, ("weight", "bias"))
        elif isinstance(layer, BasicBlock):
            layer.__class__ = _StackedBlock
            layer.members = k
        elif not isinstance(layer, CHANNELWISE):
            raise SharpError(
                f"an ensemble cannot stack a {type(layer).__name__} layer: train these runs alone"
            )

    def _share(self, layer: nn.Module, parts: list[nn.Module], names: tuple[str, ...], stacked: bool = False):
        for name in names:
            tensors = [getattr(part, name) for part in parts]
            if tensors[0] is None:
                continue
            data = [t.detach() for t in tensors]
            grouped = torch.stack(data) if stacked else torch.cat(data)
            if isinstance(tensors[0], nn.Parameter):
                setattr(layer, name, nn.Parameter(grouped, requires_grad=tensors[0].requires_grad))
            else:
                layer._buffers[name] = grouped
            shared = _Shared(getattr(layer, name), tensors, stacked)
            for index, tensor in enumerate(tensors):
                tensor.data = shared.slice(grouped, index)
            self.shared.append(shared)

    def _share_counter(self, layer: nn.Module, parts: list[nn.Module]) -> None:
        """BN's num_batches_tracked: one counter, the same for every member (all take every step)."""
        counters = [part.num_batches_tracked for part in parts]
        if counters[0] is None:
            return
        if any(int(c) != int(counters[0]) for c in counters):
            raise SharpError("ensemble members must be at the same step (their BN counters differ)")
        counter = counters[0].detach().clone()
        layer._buffers["num_batches_tracked"] = counter
        for tensor in counters:
            tensor.data = counter
        self.shared.append(_Shared(counter, counters, stacked=False))

    def zero_grad(self) -> None:
        for shared in self.shared:
            shared.grouped.grad = None

    def assign_grads(self) -> None:
        """Give each member's parameters their slices of the stacked gradients."""
        for shared in self.shared:
            grad = shared.grouped.grad
            if grad is None:
                continue
            for index, tensor in enumerate(shared.members):
                tensor.grad = shared.slice(grad, index)

    def release(self) -> None:
        """Give every member its own copy of its tensors (the stacked ones are dropped)."""
        for shared in self.shared:
            for tensor in shared.members:
                tensor.data = tensor.data.clone()
                tensor.grad = None
        self.shared = []


def stacked_step(
    stack: Stack, members: Sequence[Training], requests: Sequence[StepRequest]
) -> list[StepResult]:
    """`sharp.train.train_step` of every member at once: each member's micro-batches side by side,
    one forward and backward pass of the stacked module (each member's summed loss over its
    micro-batch divided by the window's example count, as a run alone), then each member's own
    optimizer at its own learning rate. Nothing is read back to the host."""
    windows = [request[0] for request in requests]
    count, micro = windows[0].count, windows[0].micro_batch
    if any(w.count != count or w.micro_batch != micro for w in windows):
        raise RuntimeError("ensemble members asked for steps of different shapes")
    for t, (_, lr, _) in zip(members, requests, strict=True):
        for group in t.optimizer.param_groups:
            group["lr"] = lr
    stack.zero_grad()
    first = members[0]
    k = len(members)
    per_example = per_example_loss(first.cfg.loss)
    total = torch.zeros(k, device=first.device)
    correct = torch.zeros(k, dtype=torch.long, device=first.device)
    for batches in zip(*(w.micro_batches() for w in windows), strict=True):
        inputs = torch.cat([x for x, _ in batches], 1)
        targets = torch.stack([y for _, y in batches], 1)  # (n, K)
        with first.autocast or contextlib.nullcontext():
            outputs = stack.module(inputs)
        if outputs.dtype not in (torch.float32, torch.float64):
            outputs = outputs.float()
        outputs = outputs.reshape(len(targets), k, -1)
        losses = per_example(outputs.flatten(0, 1), targets.flatten()).view(-1, k).sum(0)
        (losses.sum() / count).backward()
        total = total + losses.detach()
        correct = correct + (outputs.detach().argmax(2) == targets).sum(0)
    optimizers = [t.optimizer for t in members]
    if first.device.type == "cpu" and stateless_sgd(optimizers):
        stacked_sgd(stack, optimizers)
    else:
        stack.assign_grads()
        for optimizer in optimizers:
            optimizer.step()
    return [StepResult(total[i], correct[i], count) for i in range(k)]


def stateless_sgd(optimizers: Sequence[torch.optim.Optimizer]) -> bool:
    """Whether every optimizer is torch's SGD without momentum (one group, not maximizing): it keeps
    no state, so `stacked_sgd` leaves each exactly as its own step would."""
    return all(
        type(opt) is torch.optim.SGD
        and len(opt.param_groups) == 1
        and opt.param_groups[0]["momentum"] == 0
        and not opt.param_groups[0]["maximize"]
        for opt in optimizers
    )


@torch.no_grad()
def stacked_sgd(stack: Stack, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """torch.optim.SGD's step without momentum, p <- p - lr (g + wd p), of every member as one
    update per stacked tensor, each member's lr and weight decay along its slice (on the CPU,
    K optimizer steps cost K times the per-tensor overhead; here one per tensor)."""
    groups = [opt.param_groups[0] for opt in optimizers]
    dtype = stack.shared[0].grouped.dtype
    neg_lr = torch.tensor([-g["lr"] for g in groups], dtype=dtype)
    decay = torch.tensor([g["weight_decay"] for g in groups], dtype=dtype)
    decays = any(g["weight_decay"] for g in groups)
    for shared in stack.shared:
        if shared.grouped.grad is None:
            continue
        weights, grad = shared.per_member(shared.grouped), shared.per_member(shared.grouped.grad)
        shape = (len(groups),) + (1,) * (weights.dim() - 1)
        if decays:
            grad = torch.addcmul(grad, weights, decay.view(shape))
        weights.addcmul_(grad, neg_lr.view(shape))


# --- the ensemble's runs ---------------------------------------------------------------------


@dataclass
class MemberOutcome:
    """How one member's training ended: its run directory, state (finished, diverged, failed or
    interrupted), last evaluation (finished runs) and the exception that ended it otherwise."""

    run: Path
    state: str
    record: dict[str, Any] | None = None
    error: BaseException | None = None


@dataclass
class _Member:
    run: RunDir
    t: Training
    steps: Steps
    rng: torch.Tensor
    rng_cuda: torch.Tensor | None
    request: StepRequest | None = None
    outcome: MemberOutcome | None = None

    def advance(self, action: Any) -> None:
        """Resume the member's loop (`action`: next, send or throw) with its own RNG state in the
        global generator, until it asks for its next step or ends; a stop at once (a second
        signal, Ctrl-C) is recorded and raised again, to stop every member."""
        torch.set_rng_state(self.rng)
        if self.rng_cuda is not None:
            torch.cuda.set_rng_state(self.rng_cuda, self.t.device)
        try:
            self.request = action()
        except StopIteration as done:
            self._end("finished", record=done.value)
        except RunDiverged as exc:
            self._end("diverged", error=exc)
        except StopRequested as exc:  # after a whole step: every member stops there by itself
            self._end("interrupted", error=exc)
        except KeyboardInterrupt as exc:
            self._end("interrupted", error=exc)
            raise
        except Exception as exc:
            self._end("failed", error=exc)
        finally:
            self.rng = torch.get_rng_state()
            if self.rng_cuda is not None:
                self.rng_cuda = torch.cuda.get_rng_state(self.t.device)

    def _end(self, state: str, record: dict[str, Any] | None = None, error: BaseException | None = None):
        self.request = None
        self.outcome = MemberOutcome(self.run.path, state, record, error)


def start_step(run: RunDir) -> int:
    """The step a run resumes from (its last checkpoint's)."""
    return int(load_checkpoint(run.last_checkpoint, fallback=run.previous_checkpoint)["progress"]["step"])


def train_ensemble(
    cfgs: Sequence[TrainConfig],
    outs: Sequence[str | Path],
    *,
    overwrite: bool = False,
    resume: bool | Sequence[bool] = False,
    dataset: Dataset | None = None,
    progress_bar: bool = True,
) -> list[MemberOutcome]:
    """Train the runs `cfgs` into `outs` as one ensemble; return each member's outcome.

    Each member is the run `sharp.train.train(cfg, out)` would write (config.json records the
    ensemble it trained in under "ensemble"), fresh or resumed (`resume`, one flag or one per
    member; resumed members must all stand at the same step). A member that diverges, fails or
    stops early leaves the ensemble and the others go on. A signal stops every member after a
    whole step (each writes its checkpoint and status) and raises StopRequested; a stop at once
    (a second signal, Ctrl-C) stops every member where it is (each records it) and is raised;
    an error in the stacked step itself is recorded in every member's status and raised.
    """
    if not cfgs or len(cfgs) != len(outs):
        raise SharpError("an ensemble needs one run directory per member, and at least one member")
    _check_shared(cfgs)
    if Distributed.from_env().enabled:
        raise SharpError("an ensemble trains in one process: drop torchrun/--nproc")
    resumed = [resume] * len(cfgs) if isinstance(resume, bool) else list(resume)
    runs = [RunDir(out) for out in outs]
    if len({r.path.resolve() for r in runs}) != len(runs):
        raise SharpError("ensemble members need distinct run directories")
    first = cfgs[0]
    device = runtime.select_device(first.device)
    with (
        runtime.torch_settings(device, deterministic=first.deterministic, tf32=first.tf32) as flags,
        contextlib.ExitStack() as held,
    ):
        for run, again in zip(runs, resumed, strict=True):
            if not again:
                run.prepare_new(overwrite)
            held.enter_context(run.lock())
        steps = {start_step(r) if again else 0 for r, again in zip(runs, resumed, strict=True)}
        if len(steps) > 1:
            raise SharpError(
                f"ensemble members stand at different steps ({sorted(steps)}): resume them apart"
            )
        data = (
            dataset if dataset is not None else load_dataset(first.dataset, first.data_root, first.download)
        )
        signals = held.enter_context(StopSignals())
        members, outcomes = [], {}
        for cfg, run, again in zip(cfgs, runs, resumed, strict=True):
            try:
                t = build(cfg, data)
            except Exception as exc:
                run.set_status("failed", reason=f"{type(exc).__name__}: {exc}")
                outcomes[run.path] = MemberOutcome(run.path, "failed", error=exc)
                continue
            log = MetricsLog(run, True, cfg.tensorboard)
            held.callback(log.close)
            loop = run_steps(t, run, Checkpointer(run), log, flags, again, False, signals)
            cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
            members.append(_Member(run, t, loop, torch.get_rng_state(), cuda_rng))
        try:
            for member in members:
                member.advance(member.steps.__next__)
            _record_membership([m for m in members if m.outcome is None], runs, steps.pop())
            _train_together(members, progress_bar)
        except KeyboardInterrupt as exc:  # stopped at once: every member still training records it
            for member in members:
                if member.request is not None:
                    with contextlib.suppress(KeyboardInterrupt):
                        member.advance(functools.partial(member.steps.throw, exc))
            raise
        finally:
            for member in members:
                outcomes[member.run.path] = member.outcome
        ordered = [outcomes[r.path] for r in runs]
        stopped = [o.error for o in ordered if o.state == "interrupted"]
        if stopped:
            raise stopped[0]
        return ordered


def _train_together(members: list[_Member], bar_enabled: bool) -> None:
    """Answer every active member's step request with one stacked step until none is left."""
    active = [m for m in members if m.request is not None]
    template = copy.deepcopy(active[0].t.model) if active else None
    stack: Stack | None = None
    total = max((m.t.total_steps for m in active), default=0)
    shown = make_progress_bar(
        total=total, unit="step", enabled=bar_enabled, desc=f"ensemble of {len(members)}"
    )
    try:
        with shown:
            while active:
                if stack is None or stack.models != [m.t.model for m in active]:
                    if stack is not None:
                        stack.release()
                    stack = Stack(template, [m.t.model for m in active])
                try:
                    mark = time.perf_counter()
                    results = stacked_step(stack, [m.t for m in active], [m.request for m in active])
                    seconds = time.perf_counter() - mark
                except Exception as exc:
                    for member in active:  # each records it in its status.json
                        member.advance(functools.partial(member.steps.throw, exc))
                    raise
                for member, result in zip(active, results, strict=True):
                    member.advance(functools.partial(member.steps.send, (result, seconds)))
                shown.update()
                still = [m for m in active if m.request is not None]
                if len(still) != len(active):
                    shown.set_postfix(members=len(still))
                active = still
    finally:
        if stack is not None:
            stack.release()


def _record_membership(members: list[_Member], runs: list[RunDir], step: int) -> None:
    """Add this ensemble to each member's config.json: {"members", "member", "runs", "from_step"},
    appended to the list under "ensemble" (one entry per session trained in an ensemble)."""
    names = [r.path.name for r in runs]
    for member in members:
        config = member.run.read_config()
        entry = {
            "members": len(runs),
            "member": [r.path for r in runs].index(member.run.path),
            "runs": names,
            "from_step": step,
            "layout": LAYOUT,
        }
        config["ensemble"] = [*config.get("ensemble", []), entry]
        atomic_write_json(member.run.config, config)


# --- in a sweep -------------------------------------------------------------------------------------


def run_jobs(launcher: Any, jobs: list[tuple], echo: Any, size: int) -> list[str]:
    """`launcher.run` over the sweep's jobs (run directory, settings, probe tables) with the runs
    that can share grouped into ensembles of up to `size`, one launcher job each (its run
    directories, settings and probe tables as lists, run by `execute_ensemble`); returns each
    job's final state, in the jobs' order."""
    groups = group_runs([job[1] for job in jobs], size)
    units = [
        jobs[g[0]] if len(g) == 1 else tuple(list(part) for part in zip(*(jobs[i] for i in g), strict=True))
        for g in groups
    ]
    states: list[str] = [""] * len(jobs)
    for group, state in zip(groups, launcher.run(units, echo), strict=True):
        parts = state.split(",")
        for index, part in zip(
            group, parts if len(parts) == len(group) else [state] * len(group), strict=True
        ):
            states[index] = part
    return states


def _written_elsewhere(run: RunDir) -> bool:
    """Whether another live process holds the run's writer lock (taken and released at once here)."""
    if not run.path.exists():
        return False
    try:
        with run.lock():
            return False
    except RunLocked:
        return True


def execute_ensemble(run_dirs: list[str], settings: list[dict[str, Any]], probes: list[Any]) -> str:
    """`sharp.sweep.execute_run` for runs that can share: train the unfinished ones as ensembles
    (the resumed ones grouped by the step they resume from), then probe each run; return their
    final states, comma-separated. Never raises, but on a stop by a signal."""
    import traceback

    from sharp.sweep import execute_run

    states: dict[int, str] = {}
    waiting: dict[int, list[int]] = {}  # start step -> members
    resumed: dict[int, bool] = {}
    for index, path in enumerate(run_dirs):
        run = RunDir(path)
        state = run.status().get("state") if run.is_run() else None
        if state == "diverged":
            states[index] = "diverged"
        elif state != "finished" and _written_elsewhere(run):
            states[index] = "busy"  # another live process writes it: left alone, as a sweep does
        elif state != "finished":
            resumed[index] = run.is_run() and run.last_checkpoint.exists()
            try:
                step = start_step(run) if resumed[index] else 0
            except SharpError:
                step = -1 - index  # alone: its resume fails and says why
            waiting.setdefault(step, []).append(index)
    for group in waiting.values():
        try:
            outcomes = train_ensemble(
                [make_config(settings[i], {}, TrainConfig) for i in group],
                [run_dirs[i] for i in group],
                resume=[resumed[i] for i in group],
                overwrite=True,
                progress_bar=False,
            )
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # one failing ensemble must not stop the sweep
            for i in group:
                run = RunDir(run_dirs[i])
                state = run.status().get("state") if run.status_file.exists() else None
                if state not in ("finished", "diverged"):
                    reason = f"{type(exc).__name__}: {exc}"
                    run.set_status("failed", reason=reason, traceback=traceback.format_exc())
                    state = "failed"
                if state != "finished":
                    states[i] = state
            continue
        for i, outcome in zip(group, outcomes, strict=True):
            if outcome.state != "finished":
                states[i] = outcome.state
    for index, path in enumerate(run_dirs):
        if index not in states:  # finished: its probes
            states[index] = execute_run(path, settings[index], probes[index])
    return ",".join(states[i] for i in range(len(run_dirs)))
