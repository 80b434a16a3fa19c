"""The HDF5 feature store format (schema v2): names, dtypes, attributes, paths beside the entry file and the cache
key. Reading is in `pipeline.store.read`, writing in `pipeline.store.writer`.

A store is one entry file. Row-aligned datasets: `features` [N, D] (float32 or float16, rows L2-normalised),
`ids` [N] UTF-8, `labels` [N] int64 (-1: unlabelled), `splits` [N] UTF-8, and `files/size`, `files/mtime_ns`,
`files/hash` (each image's size, modification time and content hash, so that incremental runs know what changed).
`failed/ids` and `failed/reasons` hold the images that could not be read. Attributes say what produced the bytes
(`backbone`, `weights`, `preprocessing`, `cache_key`, ...) and whether the store is `complete`.

Layouts (attribute `layout`):
- `single`: everything in the entry file.
- `sharded`: `features` is an HDF5 virtual dataset over fixed-size shard files in `<entry>.shards/`; every other
  dataset is in the entry. Each shard holds its rows' features, ids and file stamps, so it can be reused alone.

A store is written as `<entry>.partial` and renamed into place only once complete, so a file at the final name is
always whole; readers refuse anything else with a message that says what to do.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.config import DEFAULT_ALPHA

SCHEMA_VERSION = 2
STR_DTYPE = h5py.string_dtype("utf-8")
PATHS = "files/path"  # where each row's image lives (complete stores written since the path column; optional)
HASH_DTYPE = "S32"  # hex BLAKE2b-128
ROW_DATASETS = ("ids", "labels", "splits", "files/size", "files/mtime_ns", "files/hash")
SPLITS = ("train", "val", "test")
# Unit-norm tolerance per storage dtype: float16 keeps ~11 bits of mantissa.
NORM_TOLERANCE = {"float32": 1e-4, "float16": 2e-3}


def cache_key(*, backbone: str, weights: str, preprocessing: str, layer: str, feature_dtype: str = "float32",
              precision: str = "fp32", alpha: str = DEFAULT_ALPHA, spatial: str = "", views: str = "") -> str:
    """Hash of everything that changes the stored feature bytes for a given image (the compute precision and the
    alpha policy too; the default policy, white, is left out so that stores made before it existed keep their key),
    and, with --keep-spatial, which activations are stored beside the features and in what dtype; with --views,
    how the views are augmented."""
    payload = {"schema_version": SCHEMA_VERSION, "backbone": backbone, "weights": weights,
               "preprocessing": preprocessing, "layer": layer, "feature_dtype": feature_dtype, "precision": precision}
    if alpha != DEFAULT_ALPHA:
        payload["alpha"] = alpha
    if spatial:  # --keep-spatial: which activations, stored how (absent: stores without them keep their key)
        payload["spatial"] = spatial
    if views:  # --views: the augmentation of the view rows (their transform and seed)
        payload["views"] = views
    payload = json.dumps(payload, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def layout_attrs(*, shard_rows: int | None, compression: str) -> dict[str, Any]:
    """The attributes that say how a store is laid out (not part of the cache key: they do not change the bytes)."""
    return {"layout": "single" if shard_rows is None else "sharded", "shard_rows": shard_rows or 0,
            "compression": compression}


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def shards_dir(path: Path) -> Path:
    return path.with_name(path.name + ".shards")


def library_versions() -> dict[str, str]:
    import PIL
    import timm
    import torch
    import torchvision

    return {
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "timm": timm.__version__, "numpy": np.__version__, "h5py": h5py.__version__, "pillow": PIL.__version__,
    }


def attrs_to_dict(attrs: h5py.AttributeManager) -> dict[str, Any]:
    out = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def shard_list(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    """The shards of a sharded store, in row order: [{"file": name, "rows": n}, ...] (empty for `single`)."""
    return json.loads(attrs.get("shards", "[]"))
