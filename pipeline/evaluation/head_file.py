"""A fitted head as plain arrays: exported from its estimator, saved without pickle, loaded with every value checked.

Heads are shared between people and machines, so a head file must not be able to run code or make `predict` print
wrong numbers. The file is safetensors (arrays only, a format made for untrusted files) with the metadata as one JSON
string in its header; nothing is unpickled. Loading checks the format, every metadata field's type, every array's
shape against the feature dimension and the class list, and that every number is finite. The loaded head scores with
numpy exactly as its estimator did (`class_scores`), so a saved head gives the predictions the probe reported.

Older heads (`*.head.joblib`, pickles) are refused unread, with the command that refits them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import DEFAULT_ALPHA
from pipeline.errors import PipelineError

HEAD_FORMAT = "featpipe-head/2"
HEAD_SUFFIX = ".head.safetensors"
MAX_HEAD_BYTES = 2 << 30
# How a head's arrays turn features into the scores `class_scores` gives for its estimator.
SCORINGS = ("softmax", "logistic", "margin")
# What a head's features must share with the features it is applied to.
FEATURE_SPACE = ("backbone", "weights", "layer", "preprocessing", "feature_dim", "alpha")
# Metadata fields a head may lack (written before they existed), with the value such a head means.
_OPTIONAL_META = {"alpha": DEFAULT_ALPHA}
_META_TYPES: dict[str, type | tuple[type, ...]] = {
    "format": str, "head": str, "param": str, "chosen": (int, float), "test_top1": (int, float),
    "class_names": list, "store": str, "cache_key": str, "random_init": bool, "scoring": str, "layers": int,
    "backbone": str, "weights": str, "layer": str, "preprocessing": str, "feature_dim": int, "alpha": str,
}


@dataclass
class SavedHead:
    """A head as arrays: `layers` (weight [in, out], bias [out]) applied with ReLU between them, then `scoring`;
    `classes` are the label indices of the score columns, `meta` what the head was fitted on."""

    layers: list[tuple[np.ndarray, np.ndarray]]
    classes: np.ndarray
    scoring: str
    meta: dict[str, Any] = field(default_factory=dict)

    def scores(self, x: np.ndarray) -> np.ndarray:
        """[n, n_classes] scores, the same as `pipeline.evaluation.heads.class_scores` of the estimator it came from."""
        z = np.asarray(x, dtype=np.float64)
        for i, (weight, bias) in enumerate(self.layers):
            z = z @ weight + bias
            if i < len(self.layers) - 1:
                z = np.maximum(z, 0.0)
        if self.scoring == "softmax":
            z = np.exp(z - z.max(axis=1, keepdims=True))
            return z / z.sum(axis=1, keepdims=True)
        if self.scoring == "logistic":  # binary: one logit for classes[1]
            p = 1.0 / (1.0 + np.exp(-z[:, 0]))
            return np.stack([1.0 - p, p], axis=1)
        return np.stack([-z[:, 0], z[:, 0]], axis=1) if z.shape[1] == 1 else z  # margins


def export_head(model: Any) -> SavedHead:
    """The arrays of a fitted scikit-learn linear model, MLP or `TorchLogisticRegression`, and how they score."""
    classes = np.asarray(model.classes_, dtype=np.int64)
    if hasattr(model, "coefs_"):  # MLPClassifier: ReLU hidden layers, logistic or softmax output
        if getattr(model, "activation", "relu") != "relu":
            raise PipelineError(f"cannot save an MLP head with activation {model.activation!r}; only relu")
        layers = [(np.asarray(w, np.float64), np.asarray(b, np.float64))
                  for w, b in zip(model.coefs_, model.intercepts_, strict=True)]
        return SavedHead(layers, classes, "logistic" if model.out_activation_ == "logistic" else "softmax")
    coef = np.atleast_2d(np.asarray(model.coef_, dtype=np.float64))
    intercept = np.atleast_1d(np.asarray(model.intercept_, dtype=np.float64))
    if hasattr(model, "predict_proba"):
        scoring = "logistic" if coef.shape[0] == 1 else "softmax"
    else:
        scoring = "margin"
    return SavedHead([(coef.T.copy(), intercept)], classes, scoring)


def head_bytes(head: SavedHead) -> bytes:
    """The head as a safetensors file: arrays `weight_i`, `bias_i`, `classes`; metadata JSON under `featpipe`."""
    from safetensors.numpy import save

    tensors = {"classes": head.classes}
    for i, (weight, bias) in enumerate(head.layers):
        tensors[f"weight_{i}"], tensors[f"bias_{i}"] = np.ascontiguousarray(weight), np.ascontiguousarray(bias)
    meta = {**head.meta, "format": HEAD_FORMAT, "scoring": head.scoring, "layers": len(head.layers)}
    return save(tensors, metadata={"featpipe": json.dumps(meta, sort_keys=True)})


def _refuse(path: Path, why: str) -> PipelineError:
    return PipelineError(f"{path} is not a usable probe head ({why}); fit it again with python -m pipeline probe "
                         "--store STORE.h5")


def _check_meta(path: Path, meta: Any) -> dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("format") != HEAD_FORMAT:
        raise _refuse(path, f"not format {HEAD_FORMAT}")
    meta = {**_OPTIONAL_META, **meta}
    for key, kind in _META_TYPES.items():
        value = meta.get(key)
        if not isinstance(value, kind) or (kind in (int, (int, float)) and isinstance(value, bool)):
            raise _refuse(path, f"metadata field {key!r} is missing or not a {getattr(kind, '__name__', 'number')}")
    unknown = sorted(set(meta) - set(_META_TYPES))
    if unknown:
        raise _refuse(path, f"unknown metadata fields {unknown[:3]}")
    if not all(isinstance(c, str) for c in meta["class_names"]) or not meta["class_names"]:
        raise _refuse(path, "class_names must be a non-empty list of strings")
    if meta["scoring"] not in SCORINGS or not 1 <= meta["layers"] <= 16 or meta["feature_dim"] < 1:
        raise _refuse(path, f"scoring {meta['scoring']!r}, {meta['layers']} layers, dim {meta['feature_dim']}")
    if not all(np.isfinite(meta[k]) for k in ("chosen", "test_top1")):
        raise _refuse(path, "chosen and test_top1 must be finite numbers")
    return meta


def _check_arrays(path: Path, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> SavedHead:
    expected = {"classes"} | {f"{k}_{i}" for i in range(meta["layers"]) for k in ("weight", "bias")}
    if set(tensors) != expected:
        raise _refuse(path, f"arrays {sorted(tensors)[:6]} instead of {sorted(expected)}")
    classes = tensors["classes"]
    n_names = len(meta["class_names"])
    if classes.dtype != np.int64 or classes.ndim != 1 or len(classes) < 2 or len(np.unique(classes)) != len(classes) \
            or classes.min() < 0 or classes.max() >= n_names:
        raise _refuse(path, f"classes must be distinct int64 indices into the {n_names} class names")
    layers, width = [], meta["feature_dim"]
    for i in range(meta["layers"]):
        weight, bias = tensors[f"weight_{i}"], tensors[f"bias_{i}"]
        if weight.ndim != 2 or weight.shape[0] != width or bias.shape != (weight.shape[1],):
            raise _refuse(path, f"layer {i} has shapes {weight.shape} and {bias.shape}, expected [{width}, k] and [k]")
        if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
            raise _refuse(path, f"layer {i} holds non-finite numbers")
        layers.append((weight.astype(np.float64), bias.astype(np.float64)))
        width = weight.shape[1]
    outputs = 1 if meta["scoring"] == "logistic" or (meta["scoring"] == "margin" and len(classes) == 2) \
        else len(classes)
    if width not in (outputs, len(classes)) or (meta["scoring"] == "logistic" and len(classes) != 2):
        raise _refuse(path, f"the last layer gives {width} scores for {len(classes)} classes")
    return SavedHead(layers, classes, meta["scoring"], meta)


def load_saved_head(path: str | Path) -> SavedHead:
    """Read and check a head file; anything but a head of this format is refused with one line, never executed."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"no probe head at {path}; fit one with: python -m pipeline probe --store STORE.h5")
    with open(path, "rb") as fh:
        start = fh.read(2)
    if path.name.endswith(".joblib") or start[:1] == b"\x80":
        raise PipelineError(f"{path} is a pickled head from an older version; pickles can run code, so it is not "
                            "loaded: fit the head again with python -m pipeline probe --store STORE.h5")
    if path.stat().st_size > MAX_HEAD_BYTES:
        raise _refuse(path, f"larger than {MAX_HEAD_BYTES >> 30} GiB")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            raw_meta = (f.metadata() or {}).get("featpipe")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        meta = json.loads(raw_meta) if raw_meta else None
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign file: one line, whatever went wrong
        raise _refuse(path, f"unreadable: {type(exc).__name__}") from None
    return _check_arrays(path, _check_meta(path, meta), tensors)
