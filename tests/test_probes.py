from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.config import DEFAULT_CS, ProbeConfig
from pipeline.errors import PipelineError
from pipeline.probes import fit_linear_probe, load_head, run_probe, stratified_holdout
from pipeline.store import load_store


@pytest.fixture(scope="module")
def digits_fs(digits_store):
    return load_store(digits_store)


def test_probe_on_digits_reaches_the_expected_accuracy(digits_store, tmp_path):
    result, out = run_probe(ProbeConfig(store=digits_store, out=tmp_path / "probe.json"))
    assert result["test_top1"] >= 0.93
    assert result["chosen_C"] in DEFAULT_CS
    assert result["n_test"] == 540 and result["n_train"] + result["n_val"] == 1257
    assert set(result["test_per_class_accuracy"]) == {str(i) for i in range(10)}
    assert 0.0 <= result["test_balanced_accuracy"] <= 1.0 and result["test_top5"] >= result["test_top1"]
    assert out.exists()

    saved = load_head(result["head"])
    fs = load_store(digits_store)
    test = fs.mask("test")
    pred = saved["estimator"].predict(fs.features[test])
    assert np.mean(pred == fs.labels[test]) == pytest.approx(result["test_top1"])  # independent recount
    assert saved["cache_key"] == fs.attrs["cache_key"] and saved["class_names"] == fs.class_names


def test_test_labels_never_influence_the_choice_of_C(digits_fs):
    Cs = (0.1, 10.0, 1000.0)
    _, base = fit_linear_probe(digits_fs, Cs=Cs)
    scrambled = digits_fs.labels.copy()
    test = digits_fs.mask("test")
    scrambled[test] = np.random.default_rng(1).permutation(scrambled[test])
    _, other = fit_linear_probe(dataclasses.replace(digits_fs, labels=scrambled), Cs=Cs)
    assert other["chosen_C"] == base["chosen_C"]
    assert other["val_top1_by_C"] == base["val_top1_by_C"]
    assert other["test_top1"] < base["test_top1"]


def test_val_split_is_used_when_present(digits_fs):
    splits = digits_fs.splits.copy()
    train_rows = np.flatnonzero(digits_fs.mask("train"))
    splits[train_rows[::4]] = "val"
    _, result = fit_linear_probe(dataclasses.replace(digits_fs, splits=splits), Cs=(1.0,))
    assert result["val_source"] == "val split" and result["n_val"] == len(train_rows[::4])


def test_stratified_holdout_is_fixed_and_stratified():
    labels = np.repeat([0, 1, 2], [10, 20, 1])
    a = stratified_holdout(labels, fraction=0.2, seed=0)
    assert np.array_equal(a, stratified_holdout(labels, fraction=0.2, seed=0))
    assert [int(a[labels == c].sum()) for c in (0, 1, 2)] == [2, 4, 0]


def test_store_without_test_split_is_refused(digits_fs):
    splits = np.where(digits_fs.mask("test"), "val", digits_fs.splits).astype(object)
    with pytest.raises(PipelineError, match="no labelled test split"):
        fit_linear_probe(dataclasses.replace(digits_fs, splits=splits), Cs=(1.0,))


def test_probe_result_does_not_hinge_on_float_noise(digits_fs):
    """Weakly regularised fits must reach the optimum: features perturbed at float-rounding level (what a traced or
    another batch-size forward pass gives) must not move the test accuracy. With scikit-learn's default tolerance
    this moved the digits probe by 0.9 points."""
    noise = np.random.default_rng(1).normal(scale=1e-6, size=digits_fs.features.shape).astype(np.float32)
    noisy = digits_fs.features + noise
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    _, base = fit_linear_probe(digits_fs, Cs=(1000.0,))
    _, other = fit_linear_probe(dataclasses.replace(digits_fs, features=noisy), Cs=(1000.0,))
    assert abs(base["test_top1"] - other["test_top1"]) <= 1 / base["n_test"] + 1e-9
