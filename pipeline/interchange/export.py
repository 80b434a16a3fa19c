"""`export`: a store (all rows or some splits) to the layouts other tools read, streamed block by block so that a
store larger than memory exports.

- `clip-retrieval`: `img_emb/img_emb_{N}.npy` + row-aligned `metadata/metadata_{N}.parquet` (N zero-padded, so that
  the sorted file order autofaiss and clip-retrieval read in is the row order), in parts of `part_rows` rows.
- `parquet`: one dataset of `part-{N}.parquet` files with an `embedding` column (a fixed-size list), readable by
  pyarrow, pandas, Hugging Face `datasets` and LanceDB.
- `ann-benchmarks`: one HDF5 file with `train`, `test`, `neighbors`, `distances` and `distance = "angular"`, the
  ground truth computed exactly, blockwise.

Every layout gets `.featpipe.json` beside it: the store's provenance (backbone, weights, preprocessing, cache key,
class names), which `import` reads back.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.config import DEFAULT_PART_ROWS, EXPORT_FORMATS
from pipeline.errors import PipelineError
from pipeline.plan import Provenance
from pipeline.store.read import Block, check_complete, iter_store, open_checked, read_attrs, read_columns
from pipeline.store.schema import SPLITS

log = logging.getLogger(__name__)
FORMATS = EXPORT_FORMATS
BLOCK_ROWS = 32_768  # rows read from the store at a time (fewer when --max-memory asks)
PART_COPIES = 4  # a part's vectors are held about this many times at once (blocks, concatenated, cast, Arrow)
METADATA = ".featpipe.json"  # hidden: pyarrow.dataset, Hugging Face datasets and LanceDB skip it


@dataclass
class ExportResult:
    out: Path
    format: str
    rows: int
    files: list[str]

    def summary(self) -> str:
        return f"exported {self.rows:,} rows as {self.format} to {self.out} ({len(self.files)} file(s))"


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out {out} is a file; give a folder to export into")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise PipelineError(f"--out {out} is not empty; choose an empty folder, or pass --overwrite to replace "
                                "a previous export there")
        if not (out / METADATA).is_file():
            raise PipelineError(f"--out {out} holds files that are not a featpipe export; choose an empty folder")


def _finish(work: Path, out: Path) -> None:
    """Move a finished export into place: the previous one (if any) is removed only now."""
    if out.is_dir():
        shutil.rmtree(out)
    work.rename(out)


def _splits(splits: tuple[str, ...] | None) -> tuple[str, ...] | None:
    bad = [s for s in splits or () if s not in SPLITS]
    if bad:
        raise PipelineError(f"--splits {bad[0]!r} is not one of {', '.join(SPLITS)}")
    return tuple(splits) if splits else None


class _Rows:
    """The store's row-aligned columns beside the features, for the metadata of each exported block (content hashes
    read block by block; image paths from the re-opened source, when it can still be listed)."""

    def __init__(self, store: Path) -> None:
        made = Provenance.from_store(store)
        self.store, self.class_names = store, made.class_names
        self.paths = _paths(made, store)

    def table(self, block: Block, rows: np.ndarray) -> dict[str, Any]:
        labels = block.labels.astype(np.int64)
        with h5py.File(self.store, "r") as f:
            hashes = f["files/hash"][int(rows[0]):int(rows[-1]) + 1][rows - rows[0]]
        return {"id": [str(i) for i in block.ids], "path": [self.paths.get(str(i), "") for i in block.ids],
                "label": labels, "class_name": [self.class_names[y] if y >= 0 else None for y in labels],
                "split": [str(s) for s in block.splits], "hash": [h.decode() for h in hashes]}


def _paths(made: Provenance, store: Path) -> dict[str, str]:
    """id -> image path: the store's path column, or else its recorded source listed again (when it can be)."""
    from pipeline.sources.lookup import paths_for_ids, stored_paths

    ids = read_columns(store, "ids")["ids"].tolist()
    found = stored_paths(store, ids)
    if found is not None:
        return found
    return paths_for_ids(made, ids) if made.data or made.data_root else {}


