"""Reading the HDF5 feature store (format: `pipeline.store.schema`): loading, streaming, columns, attributes and
the checks every reader makes (complete, schema, shards, row-aligned datasets, unit-norm finite rows), each refusal
saying what to do. Writing is in `pipeline.store.writer`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import StoreError
from pipeline.plan import Provenance
from pipeline.sources.views import view_mask
from pipeline.store.schema import (
    NORM_TOLERANCE,
    ROW_DATASETS,
    SCHEMA_VERSION,
    SPLITS,
    attrs_to_dict,
    partial_path,
    shard_list,
    shards_dir,
)

log = logging.getLogger(__name__)

def open_checked(path: Path) -> h5py.File:
    if not path.exists():
        if partial_path(path).exists():
            raise StoreError(f"{path} is not complete: its extraction stopped early ({partial_path(path).name} "
                             "remains); run extract again with the same arguments to resume it")
        raise StoreError(f"no feature store at {path}; create one with: python -m pipeline extract --data ROOT "
                         f"--out {path}")
    if not path.is_file() or not h5py.is_hdf5(path):
        raise StoreError(f"{path} is not an HDF5 feature store; pass a file written by `python -m pipeline extract`")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise StoreError(f"{path} cannot be opened ({str(exc).splitlines()[0]}); if it is an interrupted store, run "
                         "extract again with the same arguments to resume or rebuild it") from exc
    try:
        if "schema_version" not in f.attrs or "features" not in f:
            raise StoreError(f"{path} is an HDF5 file but not a feature store (no schema_version/features); pass a "
                             "file written by `python -m pipeline extract`")
        version = _int_attr(path, attrs_to_dict(f.attrs), "schema_version")
        if version != SCHEMA_VERSION:
            hint = "upgrade this package" if version > SCHEMA_VERSION else "run extract again to rebuild it"
            raise StoreError(f"{path} has store schema version {version}, this code reads {SCHEMA_VERSION}; {hint}")
    except BaseException:
        f.close()
        raise
    return f


def _damaged(path: Path, what: str) -> StoreError:
    return StoreError(f"{path} is damaged: {what}; run `python -m pipeline store verify {path}`, then extract it "
                      "again (with --overwrite)")


def _int_attr(path: Path, attrs: dict[str, Any], key: str) -> int:
    value = attrs.get(key)
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise _damaged(path, f"attribute {key} is {value!r}, not an integer")
    return int(value)


def _json_attr(path: Path, attrs: dict[str, Any], key: str, kind: type) -> Any:
    try:
        value = json.loads(attrs.get(key, ""))
    except (TypeError, ValueError):
        value = None
    if not isinstance(value, kind):
        raise _damaged(path, f"attribute {key} is not a JSON {kind.__name__}")
    return value


def _check_shards(path: Path, attrs: dict[str, Any]) -> None:
    """A virtual dataset reads a missing shard back as NaN, silently: check every shard is there and long enough."""
    for shard in shard_list(attrs):
        file = shards_dir(path) / shard["file"]
        if not file.is_file():
            raise StoreError(f"{path}: shard {file.name} is missing from {shards_dir(path).name}/; run extract again "
                             "with the same arguments to rebuild the missing rows")
        with h5py.File(file, "r") as s:
            if int(s.attrs.get("committed_rows", -1)) < shard["rows"] or s["features"].shape[0] < shard["rows"]:
                raise StoreError(f"{path}: shard {file.name} has fewer rows than the store expects; run extract "
                                 "again with the same arguments to rebuild it")


def check_complete(path: Path, f: h5py.File) -> dict[str, Any]:
    """The attributes of a complete store, after checking everything the readers rely on: completeness, row counts,
    a 2-D feature matrix of the recorded dimension, the class list, the cache key and the shards."""
    attrs = attrs_to_dict(f.attrs)
    if attrs.get("complete", False) is not True:
        raise StoreError(f"{path} is marked incomplete; run extract again with the same arguments to finish it")
    n = _int_attr(path, attrs, "committed_rows")
    missing = [name for name in ("features", *ROW_DATASETS) if name not in f or not isinstance(f[name], h5py.Dataset)]
    if missing:
        raise _damaged(path, f"datasets {missing} are missing")
    features = f["features"]
    if features.ndim != 2 or features.dtype.kind != "f":
        raise _damaged(path, f"features have shape {features.shape} and type {features.dtype}, not [rows, dim] floats")
    if _int_attr(path, attrs, "feature_dim") != features.shape[1]:
        raise _damaged(path, f"feature_dim={attrs['feature_dim']} but the features have {features.shape[1]} columns")
    lengths = {name: f[name].shape[0] for name in ("features", *ROW_DATASETS)}
    if n < 0 or any(length != n for length in lengths.values()):
        raise StoreError(f"{path} is inconsistent: committed_rows={n} but dataset lengths are {lengths}; "
                         "run `python -m pipeline store verify` on it, then extract it again")
    names = _json_attr(path, attrs, "class_names", list)
    if not all(isinstance(c, str) for c in names):
        raise _damaged(path, "class_names holds values that are not strings")
    if not isinstance(attrs.get("cache_key"), str) or not attrs["cache_key"]:
        raise _damaged(path, "it has no cache_key")
    if "preprocessing" in attrs:
        _json_attr(path, attrs, "preprocessing", dict)
    _check_shards(path, attrs)
    return attrs


def row_problems(features: np.ndarray, labels: np.ndarray, splits: np.ndarray, *, n_classes: int,
                 tolerance: float) -> dict[str, np.ndarray]:
    """Masks of the rows a reader must refuse: non-finite or not unit-norm features, labels outside -1..C-1, splits
    other than train/val/test."""
    finite = np.isfinite(features).all(axis=1)
    norms = np.linalg.norm(np.where(finite[:, None], features, 0.0), axis=1)
    return {"non-finite features": ~finite,
            f"features not unit-norm (within {tolerance:g})": finite & (np.abs(norms - 1.0) > tolerance),
            f"label(s) outside -1..{n_classes - 1}": (labels < -1) | (labels >= n_classes),
            "split value(s) other than train/val/test": ~np.isin(splits, list(SPLITS))}


def _refuse_bad_rows(path: Path, attrs: dict[str, Any], features: np.ndarray, ids: np.ndarray, labels: np.ndarray,
                     splits: np.ndarray) -> None:
    tolerance = NORM_TOLERANCE.get(attrs.get("feature_dtype", "float32"), 1e-4)
    n_classes = len(json.loads(attrs["class_names"]))
    for what, bad in row_problems(features, labels, splits, n_classes=n_classes, tolerance=tolerance).items():
        if bad.any():
            raise _damaged(path, f"{int(bad.sum())} row(s) with {what} (e.g. {ids[int(np.argmax(bad))]!r})")


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
    hashes: np.ndarray | None = field(default=None, repr=False)  # content hashes: a row order that is the images'

    def __len__(self) -> int:
        return len(self.ids)

    def mask(self, *splits: str) -> np.ndarray:
        return np.isin(self.splits, list(splits))

    def subset(self, rows: np.ndarray) -> FeatureSet:
        """The same store with only some rows (a boolean mask or row numbers), every row-aligned array kept in step."""
        import dataclasses

        return dataclasses.replace(self, features=self.features[rows], ids=self.ids[rows], labels=self.labels[rows],
                                   splits=self.splits[rows],
                                   hashes=None if self.hashes is None else self.hashes[rows])

    def provenance(self) -> dict[str, Any]:
        """Which store, backbone and weights a result was computed from, for results files (the store's absolute
        path, so that the results can be read from anywhere)."""
        made = self.made
        return {"store": str(Path(self.path).resolve()), "store_id": self.attrs.get("store_id", ""),
                "backbone": made.backbone, "weights": made.weights, "cache_key": made.cache_key,
                "class_names": self.class_names}

    def split_names(self) -> list[str]:
        return [s for s in SPLITS if (self.splits == s).any()]

    @property
    def made(self) -> Provenance:
        """How the features were made (see `pipeline.plan.Provenance`)."""
        return Provenance.from_attrs(self.attrs)

    def row_keys(self) -> list[str]:
        """Each row's content hash (its id when unknown): what order-independent choices rank rows by. Computed once
        per feature set (the probe, kNN, intervals and audit all ask for it; a changed copy is a new feature set)."""
        cached = self.__dict__.get("_row_keys")
        if cached is None or len(cached) != len(self.ids):
            if self.hashes is None:
                cached = [str(i) for i in self.ids]
            else:
                cached = [h.decode() if h else str(i) for h, i in zip(self.hashes, self.ids, strict=True)]
            self.__dict__["_row_keys"] = cached
        return cached


def failed_rows(f: h5py.File) -> dict[str, str]:
    if "failed" not in f:
        return {}
    return dict(zip(f["failed/ids"].asstr()[...], f["failed/reasons"].asstr()[...], strict=True))


def read_features(path: str | Path, rows: np.ndarray) -> np.ndarray:
    """Features (float32) of some rows of a complete store, given as increasing row numbers."""
    path = Path(path)
    with open_checked(path) as f:
        check_complete(path, f)
        return f["features"][np.asarray(rows, dtype=np.int64)].astype(np.float32, copy=False)


def read_failed(path: str | Path) -> dict[str, str]:
    """The images a complete store records as failed: id -> reason."""
    path = Path(path)
    with open_checked(path) as f:
        check_complete(path, f)
        return failed_rows(f)


def read_attrs(path: str | Path) -> dict[str, Any]:
    """The attributes of a store (complete or not), after checking that it is a feature store."""
    with open_checked(Path(path)) as f:
        return attrs_to_dict(f.attrs)


def load_store(path: str | Path, *, views: bool = False) -> FeatureSet:
    """Read a complete store into memory (features as float32); refuse incomplete, foreign, inconsistent or damaged
    files (non-finite or non-unit rows, labels outside the class list, unknown splits) with one line. Augmented
    views (`extract --views`) are left out unless `views` (`pipeline.store.views`)."""
    path = Path(path)
    with open_checked(path) as f:
        attrs = check_complete(path, f)
        fs = FeatureSet(
            path=path,
            features=f["features"][...].astype(np.float32, copy=False),
            ids=np.asarray(f["ids"].asstr()[...], dtype=object),
            labels=f["labels"][...].astype(np.int64),
            splits=np.asarray(f["splits"].asstr()[...], dtype=object),
            class_names=json.loads(attrs["class_names"]),
            attrs=attrs,
            failed=failed_rows(f),
            hashes=f["files/hash"][...],
        )
    _refuse_bad_rows(path, attrs, fs.features, fs.ids, fs.labels, fs.splits)
    extra = view_mask(fs.ids, attrs)
    return fs.subset(~extra) if extra.any() and not views else fs


def read_columns(path: str | Path, *names: str) -> dict[str, np.ndarray]:
    """Some row-aligned columns of a complete store (e.g. ids, labels, splits, files/hash) without its features;
    labels and splits are checked as the full readers check them."""
    path = Path(path)
    with open_checked(path) as f:
        attrs = check_complete(path, f)
        n = int(attrs["committed_rows"])
        out = {}
        for name in names:
            if name not in ROW_DATASETS:
                raise ValueError(f"unknown column {name!r}; one of {ROW_DATASETS}")
            data = f[name]
            out[name] = np.asarray(data.asstr()[:n], dtype=object) if name in ("ids", "splits") else data[:n]
    n_classes = len(json.loads(attrs["class_names"]))
    if "labels" in out and ((out["labels"] < -1) | (out["labels"] >= n_classes)).any():
        raise _damaged(path, f"labels outside -1..{n_classes - 1}")
    if "splits" in out and not np.isin(out["splits"], list(SPLITS)).all():
        raise _damaged(path, "splits other than train/val/test")
    return out


def known_hashes(path: Path) -> Mapping[str, tuple[int, int, str]]:
    """id -> (size, mtime_ns, content hash) of the rows of the complete store at `path` (empty when there is none),
    read on first use: only a stratified split needs it."""
    return _KnownHashes(Path(path))


class _KnownHashes(Mapping):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._rows: dict[str, tuple[int, int, str]] | None = None

    def _load(self) -> dict[str, tuple[int, int, str]]:
        if self._rows is None:
            self._rows = {}
            if self.path.is_file():
                try:
                    c = read_columns(self.path, "ids", "files/size", "files/mtime_ns", "files/hash")
                except StoreError:
                    return self._rows
                self._rows = {i: (int(s), int(m), h.decode()) for i, s, m, h in
                              zip(c["ids"], c["files/size"], c["files/mtime_ns"], c["files/hash"], strict=True)}
        return self._rows

    def __getitem__(self, key: str) -> tuple[int, int, str]:
        return self._load()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


@dataclass
class Block:
    """A block of rows from `iter_store`; `start` is the index of the first row of its stretch of the store, and
    `rows` the store row number of each row it holds (rows may be left out: other splits, augmented views)."""

    start: int
    features: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    rows: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.rows is None:
            self.rows = np.arange(self.start, self.start + len(self.ids))


def iter_store(path: str | Path, *, rows: int = 65536, splits: tuple[str, ...] | None = None) -> Iterator[Block]:
    """Stream a complete store in blocks of `rows` rows (features as float32), optionally keeping only some splits;
    each block is checked as `load_store` checks the whole.

    Memory is bounded by one block, whatever the store's size: the way to read a store that does not fit in memory.
    """
    path = Path(path)
    with open_checked(path) as f:
        attrs = check_complete(path, f)
        n = int(attrs["committed_rows"])
        step = max(1, int(rows))
        for start in range(0, n, step):
            stop = min(n, start + step)
            block = Block(start, f["features"][start:stop].astype(np.float32, copy=False),
                          np.asarray(f["ids"].asstr()[start:stop], dtype=object), f["labels"][start:stop],
                          np.asarray(f["splits"].asstr()[start:stop], dtype=object))
            _refuse_bad_rows(path, attrs, block.features, block.ids, block.labels, block.splits)
            keep = ~view_mask(block.ids, attrs)
            if splits is not None:
                keep &= np.isin(block.splits, list(splits))
            if not keep.all():
                block = Block(start, block.features[keep], block.ids[keep], block.labels[keep], block.splits[keep],
                              block.rows[keep])
            yield block


def is_current(path: Path, *, key: str, fingerprint: str, layout: dict[str, Any] | None = None,
               data: str = "") -> bool:
    """True when `path` is a complete, readable store with this cache key built from exactly this data listing
    (and, when given, with these `layout` attributes, e.g. {"layout": "sharded", "shard_rows": 1000}, and from this
    `data` path: a data set moved elsewhere is rewritten, rows kept, so that the store finds its images again)."""
    if not path.is_file() or not h5py.is_hdf5(path):
        return False
    try:
        with open_checked(path) as f:
            a = attrs_to_dict(f.attrs)
            wanted = {"complete": True, "cache_key": key, "data_fingerprint": fingerprint, **(layout or {}),
                      **({"data": data} if data else {})}
            if any(a.get(k) != v for k, v in wanted.items()):
                return False
            check_complete(path, f)
    except StoreError:
        return False
    return True


def check_target(path: Path, *, key: str, overwrite: bool) -> None:
    """Refuse to replace a file that is not a store, or a store made by other settings, unless told to."""
    if not path.exists() or overwrite:
        return
    if path.is_dir() or not h5py.is_hdf5(path):
        raise StoreError(f"--out {path} exists and is not a feature store; choose another path")
    with h5py.File(path, "r") as f:
        if "schema_version" not in f.attrs:
            raise StoreError(f"--out {path} is an HDF5 file but not a feature store; choose another path")
        version = int(f.attrs["schema_version"])
        if version > SCHEMA_VERSION:
            raise StoreError(f"{path} was written with store schema version {version}, newer than this code's "
                             f"{SCHEMA_VERSION}; upgrade this package, or pass --overwrite to replace it")
        if version < SCHEMA_VERSION:  # our own older format: rebuilt from the images, replaced only once complete
            log.warning("%s was written with store schema version %d; rebuilding it as version %d", path, version,
                        SCHEMA_VERSION)
            return
        if f.attrs.get("cache_key") != key:
            raise StoreError(
                f"{path} holds features from another configuration (backbone {f.attrs.get('backbone')!r}, "
                f"dtype {f.attrs.get('feature_dtype', 'float32')!r}); choose another --out, or pass --overwrite to "
                "replace it"
            )
