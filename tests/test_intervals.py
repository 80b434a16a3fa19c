"""Intervals, paired comparisons and backbone agreement, checked against their definitions: coverage by simulation,
each resample recomputed with scikit-learn, McNemar against hand-worked tables, CKA's invariances."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import balanced_accuracy_score, f1_score

from pipeline.evaluation.compare import agreement, holm, linear_cka, matched_rows, mutual_knn, pairwise
from pipeline.evaluation.intervals import (
    classification_intervals,
    compare_results,
    interval,
    mcnemar_exact,
    mean_intervals,
    pack_correct,
    paired_comparison,
    resample_counts,
    unpack_correct,
)
from pipeline.evaluation.metrics import classification_metrics, retrieval_metrics, top5_hits


def _noisy_predictions(rng, n, n_classes, accuracy):
    y = rng.integers(0, n_classes, n)
    right = rng.random(n) < accuracy
    return y, np.where(right, y, (y + 1 + rng.integers(0, n_classes - 1, n)) % n_classes)


def test_the_95_interval_covers_a_known_accuracy_in_93_to_97_percent_of_test_sets():
    rng = np.random.default_rng(1)
    truth, covered, trials = 0.8, 0, 1000
    for trial in range(trials):
        y, pred = _noisy_predictions(rng, 300, 10, truth)
        low, high = classification_intervals(y, pred, None, resamples=500, seed=trial)["top1"]
        covered += low <= truth <= high
    assert 0.93 <= covered / trials <= 0.97


def test_each_resample_is_the_metric_recomputed_on_the_drawn_images():
    """The vectorised figures equal scikit-learn's on the explicit resamples (same counts, same seed)."""
    rng = np.random.default_rng(3)
    y, pred = _noisy_predictions(rng, 120, 7, 0.6)
    hit5 = rng.random(120) < 0.9
    got = classification_intervals(y, pred, hit5, resamples=64, seed=11)
    samples = {"top1": [], "top5": [], "balanced_accuracy": [], "macro_f1": []}
    for block in resample_counts(120, resamples=64, seed=11):
        for counts in block:
            rows = np.repeat(np.arange(120), counts.astype(int))
            yt, yp = y[rows], pred[rows]
            samples["top1"].append(np.mean(yt == yp))
            samples["top5"].append(np.mean(hit5[rows]))
            samples["balanced_accuracy"].append(balanced_accuracy_score(yt, yp))
            samples["macro_f1"].append(f1_score(yt, yp, labels=np.unique(yt), average="macro", zero_division=0))
    for name, values in samples.items():
        assert got[name] == pytest.approx(interval(np.array(values)), abs=1e-12), name


def test_a_perfect_classifier_has_the_interval_one_to_one():
    y = np.repeat(np.arange(8), 20)
    scores = np.eye(8)[y]
    metrics = classification_metrics(y, scores, np.arange(8), [str(i) for i in range(8)], resamples=200)
    assert metrics["intervals"] == {m: [1.0, 1.0] for m in ("top1", "top5", "balanced_accuracy", "macro_f1")}
    assert "percentile bootstrap" in metrics["interval_method"]


def test_intervals_contain_the_figure_and_narrow_with_more_images():
    rng = np.random.default_rng(5)
    widths = []
    for n in (200, 3200):
        y, pred = _noisy_predictions(rng, n, 5, 0.7)
        low, high = classification_intervals(y, pred, None, resamples=400)["top1"]
        assert low <= np.mean(y == pred) <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 3  # width ~ 1/sqrt(n): 16x the images, a quarter of the width


def test_top5_hits_agree_with_scikit_learn():
    from sklearn.metrics import top_k_accuracy_score

    rng = np.random.default_rng(2)
    scores = rng.random((300, 12))
    y = rng.integers(0, 12, 300)
    assert np.mean(top5_hits(y, scores, np.arange(12))) == pytest.approx(
        top_k_accuracy_score(y, scores, k=5, labels=np.arange(12)))


def test_retrieval_intervals_are_of_the_per_query_means():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 4, (150, 10))
    queries = rng.integers(0, 4, 150)
    out = retrieval_metrics(labels, queries, np.full(150, 30), ks=(1, 5), resamples=300)
    hits = (labels == queries[:, None])[:, :5].astype(float)
    expected = mean_intervals({"recall": hits.any(axis=1).astype(float), "precision": hits.mean(axis=1)},
                              resamples=300)
    assert out["5"]["intervals"]["recall"] == expected["recall"]
    assert out["5"]["intervals"]["precision"] == expected["precision"]
    for name in ("recall", "precision", "map"):
        low, high = out["5"]["intervals"][name]
        assert low <= out["5"][name] <= high


