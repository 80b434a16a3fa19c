"""A store too large to load, held as compact per-row columns: what the streamed probe, kNN and reports work from.

`scan_store` reads the row-aligned columns block by block into a `StreamedSet`: labels (int32), split codes (int8) and
a 64-bit ordering key per image (the first 64 bits of its content hash), about 13 bytes a row instead of the Python
objects a `FeatureSet` keeps, and checks them as the full readers do. Features are read when needed, a block (or a
few chunks) at a time, as float32, each block checked (finite, unit norm) before use; augmented views are left out.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.plan import Provenance
from pipeline.sources.views import store_views, view_mask
from pipeline.store.read import _damaged, check_complete, failed_rows, open_checked
from pipeline.store.schema import NORM_TOLERANCE, SPLITS

SPLIT_CODE = {name: code for code, name in enumerate(SPLITS)}
SCAN_ROWS = 1 << 20  # rows of the columns read at a time
PICK_ROWS = 1 << 16  # wanted rows gathered at a time (a stretch of the store around them is read whole)
_HEX = np.full(256, 255, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16, dtype=np.uint8)
_HEX[np.frombuffer(b"ABCDEF", dtype=np.uint8)] = np.arange(10, 16, dtype=np.uint8)


def read_text(path: str | Path, name: str) -> np.ndarray:
    """A UTF-8 row column (`ids` or `splits`) of a complete store as fixed-width text (numpy `<U`), converted a block
    at a time: 4 bytes a character and no Python object per row (~57 bytes each, plus the text). Splits are checked
    as the full readers check them."""
    path = Path(path)
    with open_checked(path) as f:
        n = int(check_complete(path, f)["committed_rows"])
        parts = [np.array(f[name].asstr()[start:start + SCAN_ROWS], dtype=str) for start in range(0, n, SCAN_ROWS)]
    out = np.concatenate(parts) if parts else np.array([], dtype=str)
    if name == "splits" and not np.isin(out, list(SPLITS)).all():
        raise _damaged(path, "splits other than train/val/test")
    return out


def hash_keys(hashes: np.ndarray, ids: Any = None) -> np.ndarray:
    """uint64 ordering keys from hex content hashes (S32): their first 16 hex digits. A row without a readable hash
    gets the key of its id (BLAKE2b), so the order still belongs to the image, not to the listing."""
    raw = np.frombuffer(np.ascontiguousarray(hashes, dtype="S32").tobytes(), dtype=np.uint8).reshape(-1, 32)[:, :16]
    digits = _HEX[raw]
    bad = (digits == 255).any(axis=1)
    keys = np.zeros(len(raw), dtype=np.uint64)
    for i in range(16):
        keys = (keys << np.uint64(4)) | digits[:, i].astype(np.uint64)
    for i in np.flatnonzero(bad):
        name = "" if ids is None else str(ids()[i] if callable(ids) else ids[i])
        keys[i] = int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest(),
                                 "big")
    return keys


@dataclass
class StreamedSet:
    """A complete store as compact columns (one entry per image; augmented views left out); features stay on disk.
    Offers what the reports and results need from a `FeatureSet` (labels, masks, provenance, class names)."""

    path: Path
    attrs: dict[str, Any] = field(repr=False)
    class_names: list[str]
    rows: np.ndarray  # store row number of each image, increasing (int32 below 2**31 rows)
    labels: np.ndarray  # int32
    codes: np.ndarray  # int8 index into SPLITS
    keys: np.ndarray  # uint64 ordering keys
    failed: dict[str, str] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def dim(self) -> int:
        return int(self.attrs["feature_dim"])

    @property
    def made(self) -> Provenance:
        return Provenance.from_attrs(self.attrs)

    def mask(self, *splits: str) -> np.ndarray:
        return np.isin(self.codes, [SPLIT_CODE[s] for s in splits])

    def split_names(self) -> list[str]:
        present = np.bincount(self.codes, minlength=len(SPLITS))
        return [s for s in SPLITS if present[SPLIT_CODE[s]]]

    def provenance(self) -> dict[str, Any]:
        made = self.made
        return {"store": str(Path(self.path).resolve()), "store_id": self.attrs.get("store_id", ""),
                "backbone": made.backbone, "weights": made.weights, "cache_key": made.cache_key,
                "class_names": self.class_names}

    def ordered(self, mask: np.ndarray) -> np.ndarray:
        """Positions of `mask` ordered by content (key, then store row): the same order whatever the listing."""
        positions = np.flatnonzero(mask)
        return positions[np.lexsort((self.rows[positions], self.keys[positions]))]

    def ids_of(self, positions: np.ndarray) -> np.ndarray:
        """Ids of some positions (any order)."""
        unique, inverse = np.unique(self.rows[np.asarray(positions, dtype=np.int64)], return_inverse=True)
        with h5py.File(self.path, "r") as f:
            raw = _read_sorted(f["ids"], unique)
        return np.asarray([r.decode("utf-8", "surrogateescape") if isinstance(r, bytes) else str(r) for r in raw],
                          dtype=object)[inverse]

    def row_keys_of(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(content keys, ids) of some positions as UTF-8 byte-string arrays, the keys as `FeatureSet.row_keys`
        gives them (the hash, else the id): what per-image results are packed by (`pack_correct_arrays`)."""
        unique, inverse = np.unique(self.rows[np.asarray(positions, dtype=np.int64)], return_inverse=True)
        with h5py.File(self.path, "r") as f:
            hashes = _read_sorted(f["files/hash"], unique)[inverse]
            raw_ids = _read_sorted(f["ids"], unique)[inverse]
        ids = np.array([r if isinstance(r, bytes) else str(r).encode("utf-8", "surrogateescape") for r in raw_ids],
                       dtype=bytes)
        return np.where(hashes != b"", hashes, ids), ids

    def features_of(self, positions: np.ndarray) -> np.ndarray:
        """float32 features of some positions (any order), checked."""
        unique, inverse = np.unique(self.rows[np.asarray(positions, dtype=np.int64)], return_inverse=True)
        with h5py.File(self.path, "r") as f:
            return self._checked(_read_sorted(f["features"], unique))[inverse]

    def blocks(self, mask: np.ndarray | None = None, *, block_rows: int = 65536) -> Iterator[tuple[np.ndarray,
                                                                                                    np.ndarray]]:
        """(positions, float32 features) of the images in `mask` (all when None), in store order, `block_rows`
        store rows read at a time."""
        n = int(self.attrs["committed_rows"])
        with h5py.File(self.path, "r") as f:
            features = f["features"]
            for start in range(0, n, max(1, block_rows)):
                lo, hi = np.searchsorted(self.rows, [start, start + block_rows])
                positions = np.arange(lo, hi)
                if mask is not None:
                    positions = positions[mask[lo:hi]]
                if not len(positions):
                    continue
                stop = int(self.rows[positions[-1]]) + 1
                first = int(self.rows[positions[0]])
                yield positions, self._checked(features[first:stop])[self.rows[positions] - first]

    def chunk_reader(self, features: h5py.Dataset, start: int, stop: int, mask: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
        """(positions, features) of the images in `mask` among store rows [start, stop) of an open file."""
        lo, hi = np.searchsorted(self.rows, [start, stop])
        positions = np.arange(lo, hi)[mask[lo:hi]]
        if not len(positions):
            return positions, np.empty((0, self.dim), dtype=np.float32)
        first = int(self.rows[positions[0]])
        stop = int(self.rows[positions[-1]]) + 1
        return positions, self._checked(features[first:stop])[self.rows[positions] - first]

    def _checked(self, block: np.ndarray) -> np.ndarray:
        """A block of features as float32, refused when any row is non-finite or not unit-norm."""
        x = block.astype(np.float32, copy=False)
        tolerance = NORM_TOLERANCE.get(self.attrs.get("feature_dtype", "float32"), 1e-4)
        finite = np.isfinite(x).all(axis=1)
        norms = np.linalg.norm(np.where(finite[:, None], x, 0.0), axis=1)
        bad = ~finite | (np.abs(norms - 1.0) > tolerance)
        if bad.any():
            what = "non-finite features" if (~finite).any() else f"features not unit-norm (within {tolerance:g})"
            raise _damaged(self.path, f"{int(bad.sum())} row(s) with {what}")
        return x

    def projection_sample(self, max_points: int = 5000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """A seeded sample of labelled rows (features, labels) for the report's projection."""
        labelled = np.flatnonzero(self.labels >= 0)
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(labelled, size=min(max_points, len(labelled)), replace=False))
        return self.features_of(pick), self.labels[pick].astype(np.int64)


def read_column(ss: StreamedSet, name: str, positions: np.ndarray) -> np.ndarray:
    """A row-aligned dataset (e.g. files/hash) at some positions (increasing)."""
    with h5py.File(ss.path, "r") as f:
        return _read_sorted(f[name], ss.rows[np.asarray(positions, dtype=np.int64)])


def _read_sorted(data: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """data[rows] for increasing unique rows: contiguous stretches read whole and picked (per-row reads of chunked
    data are a hundred times slower)."""
    out = []
    for start in range(0, len(rows), PICK_ROWS):
        part = rows[start:start + PICK_ROWS]
        lo, hi = int(part[0]), int(part[-1]) + 1
        if hi - lo <= 8 * len(part) + 65536:
            out.append(data[lo:hi][part - lo])
        else:
            out.append(data[part])
    return np.concatenate(out) if out else data[0:0]


def _scan_block(path: Path, f: h5py.File, attrs: dict[str, Any], start: int, stop: int,
                n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(keep, labels, split codes, keys) of store rows [start, stop), checked."""
    labels = f["labels"][start:stop].astype(np.int32)
    splits = np.asarray(f["splits"].asstr()[start:stop], dtype=object)
    codes = np.full(len(splits), -1, dtype=np.int8)
    for name, code in SPLIT_CODE.items():
        codes[splits == name] = code
    if ((labels < -1) | (labels >= n_classes)).any():
        bad = int(((labels < -1) | (labels >= n_classes)).sum())
        raise _damaged(path, f"{bad} row(s) with label(s) outside -1..{n_classes - 1}")
    if (codes < 0).any():
        raise _damaged(path, f"{int((codes < 0).sum())} row(s) with split value(s) other than train/val/test")
    keep = np.ones(len(labels), dtype=bool)
    ids = None
    if store_views(attrs):
        ids = np.asarray(f["ids"].asstr()[start:stop], dtype=object)
        keep = ~view_mask(ids, attrs)
    keys = hash_keys(f["files/hash"][start:stop], ids=lambda: np.asarray(f["ids"].asstr()[start:stop], dtype=object))
    return keep, labels, codes, keys


def scan_store(path: str | Path) -> StreamedSet:
    """The compact columns of a complete store, read `SCAN_ROWS` rows at a time into preallocated arrays; refuses
    what `load_store` refuses in the columns (labels outside the class list, unknown splits) and checks features as
    they are later read."""
    path = Path(path)
    with open_checked(path) as f:
        attrs = check_complete(path, f)
        n = int(attrs["committed_rows"])
        class_names = json.loads(attrs["class_names"])
        keep, labels = np.ones(n, dtype=bool), np.empty(n, dtype=np.int32)
        codes, keys = np.empty(n, dtype=np.int8), np.empty(n, dtype=np.uint64)
        for start in range(0, n, SCAN_ROWS):
            stop = min(n, start + SCAN_ROWS)
            keep[start:stop], labels[start:stop], codes[start:stop], keys[start:stop] = _scan_block(
                path, f, attrs, start, stop, len(class_names))
        failed = failed_rows(f)
    index = np.int32 if n < 2**31 else np.int64  # row numbers: 4 bytes each up to 2 billion rows
    if keep.all():
        return StreamedSet(path=path, attrs=attrs, class_names=class_names, rows=np.arange(n, dtype=index),
                           labels=labels, codes=codes, keys=keys, failed=failed)
    return StreamedSet(path=path, attrs=attrs, class_names=class_names, rows=np.flatnonzero(keep).astype(index),
                       labels=labels[keep], codes=codes[keep], keys=keys[keep], failed=failed)
