"""The store format and writer on synthetic rows: round trips, completion, reuse, shards, dtypes, verify, streaming."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from pipeline.errors import StoreError
from pipeline.store.read import is_current, iter_store, load_store
from pipeline.store.reuse import Listing
from pipeline.store.schema import SCHEMA_VERSION, partial_path, shards_dir
from pipeline.store.verify import store_info, verify_store
from pipeline.store.writer import StoreWriter

DIM = 8
ATTRS = {"backbone": "b", "weights": "w", "preprocessing": "{}", "class_names": '["a", "b"]', "cache_key": "k",
         "data_fingerprint": "f", "feature_dim": DIM, "normalized": True}


def _unit(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _listing(ids, *, mtime=0, labels=None) -> Listing:
    n = len(ids)
    stamps = np.column_stack([np.full(n, 100), np.full(n, mtime)]).astype(np.int64)
    labels = np.array([i % 2 for i in range(n)] if labels is None else labels, dtype=np.int64)
    return Listing(ids=list(ids), labels=labels, splits=["train" if i % 3 else "test" for i in range(n)],
                   stamps=stamps)


def _features_for(ids) -> np.ndarray:
    """Deterministic features per id, so that any run computes the same row for the same id."""
    return np.stack([_unit(1, seed=sum(map(ord, i)) * 7919 + len(i))[0] for i in ids])


def _write_all(path, listing, *, reuse=True, batch=4, fail=(), stop_after=None, **kwargs):
    """Run a writer like extraction does; `stop_after` rows simulates a crash (no finish)."""
    with StoreWriter(path, listing=listing, dim=DIM, attrs=ATTRS, **kwargs) as w:
        todo = w.prepare(reuse=reuse)
        failing = [p for p in todo if listing.ids[p] in fail]
        w.fail(failing, ["UnidentifiedImageError"] * len(failing))
        todo = [p for p in todo if listing.ids[p] not in fail]
        for start in range(0, len(todo), batch):
            if stop_after is not None and start >= stop_after:
                return w
            pos = todo[start:start + batch]
            w.write(pos, _features_for([listing.ids[p] for p in pos]), ["ab" * 16] * len(pos))
        w.finish()
    return w


def _as_dict(fs):
    return {i: fs.features[k] for k, i in enumerate(fs.ids)}


def test_round_trip_keeps_rows_aligned_with_ids(tmp_path):
    path = tmp_path / "s.h5"
    ids = [f"img_{i}" for i in range(10)] + ["broken.png"]
    _write_all(path, _listing(ids), fail={"broken.png"})
    fs = load_store(path)
    assert list(fs.ids) == ids[:10]
    np.testing.assert_array_equal(fs.features, _features_for(ids[:10]))
    assert fs.labels.tolist() == [i % 2 for i in range(10)]
    assert fs.failed == {"broken.png": "UnidentifiedImageError"}
    assert fs.attrs["schema_version"] == SCHEMA_VERSION and fs.attrs["committed_rows"] == 10
    assert fs.attrs["layout"] == "single" and fs.attrs["feature_dtype"] == "float32"
    assert not partial_path(path).exists()
    with h5py.File(path) as f:
        assert f["ids"].dtype.kind == "O"  # variable-length UTF-8
        assert f["files/size"][0] == 100
    assert verify_store(path) == []


def test_non_ascii_ids_survive(tmp_path):
    path = tmp_path / "s.h5"
    ids = ["café/été.jpg", "日本/画像.png"]
    _write_all(path, _listing(ids))
    assert list(load_store(path).ids) == ids


def test_missing_rows_never_complete_the_store(tmp_path):
    path = tmp_path / "s.h5"
    with pytest.raises(StoreError, match="neither written nor recorded"):
        with StoreWriter(path, listing=_listing(["a", "b"]), dim=DIM, attrs=ATTRS) as w:
            w.prepare()
            w.write([0], _unit(1), ["x" * 32])
            w.finish()
    assert not path.exists()
    with pytest.raises(StoreError, match="not complete.*resume"):
        load_store(path)


def test_rows_written_twice_or_outside_the_listing_are_refused(tmp_path):
    with StoreWriter(tmp_path / "s.h5", listing=_listing(["a", "b"]), dim=DIM, attrs=ATTRS) as w:
        w.prepare()
        w.write([0], _unit(1), ["x" * 32])
        with pytest.raises(StoreError, match="written twice"):
            w.write([0], _unit(1), ["x" * 32])
        with pytest.raises(StoreError, match="outside the listing"):
            w.fail([5], ["x"])
        with pytest.raises(StoreError, match=r"expects \[1, 8\]"):
            w.write([1], _unit(2), ["x" * 32])


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, listing=_listing(["a"]), dim=DIM, attrs=ATTRS):
        with pytest.raises(StoreError, match="another process is writing"):
            with StoreWriter(path, listing=_listing(["a"]), dim=DIM, attrs=ATTRS):
                pass


def test_foreign_missing_and_old_files_are_refused(tmp_path):
    with pytest.raises(StoreError, match="no feature store"):
        load_store(tmp_path / "nope.h5")
    text = tmp_path / "x.h5"
    text.write_text("hello")
    with pytest.raises(StoreError, match="not an HDF5"):
        load_store(text)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(StoreError, match="not a feature store"):
        load_store(other)
    old = tmp_path / "old.h5"
    with h5py.File(old, "w") as f:
        f["features"] = np.zeros((1, 2))
        f.attrs["schema_version"] = 1
    with pytest.raises(StoreError, match="schema version 1.*run extract again to rebuild"):
        load_store(old)


def test_a_store_marked_incomplete_is_refused(tmp_path):
    path = tmp_path / "s.h5"
    _write_all(path, _listing(["a", "b"]))
    with h5py.File(path, "a") as f:
        f.attrs["complete"] = False
    with pytest.raises(StoreError, match="marked incomplete"):
        load_store(path)
    assert "marked incomplete" in verify_store(path)[0]


def test_resume_trusts_the_committed_count_over_the_shape(tmp_path):
    """A kill between the data write and the count update leaves datasets one batch longer than committed."""
    path = tmp_path / "s.h5"
    ids = [f"i{k:02d}" for k in range(20)]
    _write_all(path, _listing(ids), stop_after=8)
    with h5py.File(partial_path(path), "a") as f:  # a half-written batch: data appended, count not updated
        for name in ("features", "ids", "labels", "splits", "files/size", "files/mtime_ns", "files/hash"):
            f[name].resize(f[name].shape[0] + 4, axis=0)
        f["features"][-4:] = 7.0
        assert f.attrs["committed_rows"] == 8
    w = _write_all(path, _listing(ids))
    assert w.resumed == 8 and w.computed == 12
    fs = load_store(path)
    assert sorted(fs.ids) == ids
    np.testing.assert_array_equal(fs.features, _features_for(fs.ids))
    assert verify_store(path) == []


def test_resume_drops_rows_of_images_that_changed_or_left_meanwhile(tmp_path):
    path = tmp_path / "s.h5"
    ids = [f"i{k:02d}" for k in range(20)]
    _write_all(path, _listing(ids), stop_after=12)
    listing = _listing(ids[2:], mtime=0)  # i00, i01 deleted
    listing.stamps[3, 1] = 99  # i05 modified (no paths: a new stamp means new content)
    w = _write_all(path, listing)
    assert w.resumed == 9 and w.computed == 9
    fs = load_store(path)
    assert sorted(fs.ids) == ids[2:]
    assert verify_store(path) == []


def test_incremental_keeps_unchanged_rows_bit_for_bit(tmp_path):
    path = tmp_path / "s.h5"
    ids = [f"i{k:02d}" for k in range(10)]
    _write_all(path, _listing(ids))
    before = _as_dict(load_store(path))
    with h5py.File(path, "a") as f:  # mark stored features so that a recompute would show
        f["features"][0] = f["features"][0] * -1
    marked = load_store(path).features[0].copy()
    new_ids = ids[1:] + ["new_a", "new_b"]
    w = _write_all(path, _listing(new_ids, labels=[1] * len(new_ids)))
    assert (w.kept, w.computed, w.resumed) == (9, 2, 0)
    fs = load_store(path)
    after = _as_dict(fs)
    assert set(after) == set(new_ids)
    for i in ids[1:]:
        np.testing.assert_array_equal(after[i], before[i])
    assert (fs.labels == 1).all()  # labels follow the current listing
    w = _write_all(path, _listing(ids, labels=[0] * len(ids)))
    np.testing.assert_array_equal(_as_dict(load_store(path))["i00"], _features_for(["i00"])[0])
    assert w.computed == 1 and not np.array_equal(marked, _features_for(["i00"])[0])


def test_changed_stamp_with_same_content_is_kept_when_a_hasher_is_given(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    paths = []
    for k in range(4):
        paths.append(images / f"{k}.bin")
        paths[-1].write_bytes(bytes([k]) * 50)
    from pipeline.engine.decode import content_hash, file_stamp

    def hash_file(path):
        return content_hash(path.read_bytes())

    def listing():
        stamps = np.array([file_stamp(p) for p in paths], dtype=np.int64)
        return Listing(ids=[p.name for p in paths], labels=np.zeros(4, dtype=np.int64), splits=["train"] * 4,
                       stamps=stamps, hasher=lambda i: hash_file(paths[i]))

    path = tmp_path / "s.h5"
    with StoreWriter(path, listing=listing(), dim=DIM, attrs=ATTRS) as w:
        todo = w.prepare()
        w.write(todo, _unit(4), [hash_file(p) for p in paths])
        w.finish()
    import os

    os.utime(paths[0], ns=(1, 1))  # touched only
    paths[1].write_bytes(b"changed")  # really changed
    with StoreWriter(path, listing=listing(), dim=DIM, attrs=ATTRS) as w:
        todo = w.prepare()
        assert [paths[p].name for p in todo] == ["1.bin"] and w.kept == 3
        w.write(todo, _unit(1), [hash_file(paths[1])])
        w.finish()
    with h5py.File(path) as f:
        assert f["files/mtime_ns"][list(f["ids"].asstr()[...]).index("0.bin")] == 1  # the new stamp is recorded


@pytest.mark.parametrize("shard_rows", [3, 5, 100])
def test_sharded_store_reads_like_a_single_file(tmp_path, shard_rows):
    ids = [f"i{k:02d}" for k in range(17)]
    single, sharded = tmp_path / "one.h5", tmp_path / "many.h5"
    _write_all(single, _listing(ids))
    _write_all(sharded, _listing(ids), shard_rows=shard_rows)
    a, b = load_store(single), load_store(sharded)
    assert list(a.ids) == list(b.ids)
    np.testing.assert_array_equal(a.features, b.features)
    files = sorted(shards_dir(sharded).glob("*.h5"))
    assert len(files) == -(-17 // shard_rows) == store_info(sharded)["shards"]
    assert verify_store(sharded) == []


def test_sharded_resume_keeps_complete_shards_and_loses_at_most_the_shard_in_progress(tmp_path):
    path = tmp_path / "s.h5"
    ids = [f"i{k:02d}" for k in range(30)]
    _write_all(path, _listing(ids), shard_rows=8, batch=3, stop_after=21)  # 21 rows: 2 full shards + 5 rows
    assert len(list(shards_dir(path).glob("*.h5"))) == 3 and not path.exists()
    w = _write_all(path, _listing(ids), shard_rows=8)
    assert w.resumed == 21 and w.computed == 9
    assert len(w.layout.kept_shards) == 2  # the two complete shards are kept as files; the partial one was copied
    fs = load_store(path)
    assert sorted(fs.ids) == ids and verify_store(path) == []
    np.testing.assert_array_equal(fs.features, _features_for(fs.ids))
    assert sum(1 for _ in shards_dir(path).glob("*.h5")) == 4  # the interrupted shard was collected


def test_sharded_incremental_rewrites_only_touched_shards(tmp_path):
    path = tmp_path / "s.h5"
    ids = [f"i{k:02d}" for k in range(24)]
    _write_all(path, _listing(ids), shard_rows=8)
    first = {p.name: p.stat().st_mtime_ns for p in shards_dir(path).glob("*.h5")}
    w = _write_all(path, _listing([i for i in ids if i != "i20"] + ["new"]), shard_rows=8)
    assert (w.kept, w.computed) == (23, 1) and len(w.layout.kept_shards) == 2
    now = {p.name: p.stat().st_mtime_ns for p in shards_dir(path).glob("*.h5")}
    assert len(set(first) & set(now)) == 2 and all(first[n] == now[n] for n in set(first) & set(now))
    assert "i20" not in set(load_store(path).ids) and verify_store(path) == []


def test_a_missing_shard_is_caught_not_read_as_nan(tmp_path):
    path = tmp_path / "s.h5"
    _write_all(path, _listing([f"i{k}" for k in range(10)]), shard_rows=4)
    sorted(shards_dir(path).glob("*.h5"))[0].unlink()  # the first shard: 4 rows
    with pytest.raises(StoreError, match="shard .* is missing"):
        load_store(path)
    assert "missing" in verify_store(path)[0]
    assert not is_current(path, key="k", fingerprint="f")
    w = _write_all(path, _listing([f"i{k}" for k in range(10)]), shard_rows=4)  # extract again repairs it
    assert w.computed == 4 and verify_store(path) == []


@pytest.mark.parametrize("dtype, compression", [("float16", "none"), ("float32", "lzf"), ("float16", "lzf")])
def test_float16_and_lzf_are_recorded_and_close_to_float32(tmp_path, dtype, compression):
    ids = [f"i{k:03d}" for k in range(50)]
    _write_all(tmp_path / "ref.h5", _listing(ids))
    path = tmp_path / "s.h5"
    _write_all(path, _listing(ids), feature_dtype=dtype, compression=compression, shard_rows=20)
    ref, fs = load_store(tmp_path / "ref.h5"), load_store(path)
    assert fs.features.dtype == np.float32 and fs.attrs["feature_dtype"] == dtype
    assert fs.attrs["compression"] == compression
    cos = (ref.features * fs.features).sum(axis=1) / np.linalg.norm(fs.features, axis=1)
    assert cos.min() > 0.9999
    with h5py.File(next(shards_dir(path).glob("*.h5"))) as f:
        assert f["features"].dtype == np.dtype(dtype)
        assert f["features"].compression == (None if compression == "none" else compression)
    assert verify_store(path) == []


@pytest.mark.parametrize(
    "corrupt, needle",
    [
        (lambda f: f["features"].__setitem__(3, np.full(DIM, np.nan)), "non-finite"),
        (lambda f: f["features"].__setitem__(4, np.full(DIM, 0.9)), "not unit-norm"),
        (lambda f: f["ids"].__setitem__(5, "i00"), "duplicate id"),
        (lambda f: f["labels"].__setitem__(6, 7), "label(s) outside"),
        (lambda f: f["splits"].__setitem__(1, "holdout"), "split value"),
        (lambda f: f["ids"].resize(9, axis=0), "inconsistent"),
    ],
)
def test_verify_catches_a_corrupted_store(tmp_path, corrupt, needle):
    path = tmp_path / "s.h5"
    _write_all(path, _listing([f"i{k:02d}" for k in range(10)]))
    assert verify_store(path) == []
    with h5py.File(path, "a") as f:
        corrupt(f)
    problems = verify_store(path)
    assert problems and any(needle in p for p in problems), problems


def test_verify_catches_shard_rows_out_of_line_with_the_entry(tmp_path):
    path = tmp_path / "s.h5"
    _write_all(path, _listing([f"i{k:02d}" for k in range(10)]), shard_rows=5)
    with h5py.File(path, "a") as f:
        ids = f["ids"][...]
        f["ids"][...] = ids[::-1]
    assert any("misaligned" in p for p in verify_store(path))


def test_iter_store_streams_the_same_rows_in_blocks(tmp_path):
    path = tmp_path / "s.h5"
    _write_all(path, _listing([f"i{k:02d}" for k in range(23)]), shard_rows=6)
    full = load_store(path)
    blocks = list(iter_store(path, rows=5))
    assert [b.start for b in blocks] == [0, 5, 10, 15, 20]
    np.testing.assert_array_equal(np.concatenate([b.features for b in blocks]), full.features)
    test_only = list(iter_store(path, rows=7, splits=("test",)))
    assert sum(len(b.ids) for b in test_only) == int(full.mask("test").sum())
    assert all((b.splits == "test").all() for b in test_only)


def test_info_describes_complete_and_unfinished_stores(tmp_path):
    path = tmp_path / "s.h5"
    _write_all(path, _listing([f"i{k:02d}" for k in range(12)]), stop_after=8)
    info = store_info(path)
    assert info["complete"] is False and info["rows"] == 8
    _write_all(path, _listing([f"i{k:02d}" for k in range(12)]), fail={"i10"})
    info = store_info(path)
    assert info["complete"] is True and info["rows"] == 11 and info["failed"] == 1 and info["dim"] == DIM
    assert info["size_bytes"] == path.stat().st_size and info["classes"] == 2


def test_each_shard_is_a_segment_that_holds_its_own_rows(tmp_path):
    """store/layouts + store/segment: the layout recorded names a LAYOUTS class, and each shard file of a sharded
    store holds its rows' ids, stamps and hashes (read alone, in row order), so it can be reused without the entry."""
    from pipeline.store.layouts import LAYOUTS
    from pipeline.store.schema import shard_list
    from pipeline.store.segment import read_index

    path = tmp_path / "s.h5"
    ids = [f"img_{i:02d}" for i in range(13)]
    _write_all(path, _listing(ids, mtime=7), shard_rows=5)
    attrs = load_store(path).attrs
    assert attrs["layout"] in LAYOUTS and LAYOUTS[attrs["layout"]].__name__ == "Sharded"
    shards = shard_list(attrs)
    assert [s["rows"] for s in shards] == [5, 5, 3]
    seen = []
    for shard in shards:
        shard_attrs, shard_ids, stamps, hashes = read_index(shards_dir(path) / shard["file"])
        assert int(shard_attrs["committed_rows"]) == shard["rows"] == len(shard_ids)
        assert stamps.tolist() == [[100, 7]] * len(shard_ids) and list(hashes) == [b"ab" * 16] * len(shard_ids)
        seen += shard_ids
    assert seen == ids
