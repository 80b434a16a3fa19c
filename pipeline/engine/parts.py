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
import logging
from pathlib import Path

import numpy as np

from pipeline.engine.current import check_without_listing
from pipeline.engine.decode import Decoding
from pipeline.engine.resolve import (
    absolute_data,
    check_output_path,
    data_fingerprint,
    data_options,
    open_source_with_views,
    source_listing,
    source_stamp,
)
from pipeline.engine.runner import ExtractResult, extract_to_store
from pipeline.errors import PipelineError, StoreError
from pipeline.outputs import store_stem
from pipeline.plan import ExtractConfig, Provenance
from pipeline.sources.base import Source
from pipeline.store.read import check_target, is_current, read_attrs, read_columns, read_failed, read_features
from pipeline.store.reuse import Listing
from pipeline.store.schema import layout_attrs
from pipeline.store.writer import StoreWriter

log = logging.getLogger(__name__)


def part_of(sample_id: str, parts: int) -> int:
    """The part a sample belongs to: stable under additions, independent of listing order."""
    return int.from_bytes(hashlib.sha1(sample_id.encode()).digest()[:8], "big") % parts


def part_path(out: str | Path, part: int, parts: int) -> Path:
    out = Path(out)
    return out.with_name(f"{store_stem(out)}.part{part}of{parts}.h5")


def _open(config: ExtractConfig) -> Source:
    """The whole source, split as one unsharded run splits it (content hashes known to the merged store reused)."""
    return open_source_with_views(config)


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
        raise StoreError(f"part {part + 1} of {parts} of {config.source.data} is empty; use fewer shards")
    return extract_to_store(config.replace(out=part_path(config.out, part, parts),
                                           device=part_device(config.run.device, part)), source=source)


def _merged_provenance(config: ExtractConfig, source: Source, parts: list[dict]) -> tuple[Provenance, Listing]:
    """The provenance the merged store records: the parts' (which must agree), for the whole source."""
    if len({a["cache_key"] for a in parts}) != 1:
        raise StoreError(f"the parts of {config.out} come from different configurations; extract them again")
    first = Provenance.from_attrs(parts[0])
    listing = source_listing(source)
    fingerprint = data_fingerprint(source, listing, Decoding.from_attrs(first.decoding))
    options = data_options(config)
    return dataclasses.replace(first, data_fingerprint=fingerprint, source_description=source.description,
                               num_images=len(source), data=absolute_data(config.source.data), data_options=options,
                               source_stamp=source_stamp(source.kind, source.stamp, fingerprint, options,
                                                         Decoding.from_attrs(first.decoding))), listing


def merge_parts(config: ExtractConfig, parts: int, *, block_rows: int = 65536) -> ExtractResult:
    """Write `config.out` from its part stores: rows in the full source's order, failures kept, no model run."""
    source = _open(config)
    paths = [part_path(config.out, k, parts) for k in range(parts)]
    part_attrs = [read_attrs(p) for p in paths]
    provenance, listing = _merged_provenance(config, source, part_attrs)
    out = Path(config.out)
    check_output_path(out)
    layout = layout_attrs(shard_rows=config.layout.shard_rows, compression=config.layout.compression)
    if is_current(out, key=provenance.cache_key, fingerprint=provenance.data_fingerprint, layout=layout,
                  data=provenance.data):
        return ExtractResult(str(out), len(source), 0, True, 0.0, 0.0, provenance.backbone, provenance.feature_dim)
    check_target(out, key=provenance.cache_key, overwrite=config.run.overwrite)
    attrs = provenance.to_attrs()
    speeds = [a.get("images_per_second") for a in part_attrs]
    if all(speeds):  # the parts ran side by side
        attrs["images_per_second"] = round(float(sum(speeds)), 2)
    with StoreWriter(out, listing=listing, dim=provenance.feature_dim, attrs=attrs,
                     feature_dtype=part_attrs[0].get("feature_dtype", "float32"),
                     compression=config.layout.compression, shard_rows=config.layout.shard_rows,
                     lock_timeout=config.run.lock_timeout, keep_store_id=not config.run.overwrite) as writer:
        writer.prepare(reuse=False)
        _copy_rows(writer, listing, paths, provenance.feature_dim, block_rows)
        position = {sid: n for n, sid in enumerate(listing.ids)}
        for path in paths:
            failed = read_failed(path)
            if failed:
                writer.fail([position[i] for i in failed], list(failed.values()))
        writer.finish()
    rows = int(read_attrs(out)["committed_rows"])
    log.info("merged %d parts into %s (%d rows)", parts, out, rows)
    return ExtractResult(str(out), rows, len(source) - rows, False, 0.0, 0.0, provenance.backbone,
                         provenance.feature_dim)


