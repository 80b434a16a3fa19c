"""Sharded extraction: one source split into N parts extracted in parallel (one worker, or one GPU, each), then
merged into one store.

A sample's part is a hash of its id, so parts are stable as the collection grows: each part is a store of its own
(`OUT.partKofN.h5`), extracted incrementally like any store, and the merge writes the final store from the parts
without any model. The merged store is exactly what one unsharded run writes (same ids, order, attributes and
fingerprint), so either way a rerun with no new images is a no-op.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from pipeline.config import ExtractConfig
from pipeline.datasets import Decoding
from pipeline.errors import StoreError
from pipeline.extract import (
    ExtractResult,
    absolute_data,
    check_output_path,
    data_fingerprint,
    extract_to_store,
    list_options,
    source_listing,
)
from pipeline.outputs import store_stem
from pipeline.sources import open_source
from pipeline.sources.base import Source
from pipeline.store import (
    check_target,
    is_current,
    layout_attrs,
    read_attrs,
    read_columns,
    read_failed,
    read_features,
)
from pipeline.store_writer import StoreWriter

log = logging.getLogger(__name__)


def part_of(sample_id: str, parts: int) -> int:
    """The part a sample belongs to: stable under additions, independent of listing order."""
    return int.from_bytes(hashlib.sha1(sample_id.encode()).digest()[:8], "big") % parts


def part_path(out: str | Path, part: int, parts: int) -> Path:
    out = Path(out)
    return out.with_name(f"{store_stem(out)}.part{part}of{parts}.h5")


def _open(config: ExtractConfig) -> Source:
    """The whole source, split as one unsharded run splits it (content hashes known to the merged store reused)."""
    return open_source(config.data, list_options(config))


def part_source(source: Source, part: int, parts: int) -> Source:
    samples = tuple(s for s in source.samples if part_of(s.id, parts) == part)
    return dataclasses.replace(source, samples=samples, description=f"{source.description} (part {part + 1} of "
                                                                    f"{parts})")


def part_device(device: str, part: int) -> str:
    """`auto` with several GPUs: part k runs on GPU k mod count (one worker per GPU)."""
    if device != "auto":
        return device
    import torch

    count = torch.cuda.device_count()
    return f"cuda:{part % count}" if count > 1 else device


def extract_part(config: ExtractConfig, part: int, parts: int) -> ExtractResult:
    """Extract one part of the source into its own store (incrementally, like any store)."""
    source = part_source(_open(config), part, parts)
    if not source.samples:
        raise StoreError(f"part {part + 1} of {parts} of {config.data} is empty; use fewer shards")
    return extract_to_store(dataclasses.replace(config, out=part_path(config.out, part, parts),
                                                device=part_device(config.device, part)), source=source)


def merge_parts(config: ExtractConfig, parts: int, *, block_rows: int = 65536) -> ExtractResult:
    """Write `config.out` from its part stores: rows in the full source's order, failures kept, no model run."""
    source = _open(config)
    paths = [part_path(config.out, k, parts) for k in range(parts)]
    attrs = [read_attrs(p) for p in paths]
    keys = {a["cache_key"] for a in attrs}
    if len(keys) != 1:
        raise StoreError(f"the parts of {config.out} come from different configurations; extract them again")
    first = attrs[0]
    decoding = Decoding.from_attrs(json.loads(first["decoding"]))
    listing = source_listing(source)
    fingerprint = data_fingerprint(source, listing, decoding)
    out = Path(config.out)
    check_output_path(out)
    layout = layout_attrs(shard_rows=config.shard_rows, compression=config.compression)
    key = first["cache_key"]
    if is_current(out, key=key, fingerprint=fingerprint, layout=layout):
        return ExtractResult(str(out), len(source), 0, True, 0.0, 0.0, first["backbone"], int(first["feature_dim"]))
    check_target(out, key=key, overwrite=config.overwrite)
    position = {sid: n for n, sid in enumerate(listing.ids)}
    merged = {k: v for k, v in first.items() if k not in ("complete", "committed_rows", "created", "failed_count",
                                                           "layout", "shard_rows", "compression", "shards",
                                                           "schema_version", "feature_dtype", "images_per_second",
                                                           "throughput_images")}
    merged.update(data_fingerprint=fingerprint, source_description=source.description, num_images=len(source),
                  data=absolute_data(config.data))
    speeds = [a.get("images_per_second") for a in attrs]
    if all(speeds):  # the parts ran side by side
        merged.update(images_per_second=round(float(sum(speeds)), 2))
    with StoreWriter(out, listing=listing, dim=int(first["feature_dim"]), attrs=merged,
                     feature_dtype=first.get("feature_dtype", "float32"), compression=config.compression,
                     shard_rows=config.shard_rows, lock_timeout=config.lock_timeout,
                     keep_store_id=not config.overwrite) as writer:
        writer.prepare(reuse=False)
        # rows in the full listing's order, as one run writes them, read a block at a time from the parts
        where: dict[str, tuple[int, int]] = {}
        part_hashes = []
        for k, path in enumerate(paths):
            columns = read_columns(path, "ids", "files/hash")
            where.update((i, (k, row)) for row, i in enumerate(columns["ids"]))
            part_hashes.append(columns["files/hash"])
        present = np.array([n for n, i in enumerate(listing.ids) if i in where], dtype=np.int64)
        for start in range(0, len(present), block_rows):
            block = present[start:start + block_rows]
            located = np.array([where[listing.ids[n]] for n in block], dtype=np.int64).reshape(-1, 2)
            features = np.empty((len(block), int(first["feature_dim"])), dtype=np.float32)
            for k, path in enumerate(paths):
                mine = np.flatnonzero(located[:, 0] == k)
                if len(mine):
                    rows = located[mine, 1]
                    order = np.argsort(rows)
                    features[mine[order]] = read_features(path, rows[order])
            hashes = [part_hashes[k][row].decode() for k, row in located]
            writer.write(block, features, hashes)
        for path in paths:
            failed = read_failed(path)
            if failed:
                writer.fail([position[i] for i in failed], list(failed.values()))
        writer.finish()
    rows = int(read_attrs(out)["committed_rows"])
    log.info("merged %d parts into %s (%d rows)", parts, out, rows)
    return ExtractResult(str(out), rows, len(source) - rows, False, 0.0, 0.0, first["backbone"],
                         int(first["feature_dim"]))
