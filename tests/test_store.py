from __future__ import annotations

import h5py
import numpy as np
import pytest

from pipeline.errors import StoreError
from pipeline.store import SCHEMA_VERSION, StoreWriter, is_current, load_store, partial_path

ATTRS = {"backbone": "b", "weights": "w", "preprocessing": "{}", "class_names": '["a", "b"]', "cache_key": "k",
         "data_fingerprint": "f", "feature_dim": 4, "normalized": True}


def _unit(n: int, d: int = 4, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _write(path, ids, *, finish=True, fail=()):
    with StoreWriter(path, dim=4, expected_ids=list(ids) + [f for f, _ in fail], attrs=ATTRS) as w:
        feats = _unit(len(ids))
        half = len(ids) // 2
        w.write(ids[:half], feats[:half], np.zeros(half), ["train"] * half)
        w.write(ids[half:], feats[half:], np.ones(len(ids) - half), ["test"] * (len(ids) - half))
        w.fail([f for f, _ in fail], [r for _, r in fail])
        if finish:
            w.finish()
    return feats


def test_round_trip_keeps_rows_aligned_with_ids(tmp_path):
    path = tmp_path / "s.h5"
    ids = [f"img_{i}" for i in range(10)]
    feats = _write(path, ids, fail=[("broken.png", "UnidentifiedImageError")])
    fs = load_store(path)
    assert list(fs.ids) == ids
    np.testing.assert_array_equal(fs.features, feats)
    assert fs.labels.tolist() == [0] * 5 + [1] * 5
    assert fs.split_names() == ["train", "test"]
    assert fs.failed == {"broken.png": "UnidentifiedImageError"}
    assert fs.attrs["schema_version"] == SCHEMA_VERSION and fs.attrs["committed_rows"] == 10
    assert not partial_path(path).exists()
    with h5py.File(path) as f:
        assert f["ids"].dtype.kind == "O"  # variable-length UTF-8


def test_non_ascii_ids_survive(tmp_path):
    path = tmp_path / "s.h5"
    ids = ["café/été.jpg", "日本/画像.png"]
    _write(path, ids)
    assert list(load_store(path).ids) == ids


def test_missing_rows_never_complete_the_store(tmp_path):
    path = tmp_path / "s.h5"
    with pytest.raises(StoreError, match="neither written nor recorded"):
        with StoreWriter(path, dim=4, expected_ids=["a", "b"], attrs=ATTRS) as w:
            w.write(["a"], _unit(1), np.zeros(1), ["train"])
            w.finish()
    assert not path.exists()
    with pytest.raises(StoreError, match="not complete"):
        load_store(path)


def test_duplicate_and_unexpected_ids_are_refused(tmp_path):
    with StoreWriter(tmp_path / "s.h5", dim=4, expected_ids=["a", "b"], attrs=ATTRS) as w:
        w.write(["a"], _unit(1), np.zeros(1), ["train"])
        with pytest.raises(StoreError, match="twice"):
            w.write(["a"], _unit(1), np.zeros(1), ["train"])
        with pytest.raises(StoreError, match="not expected"):
            w.write(["zzz"], _unit(1), np.zeros(1), ["train"])


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, dim=4, expected_ids=["a"], attrs=ATTRS):
        with pytest.raises(StoreError, match="another process is writing"):
            with StoreWriter(path, dim=4, expected_ids=["a"], attrs=ATTRS):
                pass


def test_foreign_and_missing_files_are_refused(tmp_path):
    with pytest.raises(StoreError, match="no feature store"):
        load_store(tmp_path / "nope.h5")
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(StoreError, match="not an HDF5"):
        load_store(text)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(StoreError, match="not a feature store"):
        load_store(other)


def test_a_store_marked_incomplete_is_refused(tmp_path):
    path = tmp_path / "s.h5"
    _write(path, ["a", "b"])
    with h5py.File(path, "a") as f:
        f.attrs["complete"] = False
    with pytest.raises(StoreError, match="incomplete"):
        load_store(path)


def test_committed_row_count_is_trusted_over_the_shape(tmp_path):
    path = tmp_path / "s.h5"
    _write(path, ["a", "b", "c", "d"])
    with h5py.File(path, "a") as f:
        f.attrs["committed_rows"] = 3
    with pytest.raises(StoreError, match="inconsistent"):
        load_store(path)


def test_is_current_needs_complete_store_with_same_key_and_data(tmp_path):
    path = tmp_path / "s.h5"
    _write(path, ["a", "b"])
    assert is_current(path, key="k", fingerprint="f")
    assert not is_current(path, key="other", fingerprint="f")
    assert not is_current(path, key="k", fingerprint="changed")
    assert not is_current(tmp_path / "missing.h5", key="k", fingerprint="f")
