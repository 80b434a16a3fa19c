"""The images behind a store's ids: its source re-opened from the store's record (no split decided, nothing heavy
imported), for exports, search results and the reports' image grids. A streamed source is never re-run."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from pipeline.errors import PipelineError
from pipeline.plan import Provenance
from pipeline.sources import open_source
from pipeline.sources.base import ListOptions, Source, printable
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


def paths_for_ids(made: Provenance, ids: Iterable[str]) -> dict[str, str]:
    """Where each id's image lives (the file; for tar shards `shard.tar:key`), as far as the source still lists it."""
    try:
        source = source_for(made)
    except PipelineError as exc:
        log.warning("image paths unavailable: %s", exc)
        return {}
    wanted = set(ids)
    return {s.id: printable(str(s.path) if source.kind != "tar" else f"{s.path}:{s.id}")
            for s in source.samples if s.id in wanted}