def _blocks(store: Path, splits: tuple[str, ...] | None,
            block_rows: int = BLOCK_ROWS) -> Iterator[tuple[Block, np.ndarray]]:
    """Blocks of the store (only `splits`), each with the store row numbers of its rows."""
    for block in iter_store(store, rows=block_rows):
        keep = np.ones(len(block.ids), dtype=bool) if splits is None else np.isin(block.splits, list(splits))
        rows = block.rows[keep]
        if len(rows):
            yield Block(block.start, block.features[keep], block.ids[keep], block.labels[keep],
                        block.splits[keep], rows), rows


def _parts(store: Path, splits: tuple[str, ...] | None, part_rows: int,
           block_rows: int = BLOCK_ROWS) -> Iterator[list[tuple[Block, np.ndarray]]]:
    """The exported rows grouped into parts of at most `part_rows` rows (a part is a list of sub-blocks)."""
    part: list[tuple[Block, np.ndarray]] = []
    size = 0
    for block, rows in _blocks(store, splits, min(block_rows, part_rows)):
        start = 0
        while start < len(rows):
            take = min(part_rows - size, len(rows) - start)
            cut = slice(start, start + take)
            part.append((Block(block.start, block.features[cut], block.ids[cut], block.labels[cut],
                               block.splits[cut], rows[cut]), rows[cut]))
            size += take
            start += take
            if size == part_rows:
                yield part
                part, size = [], 0
    if part:
        yield part


def _arrow_table(meta: _Rows, part: list[tuple[Block, np.ndarray]], *, embedding: str | None, dtype: str):
    import pyarrow as pa

    columns: dict[str, list] = {}
    for block, rows in part:
        for name, values in meta.table(block, rows).items():
            columns.setdefault(name, []).extend(list(values))
    table = pa.table({"id": pa.array(columns["id"], pa.string()), "path": pa.array(columns["path"], pa.string()),
                      "label": pa.array(columns["label"], pa.int64()),
                      "class_name": pa.array(columns["class_name"], pa.string()),
                      "split": pa.array(columns["split"], pa.string()), "hash": pa.array(columns["hash"], pa.string())})
    if embedding is not None:
        vectors = np.concatenate([block.features for block, _ in part]).astype(dtype)
        flat = pa.array(vectors.reshape(-1), pa.float16() if dtype == "float16" else pa.float32())
        table = table.append_column(embedding, pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))
    return table


def _export_clip_retrieval(store: Path, out: Path, splits, part_rows: int, dtype: str,
                           block_rows: int = BLOCK_ROWS) -> tuple[int, list[str]]:
    import pyarrow.parquet as pq

    (out / "img_emb").mkdir()
    (out / "metadata").mkdir()
    meta, rows, files = _Rows(store), 0, []
    for n, part in enumerate(_parts(store, splits, part_rows, block_rows)):
        vectors = np.concatenate([block.features for block, _ in part]).astype(dtype)
        np.save(out / "img_emb" / f"img_emb_{n:05d}.npy", vectors)
        pq.write_table(_arrow_table(meta, part, embedding=None, dtype=dtype),
                       out / "metadata" / f"metadata_{n:05d}.parquet")
        files += [f"img_emb/img_emb_{n:05d}.npy", f"metadata/metadata_{n:05d}.parquet"]
        rows += len(vectors)
    return rows, files


def _export_parquet(store: Path, out: Path, splits, part_rows: int, dtype: str,
                    block_rows: int = BLOCK_ROWS) -> tuple[int, list[str]]:
    import pyarrow.parquet as pq

    meta, rows, files = _Rows(store), 0, []
    for n, part in enumerate(_parts(store, splits, part_rows, block_rows)):
        table = _arrow_table(meta, part, embedding="embedding", dtype=dtype)
        pq.write_table(table, out / f"part-{n:05d}.parquet")
        files.append(f"part-{n:05d}.parquet")
        rows += table.num_rows
    return rows, files


