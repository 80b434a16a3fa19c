from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from pipeline.engine.decode import (
    ALPHA_BACKGROUND,
    ImageDataset,
    collate_batch,
    load_image,
    to_rgb,
)
from pipeline.errors import DataError
from pipeline.sources.base import ListOptions
from pipeline.sources.folder import scan_image_folder
from pipeline.splits import held_out_count, holdout_mask, stratified_splits
from tests.helpers import make_folder, write_image


def test_split_folders_give_splits_labels_and_relative_ids(tmp_path):
    make_folder(tmp_path, {"train/cat": 3, "train/dog": 2, "val/cat": 1, "test/dog": 2, "test/cat": 1})
    folder = scan_image_folder(tmp_path)
    assert folder.class_names == ("cat", "dog")
    assert folder.split_source == "folders"
    assert folder.split_counts() == {"train": 5, "val": 1, "test": 3}
    by_id = {s.id: s for s in folder.samples}
    assert by_id["test/dog/img_000.png"].label == 1 and by_id["test/dog/img_000.png"].split == "test"
    assert [s.id for s in folder.samples] == sorted(by_id)


def test_class_folders_get_a_deterministic_stratified_split(tmp_path):
    make_folder(tmp_path, {"a": 10, "b": 20, "c": 1, "d/nested": 4})
    first = scan_image_folder(tmp_path, ListOptions(test_fraction=0.3, seed=0))
    second = scan_image_folder(tmp_path, ListOptions(test_fraction=0.3, seed=0))
    assert first.samples == second.samples
    assert first.class_names == ("a", "b", "c", "d")
    per_class = {}
    for s in first.samples:
        per_class.setdefault(s.label, []).append(s.split)
    assert per_class[0].count("test") == 3 and per_class[1].count("test") == 6
    assert per_class[2] == ["train"]  # a single image stays in train
    assert per_class[3].count("test") == 1
    assert "stratified" in first.split_source
    other_seed = scan_image_folder(tmp_path, ListOptions(test_fraction=0.3, seed=1))
    assert [s.split for s in other_seed.samples] != [s.split for s in first.samples]


def test_split_assignment_does_not_depend_on_listing_order():
    keys = [f"{i:032x}" for i in range(50)]
    forward = dict(zip(keys, stratified_splits(keys, [0] * 50, test_fraction=0.2, seed=3), strict=True))
    backward = dict(zip(keys[::-1], stratified_splits(keys[::-1], [0] * 50, test_fraction=0.2, seed=3), strict=True))
    assert forward == backward and sum(s == "test" for s in forward.values()) == 10


def _reference_pick(keys, n, *, seed, ties, keep_out):
    """The split rule as it was written before it worked on arrays (a dict and list per key): the reference the
    array version must agree with, row for row."""
    def rank(key):
        return hashlib.sha1(f"{seed}:{key}".encode("utf-8", "surrogateescape")).hexdigest()

    groups = {}
    for i, key in enumerate(keys):
        groups.setdefault(key if key else f"\0{ties[i]}\0{i}", []).append(i)
    picked, taken = np.zeros(len(keys), dtype=bool), 0
    for k in sorted(groups, key=lambda k: (rank(k), min(ties[i] for i in groups[k]))):
        if taken >= n:
            break
        if len(keys) - taken - len(groups[k]) < keep_out:
            continue
        picked[groups[k]] = True
        taken += len(groups[k])
    return picked


