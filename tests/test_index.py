from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import KnnConfig
from pipeline.errors import PipelineError
from pipeline.index import build_flat_index, knn_classify, run_knn, search
from pipeline.store import load_store


def _reference_knn(bank, bank_labels, queries, k, temperature, n_classes):
    """Brute force in float64 with plain loops: an independent implementation of both votes."""
    sims = queries.astype(np.float64) @ bank.astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    majority, weighted = [], []
    for q in range(len(queries)):
        labels = bank_labels[order[q]]
        counts = {}
        for rank, lab in enumerate(labels):
            hits, first = counts.get(lab, (0, rank))
            counts[lab] = (hits + 1, first)
        majority.append(max(counts, key=lambda c: (counts[c][0], -counts[c][1])))
        w = np.zeros(n_classes)
        for j in order[q]:
            w[bank_labels[j]] += np.exp(sims[q, j] / temperature)
        weighted.append(int(np.argmax(w)))
    return np.array(majority), np.array(weighted), sims, order


def test_faiss_search_matches_numpy_brute_force(digits_store):
    fs = load_store(digits_store)
    bank = fs.features[fs.mask("train")]
    queries = fs.features[fs.mask("test")]
    sims, idx = search(build_flat_index(bank), queries, 5)
    ref = np.sort(queries.astype(np.float64) @ bank.astype(np.float64).T, axis=1)[:, ::-1][:, :5]
    np.testing.assert_allclose(sims, ref, atol=1e-5)


@pytest.mark.parametrize("k", [1, 20])
def test_knn_classification_equals_numpy_reference(digits_store, k):
    fs = load_store(digits_store)
    result = knn_classify(fs, ks=(k,), temperature=0.07)
    bank = fs.mask("train") | fs.mask("val")
    test = fs.mask("test")
    majority, weighted, _, _ = _reference_knn(fs.features[bank], fs.labels[bank], fs.features[test], k, 0.07,
                                              len(fs.class_names))
    y = fs.labels[test]
    assert result["by_k"][str(k)]["majority"]["top1"] == pytest.approx(np.mean(majority == y), abs=0)
    assert result["by_k"][str(k)]["weighted"]["top1"] == pytest.approx(np.mean(weighted == y), abs=0)
    assert result["n_bank"] == int(bank.sum()) and result["n_queries"] == int(test.sum())
    if k == 1:
        assert result["by_k"]["1"]["majority"]["top1"] == result["by_k"]["1"]["weighted"]["top1"]
        assert result["by_k"]["1"]["weighted"]["top5"] is None  # undefined with one neighbour
    else:
        assert result["by_k"][str(k)]["weighted"]["top5"] >= result["by_k"][str(k)]["weighted"]["top1"]


def test_knn_on_digits_is_well_above_chance(digits_store, tmp_path):
    result, out = run_knn(KnnConfig(store=digits_store, out=tmp_path / "knn.json", ks=(1, 20)))
    assert result["by_k"]["20"]["weighted"]["top1"] > 0.5  # chance is 0.1
    assert out.exists()


def test_k_larger_than_the_bank_is_a_clear_error():
    index = build_flat_index(np.eye(3, dtype=np.float32))
    with pytest.raises(PipelineError, match="larger than the 3 indexed rows"):
        search(index, np.eye(3, dtype=np.float32), 4)
