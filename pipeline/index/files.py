"""An index folder on disk: `index.faiss`, `rows.npz` (the id and content hash of each indexed row, in index order:
row i of the FAISS index is `ids[i]`) and `index_infos.json`.

Saving writes a fresh folder under a unique scratch name and swaps it into place, so a reader never sees a mixed
state and nothing else beside it is touched. Loading validates every file (they may come from someone else): the
infos' fields and types, the arrays (no pickles), the FAISS index's size and dimension. An index is tied to the store
it was built from (its `store_id`, path and cache key): used with another store it refuses, and used with its own it
first checks on a sample that its vectors are the store's features of the ids it lists (a permuted or swapped
`rows.npz` would otherwise return wrong neighbours silently).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline.errors import PipelineError
from pipeline.index.plan import EXACT_MAX_ROWS, INDEX_KINDS, KINDS
from pipeline.outputs import check_writable_dir
from pipeline.store.read import read_attrs, read_columns, read_features

INDEX_FILE, ROWS_FILE, INFOS_FILE = "index.faiss", "rows.npz", "index_infos.json"
CHECK_ROWS = 64  # index rows compared with the store on each use


@dataclass
class IndexInfos:
    """What `index_infos.json` holds."""

    kind: str
    factory: str
    reason: str
    rows: int
    dim: int
    memory_budget: int
    memory_estimate: int
    target_recall: float
    search_param: str | None
    search_value: int | None
    recall_at_10: float
    target_met: bool
    ms_per_query: float
    tuning: list[dict[str, Any]]
    tuning_queries: int
    seconds: dict[str, float]
    store: str  # absolute path of the store
    cache_key: str
    backbone: str
    weights: str
    splits: list[str] | None
    created: str
    faiss_version: str = faiss.__version__
    history: list[dict[str, Any]] = field(default_factory=list)
    store_id: str = ""  # the store's identity (kept across incremental runs, new on --overwrite)
    store_relative: str = ""  # the store relative to the index folder, for a data folder moved as a whole
    exact_max_rows: int = EXACT_MAX_ROWS  # the build's brute-force threshold, which updates re-tune with


_TYPES = {"kind": str, "factory": str, "reason": str, "rows": int, "dim": int, "memory_budget": int,
          "memory_estimate": int, "target_recall": (int, float), "recall_at_10": (int, float), "target_met": bool,
          "ms_per_query": (int, float), "tuning": list, "tuning_queries": int, "seconds": dict, "store": str,
          "cache_key": str, "backbone": str, "weights": str, "created": str, "faiss_version": str, "history": list,
          "store_id": str, "store_relative": str, "exact_max_rows": int}


@dataclass
class LoadedIndex:
    index: faiss.Index
    ids: np.ndarray
    hashes: np.ndarray
    infos: IndexInfos
    path: Path


def set_search_param(index: faiss.Index, kind: str, value: int) -> None:
    name = KINDS[kind].search_param if kind in KINDS else None
    if name:
        faiss.ParameterSpace().set_index_parameter(index, name, int(value))


def _broken(path: Path, what: str) -> PipelineError:
    return PipelineError(f"{path} is not a usable index folder ({what}); rebuild it with python -m pipeline index "
                         f"build --store STORE.h5 --out {path}")


def read_infos(path: Path) -> IndexInfos:
    """The infos of an index folder, every field checked."""
    try:
        raw = json.loads((path / INFOS_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _broken(path, f"{INFOS_FILE} is not readable JSON: {type(exc).__name__}") from None
    names = {f.name for f in fields(IndexInfos)}
    if not isinstance(raw, dict) or set(raw) - names:
        raise _broken(path, f"{INFOS_FILE} is not an index description")
    try:
        infos = IndexInfos(**raw)
    except TypeError as exc:
        raise _broken(path, f"{INFOS_FILE}: {exc}") from None
    for name, kind in _TYPES.items():
        value = getattr(infos, name)
        if not isinstance(value, kind) or (kind in (int, (int, float)) and isinstance(value, bool)):
            raise _broken(path, f"{INFOS_FILE}: {name} is {value!r}")
    if infos.kind not in INDEX_KINDS or infos.rows < 1 or infos.dim < 1:
        raise _broken(path, f"{INFOS_FILE}: kind {infos.kind!r}, {infos.rows} rows, dim {infos.dim}")
    if infos.search_value is not None and (not isinstance(infos.search_value, int) or infos.search_value < 1):
        raise _broken(path, f"{INFOS_FILE}: search_value is {infos.search_value!r}")
    return infos


def load_index(path: str | Path) -> LoadedIndex:
    """Load an index folder, with its search parameter applied; refuse a folder whose parts are broken or disagree."""
    path = Path(path)
    if not (path / INFOS_FILE).is_file():
        backups = sorted(path.parent.glob(f".{path.name}.old-*"))
        hint = f" (an interrupted update left {backups[0].name}: rename it to {path.name})" if backups else ""
        raise PipelineError(f"{path} is not an index folder{hint}; build one with: python -m pipeline index build "
                            f"--store STORE.h5 --out {path}")
    infos = read_infos(path)
    try:
        index = faiss.read_index(str(path / INDEX_FILE))
    except RuntimeError as exc:
        raise _broken(path, f"{INDEX_FILE} is not a FAISS index: {str(exc).splitlines()[0][:120]}") from None
    try:
        with np.load(path / ROWS_FILE, allow_pickle=False) as rows:
            ids, hashes = rows["ids"], rows["hashes"]
    except Exception as exc:  # noqa: BLE001 - corrupt zip, missing arrays, pickled arrays: all refused alike
        raise _broken(path, f"{ROWS_FILE} is not readable: {type(exc).__name__}") from None
    if ids.dtype.kind != "U" or hashes.dtype != np.dtype("S32") or ids.ndim != 1 or hashes.shape != ids.shape:
        raise _broken(path, f"{ROWS_FILE} holds {ids.dtype} ids and {hashes.dtype} hashes")
    if not index.ntotal == len(ids) == infos.rows or index.d != infos.dim:
        raise _broken(path, f"index has {index.ntotal} rows of dim {index.d}, {ROWS_FILE} {len(ids)}, infos "
                            f"{infos.rows} of dim {infos.dim}")
    if len(set(ids.tolist())) != len(ids):
        raise _broken(path, f"{ROWS_FILE} lists an id twice")
    set_search_param(index, infos.kind, infos.search_value or 0)
    return LoadedIndex(index, ids.astype(object), hashes, infos, path)


def store_record(store: Path, out: Path) -> dict[str, str]:
    """How an index records its store: absolute path, path relative to the index folder, identity."""
    store = store.resolve()
    attrs = read_attrs(store)
    return {"store": str(store), "store_relative": os.path.relpath(store, out.resolve()),
            "store_id": str(attrs.get("store_id", ""))}


def _same_store(infos: IndexInfos, store: Path, attrs: dict[str, Any], index_path: Path) -> bool:
    if attrs.get("cache_key") != infos.cache_key:
        return False
    if infos.store_id and attrs.get("store_id"):
        return attrs["store_id"] == infos.store_id
    recorded = [Path(infos.store), index_path / infos.store_relative] if infos.store_relative else [Path(infos.store)]
    return any(p.exists() and os.path.samefile(p, store) for p in recorded)


def store_of(loaded: LoadedIndex, store: str | Path | None = None) -> Path:
    """The store of an index: the one it recorded (found by its absolute path, or relative to the index folder when
    both moved together), or `store` when given, which must be that same store (identity and cache key)."""
    infos = loaded.infos
    if store is None:
        candidates = [Path(infos.store)] + ([loaded.path / infos.store_relative] if infos.store_relative else [])
        store = next((p for p in candidates if p.is_file()), None)
        if store is None:
            raise PipelineError(f"the store {infos.store} that {loaded.path} was built from is not there; pass "
                                "--store with its new place, or build a new index with index build")
    store = Path(store)
    attrs = read_attrs(store)
    if not _same_store(infos, store, attrs, loaded.path):
        raise PipelineError(f"{loaded.path} was built from the store {infos.store} (id {infos.store_id or '?'}, "
                            f"{infos.backbone}); {store} is another store (id {attrs.get('store_id', '?')}, "
                            f"{attrs.get('backbone')}): pass the index's own store, or build an index for this one "
                            "with index build")
    return store


def check_rows(loaded: LoadedIndex, store: Path, *, sample: int = CHECK_ROWS, seed: int = 0) -> None:
    """Check on a sample that index row i holds the store's features of `ids[i]`: each reconstructed vector must be
    closer to its own row than to the other sampled rows (ties allowed), for at least 90% of the sample."""
    columns = read_columns(store, "ids", "files/hash")
    number = {i: (n, h) for n, (i, h) in enumerate(zip(columns["ids"], columns["files/hash"], strict=True))}
    current = [k for k, (i, h) in enumerate(zip(loaded.ids, loaded.hashes, strict=True))
               if number.get(i, (None, b""))[1] == h]
    if len(current) < 2:
        return
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(current, size=min(sample, len(current)), replace=False))
    rows = np.array([number[loaded.ids[k]][0] for k in picked], dtype=np.int64)
    order = np.argsort(rows)
    stored = np.empty((len(rows), loaded.infos.dim), dtype=np.float32)
    stored[order] = read_features(store, rows[order])
    ivf = faiss.try_extract_index_ivf(loaded.index)
    if ivf is not None:
        ivf.make_direct_map()
    recon = np.stack([loaded.index.reconstruct(int(k)) for k in picked])
    sims = recon @ stored.T
    own = np.diag(sims)
    if np.mean(own >= sims.max(axis=1) - 1e-4) < 0.9:
        raise PipelineError(f"{loaded.path}: the index's vectors are not the store's features of the ids in "
                            f"{ROWS_FILE} (rows permuted or files from different builds); rebuild it with python -m "
                            "pipeline index build")


def check_index_out(out: Path, record: dict[str, str], *, overwrite: bool = False) -> None:
    """Before any work: `out` is missing, or an index folder of the same store (`record`: `store_record`), or of any
    store with `overwrite`; anything else (a file, another folder) is refused. Its folder must be writable."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink() or not (out / INFOS_FILE).is_file():
            raise PipelineError(f"{out} exists and is not an index folder; choose another --out")
        try:
            previous = read_infos(out)
        except PipelineError:
            previous = None
        same = previous is not None and (previous.store_id, previous.store) == (record["store_id"], record["store"])
        if not overwrite and not same:
            raise PipelineError(f"{out} holds an index of another store; choose another --out, or pass --overwrite "
                                "to replace it")
    check_writable_dir(out.parent, what="--out", path=out)


def save_index(out: Path, index: faiss.Index, ids: np.ndarray, hashes: np.ndarray, infos: IndexInfos, *,
               overwrite: bool = False) -> Path:
    """Write the three files into a fresh folder with a unique name beside `out` and swap it into place (see
    `check_index_out` for what may be at `out`)."""
    out = Path(out)
    check_index_out(out, {"store_id": infos.store_id, "store": infos.store}, overwrite=overwrite)
    token = secrets.token_hex(4)
    fresh, old = out.with_name(f".{out.name}.new-{token}"), out.with_name(f".{out.name}.old-{token}")
    fresh.mkdir()
    try:
        faiss.write_index(index, str(fresh / INDEX_FILE))
        np.savez(fresh / ROWS_FILE, ids=np.asarray(ids, dtype=str), hashes=np.asarray(hashes, dtype="S32"))
        (fresh / INFOS_FILE).write_text(json.dumps(asdict(infos), indent=2) + "\n")
        if out.exists():
            out.rename(old)
        fresh.rename(out)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out
