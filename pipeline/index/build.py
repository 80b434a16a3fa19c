"""FAISS indexes for a store: choose, build, tune, save, load, search, and add new rows.

Features are unit-norm, so inner product is cosine similarity. The index type follows the number of rows and a memory
budget (the way autofaiss does): exact `Flat` while brute force is cheap, then `HNSW`, `IVF-Flat`, and `IVF-PQ` when
even the raw vectors do not fit. Approximate indexes are tuned: their search parameter (efSearch or nprobe) is raised
until recall@10 against exact search, measured on a sample of the store's own rows, reaches the target. The choice,
parameters, recall and timings go to `index_infos.json` beside the index.

An index folder holds `index.faiss`, `rows.npz` (the id and content hash of each indexed row, in index order) and
`index_infos.json`. It is written as a new folder and swapped into place, so a reader never sees a mixed state.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline.errors import ConfigError, PipelineError
from pipeline.index.files import (
    IndexInfos,
    check_index_out,
    check_rows,
    load_index,
    save_index,
    set_search_param,
    store_of,
    store_record,
)
from pipeline.index.plan import (
    DEFAULT_MEMORY_BUDGET,
    EXACT_MAX_ROWS,
    REFINE_K_FACTOR,
    IndexPlan,
    index_kind,
    memory_estimate,
    plan_index,
    sizes_of,
)
from pipeline.plan import Provenance
from pipeline.sources.views import view_mask
from pipeline.store.columns import read_text
from pipeline.store.read import iter_store, read_attrs, read_columns

log = logging.getLogger(__name__)

TUNE_K = 10
MIN_GAIN = 0.005  # recall@10 that two doublings of the search parameter must add for tuning to go on


def build_flat_index(features: np.ndarray) -> faiss.IndexFlatIP:
    """Exact inner-product index over the rows of `features` (float32, [N, D])."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (similarities, row indices) for each query, best first."""
    if k > index.ntotal:
        raise PipelineError(f"k={k} is larger than the {index.ntotal} indexed rows; use a smaller --k")
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def on_cuda(device: object) -> bool:
    """Whether a search runs in torch on a CUDA device (FAISS otherwise)."""
    return str(device).startswith("cuda")


def flat_top_k(bank: np.ndarray, queries: np.ndarray, k: int, device: object = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (similarities, bank rows) by inner product: FAISS's flat index on CPU, torch on a CUDA device
    (`pipeline.index.torch_flat`, imported only then)."""
    if on_cuda(device):
        from pipeline.index.torch_flat import torch_top_k

        return torch_top_k(bank, queries, k, device)
    return search(build_flat_index(bank), queries, k)


def exact_search_name(device: object = "cpu") -> str:
    """How the exact kNN search ran, for the results' protocol line."""
    return f"exact inner-product (cosine) kNN, torch float32 on {device}" if on_cuda(device) \
        else "exact FAISS inner-product (cosine) kNN"


# -- building and tuning --------------------------------------------------------------------------------------------

def _blocks(store: Path, rows: np.ndarray | None, block_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(store row numbers, features) in blocks, optionally only the rows in `rows` (sorted store row numbers)."""
    for block in iter_store(store, rows=block_rows):
        numbers = block.rows
        if rows is not None and len(numbers):
            lo, hi = np.searchsorted(rows, [numbers[0], numbers[-1] + 1])  # both sorted: no set lookups
            wanted = rows[lo:hi]
            at = np.minimum(np.searchsorted(numbers, wanted), len(numbers) - 1)
            keep = np.zeros(len(numbers), dtype=bool)
            keep[at[numbers[at] == wanted]] = True
            numbers, block.features = numbers[keep], block.features[keep]
        if len(numbers):
            yield numbers, block.features


def _gather(store: Path, rows: np.ndarray, d: int, block_rows: int) -> np.ndarray:
    """Features of some store rows (sorted row numbers), read block by block."""
    out = np.empty((len(rows), d), dtype=np.float32)
    at = 0
    for numbers, feats in _blocks(store, rows, block_rows):
        out[at:at + len(numbers)] = feats
        at += len(numbers)
    return out


def exact_topk(store: Path, rows: np.ndarray | None, queries: np.ndarray, k: int,
               block_rows: int = 65536) -> np.ndarray:
    """Exact top-k store row numbers (among `rows`, or all) for each query, streaming the store."""
    return exact_search(store, rows, queries, k, block_rows)[1]


def exact_search(store: Path, rows: np.ndarray | None, queries: np.ndarray, k: int,
                 block_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (similarities, store row numbers) among `rows` (or all) for each query, streaming the store: an
    exact FAISS search per block, merged into the running top-k (ties to the earlier row). Memory: one block."""
    best_sims = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), 0), dtype=np.int64)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    for numbers, feats in _blocks(store, rows, block_rows):
        index = faiss.IndexFlatIP(feats.shape[1])
        index.add(np.ascontiguousarray(feats))
        s, i = index.search(q, min(k, len(numbers)))
        sims = np.concatenate([best_sims, s], axis=1)
        found = np.concatenate([best_rows, numbers[np.maximum(i, 0)]], axis=1)
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        best_sims, best_rows = np.take_along_axis(sims, order, axis=1), np.take_along_axis(found, order, axis=1)
    return best_sims, best_rows


