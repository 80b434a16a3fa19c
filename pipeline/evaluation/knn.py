"""kNN classification and label-based retrieval on cached features, with exact FAISS search.

Features are unit-norm, so inner product is cosine similarity. Queries are the test split searched against
train+val; without a test split (or when asked), each row of one split is a query against the rest of that split
(leave-one-out). Two votes per k: majority (ties go to the class met first, i.e. nearest) and DINOv2's
temperature-weighted vote (each neighbour weighs exp(similarity / T)).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import KnnConfig
from pipeline.errors import PipelineError
from pipeline.evaluation.intervals import DEFAULT_RESAMPLES
from pipeline.evaluation.metrics import classification_metrics, predicted, retrieval_metrics
from pipeline.index.build import exact_search_name, flat_top_k
from pipeline.outputs import check_output, owned_json, results_stem
from pipeline.sources.hints import how_to
from pipeline.store.read import FeatureSet, load_store


def vote_scores(neighbour_labels: np.ndarray, neighbour_sims: np.ndarray, *, n_classes: int,
                temperature: float) -> dict[str, np.ndarray]:
    """Per-class scores [Q, C] for the majority and temperature-weighted votes over the given neighbours.

    Majority scores are vote counts plus a tie-breaker below one that favours the class whose first neighbour is
    nearest; weighted scores sum exp(sim / T), shifted by the best similarity for numerical range (argmax unchanged).
    """
    q, k = neighbour_labels.shape
    rows = np.repeat(np.arange(q), k)
    cols = neighbour_labels.reshape(-1)
    counts = np.zeros((q, n_classes))
    np.add.at(counts, (rows, cols), 1.0)
    first = np.full((q, n_classes), k, dtype=np.float64)
    positions = np.tile(np.arange(k, dtype=np.float64), q)
    np.minimum.at(first, (rows, cols), positions)
    majority = counts + (k - first) / (k + 1)
    weights = np.exp((neighbour_sims - neighbour_sims[:, :1]) / temperature).reshape(-1)
    weighted = np.zeros((q, n_classes))
    np.add.at(weighted, (rows, cols), weights)
    return {"majority": majority, "weighted": weighted}


def _check_found(idx: np.ndarray) -> None:
    """FAISS marks "no neighbour" with -1, which as an index would silently mean the last row."""
    if (idx < 0).any():
        raise PipelineError(f"the search found fewer neighbours than asked for {int((idx < 0).any(axis=1).sum())} "
                            "queries (non-finite features?); run python -m pipeline store verify on the store")


def search_without_self(bank: np.ndarray, k: int, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Each row of `bank` searched against the others: top-k (similarities, row indices) with the row itself left
    out by index (not by rank, so that exact duplicates cannot hide it)."""
    if k >= len(bank):
        raise PipelineError(f"k={k} needs more than {len(bank)} rows for leave-one-out; use a smaller k")
    sims, idx = flat_top_k(bank, bank, k + 1, device)
    _check_found(idx)
    not_self = idx != np.arange(len(bank))[:, None]
    order = np.argsort(~not_self, axis=1, kind="stable")[:, :k]  # the non-self hits, in rank order
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(idx, order, axis=1)


def knn_protocol(fs: FeatureSet, *, loo: bool = False, loo_split: str | None = None) -> dict[str, Any]:
    """Which rows are queries and which are searched: test vs train+val, or leave-one-out within one split."""
    labelled = fs.labels >= 0
    test = fs.mask("test") & labelled
    kind = fs.made.source
    if test.any() and not loo:
        bank = (fs.mask("train") | fs.mask("val")) & labelled
        if not bank.any():
            raise PipelineError(f"{fs.path} has no labelled train/val rows to search; {how_to(kind, 'splits')}")
        return {"mode": "test vs train+val", "bank": bank, "queries": test}
    splits = [s for s in fs.split_names() if (fs.mask(s) & labelled).any()]
    if not splits:
        raise PipelineError(f"{fs.path} has no labelled rows; kNN classification needs labels: "
                            f"{how_to(kind, 'labels')}")
    split = loo_split or ("train" if "train" in splits else max(splits, key=lambda s: int(fs.mask(s).sum())))
    if split not in splits:
        raise PipelineError(f"no labelled rows in split {split!r}; choose one of {splits}")
    rows = fs.mask(split) & labelled
    return {"mode": f"leave-one-out within {split}", "bank": rows, "queries": rows}


