"""The run directory: its paths, atomic writes, checkpoints, status and writer lock.

```
RUN/config.json         every resolved setting, plus torch version, device, git revision
RUN/metrics.jsonl       one JSON object per evaluation (and per divergence)
RUN/status.json         running | finished | diverged | failed, with a reason
RUN/checkpoints/last.pt everything needed to resume exactly
RUN/checkpoints/epoch-NNNN.pt   with --checkpoint-every
RUN/final.pt            the model's state_dict alone
RUN/probes/*.json       probe results
```
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from sharp.errors import SharpError
from sharp.fileio import append_jsonl, atomic_write_bytes, atomic_write_json, read_json, read_jsonl

__all__ = ["append_jsonl", "atomic_torch_save", "atomic_write_bytes", "atomic_write_json", "read_jsonl"]

RUN_FILES = ("config.json", "metrics.jsonl", "status.json", "final.pt", "run.lock")
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


class RunDir:
    """Paths and state of one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

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

    def refuse_if_written(self) -> None:
        """Refuse to touch a run another live process is writing."""
        holder = self._lock_holder() if self.lock_file.exists() else None
        if holder is not None:
            raise SharpError(
                f"{self.path} is being written by process {holder['pid']} on {holder['host']}; "
                "wait for it, or stop it first"
            )

    def prepare_new(self, overwrite: bool) -> None:
        """Make the directory ready for a fresh run, refusing to lose a finished one."""
        if self.path.exists() and not self.path.is_dir():
            raise SharpError(f"--out {self.path} is a file; choose a directory")
        self.refuse_if_written()
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
        elif self.path.is_dir() and any(self.path.iterdir()) and not overwrite:
            raise SharpError(
                f"--out {self.path} is a non-empty directory that is not a sharp run; choose an empty "
                "or new directory"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)

    @contextlib.contextmanager
    def lock(self):
        """Hold `run.lock` (pid and host) while writing; refuse a second live writer."""
        self.path.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                self.refuse_if_written()
                with contextlib.suppress(FileNotFoundError):
                    self.lock_file.unlink()  # stale: its holder is gone
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            break
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.lock_file.unlink()

    def _lock_holder(self) -> dict[str, Any] | None:
        """The live holder of the lock, or None when the lock is stale."""
        holder = read_json(self.lock_file)
        if holder is None:
            return None
        if holder.get("host") != socket.gethostname():
            return holder  # cannot check a process on another machine: assume alive
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return holder
        return holder
