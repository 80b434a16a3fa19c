"""An exclusive lock on a store, through the file `NAME.lock` beside it, that leaves nothing behind.

The holder removes the lock file while it still holds the lock. A waiter that had opened the same file then gets the
lock on a file that no longer has the name, sees so (the name now leads nowhere, or to another file) and tries
again, so removing the file never lets two writers in. `flock` locks are released by the kernel when a process
dies, so a killed writer never leaves a store locked (its lock file may stay; the next writer takes it over).
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path


class LockTimeout(Exception):
    """Another process held the lock for longer than the timeout."""


class StoreLock:
    def __init__(self, path: str | Path, *, timeout: float = 0.0, poll: float = 0.05) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.poll = poll
        self._fd: int | None = None

    def _try(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            held, named = os.fstat(fd), os.stat(self.path)
        except FileNotFoundError:  # the previous holder removed it after we opened it
            os.close(fd)
            return False
        if (held.st_ino, held.st_dev) != (named.st_ino, named.st_dev):
            os.close(fd)
            return False
        self._fd = fd
        return True

    def acquire(self) -> None:
        deadline = time.monotonic() + self.timeout
        while not self._try():
            if time.monotonic() >= deadline:
                raise LockTimeout(str(self.path))
            time.sleep(self.poll)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding the lock (see the module's docstring)
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