def knn_classify(fs: FeatureSet, *, ks: tuple[int, ...], temperature: float = 0.07, loo: bool = False,
                 loo_split: str | None = None, retrieval_ks: tuple[int, ...] = (1, 5, 10),
                 resamples: int = DEFAULT_RESAMPLES, device: str = "cpu") -> dict[str, Any]:
    """kNN classification for each k and vote, and retrieval metrics (recall@k, mAP@k by label); each figure with
    its bootstrap interval over the queries (`resamples`), and each vote's per-query correctness (`correct`) for
    paired comparisons. The exact search runs on `device` (FAISS on CPU, torch on CUDA)."""
    if not ks or any(k < 1 for k in ks):
        raise PipelineError(f"--k must be positive integers, got {list(ks)}")
    if not np.isfinite(temperature) or temperature <= 0:
        raise PipelineError(f"the temperature must be a finite positive number, got {temperature}")
    plan = knn_protocol(fs, loo=loo, loo_split=loo_split)
    bank, queries = plan["bank"], plan["queries"]
    leave_one_out = plan["mode"].startswith("leave-one-out")
    start = time.perf_counter()
    n_bank = int(bank.sum()) - (1 if leave_one_out else 0)
    if max(ks) > n_bank:
        raise PipelineError(f"k={max(ks)} is larger than the {n_bank} rows searched; use smaller --k values")
    depth = max(max(ks), min(max(retrieval_ks, default=1), n_bank))  # retrieval cut-offs past the bank are skipped
    if leave_one_out:
        sims, idx = search_without_self(fs.features[bank], depth, device)
    else:
        sims, idx = flat_top_k(fs.features[bank], fs.features[queries], depth, device)
    _check_found(idx)
    from pipeline.evaluation.probes import canonical_order

    query_rows = np.flatnonzero(queries)
    order = np.searchsorted(query_rows, canonical_order(fs, queries))  # queries in content order: the figures and
    bank_labels = fs.labels[bank]  # their intervals are the same whatever the listing order
    y_true = fs.labels[query_rows[order]]
    neighbour_labels, ordered_sims = bank_labels[idx[order]], sims[order]
    results = {str(k): _vote_metrics(fs, query_rows[order], neighbour_labels[:, :k], ordered_sims[:, :k],
                                     temperature=temperature, resamples=resamples) for k in sorted(set(ks))}
    per_class = np.bincount(bank_labels, minlength=len(fs.class_names))
    relevant = per_class[y_true] - (1 if leave_one_out else 0)
    return {
        "protocol": f"{exact_search_name(device)}; {plan['mode']}",
        "mode": plan["mode"],
        "temperature": temperature,
        "ks": sorted(set(ks)),
        "n_bank": int(bank.sum()),
        "n_queries": int(queries.sum()),
        "seconds": round(time.perf_counter() - start, 3),
        "by_k": results,
        "retrieval": retrieval_metrics(neighbour_labels, y_true, relevant, ks=retrieval_ks, resamples=resamples),
        "examples": _examples(fs, bank, queries, idx, sims),
    }


