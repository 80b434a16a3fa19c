"""Writing a feature store: streamed batch by batch, crash-safe, resumable and incremental, one file or shards.

The writer is given the listing (every row the finished store must account for) and first reuses what it can:
- rows committed by an interrupted run (`<entry>.partial`, or shard files in `<entry>.shards/`): the resume;
- rows of the existing complete store whose image is unchanged: the incremental run.
An image is unchanged when its size and mtime match, or, when they differ, its content hash still matches. Reused
features are copied bit for bit (the cache key guarantees the same bytes); labels, splits and file stamps always
come from the current listing. `prepare()` returns the rows left to compute; `write`/`fail` take them; `finish()`
checks that every row is either written or failed, marks the store complete and renames it into place. Unreferenced
shard files are deleted only after that rename, so the last complete store stays readable until then.

Every append is flushed, then an explicit `committed_rows` attribute is written and flushed: after a crash (SIGKILL
included) a dataset may be longer than what was committed, and the count is what is trusted.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import secrets
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.config import COMPRESSIONS, FEATURE_DTYPES
from pipeline.errors import StoreError
from pipeline.store.lock import LockTimeout, StoreLock
from pipeline.store.read import (
    HASH_DTYPE,
    SCHEMA_VERSION,
    STR_DTYPE,
    attrs_to_dict,
    layout_attrs,
    lock_path,
    partial_path,
    shard_list,
    shards_dir,
)

log = logging.getLogger(__name__)
CHUNK_BYTES = 1 << 20  # ~1 MiB chunks: fast sequential writes and chunk-aligned reads (see NOTES)
COPY_BYTES = 64 << 20  # rows are copied from an old store in blocks of about this size
_COLUMNS = (("ids", STR_DTYPE), ("labels", np.int64), ("splits", STR_DTYPE), ("files/size", np.int64),
            ("files/mtime_ns", np.int64), ("files/hash", HASH_DTYPE))


@dataclass(frozen=True)
class Listing:
    """The rows a store must account for, in order: ids, labels, splits and each image's (size, mtime_ns) stamp.

    `hasher(position)` gives the content hash of an image whose stamp changed, to see whether its content did (the
    same hash the decode stage records); without it a changed stamp means a changed image.
    """

    ids: list[str]
    labels: np.ndarray
    splits: list[str]
    stamps: np.ndarray
    hasher: Callable[[int], str] | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        if not (len(self.labels) == len(self.splits) == len(self.stamps) == n):
            raise StoreError("a store listing needs ids, labels, splits and stamps of the same length")

    def __len__(self) -> int:
        return len(self.ids)


def _as_hashes(hashes: Sequence[str] | np.ndarray) -> np.ndarray:
    return np.asarray([h.encode() if isinstance(h, str) else h for h in hashes], dtype=HASH_DTYPE)


class _Segment:
    """One HDF5 file of rows (features + row datasets) with an explicit committed row count."""

    def __init__(self, path: Path, file: h5py.File) -> None:
        self.path = path
        self.file = file
        self.rows = int(file.attrs["committed_rows"])
        # Hold every dataset open: HDF5 writes a dataset's cached chunks when its last handle closes, and an error
        # there (disk full) is only printed; with the handles held, it surfaces at flush() as an exception.
        self.datasets = {name: file[name] for name in ("features", *(c for c, _ in _COLUMNS))}

    @classmethod
    def create(cls, path: Path, *, dim: int, dtype: str, compression: str, attrs: dict[str, Any],
               max_rows: int | None = None) -> _Segment:
        f = h5py.File(path, "w")
        rows_per_chunk = max(1, min(CHUNK_BYTES // (np.dtype(dtype).itemsize * dim), max_rows or 1 << 62))
        f.create_dataset("features", shape=(0, dim), maxshape=(None, dim), dtype=dtype, chunks=(rows_per_chunk, dim),
                         fillvalue=np.nan, compression=None if compression == "none" else compression)
        for name, dtype_ in _COLUMNS:
            f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype_, chunks=(min(4096, max_rows or 4096),))
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["complete"] = False
        f.attrs["committed_rows"] = 0
        f.flush()
        return cls(path, f)

    @classmethod
    def reopen(cls, path: Path) -> _Segment:
        """Open an interrupted segment for appending, cutting every dataset back to the committed row count."""
        f = _open_segment(path, "r+")
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
        step = max(1, COPY_BYTES // max(1, ds["features"].dtype.itemsize * ds["features"].shape[1]))
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


def _open_segment(path: Path, mode: str) -> h5py.File:
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


def _short_error(exc: BaseException) -> str:
    """The useful part of an HDF5 I/O error (e.g. 'No space left on device'), on one line."""
    found = re.search(r"error message = '([^']+)'", str(exc))
    return found.group(1) if found else str(exc).splitlines()[0]


def _read_index(path: Path) -> tuple[dict[str, Any], list[str], np.ndarray, np.ndarray]:
    """(attrs, ids, stamps [n, 2], hashes) of the committed rows of a segment file."""
    with _open_segment(path, "r") as f:
        attrs = attrs_to_dict(f.attrs)
        n = int(attrs["committed_rows"])
        ids = list(f["ids"].asstr()[:n])
        stamps = np.stack([f["files/size"][:n], f["files/mtime_ns"][:n]], axis=1)
        hashes = f["files/hash"][:n]
    return attrs, ids, stamps, hashes


class StoreWriter:
    """Writes one store, reusing what earlier runs left; the only stateful part of extraction.

    Use as a context manager (it holds an exclusive lock on the store for its whole life), call `prepare()` to learn
    which listing rows to compute, then `write`/`fail` them, then `finish()`.
    """

    def __init__(self, path: str | Path, *, listing: Listing, dim: int, attrs: dict[str, Any],
                 feature_dtype: str = "float32", compression: str = "none", shard_rows: int | None = None,
                 check_content: bool = False, lock_timeout: float = 0.0, keep_store_id: bool = True) -> None:
        self.path = Path(path)
        self.listing = listing
        self.dim = int(dim)
        if feature_dtype not in FEATURE_DTYPES:
            raise StoreError(f"feature dtype {feature_dtype!r} is not supported; choose one of {FEATURE_DTYPES}")
        if compression not in COMPRESSIONS:
            raise StoreError(f"compression {compression!r} is not supported; choose one of {COMPRESSIONS}")
        if shard_rows is not None and shard_rows < 1:
            raise StoreError(f"shard rows must be >= 1, got {shard_rows}")
        self.dtype = feature_dtype
        self.compression = compression
        self.shard_rows = shard_rows
        self.check_content = check_content
        self.keep_store_id = keep_store_id
        self.attrs = {**attrs, "feature_dtype": feature_dtype, "feature_dim": self.dim,
                      **layout_attrs(shard_rows=shard_rows, compression=compression)}
        self.key = attrs.get("cache_key")
        self._index = {sample_id: i for i, sample_id in enumerate(listing.ids)}
        if len(self._index) != len(listing.ids):
            raise StoreError(f"duplicate ids in the listing for {self.path}")
        self._lock = StoreLock(lock_path(self.path), timeout=lock_timeout)
        self._done = np.zeros(len(listing), dtype=bool)
        self._hash_cache: dict[int, str] = {}
        self._target: _Segment | None = None
        self._kept_shards: list[dict[str, Any]] = []
        self._new_shards: list[dict[str, Any]] = []
        self._run = secrets.token_hex(4)
        self._store_shards: set[str] | None = None
        self._failed: list[tuple[str, str]] = []
        self.resumed = 0  # rows taken from an interrupted run
        self.kept = 0  # rows taken from the previous complete store
        self.computed = 0
        self.prepared = False

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def __enter__(self) -> StoreWriter:
        if self._lock.timeout:
            log.info("waiting up to %.0f s for the lock on %s", self._lock.timeout, self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        except LockTimeout as exc:
            raise StoreError(f"another process is writing {self.path} (lock {lock_path(self.path).name}); wait for it "
                             "to finish (--wait SECONDS) or write to another --out") from exc
        self._previous_hook = sys.unraisablehook
        sys.unraisablehook = self._quiet_write_errors
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        try:
            if self._target is not None:
                try:
                    if exc_type is None:
                        self._target.close(complete=False)
                    else:
                        self._target.close_after_error()
                except Exception:  # noqa: BLE001 - already failing; the committed count keeps the file consistent
                    if exc_type is None:
                        raise
                    log.debug("closing %s after an error failed", self._target.path, exc_info=True)
                self._target = None
        finally:
            sys.unraisablehook = self._previous_hook
            self._lock.release()

    def _quiet_write_errors(self, info: Any) -> None:
        """HDF5 reports a failed write once as an exception (raised as StoreError) and again from handle destructors,
        which Python prints as 'Exception ignored'; keep the repeats out of the user's terminal."""
        if "write failed" in str(info.exc_value):
            log.debug("repeated HDF5 write error: %s", info.exc_value)
        else:
            self._previous_hook(info)

    @property
    def rows(self) -> int:
        return int(self._done.sum()) - len(self._failed)

    @property
    def failures(self) -> int:
        return len(self._failed)

    @property
    def failed(self) -> list[tuple[str, str]]:
        """(id, reason) of every image recorded as failed so far."""
        return list(self._failed)

    # -- planning: what can be reused -------------------------------------------------------------------------------

    def _usable(self, path: Path) -> bool:
        """A segment file we may take rows from: a feature-store segment with our cache key and dimension."""
        try:
            with _open_segment(path, "r") as f:
                a = f.attrs
                return (int(a.get("schema_version", -1)) == SCHEMA_VERSION and a.get("cache_key") == self.key
                        and a.get("layout", "single") != "sharded" and "committed_rows" in a and "features" in f
                        and f["features"].shape[1:] == (self.dim,) and all(c in f for c, _ in _COLUMNS))
        except (OSError, KeyError, ValueError):
            return False

    def _current_hash(self, position: int) -> str:
        if position not in self._hash_cache:
            self._hash_cache[position] = self.listing.hasher(position) if self.listing.hasher else ""
        return self._hash_cache[position]

    def _valid(self, ids: list[str], stamps: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        """For rows of a source: (positions in the listing or -1, usable mask, all usable without rehashing)."""
        positions = np.fromiter((self._index.get(i, -1) for i in ids), dtype=np.int64, count=len(ids))
        usable = positions >= 0
        usable[usable] &= ~self._done[positions[usable]]
        # a source never lists an id twice, but guard anyway: the first occurrence wins
        _, first = np.unique(np.where(usable, positions, -1), return_index=True)
        once = np.zeros(len(ids), dtype=bool)
        once[first] = True
        usable &= once
        same_stamp = np.zeros(len(ids), dtype=bool)
        same_stamp[usable] = (stamps[usable] == self.listing.stamps[positions[usable]]).all(axis=1)
        stamps_only = bool(same_stamp[usable].all()) and not self.check_content
        for row in np.flatnonzero(usable & (~same_stamp | self.check_content)):
            stored = hashes[row].decode()
            usable[row] = bool(stored) and stored == self._current_hash(int(positions[row]))
        return positions, usable, stamps_only and bool(usable.all())

    def _candidates(self) -> tuple[Path | None, list[Path], list[Path]]:
        """(interrupted single-file partial, complete single store, shard files), each usable by this run."""
        partial = partial_path(self.path)
        partial = partial if partial.is_file() and self._usable(partial) else None
        store = self.path if self.path.is_file() and self._usable(self.path) else None
        if store is not None:
            with h5py.File(store, "r") as f:
                if not f.attrs.get("complete", False):
                    store = None
        folder = shards_dir(self.path)
        shards = sorted(p for p in folder.glob("*.h5") if self._usable(p)) if folder.is_dir() else []
        return partial, store, shards

    def prepare(self, *, reuse: bool = True) -> np.ndarray:
        """Take every reusable row (unless `reuse` is False) and return the listing positions left to compute."""
        if self.prepared:
            raise StoreError("prepare() was called twice")
        self.prepared = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial, store, shards = self._candidates() if reuse else (None, None, [])
        self.attrs["store_id"] = self._store_id(partial)
        indexes = {source: _read_index(source) for source in shards}
        if self.shard_rows is None:
            self._prepare_single(partial)
            sources = shards
        else:
            shards.sort(key=lambda p: (not indexes[p][0].get("complete", False), p.name))  # complete shards first
            sources = []
            for shard in shards:
                attrs, ids, stamps, hashes = indexes[shard]
                positions, usable, whole = self._valid(ids, stamps, hashes)
                if whole and attrs.get("complete", False) and len(ids):
                    self._done[positions] = True
                    self._kept_shards.append({"file": shard.name, "rows": len(ids)})
                    self._count(shard, len(ids))
                else:
                    sources.append(shard)
            if partial is not None:
                sources.append(partial)
        if store is not None:
            sources.append(store)
        for source in sources:
            self._copy_from(source, indexes.get(source) or _read_index(source))
        return np.flatnonzero(~self._done)

    def _store_id(self, partial: Path | None) -> str:
        """The store's identity: kept from the run being resumed or the store being updated (indexes built on it
        stay valid), new for a fresh store or --overwrite."""
        if self.keep_store_id:
            for candidate in (partial, self.path):
                if candidate is not None and candidate.is_file() and self._usable(candidate):
                    with h5py.File(candidate, "r") as f:
                        found = f.attrs.get("store_id")
                    if isinstance(found, str | bytes) and found:
                        return found.decode() if isinstance(found, bytes) else found
        return secrets.token_hex(16)

    def _count(self, source: Path, n: int) -> None:
        if source == self.path:
            self.kept += n
        elif source.parent == shards_dir(self.path) and self._referenced_by_store(source.name):
            self.kept += n
        else:
            self.resumed += n

    def _referenced_by_store(self, name: str) -> bool:
        """Whether a shard file belongs to the existing complete store (its rows count as kept, not resumed)."""
        if self._store_shards is None:
            self._store_shards = set()
            if self.path.is_file() and h5py.is_hdf5(self.path):
                with h5py.File(self.path, "r") as f:
                    self._store_shards = {s["file"] for s in shard_list(attrs_to_dict(f.attrs))}
        return name in self._store_shards

    def _prepare_single(self, partial: Path | None) -> None:
        """Continue the interrupted partial in place (dropping rows that are no longer valid), or start a new one."""
        path = partial_path(self.path)
        if partial is None:
            self._target = _Segment.create(path, dim=self.dim, dtype=self.dtype, compression=self.compression,
                                           attrs=self.attrs)
            return
        _, ids, stamps, hashes = _read_index(path)
        positions, usable, _ = self._valid(ids, stamps, hashes)
        self._target = segment = _Segment.reopen(path)
        if not usable.all():
            log.info("%s: dropping %d row(s) of the interrupted run whose images changed or left", path.name,
                     int((~usable).sum()))
            segment.compact(usable)
        kept = positions[usable]
        if len(kept):  # labels, splits and stamps follow the current listing
            f = segment.file
            f["labels"][:] = self.listing.labels[kept]
            f["splits"][:] = [self.listing.splits[p] for p in kept]
            f["files/size"][:] = self.listing.stamps[kept, 0]
            f["files/mtime_ns"][:] = self.listing.stamps[kept, 1]
            for key in ("class_names", "data_fingerprint", "num_images", "data_root", "split_source"):
                if key in self.attrs:
                    f.attrs[key] = self.attrs[key]
            f.flush()
        self._done[kept] = True
        self.resumed += len(kept)
        log.info("resuming %s: %d row(s) already committed", path.name, len(kept))

    def _copy_from(self, source: Path, index: tuple[dict[str, Any], list[str], np.ndarray, np.ndarray]) -> None:
        """Copy the usable rows of a source segment (`index`: its `_read_index`) into the target, block by block,
        features bit for bit."""
        _, ids, stamps, hashes = index
        positions, usable, _ = self._valid(ids, stamps, hashes)
        if not usable.any():
            return
        with h5py.File(source, "r") as f:
            ds = f["features"]
            step = max(1, COPY_BYTES // (ds.dtype.itemsize * self.dim))
            for start in range(0, len(ids), step):
                stop = min(len(ids), start + step)
                keep = usable[start:stop]
                if keep.any():
                    self._append(ds[start:stop][keep], positions[start:stop][keep], hashes[start:stop][keep])
        self._done[positions[usable]] = True
        self._count(source, int(usable.sum()))

    # -- writing ----------------------------------------------------------------------------------------------------

    def _columns(self, positions: np.ndarray, hashes: np.ndarray) -> dict[str, Any]:
        ls = self.listing
        return {"ids": [ls.ids[p] for p in positions], "labels": ls.labels[positions],
                "splits": [ls.splits[p] for p in positions], "files/size": ls.stamps[positions, 0],
                "files/mtime_ns": ls.stamps[positions, 1], "files/hash": hashes}

    def _next_shard(self) -> _Segment:
        name = f"{self._run}-{len(self._new_shards):06d}.h5"
        folder = shards_dir(self.path)
        folder.mkdir(parents=True, exist_ok=True)
        self._new_shards.append({"file": name, "rows": 0})
        attrs = {k: v for k, v in self.attrs.items() if k != "layout"}
        return _Segment.create(folder / name, dim=self.dim, dtype=self.dtype, compression=self.compression,
                               attrs={**attrs, "layout": "shard"}, max_rows=self.shard_rows)

    def _append(self, features: np.ndarray, positions: np.ndarray, hashes: np.ndarray) -> None:
        features = np.asarray(features, dtype=self.dtype)
        try:
            if self.shard_rows is None:
                self._target.append(features, self._columns(positions, hashes))
                return
            start = 0
            while start < len(features):
                if self._target is None or self._target.rows >= self.shard_rows:
                    if self._target is not None:
                        self._target.close(complete=True)
                    self._target = self._next_shard()
                take = min(len(features) - start, self.shard_rows - self._target.rows)
                part = slice(start, start + take)
                self._target.append(features[part], self._columns(positions[part], hashes[part]))
                self._new_shards[-1]["rows"] = self._target.rows
                start += take
        except (OSError, RuntimeError) as exc:
            where = self._target.path if self._target is not None else self.path
            exc.__traceback__ = None  # frees the frames holding dataset handles now, while write errors are quiet
            raise StoreError(f"writing {where} failed ({_short_error(exc)}); the rows committed so far are kept: free "
                             "space or fix the cause, then run the same command again to resume") from exc

    def write(self, positions: Sequence[int] | np.ndarray, features: np.ndarray, hashes: Sequence[str]) -> None:
        """Append computed rows for these listing positions; committed once flushed."""
        positions = np.asarray(positions, dtype=np.int64)
        if features.ndim != 2 or features.shape != (len(positions), self.dim):
            raise StoreError(f"features have shape {features.shape}; the store expects [{len(positions)}, {self.dim}]")
        if len(hashes) != len(positions):
            raise StoreError("write() needs one content hash per row")
        self._claim(positions)
        self._append(features, positions, _as_hashes(hashes))
        self.computed += len(positions)

    def fail(self, positions: Sequence[int] | np.ndarray, reasons: Sequence[str]) -> None:
        """Record images that could not be read: they are accounted for, not silently dropped."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(reasons) != len(positions):
            raise StoreError("fail() needs one reason per image")
        self._claim(positions)
        self._failed.extend((self.listing.ids[p], r) for p, r in zip(positions, reasons, strict=True))

    def _claim(self, positions: np.ndarray) -> None:
        if not self.prepared:
            raise StoreError("call prepare() before writing rows")
        if len(positions) and (positions.min() < 0 or positions.max() >= len(self.listing)):
            raise StoreError(f"row positions outside the listing of {len(self.listing)} rows")
        if len(np.unique(positions)) != len(positions) or self._done[positions].any():
            twice = self.listing.ids[int(positions[self._done[positions]][0])] if self._done[positions].any() else "?"
            raise StoreError(f"id {twice!r} was written twice to {self.path}")
        self._done[positions] = True

    # -- finishing --------------------------------------------------------------------------------------------------

    def finish(self) -> Path:
        """Check completeness, mark complete, move into place atomically, then drop unreferenced shard files."""
        missing = np.flatnonzero(~self._done)
        if len(missing):
            example = [self.listing.ids[i] for i in missing[:3]]
            raise StoreError(f"{len(missing)} image(s) were neither written nor recorded as failed (e.g. {example}); "
                             f"the store {self.path} was not completed")
        if self.shard_rows is None:
            f = self._target.file
            f.attrs["committed_rows"] = self._target.rows
            self._finish_attrs(f)
            self._target.close(complete=True)
            self._target = None
        else:
            if self._target is not None:
                self._target.close(complete=True)
                self._target = None
            self._write_entry()
        os.replace(partial_path(self.path), self.path)
        self._collect_garbage()
        return self.path

    def _finish_attrs(self, f: h5py.File) -> None:
        failed = f.require_group("failed")
        for name in ("ids", "reasons"):
            if name in failed:
                del failed[name]
        failed.create_dataset("ids", data=[i for i, _ in self._failed], dtype=STR_DTYPE)
        failed.create_dataset("reasons", data=[r for _, r in self._failed], dtype=STR_DTYPE)
        for key, value in self.attrs.items():
            f.attrs[key] = value
        f.attrs["failed_count"] = len(self._failed)
        f.attrs["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        f.attrs["complete"] = True
        f.flush()

    def _write_entry(self) -> None:
        """The entry of a sharded store: a virtual `features` over the shards, every other dataset inline."""
        shards = self._kept_shards + [s for s in self._new_shards if s["rows"]]
        n = sum(s["rows"] for s in shards)
        folder = shards_dir(self.path)
        layout = h5py.VirtualLayout(shape=(n, self.dim), dtype=self.dtype)
        start = 0
        for shard in shards:
            # relative to the entry's folder, so the store can be moved or copied as a whole
            source = h5py.VirtualSource(f"{folder.name}/{shard['file']}", "features", shape=(shard["rows"], self.dim))
            layout[start:start + shard["rows"]] = source
            start += shard["rows"]
        entry = partial_path(self.path)
        with h5py.File(entry, "w") as f:
            f.create_virtual_dataset("features", layout, fillvalue=np.nan)
            columns = {name: f.create_dataset(name, shape=(n,), dtype=dtype_, chunks=(min(max(n, 1), 65536),))
                       for name, dtype_ in _COLUMNS}
            start = 0
            for shard in shards:
                _, ids, _, hashes = _read_index(folder / shard["file"])
                ids, hashes = ids[: shard["rows"]], hashes[: shard["rows"]]
                positions = np.fromiter((self._index[i] for i in ids), dtype=np.int64, count=len(ids))
                for name, values in self._columns(positions, hashes).items():
                    columns[name][start:start + len(ids)] = values
                start += len(ids)
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["committed_rows"] = n
            f.attrs["shards"] = json.dumps(shards)
            self._finish_attrs(f)

    def _collect_garbage(self) -> None:
        folder = shards_dir(self.path)
        if not folder.is_dir():
            return
        keep = {s["file"] for s in self._kept_shards + self._new_shards if s["rows"]}
        for path in folder.glob("*.h5"):
            if path.name not in keep:
                path.unlink(missing_ok=True)
        if not any(folder.iterdir()):
            folder.rmdir()
