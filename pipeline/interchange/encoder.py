"""`FeatureEncoder`: a scikit-learn transformer from image paths to a backbone's cached features, the store as its
cache, so that features drop into a `sklearn.pipeline.Pipeline` the way embetter's `TimmEncoder` does:

    Pipeline([("features", FeatureEncoder(backbone="efficientnet_lite0", store="cache.h5")),
              ("head", LogisticRegression(max_iter=1000))]).fit(paths, labels)

`transform(paths)` returns the L2-normalised features of the files in order. Files the store already holds with the
same size and modification time are read from it; the others are computed by the backbone and added to the store
(incrementally: the kept rows are copied bit for bit, the store replaced atomically, the previous one readable until
then). The backbone is frozen, so `fit` learns nothing. The encoder pickles without its model (built again on use).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from pipeline.errors import PipelineError

CHUNK = 256  # images decoded and embedded per write


class FeatureEncoder(TransformerMixin, BaseEstimator):
    """Image paths -> cached features of `backbone` (any name `extract --backbone` takes), cached in `store`."""

    def __init__(self, backbone: str = "efficientnet_lite0", store: str | os.PathLike = "features-cache.h5", *,
                 device: str = "auto", batch_size: int = 32, alpha: str = "white", random_init: bool = False,
                 layer: str | None = None) -> None:
        self.backbone = backbone
        self.store = store
        self.device = device
        self.batch_size = batch_size
        self.alpha = alpha
        self.random_init = random_init
        self.layer = layer

    def fit(self, X: Any, y: Any = None) -> FeatureEncoder:  # noqa: N803 - scikit-learn's names
        self.n_features_in_ = 1
        return self

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_built"}

    def model(self):
        """The frozen backbone (built on first use, not pickled)."""
        model = self.__dict__.get("_built")
        if model is None:
            from pipeline.backbones.factory import create_backbone

            model = create_backbone(self.backbone, device=self.device, random_init=self.random_init, layer=self.layer)
            self.__dict__["_built"] = model
        return model

    def transform(self, X: Any) -> np.ndarray:  # noqa: N803 - scikit-learn's names
        """Features [n, dim] (float32) of the image files `X` (paths), in order."""
        from pipeline.store.read import read_features

        paths = [str(Path(os.fspath(p)).expanduser().resolve()) for p in np.asarray(X, dtype=object).ravel()]
        if not paths:
            raise PipelineError("FeatureEncoder.transform needs at least one image path")
        rows = _cache(self, sorted(set(paths)))
        order = np.array([rows[p] for p in paths])
        unique, inverse = np.unique(order, return_inverse=True)
        return read_features(self.store, unique)[inverse]

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        return np.array([f"feature{i}" for i in range(self.model().dim)], dtype=object)


def _stamp(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise PipelineError(f"cannot read the image {path}: {exc.strerror}") from None
    return int(st.st_size), int(st.st_mtime_ns)


def _stored(store: Path, key: str) -> tuple[list[str], np.ndarray]:
    """Ids and (size, mtime) stamps of the cache store when it holds this backbone's features (else nothing)."""
    from pipeline.store.read import read_attrs, read_columns

    if not store.is_file():
        return [], np.zeros((0, 2), dtype=np.int64)
    if read_attrs(store).get("cache_key") != key:
        raise PipelineError(f"{store} caches features of another backbone or preprocessing; give this encoder "
                            "its own store")
    c = read_columns(store, "ids", "files/size", "files/mtime_ns")
    return list(c["ids"]), np.stack([c["files/size"], c["files/mtime_ns"]], axis=1).astype(np.int64)


def _cache(encoder: FeatureEncoder, paths: list[str]) -> dict[str, int]:
    """Make the store hold every path (adding the missing or changed ones); path -> row in the store."""
    from pipeline.engine.resolve import backbone_key, decoding_policy
    from pipeline.plan import DecodeSpec

    store = Path(encoder.store)
    backbone = encoder.model()
    decoding = decoding_policy(backbone.data_config, DecodeSpec(alpha=encoder.alpha))
    key = backbone_key(backbone, "float32", decoding.alpha)
    ids, stamps = _stored(store, key)
    wanted = {p: _stamp(p) for p in paths}
    known = dict(zip(ids, map(tuple, stamps.tolist()), strict=True))
    if any(known.get(p) != s for p, s in wanted.items()):
        _add(store, backbone, decoding, key, {**known, **wanted}, batch_size=max(1, int(encoder.batch_size)))
        ids, _ = _stored(store, key)
    position = {i: n for n, i in enumerate(ids)}
    return {p: position[p] for p in paths}


def _add(store: Path, backbone, decoding, key: str, stamps: dict[str, tuple[int, int]], *, batch_size: int) -> None:
    """Rewrite the cache store with these rows: rows whose stamp is unchanged are kept, the others computed."""
    from pipeline.engine.embed import embed_files_hashed
    from pipeline.plan import Provenance
    from pipeline.store.reuse import Listing
    from pipeline.store.schema import library_versions
    from pipeline.store.writer import StoreWriter

    ids = sorted(stamps)
    listing = Listing(ids=ids, labels=np.full(len(ids), -1, dtype=np.int64), splits=["train"] * len(ids),
                      stamps=np.array([stamps[i] for i in ids], dtype=np.int64).reshape(-1, 2))
    made = Provenance(
        backbone=backbone.name, weights=backbone.weights, random_init=backbone.random_init, layer=backbone.layer,
        preprocessing=backbone.data_config, precision=backbone.precision, optimization=backbone.optimization,
        feature_dim=backbone.dim, cache_key=key, class_names=[], decoding=decoding.as_attrs(), data="", data_options={},
        data_root="/", source="encoder", source_description="FeatureEncoder cache (absolute image paths)",
        split_source="none", label_source="none", num_images=len(ids), data_fingerprint="", versions=library_versions())
    with StoreWriter(store, listing=listing, dim=backbone.dim, attrs=made.to_attrs()) as writer:
        todo = writer.prepare()
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start:start + CHUNK]
            features, hashes = embed_files_hashed([ids[p] for p in chunk], backbone, decoding=decoding,
                                                  batch_size=batch_size)
            writer.write(chunk, features, hashes)
        writer.finish()
