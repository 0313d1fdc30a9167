"""The run directory: its paths, atomic writes, checkpoints, status and writer lock.

```
RUN/config.json         every resolved setting, plus torch version, device, git revision
RUN/metrics.jsonl       one JSON object per evaluation (and per divergence)
RUN/status.json         running | finished | diverged | failed, with a reason
RUN/checkpoints/last.pt everything needed to resume exactly
RUN/checkpoints/epoch-NNNN.pt   with --checkpoint-every
RUN/final.pt            the model's state_dict alone
RUN/probes/*.json       probe results
RUN/run.lock            while a process writes the run (its pid and host)
```
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sharp.config import TrainConfig, make_config, option_name
from sharp.errors import SharpError
from sharp.fileio import append_jsonl, atomic_write_bytes, atomic_write_json, read_json, read_jsonl
from sharp.locks import ExclusiveLock

__all__ = ["append_jsonl", "atomic_torch_save", "atomic_write_bytes", "atomic_write_json", "read_jsonl"]

RUN_FILES = ("config.json", "metrics.jsonl", "status.json", "final.pt")
RUN_DIRS = ("checkpoints", "probes")


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def keep_previous(path: Path, previous: Path) -> None:
    """Make `previous` a copy of `path` (a hard link where the filesystem allows), atomically,
    so that `path` itself exists at every moment and one older version stays to fall back to."""
    if not path.exists():
        return
    staging = previous.with_name(f".{previous.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        staging.unlink()
    try:
        os.link(path, staging)
    except OSError:
        shutil.copy2(path, staging)
    os.replace(staging, previous)


def load_checkpoint(path: str | Path, fallback: str | Path | None = None) -> Any:
    """`torch.load(weights_only=True)`: a checkpoint is data; a pickle that runs code is refused."""
    path = Path(path)
    hint = f"; fall back to {fallback} (move it to {path.name}) and resume again" if fallback else ""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SharpError(f"checkpoint {path} does not exist{hint}") from None
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe content"
        raise SharpError(
            f"checkpoint {path} is refused: it is not plain tensors and numbers ({first}){hint}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SharpError(f"checkpoint {path} is truncated or corrupt ({first}){hint}") from None


def git_revision() -> str | None:
    """The project's git revision, if it runs from a checkout."""
    source = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class RunLocked(SharpError):
    """Another live process is writing the run."""