def _vote_metrics(fs: FeatureSet, query_rows: np.ndarray, neighbour_labels: np.ndarray, sims: np.ndarray, *,
                  temperature: float, resamples: int) -> dict[str, Any]:
    """Both votes over the first k neighbours: metrics (with intervals) and which queries each got right."""
    from pipeline.evaluation.probes import correctness

    k = neighbour_labels.shape[1]
    classes = np.arange(len(fs.class_names))
    y_true = fs.labels[query_rows]
    out = {}
    for vote, scores in vote_scores(neighbour_labels, sims, n_classes=len(classes), temperature=temperature).items():
        metrics = classification_metrics(y_true, scores, classes, fs.class_names, resamples=resamples)
        if k < 5:  # fewer than 5 neighbours cannot rank 5 classes: the rest would be arbitrary ties
            metrics["top5"] = None
            metrics.get("intervals", {}).pop("top5", None)
        metrics["correct"] = correctness(fs, query_rows, predicted(scores, classes))
        out[vote] = metrics
    return out


def _examples(fs: FeatureSet, bank: np.ndarray, queries: np.ndarray, idx: np.ndarray, sims: np.ndarray, *,
              n: int = 8, hits: int = 6) -> list[dict[str, Any]]:
    """A few queries (spread over the classes, fixed choice) with their nearest neighbours, for the image grid."""
    query_rows, bank_rows = np.flatnonzero(queries), np.flatnonzero(bank)
    labels = fs.labels[query_rows]
    picked = []
    for cls in np.unique(labels):  # the first query of each class in store order, up to n
        picked.append(int(np.flatnonzero(labels == cls)[0]))
        if len(picked) == n:
            break
    return [{"id": fs.ids[query_rows[q]], "label": int(labels[q]),
             "hits": [{"id": fs.ids[bank_rows[j]], "label": int(fs.labels[bank_rows[j]]), "score": float(s)}
                      for j, s in zip(idx[q, :hits], sims[q, :hits], strict=True)]}
            for q in picked]


def exact_device(device: str) -> str:
    """The device of an exact search: "cpu" (FAISS; torch not imported for it), or CUDA as `--device` names it
    (auto: CUDA when there is one), checked."""
    if device == "cpu":
        return device
    from pipeline.engine.devices import resolve_device

    return str(resolve_device(device))


def run_knn(config: KnnConfig) -> tuple[dict[str, Any], Path]:
    """Run kNN classification and retrieval on a store, save the results JSON and the report. The store is loaded
    whole when its features fit `max_memory`, and streamed otherwise (`pipeline.evaluation.knn_stream`); with
    `index`/`approx` the search goes through a FAISS index and the gap to exact search is measured."""
    from pipeline.evaluation.probes import default_results_path
    from pipeline.report.blocks import report_blocks, save_json, title_for
    from pipeline.report.render import check_report_outputs, write_report_blocks
    from pipeline.store.budget import store_budget

    held = store_budget(config.store, config.max_memory)
    budget = held.budget
    out = Path(config.out) if config.out else default_results_path(Path(config.store), "knn")
    target = check_output(out, owned=owned_json("knn-results"), overwrite=config.overwrite, protect=[config.store])
    if config.report:
        check_report_outputs(results_stem(out), overwrite=config.overwrite, protect=[config.store])
    streamed = config.index is not None or config.approx or config.queries or not held.fits
    device = exact_device(config.device)
    if streamed:
        from pipeline.evaluation.knn_stream import run_streamed
        from pipeline.store.columns import scan_store

        fs = scan_store(config.store)
        result = run_streamed(fs, config, budget, device)
    else:
        fs = load_store(config.store)
        result = knn_classify(fs, ks=config.ks, temperature=config.temperature, loo=config.loo,
                              loo_split=config.loo_split, retrieval_ks=config.retrieval_ks,
                              resamples=config.resamples, device=device)
    result.update(fs.provenance())
    if config.report:
        blocks = report_blocks(fs, title=title_for(fs), knn=result)
        result["report"] = [str(p.resolve()) for p in write_report_blocks(results_stem(out), blocks)]
    save_json(target, {**result, "featpipe": {"kind": "knn-results", "version": 1}})
    return result, out
