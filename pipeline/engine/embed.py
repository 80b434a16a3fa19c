"""Things outside a store, in the store's feature space: new image files embedded by the store's own backbone, and
the images behind a store's ids (its source re-opened), for `predict`, `search` and the reports' image grids."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.backbones.factory import OVERRIDABLE, create_backbone
from pipeline.backbones.model import PRE_LOGITS, Backbone
from pipeline.engine.decode import Decoding, FileReader, Reader, decode, load_plugins
from pipeline.engine.forward import l2_normalize
from pipeline.engine.resolve import decoding_policy
from pipeline.errors import PipelineError
from pipeline.plan import Provenance
from pipeline.sources.lookup import paths_for_ids, source_for, stored_paths  # noqa: F401 - re-exported: their old home

log = logging.getLogger(__name__)


def backbone_for(made: Provenance, *, device: str = "auto", weights_path: str | Path | None = None,
                 keep: str | None = None) -> Backbone:
    """The backbone that produced a store (or a head's features), checked to give the same features: same name,
    weights, layer and preprocessing, at the precision the store recorded. A store made from a local checkpoint
    needs that checkpoint again. `keep`: also keep that module's output (as `--keep-spatial` did)."""
    layer = made.layer or PRE_LOGITS
    backbone = create_backbone(made.backbone, device=device, random_init=made.random_init, weights_path=weights_path,
                               layer=None if layer == PRE_LOGITS else layer.split(":")[0],
                               precision=made.precision or "auto", overrides=made.preprocessing_overrides or None,
                               keep=keep)
    if backbone.weights != made.weights:
        raise PipelineError(f"the features come from {made.backbone} weights {made.weights!r}, but here that name "
                            f"gives {backbone.weights!r}; pass --weights with the checkpoint used to extract them")
    if backbone.data_config != made.preprocessing and not made.preprocessing_overrides:
        # a head records the preprocessing it was fitted on but not the overrides that made it: derive them
        changed = {k: v for k, v in made.preprocessing.items() if k in OVERRIDABLE and backbone.data_config.get(k) != v}
        if changed:
            backbone = create_backbone(made.backbone, device=device, random_init=made.random_init,
                                       weights_path=weights_path, layer=None if layer == PRE_LOGITS else
                                       layer.split(":")[0], precision=made.precision or "auto", overrides=changed,
                                       keep=keep)
    if backbone.data_config != made.preprocessing:
        raise PipelineError(f"{made.backbone} preprocesses differently here than when the features were extracted "
                            "(timm/torchvision version change?); re-extract the store")
    return backbone


def embed_files(paths: Iterable[str | Path], backbone: Backbone, *, decoding: Decoding | None = None,
                batch_size: int = 32) -> np.ndarray:
    """L2-normalised features [n, dim] of image files, in order, decoded as the store's images were (`decoding`,
    default: this backbone's policy). An unreadable file is an error naming it."""
    return embed_files_hashed(paths, backbone, decoding=decoding, batch_size=batch_size)[0]


def embed_files_hashed(paths: Iterable[str | Path], backbone: Backbone, *, decoding: Decoding | None = None,
                       batch_size: int = 32) -> tuple[np.ndarray, list[str]]:
    """`embed_files`, with each file's content hash (the one a store records)."""
    decoding = decoding or decoding_policy(backbone.data_config)
    tensors, hashes = transformed_files(paths, backbone.transform, decoding)
    out = [l2_normalize(backbone.features(torch.stack(tensors[i:i + batch_size]))).cpu().numpy()
           for i in range(0, len(tensors), batch_size)]
    return np.concatenate(out).astype(np.float32), hashes


def transformed_files(paths: Iterable[Any], transform, decoding: Decoding, reader: Reader | None = None) -> tuple[
        list[torch.Tensor], list[str]]:
    """Image files decoded as a store's images were and passed through `transform`, with their content hashes (or,
    with a source's `reader`, the images at its locators: tar members, dataset items). An unreadable file is an
    error naming it; no files at all is an error too."""
    load_plugins(decoding.plugins)
    reader = reader or FileReader()
    tensors, hashes = [], []
    for path in paths:
        try:
            image, digest = decode(reader.read(path, decoding.max_file_bytes), decoding)
        except Exception as exc:  # noqa: BLE001 - any decode problem is the user's file: say which and why
            raise PipelineError(f"cannot read the image {path}: {type(exc).__name__}: {exc}") from None
        tensors.append(transform(image))
        hashes.append(digest)
    if not tensors:
        raise PipelineError("no image files given")
    return tensors, hashes


def images_for_ids(made: Provenance, ids: Iterable[str], *, size: int = 96,
                   store: str | Path | None = None) -> dict[str, Image.Image]:
    """Thumbnails (RGB, longest side `size`) of the images behind some ids of a store; ids whose image cannot be
    found or read are left out (the caller says so), since results stand without their pictures. Files are found
    in the `store`'s path column when it has one (an image folder or a manifest), else by listing its source."""
    wanted = list(dict.fromkeys(ids))
    decoding = Decoding(max_aspect=None)
    found = stored_paths(store, wanted) if made.source in ("folder", "manifest") else None
    if found is not None:
        reader, where = FileReader(), found
    else:
        source = source_for(made)
        position = {s.id: i for i, s in enumerate(source.samples)}
        reader = source.reader
        where = {i: source.locators([position[i]])[0] for i in wanted if i in position}
    out = {}
    for id_ in wanted:
        if id_ not in where:
            continue
        try:
            image, _ = decode(reader.read(where[id_], decoding.max_file_bytes), decoding)
        except Exception as exc:  # noqa: BLE001 - a picture that cannot be shown is not an error of the results
            log.warning("cannot show %s: %s", id_, exc)
            continue
        out[id_] = thumbnail(image, size)
    return out


def thumbnail(image: Image.Image, size: int) -> Image.Image:
    """The image with its longest side `size`; tiny images (digits are 8x8) enlarged with visible pixels."""
    image.thumbnail((size, size), Image.Resampling.LANCZOS if max(image.size) > size else Image.Resampling.NEAREST)
    if max(image.size) < size:
        scale = size // max(image.size)
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    return image