@pytest.mark.parametrize("a_only,b_only,expected", [
    (1, 6, 2 * (1 + 7) / 2 ** 7),  # 2 * P(X <= 1), X ~ Bin(7, 1/2) = 16/128
    (2, 10, 2 * (1 + 12 + 66) / 2 ** 12),  # 158/4096
    (5, 5, 1.0),
    (0, 0, 1.0),
    (0, 9, 2 / 2 ** 9),
])
def test_mcnemar_exact_against_hand_worked_tables(a_only, b_only, expected):
    assert mcnemar_exact(a_only, b_only) == pytest.approx(expected)
    if a_only + b_only:
        assert mcnemar_exact(a_only, b_only) == pytest.approx(binomtest(a_only, a_only + b_only).pvalue)


def test_paired_comparison_of_two_classifiers():
    rng = np.random.default_rng(7)
    a = rng.random(1000) < 0.9
    b = a.copy()
    flip = rng.permutation(1000)[:60]
    b[flip] = ~b[flip]  # b differs from a on 60 images
    out = paired_comparison(a, b, resamples=500)
    assert out["difference"] == pytest.approx(a.mean() - b.mean())
    assert out["interval"][0] <= out["difference"] <= out["interval"][1]
    assert out["a_only"] == int((a & ~b).sum()) and out["b_only"] == int((~a & b).sum())
    assert out["mcnemar_p"] == pytest.approx(mcnemar_exact(out["a_only"], out["b_only"]))
    same = paired_comparison(a, a, resamples=100)
    assert same["difference"] == 0 and same["interval"] == [0.0, 0.0] and same["mcnemar_p"] == 1.0
    assert not same["significant"]


def test_correctness_records_pair_only_the_same_images_whatever_their_row_order():
    keys = [f"h{i:03d}" for i in range(50)]
    ids = [f"img{i}" for i in range(50)]
    right = np.arange(50) % 3 == 0
    packed = pack_correct(right, keys, ids)
    perm = np.random.default_rng(0).permutation(50)
    shuffled = pack_correct(right[perm], [keys[i] for i in perm], [ids[i] for i in perm])
    assert shuffled == packed
    assert unpack_correct(packed).sum() == right.sum()
    other = pack_correct(right[:49], keys[:49], ids[:49])
    assert compare_results(packed, other) is None
    assert compare_results(packed, shuffled)["difference"] == 0
    with pytest.raises(ValueError, match="bytes"):
        unpack_correct({**packed, "n": 90})


def test_holm_adjusts_step_down():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]


def test_pairwise_marks_a_real_difference_and_a_tie():
    rng = np.random.default_rng(9)
    keys, ids = [f"k{i}" for i in range(2000)], [str(i) for i in range(2000)]
    strong = rng.random(2000) < 0.95
    tied = strong.copy()
    tied[:4] = ~tied[:4]
    weak = rng.random(2000) < 0.80
    records = {"strong": pack_correct(strong, keys, ids), "tied": pack_correct(tied, keys, ids),
               "weak": pack_correct(weak, keys, ids)}
    pairs = {(p["a"], p["b"]): p for p in pairwise(records, what="probe top-1", resamples=300)}
    assert not pairs[("strong", "tied")]["significant"]
    assert pairs[("strong", "weak")]["significant"] and pairs[("tied", "weak")]["significant"]
    assert all(p["holm_p"] >= p["mcnemar_p"] for p in pairs.values())


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_linear_cka_is_one_with_itself_and_a_rotation_and_near_zero_with_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20000, 16)) @ rng.normal(size=(16, 16))  # more rows than one block
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, x @ q) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x + 1.0) == pytest.approx(1.0)
    assert linear_cka(x, rng.normal(size=(20000, 16))) < 0.01


def test_mutual_knn_overlap():
    rng = np.random.default_rng(1)
    x = _unit(rng.normal(size=(600, 8)))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert mutual_knn(x, x, k=10) == 1.0
    assert mutual_knn(x, _unit(x @ q), k=10) == 1.0  # cosine neighbours survive a rotation
    assert mutual_knn(x, _unit(rng.normal(size=(600, 8))), k=10) < 0.1  # chance is k/n


def test_agreement_matches_rows_by_content_hash():
    rng = np.random.default_rng(2)
    x = _unit(rng.normal(size=(300, 6)))
    keys = [f"h{i}" for i in range(300)]
    perm = rng.permutation(300)
    out = agreement({"a": (x, keys), "b": (x[perm], [keys[i] for i in perm]),
                     "c": (_unit(rng.normal(size=(300, 6))), keys)}, queries=300)
    assert out["names"] == ["a", "b", "c"]
    assert out["linear_cka"][0][1] == pytest.approx(1.0) and out["mutual_knn_at_10"][0][1] == 1.0
    assert out["linear_cka"][0][2] < 0.2
    assert out["rows_matched"][0][1] == 300
    ra, rb = matched_rows([["x", "y", "y", "z"], ["z", "x"]])
    assert ra.tolist() == [0, 3] and rb.tolist() == [1, 0]  # "y" appears twice: left out
