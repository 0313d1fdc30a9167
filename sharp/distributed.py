"""One run across several processes (torchrun): who this process is, and the few collectives
the trainer needs.

Gradients are all-reduced once per optimizer step, as one flat buffer, after every
micro-batch of the step has run its backward: no communication on the other micro-steps.
This is done by hand rather than with DistributedDataParallel, whose `no_sync` still needs
every rank to run the same number of backward passes, which a short last window split over
the ranks does not give; the summed loss is normalized by the global count of the window,
so the sum over ranks is exactly the gradient of the window's mean loss.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sharp.gradients import flat_grad


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job: rank, world size and local rank (single process: 0, 1, 0)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Distributed:
        """Read the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """Each rank takes its own GPU (LOCAL_RANK); CPU ranks share the CPU."""
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    @contextlib.contextmanager
    def session(self, device: torch.device) -> Iterator[None]:
        """Join the process group (nccl on GPUs, gloo on CPU) for the duration of a run."""
        if not self.enabled or dist.is_initialized():
            yield
            return
        if device.type == "cuda":
            torch.cuda.set_device(self.local_rank)
        # torch.distributed.nn.functional binds `group.WORLD` as a default argument when it is
        # first imported (torch imports it on building the first optimizer); imported after
        # init_process_group it would hold the process group past destroy_process_group, to be
        # torn down at interpreter exit, where Gloo's threads can abort the process (SIGABRT).
        import torch.distributed.nn as _bound_early  # noqa: F401

        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        try:
            yield
        finally:
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_parameters(self, tensors: Iterable[torch.Tensor]) -> None:
        """Start every rank from rank 0's weights."""
        if self.enabled:
            for tensor in tensors:
                dist.broadcast(tensor.data, src=0)

    def all_reduce_step(self, params: list[torch.nn.Parameter], values: torch.Tensor) -> torch.Tensor:
        """Sum the step's gradients over ranks, and with them the 1-D tensor `values` (loss sum,
        correct count, stop flag, noise-scale sums, ...), in one all-reduce; returns the summed
        values (in the gradients' dtype). Nothing is read back to the host."""
        if not self.enabled:
            return values
        grads = flat_grad(params)
        flat = torch.cat([grads, values.to(grads)])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return flat[offset:].clone()

    def average_buffers(self, model: torch.nn.Module) -> None:
        """Give every rank the mean over ranks of each floating-point buffer (BN running means
        and variances), so that what is evaluated and saved reflects every rank's data, not
        rank 0's share alone. Integer buffers (BN's batch counters) are the same on every rank."""
        if not self.enabled:
            return
        buffers = [b for b in model.buffers() if b.is_floating_point()]
        if not buffers:
            return
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        with torch.no_grad():
            for b in buffers:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()

    def agree(self, flag: bool) -> bool:
        """Rank 0's decision, on every rank (to stop together)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1 if flag else 0])
        if dist.get_backend() == "nccl":
            value = value.cuda()
        dist.broadcast(value, src=0)
        return bool(value.item())


def launch_torchrun(
    nproc: int,
    settings: dict[str, object],
    out: str | os.PathLike[str],
    *,
    overwrite: bool,
    resume: bool,
    quiet: bool,
) -> int:
    """`sharp train --nproc N`: run `torchrun --standalone --nproc_per_node N -m sharp train ...`
    on this machine and return its exit code. A fresh run's `settings` (TrainConfig.to_dict())
    reach every rank as a settings file; a resumed run is read from its own config.json."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from sharp.errors import SharpError

    if "WORLD_SIZE" in os.environ:
        raise SharpError("--nproc is for launching; under torchrun already, drop it")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += ["-m", "sharp", "train"]
    with tempfile.TemporaryDirectory() as folder:
        if resume:
            command += ["--resume", str(out)]
        else:
            path = Path(folder) / "settings.json"
            path.write_text(json.dumps({"settings": settings}))
            command += ["--config", str(path), "--out", str(out)] + (["--overwrite"] if overwrite else [])
        command += ["--quiet"] if quiet else []
        return subprocess.call(command)
