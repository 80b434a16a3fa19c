"""The up-to-date check of a store made from a manifest or from tar shards, without listing the source.

A manifest: its data fingerprint streamed in a few passes over the file, a block of rows at a time, so that a
scheduled run over millions of unchanged images holds a few blocks, not the listing's columns (about 70 bytes a
row), before it finds there is nothing to do. Tar shards: the shards' own stats (`shards_stamp`; one stat a shard,
not a header read a member), which the store recorded bound to the fingerprint they gave, the listing options and
the decoding policy (`source_stamp`): unchanged, the listing would give the recorded fingerprint again.

The fingerprint is `data_fingerprint` of the listing `scan_manifest` would give, byte for byte: the class names
(pass 1: every label text), the rows with their stamps (pass 2: the stats, in processes for millions of rows),
then the files' offsets and bytes (passes 3 and 4). Whenever the streamed check cannot say "current" (a stratified
split, a manifest that changed while it was read, processes that cannot start, a different fingerprint), the
runner lists the source as before, and that listing reports what is wrong with it."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.backbones.model import Backbone
from pipeline.engine.decode import Decoding, load_plugins
from pipeline.engine.resolve import (
    absolute_data,
    build_backbone,
    data_options,
    decoding_policy,
    fingerprint_digest,
    list_options,
    listing_lines,
    plan_key,
    source_stamp,
)
from pipeline.errors import PipelineError
from pipeline.plan import ExtractConfig, Provenance
from pipeline.sources.base import ListOptions, class_order, recoded, split_mode
from pipeline.sources.manifest import (
    MANIFEST_FORMATS,
    Coded,
    ManifestCoder,
    _NotRegular,
    manifest_batches,
    path_cells,
    regular_or_not,
)
from pipeline.sources.stamps import PARALLEL_STAT_ROWS, stamp_blocks, stat_workers
from pipeline.sources.stream import is_stream
from pipeline.sources.table import UNDECIDED, SplitColumn, TextColumn, digest_files, file_cells
from pipeline.sources.tar import shards_stamp, tar_shards
from pipeline.store.read import is_current, read_attrs
from pipeline.store.reuse import Listing
from pipeline.store.schema import layout_attrs

log = logging.getLogger(__name__)


class _Changed(Exception):
    """The manifest read differently in a later pass (it changed while it was read)."""


def manifest_fingerprint(path: str | Path, options: ListOptions, decoding: Decoding, *, workers: int = 1,
                         expect: Provenance | None = None) -> tuple[str, int] | None:
    """(`data_fingerprint` of the manifest's listing, its rows), streamed; None where it cannot be streamed (a
    stratified split, an empty manifest, a manifest that changed while it was read), or, with `expect` (what made
    the store), as soon as the first pass shows other rows or classes: a grown source costs one pass, not the
    stats. The stats run in `workers` processes (in this one when they cannot start). A bad manifest raises the
    listing's own error."""
    path = Path(path)
    if options.split == "stratified" or path.suffix.lower() not in MANIFEST_FORMATS or not path.is_file():
        return None
    coder, given, arrow = regular_or_not(path, lambda batches: _first_pass(path, batches))
    if not coder.rows or split_mode("manifest", coder.rows, given, options=options, hinted_by="manifest",
                                    description=str(path)) == "stratified":
        return None
    if expect is not None and (coder.rows, list(class_order(coder.classes)[0])) != (expect.num_images,
                                                                                   list(expect.class_names)):
        log.info("%s has %d rows and %d classes, the store %d and %d: listing it", path, coder.rows,
                 len(coder.classes), expect.num_images, len(expect.class_names))
        return None
    try:
        try:
            return _streamed(path, coder, options, decoding, arrow, workers), coder.rows
        except (OSError, RuntimeError, AssertionError, BrokenProcessPool) as exc:
            if workers <= 1:
                raise
            log.info("stat'ing the manifest's files in this process (%s: %s)", type(exc).__name__, exc)
            return _streamed(path, coder, options, decoding, arrow, 1), coder.rows
    except (_Changed, _NotRegular):
        log.info("%s changed while it was read; listing it", path)
        return None


def _first_pass(path: Path, batches: Iterator[dict]) -> tuple[ManifestCoder, int, bool]:
    """Every block coded and checked, for the class names and the number of given splits; and whether arrow read
    it (its blocks are arrow arrays, the csv module's lists), so that the later passes read it the same way."""
    coder, given, arrow = ManifestCoder(path), 0, True
    for batch in batches:
        arrow = isinstance(batch["path"], pa.Array)
        given += int(np.count_nonzero(coder.code(batch).codes != UNDECIDED))
    return coder, given, arrow


