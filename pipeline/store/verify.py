"""Inspecting and verifying a feature store: `store info` and `store verify`.

Both read files that may come from someone else or be damaged, so neither may crash: every problem becomes a line.
`verify_store` runs the checks the readers run (`pipeline.store.read`), then the ones only a full pass can make.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import StoreError
from pipeline.plan import Provenance
from pipeline.store.read import check_complete, failed_rows, open_checked, row_problems
from pipeline.store.schema import NORM_TOLERANCE, attrs_to_dict, partial_path, shard_list, shards_dir

PROVENANCE = ("backbone", "weights", "preprocessing", "cache_key")  # what embed, predict and search rely on


def disk_usage(path: Path) -> int:
    """Bytes on disk of a store: its entry file plus its shard folder."""
    total = path.stat().st_size if path.is_file() else 0
    folder = shards_dir(path)
    if folder.is_dir():
        total += sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return total


def _count(f: h5py.File, name: str) -> int:
    try:
        return int(f[name].shape[0])
    except (KeyError, TypeError, IndexError, AttributeError):
        return 0


def _info(path: Path, target: Path, f: h5py.File) -> dict[str, Any]:
    attrs = attrs_to_dict(f.attrs)
    made = Provenance.from_attrs(attrs)
    n = attrs.get("committed_rows", 0)
    n = int(n) if isinstance(n, int | np.integer) and n >= 0 else 0
    try:
        splits = np.asarray(f["splits"].asstr()[:n], dtype=object)
        names, counts = np.unique(splits, return_counts=True) if n else ([], [])
    except (KeyError, TypeError, ValueError, OSError):
        names, counts = [], []
    try:
        classes = len(json.loads(attrs.get("class_names", "[]")))
    except (TypeError, ValueError):
        classes = -1
    features = f.get("features")
    dim = int(features.shape[1]) if isinstance(features, h5py.Dataset) and features.ndim == 2 else 0
    try:
        unlabelled = int((f["labels"][:n] < 0).sum()) if n else 0
    except (KeyError, TypeError, ValueError, OSError):
        unlabelled = 0
    return {
        "path": str(path),
        "complete": attrs.get("complete", False) is True and target == path,
        "rows": n,
        "dim": dim,
        "dtype": attrs.get("feature_dtype", str(features.dtype) if features is not None else "?"),
        "compression": attrs.get("compression", "none"),
        "layout": attrs.get("layout", "single"),
        "shards": len(shard_list(attrs)) if isinstance(attrs.get("shards", "[]"), str) else 0,
        "backbone": made.backbone or None,
        "weights": made.weights or None,
        "layer": made.layer or "pre-logits",
        "preprocessing": made.preprocessing_json(),
        "overrides": made.preprocessing_overrides or None,
        "alpha": made.alpha,
        "transform": made.transform or None,
        "spatial": (f"{made.spatial_layer} {'x'.join(map(str, made.spatial_shape))} {made.spatial_dtype}"
                    if made.spatial_layer else None),
        "views": int(made.views or 0),
        "splits": {str(k): int(v) for k, v in zip(names, counts, strict=True)},
        "classes": classes,
        "failed": _count(f, "failed/ids"),
        "size_bytes": disk_usage(target),
        "created": attrs.get("created", ""),
        "cache_key": attrs.get("cache_key"),
        "data": made.data,
        "data_root": made.data_root,
        "source": made.source or "folder",  # stores from before sources had kinds were all folders
        "source_description": made.source_description or made.data_root,
        "unlabelled": unlabelled,
    }


def store_info(path: str | Path) -> dict[str, Any]:
    """A summary of a store for people: size, model, splits, classes, failures; works on an unfinished store too."""
    path = Path(path)
    target = path
    if not path.exists() and partial_path(path).exists():
        target = partial_path(path)
    elif not path.exists() and path.suffix == ".partial":
        target = path
    with open_checked(target) as f:
        try:
            return _info(path, target, f)
        except (KeyError, TypeError, ValueError, OSError) as exc:
            raise StoreError(f"{path} cannot be summarised ({type(exc).__name__}: {exc}); run python -m pipeline "
                             f"store verify {path}") from None


def _shard_problems(path: Path, f: h5py.File, attrs: dict[str, Any], n: int) -> list[str]:
    problems, offset = [], 0
    for shard in shard_list(attrs):
        with h5py.File(shards_dir(path) / shard["file"], "r") as s:
            shard_ids = s["ids"].asstr()[: shard["rows"]]
            entry_ids = f["ids"].asstr()[offset: offset + shard["rows"]]
            if list(shard_ids) != list(entry_ids):
                problems.append(f"shard {shard['file']} does not hold the ids the store lists for rows "
                                f"{offset}..{offset + shard['rows'] - 1} (rows misaligned)")
        offset += shard["rows"]
    if offset and offset != n:
        problems.append(f"the shards hold {offset} rows but the store has {n}")
    return problems


def _row_problems(f: h5py.File, attrs: dict[str, Any], n: int, step: int) -> tuple[list[str], set[str]]:
    n_classes = len(json.loads(attrs["class_names"]))
    tolerance = NORM_TOLERANCE.get(attrs.get("feature_dtype", "float32"), 1e-4)
    counts: dict[str, int] = {}
    examples: dict[str, str] = {}
    seen: set[str] = set()
    for start in range(0, n, step):
        stop = min(n, start + step)
        ids = np.asarray(f["ids"].asstr()[start:stop], dtype=object)
        masks = row_problems(f["features"][start:stop].astype(np.float32), f["labels"][start:stop],
                             np.asarray(f["splits"].asstr()[start:stop], dtype=object), n_classes=n_classes,
                             tolerance=tolerance)
        dup = np.array([i in seen or bool(seen.add(i)) for i in ids], dtype=bool)
        for what, bad in {**masks, "duplicate id(s)": dup}.items():
            if bad.any():
                counts[what] = counts.get(what, 0) + int(bad.sum())
                examples.setdefault(what, ids[int(np.argmax(bad))])
    return [f"{counts[w]} row(s) with {w} (e.g. {examples[w]!r})" for w in counts], seen


def _spatial_problems(f: h5py.File, n: int, *, step: int = 256) -> list[str]:
    """Kept activations (`--keep-spatial`): one floating-point row per feature row, every number finite."""
    if "spatial" not in f:
        return []
    ds = f["spatial"]
    if ds.dtype.kind != "f" or len(ds) != n:
        return [f"the activations are {ds.dtype} with {len(ds)} rows; the store has {n} feature rows"]
    bad = sum(int((~np.isfinite(ds[i:i + step].reshape(min(step, n - i), -1)).all(axis=1)).sum())
              for i in range(0, n, step))
    return [f"{bad} row(s) with non-finite activations"] if bad else []


def verify_store(path: str | Path, *, rows: int = 65536) -> list[str]:
    """Check a store thoroughly, streaming it in blocks; return the problems found (empty when it is sound). Never
    raises on a damaged or foreign file: that is a problem to report.

    Checks: what the readers check (complete, row counts, features 2-D of `feature_dim` columns, class list, cache
    key, preprocessing, shards); shards hold the rows and ids the entry expects; features finite and of unit norm;
    labels within the class list; splits known; ids unique and disjoint from failed ids; `failed_count`; kept
    activations finite and row-aligned.
    """
    path = Path(path)
    try:
        with open_checked(path) as f:
            attrs = check_complete(path, f)
            missing = [k for k in PROVENANCE if not isinstance(attrs.get(k), str) or not attrs.get(k)]
            n = int(attrs["committed_rows"])
            problems = _shard_problems(path, f, attrs, n)
            found, seen = _row_problems(f, attrs, n, max(1, int(rows)))
            problems += found + _spatial_problems(f, n)
            failed = set(failed_rows(f))
    except StoreError as exc:
        return [str(exc)]
    except Exception as exc:  # noqa: BLE001 - a damaged file must give a problem line, not a traceback
        return [f"{path} cannot be read as a feature store ({type(exc).__name__}: {exc})"]
    if missing:
        problems.append(f"attributes {missing} are missing: the store does not say which model made its features "
                        "(extract it again)")
    try:
        json.loads(attrs.get("preprocessing", "{}"))
    except (TypeError, ValueError):
        problems.append("the preprocessing attribute is not valid JSON")
    both = failed & seen
    if both:
        problems.append(f"{len(both)} id(s) are both rows and failures (e.g. {sorted(both)[0]!r})")
    if attrs.get("failed_count", len(failed)) != len(failed):
        problems.append(f"failed_count={attrs.get('failed_count')} but {len(failed)} failures are recorded")
    return problems
