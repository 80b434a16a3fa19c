from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import KnnConfig
from pipeline.errors import PipelineError
from pipeline.evaluation.knn import knn_classify, run_knn
from pipeline.evaluation.metrics import retrieval_metrics
from pipeline.store.read import load_store


@pytest.fixture(scope="module")
def digits_fs(digits_store):
    return load_store(digits_store)


def _reference_knn(bank, bank_labels, queries, k, temperature, n_classes, exclude=None):
    """Brute force in float64 with plain loops: an independent implementation of both votes. `exclude[q]` is a bank
    row left out for query q (leave-one-out)."""
    sims = queries.astype(np.float64) @ bank.astype(np.float64).T
    if exclude is not None:
        sims[np.arange(len(queries)), exclude] = -np.inf
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
    return np.array(majority), np.array(weighted), order


def _near_ties(bank, queries, k, exclude=None, eps=1e-6):
    """The share of queries whose k+1 nearest similarities (float64) hold two within `eps`, twice the largest error
    of a float32 product on these features (4.2e-7 measured): float32 search may order those two either way, so each
    such query may count differently (which ones depends on the features' own float noise, e.g. the extraction's
    thread count); every other query must count exactly as the reference counts it."""
    sims = queries.astype(np.float64) @ bank.astype(np.float64).T
    if exclude is not None:
        sims[np.arange(len(queries)), exclude] = -np.inf
    top = -np.sort(-sims, axis=1)[:, :k + 1]
    return float((np.diff(top, axis=1) > -eps).any(axis=1).mean())


def _reference_retrieval(order, bank_labels, y, relevant, k):
    recall, aps = [], []
    for q in range(len(y)):
        if relevant[q] == 0:
            continue
        hits = [bank_labels[j] == y[q] for j in order[q, :k]]
        recall.append(any(hits))
        found, total = 0, 0.0
        for i, h in enumerate(hits, 1):
            if h:
                found += 1
                total += found / i
        aps.append(total / min(k, relevant[q]))
    return np.mean(recall), np.mean(aps)


@pytest.mark.parametrize("k", [1, 20])
def test_knn_classification_equals_numpy_reference(digits_fs, k):
    fs = digits_fs
    result = knn_classify(fs, ks=(k,), temperature=0.07)
    bank = fs.mask("train") | fs.mask("val")
    test = fs.mask("test")
    majority, weighted, order = _reference_knn(fs.features[bank], fs.labels[bank], fs.features[test], 10, 0.07,
                                               len(fs.class_names))
    majority, weighted, _ = _reference_knn(fs.features[bank], fs.labels[bank], fs.features[test], k, 0.07,
                                           len(fs.class_names))
    y = fs.labels[test]
    tied = _near_ties(fs.features[bank], fs.features[test], max(k, 10))
    assert tied < 0.05  # 2.2% of the 540 queries at k=20, measured
    assert result["mode"] == "test vs train+val"
    assert result["by_k"][str(k)]["majority"]["top1"] == pytest.approx(np.mean(majority == y), abs=tied)
    assert result["by_k"][str(k)]["weighted"]["top1"] == pytest.approx(np.mean(weighted == y), abs=tied)
    assert result["n_bank"] == int(bank.sum()) and result["n_queries"] == int(test.sum())
    if k == 1:
        assert result["by_k"]["1"]["majority"]["top1"] == result["by_k"]["1"]["weighted"]["top1"]
        assert result["by_k"]["1"]["weighted"]["top5"] is None  # undefined with one neighbour
    else:
        assert result["by_k"][str(k)]["weighted"]["top5"] >= result["by_k"][str(k)]["weighted"]["top1"]
    relevant = np.bincount(fs.labels[bank], minlength=10)[y]
    recall, m_ap = _reference_retrieval(order, fs.labels[bank], y, relevant, 10)
    assert result["retrieval"]["10"]["recall"] == pytest.approx(recall, abs=tied + 1e-9)
    assert result["retrieval"]["10"]["map"] == pytest.approx(m_ap, abs=tied + 1e-9)
    if k == 1:  # with one neighbour, recall@1 is 1-NN accuracy
        assert result["retrieval"]["1"]["recall"] == pytest.approx(result["by_k"]["1"]["majority"]["top1"])


def test_leave_one_out_without_a_test_split_equals_reference(digits_fs):
    """No test split: every train row is a query against the other train rows (itself left out by index)."""
    keep = digits_fs.mask("train")
    fs = digits_fs.subset(keep)
    result = knn_classify(fs, ks=(5,), temperature=0.07)
    assert result["mode"] == "leave-one-out within train" and result["n_queries"] == int(keep.sum())
    rows = np.arange(len(fs))
    majority, weighted, order = _reference_knn(fs.features, fs.labels, fs.features, 10, 0.07, 10, exclude=rows)
    assert not (order == rows[:, None]).any()  # the reference never finds itself either
    majority, weighted, _ = _reference_knn(fs.features, fs.labels, fs.features, 5, 0.07, 10, exclude=rows)
    tied = _near_ties(fs.features, fs.features, 10, exclude=rows)
    assert tied < 0.05
    assert result["by_k"]["5"]["majority"]["top1"] == pytest.approx(np.mean(majority == fs.labels), abs=tied)
    assert result["by_k"]["5"]["weighted"]["top1"] == pytest.approx(np.mean(weighted == fs.labels), abs=tied)
    relevant = np.bincount(fs.labels, minlength=10)[fs.labels] - 1
    recall, m_ap = _reference_retrieval(order, fs.labels, fs.labels, relevant, 10)
    assert result["retrieval"]["10"]["recall"] == pytest.approx(recall, abs=tied + 1e-9)
    assert result["retrieval"]["10"]["map"] == pytest.approx(m_ap, abs=tied + 1e-9)