def _reference_splits(keys, labels, *, fraction, seed, ties):
    splits = ["train"] * len(keys)
    for label in sorted(set(labels)):
        rows = [i for i, lab in enumerate(labels) if lab == label]
        mask = _reference_pick([keys[i] for i in rows], held_out_count(len(rows), fraction), seed=seed,
                               ties=[ties[i] for i in rows], keep_out=1)
        for i, chosen in zip(rows, mask, strict=True):
            splits[i] = "test" if chosen else splits[i]
    return splits


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_the_array_split_picks_exactly_what_the_per_row_rule_picks(seed):
    """Duplicate keys (picked together, some as large as their class), unreadable rows (empty keys), classes of one
    and two rows, unlabelled rows, non-UTF-8 ids, and fractions that round both ways."""
    rng = np.random.default_rng(seed)
    n = 3_000
    pool = [f"{k:032x}" for k in rng.integers(0, 2**62, size=1_800)]
    keys = [pool[int(rng.integers(0, 600))] if rng.random() < 0.4 else pool[600 + i % 1_200] for i in range(n)]
    keys = [("" if rng.random() < 0.05 else k) for k in keys]
    labels = [int(x) for x in rng.integers(-1, 40, size=n)]
    labels[:3] = [90, 91, 91]  # a class of one (stays in train) and one of two (one each way)
    keys[1] = keys[2] = pool[0]  # the class of two is one duplicate set: it cannot give a test row
    ties = [f"id_{i}\udcff" if i % 97 == 0 else f"id_{i:05d}" for i in range(n)]
    for fraction in (0.1, 0.25, 0.5):
        got = stratified_splits(keys, labels, test_fraction=fraction, seed=seed, ties=ties)
        assert got == _reference_splits(keys, labels, fraction=fraction, seed=seed, ties=ties)
        assert got[0] == got[1] == got[2] == "train"
    default_ties = [str(i) for i in range(n)]
    assert stratified_splits(keys, labels, test_fraction=0.2, seed=seed) == \
        _reference_splits(keys, labels, fraction=0.2, seed=seed, ties=default_ties)
    got = holdout_mask(np.array(labels), keys, fraction=0.15, seed=seed)
    assert got.tolist() == [s == "test" for s in _reference_splits(keys, labels, fraction=0.15, seed=seed,
                                                                   ties=default_ties)]
    assert stratified_splits([], [], test_fraction=0.2, seed=seed) == []


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.write_text("x"), "not recognised"),
        (lambda root: root.mkdir(), "no images found"),
        (lambda root: (root / "cls").mkdir(parents=True) or (root / "cls" / "notes.txt").write_text("x"),
         "no images found"),
        (lambda root: write_image(root / "loose.png"), "directly in"),
        (lambda root: make_folder(root, {"train/a": 1, "cats": 1}), "mixes split folders"),
        (lambda root: make_folder(root, {"train/a": 1, "test/b": 1}), "no training images"),
        (lambda root: make_folder(root, {"val/a": 1}), "no images in"),
    ],
)
def test_bad_folders_fail_with_a_clear_error(tmp_path, setup, message):
    root = tmp_path / "root"
    setup(root)
    with pytest.raises(DataError, match=message):
        scan_image_folder(root)


def test_hidden_files_and_other_extensions_are_ignored_case_insensitive(tmp_path):
    write_image(tmp_path / "a" / "one.PNG")
    write_image(tmp_path / "a" / "two.JpEg")
    write_image(tmp_path / "a" / ".hidden.png")
    (tmp_path / "a" / "labels.csv").write_text("x")
    ids = [s.id for s in scan_image_folder(tmp_path).samples]
    assert ids == ["a/one.PNG", "a/two.JpEg"]


def test_rgba_is_composited_on_the_fixed_background():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == ALPHA_BACKGROUND
    opaque = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    assert to_rgb(opaque).getpixel((0, 0)) == (10, 20, 30)


def test_grayscale_and_16_bit_convert_without_saturating():
    gray = to_rgb(Image.new("L", (2, 2), 100))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (100, 100, 100)
    sixteen = Image.fromarray(np.full((2, 2), 32768, dtype=np.uint16))
    value = to_rgb(sixteen).getpixel((0, 0))
    assert 120 <= value[0] <= 135  # mid-grey, not white


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rot.jpg"
    image.save(path, exif=exif)
    assert load_image(path).size == (20, 40)


def test_unreadable_file_becomes_a_recorded_failure(tmp_path):
    good = write_image(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    dataset = ImageDataset([good, bad], transform=lambda im: __import__("torch").zeros(3, 2, 2))
    batch = collate_batch([dataset[0], dataset[1]])
    assert batch.indices.tolist() == [0]
    assert batch.failures[0][0] == 1 and "UnidentifiedImageError" in batch.failures[0][1]
