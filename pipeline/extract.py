"""Extraction: reader (DataLoader over an image folder) → mapper (backbone features) → writer (feature store).

The loop joining them stays dumb; the store writer is the only stateful part.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.backbones import Backbone, create_backbone
from pipeline.config import ExtractConfig
from pipeline.datasets import Batch, ImageDataset, ImageFolder, collate_batch, file_stamp, scan_image_folder
from pipeline.errors import DataError, PipelineError
from pipeline.store import cache_key, check_target, is_current, layout_attrs, library_versions, partial_path
from pipeline.store_writer import Listing, StoreWriter

log = logging.getLogger(__name__)
EPS = 1e-12


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """The one L2 normalisation of the project: rows scaled to unit norm (zero rows stay zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def default_workers() -> int:
    """Decode worker processes: none on 1-2 cores (a decode thread overlaps with the model instead: measured faster
    there, since a worker process competes with the model's threads and ships every batch through shared memory),
    else one per core but one, at most 16."""
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(16, cores - 1)


def default_batch_size(backbone: Backbone, *, largest: int = 1024) -> int:
    """64 on CPU. On CUDA the largest power of two up to `largest` whose forward pass fits in memory (tried on a
    blank batch at the model's input size), so the GPU is kept full; out-of-memory later still backs off."""
    if backbone.device.type != "cuda":
        return 64
    size, fits = 32, 0
    shape = backbone.data_config["input_size"]
    while size <= largest:
        try:
            backbone.features(torch.zeros(size, *shape))
            fits = size
            size *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    if not fits:
        raise PipelineError(f"{backbone.name} does not fit a batch of 32 on {backbone.device}; pass --batch-size")
    log.info("batch size %d (largest that fits on %s)", fits, backbone.device)
    return fits


def features_with_backoff(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    """The backbone's features for a batch; on out-of-memory the batch is split in halves and retried."""
    try:
        return backbone.features(images)
    except torch.OutOfMemoryError:
        if len(images) == 1:
            raise
        if backbone.device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(images) // 2
        log.warning("out of memory on a batch of %d; retrying as two batches of %d and %d", len(images), half,
                    len(images) - half)
        return torch.cat([features_with_backoff(backbone, images[:half]),
                          features_with_backoff(backbone, images[half:])])


class _Background:
    """A bounded hand-off between the loop and one helper thread, with the helper's errors re-raised in the loop.

    Used twice: to decode batches ahead of the model (when there are no worker processes), and to write batches to
    the store behind it, so that the model waits neither on decoding nor on disk.
    """

    _DONE = object()

    def __init__(self, depth: int) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.stopped = threading.Event()

    def put(self, item: object) -> bool:
        """Hand an item over unless the other side stopped; False when it did."""
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> object:
        while True:
            try:
                return self.queue.get(timeout=0.1)
            except queue.Empty:
                if self.stopped.is_set() and self.queue.empty():
                    return self._DONE


def prefetch(batches: Iterable[Batch], *, depth: int = 2) -> Iterator[Batch]:
    """Iterate `batches` in a background thread, `depth` batches ahead (decoding and resizing release the GIL)."""
    hand = _Background(depth)

    def produce() -> None:
        try:
            for batch in batches:
                if not hand.put(batch):
                    return
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread
            hand.error = exc
        finally:
            hand.stopped.set()

    thread = threading.Thread(target=produce, name="decode", daemon=True)
    thread.start()
    try:
        while (item := hand.get()) is not _Background._DONE:
            yield item
        if hand.error is not None:
            raise hand.error
    finally:
        hand.stopped.set()
        thread.join()


class BackgroundWriter:
    """Runs `write(batch, features)` calls in one thread, in order, at most `depth` batches behind the model."""

    def __init__(self, write: Callable[[Batch, torch.Tensor], None], *, depth: int = 4) -> None:
        self._write = write
        self._hand = _Background(depth)
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while (item := self._hand.get()) is not _Background._DONE:
                self._write(*item)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the loop
            self._hand.error = exc
            self._hand.stopped.set()

    def submit(self, batch: Batch, features: torch.Tensor) -> None:
        if not self._hand.put((batch, features)) and self._hand.error is not None:
            raise self._hand.error

    def close(self) -> None:
        """Wait for every submitted batch to be written; re-raise the writer's error, if any."""
        self._hand.stopped.set()
        self._thread.join()
        if self._hand.error is not None:
            raise self._hand.error


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # killed but not yet reaped: a zombie still answers kill(pid, 0)
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _exit_with_main_process(main_pid: int, _worker_id: int) -> None:
    """Worker init: exit when the main process is gone. A forkserver worker's parent is the forkserver, which lives
    as long as its workers do, so after a SIGKILL of the main process PyTorch's own parent check never fires and
    the worker and forkserver would linger forever."""

    def watch() -> None:
        while not _process_gone(main_pid):
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="main-process-watch", daemon=True).start()


def make_loader(dataset: ImageDataset, *, batch_size: int, workers: int,
                pin_memory: bool) -> torch.utils.data.DataLoader:
    """A DataLoader in dataset order; workers use forkserver, since forking a threaded process can deadlock."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_batch,
        pin_memory=pin_memory,
        multiprocessing_context="forkserver" if workers > 0 else None,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=functools.partial(_exit_with_main_process, os.getpid()) if workers > 0 else None,
    )


def extract_features(backbone: Backbone, batches: Iterable[Batch]) -> Iterator[tuple[Batch, torch.Tensor]]:
    """Mapper: for each batch, its L2-normalised penultimate features as float32 on the backbone's device (rows
    follow `indices`); the copy to the host is left to the writer, so a GPU can go on with the next batch."""
    for batch in batches:
        if batch.images is None:
            yield batch, torch.zeros((0, backbone.dim))
            continue
        yield batch, l2_normalize(features_with_backoff(backbone, batch.images))


def folder_listing(folder: ImageFolder) -> Listing:
    """What the store must hold for this folder: every sample with its file's (size, mtime_ns) stamp."""
    samples = folder.samples
    stamps = np.array([file_stamp(s.path) for s in samples], dtype=np.int64).reshape(-1, 2)
    return Listing(ids=[s.id for s in samples], labels=np.array([s.label for s in samples], dtype=np.int64),
                   splits=[s.split for s in samples], stamps=stamps, paths=[s.path for s in samples])


