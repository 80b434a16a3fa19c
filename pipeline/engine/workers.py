"""Supervised decoding: batches of a dataset from worker processes, where a worker that dies (a decoder crash) or a
batch slower than the timeout (a hung decoder) never ends the run.

After a failure, what failed is narrowed down in steps:
1. after a crash, the images that may have been in flight are read again by one worker, one batch at a time (after a
   timeout the batch is known: in-order delivery means it is the one waited for);
2. the batch that fails again is read one image at a time, and an image that fails alone, twice, is yielded as a
   failure with the reason; no other image is blamed, since one worker with one task in flight always fails on the
   task it holds;
3. then reading goes on at full speed.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.engine.decode import Batch, ImageDataset
from pipeline.engine.loader import _View, forkserver_context, make_loader, shutdown, worker_processes

log = logging.getLogger(__name__)
PREFETCH = 4  # batches in flight per worker at full speed


def _worker_failure(exc: BaseException, iterator: Any, *, timed_out: bool, timeout: float) -> str | None:
    """Why a DataLoader gave up, when a worker died or was stopped for taking too long (None: any other error)."""
    if not isinstance(exc, RuntimeError) or not ("exited unexpectedly" in str(exc) or "killed by signal" in str(exc)):
        return None
    if timed_out:
        return (f"decoding took longer than {timeout:g} s, twice (a hung decoder?); raise --decode-timeout if such "
                "images are only slow")
    codes = [w.exitcode for w in worker_processes(iterator) if w.exitcode not in (None, 0)]
    how = ""
    if codes and codes[0] < 0:
        try:
            how = f" by {signal.Signals(-codes[0]).name}"
        except ValueError:
            how = f" by signal {-codes[0]}"
    elif codes:
        how = f" with exit code {codes[0]}"
    return f"the decoder crashed: its worker process was killed{how}, twice"


class _Watchdog:
    """Kills a DataLoader's workers when no batch arrives for `timeout` seconds while one is awaited; the loader then
    reports them dead within seconds. (The DataLoader's own timeout would also delay noticing a crashed worker to
    the full timeout.)"""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.deadline = math.inf
        self.iterator: Any = None
        self.ready: Any = None
        self.fired = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="decode-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            if self.ready is not None and self.ready.value == 0 and self.deadline < math.inf:
                self.deadline = time.monotonic() + self.timeout  # no worker has started yet: start-up is not decoding
            if time.monotonic() > self.deadline and not self.fired.is_set():
                workers = worker_processes(self.iterator)
                if any(w.exitcode not in (None, 0) for w in workers):
                    continue  # a worker crashed: the loader reports that itself, within seconds
                self.fired.set()
                for worker in workers:
                    worker.kill()

    def waiting(self, iterator: Any, ready: Any) -> None:
        """A batch is awaited from `iterator` (whose workers count themselves in `ready`) from now on."""
        self.iterator, self.ready, self.deadline = iterator, ready, time.monotonic() + self.timeout

    def paused(self) -> None:
        """Not waiting (the consumer has the batch): time does not count."""
        self.deadline = math.inf

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class _Step:
    """How the next stretch of images is read: `fast` (all workers, whole batches), `careful` (one worker, whole
    batches) or `single` (one worker, one image at a time); `limit` images of what is left; `strikes`: how often the
    first of them failed alone in a row."""

    mode: str
    limit: int
    strikes: int = 0


def _next_step(step: _Step, done: int, failure: str | None, *, timed_out: bool, left: int, workers: int,
               batch_size: int) -> tuple[_Step, bool]:
    """After reading `done` images of a stretch: how to read on, and whether the first image left is to blame."""
    if failure is None:
        return _Step("fast", left), False
    if step.mode == "fast" and timed_out:
        log.warning("a batch was slower to decode than the timeout; reading it one image at a time")
        return _Step("single", batch_size), False
    if step.mode == "fast":
        suspects = (PREFETCH + 1) * workers * batch_size  # what can be in flight: PREFETCH batches a worker
        log.warning("a decode worker died; reading the next %d image(s) with one worker to find the file",
                    min(suspects, left))
        return _Step("careful", suspects, step.strikes), False
    if step.mode == "careful":  # the batch it failed on is the first one not delivered
        return _Step("single", min(batch_size, step.limit - done)), False
    strikes = 1 if done else step.strikes + 1
    return _Step("single", step.limit - done, strikes), strikes >= 2  # twice alone: blame it (not a kill from outside)


def _read(dataset: ImageDataset, order: range, step: _Step, *, workers: int, batch_size: int, pin_memory: bool,
          watchdog: _Watchdog, timeout: float) -> Iterator[Batch]:
    """Yield the batches of one stretch; returns (images done, the failure that ended it or None)."""
    fast = step.mode == "fast"
    ready = forkserver_context().Value("i", 0)
    loader = make_loader(_View(dataset, order[:step.limit]), batch_size=1 if step.mode == "single" else batch_size,
                         workers=workers if fast else 1, pin_memory=pin_memory, prefetch_factor=PREFETCH if fast else 1,
                         ready=ready)
    iterator, done, failure = iter(loader), 0, None
    watchdog.fired.clear()
    try:
        while (batch := _next_batch(iterator, watchdog, ready)) is not None:
            done += len(batch.indices) + len(batch.failures)
            yield batch
    except RuntimeError as exc:
        failure = _worker_failure(exc, iterator, timed_out=watchdog.fired.is_set(), timeout=timeout)
        if failure is None:
            raise
    finally:
        watchdog.paused()
        if failure:
            for worker in worker_processes(iterator):
                worker.kill()  # a hung worker would hold the shutdown for seconds
        shutdown(iterator)
    return done, failure


def _next_batch(iterator: Any, watchdog: _Watchdog, ready: Any) -> Batch | None:
    watchdog.waiting(iterator, ready)
    try:
        return next(iterator)
    except StopIteration:
        return None
    finally:
        watchdog.paused()


def supervised_batches(dataset: ImageDataset, *, batch_size: int, workers: int, timeout: float,
                       pin_memory: bool = False) -> Iterator[Batch]:
    """Batches of `dataset` in order (batch indices are dataset indices), decoded by `workers` supervised processes
    (0: in this thread, unsupervised). Must be iterated off the main thread (see `pipeline.engine.threads.prefetch`),
    where the DataLoader reports a dead worker as an error rather than a signal that could strike anywhere."""
    if workers == 0:
        yield from make_loader(dataset, batch_size=batch_size, workers=0, pin_memory=pin_memory)
        return
    order = range(len(dataset))  # left to read, in reading order (a range: pickled into each worker as two numbers)
    step = _Step("fast", len(order))
    watchdog = _Watchdog(timeout)
    try:
        while len(order):
            done, failure = yield from _read(dataset, order, step, workers=workers, batch_size=batch_size,
                                             pin_memory=pin_memory, watchdog=watchdog, timeout=timeout)
            order = order[done:]
            step, blame = _next_step(step, done, failure, timed_out=watchdog.fired.is_set(), left=len(order),
                                     workers=workers, batch_size=batch_size)
            if blame:
                log.warning("image %d of this run fails alone: %s", int(order[0]), failure)
                yield Batch(indices=np.zeros(0, dtype=np.int64), images=None, failures=[(int(order[0]), failure)],
                            hashes=[])
                order = order[1:]
                step = _Step("single", step.limit - 1) if step.limit > 1 else _Step("fast", len(order))
    finally:
        watchdog.close()
