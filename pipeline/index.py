"""FAISS indexes on cached features, and kNN classification.

Features are unit-norm, so inner product is cosine similarity. kNN uses an exact `IndexFlatIP` over train(+val) with
the test split as queries, and reports two votes per k: majority (ties go to the class met first, i.e. nearest) and
DINOv2's temperature-weighted vote (each neighbour weighs exp(similarity / T)).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline.config import KnnConfig
from pipeline.errors import PipelineError
from pipeline.probes import classification_metrics, default_results_path
from pipeline.store import FeatureSet, load_store


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


def knn_classify(fs: FeatureSet, *, ks: tuple[int, ...], temperature: float = 0.07) -> dict[str, Any]:
    """kNN classification of the test split against train(+val); metrics for each k and vote."""
    if not ks or any(k < 1 for k in ks):
        raise PipelineError(f"--k must be positive integers, got {list(ks)}")
    if temperature <= 0:
        raise PipelineError(f"the temperature must be positive, got {temperature}")
    labelled = fs.labels >= 0
    bank = (fs.mask("train") | fs.mask("val")) & labelled
    test = fs.mask("test") & labelled
    if not test.any():
        raise PipelineError(f"{fs.path} has no labelled test split to use as queries")
    if not bank.any():
        raise PipelineError(f"{fs.path} has no labelled train/val rows to search")
    start = time.perf_counter()
    index = build_flat_index(fs.features[bank])
    sims, idx = search(index, fs.features[test], max(ks))
    bank_labels = fs.labels[bank]
    y_true = fs.labels[test]
    classes = np.arange(len(fs.class_names))
    results: dict[str, Any] = {}
    for k in sorted(set(ks)):
        scores = vote_scores(bank_labels[idx[:, :k]], sims[:, :k], n_classes=len(classes), temperature=temperature)
        results[str(k)] = {vote: classification_metrics(y_true, s, classes, fs.class_names)
                           for vote, s in scores.items()}
        if k < 5:  # fewer than 5 neighbours cannot rank 5 classes: the rest would be arbitrary ties
            for metrics in results[str(k)].values():
                metrics["top5"] = None
    return {
        "protocol": "exact FAISS inner-product (cosine) kNN; bank = train+val, queries = test",
        "temperature": temperature,
        "ks": sorted(set(ks)),
        "n_bank": int(bank.sum()),
        "n_queries": int(test.sum()),
        "seconds": round(time.perf_counter() - start, 3),
        "by_k": results,
    }


def run_knn(config: KnnConfig) -> tuple[dict[str, Any], Path]:
    """Load a store, run kNN classification, save results JSON."""
    from pipeline.report import save_json

    fs = load_store(config.store)
    result = knn_classify(fs, ks=config.ks, temperature=config.temperature)
    result.update(fs.provenance())
    out = Path(config.out) if config.out else default_results_path(Path(config.store), "knn")
    save_json(out, result)
    return result, out