def recall_at_k(approx: np.ndarray, exact: np.ndarray, query_rows: np.ndarray, k: int = TUNE_K) -> float:
    """Mean share of the exact k nearest found among the approximate k nearest, each query's own row left out of
    both (the queries are indexed rows, and finding oneself says nothing)."""
    shares = []
    for a, e, q in zip(approx, exact, query_rows, strict=True):
        a, e = [r for r in a if r != q][:k], [r for r in e if r != q][:k]
        shares.append(len(set(a) & set(e)) / len(e) if e else 1.0)  # one row: nothing else to find
    return float(np.mean(shares))


def tune_index(index: faiss.Index, kind: str, nlist: int, queries: np.ndarray, query_rows: np.ndarray,
               exact: np.ndarray, row_of: np.ndarray, *, target: float, exact_ms: float | None = None,
               exact_max_rows: int = EXACT_MAX_ROWS) -> dict[str, Any]:
    """Raise the search parameter until recall@10 against exact search reaches `target`, stops improving (less than
    `MIN_GAIN` over two doublings) or a query costs more than exact search did (`exact_ms`, ms per query; heeded only
    past `exact_max_rows` indexed rows, below which brute force is the plan's own choice): returns the chosen value,
    its recall and query time, and every setting tried. `row_of` maps index positions to store row numbers; `exact`
    holds store row numbers."""
    k = min(TUNE_K + 1, index.ntotal)  # one more: the query's own row is left out
    if index.ntotal <= exact_max_rows:
        exact_ms = None

    def measure(value: int | None) -> dict[str, Any]:
        if value is not None:
            set_search_param(index, kind, value)
        start = time.perf_counter()
        _, idx = index.search(queries, k)
        ms = 1000 * (time.perf_counter() - start) / len(queries)
        found = np.where(idx >= 0, row_of[np.maximum(idx, 0)], -1)
        return {"value": value, "recall_at_10": round(recall_at_k(found, exact, query_rows), 4),
                "ms_per_query": round(ms, 4)}

    name = index_kind(kind).search_param
    if name is None:
        return {"param": None, **measure(None), "tried": []}
    tried, chosen, why = [], None, ""
    for value in index_kind(kind).search_values(nlist):
        tried.append(measure(value))
        if tried[-1]["recall_at_10"] >= target:
            chosen = tried[-1]
            break
        if len(tried) >= 3 and tried[-1]["recall_at_10"] < tried[-3]["recall_at_10"] + MIN_GAIN:
            why = "recall stopped improving (the codes cap it)"
            break
        if exact_ms is not None and len(tried) >= 2 and tried[-1]["ms_per_query"] > exact_ms:
            why = f"a query cost more than exact search ({exact_ms:.3g} ms)"
            break
    if chosen is None:
        usable = [e for e in tried if exact_ms is None or e["ms_per_query"] <= exact_ms] or tried[:1]
        chosen = max(usable, key=lambda e: (e["recall_at_10"], -e["value"]))
        log.warning("%s reaches recall@10 %.3f at best, below the target %.2f (%s); raise --memory-budget or use "
                    "--type ivf-flat/hnsw for higher recall", kind, chosen["recall_at_10"], target, why or "all tried")
    set_search_param(index, kind, chosen["value"])
    return {"param": name, **chosen, "tried": tried}


