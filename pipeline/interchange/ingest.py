"""`import`: features computed elsewhere into a store, so that probes, kNN, the audit and indexes run on them.

Inputs: the clip-retrieval/autofaiss layout (a folder with `img_emb/*.npy` and row-aligned `metadata/*.parquet`,
files paired in sorted order), or Parquet with an embedding column (a file or a folder of them). Columns: `id` (or
`key`, `image_path`, `path`), optional `label` (integers, with `class_name`, or class-name strings), `split`
(train/val/test; without it each class is split 70/30 by content as extraction does) and `hash` (the image's
content hash, which orders rows for the probe's validation slice and the bootstrap: kept, an imported store probes
to the same numbers as the store it was exported from). A `.featpipe.json` beside the files (written by `export`)
gives the backbone, weights, preprocessing and class names; otherwise the store records the features as external.

Files are data only: npy is read without pickle, Parquet through pyarrow. Rows that are not finite or are zero are
refused; rows not of unit norm are L2-normalised (and counted in the store's `normalized_on_import`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import DEFAULT_ALPHA
from pipeline.errors import PipelineError
from pipeline.interchange.export import METADATA
from pipeline.plan import Provenance
from pipeline.splits import stratified_splits
from pipeline.store.read import check_target
from pipeline.store.reuse import Listing
from pipeline.store.schema import NORM_TOLERANCE, SPLITS, cache_key
from pipeline.store.writer import StoreWriter

ID_COLUMNS = ("id", "key", "image_path", "path")
EMBEDDING_COLUMNS = ("embedding", "embeddings", "vector", "emb")
BATCH_ROWS = 32_768


@dataclass
class Input:
    """What an input holds: its layout, the metadata columns (row-aligned over all files) and how to stream the
    vectors."""

    path: Path
    layout: str
    columns: dict[str, list]
    dim: int
    dtype: str
    vectors: Any  # () -> iterator of float arrays, in row order

    @property
    def rows(self) -> int:
        return len(next(iter(self.columns.values()), []))


def _bad(path: Path, what: str) -> PipelineError:
    return PipelineError(f"cannot import {path}: {what}")


METADATA_COLUMNS = ("label", "class_name", "split", "hash")  # with the first of ID_COLUMNS a file has


def _read_metadata(files: list[Path], skip: str | None) -> dict[str, list]:
    """The metadata columns the store needs (ids, labels, class names, splits, hashes), over all files in order."""
    import pyarrow.parquet as pq

    out: dict[str, list] = {}
    for file in files:
        try:
            schema = pq.read_schema(file)
            id_name = next((n for n in ID_COLUMNS if n in schema.names and n != skip), None)
            names = [id_name] * (id_name is not None) + [n for n in METADATA_COLUMNS if n in schema.names]
            table = pq.read_table(file, columns=names)
        except Exception as exc:  # noqa: BLE001 - any parquet problem: the user's file, one line
            raise _bad(file, f"not a readable Parquet file ({type(exc).__name__}: {str(exc)[:200]})") from None
        for name in names:
            out.setdefault(name, []).extend(table.column(name).to_pylist())
        if names and any(len(v) != len(out[names[0]]) for v in out.values()):
            raise _bad(file, "its files do not have the same columns")
    return out


def _clip_retrieval(path: Path) -> Input:
    npys = sorted((path / "img_emb").glob("*.npy"))
    metas = sorted((path / "metadata").glob("*.parquet"))
    if not npys or len(npys) != len(metas):
        raise _bad(path, f"{len(npys)} img_emb/*.npy and {len(metas)} metadata/*.parquet files; the layout pairs "
                         "one metadata file with each embedding file")
    shapes = []
    for file in npys:
        try:
            array = np.load(file, mmap_mode="r", allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - not an npy of numbers (pickles are refused here)
            raise _bad(file, f"not a numeric .npy array ({type(exc).__name__}: {str(exc)[:200]})") from None
        if array.ndim != 2 or array.dtype.kind != "f":
            raise _bad(file, f"an array of shape {array.shape} and type {array.dtype}, not [rows, dim] floats")
        shapes.append((array.shape, str(array.dtype)))
    if len({shape[1] for shape, _ in shapes}) > 1:
        raise _bad(path, "the .npy files have different dimensions")
    columns = _read_metadata(metas, skip=None)
    counts = [shape[0] for shape, _ in shapes]
    if columns and sum(counts) != len(next(iter(columns.values()))):
        raise _bad(path, f"{sum(counts)} vectors but {len(next(iter(columns.values())))} metadata rows")

    def vectors() -> Iterator[np.ndarray]:
        for file in npys:
            array = np.load(file, mmap_mode="r", allow_pickle=False)
            for start in range(0, len(array), BATCH_ROWS):
                yield np.asarray(array[start:start + BATCH_ROWS])

    dtype = "float16" if all(d == "float16" for _, d in shapes) else "float32"
    return Input(path, "clip-retrieval", columns, shapes[0][0][1], dtype, vectors)


def _embedding_column(file: Path, wanted: str | None) -> tuple[str, int, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(file)
    names = [wanted] if wanted else [n for n in EMBEDDING_COLUMNS if n in schema.names]
    if not names or names[0] not in schema.names:
        raise _bad(file, f"no embedding column ({wanted or ', '.join(EMBEDDING_COLUMNS)}); name it with "
                         "--embedding-column")
    kind = schema.field(names[0]).type
    if not (pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind)) or not pa.types.is_floating(kind.value_type):
        raise _bad(file, f"column {names[0]!r} is {kind}, not a list of floats")
    dim = kind.list_size if pa.types.is_fixed_size_list(kind) else -1
    return names[0], dim, "float16" if pa.types.is_float16(kind.value_type) else "float32"


def _parquet(path: Path, wanted: str | None) -> Input:
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise _bad(path, "no .parquet files")
    column, dim, dtype = _embedding_column(files[0], wanted)
    if dim < 0:  # a variable-length list column: the first row gives the dimension, every row is checked
        first = pq.ParquetFile(files[0]).read_row_group(0, columns=[column]).column(0)[0].as_py()
        dim = len(first or [])

    def vectors() -> Iterator[np.ndarray]:
        for file in files:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=BATCH_ROWS, columns=[column]):
                values = batch.column(0)
                flat = values.flatten().to_numpy(zero_copy_only=False)
                if len(flat) != len(values) * dim or values.null_count:
                    raise _bad(file, f"column {column!r} has rows that are empty or not {dim} numbers long")
                yield flat.reshape(len(values), dim)

    return Input(path, "parquet", _read_metadata(files, skip=column), dim, dtype, vectors)


def open_input(path: str | Path, *, embedding_column: str | None = None) -> Input:
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"--from {path} does not exist; give an export folder, a .parquet file or a folder of "
                            "them")
    if path.is_dir() and (path / "img_emb").is_dir():
        return _clip_retrieval(path)
    return _parquet(path, embedding_column)


def _ids(source: Input) -> list[str]:
    name = next((c for c in ID_COLUMNS if c in source.columns), None)
    if name is None:
        raise _bad(source.path, f"no id column (one of {', '.join(ID_COLUMNS)})")
    ids = source.columns[name]
    if any(not isinstance(i, str | int) or isinstance(i, bool) or i == "" for i in ids):
        raise _bad(source.path, f"column {name!r} has empty or non-text ids")
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise _bad(source.path, f"column {name!r} has duplicate ids (e.g. {_first_duplicate(ids)!r})")
    return ids


def _first_duplicate(values: list[str]) -> str:
    seen: set[str] = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    return ""


def _labels(source: Input, recorded: list[str] | None) -> tuple[np.ndarray, list[str], str]:
    """Labels (-1: none), class names and where they came from."""
    cols, n = source.columns, source.rows
    raw, names = cols.get("label"), cols.get("class_name")
    if raw is None and names is None:
        return np.full(n, -1, dtype=np.int64), list(recorded or []), "none"
    if raw is not None and all(isinstance(v, int) and not isinstance(v, bool) for v in raw if v is not None):
        labels = np.array([-1 if v is None else v for v in raw], dtype=np.int64)
        classes = list(recorded or [])
        if not classes and names is not None:
            pairs = {int(y): str(c) for y, c in zip(labels, names, strict=True) if y >= 0 and c is not None}
            classes = [pairs.get(i, str(i)) for i in range(int(labels.max(initial=-1)) + 1)]
        classes = classes or [str(i) for i in range(int(labels.max(initial=-1)) + 1)]
        if (labels < -1).any() or (labels >= len(classes)).any():
            raise _bad(source.path, f"labels outside -1..{len(classes) - 1}")
        return labels, classes, "column label"
    text = raw if raw is not None else names
    if any(v is not None and not isinstance(v, str) for v in text):
        raise _bad(source.path, "labels are neither integers nor class names")
    classes = list(recorded or sorted({v for v in text if v}))
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({v for v in text if v and v not in index})
    if unknown:
        raise _bad(source.path, f"class names {unknown[:3]} are not in the recorded class list")
    return np.array([index[v] if v else -1 for v in text], dtype=np.int64), classes, "column class name"


def _splits(source: Input, keys: list[str], labels: np.ndarray, ids: list[str]) -> tuple[list[str], str]:
    given = source.columns.get("split")
    if given is None:
        return stratified_splits(keys, labels, test_fraction=0.3, seed=0, ties=ids), "stratified by content"
    bad = sorted({str(s) for s in given if s not in SPLITS})
    if bad:
        raise _bad(source.path, f"split values {bad[:3]} are not train/val/test")
    return [str(s) for s in given], "column split"


def _hashes(source: Input, ids: list[str]) -> list[str]:
    given = source.columns.get("hash")
    if given is None:
        return [""] * len(ids)
    if any(h is not None and (not isinstance(h, str) or len(h) > 32) for h in given):
        raise _bad(source.path, "column hash has values that are not content hashes (32 hex digits)")
    return [h or "" for h in given]


def _recorded(source: Input) -> dict[str, Any]:
    """The provenance an export left beside the files (`.featpipe.json`), checked to be plain values."""
    file = (source.path if source.path.is_dir() else source.path.parent) / METADATA
    if not file.is_file():
        return {}
    try:
        record = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise _bad(file, f"not JSON ({exc})") from None
    if not isinstance(record, dict):
        raise _bad(file, "not a JSON object")
    kinds = {"backbone": str, "weights": str, "layer": str, "preprocessing": str, "class_names": list,
             "precision": str, "alpha": str, "random_init": bool}
    for key, kind in kinds.items():
        if key in record and not isinstance(record[key], kind):
            raise _bad(file, f"field {key!r} is not a {kind.__name__}")
    if not all(isinstance(c, str) for c in record.get("class_names", [])):
        raise _bad(file, "class_names are not strings")
    return record


def _provenance(source: Input, record: dict[str, Any], *, name: str | None, classes: list[str], n: int,
                label_source: str, split_source: str, feature_dtype: str, fingerprint: str) -> Provenance:
    try:
        preprocessing = json.loads(record.get("preprocessing") or "{}")
    except ValueError:
        preprocessing = None
    if not isinstance(preprocessing, dict):
        raise _bad(source.path, ".featpipe.json's preprocessing is not a JSON object")
    backbone = record.get("backbone") if name is None and record.get("backbone") else f"external:{name or 'unknown'}"
    weights = record.get("weights", "external") if backbone == record.get("backbone") else "external"
    layer, precision = record.get("layer", "external"), record.get("precision", "")
    alpha = record.get("alpha", DEFAULT_ALPHA)
    key = cache_key(backbone=backbone, weights=weights, preprocessing=json.dumps(preprocessing, sort_keys=True),
                    layer=layer, feature_dtype=feature_dtype, precision=precision, alpha=alpha)
    return Provenance(
        backbone=backbone, weights=weights, random_init=bool(record.get("random_init", False)), layer=layer,
        preprocessing=preprocessing, precision=precision, optimization="", feature_dim=source.dim, cache_key=key,
        class_names=classes, decoding={"alpha": alpha}, data="", data_options={}, data_root=str(source.path.resolve()),
        source="import", source_description=f"features imported from {source.path.resolve()} ({source.layout})",
        split_source=split_source, label_source=label_source, num_images=n, data_fingerprint=fingerprint,
        versions=_versions())


def _versions() -> dict[str, str]:
    """The libraries that read and wrote these features here (no model ran: torch and timm are not loaded)."""
    import platform

    import h5py
    import pyarrow

    return {"python": platform.python_version(), "numpy": np.__version__, "h5py": h5py.__version__,
            "pyarrow": pyarrow.__version__}


def _unit_rows(vectors: np.ndarray, ids: list[str], start: int, dtype: str) -> tuple[np.ndarray, int]:
    """The rows in the storage dtype as unit vectors (rows already unit-norm there, within the readers' tolerance,
    kept bit for bit) and how many were normalised here."""
    given = np.asarray(vectors)
    finite = np.isfinite(given).all(axis=1)
    bad = ~finite | ~np.any(given != 0, axis=1)
    if bad.any():
        raise PipelineError(f"cannot import row {ids[start + int(np.argmax(bad))]!r}: its vector is not finite or is "
                            "zero; fix or drop it and import again")
    with np.errstate(over="ignore"):  # a row too large for float16 is normalised below
        stored = given.astype(dtype)
    norms = np.linalg.norm(stored.astype(np.float32), axis=1)
    off = ~np.isfinite(norms) | (np.abs(norms - 1.0) > NORM_TOLERANCE[dtype])
    if off.any():
        exact = given[off].astype(np.float64)
        stored[off] = (exact / np.linalg.norm(exact, axis=1, keepdims=True)).astype(dtype)
    return stored, int(off.sum())


@dataclass
class ImportResult:
    out: Path
    rows: int
    normalized: int
    backbone: str

    def summary(self) -> str:
        extra = f"; {self.normalized:,} row(s) L2-normalised" if self.normalized else ""
        return f"imported {self.rows:,} rows ({self.backbone}) into {self.out}{extra}"


def import_features(path: str | Path, out: str | Path, *, embedding_column: str | None = None,
                    backbone: str | None = None, feature_dtype: str | None = None,
                    overwrite: bool = False) -> ImportResult:
    """Write the features at `path` (see the module docstring) to the store `out`."""
    source, out = open_input(path, embedding_column=embedding_column), Path(out)
    record = _recorded(source)
    ids = _ids(source)
    labels, classes, label_source = _labels(source, record.get("class_names") or None)
    hashes = _hashes(source, ids)
    splits, split_source = _splits(source, [h or i for h, i in zip(hashes, ids, strict=True)], labels, ids)
    dtype = feature_dtype or source.dtype
    digest = hashlib.sha256(json.dumps(classes).encode())
    for i, y, s, h in zip(ids, labels, splits, hashes, strict=True):
        digest.update(f"{i}\0{y}\0{s}\0{h}\n".encode())
    made = _provenance(source, record, name=backbone, classes=classes, n=len(ids), label_source=label_source,
                       split_source=split_source, feature_dtype=dtype, fingerprint=digest.hexdigest()[:32])
    check_target(out, key=made.cache_key, overwrite=overwrite)
    listing = Listing(ids=ids, labels=labels, splits=splits, stamps=np.zeros((len(ids), 2), dtype=np.int64))
    normalized, start = 0, 0
    with StoreWriter(out, listing=listing, dim=source.dim, attrs=made.to_attrs(), feature_dtype=dtype) as writer:
        writer.prepare(reuse=False)
        for block in source.vectors():
            if block.shape[1] != source.dim:
                raise _bad(source.path, f"vectors of {block.shape[1]} numbers after vectors of {source.dim}")
            if start + len(block) > len(ids):
                raise _bad(source.path, f"more vectors than the {len(ids)} metadata rows")
            vectors, fixed = _unit_rows(block, ids, start, dtype)
            writer.write(np.arange(start, start + len(block)), vectors, hashes[start:start + len(block)])
            normalized, start = normalized + fixed, start + len(block)
        if start != len(ids):
            raise _bad(source.path, f"{start} vectors but {len(ids)} metadata rows")
        writer.attrs["normalized_on_import"] = normalized
        writer.finish()
    return ImportResult(out, len(ids), normalized, made.backbone)
