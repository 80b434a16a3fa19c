"""Manifests: a CSV, Parquet or JSON Lines table with a `path` column (absolute or relative to the manifest's folder)
and optional `label`, `split` and `id` columns (default id: the path as written).

A manifest of millions is listed as columns: arrow reads the file and its kernels strip, check and code the cells,
so Python runs once per row only to stat the file (the stamp the up-to-date check needs)."""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.engine.decode import SPLITS, FileReader
from pipeline.errors import DataError
from pipeline.sources.base import (
    DATA_HINT,
    DEFAULT_OPTIONS,
    UNLABELLED,
    ListOptions,
    Source,
    cell,
    check_unique,
    class_order,
    file_content_keys,
    finish_table,
    recoded,
    split_cell,
)
from pipeline.sources.stamps import file_stamps
from pipeline.sources.table import UNDECIDED, FileColumn, TextBuilder, release_freed_memory

T = TypeVar("T")
log = logging.getLogger(__name__)

MANIFEST_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def posix_text(text: str) -> str:
    """`Path(text).as_posix()` (the default id: repeated slashes, `.` parts and a trailing slash dropped), without
    building a Path when the text is already in that form (nearly always: a manifest's paths)."""
    if "//" in text or "/./" in text or text.startswith("./") or text.endswith(("/", "/.")) or text == ".":
        return Path(text).as_posix()
    return text


COLUMNS = ("path", "label", "split", "id")


def _jsonl_rows(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    rows: list[dict[str, Any]] = []
    columns: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {number} is not valid JSON ({exc.msg}); one object per line") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number} is a JSON {type(row).__name__}, not an object "
                                '(expected {"path": ..., "label": ...} per line)')
            rows.append(row)
            columns.extend(k for k in row if k not in columns)
    return rows, columns


def _csv_columns(path: Path) -> tuple[dict[str, list], list[str]]:
    """The CSV's COLUMNS as lists (a short row's missing cells None, blank lines skipped, as csv.DictReader does),
    without a dict per row."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        columns = [c.strip() for c in next(reader, [])]
        where = {c: i for i, c in enumerate(columns) if c in COLUMNS}  # a repeated name: the last one, like DictReader
        lists: dict[str, list] = {c: [] for c in where}
        pairs = [(lists[c].append, i) for c, i in where.items()]
        for row in reader:
            if not row:
                continue
            width = len(row)
            for append, i in pairs:
                append(row[i] if i < width else None)
    return lists, columns


BATCH_ROWS = 1 << 18  # rows of the manifest read and coded at a time


class _NotRegular(Exception):
    """Arrow cannot read this CSV as a regular table: the csv module reads it instead."""


def _require_path(path: Path, columns: list) -> None:
    if "path" not in columns:
        raise DataError(f"manifest {path} has no 'path' column (columns: {', '.join(map(str, columns)) or 'none'}); "
                        "expected path and optionally label, split, id")


def _arrow_csv_batches(path: Path) -> Iterator[dict[str, pa.Array]]:
    """The CSV's COLUMNS read by arrow, a block at a time (in threads, no Python object per cell; header names
    stripped, a BOM dropped). `_NotRegular` when arrow cannot read it as a regular table (a short row, a repeated
    column name, text that is not UTF-8): then the csv module reads it, and says what is wrong."""
    import pyarrow.csv as pcsv

    with open(path, newline="", encoding="utf-8-sig") as fh:
        names = [c.strip() for c in next(csv.reader(fh), [])]
    _require_path(path, names)
    where = {c: f"c{i}" for i, c in enumerate(names) if c in COLUMNS}
    if len(where) != sum(c in COLUMNS for c in names):
        raise _NotRegular
    try:
        reader = pcsv.open_csv(path, read_options=pcsv.ReadOptions(
                                   column_names=[f"c{i}" for i in range(len(names))], skip_rows=1,
                                   block_size=1 << 21),
                               parse_options=pcsv.ParseOptions(newlines_in_values=True),
                               convert_options=pcsv.ConvertOptions(
                                   include_columns=list(where.values()), strings_can_be_null=False,
                                   column_types={c: pa.large_string() for c in where.values()}))
        for batch in reader:
            yield {c: batch.column(name) for c, name in where.items()}
    except pa.ArrowInvalid as exc:
        raise _NotRegular from exc


def _list_batches(lists: dict[str, list]) -> Iterator[dict[str, list]]:
    n = len(lists["path"])
    for start in range(0, n, BATCH_ROWS):
        yield {c: values[start:start + BATCH_ROWS] for c, values in lists.items()}


def _parquet_batches(path: Path) -> Iterator[dict[str, pa.Array]]:
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    names = list(file.schema_arrow.names)
    _require_path(path, names)
    for batch in file.iter_batches(batch_size=BATCH_ROWS, columns=[c for c in COLUMNS if c in names]):
        yield {c: batch.column(c) for c in batch.schema.names}


def manifest_batches(path: Path, *, arrow: bool = True) -> Iterator[dict[str, pa.Array | list]]:
    """The `path`, `label`, `split` and `id` columns of a CSV, Parquet or JSON-lines manifest (those it has; names
    stripped), in blocks of rows: arrow arrays (CSV, Parquet) or lists of cells (JSON lines; a CSV when not
    `arrow`). It must have `path`; a CSV arrow cannot read raises `_NotRegular` (read it again without `arrow`)."""
    fmt = MANIFEST_FORMATS[path.suffix.lower()]
    try:
        if fmt == "csv" and arrow:
            yield from _arrow_csv_batches(path)
        elif fmt == "csv":
            lists, columns = _csv_columns(path)
            _require_path(path, columns)
            yield from _list_batches(lists)
        elif fmt == "parquet":
            yield from _parquet_batches(path)
        else:
            rows, columns = _jsonl_rows(path)
            _require_path(path, columns)
            yield from _list_batches({c: [row.get(c) for row in rows] for c in COLUMNS if c in columns})
    except (DataError, _NotRegular):
        raise
    except (OSError, UnicodeDecodeError, csv.Error, ValueError, pa.ArrowException) as exc:
        raise DataError(f"cannot read manifest {path} ({type(exc).__name__}: {exc})") from exc


def regular_or_not(path: Path, use: Callable[[Iterator[dict]], T]) -> T:
    """`use(batches)` of the manifest read by arrow, or by the csv module when arrow cannot read it."""
    try:
        return use(manifest_batches(path))
    except _NotRegular:
        return use(manifest_batches(path, arrow=False))


def manifest_columns(path: Path) -> dict[str, pa.ChunkedArray | list]:
    """The manifest's columns whole (`manifest_batches` joined): arrow columns or lists of cells."""

    def join(batches: Iterator[dict]) -> dict[str, pa.ChunkedArray | list]:
        parts: dict[str, list] = {}
        for batch in batches:
            for c, values in batch.items():
                parts.setdefault(c, []).append(values)
        return {c: pa.chunked_array(v) if isinstance(v[0], pa.Array) else [x for part in v for x in part]
                for c, v in parts.items()}

    return regular_or_not(path, join)