def test_leave_one_out_can_be_forced_and_exact_duplicates_do_not_hide_self():
    from pipeline.evaluation.knn import search_without_self

    bank = np.repeat(np.eye(4, dtype=np.float32), 2, axis=0)  # every vector twice
    sims, idx = search_without_self(bank, 1)
    assert (idx[:, 0] != np.arange(8)).all()  # the twin, never itself
    assert np.allclose(sims, 1.0)


def _same_ranking(got_s, got_i, want_s, want_i) -> None:
    """The same neighbours in the same order, except the order within exact ties (FAISS's is its heap's); `want`
    holds one neighbour more than `got`, to see the ties across the cut."""
    gap = np.abs(np.diff(want_s, axis=1)) < 1e-6
    tied = np.zeros_like(want_s, dtype=bool)
    tied[:, 1:] |= gap
    tied[:, :-1] |= gap
    k = got_s.shape[1]
    tied, want_s, want_i = tied[:, :k], want_s[:, :k], want_i[:, :k]
    np.testing.assert_allclose(got_s, want_s, atol=1e-5)
    np.testing.assert_array_equal(np.where(tied, 0, got_i), np.where(tied, 0, want_i))
    whole = ~tied[:, -1]  # no tie across the cut: the same set of rows
    np.testing.assert_array_equal(np.sort(got_i[whole], axis=1), np.sort(want_i[whole], axis=1))
    assert 0.02 < tied.mean() < 0.2  # the twins are there, and most positions are not tied
    equal = got_s[:, 1:] == got_s[:, :-1]
    assert (got_i[:, 1:] > got_i[:, :-1])[equal].all()  # ours: ties to the lower row


def test_the_torch_search_is_faiss_flat_search():
    """index/torch_flat: the GPU kNN's search, run here on CPU in blocks (several of queries and of bank rows), gives
    FAISS's similarities and rows, exact duplicates included; a float16 store's rows travel as they are."""
    from pipeline.index.build import build_flat_index, search
    from pipeline.index.torch_flat import torch_top_k

    rng = np.random.default_rng(3)
    bank = rng.normal(size=(3000, 32)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    bank[2000:2100] = bank[100:200]  # exact twins: tied similarities
    queries = np.concatenate([bank[150:160], rng.normal(size=(490, 32)).astype(np.float32)])
    blocks = {"similarity_bytes": 4 * 128 * 700, "bank_step": 700}
    for q in (queries, queries.astype(np.float16)):
        want = search(build_flat_index(bank), q.astype(np.float32), 26)
        _same_ranking(*torch_top_k(bank, q, 25, "cpu", **blocks), *want)
    s, i = torch_top_k(bank, queries, 25, "cpu", **blocks)
    np.testing.assert_array_equal(i[:10, :2], np.stack([np.arange(150, 160), np.arange(2050, 2060)], axis=1))
    s, i = torch_top_k(bank[:5], queries[:3], 25, "cpu")  # k past the bank: the whole bank, ranked
    assert s.shape == (3, 5) and sorted(i[0]) == [0, 1, 2, 3, 4] and (np.diff(s, axis=1) <= 0).all()


def test_retrieval_metrics_on_a_hand_worked_example():
    # query label 1; hits at ranks 1 and 3 of 4; 2 relevant items in the bank
    neighbours = np.array([[1, 0, 1, 0]])
    m = retrieval_metrics(neighbours, np.array([1]), np.array([2]), ks=(1, 2, 4))
    assert m["1"] == {"recall": 1.0, "precision": 1.0, "map": 1.0}
    assert m["2"]["map"] == pytest.approx(1.0 / 2) and m["2"]["precision"] == 0.5
    assert m["4"]["map"] == pytest.approx((1 + 2 / 3) / 2)


def test_dinov2_preset_through_the_cli(digits_store, tmp_path, capsys):
    from pipeline.cli import main

    out = tmp_path / "knn.json"
    assert main(["--quiet", "knn", "--store", str(digits_store), "--preset", "dinov2", "--out", str(out)]) == 0
    import json

    result = json.loads(out.read_text())
    assert result["ks"] == [10, 20, 100, 200] and result["temperature"] == 0.07
    # measured with EfficientNet-Lite0 on the 540 test digits: 456 right (84.44%); a point either way is float noise
    assert result["by_k"]["20"]["weighted"]["top1"] == pytest.approx(456 / 540, abs=0.01)
    assert (tmp_path / "knn.html").is_file() and (tmp_path / "knn.md").is_file()
    assert "recall@k" in capsys.readouterr().out


def test_knn_on_digits_reaches_its_measured_accuracy(digits_store, tmp_path):
    result, out = run_knn(KnnConfig(store=digits_store, out=tmp_path / "knn.json", ks=(1, 20), report=False))
    assert result["by_k"]["20"]["weighted"]["top1"] == pytest.approx(456 / 540, abs=0.01)  # 84.44% measured
    assert result["by_k"]["1"]["majority"]["top1"] == pytest.approx(449 / 540, abs=0.01)  # 83.15% measured
    assert out.exists() and not (tmp_path / "knn.html").exists()


def test_k_larger_than_the_bank_is_a_clear_error(digits_fs):
    with pytest.raises(PipelineError, match="larger than the 1257 rows searched"):
        knn_classify(digits_fs, ks=(5000,))