def _chunk_top(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Column numbers and values of each row's `k` largest values, ties broken to the lower column (argpartition,
    with an exact sort only for the rows where a tie straddles the k-th place)."""
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(sims, part, 1)
    kth = vals.min(axis=1, keepdims=True)
    tied = np.flatnonzero((sims == kth).sum(axis=1) > (vals == kth).sum(axis=1))
    if len(tied):
        columns = np.broadcast_to(np.arange(sims.shape[1]), (len(tied), sims.shape[1]))
        part[tied] = np.lexsort((columns, -sims[tied]), axis=1)[:, :k]
        vals[tied] = np.take_along_axis(sims[tied], part[tied], 1)
    return part, vals


def exact_neighbors(train: h5py.Dataset | np.ndarray, queries: np.ndarray, k: int, *, block: int = 16_384,
                    query_block: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """The `k` largest inner products of each query over `train`, read `block` rows at a time: (indices [Q, k],
    similarities [Q, k]), best first, ties to the lower index. Memory: one query block x one train block."""
    n = train.shape[0]
    k = min(k, n)
    best_sim = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_idx = np.zeros((len(queries), k), dtype=np.int64)
    for start in range(0, n, block):
        chunk = np.asarray(train[start:start + block], dtype=np.float32)
        for q in range(0, len(queries), query_block):
            rows = slice(q, q + query_block)
            part, vals = _chunk_top(queries[rows] @ chunk.T, min(k, len(chunk)))
            sims = np.concatenate([best_sim[rows], vals], axis=1)
            idx = np.concatenate([best_idx[rows], part + start], axis=1)
            order = np.lexsort((idx, -sims), axis=1)[:, :k]
            best_sim[rows], best_idx[rows] = np.take_along_axis(sims, order, 1), np.take_along_axis(idx, order, 1)
    return best_idx, best_sim


def _export_ann(store: Path, out: Path, splits, k: int, dtype: str,
                block_rows: int = BLOCK_ROWS) -> tuple[int, list[str]]:
    train_splits = splits or ("train", "val")
    if "test" in train_splits:
        raise PipelineError("ann-benchmarks: the test split is the queries; --splits names the searched rows "
                            "(default train,val)")
    dim = int(read_attrs(store)["feature_dim"])
    path = out / "dataset.hdf5"
    with h5py.File(path, "w") as f:
        train = f.create_dataset("train", shape=(0, dim), maxshape=(None, dim), dtype=dtype, chunks=(1024, dim))
        for block, _ in _blocks(store, train_splits, block_rows):
            train.resize(train.shape[0] + len(block.ids), axis=0)
            train[-len(block.ids):] = block.features
        test = f.create_dataset("test", shape=(0, dim), maxshape=(None, dim), dtype=dtype, chunks=(1024, dim))
        neighbors = f.create_dataset("neighbors", shape=(0, min(k, train.shape[0])), maxshape=(None, None),
                                     dtype=np.int32)
        distances = f.create_dataset("distances", shape=(0, min(k, train.shape[0])), maxshape=(None, None),
                                     dtype=np.float32)
        for block, _ in _blocks(store, ("test",), block_rows):
            queries = block.features.astype(dtype).astype(np.float32)
            idx, sims = exact_neighbors(train, queries, k, block=block_rows)
            for ds, values in ((test, block.features), (neighbors, idx), (distances, 1.0 - sims)):
                ds.resize(ds.shape[0] + len(values), axis=0)
                ds[-len(values):] = values
        f.attrs.update({"type": "dense", "distance": "angular", "dimension": dim, "point_type": "float"})
        rows = train.shape[0] + test.shape[0]
    return rows, [path.name]


def export_store(store: str | Path, out: str | Path, *, format: str, splits: tuple[str, ...] | None = None,
                 part_rows: int = DEFAULT_PART_ROWS, dtype: str | None = None, k: int = 100,
                 overwrite: bool = False, max_memory: int | None = None) -> ExportResult:
    """Write the store (or the rows of `splits`) to `out` in `format` (see the module docstring); `dtype` float16 or
    float32 (default: the store's), `k` neighbours per query for ann-benchmarks. `max_memory` (default: half the
    available memory) bounds the feature data held at once: the blocks read, and the rows of a part."""
    store, out = Path(store), Path(out)
    if format not in FORMATS:
        raise PipelineError(f"--format {format!r} is not one of {', '.join(FORMATS)}")
    attrs = read_attrs(store)
    dtype = dtype or str(attrs.get("feature_dtype", "float32"))
    if dtype not in ("float16", "float32"):
        raise PipelineError(f"--dtype {dtype!r} is not float16 or float32")
    if part_rows < 1 or k < 1:
        raise PipelineError("--part-rows and --k must be positive")
    block_rows, part_rows = _sizes(store, max_memory, part_rows)
    splits = _splits(splits)
    counts = _split_counts(store)
    wanted = splits or (("train", "val") if format == "ann-benchmarks" else SPLITS)
    if not sum(counts.get(s, 0) for s in wanted):
        raise PipelineError(f"{store} has no rows in {','.join(wanted)}; choose --splits among "
                            f"{','.join(s for s in SPLITS if counts.get(s))}")
    if format == "ann-benchmarks" and not counts.get("test"):
        raise PipelineError(f"{store} has no test split, which ann-benchmarks uses as the queries; extract it with "
                            "a test split")
    _check_out(out, overwrite)
    work = out.with_name(out.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    if format == "clip-retrieval":
        rows, files = _export_clip_retrieval(store, work, splits, part_rows, dtype, block_rows)
    elif format == "parquet":
        rows, files = _export_parquet(store, work, splits, part_rows, dtype, block_rows)
    else:
        rows, files = _export_ann(store, work, splits, k, dtype, block_rows)
    made = Provenance.from_attrs(attrs)
    record = {"format": format, "rows": rows, "dtype": dtype, "splits": list(splits or SPLITS), "files": files,
              "store": str(store.resolve()), "store_id": attrs.get("store_id", ""), **made.feature_space(),
              "cache_key": made.cache_key, "class_names": made.class_names, "random_init": made.random_init,
              "precision": made.precision}
    (work / METADATA).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    _finish(work, out)
    return ExportResult(out, format, rows, files)


def _sizes(store: Path, max_memory: int | None, part_rows: int) -> tuple[int, int]:
    """(rows read at a time, rows per part) within `max_memory`: a part asked for beyond it is made smaller."""
    from pipeline.store.budget import block_rows, size_text, store_budget

    held = store_budget(store, max_memory)
    dim = max(1, held.dim)
    most = max(1, held.budget // (PART_COPIES * 4 * dim))
    if part_rows > most:
        log.warning("--part-rows %d: a part of %d-d vectors would hold about %s, more than --max-memory %s; writing "
                    "parts of %d rows", part_rows, dim, size_text(part_rows * PART_COPIES * 4 * dim),
                    size_text(held.budget), most)
        part_rows = most
    return min(BLOCK_ROWS, block_rows(held.budget, dim)), part_rows


def _split_counts(store: Path) -> dict[str, int]:
    """Rows per split of a complete store (refusing an incomplete or damaged one first), read a block at a time."""
    counts: dict[str, int] = {}
    with open_checked(store) as f:
        n = int(check_complete(store, f)["committed_rows"])
        for start in range(0, n, BLOCK_ROWS):
            values, found = np.unique(f["splits"].asstr()[start:start + BLOCK_ROWS], return_counts=True)
            for value, count in zip(values.tolist(), found.tolist(), strict=True):
                counts[value] = counts.get(value, 0) + count
    return counts
