"""The HDF5 feature store (schema v2): reading, streaming, inspecting and verifying. Writing is in `store_writer`.

A store is one entry file. Row-aligned datasets: `features` [N, D] (float32 or float16, rows L2-normalised),
`ids` [N] UTF-8, `labels` [N] int64 (-1: unlabelled), `splits` [N] UTF-8, and `files/size`, `files/mtime_ns`,
`files/hash` (each image's size, modification time and content hash, so that incremental runs know what changed).
`failed/ids` and `failed/reasons` hold the images that could not be read. Attributes say what produced the bytes
(`backbone`, `weights`, `preprocessing`, `cache_key`, ...) and whether the store is `complete`.

Layouts (attribute `layout`):
- `single`: everything in the entry file.
- `sharded`: `features` is an HDF5 virtual dataset over fixed-size shard files in `<entry>.shards/`; every other
  dataset is in the entry. Each shard holds its rows' features, ids and file stamps, so it can be reused alone.

A store is written as `<entry>.partial` and renamed into place only once complete, so a file at the final name is
always whole; readers refuse anything else with a message that says what to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import StoreError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
FEATURE_DTYPES = ("float32", "float16")
COMPRESSIONS = ("none", "lzf")
STR_DTYPE = h5py.string_dtype("utf-8")
HASH_DTYPE = "S32"  # hex BLAKE2b-128
ROW_DATASETS = ("ids", "labels", "splits", "files/size", "files/mtime_ns", "files/hash")
# Unit-norm tolerance per storage dtype: float16 keeps ~11 bits of mantissa.
NORM_TOLERANCE = {"float32": 1e-4, "float16": 2e-3}


def cache_key(*, backbone: str, weights: str, preprocessing: str, layer: str, feature_dtype: str = "float32",
              precision: str = "fp32") -> str:
    """Hash of everything that changes the stored feature bytes for a given image (the compute precision too)."""
    payload = json.dumps(
        {"schema_version": SCHEMA_VERSION, "backbone": backbone, "weights": weights, "preprocessing": preprocessing,
         "layer": layer, "feature_dtype": feature_dtype, "precision": precision},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def layout_attrs(*, shard_rows: int | None, compression: str) -> dict[str, Any]:
    """The attributes that say how a store is laid out (not part of the cache key: they do not change the bytes)."""
    return {"layout": "single" if shard_rows is None else "sharded", "shard_rows": shard_rows or 0,
            "compression": compression}


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def shards_dir(path: Path) -> Path:
    return path.with_name(path.name + ".shards")


def library_versions() -> dict[str, str]:
    import PIL
    import timm
    import torch
    import torchvision

    return {
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "timm": timm.__version__, "numpy": np.__version__, "h5py": h5py.__version__, "pillow": PIL.__version__,
    }


def attrs_to_dict(attrs: h5py.AttributeManager) -> dict[str, Any]:
    out = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def shard_list(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    """The shards of a sharded store, in row order: [{"file": name, "rows": n}, ...] (empty for `single`)."""
    return json.loads(attrs.get("shards", "[]"))


def _open_checked(path: Path) -> h5py.File:
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
    if "schema_version" not in f.attrs or "features" not in f:
        f.close()
        raise StoreError(f"{path} is an HDF5 file but not a feature store (no schema_version/features); pass a file "
                         "written by `python -m pipeline extract`")
    version = int(f.attrs["schema_version"])
    if version != SCHEMA_VERSION:
        f.close()
        hint = "upgrade this package" if version > SCHEMA_VERSION else "run extract again to rebuild it"
        raise StoreError(f"{path} has store schema version {version}, this code reads {SCHEMA_VERSION}; {hint}")
    return f


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


def _check_complete(path: Path, f: h5py.File) -> dict[str, Any]:
    attrs = attrs_to_dict(f.attrs)
    if not attrs.get("complete", False):
        raise StoreError(f"{path} is marked incomplete; run extract again with the same arguments to finish it")
    n = int(attrs["committed_rows"])
    lengths = {name: f[name].shape[0] for name in ("features", *ROW_DATASETS)}
    if any(length != n for length in lengths.values()):
        raise StoreError(f"{path} is inconsistent: committed_rows={n} but dataset lengths are {lengths}; "
                         "run `python -m pipeline store verify` on it, then extract it again")
    _check_shards(path, attrs)
    return attrs


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


def _read_failed(f: h5py.File) -> dict[str, str]:
    if "failed" not in f:
        return {}
    return dict(zip(f["failed/ids"].asstr()[...], f["failed/reasons"].asstr()[...], strict=True))


def read_features(path: str | Path, rows: np.ndarray) -> np.ndarray:
    """Features (float32) of some rows of a complete store, given as increasing row numbers."""
    path = Path(path)
    with _open_checked(path) as f:
        _check_complete(path, f)
        return f["features"][np.asarray(rows, dtype=np.int64)].astype(np.float32, copy=False)


def read_failed(path: str | Path) -> dict[str, str]:
    """The images a complete store records as failed: id -> reason."""
    path = Path(path)
    with _open_checked(path) as f:
        _check_complete(path, f)
        return _read_failed(f)


def read_attrs(path: str | Path) -> dict[str, Any]:
    """The attributes of a store (complete or not), after checking that it is a feature store."""
    with _open_checked(Path(path)) as f:
        return attrs_to_dict(f.attrs)


def load_store(path: str | Path) -> FeatureSet:
    """Read a complete store into memory (features as float32); refuse incomplete, foreign or inconsistent files."""
    path = Path(path)
    with _open_checked(path) as f:
        attrs = _check_complete(path, f)
        return FeatureSet(
            path=path,
            features=f["features"][...].astype(np.float32, copy=False),
            ids=np.asarray(f["ids"].asstr()[...], dtype=object),
            labels=f["labels"][...].astype(np.int64),
            splits=np.asarray(f["splits"].asstr()[...], dtype=object),
            class_names=json.loads(attrs["class_names"]),
            attrs=attrs,
            failed=_read_failed(f),
        )


def read_columns(path: str | Path, *names: str) -> dict[str, np.ndarray]:
    """Some row-aligned columns of a complete store (e.g. ids, labels, splits, files/hash) without its features."""
    path = Path(path)
    with _open_checked(path) as f:
        attrs = _check_complete(path, f)
        n = int(attrs["committed_rows"])
        out = {}
        for name in names:
            if name not in ROW_DATASETS:
                raise ValueError(f"unknown column {name!r}; one of {ROW_DATASETS}")
            data = f[name]
            out[name] = np.asarray(data.asstr()[:n], dtype=object) if name in ("ids", "splits") else data[:n]
        return out


@dataclass
class Block:
    """A contiguous block of rows from `iter_store`; `start` is the index of its first row in the store."""

    start: int
    features: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    splits: np.ndarray


def iter_store(path: str | Path, *, rows: int = 65536, splits: tuple[str, ...] | None = None) -> Iterator[Block]:
    """Stream a complete store in blocks of `rows` rows (features as float32), optionally keeping only some splits.

    Memory is bounded by one block, whatever the store's size: the way to read a store that does not fit in memory.
    """
    path = Path(path)
    with _open_checked(path) as f:
        attrs = _check_complete(path, f)
        n = int(attrs["committed_rows"])
        step = max(1, int(rows))
        for start in range(0, n, step):
            stop = min(n, start + step)
            block = Block(start, f["features"][start:stop].astype(np.float32, copy=False),
                          np.asarray(f["ids"].asstr()[start:stop], dtype=object), f["labels"][start:stop],
                          np.asarray(f["splits"].asstr()[start:stop], dtype=object))
            if splits is not None:
                keep = np.isin(block.splits, list(splits))
                block = Block(start, block.features[keep], block.ids[keep], block.labels[keep], block.splits[keep])
            yield block


def is_current(path: Path, *, key: str, fingerprint: str, layout: dict[str, Any] | None = None) -> bool:
    """True when `path` is a complete, readable store with this cache key built from exactly this data listing
    (and, when given, with these `layout` attributes, e.g. {"layout": "sharded", "shard_rows": 1000})."""
    if not path.is_file() or not h5py.is_hdf5(path):
        return False
    try:
        with _open_checked(path) as f:
            a = attrs_to_dict(f.attrs)
            wanted = {"complete": True, "cache_key": key, "data_fingerprint": fingerprint, **(layout or {})}
            if any(a.get(k) != v for k, v in wanted.items()):
                return False
            _check_complete(path, f)
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


def disk_usage(path: Path) -> int:
    """Bytes on disk of a store: its entry file plus its shard folder."""
    total = path.stat().st_size if path.is_file() else 0
    folder = shards_dir(path)
    if folder.is_dir():
        total += sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return total


def store_info(path: str | Path) -> dict[str, Any]:
    """A summary of a store for people: size, model, splits, classes, failures; works on an unfinished store too."""
    path = Path(path)
    target = path
    if not path.exists() and partial_path(path).exists():
        target = partial_path(path)
    elif not path.exists() and path.suffix == ".partial":
        target = path
    with _open_checked(target) as f:
        attrs = attrs_to_dict(f.attrs)
        n = int(attrs.get("committed_rows", 0))
        splits = np.asarray(f["splits"].asstr()[:n], dtype=object) if "splits" in f else np.array([], dtype=object)
        names, counts = np.unique(splits, return_counts=True) if n else ([], [])
        failed = int(f["failed/ids"].shape[0]) if "failed" in f else 0
        return {
            "path": str(path),
            "complete": bool(attrs.get("complete", False)) and target == path,
            "rows": n,
            "dim": int(f["features"].shape[1]),
            "dtype": attrs.get("feature_dtype", str(f["features"].dtype)),
            "compression": attrs.get("compression", "none"),
            "layout": attrs.get("layout", "single"),
            "shards": len(shard_list(attrs)),
            "backbone": attrs.get("backbone"),
            "weights": attrs.get("weights"),
            "layer": attrs.get("layer") or "pre-logits",
            "splits": {str(k): int(v) for k, v in zip(names, counts, strict=True)},
            "classes": len(json.loads(attrs.get("class_names", "[]"))),
            "failed": failed,
            "size_bytes": disk_usage(target),
            "created": attrs.get("created", ""),
            "cache_key": attrs.get("cache_key"),
            "data_root": attrs.get("data_root", ""),
            "source": attrs.get("source", "folder"),
            "source_description": attrs.get("source_description", attrs.get("data_root", "")),
            "unlabelled": int((f["labels"][:n] < 0).sum()) if "labels" in f and n else 0,
        }


def verify_store(path: str | Path, *, rows: int = 65536) -> list[str]:
    """Check a store thoroughly, streaming it in blocks; return the problems found (empty when it is sound).

    Checks: complete; row counts agree; shards present with the rows and ids the entry expects; features finite and
    of unit norm; ids unique and disjoint from failed ids; labels within the class list; splits known.
    """
    path = Path(path)
    problems: list[str] = []
    try:
        with _open_checked(path) as f:
            attrs = _check_complete(path, f)
    except StoreError as exc:
        return [str(exc)]
    with h5py.File(path, "r") as f:
        n = int(attrs["committed_rows"])
        n_classes = len(json.loads(attrs["class_names"]))
        tolerance = NORM_TOLERANCE.get(attrs.get("feature_dtype", "float32"), 1e-4)
        seen: set[str] = set()
        offset = 0
        shard_starts = {}
        for shard in shard_list(attrs):
            shard_starts[offset] = shard
            offset += shard["rows"]
        if shard_starts and offset != n:
            problems.append(f"the shards hold {offset} rows but the store has {n}")
        for shard_start, shard in shard_starts.items():
            with h5py.File(shards_dir(path) / shard["file"], "r") as s:
                shard_ids = s["ids"].asstr()[: shard["rows"]]
                entry_ids = f["ids"].asstr()[shard_start: shard_start + shard["rows"]]
                if list(shard_ids) != list(entry_ids):
                    problems.append(f"shard {shard['file']} does not hold the ids the store lists for rows "
                                    f"{shard_start}..{shard_start + shard['rows'] - 1} (rows misaligned)")
        step = max(1, int(rows))
        bad_finite = bad_norm = duplicates = bad_labels = bad_splits = 0
        examples: dict[str, str] = {}
        for start in range(0, n, step):
            stop = min(n, start + step)
            feats = f["features"][start:stop].astype(np.float32)
            ids = f["ids"].asstr()[start:stop]
            finite = np.isfinite(feats).all(axis=1)
            bad_finite += int((~finite).sum())
            if (~finite).any():
                examples.setdefault("finite", ids[int(np.argmin(finite))])
            norms = np.linalg.norm(np.where(np.isfinite(feats), feats, 0), axis=1)
            off = finite & (np.abs(norms - 1.0) > tolerance)
            bad_norm += int(off.sum())
            if off.any():
                examples.setdefault("norm", ids[int(np.argmax(off))])
            for i in ids:
                if i in seen:
                    duplicates += 1
                    examples.setdefault("dup", i)
                seen.add(i)
            labels = f["labels"][start:stop]
            bad_labels += int(((labels < -1) | (labels >= n_classes)).sum())
            split_values = f["splits"].asstr()[start:stop]
            bad_splits += int(sum(s not in ("train", "val", "test") for s in split_values))
        if bad_finite:
            problems.append(f"{bad_finite} row(s) have non-finite features (e.g. {examples['finite']!r})")
        if bad_norm:
            problems.append(f"{bad_norm} row(s) are not unit-norm within {tolerance:g} (e.g. {examples['norm']!r})")
        if duplicates:
            problems.append(f"{duplicates} duplicate id(s) (e.g. {examples['dup']!r})")
        if bad_labels:
            problems.append(f"{bad_labels} label(s) outside -1..{n_classes - 1}")
        if bad_splits:
            problems.append(f"{bad_splits} split value(s) other than train/val/test")
        failed = set(_read_failed(f))
        both = failed & seen
        if both:
            problems.append(f"{len(both)} id(s) are both rows and failures (e.g. {sorted(both)[0]!r})")
        if int(attrs.get("failed_count", len(failed))) != len(failed):
            problems.append(f"failed_count={attrs.get('failed_count')} but {len(failed)} failures are recorded")
    return problems