def data_fingerprint(folder: ImageFolder, listing: Listing) -> str:
    """Hash of the listing (ids, labels, splits, sizes, mtimes, class names): changes when any input changes."""
    digest = hashlib.sha256(json.dumps(list(folder.class_names)).encode())
    for i, (size, mtime) in enumerate(listing.stamps):
        digest.update(f"{listing.ids[i]}\0{listing.labels[i]}\0{listing.splits[i]}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()[:32]


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


def _store_attrs(backbone: Backbone, folder: ImageFolder, key: str, fingerprint: str) -> dict:
    """Attributes that identify what produced the store; the writer adds layout, dtype and completion."""
    return {
        "backbone": backbone.name,
        "precision": backbone.precision,
        "optimization": backbone.optimization,
        "weights": backbone.weights,
        "random_init": backbone.random_init,
        "preprocessing": backbone.preprocessing_json(),
        "layer": backbone.layer,
        "class_names": json.dumps(list(folder.class_names)),
        "normalized": True,
        "feature_dim": backbone.dim,
        "versions": json.dumps(library_versions(), sort_keys=True),
        "cache_key": key,
        "data_fingerprint": fingerprint,
        "data_root": str(folder.root.resolve()),
        "split_source": folder.split_source,
        "num_images": len(folder),
    }


def extract_to_store(config: ExtractConfig, *, backbone: Backbone | None = None) -> ExtractResult:
    """Extract features for an image folder into an HDF5 store, computing only what the store does not hold yet.

    A no-op when the store is current. Otherwise rows of an interrupted run and unchanged rows of the existing store
    are reused (see `store_writer`), and only new or changed images go through the model.
    """
    folder = scan_image_folder(config.data, test_fraction=config.test_fraction, seed=config.seed)
    optimize = False  # a backbone passed in is used as given
    if backbone is None:
        backbone = create_backbone(config.backbone, device=config.device, random_init=config.random_init,
                                   weights_path=config.weights, layer=config.layer, precision=config.precision,
                                   compile=config.compile)
        optimize = config.optimize
    key = cache_key(backbone=backbone.name, weights=backbone.weights, preprocessing=backbone.preprocessing_json(),
                    layer=backbone.layer, feature_dtype=config.feature_dtype, precision=backbone.precision)
    listing = folder_listing(folder)
    fingerprint = data_fingerprint(folder, listing)
    out = Path(config.out)
    layout = layout_attrs(shard_rows=config.shard_rows, compression=config.compression)
    if not config.overwrite and not config.check_content and is_current(out, key=key, fingerprint=fingerprint,
                                                                         layout=layout):
        log.info("%s is up to date; no forward pass", out)
        return ExtractResult(str(out), len(folder), 0, True, 0.0, 0.0, backbone.name, backbone.dim)
    check_target(out, key=key, overwrite=config.overwrite)
    if optimize:  # after the up-to-date check: a no-op run should not pay for tracing
        backbone = backbone.optimized()

    samples = folder.samples
    start = time.perf_counter()
    attrs = _store_attrs(backbone, folder, key, fingerprint)
    with StoreWriter(out, listing=listing, dim=backbone.dim, attrs=attrs, feature_dtype=config.feature_dtype,
                     compression=config.compression, shard_rows=config.shard_rows,
                     check_content=config.check_content, lock_timeout=config.lock_timeout) as writer:
        todo = writer.prepare(reuse=not config.overwrite)
        if writer.resumed or writer.kept:
            log.info("%s: %d row(s) resumed, %d unchanged kept, %d to compute", out, writer.resumed, writer.kept,
                     len(todo))
        if len(todo):
            workers = default_workers() if config.workers is None else config.workers
            batch_size = default_batch_size(backbone) if config.batch_size is None else config.batch_size
            dataset = ImageDataset([samples[i].path for i in todo], backbone.transform)
            loader = make_loader(dataset, batch_size=batch_size, workers=workers,
                                 pin_memory=backbone.device.type == "cuda")
            batches = loader if workers > 0 else prefetch(loader)
            with tqdm(total=len(samples), initial=len(samples) - len(todo), unit="img",
                      desc=f"extract {backbone.name}", disable=not config.progress, dynamic_ncols=True) as bar:

                def write(batch: Batch, feats: torch.Tensor) -> None:  # in the writer thread
                    writer.write(todo[batch.indices], feats.cpu().numpy(), batch.hashes)
                    writer.fail([todo[i] for i, _ in batch.failures], [r for _, r in batch.failures])
                    bar.update(len(batch.indices) + len(batch.failures))
                    log.debug("committed %d of %d rows", writer.rows + writer.failures, len(samples))

                background = BackgroundWriter(write)
                try:
                    for batch, feats in extract_features(backbone, batches):
                        background.submit(batch, feats)
                finally:
                    background.close()
        if writer.rows == 0:
            partial_path(out).unlink(missing_ok=True)  # nothing worth resuming
            first_id, first_reason = writer.failed[0]
            raise DataError(f"none of the {len(samples)} images under {config.data} could be read "
                            f"(e.g. {first_id}: {first_reason})")
        writer.finish()
    seconds = time.perf_counter() - start
    return ExtractResult(str(out), writer.rows, writer.failures, False, seconds, writer.computed / max(seconds, 1e-9),
                         backbone.name, backbone.dim, writer.failed, computed=writer.computed, resumed=writer.resumed,
                         kept=writer.kept)
