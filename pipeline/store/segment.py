"""One HDF5 file of store rows (an entry, a partial or a shard): features and row datasets appended batch by batch,
each append flushed and then counted in an explicit `committed_rows` attribute (after a crash, SIGKILL included, a
dataset may be longer than what was committed, and the count is what is trusted)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.store.schema import HASH_DTYPE, SCHEMA_VERSION, STR_DTYPE, attrs_to_dict

log = logging.getLogger(__name__)
CHUNK_BYTES = 1 << 20  # ~1 MiB chunks: fast sequential writes and chunk-aligned reads (see NOTES)
COPY_BYTES = 64 << 20  # rows are copied from an old store in blocks of about this size
SPATIAL = "spatial"  # --keep-spatial activations [N, *shape]
ARRAYS = ("features", SPATIAL)
COLUMNS = (("ids", STR_DTYPE), ("labels", np.int64), ("splits", STR_DTYPE), ("files/size", np.int64),
           ("files/mtime_ns", np.int64), ("files/hash", HASH_DTYPE))


def row_bytes(ds: h5py.Dataset) -> int:
    return int(ds.dtype.itemsize * np.prod(ds.shape[1:], dtype=np.int64))


def copy_step(datasets: dict[str, h5py.Dataset]) -> int:
    """Rows per block when copying rows, so that a block of the widest dataset is about COPY_BYTES."""
    return max(1, COPY_BYTES // max(1, max(row_bytes(ds) for name, ds in datasets.items() if name in ARRAYS)))


def as_hashes(hashes: Sequence[str] | np.ndarray) -> np.ndarray:
    return np.asarray([h.encode() if isinstance(h, str) else h for h in hashes], dtype=HASH_DTYPE)


class Segment:
    """One HDF5 file of rows (features + row datasets) with an explicit committed row count."""

    def __init__(self, path: Path, file: h5py.File) -> None:
        self.path = path
        self.file = file
        self.rows = int(file.attrs["committed_rows"])
        # Hold every dataset open: HDF5 writes a dataset's cached chunks when its last handle closes, and an error
        # there (disk full) is only printed; with the handles held, it surfaces at flush() as an exception.
        self.datasets = {name: file[name] for name in ("features", *(c for c, _ in COLUMNS))}
        if SPATIAL in file:  # --keep-spatial: un-pooled activations, row-aligned like the features
            self.datasets[SPATIAL] = file[SPATIAL]

    @classmethod
    def create(cls, path: Path, *, dim: int, dtype: str, compression: str, attrs: dict[str, Any],
               max_rows: int | None = None, spatial: tuple[tuple[int, ...], str] | None = None) -> Segment:
        """A new segment; `spatial` = (shape per row, dtype) adds the activations dataset, chunked per row."""
        f = h5py.File(path, "w")
        rows_per_chunk = max(1, min(CHUNK_BYTES // (np.dtype(dtype).itemsize * dim), max_rows or 1 << 62))
        f.create_dataset("features", shape=(0, dim), maxshape=(None, dim), dtype=dtype, chunks=(rows_per_chunk, dim),
                         fillvalue=np.nan, compression=None if compression == "none" else compression)
        for name, dtype_ in COLUMNS:
            f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype_, chunks=(min(4096, max_rows or 4096),))
        if spatial is not None:
            shape, spatial_dtype = spatial
            f.create_dataset(SPATIAL, shape=(0, *shape), maxshape=(None, *shape), dtype=spatial_dtype,
                             chunks=(1, *shape), fillvalue=np.nan)
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["complete"] = False
        f.attrs["committed_rows"] = 0
        f.flush()
        return cls(path, f)

    @classmethod
    def reopen(cls, path: Path) -> Segment:
        """Open an interrupted segment for appending, cutting every dataset back to the committed row count."""
        f = open_segment(path, "r+")
        segment = cls(path, f)
        for ds in segment.datasets.values():
            if ds.shape[0] != segment.rows:
                ds.resize(segment.rows, axis=0)
        f.flush()
        return segment

    def append(self, features: np.ndarray, columns: dict[str, Any]) -> None:
        n = len(features)
        if not n:
            return
        f = self.file
        start = self.rows
        for name, values in (("features", features), *columns.items()):
            ds = self.datasets[name]
            ds.resize(start + n, axis=0)
            ds[start:] = values
        f.flush()
        self.rows += n
        f.attrs["committed_rows"] = self.rows  # after the data, then flushed: trust this count, not the shapes
        f.flush()

    def compact(self, keep: np.ndarray) -> None:
        """Drop rows where `keep` is False, in place; a crash meanwhile leaves 0 committed rows, never wrong ones."""
        f = self.file
        f.attrs["committed_rows"] = 0
        f.flush()
        ds = self.datasets
        step = copy_step(ds)
        write = 0
        for start in range(0, self.rows, step):
            stop = min(self.rows, start + step)
            block_keep = keep[start:stop]
            k = int(block_keep.sum())
            if k:
                for d in ds.values():  # read fully before writing: the destination never passes the source
                    d[write:write + k] = d[start:stop][block_keep]
            write += k
        for d in ds.values():
            d.resize(write, axis=0)
        self.rows = write
        f.flush()
        f.attrs["committed_rows"] = write
        f.flush()

    def close(self, *, complete: bool) -> None:
        if complete:
            self.file.attrs["complete"] = True
        self.datasets.clear()
        self.file.close()

    def close_after_error(self) -> None:
        """After a failed write: cut the datasets back to the committed rows, so that the chunks HDF5 could not write
        fall out of its cache and the file can still be closed cleanly (otherwise HDF5 retries them at exit)."""
        for ds in self.datasets.values():
            try:
                ds.resize(self.rows, axis=0)
            except Exception:  # noqa: BLE001 - best effort; the committed count already protects the rows
                log.debug("could not cut %s back after an error", ds.name, exc_info=True)
        try:
            self.file.flush()
        except Exception:  # noqa: BLE001
            log.debug("flush after an error failed for %s", self.path, exc_info=True)
        self.datasets.clear()
        self.file.close()


def open_segment(path: Path, mode: str) -> h5py.File:
    """Open a segment file; one cut short by a failed write (e.g. a file-size limit) is padded back first.

    When the last write fails, the file can end before the end-of-file address HDF5 recorded, and HDF5 refuses it.
    The missing tail only held uncommitted data, so padding the file with zeros up to that address is safe.
    """
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        found = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", str(exc))
        if not found or int(found.group(2)) <= int(found.group(1)):
            raise
        log.warning("%s ends before its recorded end of file (a write failed); padding it to resume", path.name)
        os.truncate(path, int(found.group(2)))
        return h5py.File(path, mode)


def short_error(exc: BaseException) -> str:
    """The useful part of an HDF5 I/O error (e.g. 'No space left on device'), on one line."""
    found = re.search(r"error message = '([^']+)'", str(exc))
    return found.group(1) if found else str(exc).splitlines()[0]


def read_index(path: Path) -> tuple[dict[str, Any], list[str], np.ndarray, np.ndarray]:
    """(attrs, ids, stamps [n, 2], hashes) of the committed rows of a segment file."""
    with open_segment(path, "r") as f:
        attrs = attrs_to_dict(f.attrs)
        n = int(attrs["committed_rows"])
        ids = list(f["ids"].asstr()[:n])
        stamps = np.stack([f["files/size"][:n], f["files/mtime_ns"][:n]], axis=1)
        hashes = f["files/hash"][:n]
    return attrs, ids, stamps, hashes
