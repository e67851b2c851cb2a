"""One writer per run directory.

`train` (fresh, --overwrite, --resume), `compare` and `export` hold `RunLock(run_dir)` while they
write there, so a second command on a run that is still being written stops with one line
naming the holder instead of interleaving two runs' files. The lock is `flock` on
`RUN/.lock`: the kernel drops it when its process ends, however it ends, so a lock can never be
left stale by a crash or `kill -9`. The file itself only says who holds it.

Why not the `filelock` package: it opens the lock file with O_TRUNC on every attempt, so a
refused attempt would erase the holder's pid that the message names.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from multitune.errors import MultituneError

LOCK = ".lock"


class RunLock:
    """Exclusive lock on a run dir (created if missing); a context manager."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        if self.fd is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise MultituneError(
                f"{self.run_dir} is in use by another multitune process (pid {holder}): "
                "wait for it to finish or stop it, then try again"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
