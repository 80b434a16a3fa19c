"""The images behind a store's ids: its source re-opened from the store's record (no split decided, nothing heavy
imported), for exports, search results and the reports' image grids. A streamed source is never re-run."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.plan import Provenance
from pipeline.sources import open_source
from pipeline.sources.base import ListOptions, Sample, Source, printable
from pipeline.sources.stream import is_stream

log = logging.getLogger(__name__)


def source_for(made: Provenance) -> Source:
    """Re-open the image source a store was extracted from (its recorded absolute `data` and listing options) to
    find its images; no split is decided (that would read every file again)."""
    data = made.data or made.data_root
    if not data:
        raise PipelineError("the store does not record its image source")
    if is_stream(data):  # never run a command or a download from a record
        raise PipelineError(f"the store's images were streamed ({data}); they are not re-read from its record")
    options = made.data_options if isinstance(made.data_options, dict) else {}
    return open_source(data, ListOptions(split="none", root=options.get("root"),
                                         follow_links=bool(options.get("follow_links", False)),
                                         max_file_bytes=options.get("max_file_bytes") or None))


def sample_path(kind: str, sample: Sample) -> str:
    """Where a sample's image lives, as absolute text: the file; for tar shards `shard.tar:key` (which a tar
    listing's path already is: `pipeline.sources.tar`)."""
    return printable(str(sample.path) if kind == "tar" else os.path.abspath(sample.path))


def stored_paths(store: str | Path | None, ids: Iterable[str]) -> dict[str, str] | None:
    """id -> path of these ids from the store's path column; None when the store has none (written before it, or
    from features without images). The ids are matched a block at a time (memory bounded whatever the store's
    size), and a block's paths are read only when it holds a wanted id."""
    if store is None:
        return None
    import h5py
    import numpy as np

    from pipeline.store.columns import SCAN_ROWS
    from pipeline.store.schema import PATHS

    wanted = np.array(sorted(set(ids)), dtype=str)
    found: dict[str, str] = {}
    with h5py.File(store, "r") as f:
        if PATHS not in f:
            return None
        n = int(f.attrs.get("committed_rows", 0))
        for start in range(0, n if len(wanted) else 0, SCAN_ROWS):
            block = np.array(f["ids"].asstr()[start:min(n, start + SCAN_ROWS)], dtype=str)
            hits = np.flatnonzero(np.isin(block, wanted))
            if len(hits):
                paths = f[PATHS].asstr()[start:start + len(block)]
                found.update(zip(block[hits].tolist(), paths[hits].tolist(), strict=True))
    return found


def paths_for_ids(made: Provenance, ids: Iterable[str], store: str | Path | None = None) -> dict[str, str]:
    """Where each id's image lives (the file; for tar shards `shard.tar:key`): from the `store`'s path column when it
    has one, else as far as the source, listed again, still lists it."""
    ids = list(ids)
    found = stored_paths(store, ids)
    if found is not None:
        return found
    try:
        source = source_for(made)
    except PipelineError as exc:
        log.warning("image paths unavailable: %s", exc)
        return {}
    wanted = set(ids)
    return {s.id: sample_path(source.kind, s) for s in source.samples if s.id in wanted}
