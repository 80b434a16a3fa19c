"""Applying a saved probe head (`pipeline.evaluation.head_file`) to a store's rows or to new image files, after
checking that the features are in the head's feature space (same backbone, weights, layer, preprocessing and
dimension)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.evaluation.head_file import FEATURE_SPACE, SavedHead, load_saved_head
from pipeline.plan import Provenance
from pipeline.store.read import load_store


def load_head(path: str | Path) -> SavedHead:
    """Load and check a head written by `probe` (never unpickled: see `pipeline.evaluation.head_file`)."""
    return load_saved_head(path)


def check_feature_space(head: SavedHead, made: Provenance, *, what: str) -> None:
    """Refuse to apply a head to features from another backbone, weights, layer, preprocessing or dimension."""
    space = made.feature_space()
    for key in FEATURE_SPACE:
        if str(head.meta[key]) != str(space[key]):
            raise PipelineError(f"the head was fitted on {key} {head.meta[key]!r} but {what} has {space[key]!r}; "
                                "apply it to features from the same backbone, or fit a head on this store")


def predict_features(head: SavedHead, features: np.ndarray, *, top: int = 1) -> list[list[tuple[str, float]]]:
    """For each row, the `top` (class name, score) pairs, best first."""
    scores = head.scores(features)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
    names = head.meta["class_names"]
    return [[(names[int(head.classes[j])], float(scores[i, j])) for j in row] for i, row in enumerate(order)]


def predict_store(head: SavedHead, store: str | Path, *, top: int = 1) -> list[dict[str, Any]]:
    """Apply a saved head to every row of a store (checked to be in the head's feature space)."""
    fs = load_store(store)
    check_feature_space(head, fs.made, what=f"the store {store}")
    predictions = predict_features(head, fs.features, top=top)
    return [{"id": i, "label": fs.class_names[y] if y >= 0 else None, "split": s, "predictions": p}
            for i, y, s, p in zip(fs.ids, fs.labels, fs.splits, predictions, strict=True)]


def predict_images(head: SavedHead, paths: list[str | Path], *, top: int = 1, device: str = "auto",
                   weights_path: str | Path | None = None) -> list[dict[str, Any]]:
    """Apply a saved head to image files, embedded by the backbone the head's features came from."""
    from pipeline.engine.embed import backbone_for, embed_files
    from pipeline.engine.resolve import decoding_policy
    from pipeline.plan import DecodeSpec

    backbone = backbone_for(Provenance.from_attrs(head.meta), device=device, weights_path=weights_path)
    decoding = decoding_policy(backbone.data_config, DecodeSpec(alpha=head.meta["alpha"]))
    predictions = predict_features(head, embed_files(paths, backbone, decoding=decoding), top=top)
    return [{"id": str(p), "predictions": pred} for p, pred in zip(paths, predictions, strict=True)]