# -- the columns as arrow arrays: one pass of arrow's kernels per column, not a Python call per row -----------------

_TEXT = pa.large_string()
_NULL = pa.scalar(None, _TEXT)
_EMPTY = pa.array(["nan", "none", "null"], _TEXT)
_NOT_POSIX = r"//|/\./|^\./|/$|/\.$|^\.$"  # what posix_text changes


def _is_text(array: pa.Array) -> bool:
    return pa.types.is_string(array.type) or pa.types.is_large_string(array.type)


def _array(values: pa.ChunkedArray | list) -> pa.Array | list:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def text_cells(values: pa.ChunkedArray | list) -> pa.Array:
    """`cell` of every row: stripped text, null where the cell is empty, missing or NaN."""
    array = _array(values)
    if isinstance(array, pa.Array) and pa.types.is_integer(array.type):
        return array.cast(_TEXT)
    if isinstance(array, pa.Array) and _is_text(array):
        text = pc.utf8_trim_whitespace(array.cast(_TEXT))
        return pc.if_else(pc.or_(pc.equal(text, ""), pc.is_in(pc.utf8_lower(text), value_set=_EMPTY)), _NULL, text)
    return pa.array([cell(v) for v in (array.to_pylist() if isinstance(array, pa.Array) else array)], _TEXT)


def path_cells(values: pa.ChunkedArray | list) -> pa.Array:
    """The path cells as stripped text ("" where missing) in posix form (`posix_text`)."""
    array = _array(values)
    if isinstance(array, pa.Array) and _is_text(array):
        texts = pc.utf8_trim_whitespace(array.cast(_TEXT)).fill_null("")
    else:
        texts = pa.array(["" if v is None else str(v).strip()
                          for v in (array.to_pylist() if isinstance(array, pa.Array) else array)], _TEXT)
    odd = pc.match_substring_regex(texts, _NOT_POSIX)
    if pc.any(odd).as_py():  # rare: only those rows go through Python
        texts = pc.replace_with_mask(texts, odd, pa.array([posix_text(t) for t in pc.filter(texts, odd).to_pylist()],
                                                          _TEXT))
    return texts


def _first(mask: pa.Array) -> int | None:
    rows = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
    return int(rows[0]) if len(rows) else None


def _split_hints(values: pa.Array | list | None, n: int) -> tuple[np.ndarray, int | None]:
    """Split codes of the split column (UNDECIDED where a row gives none) and the first row whose split is not one
    of SPLITS (None: every split is valid)."""
    if values is None:
        return np.full(n, UNDECIDED, dtype=np.int8), None
    text = text_cells(values)
    codes = pc.index_in(text, value_set=pa.array(SPLITS, _TEXT))
    return (codes.fill_null(UNDECIDED).to_numpy().astype(np.int8),
            _first(pc.and_(pc.is_valid(text), pc.is_null(codes))))


def _raw(values: pa.Array | list, row: int) -> Any:
    return values[row].as_py() if isinstance(values, pa.Array) else values[row]