def new_index(plan: IndexPlan, d: int) -> faiss.Index:
    """An empty index of the plan (inner product); a refine stage re-ranks `REFINE_K_FACTOR` times k candidates."""
    index = faiss.index_factory(d, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if "Refine" in plan.factory:
        faiss.downcast_index(index).k_factor = REFINE_K_FACTOR
    return index


def training_size(plan: IndexPlan, n: int) -> int:
    """Rows an index is trained on: a sample of 64 per IVF list (and per PQ centroid), not the whole store."""
    return min(n, max(plan.nlist * 64, 256 * 64 if plan.pq_m else 0, 1))


def _select_rows(store: Path, splits: tuple[str, ...] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(store row numbers, ids, content hashes) of the rows to index: all, or those of `splits`."""
    ids = read_text(store, "ids")  # fixed-width text, not a Python object per row
    numbers = np.flatnonzero(~view_mask(ids, read_attrs(store)))  # augmented views are not indexed
    if splits is not None:
        numbers = numbers[np.isin(read_text(store, "splits")[numbers], list(splits))]
        if not len(numbers):
            raise PipelineError(f"{store} has no rows in the splits {list(splits)}")
    return numbers, ids[numbers], read_columns(store, "files/hash")["files/hash"][numbers]


def _measure(index: faiss.Index, plan: IndexPlan, store: Path, row_of: np.ndarray, d: int, *, queries: int,
             target: float, seed: int, block_rows: int, exact_max_rows: int = EXACT_MAX_ROWS) -> dict[str, Any]:
    """Tune on a seeded sample of the indexed rows as queries, against exact search over the same rows."""
    rng = np.random.default_rng(seed)
    rows = np.sort(row_of)
    sample = np.sort(rng.choice(rows, size=min(queries, len(rows)), replace=False))
    q = _gather(store, sample, d, block_rows)
    start = time.perf_counter()
    exact = exact_topk(store, rows, q, min(TUNE_K + 1, len(rows)), block_rows)
    exact_ms = 1000 * (time.perf_counter() - start) / len(q)
    return {**tune_index(index, plan.kind, plan.nlist, q, sample, exact, row_of, target=target, exact_ms=exact_ms,
                         exact_max_rows=exact_max_rows), "queries": len(sample)}


def build_index(store: str | Path, out: str | Path, *, kind: str = "auto", memory_budget: int = DEFAULT_MEMORY_BUDGET,
                target_recall: float = 0.95, splits: tuple[str, ...] | None = None, queries: int = 1000,
                exact_max_rows: int = EXACT_MAX_ROWS, seed: int = 0, block_rows: int = 65536,
                history: list[dict[str, Any]] | None = None, overwrite: bool = False,
                max_memory: int | None = None) -> IndexInfos:
    """Build, tune and save an index over a store's rows (all of them, or those of `splits`) into folder `out`,
    streaming the store (trained on a sample, filled block by block; `max_memory` sizes the blocks). An existing
    index folder of another store is replaced only with `overwrite`."""
    store, out = Path(store), Path(out)
    if max_memory is not None:
        from pipeline.store.budget import block_rows as budget_rows

        block_rows = budget_rows(max_memory, Provenance.from_store(store).feature_dim)
    if not 0 < target_recall <= 1:
        raise ConfigError(f"the target recall must be in (0, 1], got {target_recall}")
    if queries < 1:
        raise ConfigError(f"--queries must be >= 1 (rows sampled to measure recall), got {queries}")
    made = Provenance.from_store(store)
    record = store_record(store, out)
    check_index_out(out, record, overwrite=overwrite)
    numbers, ids, hashes = _select_rows(store, splits)
    d = made.feature_dim
    plan = plan_index(len(numbers), d, kind=kind, memory_budget=memory_budget, exact_max_rows=exact_max_rows)
    log.info("index %s: %s (%s)", store, plan.factory, plan.reason)
    seconds: dict[str, float] = {}
    index = new_index(plan, d)
    start = time.perf_counter()
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        size = training_size(plan, len(numbers))
        index.train(_gather(store, np.sort(rng.choice(numbers, size=size, replace=False)), d, block_rows))
    seconds["train"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    for _, feats in _blocks(store, numbers, block_rows):
        index.add(feats)
    seconds["add"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    # rows were added in store order: position i is numbers[i]
    tuning = _measure(index, plan, store, numbers, d, queries=queries, target=target_recall, seed=seed,
                      block_rows=block_rows, exact_max_rows=exact_max_rows)
    seconds["tune"] = round(time.perf_counter() - start, 3)
    infos = IndexInfos(
        kind=plan.kind, factory=plan.factory, reason=plan.reason, rows=int(index.ntotal), dim=d,
        memory_budget=int(memory_budget), memory_estimate=plan.memory_bytes, target_recall=target_recall,
        search_param=tuning["param"], search_value=tuning["value"], recall_at_10=tuning["recall_at_10"],
        target_met=tuning["recall_at_10"] >= target_recall, ms_per_query=tuning["ms_per_query"],
        tuning=tuning["tried"], tuning_queries=tuning["queries"], seconds=seconds, cache_key=made.cache_key,
        backbone=made.backbone, weights=made.weights, splits=list(splits) if splits else None,
        created=_now(), history=list(history or []), exact_max_rows=int(exact_max_rows), **record)
    save_index(out, index, ids, hashes, infos, overwrite=overwrite)
    return infos


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def update_index(path: str | Path, *, store: str | Path | None = None, queries: int = 1000, seed: int = 0,
                 block_rows: int = 65536) -> IndexInfos:
    """Bring an index up to date with its store: add the rows it lacks, then re-tune and re-measure recall.

    When rows it holds were removed or changed in the store, the index is rebuilt instead (an index cannot update
    rows in place), with the same type and budget.
    """
    loaded = load_index(path)
    infos = loaded.infos
    store = store_of(loaded, store)
    check_rows(loaded, store)
    infos.store_relative = store_record(store, Path(path))["store_relative"]
    splits = tuple(infos.splits) if infos.splits else None
    numbers, ids, hashes = _select_rows(store, splits)
    current = dict(zip(ids, hashes, strict=True))
    stale = [i for i, h in zip(loaded.ids, loaded.hashes, strict=True) if current.get(i) != h]
    if stale:
        log.info("%d indexed row(s) changed or left the store (e.g. %s): rebuilding", len(stale), stale[0])
        history = [*infos.history, {"at": _now(), "action": "rebuilt",
                                    "reason": f"{len(stale)} indexed rows changed or removed"}]
        return build_index(store, path, kind=infos.kind, memory_budget=infos.memory_budget,
                           target_recall=infos.target_recall, splits=splits, queries=queries, seed=seed,
                           exact_max_rows=infos.exact_max_rows, block_rows=block_rows, history=history)
    indexed = set(loaded.ids)
    new = np.array([n for n, i in zip(numbers, ids, strict=True) if i not in indexed], dtype=np.int64)
    if not len(new):
        log.info("%s is up to date with %s (%d rows)", path, store, infos.rows)
        return infos
    plan = IndexPlan(infos.kind, infos.factory, infos.memory_estimate, infos.reason, **sizes_of(infos.factory))
    start = time.perf_counter()
    for _, feats in _blocks(store, new, block_rows):
        loaded.index.add(feats)
    added = round(time.perf_counter() - start, 3)
    number_of = dict(zip(ids, numbers, strict=True))
    row_of = np.concatenate([np.array([number_of[i] for i in loaded.ids], dtype=np.int64), new])
    tuning = _measure(loaded.index, plan, store, row_of, infos.dim, queries=queries,
                      target=infos.target_recall, seed=seed, block_rows=block_rows,
                      exact_max_rows=infos.exact_max_rows)
    is_new = np.isin(numbers, new)
    new_ids, new_hashes = np.concatenate([loaded.ids, ids[is_new]]), np.concatenate([loaded.hashes, hashes[is_new]])
    infos.history.append({"at": _now(), "action": "added", "rows": int(len(new)), "seconds": added})
    infos.rows = int(loaded.index.ntotal)
    infos.memory_estimate = memory_estimate(infos.kind, infos.rows, infos.dim, nlist=plan.nlist, pq_m=plan.pq_m)
    infos.search_value, infos.recall_at_10 = tuning["value"], tuning["recall_at_10"]
    infos.target_met = tuning["recall_at_10"] >= infos.target_recall
    infos.ms_per_query, infos.tuning, infos.tuning_queries = tuning["ms_per_query"], tuning["tried"], tuning["queries"]
    auto = plan_index(infos.rows, infos.dim, memory_budget=infos.memory_budget, exact_max_rows=infos.exact_max_rows)
    if infos.reason != "asked for" and auto.kind != infos.kind:
        log.warning("with %d rows the automatic choice is now %s, not %s; rebuild with index build to switch",
                    infos.rows, auto.kind, infos.kind)
    save_index(Path(path), loaded.index, new_ids, new_hashes, infos)
    return infos



def refresh_index(store: str | Path, out: str | Path, *, kind: str = "auto",
                  memory_budget: int = DEFAULT_MEMORY_BUDGET, target_recall: float = 0.95) -> IndexInfos:
    """The index folder `out` brought up to date with `store`: new rows added when it is an index of that store,
    otherwise built afresh (the first time, or when the store was replaced); for output folders a run owns."""
    try:
        current = store_of(load_index(out), store) is not None
    except PipelineError:
        current = False
    if current:
        return update_index(out, store=store)
    return build_index(store, out, kind=kind, memory_budget=memory_budget, target_recall=target_recall,
                       overwrite=True)
