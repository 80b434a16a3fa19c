"""The (size, mtime_ns) stamps of a listing's files: one stat per row, in blocks, shared among processes for millions
of rows (threads do not help: the GIL is held between the system calls). `stamp_blocks` gives them block by block
in order, for a check that streams the listing rather than holding it. The content digests a split by content needs
(`file_digests`: every file read and hashed) are shared among the same processes, from far fewer rows."""

from __future__ import annotations

import functools
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np

from pipeline.engine.decode import content_hash, file_stamp, read_file
from pipeline.sources.table import FileColumn, TextColumn

T = TypeVar("T")
log = logging.getLogger(__name__)

PARALLEL_STAT_ROWS = 1 << 21  # from about 2M rows, processes share the stats
PARALLEL_HASH_ROWS = 1 << 18  # reading and hashing a file takes 30 us or more: from 262k rows processes pay off
# (their start, a few seconds, is then a small part of the time)
DIGEST_WIDTH = 17  # a row of `file_digests`: BLAKE2b-128 of the file's bytes, then 1 (0 for a file not read)


def stat_workers() -> int:
    return min(os.cpu_count() or 1, 8)


def stat_rows(data: bytes, offsets: np.ndarray) -> np.ndarray:
    """[n, 2] (size, mtime_ns) of a block of file paths (a TextColumn's buffers), (-1, -1) where a file cannot be
    stat'ed: one process's share of a listing's stats."""
    column = TextColumn(data, offsets)
    return np.array([file_stamp(f) for f in column], dtype=np.int64).reshape(-1, 2)


def digest_rows(data: bytes, offsets: np.ndarray, max_bytes: int | None = None) -> np.ndarray:
    """[n, DIGEST_WIDTH] uint8 of a block of file paths: each file's `content_hash` (as 16 bytes) and 1, or zeros
    where it cannot be read or is refused (not a regular file, over `max_bytes`)."""
    column = TextColumn(data, offsets)
    digests = np.zeros((len(column), DIGEST_WIDTH), dtype=np.uint8)
    for i, path in enumerate(column):
        try:
            digests[i, :16] = np.frombuffer(bytes.fromhex(content_hash(read_file(path, max_bytes))), dtype=np.uint8)
        except (OSError, ValueError):
            continue
        digests[i, 16] = 1
    return digests


def file_digests(files: TextColumn | FileColumn, max_bytes: int | None, workers: int | None = None,
                 step: int = 1 << 12, parallel_from: int = PARALLEL_HASH_ROWS) -> np.ndarray:
    """`digest_rows` of every file: in processes from `parallel_from` rows (when they can be started here),
    `step` paths at a time, else in this process. (Threads do not help with small files: the GIL.)"""
    workers = stat_workers() if workers is None else workers
    work = functools.partial(digest_rows, max_bytes=max_bytes)
    if len(files) >= parallel_from and workers > 1:
        digests = _in_processes(files, workers, step, work, DIGEST_WIDTH, np.uint8)
        if digests is not None:
            return digests
    return _filled(files, 1, step, work, DIGEST_WIDTH, np.uint8)


def stamp_blocks(blocks: Iterable[T], files: Callable[[T], TextColumn], workers: int,
                 work: Callable[[bytes, np.ndarray], np.ndarray] = stat_rows) -> Iterator[tuple[T, np.ndarray]]:
    """Each block with the stamps (or what else `work` gives a block of paths) of its `files(block)`, in order:
    found here (`workers` <= 1) or by `workers` processes from the forkserver the decode stage uses, with at most
    two blocks per process in flight. Raises what starting the processes raises (OSError, RuntimeError,
    AssertionError inside a daemonic worker, BrokenProcessPool)."""
    if workers <= 1:
        for block in blocks:
            column = files(block)
            yield block, work(column.data, column.offsets)
        return
    waiting: deque = deque()  # the blocks whose results are still to come, in order

    def jobs() -> Iterator[tuple]:
        for block in blocks:
            column = files(block)
            waiting.append(block)
            yield column.data, column.offsets

    for result in in_order(work, jobs(), workers):
        yield waiting.popleft(), result


def in_order(work: Callable[..., T], jobs: Iterable[tuple], workers: int) -> Iterator[T]:
    """`work(*job)` of each job, in order, by `workers` processes from the forkserver the decode stage uses, at most
    two jobs a process in flight. Raises what starting the processes raises (see `stamp_blocks`)."""
    from concurrent.futures import ProcessPoolExecutor

    from pipeline.engine.loader import forkserver_context

    pending: deque = deque()
    with ProcessPoolExecutor(workers, mp_context=forkserver_context()) as pool:
        for job in jobs:
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
            pending.append(pool.submit(work, *job))
        while pending:
            yield pending.popleft().result()


def file_stamps(files: TextColumn | FileColumn, workers: int | None = None) -> np.ndarray:
    """[n, 2] stamps of each file: in processes from PARALLEL_STAT_ROWS rows (when they can be started here), else in
    this process."""
    workers = stat_workers() if workers is None else workers
    if len(files) >= PARALLEL_STAT_ROWS and workers > 1:
        stamps = stamps_in_processes(files, workers)
        if stamps is not None:
            return stamps
    return _filled(files, 1, 1 << 16)


def stamps_in_processes(files: TextColumn | FileColumn, workers: int, step: int = 1 << 18) -> np.ndarray | None:
    """`file_stamps` by `workers` processes, a block of `step` paths at a time; None when processes cannot be
    started here (e.g. inside a daemonic worker), and the caller stats them itself."""
    return _in_processes(files, workers, step, stat_rows, 2, np.int64)


def _in_processes(files: TextColumn | FileColumn, workers: int, step: int, work: Callable, width: int,
                  dtype: type) -> np.ndarray | None:
    from concurrent.futures.process import BrokenProcessPool

    try:
        return _filled(files, workers, step, work, width, dtype)
    except (OSError, RuntimeError, AssertionError, BrokenProcessPool) as exc:
        log.info("reading the %d files in this process (%s: %s)", len(files), type(exc).__name__, exc)
        return None


def _filled(files: TextColumn | FileColumn, workers: int, step: int, work: Callable = stat_rows, width: int = 2,
            dtype: type = np.int64) -> np.ndarray:
    out = np.empty((len(files), width), dtype=dtype)  # filled in place as the blocks return: no second copy
    blocks = ((start, files.block(start, start + step)) for start in range(0, len(files), step))
    for (start, _), part in stamp_blocks(blocks, lambda block: block[1], workers, work):
        out[start:start + len(part)] = part
    return out