def _streamed(path: Path, first: ManifestCoder, options: ListOptions, decoding: Decoding, arrow: bool,
              workers: int) -> str:
    class_names, remap = class_order(first.classes)
    base = os.path.abspath(path.parent)
    coder = ManifestCoder(path)
    coder.classes = dict(first.classes)  # the same provisional numbers: the blocks come in the same order
    decided = options.split != "none"

    def coded() -> Iterator[Coded]:
        for batch in manifest_batches(path, arrow=arrow):
            block = coder.code(batch)
            if len(coder.classes) != len(remap) or coder.rows > first.rows:
                raise _Changed
            yield block

    digest = fingerprint_digest(class_names, decoding)
    for block, stamps in stamp_blocks(coded(), lambda b: TextColumn.from_arrow(file_cells(base, b.texts)), workers):
        codes = block.codes if decided else np.full(len(block.codes), UNDECIDED, dtype=np.int8)
        rows = Listing(ids=TextColumn.from_arrow(block.ids), labels=recoded(block.labels, remap),
                       splits=SplitColumn(codes), stamps=stamps)
        digest.update(listing_lines(rows, 0, len(rows)))
    if coder.rows != first.rows:
        raise _Changed
    digest.update(b"paths\0")
    digest_files(digest, base, lambda: (path_cells(batch["path"]) for batch in manifest_batches(path, arrow=arrow)))
    return digest.hexdigest()[:32]


def shards_fingerprint(config: ExtractConfig, made: Provenance, decoding: Decoding,
                       recorded: str) -> tuple[str, int] | None:
    """(the store's fingerprint, its rows) when the tar shards `config` names are the ones the store was made from,
    unchanged (their stats, as `recorded` bound them to that fingerprint, these listing options and this decoding
    policy); None when anything differs, or the shards cannot be found (the listing says why)."""
    data = absolute_data(config.source.data)
    if not recorded or is_stream(data):
        return None
    try:
        shards = tar_shards(data)
        stamp = shards_stamp(shards) if shards else ""
    except (PipelineError, OSError):
        return None
    if source_stamp("tar", stamp, made.data_fingerprint, data_options(config), decoding) != recorded:
        log.info("the tar shards of %s, the listing options or the decoding policy changed: listing them", data)
        return None
    return made.data_fingerprint, made.num_images


def check_without_listing(config: ExtractConfig, backbone: Backbone | None) -> tuple[int | None, Backbone | None]:
    """Whether the store at `config.out` is current for a manifest or tar source, found without listing it: (its
    rows, or None when it is not current or this cannot tell; the backbone, built here when the check needed one
    and none was given, for the listing that follows)."""
    out, run, s = Path(config.out), config.run, config.source
    data = absolute_data(s.data)
    if run.overwrite or run.check_content or s.views or not out.is_file():
        return None, backbone
    try:
        attrs = read_attrs(out)
    except PipelineError:
        return None, backbone
    kind = attrs.get("source")
    manifest = kind == "manifest" and Path(data).suffix.lower() in MANIFEST_FORMATS
    stamped = kind == "tar" and bool(attrs.get("source_stamp"))  # stores of older releases have none
    if not attrs.get("complete") or not (manifest or stamped) or attrs.get("data") != data:
        return None, backbone
    load_plugins(config.decode.image_plugins)
    backbone = build_backbone(config) if backbone is None else backbone
    decoding = decoding_policy(backbone.data_config, config.decode)
    key = plan_key(config, backbone, decoding)
    if attrs.get("cache_key") != key:
        return None, backbone
    made = Provenance.from_attrs(attrs)
    if not isinstance(made.num_images, int | np.integer) or not isinstance(made.class_names, list):
        return None, backbone  # not what extract writes: the listing's check decides
    if manifest:
        found = manifest_fingerprint(data, list_options(config, known=False), decoding, expect=made,
                                     workers=stat_workers() if made.num_images >= PARALLEL_STAT_ROWS else 1)
    else:
        found = shards_fingerprint(config, made, decoding, str(attrs.get("source_stamp") or ""))
    layout = layout_attrs(shard_rows=config.layout.shard_rows, compression=config.layout.compression)
    if found is None or not is_current(out, key=key, fingerprint=found[0], layout=layout, data=data):
        return None, backbone
    return found[1], backbone