class RunDir:
    """Paths and state of one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._held: ExclusiveLock | None = None  # the writer lock, while this object holds it
        self._in_block = False  # inside a `lock()` block

    config = property(lambda self: self.path / "config.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    status_file = property(lambda self: self.path / "status.json")
    checkpoints = property(lambda self: self.path / "checkpoints")
    last_checkpoint = property(lambda self: self.path / "checkpoints" / "last.pt")
    previous_checkpoint = property(lambda self: self.path / "checkpoints" / "last.prev.pt")
    final = property(lambda self: self.path / "final.pt")
    probes = property(lambda self: self.path / "probes")
    lock_file = property(lambda self: self.path / "run.lock")

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch-{epoch:04d}.pt"

    def epoch_checkpoints(self) -> list[Path]:
        return sorted(self.checkpoints.glob("epoch-*.pt"))

    def is_run(self) -> bool:
        return self.config.is_file()

    def status(self) -> dict[str, Any]:
        return read_json(self.status_file) or {"state": "unknown"}

    def set_status(self, state: str, **details: Any) -> None:
        atomic_write_json(self.status_file, {"state": state, "time": time.time(), **details})

    def read_config(self) -> dict[str, Any]:
        try:
            return json.loads(self.config.read_text())
        except FileNotFoundError:
            raise SharpError(f"{self.path} is not a run directory (no config.json)") from None
        except json.JSONDecodeError as exc:
            raise SharpError(f"{self.config} is corrupt ({exc}); re-run with --overwrite") from None

    def clear(self) -> None:
        """Remove the files a run writes (and nothing else in the directory)."""
        for name in RUN_FILES:
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()
        for name in RUN_DIRS:
            shutil.rmtree(self.path / name, ignore_errors=True)

    def prepare_new(self, overwrite: bool) -> None:
        """Make the directory ready for a fresh run, refusing to lose a finished one.

        Takes the writer lock first (kept by the `lock()` that follows), so that no other
        process can come between these checks and the run that follows them.
        """
        if self.path.exists() and not self.path.is_dir():
            raise SharpError(f"--out {self.path} is a file; choose a directory")
        taken = self._held is None
        if taken:
            self._held = self._acquire_lock()
        try:
            self._check_and_clear(overwrite)
        except BaseException:
            if taken:
                self._release_lock()
            raise

    def _check_and_clear(self, overwrite: bool) -> None:
        if self.is_run():
            state = self.status().get("state")
            if not overwrite:
                if state == "finished":
                    raise SharpError(
                        f"--out {self.path} holds a finished run; pass --overwrite to replace it "
                        "or choose another --out"
                    )
                raise SharpError(
                    f"--out {self.path} holds an unfinished run ({state}); pass --resume {self.path} "
                    "to continue it or --overwrite to start again"
                )
            self.clear()
        elif self._foreign_entries():
            if not overwrite:
                raise SharpError(
                    f"--out {self.path} is a non-empty directory that is not a sharp run; choose an empty "
                    "or new directory"
                )
        else:
            self.clear()  # at most what a run killed before its config.json left
        self.checkpoints.mkdir(exist_ok=True)

    def _foreign_entries(self) -> list[str]:
        """What the directory holds besides a run's own files (a run killed before its
        config.json leaves some of those, and they may go)."""
        own = {*RUN_FILES, *RUN_DIRS, self.lock_file.name}
        return [entry.name for entry in self.path.iterdir() if entry.name not in own]

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold `run.lock` while writing; refuse a second writer (`RunLocked`).

        The lock is the operating system's (`sharp.locks`): the kernel drops it when this
        process dies, so a killed writer's run is taken over at once. The file names the
        holder's pid and host, for the refusal message. A lock `prepare_new` took on this
        RunDir is kept rather than taken again.
        """
        if self._held is None or self._in_block:
            self._held = self._acquire_lock()  # in a block already: a second writer, refused
        self._in_block = True
        try:
            yield
        finally:
            self._in_block = False
            self._release_lock()

    def _acquire_lock(self) -> ExclusiveLock:
        self.path.mkdir(parents=True, exist_ok=True)
        lock = ExclusiveLock(self.lock_file)
        if not lock.acquire():
            raise RunLocked(
                f"{self.path} is being written by {self._holder()}; wait for it, or stop it first"
            )
        lock.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        return lock

    def _release_lock(self) -> None:
        if self._held is not None:
            self._held.release()
            self._held = None

    def _holder(self) -> str:
        """Who holds the lock, as its file says (empty for the instant after it was taken)."""
        holder = read_json(self.lock_file)
        if isinstance(holder, dict) and {"pid", "host"} <= holder.keys():
            return f"process {holder['pid']} on {holder['host']}"
        return "another process"


def default_run_dir(cfg: TrainConfig) -> Path:
    """`runs/DATASET-MODEL-BBATCH-seedSEED`, where `sharp train` puts a run without --out."""
    dataset = re.sub(r"[^A-Za-z0-9]+", "-", Path(cfg.dataset.replace("folder:", "")).name or cfg.dataset)
    return Path("runs") / f"{dataset}-{cfg.model}-B{cfg.batch_size}-seed{cfg.seed}"


@dataclass(frozen=True)
class Resume:
    """How a run continues: with its own settings, from its last checkpoint or from step 0."""

    config: TrainConfig
    from_checkpoint: bool  # False: it was stopped before its first checkpoint; nothing to lose


def plan_resume(path: str | Path, given: dict[str, Any] | None = None) -> Resume:
    """The resume policy of `sharp train --resume` and `sharp sweep`: a run continues with the
    settings of its config.json (an option in `given` that differs from them is refused), from
    checkpoints/last.pt, or from step 0 when it was stopped before writing one."""
    run = RunDir(path)
    if not run.is_run():
        raise SharpError(
            f"--resume {path}: no config.json, so the run's settings are unknown; start it again "
            "with its options and --out"
        )
    stored = run.read_config()["settings"]
    if run.status().get("state") == "finished":
        raise SharpError(f"--resume {path}: the run already finished; nothing to continue")
    if not run.last_checkpoint.exists() and run.previous_checkpoint.exists():
        raise SharpError(
            f"--resume {path}: no checkpoints/last.pt to continue from; fall back to "
            f"{run.previous_checkpoint} (move it to last.pt)"
        )
    for name, value in (given or {}).items():
        if value is not None and stored.get(name) != value:
            raise SharpError(
                f"{option_name(name)} {value} conflicts with the run's {name} = {stored.get(name)!r}: "
                "a resumed run keeps its settings, so drop the option"
            )
    return Resume(make_config(stored, {}), run.last_checkpoint.exists())