def _copy_rows(writer: StoreWriter, listing: Listing, paths: list[Path], dim: int, block_rows: int) -> None:
    """The parts' rows in the full listing's order, as one run writes them, a block at a time."""
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
        features = np.empty((len(block), dim), dtype=np.float32)
        for k, path in enumerate(paths):
            mine = np.flatnonzero(located[:, 0] == k)
            if len(mine):
                rows = located[mine, 1]
                order = np.argsort(rows)
                features[mine[order]] = read_features(path, rows[order])
        writer.write(block, features, [part_hashes[k][row].decode() for k, row in located])


def current_merged(config: ExtractConfig) -> ExtractResult | None:
    """The merged store's result when it is current for a manifest or tar source, found without listing it
    (`check_without_listing`), so that no part runs; else None (the parts and the merge check their own stores,
    and report what is wrong: e.g. here, the coordinator, may have no GPU for `--device cuda`)."""
    try:
        rows, backbone = check_without_listing(config, None)
    except PipelineError as exc:
        log.info("the parts check their own stores (%s)", exc)
        return None
    if rows is None:
        return None
    log.info("%s is up to date (found without listing the source); no part runs", config.out)
    return ExtractResult(str(config.out), rows, 0, True, 0.0, 0.0, backbone.name, backbone.dim)


def extract_in_parts(config: ExtractConfig, parts: int, *, dask_address: str | None = None,
                     timeout: float = 30.0) -> ExtractResult:
    """Extract the source in `parts` parts, then merge them into `config.out`. With `dask_address` the parts run on
    that existing Dask cluster (`dask scheduler` + `dask worker`s sharing this filesystem: Slurm, Kubernetes, or
    several GPUs of one machine), else one after another here. Each part is an incremental store of its own, so a
    lost worker costs only its part: run the same command again and the finished parts are reused."""
    if parts < 1:
        raise StoreError(f"--shards must be >= 1, got {parts}")
    found = current_merged(config)
    if found is not None:  # nothing to hand out
        return found
    if dask_address:  # workers run elsewhere (another directory, another machine): absolute paths only
        data = str(config.source.data)
        config = config.replace(out=Path(config.out).resolve(),
                                **({"data": str(Path(data).resolve())} if Path(data).exists() else {}))
        try:
            from distributed import Client
        except ImportError as exc:
            raise StoreError("--dask-address needs the distributed package: pip install distributed") from exc
        try:
            client = Client(dask_address, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            raise StoreError(f"cannot reach the Dask scheduler at {dask_address} ({str(exc).splitlines()[0]}); "
                             "start one with `dask scheduler` and workers with `dask worker ADDRESS`, or check "
                             "the address") from None
        with client:
            if not client.scheduler_info().get("workers"):
                client.wait_for_workers(1, timeout=timeout)
            futures = [client.submit(extract_part, config, k, parts, pure=False, key=f"extract-part-{k}-of-{parts}")
                       for k in range(parts)]
            client.gather(futures)
    else:
        for k in range(parts):
            extract_part(config, k, parts)
    return merge_parts(config, parts)
