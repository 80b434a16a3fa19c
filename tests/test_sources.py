"""Every source kind (folder, manifest, tar shards, torchvision) lists the same images the same way and extracts into
the same store format; source-level problems are errors before any compute."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets as tvd

from pipeline.cli import main
from pipeline.engine.runner import extract_to_store
from pipeline.errors import DataError
from pipeline.plan import ExtractConfig
from pipeline.sources import open_source
from pipeline.sources.base import ListOptions
from pipeline.sources.tar import expand_braces, tar_shards
from pipeline.sources.torchvision import scan_torchvision
from pipeline.store.read import load_store
from pipeline.store.verify import verify_store
from tests.helpers import make_folder
from tests.sources_data import (
    digit_images,
    png_bytes,
    webdataset_members,
    write_cifar,
    write_manifest,
    write_mnist,
    write_shard,
)


@pytest.fixture(scope="module")
def same_images(tmp_path_factory):
    """24 real digits (classes 0-2) as a split folder, and the same bytes as a manifest and as tar shards."""
    root = tmp_path_factory.mktemp("same")
    images, labels = digit_images(200)
    keep = np.flatnonzero(labels < 3)[:24]
    rows, by_split = [], {"train": [], "test": []}
    for n, k in enumerate(keep):
        split = "test" if n % 4 == 0 else "train"
        rel = f"{split}/{labels[k]}/img_{k:03d}.png"
        (root / "folder" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "folder" / rel).write_bytes(png_bytes(images[k]))
        rows.append({"path": f"folder/{rel}", "label": str(labels[k]), "split": split, "id": rel})
        by_split[split].append((rel.removesuffix(".png"), png_bytes(images[k]), int(labels[k])))
    write_manifest(root / "list.csv", rows)
    for split, items in by_split.items():
        keys, data, labs = zip(*items, strict=True)
        write_shard(root / "shards" / f"{split}-000000.tar", webdataset_members(list(keys), list(data), list(labs)))
    return root


def _extract(data, out: Path, tiny, **kwargs):
    config = ExtractConfig.of(data=data, out=out, workers=kwargs.pop("workers", 0),
                              batch_size=kwargs.pop("batch_size", 8), progress=False, **kwargs)
    return extract_to_store(config, backbone=tiny)


def test_folder_manifest_and_tar_give_the_same_rows_and_features(same_images, tmp_path, tiny):
    stores = {}
    for kind, data in (("folder", same_images / "folder"), ("manifest", same_images / "list.csv"),
                       ("tar", same_images / "shards")):
        out = tmp_path / f"{kind}.h5"
        result = _extract(data, out, tiny)
        assert result.rows == 24 and result.failed == 0
        assert verify_store(out) == []
        fs = load_store(out)
        assert fs.attrs["source"] == kind
        stores[kind] = {i.removesuffix(".png"): (f, int(lab), s)
                        for i, f, lab, s in zip(fs.ids, fs.features, fs.labels, fs.splits, strict=True)}
        assert fs.class_names == ["0", "1", "2"]
    assert stores["folder"].keys() == stores["manifest"].keys() == stores["tar"].keys()
    for key, (feat, label, split) in stores["folder"].items():
        for other in ("manifest", "tar"):
            f2, l2, s2 = stores[other][key]
            assert (label, split) == (l2, s2), (other, key)
            np.testing.assert_allclose(feat, f2, atol=1e-6)


def test_ids_do_not_depend_on_workers_or_batch_size(same_images, tmp_path, tiny):
    a = _extract(same_images / "shards", tmp_path / "a.h5", tiny, workers=0, batch_size=1)
    b = _extract(same_images / "shards", tmp_path / "b.h5", tiny, workers=2, batch_size=5)
    fa, fb = load_store(Path(a.store)), load_store(Path(b.store))
    assert list(fa.ids) == list(fb.ids)
    np.testing.assert_allclose(fa.features, fb.features, atol=1e-5)


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_manifest_formats_with_absolute_relative_and_unlabelled_rows(tmp_path, tiny, fmt):
    images, _ = digit_images(6)
    rows = []
    for k in range(6):
        path = tmp_path / "imgs" / f"{k}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(png_bytes(images[k]))
        rows.append({"path": str(path) if k % 2 else f"imgs/{k}.png", "label": "" if k == 5 else ["cat", "dog"][k % 2]})
    manifest = write_manifest(tmp_path / f"m.{fmt}", rows)
    source = open_source(manifest)
    assert source.kind == "manifest" and source.class_names == ("cat", "dog")
    assert [s.label for s in source.samples] == [0, 1, 0, 1, 0, -1]
    assert source.samples[0].id == "imgs/0.png" and source.samples[1].id == str(tmp_path / "imgs" / "1.png")
    result = _extract(manifest, tmp_path / "m.h5", tiny)
    assert result.rows == 6
    assert load_store(tmp_path / "m.h5").labels.tolist() == [0, 1, 0, 1, 0, -1]


def test_unlabelled_manifest_extracts_for_retrieval(tmp_path, tiny):
    images, _ = digit_images(4)
    for k in range(4):
        (tmp_path / f"{k}.png").write_bytes(png_bytes(images[k]))
    manifest = write_manifest(tmp_path / "m.jsonl", [{"path": f"{k}.png"} for k in range(4)])
    _extract(manifest, tmp_path / "u.h5", tiny)
    fs = load_store(tmp_path / "u.h5")
    assert fs.labels.tolist() == [-1] * 4 and fs.class_names == []
    assert verify_store(tmp_path / "u.h5") == []


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"path": "a.png"}, {"path": "a.png"}], "occur more than once"),
        ([{"path": "a.png", "id": "x"}, {"path": "b.png", "id": "x"}], "occur more than once"),
        ([{"path": "a.png"}, {"path": "missing.png"}], r"1 path\(s\) .* do not exist \(e.g. row 2"),
        ([{"path": "a.png", "split": "train"}, {"path": "b.png", "split": "holdout"}], "valid splits are"),
        ([{"path": "a.png", "split": "train"}, {"path": "b.png"}], "have a split .* and the others do not"),
        ([{"path": "a.png", "label": "cat", "split": "train"}, {"path": "b.png", "label": "dog", "split": "test"}],
         "no training images"),
        ([{"path": ""}], "empty path"),
        ([{"file": "a.png"}], "no 'path' column"),
    ],
)
def test_bad_manifests_are_errors_before_any_compute(tmp_path, rows, message):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(png_bytes(digit_images(1)[0][0]))
    manifest = write_manifest(tmp_path / "m.csv", rows)
    with pytest.raises(DataError, match=message):
        extract_to_store(ExtractConfig.of(data=manifest, out=tmp_path / "s.h5", progress=False))
    assert not (tmp_path / "s.h5").exists() and not (tmp_path / "s.h5.partial").exists()


def test_bad_manifest_files_are_clear_errors(tmp_path):
    bad_json = tmp_path / "m.jsonl"
    bad_json.write_text('{"path": "a.png"}\n[1, 2]\n')
    with pytest.raises(DataError, match="line 2 is a JSON list"):
        open_source(bad_json)
    broken = tmp_path / "n.jsonl"
    broken.write_text('{"path": "a.png"\n')
    with pytest.raises(DataError, match="line 1 is not valid JSON"):
        open_source(broken)
    empty = tmp_path / "e.csv"
    empty.write_text("path,label\n")
    with pytest.raises(DataError, match="lists no images"):
        open_source(empty)


def test_tar_shards_labels_splits_and_patterns(tmp_path):
    images, labels = digit_images(8)
    data = [png_bytes(im) for im in images]
    write_shard(tmp_path / "s-000.tar", webdataset_members([f"k{i}" for i in range(4)], data[:4],
                                                           [None] * 4, json_meta=[{"label": "a", "split": "train"},
                                                                                  {"label": "b", "split": "train"},
                                                                                  {"label": "a", "split": "test"},
                                                                                  {"label": "b", "split": "val"}]))
    write_shard(tmp_path / "s-001.tar", webdataset_members([f"dir/k{i}" for i in range(4, 8)], data[4:], [None] * 4,
                                                           json_meta=[{"cls": "a", "split": "train"}] * 4))
    assert expand_braces("x-{000..002}.tar") == ["x-000.tar", "x-001.tar", "x-002.tar"]
    assert expand_braces("{a,b}-{0..1}") == ["a-0", "a-1", "b-0", "b-1"]
    for spec in (str(tmp_path / "s-{000..001}.tar"), str(tmp_path / "s-*.tar"), tmp_path):
        assert [p.name for p in tar_shards(spec)] == ["s-000.tar", "s-001.tar"]
    source = open_source(str(tmp_path / "s-{000..001}.tar"))
    assert [s.id for s in source.samples] == ["k0", "k1", "k2", "k3", "dir/k4", "dir/k5", "dir/k6", "dir/k7"]
    assert source.class_names == ("a", "b")
    assert [s.split for s in source.samples][:4] == ["train", "train", "test", "val"]
    assert source.reader.read(source.samples[5].locator) == data[5]  # read in place, at the member's offset
    with pytest.raises(DataError, match="do not exist"):
        tar_shards(str(tmp_path / "s-{000..003}.tar"))


def test_tar_problems(tmp_path, tiny):
    images, labels = digit_images(6)
    data = [png_bytes(im) for im in images]
    write_shard(tmp_path / "a" / "x.tar", webdataset_members(["k0", "k1"], data[:2], [0, 1]))
    write_shard(tmp_path / "a" / "y.tar", webdataset_members(["k1", "k2"], data[2:4], [0, 1]))
    with pytest.raises(DataError, match=r"occur more than once .*'k1' in x.tar, y.tar"):
        open_source(tmp_path / "a")
    import gzip

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.tar.gz").write_bytes(gzip.compress((tmp_path / "a" / "x.tar").read_bytes()))
    with pytest.raises(DataError, match="is compressed"):
        open_source(tmp_path / "b" / "z.tar.gz")
    cut = tmp_path / "c" / "cut.tar"
    write_shard(cut, webdataset_members(["k0", "k1", "k2"], data[:3], [0, 1, 0]))
    cut.write_bytes(cut.read_bytes()[:700])  # inside the second member's header/data
    with pytest.raises(DataError, match="not a readable tar file"):
        open_source(cut)
    # a key with a label but no image is a recorded failure, not a silent omission
    members = webdataset_members(["k0", "k1", "k2", "k3"], data[:4], [0, 1, 0, 1]) + [("k4.cls", b"1")]
    write_shard(tmp_path / "d" / "w.tar", members)
    result = _extract(tmp_path / "d" / "w.tar", tmp_path / "w.h5", tiny)
    assert result.rows == 4 and result.failed == 1
    assert result.failures[0][0] == "k4" and "no image member" in result.failures[0][1]


def test_tar_rerun_is_a_noop_and_a_grown_shard_computes_only_new_keys(tmp_path, tiny):
    images, labels = digit_images(10)
    data = [png_bytes(im) for im in images]
    shard = tmp_path / "train-0.tar"
    write_shard(shard, webdataset_members([f"k{i}" for i in range(8)], data[:8], [int(x) for x in labels[:8]]))
    first = _extract(shard, tmp_path / "t.h5", tiny)
    assert first.computed == 8
    assert _extract(shard, tmp_path / "t.h5", tiny).skipped
    write_shard(shard, webdataset_members([f"k{i}" for i in range(10)], data, [int(x) for x in labels]))
    os.utime(shard, ns=(1, 1))
    grown = _extract(shard, tmp_path / "t.h5", tiny)
    assert (grown.computed, grown.kept, grown.rows) == (2, 8, 10)


def test_mnist_and_fashion_mnist_from_their_raw_files(tmp_path, tiny):
    write_mnist(tmp_path, "MNIST")
    write_mnist(tmp_path, "FashionMNIST", n_train=12, n_test=6)
    source = scan_torchvision("MNIST", ListOptions(root=tmp_path))
    assert source.split_counts() == {"train": 40, "test": 20}
    assert source.class_names[0] == "0 - zero"
    assert source.samples[0].id == "train/00000" and source.samples[40].id == "test/00000"
    images, labels = digit_images(60)
    assert [s.label for s in source.samples] == labels.tolist()
    image = source.reader.read(source.samples[3].locator)
    np.testing.assert_array_equal(np.asarray(image), images[3])
    fashion = scan_torchvision("FashionMNIST", ListOptions(root=tmp_path))
    assert len(fashion) == 18 and fashion.class_names[0] == "T-shirt/top"
    # through the command line, decoded in a worker process that constructs the dataset itself
    out = tmp_path / "mnist.h5"
    assert main(["-q", "extract", "--data", "torchvision:MNIST", "--root", str(tmp_path), "--out", str(out),
                 "--backbone", "timm:test_resnet", "--random-init", "--workers", "1", "--batch-size", "16"]) == 0
    fs = load_store(out)
    assert len(fs.ids) == 60 and fs.attrs["source"] == "torchvision" and verify_store(out) == []
    assert fs.labels.tolist() == labels.tolist()


@pytest.mark.parametrize("base", [tvd.CIFAR10, tvd.CIFAR100])
def test_cifar_from_its_pickled_batches(tmp_path, tiny, base):
    local = write_cifar(tmp_path, base, per_file=12)
    source = scan_torchvision(local, ListOptions(root=tmp_path))
    n_train, n_test = 12 * len(base.train_list), 12 * len(base.test_list)
    assert source.split_counts() == {"train": n_train, "test": n_test}
    assert len(source.class_names) == (10 if base is tvd.CIFAR10 else 100)
    image = np.asarray(source.reader.read(source.samples[0].locator))
    assert image.shape == (32, 32, 3)
    _, labels = digit_images(n_train + n_test, size=32)
    assert [s.label for s in source.samples] == labels.tolist()
    out = tmp_path / "c.h5"
    config = ExtractConfig.of(data=source.description, out=out, workers=0, batch_size=16, progress=False)
    result = extract_to_store(config, backbone=tiny, source=source)
    assert result.rows == n_train + n_test and verify_store(out) == []


def test_generic_torchvision_classes(tmp_path):
    fake = scan_torchvision("FakeData")  # no root, no splits: one set, split stratified like a folder
    assert len(fake) == 1000 and set(fake.split_counts()) == {"train", "test"}
    assert fake.reader.read(fake.samples[0].locator).size == (224, 224)
    make_folder(tmp_path / "f", {"a": 3, "b": 2})
    folder = scan_torchvision("ImageFolder", ListOptions(root=tmp_path / "f"))
    assert folder.class_names == ("a", "b") and len(folder) == 5


def test_torchvision_errors(tmp_path):
    with pytest.raises(DataError, match="did you mean CIFAR10"):
        open_source("torchvision:CIFAR01", root=tmp_path)
    with pytest.raises(DataError, match="needs --root"):
        open_source("torchvision:MNIST")
    with pytest.raises(DataError, match="pass --download to fetch them"):
        open_source("torchvision:MNIST", root=tmp_path / "empty")
    with pytest.raises(DataError, match="apply only to --data torchvision"):
        open_source(tmp_path, root=tmp_path)


def test_unknown_data_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist; pass --data an image folder, a manifest"):
        open_source(tmp_path / "nothing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="not recognised"):
        open_source(tmp_path / "notes.txt")


def test_store_records_the_source(same_images, tmp_path, tiny):
    _extract(same_images / "list.csv", tmp_path / "m.h5", tiny)
    attrs = load_store(tmp_path / "m.h5").attrs
    assert attrs["source"] == "manifest" and attrs["source_description"].endswith("list.csv")
    decoding = json.loads(attrs["decoding"])
    assert decoding["max_pixels"] > 0 and decoding["alpha_background"] == [255, 255, 255]


def test_the_three_manifest_formats_give_the_same_rows(tmp_path):
    """sources/manifest: CSV (with a BOM and padded headers, as spreadsheets save it) and Parquet read by arrow,
    and JSON lines give the same columns (a short CSV row, which arrow refuses, read by the csv module: its missing
    cell None, blank lines skipped; other columns not kept); a manifest without a path column is refused with its
    columns named."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.sources.manifest import manifest_columns

    rows = [{"path": "a/1.png", "label": "cat", "split": "train", "note": "x"},
            {"path": "b/2.png", "label": "dog", "split": "test", "note": "y"}]
    columns = {"path": ["a/1.png", "b/2.png"], "label": ["cat", "dog"], "split": ["train", "test"]}
    (tmp_path / "m.csv").write_text("\ufeff path ,label, split ,note\n" + "".join(
        f"{r['path']},{r['label']},{r['split']},{r['note']}\n" for r in rows), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    def as_lists(found: dict) -> dict:
        return {k: v.to_pylist() if isinstance(v, pa.ChunkedArray) else v for k, v in found.items()}

    for name in ("m.csv", "m.parquet", "m.jsonl"):
        assert as_lists(manifest_columns(tmp_path / name)) == columns, name
    assert all(isinstance(v, pa.ChunkedArray) for v in manifest_columns(tmp_path / "m.csv").values())
    (tmp_path / "s.csv").write_text("path,id,label\na.png,A,1\n\nb.png\n")
    assert manifest_columns(tmp_path / "s.csv") == {"path": ["a.png", "b.png"], "id": ["A", None],
                                                    "label": ["1", None]}
    (tmp_path / "n.csv").write_text("file,label\nx.png,1\n")
    with pytest.raises(DataError, match=r"no 'path' column \(columns: file, label\)"):
        manifest_columns(tmp_path / "n.csv")


def test_manifest_ids_paths_and_stamps_are_the_pathlib_forms(tmp_path):
    """The listing's fast path (one stat per file, no Path per id) gives what pathlib gives: ids `Path(text)
    .as_posix()`, files `folder / text`, stamps the files' own; a broken link is listed (it fails at decode), a
    missing file is refused."""
    import random

    import pyarrow as pa

    from pipeline.sources.manifest import path_cells, posix_text
    from pipeline.sources.table import file_cells

    odd = ["a.png", "./a.png", "x//a.png", "x/./a.png", "x/", "x/.", ".", "//x/a", "///x", "a/../b", ".a", "a.",
           "x/.a/", "/abs/./p", "é/ü.png", "a b/c"]
    rng = random.Random(0)
    odd += ["".join(rng.choice("a/.") for _ in range(rng.randint(1, 8))) for _ in range(2000)]
    for text in odd:
        assert posix_text(text) == Path(text).as_posix(), text
    texts = path_cells(pa.chunked_array([pa.array(odd)]))  # the columnar scan's: arrow kernels, odd rows in Python
    assert texts.to_pylist() == [Path(t).as_posix() for t in odd]
    assert file_cells(str(tmp_path), texts).to_pylist() == [str(tmp_path / t) for t in odd]
    assert file_cells("/", path_cells(["a", "/b", "."])).to_pylist() == ["/a", "/b", "/"]
    (tmp_path / "x").mkdir()
    for name in ("x/a.png", "b.png"):
        (tmp_path / name).write_bytes(b"data" * len(name))
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    rows = [{"path": "./x//a.png"}, {"path": str(tmp_path / "b.png")}, {"path": "dangling.png"}]
    source = open_source(write_manifest(tmp_path / "m.csv", rows))
    assert [s.id for s in source.samples] == ["x/a.png", str(tmp_path / "b.png"), "dangling.png"]
    assert [s.path for s in source.samples] == [str(tmp_path / p) for p in ("x/a.png", "b.png", "dangling.png")]
    st = (tmp_path / "x/a.png").stat()
    assert source.stamps().tolist() == [[st.st_size, st.st_mtime_ns], [20, (tmp_path / "b.png").stat().st_mtime_ns],
                                        [-1, -1]]
    with pytest.raises(DataError, match=r"1 path\(s\) .* do not exist \(e.g. row 2"):
        open_source(write_manifest(tmp_path / "n.csv", [rows[0], {"path": "gone.png"}]))


def test_listing_runs_with_the_cyclic_collector_paused_and_restores_it(tmp_path):
    """sources: a listing builds one small acyclic object after another, so the cyclic collector is paused while a
    source is listed (at most the one collection that follows re-enabling it, where the kind's own scan of a
    20,000-row manifest runs dozens), and it is on again afterwards, after an error too."""
    import gc

    from pipeline.sources.manifest import scan_manifest

    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "m.csv").write_text("path,id,label\n" + "".join(f"a.png,r{i},c{i % 7}\n" for i in range(20_000)))
    collections: list[int] = []

    def count(phase: str, info: dict) -> None:
        if phase == "start":
            collections.append(info["generation"])

    gc.callbacks.append(count)
    try:
        assert gc.isenabled()
        scan_manifest(tmp_path / "m.csv", ListOptions(split="none"))  # the kind's own scan: the collector is on
        unpaused, collections[:] = len(collections), []
        source = open_source(str(tmp_path / "m.csv"), ListOptions(split="none"))
        assert len(source) == 20_000 and gc.isenabled()
        assert unpaused > 20 and len(collections) <= 2, (unpaused, collections)  # the one (or two) after re-enabling
        (tmp_path / "bad.csv").write_text("path\nmissing.png\n")
        with pytest.raises(DataError, match="do not exist"):
            open_source(str(tmp_path / "bad.csv"), ListOptions(split="none"))
        assert gc.isenabled()
        gc.collect()
        assert collections, "the callback sees collections when the collector runs"
    finally:
        gc.callbacks.remove(count)
