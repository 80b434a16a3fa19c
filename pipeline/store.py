"""The HDF5 feature store (schema v1): one file per (data set, backbone, preprocessing).

Datasets: `features` [N, D] float32 (rows L2-normalised), `ids` [N] UTF-8, `labels` [N] int64 (-1: unlabelled),
`splits` [N] UTF-8; `failed/ids` and `failed/reasons` for images that could not be decoded. Attributes identify
what produced the bytes (`backbone`, `weights`, `preprocessing`, `cache_key`, ...).

A store is written to `<name>.partial`, flushed after every batch with an explicit committed row count, checked for
completeness, marked complete and only then renamed to its final name: a file at the final name is always whole.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from filelock import FileLock, Timeout

from pipeline.errors import StoreError

SCHEMA_VERSION = 1
_STR = h5py.string_dtype("utf-8")
_CHUNK_BYTES = 1 << 20  # ~1 MiB chunks: fast sequential writes and chunk-aligned reads (see NOTES)


def cache_key(*, backbone: str, weights: str, preprocessing: str, layer: str) -> str:
    """Hash of everything that changes the feature bytes for a given image."""
    payload = json.dumps(
        {"schema_version": SCHEMA_VERSION, "backbone": backbone, "weights": weights, "preprocessing": preprocessing,
         "layer": layer},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def library_versions() -> dict[str, str]:
    import PIL
    import timm
    import torch
    import torchvision

    return {
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "timm": timm.__version__, "numpy": np.__version__, "h5py": h5py.__version__, "pillow": PIL.__version__,
    }


@dataclass
class FeatureSet:
    """A complete store read into memory: row-aligned arrays plus the store's attributes."""

    path: Path
    features: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    class_names: list[str]
    attrs: dict[str, Any] = field(repr=False)
    failed: dict[str, str] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    def mask(self, *splits: str) -> np.ndarray:
        return np.isin(self.splits, list(splits))

    def provenance(self) -> dict[str, Any]:
        """Which store, backbone and weights a result was computed from, for results files."""
        return {"store": str(self.path), "backbone": self.attrs["backbone"], "weights": self.attrs["weights"],
                "cache_key": self.attrs["cache_key"], "class_names": self.class_names}

    def split_names(self) -> list[str]:
        return [s for s in ("train", "val", "test") if (self.splits == s).any()]


def _attrs_to_dict(attrs: h5py.AttributeManager) -> dict[str, Any]:
    out = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def _open_checked(path: Path) -> h5py.File:
    if not path.exists():
        if partial_path(path).exists():
            raise StoreError(f"{path} is not complete: its extraction stopped early ({partial_path(path).name} "
                             "remains); run extract again with the same arguments")
        raise StoreError(f"no feature store at {path}; create one with: python -m pipeline extract --data ROOT "
                         f"--out {path}")
    if not path.is_file() or not h5py.is_hdf5(path):
        raise StoreError(f"{path} is not an HDF5 feature store; pass a file written by `python -m pipeline extract`")
    f = h5py.File(path, "r")
    if "schema_version" not in f.attrs or "features" not in f:
        f.close()
        raise StoreError(f"{path} is an HDF5 file but not a feature store (no schema_version/features); pass a file "
                         "written by `python -m pipeline extract`")
    if int(f.attrs["schema_version"]) > SCHEMA_VERSION:
        version = int(f.attrs["schema_version"])
        f.close()
        raise StoreError(f"{path} has schema version {version}, newer than this code's {SCHEMA_VERSION}; upgrade")
    return f


def read_attrs(path: str | Path) -> dict[str, Any]:
    """The attributes of a store (complete or not), after checking that it is a feature store."""
    with _open_checked(Path(path)) as f:
        return _attrs_to_dict(f.attrs)


def load_store(path: str | Path) -> FeatureSet:
    """Read a complete store; refuse incomplete, foreign or inconsistent files with a clear message."""
    path = Path(path)
    with _open_checked(path) as f:
        attrs = _attrs_to_dict(f.attrs)
        if not attrs.get("complete", False):
            raise StoreError(f"{path} is marked incomplete; run extract again with the same arguments to finish it")
        n = int(attrs["committed_rows"])
        lengths = {name: f[name].shape[0] for name in ("features", "ids", "labels", "splits")}
        if any(length != n for length in lengths.values()):
            raise StoreError(f"{path} is inconsistent: committed_rows={n} but dataset lengths are {lengths}; "
                             "extract it again")
        failed = {}
        if "failed" in f:
            failed = dict(zip(f["failed/ids"].asstr()[...], f["failed/reasons"].asstr()[...], strict=True))
        return FeatureSet(
            path=path,
            features=f["features"][...],
            ids=np.asarray(f["ids"].asstr()[...], dtype=object),
            labels=f["labels"][...].astype(np.int64),
            splits=np.asarray(f["splits"].asstr()[...], dtype=object),
            class_names=json.loads(attrs["class_names"]),
            attrs=attrs,
            failed=failed,
        )


def is_current(path: Path, *, key: str, fingerprint: str) -> bool:
    """True when `path` is a complete store with this cache key built from exactly this data listing."""
    if not path.is_file() or not h5py.is_hdf5(path):
        return False
    with h5py.File(path, "r") as f:
        a = f.attrs
        return bool(a.get("complete", False)) and a.get("cache_key") == key and a.get("data_fingerprint") == fingerprint


