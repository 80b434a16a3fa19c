"""sources/torchvision as columns: the items' ids, labels, splits and `(split, index)` locators held as arrays (an
`ItemColumn`), the same listing the tuple-per-item code gave, and labels coded from integer targets as arrays equal
to the row-by-row rule."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import VisionDataset

from pipeline.engine.resolve import data_fingerprint, decoding_policy, source_listing
from pipeline.sources.base import ListOptions, class_index, label_text
from pipeline.sources.table import SampleTable
from pipeline.sources.torchvision import ItemColumn, _labels, scan_torchvision


class Numbered(VisionDataset):
    """A local dataset with train/test splits whose targets (and classes) the test sets on the class."""

    train_targets: object = list(range(6))
    test_targets: object = [0, 1, 2]
    classes: list[str] | None = None

    def __init__(self, root: str, train: bool = True) -> None:
        super().__init__(root)
        self.targets = self.train_targets if train else self.test_targets
        self.offset = 0 if train else 1000

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, object]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        value = (self.offset + index) % 256
        return Image.new("L", (8, 8), value), self.targets[index]


def numbered(train: object, test: object, classes: list[str] | None = None) -> type:
    return type("Numbered", (Numbered,), {"train_targets": train, "test_targets": test, "classes": classes})


def _row_by_row(targets: list, class_names: tuple[str, ...]) -> tuple[tuple[str, ...], list[int]]:
    """The rule as the tuple listing applied it: each target's text, indices into the dataset's classes when they
    all are, else `class_index`."""
    names = [label_text(t) for t in targets]
    if class_names and all(v is None or (v.isdigit() and int(v) < len(class_names)) for v in names):
        return class_names, [-1 if v is None else int(v) for v in names]
    return class_index(names)


@pytest.mark.parametrize(("targets", "classes"), [
    (np.array([3, 0, 2, 2, 1]), ("a", "b", "c", "d")),  # indices into the classes
    (np.array([3, 0, 4, -1, 1]), ("a", "b", "c", "d")),  # one past the classes: every value a class of its own
    (np.array([3, 0, 70, 1]), ("a", "b", "c", "d")),
    (np.array([10, 3, -1, 10, 200, 3]), ()),  # no classes: numeric order of the values present
    (np.array([5, 2, 5, 9], dtype=np.uint8), ()),
    (np.array([-1, -1]), ("a",)),  # all unlabelled
    (np.array(["cat", "dog", "cat", ""]), ()),  # texts: the row-by-row path
])
def test_labels_from_arrays_equal_the_row_by_row_rule(targets, classes):
    names, labels = _labels(targets, classes)
    expected_names, expected = _row_by_row(targets.tolist(), classes)
    assert names == expected_names and labels.tolist() == expected and labels.dtype == np.int64
    # the same as objects (the path for targets read from the items)
    names, labels = _labels(targets.astype(object), classes)
    assert names == expected_names and labels.tolist() == expected


def test_a_dataset_lists_as_columns_with_item_locators(tmp_path):
    cls = numbered(torch.tensor([4, 1, 1, 0, 4, 1]), np.array([1, 4, 0]))
    source = scan_torchvision(cls, ListOptions(root=tmp_path))
    assert isinstance(source.samples, SampleTable) and isinstance(source.samples.locators, ItemColumn)
    assert source.class_names == ("0", "1", "4") and source.split_counts() == {"train": 6, "test": 3}
    assert [s.id for s in source.samples] == [f"train/{i:05d}" for i in range(6)] + [f"test/{i:05d}" for i in range(3)]
    assert [s.label for s in source.samples] == [2, 1, 1, 0, 2, 1, 1, 2, 0]
    assert {s.path for s in source.samples} == {str(tmp_path)}
    locators = source.locators()
    assert list(locators) == [("train", i) for i in range(6)] + [("test", i) for i in range(3)]
    assert locators[-1] == ("test", 2) and locators[6] == ("test", 0)
    picked = source.locators(np.array([7, 0, 8]))
    assert list(picked) == [("test", 1), ("train", 0), ("test", 2)] and list(locators[1:3]) == [("train", 1),
                                                                                                 ("train", 2)]
    with pytest.raises(IndexError):
        locators.take([9])
    with pytest.raises(IndexError):
        locators[9]
    # what the decode workers receive: the arrays, a few bytes a row, and the reader reads each item
    copy = pickle.loads(pickle.dumps(locators))
    assert copy == locators and len(pickle.dumps(ItemColumn(("train",), np.zeros(100_000, np.int8),
                                                             np.arange(100_000)))) < 1_000_000
    for k, locator in enumerate(copy):
        assert np.asarray(source.reader.read(locator)).flat[0] == (k if k < 6 else 1000 + k - 6) % 256
    # a table row taken keeps its locator
    assert source.samples.take([8])[0].locator == ("test", 2)


def test_mixed_target_kinds_and_the_fingerprint(tmp_path):
    """Integer targets in one split and texts in the other are coded as texts throughout; a listing's fingerprint
    changes with the labels, the stamps of the root's files and nothing else of this run."""
    mixed = scan_torchvision(numbered(np.array([1, 2, 1, 2, 1, 2]), np.array(["2", " 1", "1"])),
                             ListOptions(root=tmp_path))
    assert mixed.class_names == ("1", "2") and [s.label for s in mixed.samples] == [0, 1, 0, 1, 0, 1, 1, 0, 0]
    with pytest.raises(Exception, match="no training images"):
        scan_torchvision(numbered([0, 1, 0, 1, 0, 1], [2, 0, 1], classes=["a", "b", "c"]), ListOptions(root=tmp_path))

    def fingerprint(cls: type) -> str:
        source = scan_torchvision(cls, ListOptions(root=tmp_path))
        return data_fingerprint(source, source_listing(source), decoding_policy({}))

    cls = numbered([0, 1, 0, 1, 0, 1], [0, 1, 1], classes=["a", "b"])
    first = fingerprint(cls)
    assert fingerprint(numbered([0, 1, 0, 1, 0, 1], [0, 1, 1], classes=["a", "b"])) == first
    assert fingerprint(numbered([0, 1, 0, 1, 0, 1], [0, 1, 0], classes=["a", "b"])) != first
    (tmp_path / "file.bin").write_bytes(b"x")  # a file under the root: the stamp every row carries
    assert fingerprint(cls) != first


