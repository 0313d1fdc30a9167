"""Exclusive file locks that the operating system releases when their holder dies.

A lock is `flock(2)` on an open file: the kernel drops it when the process exits, however
it exits (SIGKILL included), so a crashed writer never leaves a lock that blocks the next
one. The lock file is removed on release, so it exists only while someone holds it (or
after a crash, when it is harmless: the next holder takes it at once).

Written on `fcntl.flock` rather than the filelock package for two reasons: removing the
file on release is only safe with the inode check in `acquire` (a waiter may have opened
the old file), which filelock avoids by leaving the file in place; and on a filesystem
without flock, filelock falls back to a marker file that outlives a killed holder, the
defect this module replaces. Here such a filesystem is an error that says so.
POSIX only, like the rest of sharp's file handling.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from sharp.errors import SharpError

_CONTENDED = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}


class LocksUnsupported(SharpError):
    """The filesystem has no working flock (some NFS mounts without their lock service, some FUSE
    filesystems)."""


class ExclusiveLock:
    """An exclusive lock on `path`, held through an open file descriptor."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait: bool = False) -> bool:
        """Take the lock; without `wait`, return False at once if another holder has it."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this lock")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except OSError as exc:
                os.close(fd)
                if exc.errno in _CONTENDED:
                    return False
                raise LocksUnsupported(
                    f"cannot lock {self.path}: the filesystem does not support file locks "
                    f"({os.strerror(exc.errno or 0)}); use a local disk, or NFS with its lock service"
                ) from None
            opened = os.fstat(fd)
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            if current is not None and (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
                self._fd = fd
                return True
            os.close(fd)  # the holder we waited for removed this file on release: lock the new one

    def write(self, text: str) -> None:
        """Replace the lock file's contents (who holds it, for the message a refused writer reads)."""
        if self._fd is None:
            raise RuntimeError(f"{self.path} is not held")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text.encode(), 0)

    def release(self) -> None:
        """Remove the file (still ours: only a holder removes it) and drop the lock."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ExclusiveLock:
        self.acquire(wait=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
