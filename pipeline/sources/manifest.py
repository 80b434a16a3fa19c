"""Manifests: a CSV, Parquet or JSON Lines table with a `path` column (absolute or relative to the manifest's folder)
and optional `label`, `split` and `id` columns (default id: the path as written)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from pipeline.engine.decode import FileReader, file_stamp, read_file
from pipeline.errors import DataError
from pipeline.sources.base import (
    DATA_HINT,
    DEFAULT_OPTIONS,
    ListOptions,
    Source,
    cell,
    check_unique,
    class_index,
    content_keys,
    finish,
    label_text,
    split_cell,
)

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


def manifest_columns(path: Path) -> dict[str, list]:
    """The `path`, `label`, `split` and `id` columns of a CSV, Parquet or JSON-lines manifest (those it has; names
    stripped) as lists of cells, one per row: no Python object per row beyond its cells. It must have `path`."""
    fmt = MANIFEST_FORMATS[path.suffix.lower()]
    try:
        if fmt == "csv":
            lists, columns = _csv_columns(path)
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            columns = list(pq.read_schema(path).names)
            lists = pq.read_table(path, columns=[c for c in COLUMNS if c in columns]).to_pydict()
        else:
            rows, columns = _jsonl_rows(path)
            lists = {c: [row.get(c) for row in rows] for c in COLUMNS if c in columns}
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as exc:
        raise DataError(f"cannot read manifest {path} ({type(exc).__name__}: {exc})") from exc
    if "path" not in columns:
        raise DataError(f"manifest {path} has no 'path' column (columns: {', '.join(map(str, columns)) or 'none'}); "
                        "expected path and optionally label, split, id")
    return lists


def _file_text(base: str, text: str) -> str:
    """`str(Path(base) / text)` (an absolute text stays as it is) without building a Path per row."""
    text = posix_text(text)
    return base if text == "." else os.path.join(base, text)


def scan_manifest(path: str | Path, options: ListOptions = DEFAULT_OPTIONS) -> Source:
    """List the images of a manifest. Missing files, duplicate ids and bad splits are errors before any compute.
    Files are kept as text (the sample's path), not a Path per row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist; {DATA_HINT}")
    columns = manifest_columns(path)
    texts = columns["path"]
    if not texts:
        raise DataError(f"manifest {path} lists no images; add rows with a path column")
    n, base = len(texts), str(path.parent)
    given_ids, given_labels, given_splits = (columns.get(c) or [None] * n for c in ("id", "label", "split"))
    ids, files, names, splits, stamps = [], [], [], [], []
    for number in range(n):
        raw = texts[number]
        text = "" if raw is None else str(raw).strip()
        if not text:
            raise DataError(f"{path} row {number + 1} has an empty path; every row needs one")
        file = _file_text(base, text)
        files.append(file)
        ids.append(cell(given_ids[number]) or posix_text(text))
        names.append(label_text(given_labels[number]))
        splits.append(split_cell(given_splits[number], f"{path} row {number + 1}",
                                 " (give every row one, or drop the column to split automatically)"))
        stamps.append(file_stamp(file))  # one stat per file; (-1, -1) when it cannot be stat'ed
    del columns, texts, given_ids, given_labels, given_splits  # the cells kept are in the lists now; free the rest
    missing = [(n, f) for n, (f, st) in enumerate(zip(files, stamps, strict=True), 1)
               if st[0] < 0 and not os.path.lexists(f)]  # a broken link exists (and fails to decode later)
    if missing:
        n, f = missing[0]
        raise DataError(f"{len(missing)} path(s) in {path} do not exist (e.g. row {n}: {f}); paths are absolute or "
                        f"relative to {base}: fix them or remove the rows")
    check_unique(ids, str(path))
    class_names, labels = class_index(names)

    key_of = content_keys(options, ids, stamps, lambda i: read_file(files[i], options.max_file_bytes))
    return finish("manifest", path, ids, files, class_names, labels, splits, options=options, hinted_by="manifest",
                  key_of=key_of, reader=FileReader(), description=str(path), stamps=stamps,
                  label_source="label column" if class_names else "")


def open_if_mine(data: str, options: ListOptions) -> Source | None:
    return scan_manifest(data, options) if Path(data).suffix.lower() in MANIFEST_FORMATS else None
