"""kNN classification and retrieval on a store larger than the memory budget: exact and blockwise, or approximate.

Exact: the queries are read a block at a time; each block is searched against the bank one chunk at a time (an exact
FAISS flat index per chunk) and the running top-k merged, ties to the lower bank row as one search over the whole
bank gives them; each block is reduced at once to what the figures need (each vote's prediction and top-5 hit, the
retrieval figures per query), so memory holds two blocks and a few numbers per query, whatever the store's size.
The figures are the in-memory `knn_classify`'s, computed the same way (the same protocol, vote, order and intervals).

Approximate (`--index DIR`, or `--approx` to build one): the bank is searched through a tuned FAISS index, and the
results record the gap to exact kNN on a seeded sample of the queries, measured in the same run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline.errors import PipelineError
from pipeline.evaluation.intervals import pack_correct_arrays
from pipeline.evaluation.knn import knn_protocol, vote_scores
from pipeline.evaluation.metrics import (
    prediction_metrics,
    ranked_top5_hits,
    retrieval_per_query,
    summarise_retrieval,
    top5_hits,
)
from pipeline.index.build import exact_search_name, flat_top_k
from pipeline.index.plan import REFINE_K_FACTOR
from pipeline.store.budget import block_rows as budget_rows
from pipeline.store.columns import StreamedSet

GAP_QUERIES = 2000  # queries the approximate mode also searches exactly, to measure its gap
VOTES = ("majority", "weighted")

Searcher = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]  # (query features, positions)


def exact_searcher(ss: StreamedSet, bank: np.ndarray, depth: int, *, chunk_rows: int,
                   leave_one_out: bool, device: str = "cpu") -> Searcher:
    """Exact top-`depth` (similarities, bank indices) for a block of queries, the bank streamed in chunks (each
    searched by FAISS on CPU, by torch on CUDA); with `leave_one_out`, each query's own row is left out by index."""
    bank_positions = np.flatnonzero(bank)

    def run(queries: np.ndarray, query_positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        want = depth + (1 if leave_one_out else 0)
        best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
        best_i = np.zeros((len(queries), 0), dtype=np.int64)
        for positions, feats in ss.blocks(bank, block_rows=chunk_rows):
            s, i = flat_top_k(feats, queries, min(want, len(positions)), device)
            i = np.where(i >= 0, np.searchsorted(bank_positions, positions)[np.maximum(i, 0)], -1)
            sims, idx = np.concatenate([best_s, s], axis=1), np.concatenate([best_i, i], axis=1)
            order = np.argsort(-sims, axis=1, kind="stable")[:, :want]
            best_s, best_i = np.take_along_axis(sims, order, axis=1), np.take_along_axis(idx, order, axis=1)
        if leave_one_out:
            return _without_self(best_s, best_i, np.searchsorted(bank_positions, query_positions), depth)
        return best_s, best_i

    return run


def index_searcher(index: faiss.Index, depth: int, bank_positions: np.ndarray, *, leave_one_out: bool,
                   max_memory: int) -> Searcher:
    """Top-`depth` through a FAISS index whose position j is bank row j, the queries searched a few at a time: FAISS
    holds each query's coarse assignment (nprobe lists) and refine candidates at once, 9 GB for 200k queries at
    nprobe 4096, so a batch holds what `max_memory` allows."""
    want = depth + (1 if leave_one_out else 0)
    ivf = faiss.try_extract_index_ivf(index)
    width = want * (1 + REFINE_K_FACTOR) + (ivf.nprobe if ivf is not None else 0)  # ids and scores per query
    batch = max(1, max_memory // (2 * 12 * width))

    def run(queries: np.ndarray, query_positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        parts = [index.search(np.ascontiguousarray(queries[i:i + batch]), want) for i in range(0, len(queries), batch)]
        s = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, want), np.float32)
        i = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, want), np.int64)
        if leave_one_out:
            return _without_self(s, i, np.searchsorted(bank_positions, query_positions), depth)
        return s, i

    return run


