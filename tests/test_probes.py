from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, RidgeClassifier

from pipeline.config import ProbeConfig
from pipeline.engine.runner import extract_to_store
from pipeline.errors import PipelineError
from pipeline.evaluation.heads import PROBE_TOL
from pipeline.evaluation.predict import load_head, predict_images, predict_store
from pipeline.evaluation.probes import (
    canonical_order,
    few_shot_rows,
    fit_few_shot,
    fit_probe,
    run_probe,
    stratified_holdout,
)
from pipeline.evaluation.torch_head import TorchLogisticRegression
from pipeline.plan import ExtractConfig
from pipeline.store.read import load_store
from tests.conftest import TINY_BACKBONE

SMALL_GRID = (1.0, 100.0)


@pytest.fixture(scope="module")
def digits_fs(digits_store):
    return load_store(digits_store)


@pytest.fixture(scope="module")
def probe_run(digits_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "probe.json"
    return run_probe(ProbeConfig(store=digits_store, out=out, grid=SMALL_GRID))


def test_probe_on_digits_reaches_the_expected_accuracy(probe_run, digits_store):
    result, out = probe_run
    assert result["test_top1"] >= 0.93
    assert result["chosen"] in SMALL_GRID and result["param"] == "C" and result["head"] == "logreg"
    assert result["n_test"] == 540 and result["n_train"] + result["n_val"] == 1257
    assert set(result["test_per_class_accuracy"]) == {str(i) for i in range(10)}
    assert 0.0 <= result["test_balanced_accuracy"] <= 1.0 and result["test_top5"] >= result["test_top1"]
    assert out.exists() and all(p.endswith((".md", ".html")) for p in result["report"])

    saved = load_head(result["head_file"])
    fs = load_store(digits_store)
    test = fs.mask("test")
    pred = saved.classes[np.argmax(saved.scores(fs.features[test]), axis=1)]
    assert np.mean(pred == fs.labels[test]) == pytest.approx(result["test_top1"])  # independent recount
    assert saved.meta["cache_key"] == fs.attrs["cache_key"] and saved.meta["class_names"] == fs.class_names


def test_protocol_equals_an_independent_sklearn_computation(digits_fs, probe_run):
    """Choose C on the same stratified slice with plain scikit-learn, refit on train+val, score test: same C, same
    accuracy, same metrics as the protocol reports."""
    result, _ = probe_run
    train_rows = np.flatnonzero(digits_fs.mask("train"))
    keys = digits_fs.row_keys()
    hold = stratified_holdout(digits_fs.labels[train_rows], [keys[i] for i in train_rows], fraction=0.2, seed=0)
    x, y = digits_fs.features, digits_fs.labels
    tr, va = train_rows[~hold], train_rows[hold]
    accs = {C: LogisticRegression(C=C, max_iter=5000, tol=PROBE_TOL).fit(x[tr], y[tr]).score(x[va], y[va])
            for C in SMALL_GRID}
    best = max(SMALL_GRID, key=lambda C: (accs[C], -C))
    assert result["chosen"] == best
    test = digits_fs.mask("test")
    # the refit sees train+val ordered by content hash, as the protocol documents: L-BFGS's last digits depend on
    # the row order, and on some CPUs that flips a borderline test image
    by_content = train_rows[np.argsort(np.array([keys[i] for i in train_rows], dtype=object), kind="stable")]
    model = LogisticRegression(C=best, max_iter=5000, tol=PROBE_TOL).fit(x[by_content], y[by_content])
    pred = model.predict(x[test])
    assert result["test_top1"] == pytest.approx(np.mean(pred == y[test]), abs=1e-9)
    per_class = [np.mean(pred[y[test] == c] == c) for c in range(10)]
    assert result["test_balanced_accuracy"] == pytest.approx(np.mean(per_class))
    f1 = []
    for c in range(10):
        tp = np.sum((pred == c) & (y[test] == c))
        f1.append(2 * tp / (np.sum(pred == c) + np.sum(y[test] == c)))
    assert result["test_macro_f1"] == pytest.approx(np.mean(f1))
    cm = np.array(result["test_confusion_matrix"])
    assert cm.sum() == test.sum() and np.trace(cm) == np.sum(pred == y[test])


def test_test_labels_never_influence_the_choice_of_C(digits_fs, probe_run):
    base, _ = probe_run
    scrambled = digits_fs.labels.copy()
    test = digits_fs.mask("test")
    scrambled[test] = np.random.default_rng(1).permutation(scrambled[test])
    _, other = fit_probe(dataclasses.replace(digits_fs, labels=scrambled), grid=SMALL_GRID)
    assert other["chosen"] == base["chosen"]
    assert other["val_top1_by_value"] == base["val_top1_by_value"]
    assert other["test_top1"] < base["test_top1"]


def test_torch_head_matches_sklearn_within_half_a_point(digits_fs, probe_run):
    sk, _ = probe_run  # scikit-learn's logistic regression on the same grid
    model, th = fit_probe(digits_fs, head="torch-logreg", grid=SMALL_GRID, device="cpu")
    assert th["chosen"] == sk["chosen"]
    assert abs(th["test_top1"] - sk["test_top1"]) <= 0.005
    assert isinstance(model, TorchLogisticRegression) and isinstance(model.coef_, np.ndarray)
    assert th["refit_converged"]
    # the same objective: on the same rows the two solutions predict (almost) the same classes
    x = digits_fs.features
    y = digits_fs.labels
    ref = LogisticRegression(C=1.0, max_iter=5000, tol=PROBE_TOL).fit(x, y)
    mine = TorchLogisticRegression(C=1.0, device="cpu").fit(x, y)
    assert np.mean(ref.predict(x) == mine.predict(x)) >= 0.995
    np.testing.assert_allclose(mine.predict_proba(x), ref.predict_proba(x), atol=0.02)


@pytest.mark.gpu
def test_the_torch_head_on_cuda_is_the_cpu_solution(digits_fs):
    x, y = digits_fs.features, digits_fs.labels
    cpu = TorchLogisticRegression(C=1.0, device="cpu").fit(x, y)
    gpu = TorchLogisticRegression(C=1.0, device="cuda").fit(x, y)
    assert isinstance(gpu.coef_, np.ndarray) and gpu.converged_
    assert np.mean(cpu.predict(x) == gpu.predict(x)) >= 0.995
    np.testing.assert_allclose(gpu.predict_proba(x), cpu.predict_proba(x), atol=0.02)


@pytest.mark.parametrize("head, grid, floor", [("svm", (0.1, 10.0), 0.93), ("ridge", (0.01, 1.0), 0.93),
                                               ("mlp", (0.01,), 0.9)])
def test_other_heads_run_the_same_protocol(digits_fs, head, grid, floor):
    model, result = fit_probe(digits_fs, head=head, grid=grid)
    assert result["head"] == head and result["chosen"] in grid
    assert result["test_top1"] >= floor
    if head == "ridge":  # independent: the same choice with plain scikit-learn on the same slices
        train_rows = np.flatnonzero(digits_fs.mask("train"))
        keys = digits_fs.row_keys()
        hold = stratified_holdout(digits_fs.labels[train_rows], [keys[i] for i in train_rows], fraction=0.2, seed=0)
        x, y = digits_fs.features, digits_fs.labels
        tr, va = train_rows[~hold], train_rows[hold]
        accs = {a: RidgeClassifier(alpha=a).fit(x[tr], y[tr]).score(x[va], y[va]) for a in grid}
        assert result["chosen"] == max(sorted(grid, reverse=True), key=lambda a: accs[a])


def test_unknown_head_is_a_config_error(digits_fs):
    with pytest.raises(PipelineError, match="unknown head 'xgb'"):
        fit_probe(digits_fs, head="xgb")


def test_few_shot_draws_k_per_class_and_reports_mean_and_spread(digits_fs):
    labels = digits_fs.labels
    pool = canonical_order(digits_fs, digits_fs.mask("train"))  # the order fit_few_shot draws from
    train, val = few_shot_rows(labels, pool, shots=5, seed=3)
    assert np.bincount(labels[train]).tolist() == [5] * 10 and np.bincount(labels[val]).tolist() == [5] * 10
    assert not set(train) & set(val) and set(train) <= set(pool)
    assert not np.array_equal(train, few_shot_rows(labels, pool, shots=5, seed=4)[0])

    result = fit_few_shot(digits_fs, shots=(5,), seeds=(0, 1), grid=(1.0, 100.0))
    runs = result["by_shots"]["5"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    assert result["by_shots"]["5"]["top1_mean"] == pytest.approx(np.mean([r["top1"] for r in runs]))
    assert result["by_shots"]["5"]["top1_std"] == pytest.approx(np.std([r["top1"] for r in runs]))
    low, high = result["by_shots"]["5"]["top1_mean_interval"]  # the test set's sampling, beside the seeds' spread
    assert low <= result["by_shots"]["5"]["top1_mean"] <= high and high - low < 0.15
    assert all(r["intervals"]["top1"][0] <= r["top1"] <= r["intervals"]["top1"][1] for r in runs)
    # seed 0 recomputed independently: the same 50 training rows, the chosen C, plain scikit-learn
    train, _ = few_shot_rows(labels, pool, shots=5, seed=0)
    test = digits_fs.mask("test")
    model = LogisticRegression(C=runs[0]["chosen"], max_iter=5000, tol=PROBE_TOL)
    model.fit(digits_fs.features[train], labels[train])
    assert runs[0]["top1"] == pytest.approx(model.score(digits_fs.features[test], labels[test]))
    assert 0.3 < runs[0]["top1"] < result["by_shots"]["5"]["top1_mean"] + 0.2
    with pytest.raises(PipelineError, match="too few for 500-shot"):
        fit_few_shot(digits_fs, shots=(500,), seeds=(0,))


def test_the_seed_spread_is_the_choice_made_on_each_seeds_slice(digits_fs):
    """No val split: each seed's slice chooses its own C; the head refit with it (on the same train+val rows) is what
    that seed scores. Recomputed for each seed with plain scikit-learn."""
    _, result = fit_probe(digits_fs, grid=SMALL_GRID, val_seeds=(0, 1, 2), resamples=100)
    spread = result["val_seed_spread"]
    assert [r["seed"] for r in spread["seeds"]] == [0, 1, 2]
    test = digits_fs.mask("test")
    assert spread["seeds"][0]["chosen"] == result["chosen"]  # seed 0 is the protocol's own run
    for run in spread["seeds"][1:]:
        _, alone = fit_probe(digits_fs, grid=SMALL_GRID, seed=run["seed"], resamples=0)
        assert run["chosen"] == alone["chosen"] and run["test_top1"] == pytest.approx(alone["test_top1"], abs=1e-12)
    top1 = [r["test_top1"] for r in spread["seeds"]]
    assert spread["top1_std"] == pytest.approx(np.std(top1)) and spread["top1_range"] == [min(top1), max(top1)]
    assert result["test_top1"] == pytest.approx(top1[0], abs=1e-12)
    assert int(test.sum()) == result["n_test"]
    splits = digits_fs.splits.copy()
    splits[np.flatnonzero(digits_fs.mask("train"))[::4]] = "val"
    _, fixed = fit_probe(dataclasses.replace(digits_fs, splits=splits), grid=(1.0,), val_seeds=(0, 1))
    assert fixed["val_seed_spread"]["seeds"] == [] and "fixed" in fixed["val_seed_spread"]["note"]


def test_val_split_is_used_when_present(digits_fs):
    splits = digits_fs.splits.copy()
    train_rows = np.flatnonzero(digits_fs.mask("train"))
    splits[train_rows[::4]] = "val"
    _, result = fit_probe(dataclasses.replace(digits_fs, splits=splits), grid=(1.0,))
    assert result["val_source"] == "val split" and result["n_val"] == len(train_rows[::4])


def test_stratified_holdout_is_fixed_and_stratified():
    labels = np.repeat([0, 1, 2], [10, 20, 1])
    keys = [f"{i:032x}" for i in range(len(labels))]
    a = stratified_holdout(labels, keys, fraction=0.2, seed=0)
    assert np.array_equal(a, stratified_holdout(labels, keys, fraction=0.2, seed=0))
    assert [int(a[labels == c].sum()) for c in (0, 1, 2)] == [2, 4, 0]
    order = np.random.default_rng(0).permutation(len(labels))  # the slice follows the rows, not their order
    b = stratified_holdout(labels[order], [keys[i] for i in order], fraction=0.2, seed=0)
    assert np.array_equal(b, a[order])


def test_store_without_test_split_is_refused(digits_fs):
    splits = np.where(digits_fs.mask("test"), "val", digits_fs.splits).astype(object)
    with pytest.raises(PipelineError, match="no labelled test split"):
        fit_probe(dataclasses.replace(digits_fs, splits=splits), grid=(1.0,))


def test_probe_result_does_not_hinge_on_float_noise(digits_fs):
    """Weakly regularised fits must reach the optimum: features perturbed at float-rounding level (what a traced or
    another batch-size forward pass gives) must not move the test accuracy. With scikit-learn's default tolerance
    this moved the digits probe by 0.9 points."""
    noise = np.random.default_rng(1).normal(scale=1e-6, size=digits_fs.features.shape).astype(np.float32)
    noisy = digits_fs.features + noise
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    _, base = fit_probe(digits_fs, grid=(1000.0,))
    _, other = fit_probe(dataclasses.replace(digits_fs, features=noisy), grid=(1000.0,))
    assert abs(base["test_top1"] - other["test_top1"]) <= 1 / base["n_test"] + 1e-9


def test_saved_head_predicts_a_store_and_new_image_files(probe_run, digits_store, digits_root):
    result, _ = probe_run
    head = load_head(result["head_file"])
    rows = predict_store(head, digits_store, top=3)
    test = [r for r in rows if r["split"] == "test"]
    assert len(test) == 540 and all(len(r["predictions"]) == 3 for r in rows)
    assert np.mean([r["predictions"][0][0] == r["label"] for r in test]) == pytest.approx(result["test_top1"])

    # image files go through the same backbone: their predictions equal those of their stored rows
    picked = test[::60]
    files = [digits_root / r["id"] for r in picked]
    from_files = predict_images(head, files, device="cpu")
    assert [f["predictions"][0][0] for f in from_files] == [r["predictions"][0][0] for r in picked]


def test_head_refuses_features_of_another_backbone(probe_run, small_digits_root, tmp_path):
    result, _ = probe_run
    other = tmp_path / "tiny.h5"
    extract_to_store(ExtractConfig.of(data=small_digits_root, out=other, backbone=TINY_BACKBONE, random_init=True,
                                   workers=0, progress=False))
    with pytest.raises(PipelineError, match="fitted on backbone 'efficientnet_lite0'"):
        predict_store(load_head(result["head_file"]), other)


def test_unreadable_head_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.head.safetensors"
    bad.write_bytes(b"not a head")
    with pytest.raises(PipelineError, match="not a usable probe head"):
        load_head(bad)
    with pytest.raises(PipelineError, match="no probe head"):
        load_head(tmp_path / "missing.head.safetensors")


def test_default_grid_is_the_documented_one():
    from pipeline.evaluation.heads import HEADS

    documented = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)  # README: "C, 1e-2 … 1e4", log-spaced
    assert HEADS["logreg"].grid == documented and HEADS["torch-logreg"].grid == documented
    assert HEADS["ridge"].grid == (0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 100.0)  # "alpha, 1e-4 … 1e2"


@pytest.mark.parametrize("head", ["logreg", "torch-logreg", "svm", "ridge", "mlp"])
@pytest.mark.parametrize("classes", [2, 5])
def test_saved_heads_score_exactly_as_their_estimators(digits_fs, head, classes, tmp_path):
    """The safetensors head (arrays, no pickle) reproduces its estimator's scores, hence its predictions."""
    from pipeline.evaluation.head_file import head_bytes, load_saved_head
    from pipeline.evaluation.heads import class_scores, fit_quietly, head_spec
    from pipeline.evaluation.probes import head_for

    rows = np.flatnonzero(digits_fs.labels < classes)
    x, y = digits_fs.features[rows], digits_fs.labels[rows]
    model = head_spec(head).make(head_spec(head).grid[3], max_iter=300, seed=0, device="cpu")
    fit_quietly(model, x, y)
    path = tmp_path / "h.head.safetensors"
    path.write_bytes(head_bytes(head_for(model, fs=digits_fs, result={"head": head, "param": "C", "chosen": 1.0,
                                                                       "test_top1": 0.5})))
    saved = load_saved_head(path)
    np.testing.assert_allclose(saved.scores(x), class_scores(model, x), rtol=1e-5, atol=1e-6)
    assert np.array_equal(saved.classes[saved.scores(x).argmax(axis=1)], model.predict(x))
