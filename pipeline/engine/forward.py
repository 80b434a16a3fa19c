"""The mapper: a backbone's features for batches of decoded images, L2-normalised (in one function), with
out-of-memory back-off, and every unusable row (non-finite, all zero) turned into a recorded failure."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator

import torch

from pipeline.backbones.model import Backbone
from pipeline.engine.decode import Batch
from pipeline.errors import DataError, PipelineError

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
    return _with_backoff(backbone.features, backbone, images)


def activations_with_backoff(backbone: Backbone, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and kept activations (`Backbone.features_and_activations`), with the same back-off."""
    return _with_backoff(backbone.features_and_activations, backbone, images)


def _with_backoff(run, backbone: Backbone, images: torch.Tensor):
    try:
        return run(images)
    except torch.OutOfMemoryError:
        if len(images) == 1:
            raise
        if backbone.device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(images) // 2
        log.warning("out of memory on a batch of %d; retrying as two batches of %d and %d", len(images), half,
                    len(images) - half)
        first, second = _with_backoff(run, backbone, images[:half]), _with_backoff(run, backbone, images[half:])
        if isinstance(first, tuple):
            return tuple(torch.cat(pair) for pair in zip(first, second, strict=True))
        return torch.cat([first, second])


NON_FINITE = "the backbone gave non-finite features (NaN or infinity) for this image"
ALL_ZERO = "the backbone gave all-zero features for this image (no direction to normalise)"
ABORT_AFTER = 64  # computed images without one usable feature row before the run stops: the weights are broken


def usable_rows(batch: Batch, features: torch.Tensor, kept: torch.Tensor | None = None) -> tuple:
    """Checked where features are made: a row that is not finite, or all zero, becomes a recorded failure of its
    image (with the reason), never a row of the store. With `kept` activations, their rows are checked and kept
    in step."""
    finite = torch.isfinite(features).all(dim=-1)
    if kept is not None:
        finite &= torch.isfinite(kept.flatten(1)).all(dim=-1)
    bad = ~finite | (features.abs().amax(dim=-1) == 0)
    if not bool(bad.any()):
        return (batch, features) if kept is None else (batch, features, kept)
    bad_rows = bad.cpu().numpy()
    reasons = [NON_FINITE if not f else ALL_ZERO for f in finite[bad].cpu().numpy()]
    failures = batch.failures + list(zip(batch.indices[bad_rows].tolist(), reasons, strict=True))
    batch_kept = Batch(indices=batch.indices[~bad_rows], images=None, failures=failures,
                 hashes=[h for h, b in zip(batch.hashes, bad_rows, strict=True) if not b])
    return (batch_kept, features[~bad]) if kept is None else (batch_kept, features[~bad], kept[~bad])


def extract_features(backbone: Backbone, batches: Iterable[Batch]) -> Iterator[tuple[Batch, torch.Tensor]]:
    """Mapper: for each batch, its L2-normalised penultimate features as float32 on the backbone's device (rows
    follow `indices`); the copy to the host is left to the writer, so a GPU can go on with the next batch. Unusable
    rows become failures (`usable_rows`); when the first `ABORT_AFTER` computed images give no usable row at all,
    the run stops with one line naming the weights, instead of recording every image of the data set as failed.
    A backbone with a `spatial_layer` yields (batch, features, activations) instead, the activations un-normalised."""
    computed = usable = 0
    spatial = backbone.spatial_layer is not None
    for batch in batches:
        if batch.images is None:
            empty = torch.zeros((0, backbone.dim))
            yield (batch, empty) if not spatial else (batch, empty, torch.zeros((0, *backbone.spatial_shape)))
            continue
        if spatial:
            raw, kept = activations_with_backoff(backbone, batch.images)
        else:
            raw, kept = features_with_backoff(backbone, batch.images), None
        computed += len(raw)
        batch, raw, *rest = usable_rows(batch, raw, kept)
        usable += len(raw)
        if not usable and computed >= ABORT_AFTER:
            raise DataError(f"{backbone.name} with weights {backbone.weights} gave no usable features for the first "
                            f"{computed} images (NaN, infinite or all zero): the weights are broken; check --weights "
                            "or the checkpoint")
        yield (batch, l2_normalize(raw), *rest)