def _without_self(sims: np.ndarray, idx: np.ndarray, own: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    not_self = idx != own[:, None]
    order = np.argsort(~not_self, axis=1, kind="stable")[:, :depth]
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(idx, order, axis=1)


class Collected:
    """What the figures need, gathered block by block: per query, each (k, vote)'s prediction and top-5 hit and the
    retrieval figures; and the neighbours of the example queries."""

    def __init__(self, ss: StreamedSet, ks: list[int], retrieval_ks: tuple[int, ...], temperature: float) -> None:
        self.ss, self.ks, self.retrieval_ks, self.temperature = ss, ks, retrieval_ks, temperature
        self.positions: list[np.ndarray] = []
        self.pred: dict[tuple[int, str], list[np.ndarray]] = {(k, v): [] for k in ks for v in VOTES}
        self.hit5: dict[tuple[int, str], list[np.ndarray]] = {(k, v): [] for k in ks for v in VOTES}
        self.ranked5: dict[tuple[int, str], list[np.ndarray]] = {(k, v): [] for k in ks for v in VOTES}
        self.retrieval: dict[str, dict[str, list[np.ndarray]]] = {}
        self.retrieval_positions: list[np.ndarray] = []  # the queries with a possible hit, whose figures count
        self.examples: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def add(self, positions: np.ndarray, sims: np.ndarray, idx: np.ndarray, bank_labels: np.ndarray,
            relevant_by_class: np.ndarray, wanted_examples: set[int]) -> None:
        if (idx < 0).any():
            raise PipelineError(f"the search found fewer neighbours than asked for {int((idx < 0).any(axis=1).sum())} "
                                "queries; run python -m pipeline store verify on the store")
        n_classes = len(self.ss.class_names)
        y = self.ss.labels[positions].astype(np.int64)
        labels = bank_labels[idx]
        self.positions.append(positions)
        classes = np.arange(n_classes)
        for k in self.ks:
            for vote, scores in vote_scores(labels[:, :k], sims[:, :k], n_classes=n_classes,
                                            temperature=self.temperature).items():
                self.pred[(k, vote)].append(np.argmax(scores, axis=1).astype(np.int32))
                self.hit5[(k, vote)].append(top5_hits(y, scores, classes))
                self.ranked5[(k, vote)].append(ranked_top5_hits(y, scores))
        self.retrieval_positions.append(positions[relevant_by_class[y] > 0])
        for k, figures in retrieval_per_query(labels, y, relevant_by_class[y], ks=self.retrieval_ks).items():
            for name, values in figures.items():
                self.retrieval.setdefault(k, {}).setdefault(name, []).append(values)
        for j in np.flatnonzero(np.isin(positions, list(wanted_examples))):
            self.examples[int(positions[j])] = (idx[j, :6], sims[j, :6])


def _query_groups(ss: StreamedSet, queries: np.ndarray, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The queries in groups of about `rows` (read in store order, gathered across blocks): each group is one pass
    over the bank, so sparse queries (a sample, a small test split) cost one pass per `rows` queries, not per block."""
    held_p: list[np.ndarray] = []
    held_x: list[np.ndarray] = []
    count = 0
    for positions, feats in ss.blocks(queries, block_rows=rows):
        held_p.append(positions)
        held_x.append(feats)
        count += len(positions)
        if count >= rows:
            yield np.concatenate(held_p), np.concatenate(held_x)
            held_p, held_x, count = [], [], 0
    if count:
        yield np.concatenate(held_p), np.concatenate(held_x)


def _example_positions(ss: StreamedSet, queries: np.ndarray, n: int = 8) -> list[int]:
    """The first query of each class in store order, up to n (as the in-memory kNN picks them)."""
    positions = np.flatnonzero(queries)
    _, first = np.unique(ss.labels[positions], return_index=True)
    return [int(positions[i]) for i in first[:n]]


def knn_streamed(ss: StreamedSet, *, ks: tuple[int, ...], temperature: float = 0.07, loo: bool = False,
                 loo_split: str | None = None, retrieval_ks: tuple[int, ...] = (1, 5, 10), resamples: int = 1000,
                 max_memory: int, searcher: Searcher | None = None, what: str = "",
                 sample: int = 0, device: str = "cpu") -> dict[str, Any]:
    """The figures of `knn_classify` for a `StreamedSet`, within `max_memory` bytes of feature data, the exact
    search on `device`; `searcher` replaces the exact blockwise search (the approximate mode); `sample` scores only
    a seeded sample of that many queries (to measure the approximate mode's gap)."""
    if not ks or any(k < 1 for k in ks):
        raise PipelineError(f"--k must be positive integers, got {list(ks)}")
    plan = knn_protocol(ss, loo=loo, loo_split=loo_split)
    bank, queries = plan["bank"], plan["queries"]
    if sample:
        queries = sample_of(queries, sample)
    leave_one_out = plan["mode"].startswith("leave-one-out")
    n_bank = int(bank.sum()) - (1 if leave_one_out else 0)
    if max(ks) > n_bank:
        raise PipelineError(f"k={max(ks)} is larger than the {n_bank} rows searched; use smaller --k values")
    depth = max(max(ks), min(max(retrieval_ks, default=1), n_bank))
    rows = budget_rows(max_memory, ss.dim, parts=6)
    start = time.perf_counter()
    search = searcher or exact_searcher(ss, bank, depth, chunk_rows=rows, leave_one_out=leave_one_out,
                                        device=device)
    bank_labels = ss.labels[bank]
    relevant = np.bincount(bank_labels, minlength=len(ss.class_names)) - (1 if leave_one_out else 0)
    got = Collected(ss, sorted(set(ks)), retrieval_ks, temperature)
    examples = _example_positions(ss, queries)
    for positions, feats in _query_groups(ss, queries, rows):
        sims, idx = search(feats, positions)
        got.add(positions, sims[:, :depth], idx[:, :depth], bank_labels, relevant, set(examples))
    result = _figures(ss, got, queries, resamples=resamples)
    bank_positions = np.flatnonzero(bank)
    result.update({
        "protocol": f"{what or exact_search_name(device) + ', streamed in blocks of ' + str(rows) + ' rows'}"
                    f"; {plan['mode']}",
        "mode": plan["mode"], "temperature": temperature, "ks": sorted(set(ks)), "n_bank": int(bank.sum()),
        "n_queries": int(queries.sum()), "seconds": round(time.perf_counter() - start, 3),
        **({"sampled_queries": f"a seeded sample of {int(queries.sum())} of the queries"} if sample else {}),
        "streamed": {"block_rows": rows, "max_memory": int(max_memory)},
        "examples": _examples(ss, examples, got.examples, bank_positions)})
    return result


def _figures(ss: StreamedSet, got: Collected, queries: np.ndarray, *, resamples: int) -> dict[str, Any]:
    """The gathered per-query values put in the canonical query order (content hash, then row), then summed up."""
    positions = np.concatenate(got.positions) if got.positions else np.zeros(0, np.int64)
    canonical = ss.ordered(queries)
    order = _canonical_order_of(positions, canonical)
    y = ss.labels[canonical].astype(np.int64)
    classes = np.arange(len(ss.class_names))
    keys, ids = ss.row_keys_of(canonical)
    by_k: dict[str, dict[str, Any]] = {}
    for (k, vote), parts in got.pred.items():
        pred = np.concatenate(parts)[order].astype(np.int64)
        hit5 = np.concatenate(got.hit5[(k, vote)])[order]
        ranked = np.concatenate(got.ranked5[(k, vote)])
        top5 = float(np.mean(ranked)) if len(classes) > 5 else None
        m = prediction_metrics(y, pred, classes, ss.class_names, top5=top5, hits5=hit5 if top5 is not None else None,
                               resamples=resamples)
        if k < 5:  # as the in-memory kNN: fewer than 5 neighbours cannot rank 5 classes
            m["top5"] = None
            m.get("intervals", {}).pop("top5", None)
        m["correct"] = pack_correct_arrays(pred == y, keys, ids)
        by_k.setdefault(str(k), {})[vote] = m
    kept = np.concatenate(got.retrieval_positions) if got.retrieval_positions else np.zeros(0, np.int64)
    kept_order = _canonical_order_of(kept, canonical)
    retrieval = {k: {name: np.concatenate(v)[kept_order] for name, v in figures.items()}
                 for k, figures in got.retrieval.items()}
    return {"by_k": by_k, "retrieval": summarise_retrieval(retrieval, resamples=resamples)}


def _canonical_order_of(positions: np.ndarray, canonical: np.ndarray) -> np.ndarray:
    """Indices into `positions` that list them in the order they have in `canonical` (a superset)."""
    rank = np.empty(int(canonical.max()) + 1 if len(canonical) else 0, dtype=np.int64)
    rank[canonical] = np.arange(len(canonical))
    return np.argsort(rank[positions], kind="stable")


def _examples(ss: StreamedSet, picked: list[int], found: dict[int, tuple[np.ndarray, np.ndarray]],
              bank_positions: np.ndarray) -> list[dict[str, Any]]:
    wanted = [p for p in picked if p in found]
    hit_positions = [bank_positions[j] for p in wanted for j in found[p][0]]
    ids = dict(zip([*wanted, *hit_positions], ss.ids_of(np.array([*wanted, *hit_positions], dtype=np.int64)),
                   strict=True)) if wanted else {}
    return [{"id": ids[p], "label": int(ss.labels[p]),
             "hits": [{"id": ids[bank_positions[j]], "label": int(ss.labels[bank_positions[j]]), "score": float(s)}
                      for j, s in zip(*found[p], strict=True)]} for p in wanted]


def approximate_gap(approx: dict[str, Any], exact: dict[str, Any]) -> dict[str, Any]:
    """Top-1 of each (k, vote) on the same sample of queries, approximate and exact, and the difference in points."""
    return {f"{k}/{vote}": {"exact_top1": m["top1"], "approx_top1": approx["by_k"][k][vote]["top1"],
                            "gap_points": round(100 * (m["top1"] - approx["by_k"][k][vote]["top1"]), 3)}
            for k, votes in exact["by_k"].items() for vote, m in votes.items()}


def sample_of(queries: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """A seeded sample of `n` of the queries (a mask)."""
    positions = np.flatnonzero(queries)
    out = np.zeros_like(queries)
    out[np.random.default_rng(seed).choice(positions, size=min(n, len(positions)), replace=False)] = True
    return out


def _depth(n_bank: int, ks: tuple[int, ...], retrieval_ks: tuple[int, ...]) -> int:
    return max(max(ks), min(max(retrieval_ks, default=1), n_bank))


def bank_index(ss: StreamedSet, bank: np.ndarray, *, memory_budget: int, max_memory: int, target: float = 0.95,
               seed: int = 0) -> tuple[faiss.Index, dict[str, Any]]:
    """A tuned FAISS index over the bank rows (position j is bank row j), built from the streamed store: the
    type chosen by `pipeline.index.plan` for `memory_budget`, trained on a seeded sample, filled block by block,
    its search parameter raised until recall@10 on a sample of bank rows reaches `target`."""
    from pipeline.index.build import TUNE_K, new_index, training_size, tune_index
    from pipeline.index.plan import plan_index

    positions = np.flatnonzero(bank)
    plan = plan_index(len(positions), ss.dim, memory_budget=memory_budget)
    index = new_index(plan, ss.dim)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    if not index.is_trained:
        index.train(ss.features_of(rng.choice(positions, size=training_size(plan, len(positions)), replace=False)))
    for _, feats in ss.blocks(bank, block_rows=budget_rows(max_memory, ss.dim, parts=4)):
        index.add(feats)
    built = time.perf_counter() - start
    sample = np.sort(rng.choice(len(positions), size=min(1000, len(positions)), replace=False))
    queries = ss.features_of(positions[sample])
    exact = exact_searcher(ss, bank, min(TUNE_K + 1, len(positions)),
                           chunk_rows=budget_rows(max_memory, ss.dim, parts=6), leave_one_out=False)
    start = time.perf_counter()
    _, exact_idx = exact(queries, positions[sample])
    exact_ms = 1000 * (time.perf_counter() - start) / len(sample)
    tuning = tune_index(index, plan.kind, plan.nlist, queries, sample, exact_idx, np.arange(len(positions)),
                        target=target, exact_ms=exact_ms)
    return index, {"kind": plan.kind, "factory": plan.factory, "reason": plan.reason,
                   "memory_budget": int(memory_budget), "search_param": tuning["param"],
                   "search_value": tuning["value"], "recall_at_10": tuning["recall_at_10"],
                   "build_seconds": round(built, 3)}


def loaded_bank_index(ss: StreamedSet, bank: np.ndarray, folder: Path) -> tuple[faiss.Index, dict[str, Any]]:
    """An index folder whose rows are exactly the bank rows, in store order (`index build --splits ...` over the
    searched splits); anything else is refused, since its positions would name other rows."""
    from pipeline.index.files import load_index, store_of
    from pipeline.store.columns import read_column

    loaded = load_index(folder)
    store_of(loaded, ss.path)
    positions = np.flatnonzero(bank)
    hashes = read_column(ss, "files/hash", positions)
    if len(loaded.hashes) != len(positions) or not np.array_equal(loaded.hashes, hashes):
        raise PipelineError(f"the index {folder} holds {len(loaded.hashes)} rows, not the {len(positions)} labelled "
                            "rows kNN searches; build one over them: python -m pipeline index build --store STORE "
                            "--splits train,val --out DIR (or use --approx)")
    infos = loaded.infos
    return loaded.index, {"index": str(Path(folder).resolve()), "kind": infos.kind, "factory": infos.factory,
                          "search_param": infos.search_param, "search_value": infos.search_value,
                          "recall_at_10": infos.recall_at_10}


def run_streamed(ss: StreamedSet, config: Any, budget: int, device: str = "cpu") -> dict[str, Any]:
    """The kNN of `run_knn` for a streamed store: exact blockwise, or through an index (`config.index`, or one
    built with `config.approx`) with the measured gap to exact search on `GAP_QUERIES` sampled queries."""
    common = {"ks": config.ks, "temperature": config.temperature, "loo": config.loo, "loo_split": config.loo_split,
              "retrieval_ks": config.retrieval_ks, "max_memory": budget, "device": device}
    if config.index is None and not config.approx:
        return knn_streamed(ss, resamples=config.resamples, sample=config.queries, **common)
    plan = knn_protocol(ss, loo=config.loo, loo_split=config.loo_split)
    bank = plan["bank"]
    leave_one_out = plan["mode"].startswith("leave-one-out")
    depth = _depth(int(bank.sum()) - (1 if leave_one_out else 0), config.ks, config.retrieval_ks)
    if config.index is not None:
        index, about = loaded_bank_index(ss, bank, Path(config.index))
    else:
        index, about = bank_index(ss, bank, memory_budget=config.memory_budget, max_memory=budget)
    searcher = index_searcher(index, depth, np.flatnonzero(bank), leave_one_out=leave_one_out,
                              max_memory=budget)
    what = f"approximate kNN through a tuned FAISS {about['factory']} index ({about['search_param']}=" \
           f"{about['search_value']}, recall@10 {about['recall_at_10']:.3f})"
    result = knn_streamed(ss, resamples=config.resamples, searcher=searcher, what=what, sample=config.queries,
                          **common)
    start = time.perf_counter()
    exact = knn_streamed(ss, resamples=0, sample=GAP_QUERIES, **common)
    exact_seconds = time.perf_counter() - start
    approx = knn_streamed(ss, resamples=0, sample=GAP_QUERIES, searcher=searcher, **common)
    result["approximate"] = {**about, "gap_queries": exact["n_queries"], "exact_seconds_on_sample":
                             round(exact_seconds, 3), "gap": approximate_gap(approx, exact)}
    return result