def check_target(path: Path, *, key: str, overwrite: bool) -> None:
    """Refuse to replace a file that is not a store, or a store made by other settings, unless told to."""
    if not path.exists() or overwrite:
        return
    if path.is_dir() or not h5py.is_hdf5(path):
        raise StoreError(f"--out {path} exists and is not a feature store; choose another path")
    with h5py.File(path, "r") as f:
        if "schema_version" not in f.attrs:
            raise StoreError(f"--out {path} is an HDF5 file but not a feature store; choose another path")
        if f.attrs.get("cache_key") != key:
            raise StoreError(
                f"{path} holds features from another configuration (backbone {f.attrs.get('backbone')!r}); "
                "choose another --out, or pass --overwrite to replace it"
            )


class StoreWriter:
    """Writes one store batch by batch; the only stateful part of extraction.

    Use as a context manager: it takes an exclusive lock on the store, writes to `<path>.partial`, and on `finish()`
    checks that every expected id is either a row or a recorded failure before renaming into place.
    """

    def __init__(self, path: str | Path, *, dim: int, expected_ids: list[str], attrs: dict[str, Any],
                 lock_timeout: float = 0.0) -> None:
        self.path = Path(path)
        self.dim = int(dim)
        self.expected = set(expected_ids)
        if len(self.expected) != len(expected_ids):
            raise StoreError(f"duplicate ids given to the store writer for {self.path}")
        self.attrs = attrs
        self._lock = FileLock(str(lock_path(self.path)), timeout=lock_timeout)
        self._file: h5py.File | None = None
        self._seen: set[str] = set()
        self.rows = 0
        self.failures = 0

    def __enter__(self) -> StoreWriter:
        try:
            self._lock.acquire()
        except Timeout as exc:
            raise StoreError(f"another process is writing {self.path} (lock {lock_path(self.path).name}); wait for it "
                             "to finish or write to another --out") from exc
        try:
            self._open()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            if self._file is not None:
                self._file.close()
                self._file = None
        finally:
            self._lock.release()

    def _open(self) -> None:
        tmp = partial_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(tmp, "w")
        rows_per_chunk = max(1, _CHUNK_BYTES // (4 * self.dim))
        f.create_dataset("features", shape=(0, self.dim), maxshape=(None, self.dim), dtype=np.float32,
                         chunks=(rows_per_chunk, self.dim), fillvalue=np.nan)
        for name, dtype in (("ids", _STR), ("labels", np.int64), ("splits", _STR)):
            f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(4096,))
        failed = f.create_group("failed")
        for name in ("ids", "reasons"):
            failed.create_dataset(name, shape=(0,), maxshape=(None,), dtype=_STR, chunks=(256,))
        for key, value in self.attrs.items():
            f.attrs[key] = value
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["complete"] = False
        f.attrs["committed_rows"] = 0
        f.attrs["failed_count"] = 0
        f.flush()
        self._file = f

    def _claim(self, ids: list[str]) -> None:
        for i in ids:
            if i not in self.expected:
                raise StoreError(f"id {i!r} was not expected in {self.path}")
            if i in self._seen:
                raise StoreError(f"id {i!r} was written twice to {self.path}")
            self._seen.add(i)

    @staticmethod
    def _append(ds: h5py.Dataset, values: np.ndarray | list) -> None:
        start = ds.shape[0]
        ds.resize(start + len(values), axis=0)
        ds[start:] = values

    def write(self, ids: list[str], features: np.ndarray, labels: np.ndarray, splits: list[str]) -> None:
        """Append rows; they count as committed once the data and the row count are flushed."""
        if not (len(ids) == len(features) == len(labels) == len(splits)):
            raise StoreError("write() needs ids, features, labels and splits of the same length")
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise StoreError(f"features have shape {features.shape}; the store expects [N, {self.dim}]")
        if not len(ids):
            return
        self._claim(ids)
        f = self._file
        self._append(f["features"], np.asarray(features, dtype=np.float32))
        self._append(f["ids"], list(ids))
        self._append(f["labels"], np.asarray(labels, dtype=np.int64))
        self._append(f["splits"], list(splits))
        f.flush()
        self.rows += len(ids)
        f.attrs["committed_rows"] = self.rows  # written after the data, then flushed: trust this, not the shape
        f.flush()

    def fail(self, ids: list[str], reasons: list[str]) -> None:
        """Record images that could not be read: they are accounted for, not silently dropped."""
        if not ids:
            return
        self._claim(ids)
        self._append(self._file["failed/ids"], list(ids))
        self._append(self._file["failed/reasons"], list(reasons))
        self.failures += len(ids)
        self._file.attrs["failed_count"] = self.failures
        self._file.flush()

    def finish(self) -> Path:
        """Check completeness, mark complete and move the file into place atomically."""
        missing = self.expected - self._seen
        if missing:
            example = sorted(missing)[:3]
            raise StoreError(f"{len(missing)} image(s) were neither written nor recorded as failed (e.g. {example}); "
                             f"the store {self.path} was not completed")
        f = self._file
        f.attrs["complete"] = True
        f.attrs["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        f.flush()
        f.close()
        self._file = None
        os.replace(partial_path(self.path), self.path)
        return self.path
