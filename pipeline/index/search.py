"""`search`: the nearest images of a store to query image files or ids, through a saved index or exact search."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.engine.decode import Decoding
from pipeline.errors import PipelineError
from pipeline.index.build import exact_search, search
from pipeline.index.files import check_rows, load_index, store_of
from pipeline.plan import Provenance
from pipeline.sources.views import view_mask
from pipeline.store.budget import block_rows as budget_rows
from pipeline.store.budget import resolve_max_memory
from pipeline.store.read import iter_store, read_attrs, read_columns


def features_for_ids(store: str | Path, ids: list[str]) -> np.ndarray:
    """Features of some ids of a store, in the order given, streaming the store."""
    wanted = {i: n for n, i in enumerate(ids)}
    out = np.full((len(ids), 0), np.nan, dtype=np.float32)
    found = np.zeros(len(ids), dtype=bool)
    for block in iter_store(store):
        if out.shape[1] == 0:
            out = np.zeros((len(ids), block.features.shape[1]), dtype=np.float32)
        for row, id_ in enumerate(block.ids):
            if id_ in wanted:
                out[wanted[id_]] = block.features[row]
                found[wanted[id_]] = True
    if not found.all():
        missing = [i for i, f in zip(ids, found, strict=True) if not f]
        raise PipelineError(f"{len(missing)} id(s) not in {store} (e.g. {missing[:3]}); ids are as in "
                            "`store info` / the results files, e.g. train/3/digit_0003.png")
    return out


def search_store(*, index: str | Path | None = None, store: str | Path | None = None,
                 images: list[str | Path] = (), ids: list[str] = (), k: int = 10, device: str = "auto",
                 weights_path: str | Path | None = None, max_memory: int | None = None) -> list[dict[str, Any]]:
    """Top-k hits (id, score, label, split, path) for each query image file and each query id.

    With `index`, its saved (possibly approximate) index is searched; otherwise the whole store exactly, streamed
    in blocks sized by `max_memory`. Image files go through the store's own backbone (checked to reproduce its
    weights and preprocessing).
    """
    if not images and not ids:
        raise PipelineError("nothing to search for; give --image FILE... and/or --id ID...")
    if k < 1:
        raise PipelineError(f"--k must be >= 1, got {k}")
    loaded = load_index(index) if index is not None else None
    if loaded is None and store is None:
        raise PipelineError("give --index or --store (the store to search)")
    if loaded is not None:
        store = store_of(loaded, store)
        check_rows(loaded, store)
    made = Provenance.from_store(store)
    columns = read_columns(store, "ids", "labels", "splits")

    queries, names = [], []
    if images:
        from pipeline.engine.embed import backbone_for, embed_files

        backbone = backbone_for(made, device=device, weights_path=weights_path)
        queries.append(embed_files(images, backbone, decoding=Decoding.from_attrs(made.decoding)))
        names += [str(p) for p in images]
    if ids:
        queries.append(features_for_ids(store, list(ids)))
        names += list(ids)
    if loaded is not None:
        row_ids = loaded.ids
        sims, idx = search(loaded.index, np.concatenate(queries), min(k, loaded.index.ntotal))
    else:  # exact, the store streamed a block at a time (any size, bounded memory)
        rows = np.flatnonzero(~view_mask(columns["ids"], read_attrs(store)))
        row_ids = columns["ids"]
        sims, idx = exact_search(Path(store), rows, np.concatenate(queries), min(k, len(rows)),
                                 budget_rows(resolve_max_memory(max_memory), made.feature_dim))

    from pipeline.engine.embed import paths_for_ids

    position = {i: n for n, i in enumerate(columns["ids"])}
    class_names = made.class_names
    hit_ids = {row_ids[j] for j in idx.reshape(-1) if j >= 0}
    paths = paths_for_ids(made, hit_ids, store)
    results = []
    for name, row_sims, row_idx in zip(names, sims, idx, strict=True):
        hits = []
        for score, j in zip(row_sims, row_idx, strict=True):
            if j < 0:  # an approximate index may find fewer than k
                continue
            id_ = row_ids[j]
            n = position.get(id_)
            label = int(columns["labels"][n]) if n is not None else -1
            hits.append({"id": id_, "score": float(score), "label": class_names[label] if label >= 0 else None,
                         "split": columns["splits"][n] if n is not None else None, "path": paths.get(id_)})
        results.append({"query": name, "hits": hits})
    return results
