"""A listing's path column shared by the decode workers through one mapped file, instead of a pickled copy each.

A DataLoader pickles its dataset into every worker it starts, so with a column of N paths each worker held its own
unpickled copy (about 26 bytes a row for relative paths: 260 MiB a worker at 10M rows, 4 GiB with 16 workers). Here
the column's offsets and bytes are written once to an unlinked temporary file; the column that travels to a worker
pickles as the path by which the main process holds that file open (`/proc/PID/fd/N`), and the worker maps it
read-only. Its pages are the page cache's, shared by all workers and the main process, not private memory of each;
the file disappears with the last process that holds it (a killed run leaves nothing behind).

Where files cannot be reopened through /proc (not Linux), or the temporary folder (`TMPDIR`) cannot take the file,
the column is left as it is (pickled into each worker, as before). On a tmpfs `TMPDIR` the file is memory, but once
for all workers.
"""

from __future__ import annotations

import logging
import mmap
import os
import tempfile
from typing import IO, Any

import numpy as np

from pipeline.sources.table import FileColumn, TextColumn

log = logging.getLogger(__name__)
_HEADER = np.dtype("<i8")


class SharedText(TextColumn):
    """A `TextColumn` over a mapped file: `offsets` and `data` are views of the mapping. Pickles as the file's
    /proc path (`where`) and its sizes; `held` keeps the file open in the process that wrote it."""

    __slots__ = ("where", "held", "mapping")

    def __init__(self, where: str, rows: int, size: int, held: IO[bytes] | None = None) -> None:
        if held is not None:  # the process that wrote it maps its own handle: no second open of the /proc path
            mapping = mmap.mmap(held.fileno(), 0, access=mmap.ACCESS_READ)  # never empty: the offsets come first
        else:
            with open(where, "rb") as fh:
                mapping = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        offsets = np.frombuffer(mapping, dtype=_HEADER, count=rows + 1)
        data = memoryview(mapping)[(rows + 1) * _HEADER.itemsize:]
        if len(data) != size:
            raise OSError(f"the shared path column {where} holds {len(data)} bytes, expected {size}")
        super().__init__(data, offsets)
        self.where, self.held, self.mapping = where, held, mapping

    def __reduce__(self) -> tuple:
        return SharedText, (self.where, len(self), len(self.data))

    def __repr__(self) -> str:
        return f"SharedText({len(self)} rows, {len(self.data)} bytes, {self.where})"


def _proc_path(fh: IO[bytes]) -> str | None:
    """The path another process of this user opens `fh` by, if this system has one."""
    where = f"/proc/{os.getpid()}/fd/{fh.fileno()}"
    return where if os.path.exists(where) else None


def share_text(column: TextColumn) -> TextColumn:
    """`column` as a `SharedText` (written once to an unlinked temporary file), or as it is where sharing cannot
    work."""
    if isinstance(column, SharedText) or len(column) == 0:
        return column
    fh = None
    try:
        fh = tempfile.TemporaryFile(prefix="featpipe-paths-")
        where = _proc_path(fh)
        if where is None:
            fh.close()
            return column
        fh.write(np.ascontiguousarray(column.offsets, dtype=_HEADER).data)
        fh.write(memoryview(column.data))
        fh.flush()
        return SharedText(where, len(column), len(column.data), held=fh)
    except OSError as exc:  # e.g. the temporary folder is full: each worker gets its pickled copy, as before
        if fh is not None:
            fh.close()
        log.warning("could not share the path column with the decode workers (%s); each gets its own copy", exc)
        return column


def share_locators(locators: Any) -> Any:
    """The locators a DataLoader's workers receive: a path column shared through a mapped file (`share_text`);
    other locators (tar members, views, lists) as they are."""
    if isinstance(locators, FileColumn):
        return FileColumn(locators.base, share_text(locators.texts))
    if isinstance(locators, TextColumn):
        return share_text(locators)
    return locators