def test_ids_made_in_blocks_equal_the_formatted_indices(tmp_path, monkeypatch):
    import pipeline.sources.torchvision as tv

    monkeypatch.setattr(tv, "_ID_ROWS", 4)  # blocks of 4 rows: the 6 train ids span two, the 3 test ids one
    source = scan_torchvision(numbered(list(range(6)), [0, 1, 2]), ListOptions(root=tmp_path))
    assert list(source.samples.ids) == [f"train/{i:05d}" for i in range(6)] + [f"test/{i:05d}" for i in range(3)]
    wide = tv._ids("train/", 99_998, 100_002, len(str(100_001)))
    assert wide.to_pylist() == [f"train/{i:06d}" for i in range(99_998, 100_002)]


@pytest.mark.slow
def test_cli_reruns_from_another_directory_keep_what_is_unchanged(tmp_path):
    """The real command, from another working directory with a relative --root: a rerun is a no-op, a new file
    under the root (every row's stamp changes) re-reads the items and keeps them all, and rewritten files compute
    only the items that are new or whose image changed."""
    import subprocess
    import sys

    from tests.conftest import TINY_BACKBONE
    from tests.sources_data import write_mnist

    write_mnist(tmp_path / "data", "MNIST")
    (tmp_path / "work").mkdir()

    def extract() -> str:
        proc = subprocess.run([sys.executable, "-m", "pipeline", "extract", "--data", "torchvision:MNIST", "--root",
                               "../data", "--out", "s.h5", "--backbone", TINY_BACKBONE, "--random-init",
                               "--workers", "1", "--batch-size", "16"],
                              cwd=tmp_path / "work", capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout + proc.stderr

    assert "60 extracted, 0 failed" in extract()
    assert "is up to date (60 rows" in extract()
    (tmp_path / "data" / "MNIST" / "raw" / "notes.txt").write_text("x")
    assert "0 extracted, 0 failed" in (out := extract()) and "60 unchanged kept" in out
    write_mnist(tmp_path / "data", "MNIST", n_train=50)  # 10 more train digits; the test ones are the next 20
    assert "30 extracted, 0 failed" in (out := extract()) and "40 unchanged kept" in out
