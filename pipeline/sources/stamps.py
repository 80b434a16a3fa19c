"""The (size, mtime_ns) stamps of a listing's files: one stat per row, in blocks, shared among processes for millions
of rows (threads do not help: the GIL is held between the system calls). `stamp_blocks` gives them block by block
in order, for a check that streams the listing rather than holding it."""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np

from pipeline.engine.decode import file_stamp
from pipeline.sources.table import FileColumn, TextColumn

T = TypeVar("T")
log = logging.getLogger(__name__)

PARALLEL_STAT_ROWS = 1 << 21  # from about 2M rows, processes share the stats


def stat_workers() -> int:
    return min(os.cpu_count() or 1, 8)


def stat_rows(data: bytes, offsets: np.ndarray) -> np.ndarray:
    """[n, 2] (size, mtime_ns) of a block of file paths (a TextColumn's buffers), (-1, -1) where a file cannot be
    stat'ed: one process's share of a listing's stats."""
    column = TextColumn(data, offsets)
    return np.array([file_stamp(f) for f in column], dtype=np.int64).reshape(-1, 2)


def stamp_blocks(blocks: Iterable[T], files: Callable[[T], TextColumn], workers: int) -> Iterator[tuple[T, np.ndarray]]:
    """Each block with the stamps of its `files(block)`, in order: stat'ed here (`workers` <= 1) or by `workers`
    processes from the forkserver the decode stage uses, with at most two blocks per process in flight. Raises
    what starting the processes raises (OSError, RuntimeError, AssertionError inside a daemonic worker,
    BrokenProcessPool)."""
    if workers <= 1:
        for block in blocks:
            column = files(block)
            yield block, stat_rows(column.data, column.offsets)
        return
    from concurrent.futures import ProcessPoolExecutor

    from pipeline.engine.loader import forkserver_context

    pending: deque = deque()
    with ProcessPoolExecutor(workers, mp_context=forkserver_context()) as pool:
        for block in blocks:
            if len(pending) >= 2 * workers:
                done, future = pending.popleft()
                yield done, future.result()
            column = files(block)
            pending.append((block, pool.submit(stat_rows, column.data, column.offsets)))
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


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
    from concurrent.futures.process import BrokenProcessPool

    try:
        return _filled(files, workers, step)
    except (OSError, RuntimeError, AssertionError, BrokenProcessPool) as exc:
        log.info("stat'ing the %d files in this process (%s: %s)", len(files), type(exc).__name__, exc)
        return None


def _filled(files: TextColumn | FileColumn, workers: int, step: int) -> np.ndarray:
    stamps = np.empty((len(files), 2), dtype=np.int64)  # filled in place as the blocks return: no second copy
    blocks = ((start, files.block(start, start + step)) for start in range(0, len(files), step))
    for (start, _), part in stamp_blocks(blocks, lambda block: block[1], workers):
        stamps[start:start + len(part)] = part
    return stamps
