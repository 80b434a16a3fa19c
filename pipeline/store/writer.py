"""Writing a feature store: streamed batch by batch, crash-safe, resumable and incremental, one file or shards.

The writer is the only stateful part of extraction. It holds the store's lock and accounts for every listing row:
`prepare()` takes what earlier runs left that is still valid (`pipeline.store.reuse`: the rows of an interrupted run
resume, the unchanged rows of the existing store are kept, features copied bit for bit) and returns the rows left to
compute; `write`/`fail` take them; `finish()` checks that every row is either written or failed, marks the store
complete and moves it into place. The layout (`pipeline.store.layouts`: one file, or shards) decides where rows go.
Unreferenced shard files are deleted only after the rename, so the last complete store stays readable until then.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.config import COMPRESSIONS, FEATURE_DTYPES
from pipeline.errors import StoreError
from pipeline.store.layouts import LAYOUTS, Layout
from pipeline.store.lock import LockTimeout, StoreLock
from pipeline.store.reuse import Listing, ReusePlanner
from pipeline.store.schema import STR_DTYPE, layout_attrs, lock_path, partial_path
from pipeline.store.segment import SPATIAL, as_hashes, copy_step, read_index, short_error

log = logging.getLogger(__name__)


class StoreWriter:
    """Writes one store, reusing what earlier runs left.

    Use as a context manager (it holds an exclusive lock on the store for its whole life), call `prepare()` to learn
    which listing rows to compute, then `write`/`fail` them, then `finish()`.
    """

    def __init__(self, path: str | Path, *, listing: Listing, dim: int, attrs: dict[str, Any],
                 feature_dtype: str = "float32", compression: str = "none", shard_rows: int | None = None,
                 check_content: bool = False, lock_timeout: float = 0.0, keep_store_id: bool = True,
                 spatial: tuple[tuple[int, ...], str] | None = None) -> None:
        self.path, self.listing, self.dim = Path(path), listing, int(dim)
        if feature_dtype not in FEATURE_DTYPES:
            raise StoreError(f"feature dtype {feature_dtype!r} is not supported; choose one of {FEATURE_DTYPES}")
        if compression not in COMPRESSIONS:
            raise StoreError(f"compression {compression!r} is not supported; choose one of {COMPRESSIONS}")
        if shard_rows is not None and shard_rows < 1:
            raise StoreError(f"shard rows must be >= 1, got {shard_rows}")
        self.dtype, self.keep_store_id = feature_dtype, keep_store_id
        self.spatial = None if spatial is None else (tuple(int(n) for n in spatial[0]), spatial[1])
        self.attrs = {**attrs, "feature_dtype": feature_dtype, "feature_dim": self.dim,
                      **layout_attrs(shard_rows=shard_rows, compression=compression)}
        self.planner = ReusePlanner(self.path, listing, key=attrs.get("cache_key"), dim=self.dim,
                                    check_content=check_content)
        self.layout: Layout = LAYOUTS[self.attrs["layout"]](self.path, listing, dim=self.dim, dtype=feature_dtype,
                                                            compression=compression, attrs=self.attrs,
                                                            shard_rows=shard_rows, spatial=self.spatial)
        self._lock = StoreLock(lock_path(self.path), timeout=lock_timeout)
        self._failed: list[tuple[str, str]] = []
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
            try:
                self.layout.close(error=exc_type is not None)
            except Exception:  # noqa: BLE001 - already failing; the committed count keeps the file consistent
                if exc_type is None:
                    raise
                log.debug("closing %s after an error failed", self.path, exc_info=True)
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
    def resumed(self) -> int:
        return self.planner.resumed

    @property
    def kept(self) -> int:
        return self.planner.kept

    @property
    def rows(self) -> int:
        return int(self.planner.done.sum()) - len(self._failed)

    @property
    def failures(self) -> int:
        return len(self._failed)

    @property
    def failed(self) -> list[tuple[str, str]]:
        """(id, reason) of every image recorded as failed so far."""
        return list(self._failed)

    # -- reusing ------------------------------------------------------------------------------------------------------

    def prepare(self, *, reuse: bool = True) -> np.ndarray:
        """Take every reusable row (unless `reuse` is False) and return the listing positions left to compute."""
        if self.prepared:
            raise StoreError("prepare() was called twice")
        self.prepared = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial, store, shards = self.planner.candidates() if reuse else (None, None, [])
        self.attrs["store_id"] = self.planner.store_id(partial, keep=self.keep_store_id)
        indexes = {source: read_index(source) for source in shards}
        sources = self.layout.begin(self.planner, partial, shards, indexes)
        for source in sources + ([store] if store is not None else []):
            self._copy_from(source, indexes.get(source) or read_index(source))
        return np.flatnonzero(~self.planner.done)

    def _copy_from(self, source: Path, index: tuple[dict[str, Any], list[str], np.ndarray, np.ndarray]) -> None:
        """Copy the usable rows of a source segment (`index`: its `read_index`) block by block, features bit for
        bit."""
        _, ids, stamps, hashes = index
        positions, usable, _ = self.planner.valid(ids, stamps, hashes)
        if not usable.any():
            return
        with h5py.File(source, "r") as f:
            ds = f["features"]
            spatial = f[SPATIAL] if self.spatial is not None else None
            if spatial is not None and tuple(spatial.shape[1:]) != self.spatial[0]:
                raise StoreError(f"{source} holds activations of shape {spatial.shape[1:]}, not {self.spatial[0]}; "
                                 "pass --overwrite to extract again")
            step = copy_step({"features": ds} if spatial is None else {"features": ds, SPATIAL: spatial})
            for start in range(0, len(ids), step):
                keep = usable[start:start + step]
                if keep.any():
                    block = slice(start, start + step)
                    self._append(ds[block][keep], positions[block][keep], hashes[block][keep],
                                 None if spatial is None else spatial[block][keep])
        self.planner.done[positions[usable]] = True
        self.planner.count(source, int(usable.sum()))

    # -- writing ----------------------------------------------------------------------------------------------------

    def _append(self, features: np.ndarray, positions: np.ndarray, hashes: np.ndarray,
                spatial: np.ndarray | None = None) -> None:
        if self.spatial is not None:
            spatial = np.asarray(spatial, dtype=self.spatial[1])
        try:
            self.layout.append(np.asarray(features, dtype=self.dtype), positions, hashes, spatial)
        except (OSError, RuntimeError) as exc:
            where = self.layout.target.path if self.layout.target is not None else self.path
            exc.__traceback__ = None  # frees the frames holding dataset handles now, while write errors are quiet
            raise StoreError(f"writing {where} failed ({short_error(exc)}); the rows committed so far are kept: free "
                             "space or fix the cause, then run the same command again to resume") from exc

    def write(self, positions: Sequence[int] | np.ndarray, features: np.ndarray, hashes: Sequence[str],
              spatial: np.ndarray | None = None) -> None:
        """Append computed rows for these listing positions (with their activations when the store keeps them);
        committed once flushed."""
        positions = np.asarray(positions, dtype=np.int64)
        if features.ndim != 2 or features.shape != (len(positions), self.dim):
            raise StoreError(f"features have shape {features.shape}; the store expects [{len(positions)}, {self.dim}]")
        if (spatial is None) != (self.spatial is None) or (
                spatial is not None and tuple(spatial.shape) != (len(positions), *self.spatial[0])):
            want = "none" if self.spatial is None else f"[{len(positions)}, {self.spatial[0]}]"
            raise StoreError(f"activations of shape {None if spatial is None else spatial.shape}; the store expects "
                             f"{want}")
        if len(hashes) != len(positions):
            raise StoreError("write() needs one content hash per row")
        self._claim(positions)
        self._append(features, positions, as_hashes(hashes), spatial)
        self.computed += len(positions)

    def fail(self, positions: Sequence[int] | np.ndarray, reasons: Sequence[str]) -> None:
        """Record images that could not be read: they are accounted for, not silently dropped."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(reasons) != len(positions):
            raise StoreError("fail() needs one reason per image")
        self._claim(positions)
        self._failed.extend((self.listing.ids[p], r) for p, r in zip(positions, reasons, strict=True))

    def _claim(self, positions: np.ndarray) -> None:
        done = self.planner.done
        if not self.prepared:
            raise StoreError("call prepare() before writing rows")
        if len(positions) and (positions.min() < 0 or positions.max() >= len(self.listing)):
            raise StoreError(f"row positions outside the listing of {len(self.listing)} rows")
        if len(np.unique(positions)) != len(positions) or done[positions].any():
            twice = self.listing.ids[int(positions[done[positions]][0])] if done[positions].any() else "?"
            raise StoreError(f"id {twice!r} was written twice to {self.path}")
        done[positions] = True

    # -- finishing --------------------------------------------------------------------------------------------------

    def finish(self) -> Path:
        """Check completeness, mark complete, move into place atomically, then drop unreferenced shard files."""
        missing = np.flatnonzero(~self.planner.done)
        if len(missing):
            example = [self.listing.ids[i] for i in missing[:3]]
            raise StoreError(f"{len(missing)} image(s) were neither written nor recorded as failed (e.g. {example}); "
                             f"the store {self.path} was not completed")
        self.layout.finish(self._final_attrs)
        os.replace(partial_path(self.path), self.path)
        self.layout.collect_garbage()
        return self.path

    def _final_attrs(self, f: h5py.File) -> None:
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
