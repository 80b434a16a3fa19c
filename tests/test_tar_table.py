"""Tar shards listed as columns: the keys, `shard:key` paths, labels, splits and stamps as arrays and the members as
a `MemberColumn` (not a `Sample` and a `TarMember` per key), giving the same samples, store listing and fingerprint
as the tuples they replace."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from pipeline.engine.resolve import data_fingerprint, decoding_policy, source_listing
from pipeline.errors import DataError
from pipeline.sources import open_source
from pipeline.sources.base import ListOptions, Source
from pipeline.sources.lookup import sample_path
from pipeline.sources.members import MEMBER, MemberBuilder, MemberColumn, TarMember
from pipeline.sources.table import UNDECIDED, SampleTable, TextColumn
from pipeline.sources.tar import folder_labels, scan_tar_shards
from tests.sources_data import write_shard


def _members(n: int, problems: dict[int, str]) -> MemberColumn:
    builder = MemberBuilder()
    builder.add(0, list(range(0, 10 * n, 10)), [3] * n, problems)
    builder.add(1, [512, 0], [7, 0], {1: "no image member for key 'z'"})
    return builder.finish()


def test_member_column_rows_problems_take_and_pickle():
    column = _members(5, {2: "no image member for key 'c'"})
    assert len(column) == 7 and column.rows.dtype == MEMBER
    assert column[1] == TarMember(0, 10, 3) and column[-1] == TarMember(1, 0, 0, "no image member for key 'z'")
    assert column[2].problem == "no image member for key 'c'" and column[5] == TarMember(1, 512, 7)
    picked = column.take(np.array([6, 2, 0, 2]))
    assert list(picked) == [column[6], column[2], column[0], column[2]]
    assert picked.problems == {0: "no image member for key 'z'", 1: column[2].problem, 3: column[2].problem}
    assert list(column[1:3]) == [column[1], column[2]] and column.take([-1])[0] == column[6]
    assert pickle.loads(pickle.dumps(column)) == column
    with pytest.raises(IndexError):
        column[7]
    with pytest.raises(IndexError):
        column.take([7])
    with pytest.raises(ValueError, match="1-d array"):
        MemberColumn(np.zeros((2, 3), dtype=np.int64))
    many = _members(100_000, {})
    assert len(pickle.dumps(many)) < 21 * len(many) + 1000  # the 20-byte rows, not an object per member


def _shards(tmp_path):
    write_shard(tmp_path / "train-000.tar", [(f"k{i}.jpg", bytes([i]) * (i + 2)) for i in range(6)]
                + [(f"k{i}.cls", str(i % 2).encode()) for i in range(6)] + [("lost.cls", b"1")])
    write_shard(tmp_path / "test-001.tar", [(f"t{i}.png", bytes([9, i]) * 3) for i in range(4)]
                + [(f"t{i}.cls", str(i % 2).encode()) for i in range(4)])
    return tmp_path


def test_tar_shards_list_as_a_table_of_members(tmp_path):
    source = open_source(str(_shards(tmp_path)))
    samples = source.samples
    assert isinstance(samples, SampleTable) and isinstance(samples.locators, MemberColumn)
    ids = [f"t{i}" for i in range(4)] + [f"k{i}" for i in range(6)] + ["lost"]  # shards in name order
    assert list(samples.ids) == ids and source.class_names == ("0", "1")
    assert samples.labels.tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1]
    assert source.split_counts() == {"train": 7, "test": 4} and source.split_source == "shards"
    test, train = (os.path.abspath(tmp_path / name) for name in ("test-001.tar", "train-000.tar"))
    expected = [f"{test}:{i}" for i in ids[:4]] + [f"{train}:{i}" for i in ids[4:]]
    assert list(samples.paths) == expected == list(source_listing(source).paths)
    assert [sample_path("tar", s) for s in samples] == expected
    lost = source.samples[10]
    assert lost.locator.problem == "no image member for key 'lost' (members: cls)" and lost.stamp[0] == 0
    assert samples.stamps[:, 0].tolist() == [6, 6, 6, 6, 2, 3, 4, 5, 6, 7, 0]  # each image member's size
    assert samples.stamps[:, 1].tolist() == [os.stat(test).st_mtime_ns] * 4 + [os.stat(train).st_mtime_ns] * 7
    at = source.locators(np.array([1, 7]))
    assert isinstance(at, MemberColumn) and [source.reader.read(m) for m in at] == [bytes([9, 1]) * 3, bytes([3]) * 5]
    assert [source.reader.read(s.locator) for s in samples.take([4, 3])] == [bytes([0]) * 2, bytes([9, 3]) * 3]
    assert source.content_hash(10) == ""  # a key without an image: no hash, so the row is recomputed (and fails)


def test_tar_table_listing_equals_its_tuples(tmp_path):
    """The table's store listing and fingerprint equal those of the same samples as tuples (the listing's other
    code path), for given, stratified and undecided splits."""
    data = str(_shards(tmp_path))
    decoding = decoding_policy({})
    for split in ("auto", "stratified", "none"):
        table = open_source(data, ListOptions(split=split, test_fraction=0.4))
        tuples = Source(table.kind, table.root, tuple(table.samples), table.class_names, table.split_source,
                        table.reader)
        assert isinstance(tuples.samples[0].locator, TarMember)
        assert data_fingerprint(table, source_listing(table), decoding) == \
            data_fingerprint(tuples, source_listing(tuples), decoding)
    stratified = open_source(data, ListOptions(split="stratified", test_fraction=0.4))
    again = open_source(data, ListOptions(split="stratified", test_fraction=0.4, seed=1))
    assert stratified.split_counts()["test"] >= 3 and list(stratified.samples.splits) != list(again.samples.splits)


def test_folder_labels_from_member_folders():
    classes, labels, splits = folder_labels(["data/train/cat/1", "data/train/dog/2", "data/test/cat/3",
                                             "data/dog/4"])
    assert classes == {"cat": 0, "dog": 1} and labels.tolist() == [0, 1, 0, 1]
    assert splits.tolist() == [0, 0, 2, UNDECIDED]
    classes, labels, _ = folder_labels(["only/a/x", "only/b/y"])  # the shared folder is not the class
    assert classes == {"a": 0, "b": 1} and labels.tolist() == [0, 1]
    classes, labels, _ = folder_labels(["a/x", "a/y"])  # one folder: it is the class, though shared
    assert classes == {"a": 0} and labels.tolist() == [0, 0]
    assert folder_labels(["a/x", "y"]) is None
    assert folder_labels([]) is None


def test_many_shards_are_read_by_processes_as_they_are_here(tmp_path, caplog):
    """From `parallel_from` keys (judged by the first shard) the other shards are read by forkserver processes; the
    listing is the one read here, with each shard's own class numbering mapped to the listing's, and a bad shard's
    error is the same."""
    named = {}
    for s in range(7):
        keys = [f"s{s}k{i}" for i in range(5)]
        named.update({k: ("cat", "dog", "emu")[(s + i) % 3 if s % 2 else (s * i) % 2] for i, k in enumerate(keys)})
        write_shard(tmp_path / f"{('train', 'test')[s % 3 == 1]}-{s:03d}.tar",
                    [(f"{k}.jpg", bytes([s, i]) * (i + 1)) for i, k in enumerate(keys)]
                    + [(f"{k}.cls", named[k].encode()) for k in keys])  # shards name their classes in other orders
    shards = sorted(tmp_path.glob("*.tar"))
    decoding = decoding_policy({})
    here = scan_tar_shards(shards, workers=1)
    with caplog.at_level("INFO"):
        there = scan_tar_shards(shards, workers=2, parallel_from=20)
    assert "in this process" not in caplog.text
    assert list(there.samples) == list(here.samples) and len(here) == 35
    assert there.class_names == here.class_names == ("cat", "dog", "emu")
    assert {s.id: here.class_names[s.label] for s in there.samples} == named
    assert data_fingerprint(there, source_listing(there), decoding) == \
        data_fingerprint(here, source_listing(here), decoding)
    raw = shards[4].read_bytes()
    shards[4].write_bytes(raw[:len(raw) // 2])  # cut: refused, by a process as here
    with pytest.raises(DataError, match=f"{shards[4].name} is not a readable tar file") as by_process:
        scan_tar_shards(shards, workers=2, parallel_from=20)
    with pytest.raises(DataError) as by_this:
        scan_tar_shards(shards, workers=1)
    assert str(by_process.value) == str(by_this.value)
    assert type(by_process.value.__cause__).__name__ == "_RemoteTraceback"  # raised in a listing process
    assert type(by_this.value.__cause__).__name__ != "_RemoteTraceback"


def test_shard_paths_read_and_hash_as_the_joined_texts(monkeypatch):
    """`ShardPaths` (each shard's path once, and the keys) reads, takes and hashes as the TextColumn of the joined
    `shard.tar:key` texts, block by block (blocks of 3 rows here)."""
    import hashlib

    from pipeline.sources import members

    monkeypatch.setattr(members, "_BLOCK", 3)
    prefixes = ["/data/s-000.tar:", "/données/été-001.tar:", "/x\\xff.tar:"]
    keys = TextColumn.from_strings([f"k{i}" if i % 4 else f"dir/clé{i}" for i in range(11)])
    shards = np.array([0, 0, 1, 2, 1, 1, 0, 2, 2, 0, 1], dtype=np.int32)
    paths = members.ShardPaths(prefixes, shards, keys)
    joined = [prefixes[s] + k for s, k in zip(shards.tolist(), keys, strict=True)]
    assert list(paths) == joined and [paths[i] for i in range(11)] == joined and paths[-1] == joined[-1]
    assert list(paths.block(2, 7)) == joined[2:7] and list(paths.block(9, 40)) == joined[9:]
    assert list(paths.take(np.array([10, 0, 3]))) == [joined[10], joined[0], joined[3]] and list(paths[1:3]) == \
        joined[1:3]
    ours, theirs = hashlib.sha256(), hashlib.sha256()
    paths.digest_into(ours)
    TextColumn.from_strings(joined).digest_into(theirs)
    assert ours.hexdigest() == theirs.hexdigest()
    with pytest.raises(IndexError):
        paths[11]


def test_the_split_by_content_hashes_tar_members_a_shard_at_a_time_as_the_reader_reads_them(tmp_path):
    """`MemberFiles.digests`, here and in two processes, is each member's content hash of what `TarReader.read`
    returns (none for a key without an image or an image over the size limit), in row order across shards; the
    keys the split by content takes from it, with hashes the store records for some keys, are the ones the
    members read one at a time give."""
    from pipeline.engine.decode import content_hash
    from pipeline.sources.base import content_keys, file_content_keys
    from pipeline.sources.members import MemberFiles

    for number in range(3):
        members = [(f"s{number}k{i}.jpg", bytes([number, i]) * (i + 1)) for i in range(7)]
        members += [("s0dup.jpg" if number == 0 else "s2dup.jpg", b"same bytes")] if number != 1 else []
        members += [(f"s{number}k{i}.cls", str(i % 2).encode()) for i in range(7)]
        write_shard(tmp_path / f"shard-{number}.tar", members + ([("lost.cls", b"1")] if number == 1 else []))
    options = ListOptions(split="stratified", max_file_bytes=12)  # the 7th image of each shard (14 bytes): refused
    source = open_source(str(tmp_path), options)
    members, reader, ids, stamps = source.samples.locators, source.reader, source.samples.ids, source.samples.stamps

    def one_at_a_time(i):
        try:
            return content_hash(reader.read(members[i], 12))
        except (OSError, ValueError):
            return ""

    expected = [one_at_a_time(i) for i in range(len(members))]
    assert expected.count("") == 4 and len(set(expected) - {""}) == len(members) - 5  # the two duplicates: one
    files = MemberFiles(reader.shards, members)
    for workers, parallel_from in ((1, 1 << 30), (2, 1)):
        digests = files.digests(12, workers, parallel_from)
        assert [d[:16].tobytes().hex() if d[16] else "" for d in digests] == expected
    assert [d[:16].tobytes().hex() for d in files.take([5, 2]).digests(12, 1)] == [expected[5], expected[2]]
    recorded = {ids[3]: (*stamps[3].tolist(), "ab" * 16), ids[9]: (*stamps[9].tolist(), "cd" * 16)}
    known = ListOptions(split="stratified", max_file_bytes=12, known=recorded)
    old = content_keys(known, ids, stamps, lambda i: reader.read(members[i], 12))
    new = file_content_keys(known, ids, stamps, files, workers=2)
    assert [new(i) for i in range(len(ids))] == [old(i) for i in range(len(ids))]
    assert new(3) == "ab" * 16 and new(9) == "cd" * 16 and new(4) == expected[4]
