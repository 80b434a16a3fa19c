"""Extraction: reader (DataLoader over any image source) → mapper (backbone features) → writer (feature store).

The loop joining them stays dumb; the store writer is the only stateful part.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import multiprocessing
import os
import queue
import signal
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
from pipeline.datasets import MAX_ASPECT, Batch, Decoding, ImageDataset, collate_batch, load_plugins
from pipeline.errors import DataError, PipelineError, StoreError
from pipeline.outputs import check_writable_dir
from pipeline.sources import open_source
from pipeline.sources.base import ListOptions, Source
from pipeline.store import (
    cache_key,
    check_target,
    is_current,
    known_hashes,
    layout_attrs,
    library_versions,
    partial_path,
    read_attrs,
    read_columns,
)
from pipeline.store_writer import Listing, StoreWriter

log = logging.getLogger(__name__)
EPS = 1e-12


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """The one L2 normalisation of the project: rows scaled to unit norm (zero rows stay zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def default_workers() -> int:
    """Decode worker processes: one per core but one, at least 1 and at most 16. Decoding in worker processes is what
    keeps a decoder that crashes or hangs from taking the run down (see `guarded_batches`); `workers=0` decodes in a
    thread of this process instead: on 2 cores about 10% faster on long runs, but without that protection."""
    cores = os.cpu_count() or 1
    return max(1, min(16, cores - 1))


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


def _init_worker(main_pid: int, ready: object, worker_id: int) -> None:
    """Worker init: exit with the main process (below), then count this worker as ready (`ready`: a shared counter,
    so that the decode watchdog does not count a worker's start-up as decoding time)."""
    _exit_with_main_process(main_pid, worker_id)
    if ready is not None:
        with ready.get_lock():
            ready.value += 1


def _exit_with_main_process(main_pid: int, _worker_id: int) -> None:
    """Worker init: exit when the main process is gone. A forkserver worker's parent is the forkserver, which lives
    as long as its workers do, so after a SIGKILL of the main process PyTorch's own parent check never fires and
    the worker and forkserver would linger forever."""

    def watch() -> None:
        while not _process_gone(main_pid):
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="main-process-watch", daemon=True).start()


_PRELOAD = ["torch", "PIL.Image", "pipeline.datasets", "pipeline.sources.base", "pipeline.sources.tar",
            "pipeline.sources.torchvision"]


def make_loader(dataset: torch.utils.data.Dataset, *, batch_size: int, workers: int, pin_memory: bool,
                prefetch_factor: int = 4, ready: object = None) -> torch.utils.data.DataLoader:
    """A DataLoader in dataset order. Workers come from a forkserver (forking a threaded process can deadlock) that
    has torch and the decoders imported already, so a worker starts in milliseconds, not seconds. `ready`: a shared
    counter (`forkserver_context().Value("i", 0)`) each worker increments once it has started."""
    context = None
    if workers > 0:
        context = forkserver_context()
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_batch,
        pin_memory=pin_memory,
        multiprocessing_context=context,
        prefetch_factor=prefetch_factor if workers > 0 else None,
        worker_init_fn=functools.partial(_init_worker, os.getpid(), ready) if workers > 0 else None,
    )


def forkserver_context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)  # no effect once the server runs, which is fine
    return context


class _View(torch.utils.data.Dataset):
    """Some indices of an ImageDataset, in a given order; items keep the dataset's own indices."""

    def __init__(self, dataset: ImageDataset, indices: np.ndarray) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple:
        return self.dataset[int(self.indices[j])]


def _worker_failure(exc: BaseException, iterator: object, *, timed_out: bool, timeout: float) -> str | None:
    """Why a DataLoader gave up, when a worker died or was stopped for taking too long (None: any other error)."""
    if not isinstance(exc, RuntimeError) or not ("exited unexpectedly" in str(exc) or "killed by signal" in str(exc)):
        return None
    if timed_out:
        return (f"decoding took longer than {timeout:g} s, twice (a hung decoder?); raise --decode-timeout if such "
                "images are only slow")
    codes = [w.exitcode for w in getattr(iterator, "_workers", []) if w.exitcode not in (None, 0)]
    how = ""
    if codes and codes[0] < 0:
        try:
            how = f" by {signal.Signals(-codes[0]).name}"
        except ValueError:
            how = f" by signal {-codes[0]}"
    elif codes:
        how = f" with exit code {codes[0]}"
    return f"the decoder crashed: its worker process was killed{how}, twice"


