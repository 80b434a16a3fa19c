"""Extraction: reader (DataLoader over an image folder) → mapper (backbone features) → writer (feature store).

The loop joining them stays dumb; the store writer is the only stateful part.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.backbones import Backbone, create_backbone
from pipeline.config import ExtractConfig
from pipeline.datasets import Batch, ImageDataset, ImageFolder, collate_batch, scan_image_folder
from pipeline.errors import DataError
from pipeline.store import StoreWriter, cache_key, check_target, is_current, library_versions, partial_path

log = logging.getLogger(__name__)
EPS = 1e-12


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """The one L2 normalisation of the project: rows scaled to unit norm (zero rows stay zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def default_workers() -> int:
    """Decode workers: leave one core to the model, at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


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
    )


def extract_features(backbone: Backbone, batches: Iterable[Batch]) -> Iterator[tuple[Batch, np.ndarray]]:
    """Mapper: for each batch, its L2-normalised penultimate features as a float32 array (rows follow `indices`)."""
    for batch in batches:
        if batch.images is None:
            yield batch, np.zeros((0, backbone.dim), dtype=np.float32)
            continue
        yield batch, l2_normalize(backbone.features(batch.images)).cpu().numpy()


def data_fingerprint(folder: ImageFolder) -> str:
    """Hash of the listing (ids, labels, splits, sizes, mtimes, class names): changes when any input changes."""
    digest = hashlib.sha256(json.dumps(list(folder.class_names)).encode())
    for s in folder.samples:
        st = s.path.stat() if s.path.exists() else None
        digest.update(f"{s.id}\0{s.label}\0{s.split}\0{st and st.st_size}\0{st and st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


@dataclass
class ExtractResult:
    """What an extraction did: small enough to return from a Prefect task."""

    store: str
    rows: int
    failed: int
    skipped: bool
    seconds: float
    images_per_second: float
    backbone: str
    feature_dim: int
    failures: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        if self.skipped:
            return f"{self.store} is up to date ({self.rows} rows, {self.backbone}); no forward pass was run"
        text = (f"{self.rows} extracted, {self.failed} failed in {self.seconds:.1f} s "
                f"({self.images_per_second:.1f} img/s)")
        if self.failures:
            shown = "; ".join(f"{i}: {r}" for i, r in self.failures[:3])
            text += f": {shown}" + (" ..." if self.failed > 3 else "")
        return f"{text} -> {self.store}"


def _store_attrs(backbone: Backbone, folder: ImageFolder, key: str, fingerprint: str) -> dict:
    return {
        "backbone": backbone.name,
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
    """Extract features for an image folder into an HDF5 store; a no-op when the store is already current."""
    folder = scan_image_folder(config.data, test_fraction=config.test_fraction, seed=config.seed)
    if backbone is None:
        backbone = create_backbone(config.backbone, device=config.device, random_init=config.random_init,
                                   weights_path=config.weights, layer=config.layer)
    key = cache_key(backbone=backbone.name, weights=backbone.weights, preprocessing=backbone.preprocessing_json(),
                    layer=backbone.layer)
    fingerprint = data_fingerprint(folder)
    out = Path(config.out)
    if is_current(out, key=key, fingerprint=fingerprint):
        log.info("%s is up to date; no forward pass", out)
        return ExtractResult(str(out), len(folder), 0, True, 0.0, 0.0, backbone.name, backbone.dim)
    check_target(out, key=key, overwrite=config.overwrite)

    workers = default_workers() if config.workers is None else config.workers
    dataset = ImageDataset([s.path for s in folder.samples], backbone.transform)
    loader = make_loader(dataset, batch_size=config.batch_size, workers=workers,
                         pin_memory=backbone.device.type == "cuda")
    samples = folder.samples
    failures: list[tuple[str, str]] = []
    start = time.perf_counter()
    attrs = _store_attrs(backbone, folder, key, fingerprint)
    try:
        with StoreWriter(out, dim=backbone.dim, expected_ids=[s.id for s in samples], attrs=attrs) as writer, \
                tqdm(total=len(samples), unit="img", desc=f"extract {backbone.name}", disable=not config.progress,
                     dynamic_ncols=True) as bar:
            for batch, feats in extract_features(backbone, loader):
                rows = [samples[i] for i in batch.indices]
                writer.write([s.id for s in rows], feats, np.array([s.label for s in rows], dtype=np.int64),
                             [s.split for s in rows])
                failed = [(samples[i].id, reason) for i, reason in batch.failures]
                writer.fail([i for i, _ in failed], [r for _, r in failed])
                failures.extend(failed)
                bar.update(len(batch.indices) + len(batch.failures))
            if writer.rows == 0:
                raise DataError(f"none of the {len(samples)} images under {config.data} could be read "
                                f"(e.g. {failures[0][0]}: {failures[0][1]})")
            writer.finish()
    except BaseException:
        partial_path(out).unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - start
    return ExtractResult(str(out), writer.rows, writer.failures, False, seconds, writer.rows / max(seconds, 1e-9),
                         backbone.name, backbone.dim, failures)
