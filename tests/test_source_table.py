"""sources/table: a manifest's listing as columns (text buffers, codes, a stamp array) gives the same samples, the
same store listing and the same fingerprint as the tuple of `Sample`s it replaces."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.engine.resolve import data_fingerprint, decoding_policy, source_listing
from pipeline.engine.shared import SharedText, share_locators, share_text
from pipeline.errors import DataError
from pipeline.sources import open_source
from pipeline.sources.base import ListOptions, Sample
from pipeline.sources.table import FileColumn, SampleTable, SplitColumn, TextColumn
from tests.sources_data import write_manifest


def test_text_column_round_trips_text_and_selects_rows():
    texts = ["a", "", "é/ü.png", "x" * 300, "bad\udcff name", "日本"]
    column = TextColumn.from_strings(texts)
    assert len(column) == 6 and list(column) == texts and column == texts
    assert [column[i] for i in range(-6, 6)] == texts + texts
    assert column[np.int64(2)] == "é/ü.png"
    assert list(column.take([5, 0, 0, 3])) == [texts[5], texts[0], texts[0], texts[3]]
    assert list(column[1:4]) == texts[1:4] and list(column.block(4, 99)) == texts[4:]
    with pytest.raises(IndexError):
        column[6]
    valid = [t for t in texts if "\udcff" not in t]
    arrow = TextColumn.from_strings(valid).to_arrow()
    assert arrow.to_pylist() == valid
    sliced = pa.chunked_array([pa.array(valid[:2]), pa.array(valid[2:])]).combine_chunks().slice(1)
    assert TextColumn.from_arrow(sliced) == valid[1:]  # an arrow array with an offset into its buffers
    assert SplitColumn(np.array([0, 2, 1, 3], dtype=np.int8)) == ["train", "test", "val", ""]
    import pickle

    assert pickle.loads(pickle.dumps(column)) == texts  # sources travel to worker processes


def _old_fingerprint(source, decoding) -> str:
    """The fingerprint as it is defined row by row (as it was computed before the listing was columns), and the
    paths the store records."""
    digest = hashlib.sha256(json.dumps(list(source.class_names)).encode())
    digest.update(json.dumps(decoding.as_attrs(), sort_keys=True).encode())
    for s in source.samples:
        size, mtime = s.stamp
        digest.update(f"{s.id}\0{s.label}\0{s.split}\0{size}\0{mtime}\n".encode())
    paths = [str(s.path).encode() for s in source.samples]
    digest.update(b"paths\0" + np.cumsum([0] + [len(p) for p in paths], dtype="<i8").tobytes())
    digest.update(b"".join(paths))
    return digest.hexdigest()[:32]


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_a_manifest_lists_as_a_table_with_the_samples_and_fingerprint_of_tuples(tmp_path, fmt):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(40):
        (tmp_path / "img" / f"{i}.png").write_bytes(b"x" * (i + 1))
        row = {"path": f"img/{i}.png" if i % 5 else f"./img//{i}.png", "label": ["cat", " dog", "-1", ""][i % 4],
               "split": ["train", "test ", "val"][i % 3] if i > 2 else "train"}
        if i % 7 == 0:
            row["id"] = f"custom-{i}"
        rows.append(row)
    source = open_source(write_manifest(tmp_path / f"m.{fmt}", rows))
    assert isinstance(source.samples, SampleTable)
    assert source.class_names == ("cat", "dog")
    expected = []
    for i, row in enumerate(rows):
        file = tmp_path / "img" / f"{i}.png"
        st = file.stat()
        label = {"cat": 0, " dog": 1}.get(row["label"], -1)
        expected.append(Sample(row.get("id") or f"img/{i}.png", str(file), label, row["split"].strip(), None,
                               (st.st_size, st.st_mtime_ns)))
    assert list(source.samples) == expected and source.samples[7] == expected[7]
    assert source.split_counts() == {"train": 16, "val": 12, "test": 12} == {
        k: sum(s.split == k for s in expected) for k in ("train", "val", "test")}
    assert source.locators([3, 0]) == [expected[3].path, expected[0].path]
    as_tuples = dataclasses.replace(source, samples=tuple(source.samples))
    decoding = decoding_policy({})
    listing, tuple_listing = source_listing(source), source_listing(as_tuples)
    assert list(listing.ids) == tuple_listing.ids and list(listing.splits) == tuple_listing.splits
    assert np.array_equal(listing.stamps, tuple_listing.stamps) and np.array_equal(listing.labels,
                                                                                  tuple_listing.labels)
    fingerprint = data_fingerprint(source, listing, decoding)
    assert fingerprint == data_fingerprint(as_tuples, tuple_listing, decoding) == _old_fingerprint(source, decoding)
    picked = source.samples.take([5, 1])
    assert list(picked) == [expected[5], expected[1]]
    with_ids = any("id" in row for row in rows)  # the ids are the path texts only without an id column
    assert with_ids and source.samples.paths.texts is not source.samples.ids
    ids_only = open_source(write_manifest(tmp_path / f"n.{fmt}", [{k: v for k, v in r.items() if k != "id"}
                                                                   for r in rows]))
    assert ids_only.samples.paths.texts is ids_only.samples.ids  # one column: no absolute path per row
    assert list(ids_only.samples.paths) == [s.path for s in expected]
    part = ids_only.samples.take([9, 2])
    assert part.paths.texts is part.ids and list(part) == [expected[9], expected[2]]


def test_a_file_column_reads_and_hashes_as_the_absolute_paths(monkeypatch):
    """sources/table: `FileColumn` (a folder and path texts) reads by row, slice, block and take, iterates and
    hashes as the TextColumn of the absolute paths, in several digest blocks."""
    import pickle
    from pathlib import Path

    import pipeline.sources.table as table

    texts = ["a.png", "/abs/b.png", ".", "x/é/c.png", "d e/f.png", *[f"n/{i}.png" for i in range(40)]]
    for base in ("/data/set", "/"):
        column = FileColumn(base, TextColumn.from_strings(texts))
        absolute = [t if t.startswith("/") else base if t == "." else str(Path(base) / t) for t in texts]
        whole = TextColumn.from_strings(absolute)
        assert list(column) == absolute and [column[i] for i in range(len(texts))] == absolute
        assert column[-1] == absolute[-1] and list(column[1:4]) == absolute[1:4]
        assert column.block(2, 9) == absolute[2:9] and list(column.take([4, 0])) == [absolute[4], absolute[0]]
        assert column == whole and column != absolute[:-1]
        for rows in (7, 1 << 20):
            monkeypatch.setattr(table, "_DIGEST_ROWS", rows)
            mine, theirs = hashlib.sha256(), hashlib.sha256()
            column.digest_into(mine)
            whole.digest_into(theirs)
            assert mine.hexdigest() == theirs.hexdigest()
        assert pickle.loads(pickle.dumps(column)) == absolute


def test_a_parquet_manifest_with_numeric_labels_codes_them_as_text(tmp_path):
    """Integer labels (and -1 for unlabelled) and float labels with NaN give the classes a CSV of the same labels
    gives, in numeric order."""
    import pyarrow.parquet as pq

    for i in range(6):
        (tmp_path / f"{i}.png").write_bytes(b"x")
    paths = [f"{i}.png" for i in range(6)]
    pq.write_table(pa.table({"path": paths, "label": [10, 2, -1, 2, 10, 9]}), tmp_path / "i.parquet")
    pq.write_table(pa.table({"path": paths, "label": [10.0, 2.0, float("nan"), 2.0, 10.0, 9.0]}),
                   tmp_path / "f.parquet")
    for name in ("i.parquet", "f.parquet"):
        source = open_source(str(tmp_path / name), ListOptions(split="none"))
        assert source.class_names == ("2", "9", "10"), name
        assert [s.label for s in source.samples] == [2, 0, -1, 0, 2, 1], name


def test_the_first_bad_row_is_the_one_named(tmp_path):
    """A bad split and an empty path are refused in row order, as the row-by-row scan did; duplicate ids are
    named; a manifest arrow cannot parse (a short row) is read by the csv module and listed the same way."""
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "m.csv").write_text("path,split\na.png,train\na.png,tset\n,train\n")
    with pytest.raises(DataError, match=r"row 2 has split 'tset'"):
        open_source(str(tmp_path / "m.csv"))
    (tmp_path / "m.csv").write_text("path,split\na.png,train\n ,train\na.png,tset\n")
    with pytest.raises(DataError, match=r"row 2 has an empty path"):
        open_source(str(tmp_path / "m.csv"))
    (tmp_path / "m.csv").write_text("path,id\na.png,x\na.png, x\n")
    with pytest.raises(DataError, match=r"1 id\(s\) occur more than once .*'x'"):
        open_source(str(tmp_path / "m.csv"))
    (tmp_path / "m.csv").write_text("path,id,label\na.png,x,1\na.png\n")
    source = open_source(str(tmp_path / "m.csv"), ListOptions(split="none"))
    assert isinstance(source.samples, SampleTable)
    assert [(s.id, s.label) for s in source.samples] == [("x", 0), ("a.png", -1)]


def _stored_paths(store) -> dict[str, str]:
    import h5py

    with h5py.File(store, "r") as f:
        return dict(zip(f["ids"].asstr()[:], f["files/path"].asstr()[:], strict=True))


@pytest.mark.parametrize("shard_rows", [None, 5])
def test_the_store_records_where_each_image_lives_so_search_never_lists_the_source_again(tmp_path, tiny,
                                                                                        shard_rows, monkeypatch):
    """store: a complete store has a path column (the file of each row, from the listing, single-file and sharded
    alike); search, export paths and report thumbnails read it, with the manifest gone; images moved under the same
    ids and stamps (a rename keeps both) make the store out of date, and the run that follows keeps every row and
    records the new paths."""
    import os
    import shutil

    from PIL import Image

    from pipeline.engine.embed import images_for_ids
    from pipeline.engine.runner import extract_to_store
    from pipeline.index.search import search_store
    from pipeline.interchange.export import _paths
    from pipeline.plan import ExtractConfig, Provenance

    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        folder = tmp_path / "old" / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append({"path": f"old/{'ab'[i % 2]}/{i}.png", "id": f"img{i}", "label": f"c{i % 3}",
                     "split": "train" if i < 8 else "test"})
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "s.h5"

    def extract():
        return extract_to_store(ExtractConfig.of(data=str(manifest), out=out, workers=0, batch_size=4,
                                                 progress=False, shard_rows=shard_rows), backbone=tiny)

    assert extract().computed == 12
    expected = {r["id"]: str(tmp_path / r["path"]) for r in rows}
    assert _stored_paths(out) == expected
    manifest.rename(tmp_path / "gone.csv")  # the source cannot be listed again: the store must say where
    made = Provenance.from_store(out)
    hits = search_store(store=out, ids=["img3"], k=3)[0]["hits"]
    assert hits[0]["id"] == "img3" and all(h["path"] == expected[h["id"]] for h in hits)
    assert _paths(made, out) == expected
    import pipeline.store.columns
    from pipeline.sources.lookup import stored_paths

    monkeypatch.setattr(pipeline.store.columns, "SCAN_ROWS", 5)  # the ids matched in blocks of 5 rows
    assert stored_paths(out, ["img11", "img3", "nope", "img3"]) == {k: expected[k] for k in ("img3", "img11")}
    assert stored_paths(out, []) == {}
    monkeypatch.undo()
    thumbs = images_for_ids(made, ["img1", "img4"], store=out)
    assert sorted(thumbs) == ["img1", "img4"] and thumbs["img1"].size == (96, 96)
    (tmp_path / "gone.csv").rename(manifest)
    shutil.move(tmp_path / "old", tmp_path / "new")  # same files: same sizes and mtimes, same ids
    manifest.write_text(manifest.read_text().replace("old/", "new/"))
    assert os.stat(tmp_path / "new/a/0.png").st_mtime_ns
    again = extract()
    assert not again.skipped and again.computed == 0 and again.kept == 12
    assert _stored_paths(out) == {k: v.replace("/old/", "/new/") for k, v in expected.items()}
    assert extract().skipped


def test_distinct_finds_a_duplicate_among_many_and_none_where_there_is_none():
    texts = [f"r{i:07d}" for i in range(200_000)]
    assert TextColumn.from_strings(texts).distinct()
    assert not TextColumn.from_strings([*texts, "r0123456"]).distinct()
    assert not TextColumn.from_strings(["", ""]).distinct() and TextColumn.from_strings(["a"]).distinct()


def test_the_stats_of_millions_of_files_are_shared_among_processes_with_the_same_stamps(tmp_path):
    """sources/stamps: from PARALLEL_STAT_ROWS the stats run in forkserver processes, a block at a time; the stamps
    are those of one process, row for row, missing files (-1, -1) included."""
    from pipeline.sources.stamps import file_stamps, stamps_in_processes

    paths = []
    for i in range(300):
        file = tmp_path / f"{i % 120}.bin"
        if i < 120 and i % 7:
            file.write_bytes(b"x" * i)
        paths.append(str(file))
    files = TextColumn.from_strings(paths)
    serial = file_stamps(files)
    assert (serial[:, 0] == -1).sum() == sum(1 for i in range(300) if (i % 120) % 7 == 0)
    assert np.array_equal(stamps_in_processes(files, 2, step=37), serial)
    assert np.array_equal(stamps_in_processes(TextColumn.from_strings([]), 2), np.zeros((0, 2), dtype=np.int64))


def test_the_split_by_content_hashes_files_in_processes_as_one_process_would(tmp_path, caplog):
    """sources/stamps + base: from PARALLEL_HASH_ROWS rows (here from 3,000) the files a stratified split needs are
    read and hashed in forkserver processes; each digest is `content_hash` of the file's bytes, and a file that is
    missing, over the size limit, a FIFO or a folder has none. Keys the store being updated records are not read
    again."""
    from pipeline.engine.decode import content_hash
    from pipeline.sources.base import file_content_keys
    from pipeline.sources.stamps import file_digests

    names = []
    for i in range(60):
        (tmp_path / f"{i}.bin").write_bytes(bytes([i % 40]) * (1 + i % 40))  # 40 distinct contents, some twice
        names.append(f"{i}.bin")
    (tmp_path / "big.bin").write_bytes(b"y" * 500)
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "folder").mkdir()
    names += ["big.bin", "pipe", "folder", "missing.bin"]
    rows = 5_000
    files = FileColumn(str(tmp_path), TextColumn.from_strings([names[i % len(names)] for i in range(rows)]))
    expected = [content_hash((tmp_path / name).read_bytes()) if name.endswith(".bin") and name not in
                ("big.bin", "missing.bin") else "" for name in names]
    with caplog.at_level("INFO"):
        shared = file_digests(files, 100, workers=2, step=997, parallel_from=3_000)  # in processes
    assert "in this process" not in caplog.text
    alone = file_digests(files.take(np.arange(200)), 100, workers=2, parallel_from=3_000)  # few rows: here
    assert np.array_equal(alone, shared[:200])
    got = [d[:16].tobytes().hex() if d[16] else "" for d in shared]
    assert got == [expected[i % len(names)] for i in range(rows)]
    assert not shared[[60, 61, 62, 63], :].any()  # nothing but zeros for the files not read

    ids = TextColumn.from_strings([f"r{i}" for i in range(200)])
    part = files.take(np.arange(200))
    stamps = np.array([[1, 2]] * 200, dtype=np.int64)
    known = ListOptions(known={"r0": (1, 2, "ab" * 16), "r1": (1, 3, "cd" * 16)}, max_file_bytes=100)  # r1: changed
    key_of = file_content_keys(known, ids, stamps, part)
    assert [key_of(i) for i in range(3)] == ["ab" * 16, expected[1], expected[2]]
    assert [key_of(i) for i in range(60, 64)] == ["", "", "", ""]


def test_a_text_builder_of_many_blocks_is_the_column_of_all_their_strings():
    from pipeline.sources.table import TextBuilder, release_freed_memory

    rng = np.random.default_rng(0)
    blocks = [[f"{'é' * int(rng.integers(0, 4))}{i}-{j}" if j % 7 else "" for j in range(int(rng.integers(0, 50)))]
              for i in range(40)]
    builder = TextBuilder()
    for block in blocks:
        array = pa.array(block, pa.string())
        builder.append(array.slice(1) if len(block) > 3 else array)  # sliced arrays start at an offset
    expected = [s for block in blocks for s in (block[1:] if len(block) > 3 else block)]
    column = builder.finish()
    release_freed_memory()
    assert column == TextColumn.from_strings(expected) and list(column) == expected
    assert column.offsets.dtype == np.int64 and len(builder.finish()) == 0


def _folder(root, names: list[str]) -> None:
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes([i]) * (i + 1))


def _as_tuples(root, options=None):
    from pipeline.sources.folder import _as_samples

    return _as_samples(root, options or ListOptions())


def _same_listing(table, tuples) -> None:
    """The same samples (the tuples' Paths as text), store listing and fingerprint."""
    assert isinstance(table.samples, SampleTable) and isinstance(tuples.samples, tuple)
    assert list(table.samples) == [s._replace(path=str(s.path)) for s in tuples.samples]
    assert (table.class_names, table.split_source, table.split_counts(), table.warnings) == (
        tuples.class_names, tuples.split_source, tuples.split_counts(), tuples.warnings)
    decoding = decoding_policy({})
    assert data_fingerprint(table, source_listing(table), decoding) == \
        data_fingerprint(tuples, source_listing(tuples), decoding)


def test_an_image_folder_lists_as_columns_with_the_samples_and_fingerprint_of_tuples(tmp_path, monkeypatch):
    from pipeline.sources.folder import _Columns

    monkeypatch.setattr(_Columns, "BLOCK_ROWS", 3)  # several blocks of ids, classes split across them
    root = tmp_path / "split"
    # walk order is not id order: 'a.png' sorts before 'a/' as text, 'B' before 'a', numeric classes by number
    _folder(root, ["train/10/a/z.png", "train/10/a.png", "train/10/a-b.png", "train/2/B.jpg", "train/2/é.png",
                   "train/2/deep/er/x.webp", "test/2/q.png", "test/10/r.png", "val/10/s.png", "train/10/.hidden.png",
                   "train/10/notes.txt"])
    outside = tmp_path / "outside"
    _folder(outside, ["o.png"])
    (root / "train" / "2" / "linked").symlink_to(outside, target_is_directory=True)  # not walked: a warning
    table = open_source(str(root))
    assert table.class_names == ("2", "10") and len(table) == 9
    assert list(table.samples.ids)[:3] == ["test/10/r.png", "test/2/q.png", "train/10/a-b.png"]
    assert table.warnings and "linked folder" in table.warnings[0]
    _same_listing(table, _as_tuples(root))
    flat = tmp_path / "flat"  # no split folders: stratified by content, the same way for both
    _folder(flat, [f"{c}/{i:02d}.png" for c in ("cat", "dog") for i in range(12)])
    options = ListOptions(test_fraction=0.25, seed=3)
    stratified = open_source(str(flat), options)
    assert stratified.split_counts() == {"train": 18, "test": 6}
    _same_listing(stratified, _as_tuples(flat, options))


def test_a_folder_with_names_that_are_not_utf8_or_links_out_lists_as_samples(tmp_path):
    root = tmp_path / "odd"
    _folder(root, ["cat/a.png", "dog/b.png"])
    (root / "cat").joinpath(b"bad\xff.png".decode("utf-8", "surrogateescape")).write_bytes(b"z")
    source = open_source(str(root))
    assert isinstance(source.samples, tuple) and [s.id for s in source.samples] == [
        "cat/a.png", "cat/bad\\xff.png", "dog/b.png"]
    linked = tmp_path / "linked"
    _folder(linked, ["cat/a.png", "dog/b.png"])
    (tmp_path / "secret.png").write_bytes(b"s")
    (linked / "dog" / "c.png").symlink_to(tmp_path / "secret.png")
    source = open_source(str(linked))
    assert isinstance(source.samples, tuple)
    refused = [s for s in source.samples if s.locator is not None]
    assert [s.id for s in refused] == ["dog/c.png"] and "outside the data root" in str(refused[0].locator.reason)
    trusted = open_source(str(linked), ListOptions(follow_links=True))
    assert isinstance(trusted.samples, SampleTable) and "dog/c.png" in list(trusted.samples.ids)


def test_a_tables_locators_are_its_path_column_which_the_decode_workers_read_whole(tmp_path):
    from PIL import Image
    from torchvision.transforms import ToTensor

    from pipeline.engine.decode import ImageDataset
    from pipeline.engine.loader import make_loader

    (tmp_path / "img").mkdir()
    rows = []
    for i in range(24):
        Image.new("RGB", (8, 8), (i * 10, 255 - i * 10, i)).save(tmp_path / "img" / f"{i}.png")
        rows.append({"path": f"img/{i}.png", "label": f"c{i % 2}", "split": "test" if i % 4 == 0 else "train"})
    rows.append({"path": "img/missing-pixels.png", "label": "c0", "split": "train"})
    (tmp_path / "img" / "missing-pixels.png").write_bytes(b"not a png")
    source = open_source(write_manifest(tmp_path / "m.csv", rows))
    locators = source.locators()
    assert isinstance(locators, FileColumn) and list(locators) == [str(tmp_path / r["path"]) for r in rows]
    picked = source.locators(np.array([24, 3, 3]))
    assert isinstance(picked, FileColumn) and list(picked) == [str(tmp_path / rows[k]["path"]) for k in (24, 3, 3)]
    assert list(source.locators(iter([7]))) == [str(tmp_path / "img" / "7.png")]
    dataset = ImageDataset(locators, ToTensor())
    assert dataset.locators is locators  # not copied into a list of strings
    as_list = ImageDataset(list(locators), ToTensor())
    import pickle

    assert len(pickle.dumps(dataset)) < len(pickle.dumps(as_list))  # relative texts + offsets, not absolute paths

    def read(ds, workers):
        batches = list(make_loader(ds, batch_size=4, workers=workers, pin_memory=False))
        return ([int(i) for b in batches for i in b.indices], [h for b in batches for h in b.hashes],
                [i for b in batches for i, _ in b.failures])

    here, there = read(as_list, 0), read(dataset, 2)  # forkserver workers unpickle the column
    assert here == there and here[0] == list(range(24)) and here[2] == [24] and len(set(here[1])) == 24
    shared = ImageDataset(share_locators(locators), ToTensor())  # what an extraction with workers hands them
    assert len(pickle.dumps(shared.locators)) < 400 < len(pickle.dumps(locators))  # a path, not the column
    assert read(shared, 2) == here  # the workers map the file and read the same images


def _unlinked_files() -> set[str]:
    """The unlinked temporary files this process holds open (as `share_text` makes them: no name in the folder)."""
    links = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            links.add(os.readlink(fd))
        except OSError:  # closed meanwhile (the fd used to list the folder)
            pass
    folder = os.path.realpath(tempfile.gettempdir())
    return {link for link in links if link.startswith(folder + "/") and link.endswith(" (deleted)")}


def test_a_shared_path_column_reads_as_the_column_in_any_process_and_leaves_no_file(tmp_path):
    import multiprocessing
    import pickle

    texts = [f"cls{i % 7}/img_{i}.png" for i in range(70_000)] + ["caf\udce9.png", "/abs/x.png", ".", "ünï.png"]
    column = TextColumn.from_strings(texts)
    before = _unlinked_files()
    shared = share_text(column)
    assert isinstance(shared, SharedText) and shared == column and list(shared) == texts
    assert [shared[i] for i in (0, -1, -4)] == [texts[0], texts[-1], texts[-4]] and list(shared[5:9]) == texts[5:9]
    assert list(shared.take([70_003, 2])) == [texts[-1], texts[2]] and shared.block(69_999, 70_002) == \
        TextColumn.from_strings(texts[69_999:70_002])
    (ours,) = _unlinked_files() - before  # one file, never with a name in the temporary folder
    assert os.readlink(shared.where) == ours
    assert len(pickle.dumps(shared)) < 200
    files = FileColumn(str(tmp_path), shared)
    with multiprocessing.get_context("forkserver").Pool(1) as pool:  # another process maps the same file
        there = pool.apply(_read_column, (share_locators(files),))
    assert there == ("SharedText", list(files)[:3], list(files)[-4:], len(texts))
    del shared, files, there
    gc.collect()
    assert ours not in _unlinked_files()  # gone with the last holder


def _read_column(files: FileColumn) -> tuple:
    return type(files.texts).__name__, list(files)[:3], [files[i] for i in range(-4, 0)], len(files)


def test_an_extraction_with_workers_shares_the_path_column_for_the_run_only(tmp_path, small_digits_root, tiny):
    from pipeline.engine.runner import extract_to_store
    from pipeline.plan import ExtractConfig

    held: list[set[str]] = []
    before = _unlinked_files()
    config = ExtractConfig.of(data=small_digits_root, out=tmp_path / "s.h5", workers=2, progress=False,
                              batch_size=16)
    result = extract_to_store(config, backbone=tiny,
                              on_progress=lambda done, total: held.append(_unlinked_files() - before))
    assert result.computed == 100 and held and all(files == held[0] and len(files) == 1 for files in held)
    gc.collect()
    assert not held[0] & _unlinked_files()  # the run's file is gone with it
