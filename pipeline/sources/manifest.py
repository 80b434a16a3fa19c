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


def manifest_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a CSV, Parquet or JSON-lines manifest as dicts (column names stripped); it must have `path`."""
    fmt = MANIFEST_FORMATS[path.suffix.lower()]
    try:
        if fmt == "csv":
            with open(path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
                columns = [c.strip() for c in reader.fieldnames or []]
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            columns, rows = list(table.column_names), table.to_pylist()
        else:
            rows, columns = _jsonl_rows(path)
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as exc:
        raise DataError(f"cannot read manifest {path} ({type(exc).__name__}: {exc})") from exc
    if "path" not in columns:
        raise DataError(f"manifest {path} has no 'path' column (columns: {', '.join(map(str, columns)) or 'none'}); "
                        "expected path and optionally label, split, id")
    return rows


def scan_manifest(path: str | Path, options: ListOptions = DEFAULT_OPTIONS) -> Source:
    """List the images of a manifest. Missing files, duplicate ids and bad splits are errors before any compute."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist; {DATA_HINT}")
    rows = manifest_rows(path)
    if not rows:
        raise DataError(f"manifest {path} lists no images; add rows with a path column")
    base = path.parent
    ids, files, names, splits, stamps = [], [], [], [], []
    for number, row in enumerate(rows, 1):
        raw = row.get("path")
        text = "" if raw is None else str(raw).strip()
        if not text:
            raise DataError(f"{path} row {number} has an empty path; every row needs one")
        file = Path(os.path.join(base, text))  # an absolute path stays as it is
        files.append(file)
        ids.append(cell(row.get("id")) or posix_text(text))
        names.append(label_text(row.get("label")))
        splits.append(split_cell(row.get("split"), f"{path} row {number}",
                                 " (give every row one, or drop the column to split automatically)"))
        stamps.append(file_stamp(file))  # one stat per file; (-1, -1) when it cannot be stat'ed
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
