"""Classification and retrieval metrics, shared by the probes, kNN and the reports."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, top_k_accuracy_score


def predicted(scores: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The top-scoring class of each row."""
    return classes[np.argmax(scores, axis=1)]


def top5_hits(y_true: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Per row: is the true class among the 5 best scores (fewer than 5 classes score higher)."""
    column = np.searchsorted(classes, y_true)
    true_score = scores[np.arange(len(y_true)), column]
    return (scores > true_score[:, None]).sum(axis=1) < 5


def ranked_top5_hits(y_true_index: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per row: is column `y_true_index` among the first 5 of a stable descending sort (scikit-learn's
    `top_k_accuracy_score`, ties to the higher column): the point figure; `top5_hits` is the one intervals use."""
    ranked = np.argsort(scores, axis=1, kind="mergesort")[:, ::-1][:, :5]
    return (ranked == np.asarray(y_true_index)[:, None]).any(axis=1)


def classification_metrics(y_true: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                           class_names: list[str], *, resamples: int = 0, seed: int = 0) -> dict[str, Any]:
    """Top-1, top-5 (when there are more than 5 classes), balanced accuracy, macro-F1, per-class accuracy and the
    confusion matrix (rows: true class, columns: predicted, both over `classes`); with `resamples`, the 95%
    interval of each of the four figures (`pipeline.evaluation.intervals`).

    `scores` is [n, len(classes)], column j scoring `classes[j]`. Macro-F1 averages over the classes present in
    `y_true`, so a class absent from the test set neither helps nor hurts.
    """
    y_pred = predicted(scores, classes)
    top5 = float(top_k_accuracy_score(y_true, scores, k=5, labels=classes)) if len(classes) > 5 else None
    hits5 = top5_hits(y_true, scores, classes) if top5 is not None and resamples else None
    return prediction_metrics(y_true, y_pred, classes, class_names, top5=top5, hits5=hits5, resamples=resamples,
                              seed=seed)


def prediction_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: np.ndarray, class_names: list[str], *,
                       top5: float | None, hits5: np.ndarray | None, resamples: int = 0,
                       seed: int = 0) -> dict[str, Any]:
    """`classification_metrics` from the predictions themselves (and the top-5 figure and per-row top-5 hits), for
    evaluations that never hold all the scores at once (the streamed kNN and probe)."""
    per_class = {class_names[cls]: float(np.mean(y_pred[y_true == cls] == cls)) for cls in np.unique(y_true)}
    out = {
        "top1": float(np.mean(y_pred == y_true)),
        "top5": top5,
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0)),
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=classes).tolist(),
        "n": int(len(y_true)),
    }
    if resamples:
        from pipeline.evaluation.intervals import METHOD, classification_intervals

        out["intervals"] = classification_intervals(y_true, y_pred, hits5 if top5 is not None else None,
                                                    resamples=resamples, seed=seed)
        out["interval_method"] = f"{METHOD}, {resamples} resamples, seed {seed}"
    return out


def retrieval_metrics(neighbour_labels: np.ndarray, query_labels: np.ndarray, relevant: np.ndarray, *,
                      ks: tuple[int, ...], resamples: int = 0, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Label-based retrieval metrics for ranked neighbours [Q, K] (best first).

    A hit is a neighbour with the query's label; `relevant` [Q] counts the query's possible hits in the searched set.
    - recall@k: share of queries with at least one hit in the top k (the metric-learning convention);
    - precision@k: mean share of hits in the top k;
    - mAP@k: mean over queries of AP@k = sum_{i<=k} precision@i * hit_i / min(k, relevant).
    Queries with no possible hit are left out (they would score 0 whatever the features). With `resamples`, each
    cut-off also carries the 95% intervals of the three (bootstrap over the queries).
    """
    return summarise_retrieval(retrieval_per_query(neighbour_labels, query_labels, relevant, ks=ks),
                               resamples=resamples, seed=seed)


def retrieval_per_query(neighbour_labels: np.ndarray, query_labels: np.ndarray, relevant: np.ndarray, *,
                        ks: tuple[int, ...]) -> dict[str, dict[str, np.ndarray]]:
    """The per-query recall, precision and AP of `retrieval_metrics` at each cut-off (queries with no possible hit
    left out): what the streamed kNN collects block by block."""
    keep = relevant > 0
    hits = (neighbour_labels[keep] == query_labels[keep, None]).astype(np.float64)
    relevant = relevant[keep]
    out: dict[str, dict[str, np.ndarray]] = {}
    for k in sorted(set(ks)):
        if k > hits.shape[1]:
            continue
        top = hits[:, :k]
        precision_at_i = np.cumsum(top, axis=1) / np.arange(1, k + 1)
        out[str(k)] = {"recall": top.any(axis=1).astype(np.float64), "precision": top.mean(axis=1),
                       "map": (precision_at_i * top).sum(axis=1) / np.minimum(k, relevant)}
    return out


def summarise_retrieval(per_query_by_k: dict[str, dict[str, np.ndarray]], *, resamples: int = 0,
                        seed: int = 0) -> dict[str, dict[str, Any]]:
    """Means (and with `resamples` the bootstrap intervals) of per-query retrieval figures."""
    out: dict[str, dict[str, Any]] = {}
    for k, per_query in per_query_by_k.items():
        n = len(per_query["recall"])
        out[k] = {name: float(np.mean(v)) if n else 0.0 for name, v in per_query.items()}
        if resamples and n:
            from pipeline.evaluation.intervals import mean_intervals

            out[k]["intervals"] = mean_intervals(per_query, resamples=resamples, seed=seed)
    return out
