"""Extraction: reader (supervised decoding of any image source) → mapper (backbone features) → writer (the store).

The loop joining them stays dumb; the store writer is the only stateful part, and everything decided before the
first image is in the resolved plan (`pipeline.engine.resolve`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipeline.backbones.model import Backbone
from pipeline.engine.current import check_without_listing
from pipeline.engine.decode import ImageDataset
from pipeline.engine.forward import ALL_ZERO, NON_FINITE, default_batch_size, default_workers, extract_features
from pipeline.engine.resolve import Plan, resolve_plan
from pipeline.engine.shared import share_locators
from pipeline.engine.threads import BackgroundWriter, prefetch
from pipeline.engine.views import ViewDataset
from pipeline.engine.workers import supervised_batches
from pipeline.errors import DataError, PipelineError
from pipeline.plan import ExtractConfig
from pipeline.sources.base import Source
from pipeline.store.read import read_attrs
from pipeline.store.schema import partial_path
from pipeline.store.writer import StoreWriter

log = logging.getLogger(__name__)


@dataclass
class ExtractResult:
    """What an extraction did: small enough to return from a Prefect task."""

    store: str
    rows: int  # rows in the store
    failed: int
    skipped: bool
    seconds: float
    images_per_second: float  # computed rows per second
    backbone: str
    feature_dim: int
    failures: list[tuple[str, str]] = field(default_factory=list)
    computed: int = 0  # rows that went through the model in this run
    resumed: int = 0  # rows taken from an interrupted run
    kept: int = 0  # rows kept from the previous store (incremental run)

    def summary(self) -> str:
        if self.skipped:
            return f"{self.store} is up to date ({self.rows} rows, {self.backbone}); no forward pass was run"
        text = f"{self.computed} extracted, {self.failed} failed in {self.seconds:.1f} s"
        if self.computed:
            text += f" ({self.images_per_second:.1f} img/s)"
        reused = [f"{n} {what}" for n, what in ((self.resumed, "resumed from the interrupted run"),
                                                (self.kept, "unchanged kept")) if n]
        if reused:
            text += f"; {', '.join(reused)}"
        if self.failures:
            shown = "; ".join(f"{i}: {r}" for i, r in self.failures[:3])
            text += f": {shown}" + (" ..." if self.failed > 3 else "")
        return f"{text} -> {self.store}"


def extract_to_store(config: ExtractConfig, *, backbone: Backbone | None = None, source: Source | None = None,
                     on_progress: Callable[[int, int], None] | None = None) -> ExtractResult:
    """Extract features for an image source into an HDF5 store, computing only what the store does not hold yet.

    A no-op when the store is current. Otherwise rows of an interrupted run and unchanged rows of the existing store
    are reused (see `pipeline.store.writer`), and only new or changed images go through the model. Every image ends
    as a row or as a recorded failure; problems of the source itself are errors before any compute. `source`, when
    given, is used instead of opening the configured data (e.g. a part of a sharded run); `on_progress(done, total)`
    is called from the writer thread after each committed batch.
    """
    optimize = backbone is None
    if source is None:  # a manifest's or tar shards' store found current without listing them
        rows, backbone = check_without_listing(config, backbone)
        if rows is not None:
            log.info("%s is up to date (found without listing the source); no forward pass", config.out)
            return ExtractResult(str(config.out), rows, 0, True, 0.0, 0.0, backbone.name, backbone.dim)
    plan = resolve_plan(config, backbone=backbone, source=source, optimize=optimize)
    if plan.is_current():
        log.info("%s is up to date; no forward pass", plan.out)
        return ExtractResult(str(plan.out), len(plan.source), 0, True, 0.0, 0.0, plan.backbone.name, plan.backbone.dim)
    plan.check_target()
    model = plan.backbone.optimized() if plan.optimize else plan.backbone  # after the check: a no-op is not traced
    start = time.perf_counter()
    writer = StoreWriter(plan.out, listing=plan.listing, dim=model.dim, attrs=plan.provenance(model).to_attrs(),
                         feature_dtype=config.layout.feature_dtype, compression=config.layout.compression,
                         shard_rows=config.layout.shard_rows, check_content=config.run.check_content,
                         lock_timeout=config.run.lock_timeout, keep_store_id=not config.run.overwrite,
                         spatial=(model.spatial_shape, plan.spatial_dtype) if model.spatial_layer else None)
    try:
        with writer:
            todo = writer.prepare(reuse=not config.run.overwrite)
            if len(todo):
                _compute(plan, model, writer, todo, on_progress)
            seconds = _finish(plan, model, writer, start)
    except DataError:
        if writer.prepared and writer.rows == 0:  # stopped before any usable row: nothing worth resuming
            partial_path(plan.out).unlink(missing_ok=True)
        raise
    return ExtractResult(str(plan.out), writer.rows, writer.failures, False, seconds,
                         writer.computed / max(seconds, 1e-9), model.name, model.dim, writer.failed,
                         computed=writer.computed, resumed=writer.resumed, kept=writer.kept)


def _compute(plan: Plan, model: Backbone, writer: StoreWriter, todo: np.ndarray,
             on_progress: Callable[[int, int], None] | None) -> None:
    """Decode, embed and write the rows `todo`: the three stages overlap (decoding ahead in a thread or worker
    processes, writing behind in a thread), so that the model sets the pace."""
    config, total = plan.config, len(plan.listing)
    if writer.resumed or writer.kept:
        log.info("%s: %d row(s) resumed, %d unchanged kept, %d to compute", plan.out, writer.resumed, writer.kept,
                 len(todo))
    workers = default_workers() if config.decode.workers is None else config.decode.workers
    batch_size = default_batch_size(model) if config.run.batch_size is None else config.run.batch_size
    locators = plan.source.locators(todo)
    if workers > 0:  # one mapped copy of a path column for all the workers, not a pickled one each
        locators = share_locators(locators)
    if plan.train_transform is None:
        dataset = ImageDataset(locators, model.transform, reader=plan.source.reader, decoding=plan.decoding)
    else:
        dataset = ViewDataset(locators, model.transform, reader=plan.source.reader, decoding=plan.decoding,
                              train_transform=plan.train_transform)
    batches = prefetch(supervised_batches(dataset, batch_size=batch_size, workers=workers,
                                          timeout=config.decode.decode_timeout,
                                          pin_memory=model.device.type == "cuda"))
    with tqdm(total=total, initial=total - len(todo), unit="img", desc=f"extract {model.name}",
              disable=not config.run.progress, dynamic_ncols=True) as bar:

        def write(batch, feats, kept=None) -> None:  # in the writer thread
            writer.write(todo[batch.indices], feats.cpu().numpy(), batch.hashes,
                         None if kept is None else kept.cpu().numpy())
            writer.fail([todo[i] for i, _ in batch.failures], [r for _, r in batch.failures])
            bar.update(len(batch.indices) + len(batch.failures))
            if on_progress is not None:
                on_progress(bar.n, total)
            log.debug("committed %d of %d rows", writer.rows + writer.failures, total)

        background = BackgroundWriter(write)
        try:
            for batch, *outputs in extract_features(model, batches):
                background.submit(batch, *outputs)
        finally:
            background.close()


def _finish(plan: Plan, model: Backbone, writer: StoreWriter, start: float) -> float:
    """Refuse a store without a single row, record the throughput, and complete the store; the seconds taken."""
    if writer.rows == 0:
        partial_path(plan.out).unlink(missing_ok=True)  # nothing worth resuming
        raise _nothing_usable(writer.failed, model, plan.source)
    seconds = time.perf_counter() - start
    writer.attrs.update(_throughput_attrs(plan.out, writer.computed, seconds,
                                          full=not (writer.kept or writer.resumed)))
    writer.finish()
    return seconds


def _throughput_attrs(out: Path, computed: int, seconds: float, *, full: bool) -> dict:
    """The throughput recorded in the store for leaderboards: that of the last run over every image. An incremental
    run of a few images is dominated by start-up, so it keeps the figure of the store it updates."""
    if full and computed:
        return {"images_per_second": round(computed / max(seconds, 1e-9), 2), "throughput_images": computed}
    try:
        previous = read_attrs(out) if out.is_file() else {}
    except PipelineError:
        previous = {}
    return {k: previous[k] for k in ("images_per_second", "throughput_images") if k in previous}


def _nothing_usable(failed: list[tuple[str, str]], backbone: Backbone, source: Source) -> DataError:
    if all(reason in (NON_FINITE, ALL_ZERO) for _, reason in failed):
        return DataError(f"{backbone.name} with weights {backbone.weights} gave no usable features for any of the "
                         f"{len(source)} images (NaN, infinite or all zero): the weights are broken; check --weights "
                         "or the checkpoint")
    first_id, first_reason = failed[0]
    return DataError(f"none of the {len(source)} images of {source.description} could be read (e.g. {first_id}: "
                     f"{first_reason})")