class _Watchdog:
    """Kills a DataLoader's workers when no batch arrives for `timeout` seconds while one is awaited; the loader then
    reports them dead within seconds. (The DataLoader's own timeout would also delay noticing a crashed worker to
    the full timeout.)"""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.deadline = math.inf
        self.iterator: object = None
        self.ready: object = None
        self.fired = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="decode-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            if self.ready is not None and self.ready.value == 0 and self.deadline < math.inf:
                self.deadline = time.monotonic() + self.timeout  # no worker has started yet: start-up is not decoding
            if time.monotonic() > self.deadline and not self.fired.is_set():
                workers = list(getattr(self.iterator, "_workers", []))
                if any(w.exitcode not in (None, 0) for w in workers):
                    continue  # a worker crashed: the loader reports that itself, within seconds
                self.fired.set()
                for worker in workers:
                    worker.kill()

    def waiting(self, iterator: object, ready: object) -> None:
        """A batch is awaited from `iterator` (whose workers count themselves in `ready`) from now on."""
        self.iterator, self.ready, self.deadline = iterator, ready, time.monotonic() + self.timeout

    def paused(self) -> None:
        """Not waiting (the consumer has the batch): time does not count."""
        self.deadline = math.inf

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def guarded_batches(dataset: ImageDataset, *, batch_size: int, workers: int, timeout: float,
                    pin_memory: bool = False) -> Iterator[Batch]:
    """Batches of `dataset` in order (batch indices are dataset indices). With worker processes, a worker that dies
    (a decoder crash) or a batch slower than `timeout` seconds (a hung decoder) does not end the run:

    1. after a crash, the images that may have been in flight are read again by one worker, one batch at a time
       (after a timeout the batch is known: in-order delivery means it is the one waited for);
    2. the batch that fails again is read one image at a time, and an image that fails alone, twice, is yielded as a
       failure with the reason; no other image is blamed, since one worker with one task in flight always fails on
       the task it holds;
    3. then reading goes on at full speed.
    Must be iterated off the main thread (see `prefetch`), where the DataLoader reports a dead worker as an error
    rather than a signal that could strike anywhere in the main thread.
    """
    if workers == 0:
        yield from make_loader(dataset, batch_size=batch_size, workers=0, pin_memory=pin_memory)
        return
    order = np.arange(len(dataset))  # left to read, in reading order
    mode, limit, strikes = "fast", len(order), 0
    watchdog = _Watchdog(timeout)
    try:
        while len(order):
            fast = mode == "fast"
            ready = forkserver_context().Value("i", 0)
            loader = make_loader(_View(dataset, order[:limit]), batch_size=batch_size if mode != "single" else 1,
                                 workers=workers if fast else 1, pin_memory=pin_memory,
                                 prefetch_factor=4 if fast else 1, ready=ready)
            iterator = iter(loader)
            done, failure = 0, None
            watchdog.fired.clear()
            try:
                while True:
                    watchdog.waiting(iterator, ready)
                    try:
                        batch = next(iterator)
                    except StopIteration:
                        break
                    watchdog.paused()
                    done += len(batch.indices) + len(batch.failures)
                    yield batch
            except RuntimeError as exc:
                failure = _worker_failure(exc, iterator, timed_out=watchdog.fired.is_set(), timeout=timeout)
                if failure is None:
                    raise
            finally:
                watchdog.paused()
                for worker in getattr(iterator, "_workers", []) if failure else []:
                    worker.kill()  # a hung worker would hold the shutdown for seconds
                shutdown = getattr(iterator, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()
            order = order[done:]
            if failure is None:  # the view was read whole
                mode, limit, strikes = "fast", len(order), 0
            elif mode == "fast" and watchdog.fired.is_set():
                log.warning("a batch took longer than %g s to decode; reading it one image at a time", timeout)
                mode, limit, strikes = "single", batch_size, 0
            elif mode == "fast":
                suspects = (4 + 1) * workers * batch_size  # what can be in flight: prefetch_factor batches a worker
                log.warning("a decode worker died; reading the next %d image(s) with one worker to find the file",
                            min(suspects, len(order)))
                mode, limit = "careful", suspects
            elif mode == "careful":  # the batch it failed on is the first one not delivered
                mode, limit, strikes = "single", min(batch_size, limit - done), 0
            else:
                limit -= done
                strikes = 1 if done else strikes + 1
                if strikes >= 2:  # twice alone: blame it (not, say, a worker killed from outside)
                    culprit = int(order[0])
                    log.warning("image %d of this run fails alone: %s", culprit, failure)
                    yield Batch(indices=np.zeros(0, dtype=np.int64), images=None, failures=[(culprit, failure)],
                                hashes=[])
                    order, limit, strikes = order[1:], limit - 1, 0
                    if limit <= 0:
                        mode, limit = "fast", len(order)
    finally:
        watchdog.close()


NON_FINITE = "the backbone gave non-finite features (NaN or infinity) for this image"
ALL_ZERO = "the backbone gave all-zero features for this image (no direction to normalise)"
ABORT_AFTER = 64  # computed images without one usable feature row before the run stops: the weights are broken


def usable_rows(batch: Batch, features: torch.Tensor) -> tuple[Batch, torch.Tensor]:
    """Checked where features are made: a row that is not finite, or all zero, becomes a recorded failure of its
    image (with the reason), never a row of the store."""
    finite = torch.isfinite(features).all(dim=-1)
    bad = ~finite | (features.abs().amax(dim=-1) == 0)
    if not bool(bad.any()):
        return batch, features
    bad_rows = bad.cpu().numpy()
    reasons = [NON_FINITE if not f else ALL_ZERO for f in finite[bad].cpu().numpy()]
    failures = batch.failures + list(zip(batch.indices[bad_rows].tolist(), reasons, strict=True))
    kept = Batch(indices=batch.indices[~bad_rows], images=None, failures=failures,
                 hashes=[h for h, b in zip(batch.hashes, bad_rows, strict=True) if not b])
    return kept, features[~bad]


def extract_features(backbone: Backbone, batches: Iterable[Batch]) -> Iterator[tuple[Batch, torch.Tensor]]:
    """Mapper: for each batch, its L2-normalised penultimate features as float32 on the backbone's device (rows
    follow `indices`); the copy to the host is left to the writer, so a GPU can go on with the next batch. Unusable
    rows become failures (`usable_rows`); when the first `ABORT_AFTER` computed images give no usable row at all,
    the run stops with one line naming the weights, instead of recording every image of the data set as failed."""
    computed = usable = 0
    for batch in batches:
        if batch.images is None:
            yield batch, torch.zeros((0, backbone.dim))
            continue
        raw = features_with_backoff(backbone, batch.images)
        computed += len(raw)
        batch, raw = usable_rows(batch, raw)
        usable += len(raw)
        if not usable and computed >= ABORT_AFTER:
            raise DataError(f"{backbone.name} with weights {backbone.weights} gave no usable features for the first "
                            f"{computed} images (NaN, infinite or all zero): the weights are broken; check --weights "
                            "or the checkpoint")
        yield batch, l2_normalize(raw)


def source_listing(source: Source) -> Listing:
    """What the store must hold for this source: every sample with its stamp, and how to hash its content."""
    samples = source.samples
    return Listing(ids=[s.id for s in samples], labels=np.array([s.label for s in samples], dtype=np.int64),
                   splits=[s.split for s in samples], stamps=source.stamps(), hasher=source.content_hash)


def data_fingerprint(source: Source, listing: Listing, decoding: Decoding) -> str:
    """Hash of the listing (ids, labels, splits, stamps), the class names and the decoding policy: changes when any
    input changes (a new decoding policy retries the images that failed under the old one)."""
    digest = hashlib.sha256(json.dumps(list(source.class_names)).encode())
    digest.update(json.dumps(decoding.as_attrs(), sort_keys=True).encode())
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


def absolute_data(data: str | Path) -> str:
    """`--data` as recorded: absolute (a shard pattern keeps its braces and globs), so that the store finds its
    images again from any working directory; `torchvision:NAME` as given."""
    text = str(data)
    return text if text.startswith("torchvision:") else os.path.abspath(os.path.expanduser(text))


def list_options(config: ExtractConfig, *, known: bool = True) -> ListOptions:
    """How to list `config.data`; with `known`, content hashes already recorded in the store at `config.out` are
    reused for the stratified split, so only new or changed files are read to place them."""
    return ListOptions(test_fraction=config.test_fraction, seed=config.seed, split=config.split, root=config.root,
                       download=config.download, follow_links=config.follow_links,
                       max_file_bytes=config.max_file_bytes, known=known_hashes(Path(config.out)) if known else None)


def _data_attrs(config: ExtractConfig, source_given: bool) -> dict:
    """How to open the source again (for search results and report image grids): `data` and its listing options."""
    options = {"root": str(Path(config.root).resolve()) if config.root else None,
               "test_fraction": config.test_fraction, "seed": config.seed, "split": config.split,
               "follow_links": config.follow_links, "max_file_bytes": config.max_file_bytes}
    return {"data": "" if source_given else absolute_data(config.data),
            "data_options": json.dumps(options, sort_keys=True)}


def check_output_path(out: Path) -> None:
    """Before any compute: `--out` is a file path whose folder can be written (with room for `.partial`/`.lock`)."""
    if out.is_dir():
        raise StoreError(f"--out {out} is a folder; give the store's file path, e.g. {out / 'features.h5'}")
    check_writable_dir(out.parent, what="--out", path=out)


def check_same_dataset(out: Path, data: str, ids: list[str], *, overwrite: bool) -> None:
    """Refuse to turn a store of one data set into a store of another: when `--data` is not the recorded source and
    fewer than half of the store's images are in it, that is another data set, not the same one moved."""
    if overwrite or not data or not out.is_file():
        return
    try:
        recorded = read_attrs(out).get("data", "")
        stored = read_columns(out, "ids")["ids"] if recorded and recorded != data else None
    except PipelineError:
        return
    if stored is None or not len(stored):
        return
    shared = len(set(stored.tolist()) & set(ids))
    if shared < len(stored) / 2:
        raise StoreError(f"{out} holds features of {recorded} ({len(stored)} images, {shared} of them in --data "
                         f"{data}); choose another --out for this data set, or pass --overwrite to replace it")


def _store_attrs(backbone: Backbone, source: Source, key: str, fingerprint: str, decoding: Decoding) -> dict:
    """Attributes that identify what produced the store; the writer adds layout, dtype and completion."""
    return {
        "backbone": backbone.name,
        "precision": backbone.precision,
        "optimization": backbone.optimization,
        "weights": backbone.weights,
        "random_init": backbone.random_init,
        "preprocessing": backbone.preprocessing_json(),
        "layer": backbone.layer,
        "class_names": json.dumps(list(source.class_names)),
        "normalized": True,
        "feature_dim": backbone.dim,
        "versions": json.dumps(library_versions(), sort_keys=True),
        "cache_key": key,
        "data_fingerprint": fingerprint,
        "data_root": str(source.root.resolve()),
        "source": source.kind,
        "source_description": source.description,
        "decoding": json.dumps(decoding.as_attrs(), sort_keys=True),
        "split_source": source.split_source,
        "num_images": len(source),
    }


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


def extract_to_store(config: ExtractConfig, *, backbone: Backbone | None = None, source: Source | None = None,
                     on_progress: Callable[[int, int], None] | None = None) -> ExtractResult:
    """Extract features for an image source into an HDF5 store, computing only what the store does not hold yet.

    A no-op when the store is current. Otherwise rows of an interrupted run and unchanged rows of the existing store
    are reused (see `store_writer`), and only new or changed images go through the model. Every image ends as a row
    or as a recorded failure; problems of the source itself are errors before any compute. `source`, when given,
    is used instead of opening `config.data` (e.g. a torchvision dataset class that is not in torchvision).
    `on_progress(done, total)` is called from the writer thread after each committed batch.
    """
    out = Path(config.out)
    check_output_path(out)
    source_given = source is not None
    if source is None:
        source = open_source(config.data, list_options(config))
    load_plugins(config.image_plugins)  # a missing plugin is an error now, not a failure for every image
    optimize = False  # a backbone passed in is used as given
    if backbone is None:
        backbone = create_backbone(config.backbone, device=config.device, random_init=config.random_init,
                                   weights_path=config.weights, layer=config.layer, precision=config.precision,
                                   compile=config.compile)
        optimize = config.optimize
    key = cache_key(backbone=backbone.name, weights=backbone.weights, preprocessing=backbone.preprocessing_json(),
                    layer=backbone.layer, feature_dtype=config.feature_dtype, precision=backbone.precision)
    decoding = Decoding(max_pixels=config.max_pixels, plugins=tuple(config.image_plugins),
                        max_aspect=MAX_ASPECT if backbone.data_config.get("crop_mode", "center") == "center" else None,
                        max_file_bytes=config.max_file_bytes)
    listing = source_listing(source)
    fingerprint = data_fingerprint(source, listing, decoding)
    layout = layout_attrs(shard_rows=config.shard_rows, compression=config.compression)
    data = _data_attrs(config, source_given)["data"]
    if not config.overwrite and not config.check_content and is_current(out, key=key, fingerprint=fingerprint,
                                                                         layout=layout, data=data):
        log.info("%s is up to date; no forward pass", out)
        return ExtractResult(str(out), len(source), 0, True, 0.0, 0.0, backbone.name, backbone.dim)
    check_target(out, key=key, overwrite=config.overwrite)
    check_same_dataset(out, data, listing.ids, overwrite=config.overwrite)
    if optimize:  # after the up-to-date check: a no-op run should not pay for tracing
        backbone = backbone.optimized()

    samples = source.samples
    start = time.perf_counter()
    attrs = {**_store_attrs(backbone, source, key, fingerprint, decoding), **_data_attrs(config, source_given)}
    writer = StoreWriter(out, listing=listing, dim=backbone.dim, attrs=attrs, feature_dtype=config.feature_dtype,
                     compression=config.compression, shard_rows=config.shard_rows,
                     check_content=config.check_content, lock_timeout=config.lock_timeout,
                     keep_store_id=not config.overwrite)
    try:
        with writer:
            todo = writer.prepare(reuse=not config.overwrite)
            if writer.resumed or writer.kept:
                log.info("%s: %d row(s) resumed, %d unchanged kept, %d to compute", out, writer.resumed, writer.kept,
                         len(todo))
            if len(todo):
                workers = default_workers() if config.workers is None else config.workers
                batch_size = default_batch_size(backbone) if config.batch_size is None else config.batch_size
                dataset = ImageDataset(source.locators(todo), backbone.transform, reader=source.reader,
                                       decoding=decoding)
                batches = prefetch(guarded_batches(dataset, batch_size=batch_size, workers=workers,
                                                   timeout=config.decode_timeout,
                                                   pin_memory=backbone.device.type == "cuda"))
                with tqdm(total=len(samples), initial=len(samples) - len(todo), unit="img",
                          desc=f"extract {backbone.name}", disable=not config.progress, dynamic_ncols=True) as bar:

                    def write(batch: Batch, feats: torch.Tensor) -> None:  # in the writer thread
                        writer.write(todo[batch.indices], feats.cpu().numpy(), batch.hashes)
                        writer.fail([todo[i] for i, _ in batch.failures], [r for _, r in batch.failures])
                        bar.update(len(batch.indices) + len(batch.failures))
                        if on_progress is not None:
                            on_progress(bar.n, len(samples))
                        log.debug("committed %d of %d rows", writer.rows + writer.failures, len(samples))

                    background = BackgroundWriter(write)
                    try:
                        for batch, feats in extract_features(backbone, batches):
                            background.submit(batch, feats)
                    finally:
                        background.close()
            if writer.rows == 0:
                partial_path(out).unlink(missing_ok=True)  # nothing worth resuming
                raise _nothing_usable(writer.failed, backbone, source)
            seconds = time.perf_counter() - start
            full = not (writer.kept or writer.resumed)
            writer.attrs.update(_throughput_attrs(out, writer.computed, seconds, full=full))
            writer.finish()
    except DataError:
        if writer.prepared and writer.rows == 0:  # stopped before any usable row: nothing worth resuming
            partial_path(out).unlink(missing_ok=True)
        raise
    return ExtractResult(str(out), writer.rows, writer.failures, False, seconds, writer.computed / max(seconds, 1e-9),
                         backbone.name, backbone.dim, writer.failed, computed=writer.computed, resumed=writer.resumed,
                         kept=writer.kept)