def _label_ids(values: pa.Array | list | None, n: int, classes: dict[str, int]) -> np.ndarray:
    """Provisional label codes of a block (`label_text` of each cell; -1 unlabelled): each new label text gets the
    next number in `classes`, which `class_order` sorts into the class order at the end."""
    if values is None:
        return np.full(n, UNLABELLED, dtype=np.int32)
    text = text_cells(values)
    encoded = pc.if_else(pc.match_substring_regex(text, r"^-\p{Nd}+$"), _NULL, text).dictionary_encode()
    lookup = np.array([classes.setdefault(t, len(classes)) for t in encoded.dictionary.to_pylist()] or [-1],
                      dtype=np.int32)
    indices = encoded.indices.fill_null(-1).to_numpy()
    return np.where(indices >= 0, lookup[indices], UNLABELLED).astype(np.int32)


class Coded(NamedTuple):
    """One block of a manifest coded: ids and path texts (the same array without an id column), provisional label
    codes (`ManifestCoder.classes`) and split codes."""

    ids: pa.Array
    texts: pa.Array
    labels: np.ndarray
    codes: np.ndarray


class ManifestCoder:
    """Codes a manifest's blocks in order (`code`), checking each: rows counted for the errors, each new label text
    numbered in `classes` (`class_order` orders them at the end)."""

    def __init__(self, path: Path) -> None:
        self.path, self.rows = path, 0
        self.classes: dict[str, int] = {}

    def code(self, batch: dict[str, pa.Array | list]) -> Coded:
        start, path = self.rows, self.path
        texts = path_cells(batch["path"])
        n = len(texts)
        codes, bad = _split_hints(batch.get("split"), n)
        empty = _first(pc.equal(texts, ""))
        if empty is not None and (bad is None or empty <= bad):  # the first bad row is the one named
            raise DataError(f"{path} row {start + empty + 1} has an empty path; every row needs one")
        if bad is not None:
            split_cell(_raw(batch["split"], bad), f"{path} row {start + bad + 1}",
                       " (give every row one, or drop the column to split automatically)")  # raises: not a split
        self.rows += n
        ids = pc.coalesce(text_cells(batch["id"]), texts) if "id" in batch else texts
        return Coded(ids, texts, _label_ids(batch.get("label"), n, self.classes), codes)


class _Rows:
    """The coded columns of a manifest, gathered a block at a time (`add`): ids and files as text, provisional
    label codes and the labels they stand for, split codes."""

    def __init__(self, path: Path) -> None:
        self.path, self.base = path, os.path.abspath(path.parent)  # absolute: the store's path column records them
        self.coder = ManifestCoder(path)
        self.ids, self.texts = TextBuilder(), None  # texts: the path texts, the ids builder itself without an id column
        self.labels: list[np.ndarray] = []
        self.hints: list[np.ndarray] = []

    def gather(self, batches: Iterator[dict]) -> _Rows:
        for batch in batches:
            block = self.coder.code(batch)
            if self.texts is None:  # a manifest has an id column in every block or in none
                self.texts = self.ids if block.ids is block.texts else TextBuilder()
            self.ids.append(block.ids)
            if self.texts is not self.ids:
                self.texts.append(block.texts)
            self.labels.append(block.labels)
            self.hints.append(block.codes)
        return self


def _joined(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)


def scan_manifest(path: str | Path, options: ListOptions = DEFAULT_OPTIONS) -> Source:
    """List the images of a manifest as columns (a `SampleTable`), read and coded a block of rows at a time.
    Missing files, duplicate ids and bad splits are errors before any compute."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist; {DATA_HINT}")
    rows = regular_or_not(path, lambda batches: _Rows(path).gather(batches))
    ids = rows.ids.finish()
    files = FileColumn(rows.base, ids if rows.texts is None or rows.texts is rows.ids else rows.texts.finish())
    n = len(ids)
    if not n:
        raise DataError(f"manifest {path} lists no images; add rows with a path column")
    class_names, remap = class_order(rows.coder.classes)
    labels = recoded(_joined(rows.labels, np.int32), remap)
    hints = _joined(rows.hints, np.int8)
    del rows
    release_freed_memory()
    stamps = file_stamps(files)
    release_freed_memory()
    missing = [k for k in np.flatnonzero(stamps[:, 0] < 0).tolist()
               if not os.path.lexists(files[k])]  # a broken link exists (and fails to decode later)
    if missing:
        raise DataError(f"{len(missing)} path(s) in {path} do not exist (e.g. row {missing[0] + 1}: "
                        f"{files[missing[0]]}); paths are absolute or relative to {path.parent}: fix them or remove "
                        "the rows")
    if not ids.distinct():
        check_unique(list(ids), str(path))
    key_of = file_content_keys(options, ids, stamps, files)
    return finish_table("manifest", path, ids, files, class_names, labels, hints, stamps, options=options,
                        hinted_by="manifest", key_of=key_of, reader=FileReader(), description=str(path),
                        label_source="label column" if class_names else "")


def open_if_mine(data: str, options: ListOptions) -> Source | None:
    return scan_manifest(data, options) if Path(data).suffix.lower() in MANIFEST_FORMATS else None
