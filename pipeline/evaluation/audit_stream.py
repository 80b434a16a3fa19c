"""The audit of a store beyond `--max-memory`: what `pipeline.evaluation.audit` finds, on the store's compact
columns (`StreamedSet`), the features read a block at a time.

- The neighbour table: every row searched against every row, a block of rows at a time against the store streamed
  in chunks (the streamed exact kNN's search: FAISS on CPU, torch on CUDA, ties to the lower row), each row's own
  row left out by index; memory holds two blocks and k neighbours per row, whatever the store's size. Quadratic in
  time like exact kNN.
- The test figures: the streamed torch probe and the streamed exact kNN, their per-image correctness mapped back
  to the rows by content hash as the loaded audit does.
- The clean split assignment and manifest are written a block of rows at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.evaluation.audit import SCALE_DEPTH, _nearest_other_class, tie_order
from pipeline.evaluation.intervals import keys_digest, unpack_correct
from pipeline.store.budget import block_rows
from pipeline.store.columns import StreamedSet, read_column

WRITE_ROWS = 1 << 18  # rows of the clean assignment / manifest formatted at a time


def streamed_neighbour_table(ss: StreamedSet, k: int, *, max_memory: int, device: str = "cpu",
                             depth: int = SCALE_DEPTH) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`audit.neighbour_table` of a streamed store: (sims, idx, nearest other-class cosine), the same values."""
    from pipeline.evaluation.knn_stream import exact_searcher

    n = len(ss)
    k = min(k, n - 1)
    if k < 1:
        raise PipelineError(f"the store has {n} row(s); an audit needs at least 2")
    depth = min(max(k, depth), n - 1)
    rows = block_rows(max_memory, ss.dim, parts=6)
    search = exact_searcher(ss, np.ones(n, dtype=bool), depth, chunk_rows=rows, leave_one_out=True, device=device)
    sims = np.empty((n, k), dtype=np.float32)
    idx = np.empty((n, k), dtype=np.int32 if n < 2**31 else np.int64)
    other = np.full(n, np.nan)
    for positions, feats in ss.blocks(block_rows=rows):
        s, i = tie_order(*search(feats, positions))
        if (i < 0).any():
            raise PipelineError("the search found fewer neighbours than asked (non-finite features?); run python -m "
                                "pipeline store verify on the store")
        sims[positions], idx[positions] = s[:, :k], i[:, :k]
        same = ss.keys[i] == ss.keys[positions][:, None]
        other[positions] = _nearest_other_class(ss.labels[positions], np.where(same, -1, ss.labels[i]), s)
    return sims, idx, other


def streamed_correct(ss: StreamedSet, positions: np.ndarray, packed: dict[str, Any]) -> np.ndarray:
    """`probes.correct_by_row` for a streamed store: a packed correctness record back as one bool per position."""
    keys, ids = ss.row_keys_of(positions)
    order = np.lexsort((ids, keys))
    bits = unpack_correct(packed)
    if len(bits) != len(positions) or packed.get("digest") != keys_digest(keys):
        raise PipelineError(f"the results scored other images than these {len(positions)} rows of {ss.path}; "
                            "compute them again on this store")
    out = np.empty(len(positions), dtype=bool)
    out[order] = bits
    return out


def streamed_probe(ss: StreamedSet, head: str, *, max_memory: int, device: str) -> dict[str, Any]:
    """The probe the audit scores with, on a streamed store: the streamed torch head (the one head that streams)."""
    from pipeline.evaluation.heads import head_spec
    from pipeline.evaluation.stream_probe import fit_streamed_probe

    if head != "torch-logreg":
        raise PipelineError(f"the store is beyond --max-memory, where only --head torch-logreg streams; audit with "
                            f"--head torch-logreg for the probe figure (or raise --max-memory for --head {head})")
    return fit_streamed_probe(ss, grid=tuple(head_spec(head).grid), device=device, max_memory=max_memory,
                              resamples=0)[1]


def streamed_knn(ss: StreamedSet, k: int, temperature: float, *, max_memory: int, device: str) -> dict[str, Any]:
    from pipeline.evaluation.knn_stream import knn_streamed

    return knn_streamed(ss, ks=(k,), temperature=temperature, resamples=0, max_memory=max_memory, device=device)


def check_manifest_source(ss: StreamedSet) -> None:
    """--write-manifest beyond `--max-memory` reads the paths from the store's path column: refused without one."""
    import h5py

    from pipeline.store.schema import PATHS

    with h5py.File(ss.path, "r") as f:
        if PATHS not in f:
            raise PipelineError(f"{ss.path} has no path column (written before it), which --write-manifest beyond "
                                "--max-memory reads: extract the store again, raise --max-memory, or use "
                                "--write-splits")


def manifest_chunks(ss: StreamedSet, keep: np.ndarray) -> Iterator[list[tuple[str, ...]]]:
    """The manifest rows (path, label, split, id) of the kept rows, a block at a time, the paths from the store's
    path column."""
    from pipeline.evaluation.audit import ids_of, splits_of
    from pipeline.store.schema import PATHS

    check_manifest_source(ss)
    for start in range(0, len(ss), WRITE_ROWS):
        rows = np.arange(start, min(len(ss), start + WRITE_ROWS))
        rows = rows[keep[rows]]
        if not len(rows):
            continue
        paths = read_column(ss, PATHS, rows)
        yield [(p.decode("utf-8", "surrogateescape") if isinstance(p, bytes) else str(p),
                ss.class_names[label] if label >= 0 else "", str(split), str(i))
               for p, label, split, i in zip(paths, ss.labels[rows], splits_of(ss, rows), ids_of(ss, rows),
                                             strict=True)]
