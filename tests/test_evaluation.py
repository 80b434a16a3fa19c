"""The evaluation package's building blocks, each against an independent computation: classification metrics, the
retrieval metrics (recall, precision, mAP@k by their definitions, query by query), the head registry, and the torch
logistic regression against scikit-learn's on real digits features (the probes' and kNN's end-to-end runs are in
test_probes.py and test_knn.py)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from pipeline.errors import ConfigError
from pipeline.evaluation.heads import HEADS, class_scores, fit_quietly, head_spec
from pipeline.evaluation.metrics import classification_metrics, retrieval_metrics
from pipeline.evaluation.torch_head import TorchLogisticRegression


def test_classification_metrics_by_their_definitions():
    rng = np.random.default_rng(0)
    classes = np.arange(8)
    y = rng.integers(0, 8, 400)
    scores = rng.normal(size=(400, 8))
    scores[np.arange(400), y] += 1.0  # better than chance, not perfect
    m = classification_metrics(y, scores, classes, [f"c{i}" for i in classes])
    pred = scores.argmax(axis=1)
    recalls = [np.mean(pred[y == c] == c) for c in classes]
    ranks = (scores > scores[np.arange(400), y][:, None]).sum(axis=1)  # how many classes score above the truth
    assert m["top1"] == pytest.approx(np.mean(pred == y))
    assert m["top5"] == pytest.approx(np.mean(ranks < 5))
    assert m["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    assert m["per_class_accuracy"] == pytest.approx({f"c{c}": r for c, r in zip(classes, recalls, strict=True)})
    cm = np.array(m["confusion_matrix"])
    assert cm.sum() == 400 and np.trace(cm) == np.sum(pred == y) and cm[3].sum() == np.sum(y == 3)
    assert 0.3 < m["top1"] < 0.9  # the fixture is what it says: neither chance nor perfect
    assert classification_metrics(y % 3, scores[:, :3], np.arange(3), ["a", "b", "c"])["top5"] is None


def _retrieval_by_hand(neighbours, queries, relevant, k):
    recall, precision, ap = [], [], []
    for row, label, rel in zip(neighbours, queries, relevant, strict=True):
        if rel == 0:
            continue
        hits = [n == label for n in row[:k]]
        recall.append(float(any(hits)))
        precision.append(sum(hits) / k)
        found, total = 0, 0.0
        for i, hit in enumerate(hits, 1):
            if hit:
                found += 1
                total += found / i
        ap.append(total / min(k, rel))
    return np.mean(recall), np.mean(precision), np.mean(ap)


def test_retrieval_metrics_by_their_definitions_query_by_query():
    rng = np.random.default_rng(1)
    neighbours = rng.integers(0, 4, size=(60, 10))
    queries = rng.integers(0, 4, 60)
    relevant = rng.integers(0, 12, 60)
    relevant[:5] = 0  # queries with nothing to find are left out
    out = retrieval_metrics(neighbours, queries, relevant, ks=(1, 5, 10, 20))
    assert set(out) == {"1", "5", "10"}  # k beyond the neighbours searched is not reported
    for k in (1, 5, 10):
        recall, precision, ap = _retrieval_by_hand(neighbours, queries, relevant, k)
        assert out[str(k)] == pytest.approx({"recall": recall, "precision": precision, "map": ap})
    perfect = retrieval_metrics(np.repeat(queries[:, None], 10, axis=1), queries, np.full(60, 10), ks=(10,))
    assert perfect["10"] == {"recall": 1.0, "precision": 1.0, "map": 1.0}


def test_every_registered_head_fits_and_scores_with_its_own_grid():
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    x_fit, x_test, y_fit, y_test = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    for name, spec in HEADS.items():
        assert spec.grid and sorted(spec.strong_first(spec.grid)) == sorted(spec.grid), name
        model = spec.make(spec.grid[len(spec.grid) // 2], max_iter=300, seed=0, device="cpu")
        fit_quietly(model, x_fit, y_fit)
        scores = class_scores(model, x_test)
        assert scores.shape == (len(y_test), 10), name
        assert np.mean(model.classes_[scores.argmax(axis=1)] == y_test) > 0.9, name
    with pytest.raises(ConfigError, match="choose one of: logreg"):
        head_spec("logistic")


def test_the_torch_head_matches_scikit_learns_logistic_regression():
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    x_fit, x_test, y_fit, y_test = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    ours = TorchLogisticRegression(C=1.0, max_iter=1000).fit(x_fit, y_fit)
    theirs = LogisticRegression(C=1.0, max_iter=5000, tol=1e-8).fit(x_fit, y_fit)
    agree = np.mean(ours.predict(x_test) == theirs.predict(x_test))
    assert agree >= 0.99
    assert np.abs(ours.predict_proba(x_test) - theirs.predict_proba(x_test)).max() < 0.02
