"""Image sources → samples (id, path, label, split), and decoding of one file into an RGB image.

An image folder is `ROOT/<class>/<image>` or, with split folders, `ROOT/{train,val,test}/<class>/<image>`. Ids are
image paths relative to ROOT in POSIX form, so they are stable whatever the worker count, batch size or read order.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from pipeline.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
SPLITS = ("train", "val", "test")
LAYOUT_HINT = "expected ROOT/<class>/<image> or ROOT/{train,val,test}/<class>/<image>"
# Transparent pixels are composited on this colour so that RGBA and RGB versions of an image agree.
ALPHA_BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class Sample:
    """One image: `id` is its path relative to the data root (POSIX), `label` indexes the class names."""

    id: str
    path: Path
    label: int
    split: str


@dataclass(frozen=True)
class ImageFolder:
    """A scanned image folder: samples sorted by id, class names sorted, and how splits were decided."""

    root: Path
    samples: tuple[Sample, ...]
    class_names: tuple[str, ...]
    split_source: str

    def __len__(self) -> int:
        return len(self.samples)

    def split_counts(self) -> dict[str, int]:
        counts = {s: 0 for s in SPLITS}
        for sample in self.samples:
            counts[sample.split] += 1
        return {k: v for k, v in counts.items() if v}


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_under(path: Path) -> list[Path]:
    """All image files below `path`, recursively, skipping hidden files and folders; sorted."""
    found = []
    for p in path.rglob("*"):
        rel_parts = p.relative_to(path).parts
        if any(part.startswith(".") for part in rel_parts):
            continue
        if _is_image(p) and (p.is_file() or p.is_symlink()):
            found.append(p)
    return sorted(found)


def _stray_images(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if _is_image(p)]


def _class_files(split_dir: Path) -> dict[str, list[Path]]:
    stray = _stray_images(split_dir)
    if stray:
        raise DataError(
            f"{len(stray)} image(s) lie directly in {split_dir} (e.g. {stray[0].name}) with no class folder; "
            f"{LAYOUT_HINT}"
        )
    return {d.name: files for d in _visible_dirs(split_dir) if (files := _images_under(d))}


def scan_image_folder(root: str | Path, *, test_fraction: float = 0.3, seed: int = 0) -> ImageFolder:
    """List the images of an image folder with their labels and splits.

    With split folders the folder gives the split; otherwise each class is split deterministically into train and
    test (see `assign_splits`) and `split_source` records how.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; pass --data with an image folder ({LAYOUT_HINT})")
    if not root.is_dir():
        raise DataError(f"--data {root} is a file, not a folder; {LAYOUT_HINT}")
    subdirs = _visible_dirs(root)
    split_dirs = [d for d in subdirs if d.name in SPLITS]
    if split_dirs:
        others = [d.name for d in subdirs if d.name not in SPLITS]
        if others:
            raise DataError(
                f"{root} mixes split folders ({', '.join(d.name for d in split_dirs)}) with other folders "
                f"({', '.join(others[:5])}); {LAYOUT_HINT}"
            )
        per_split = {d.name: _class_files(d) for d in split_dirs}
        if "train" not in per_split or not per_split["train"]:
            raise DataError(f"{root} has split folders but no images in {root / 'train'}; {LAYOUT_HINT}")
        train_classes = set(per_split["train"])
        for split, classes in per_split.items():
            unseen = sorted(set(classes) - train_classes)
            if unseen:
                raise DataError(
                    f"classes {unseen[:5]} appear in {root / split} but have no images in {root / 'train'}; "
                    "every class needs training images"
                )
        class_names = tuple(sorted(train_classes))
        index = {name: i for i, name in enumerate(class_names)}
        samples = [
            Sample(p.relative_to(root).as_posix(), p, index[cls], split)
            for split, classes in per_split.items()
            for cls, files in classes.items()
            for p in files
        ]
        split_source = "folders"
    else:
        classes = _class_files(root)
        class_names = tuple(sorted(classes))
        index = {name: i for i, name in enumerate(class_names)}
        ids = {cls: [p.relative_to(root).as_posix() for p in files] for cls, files in classes.items()}
        test_ids = {i for cls_ids in ids.values() for i in assign_splits(cls_ids, test_fraction=test_fraction,
                                                                            seed=seed)}
        samples = []
        for cls, files in classes.items():
            for p in files:
                sample_id = p.relative_to(root).as_posix()
                samples.append(Sample(sample_id, p, index[cls], "test" if sample_id in test_ids else "train"))
        split_source = f"stratified(test_fraction={test_fraction}, seed={seed})"
    if not samples:
        raise DataError(
            f"no images found under {root} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}); {LAYOUT_HINT}"
        )
    samples.sort(key=lambda s: s.id)
    return ImageFolder(root=root, samples=tuple(samples), class_names=class_names, split_source=split_source)


def assign_splits(ids: list[str], *, test_fraction: float, seed: int) -> list[str]:
    """Return the ids of one class that go to test: the `round(n * test_fraction)` with the smallest seeded hash.

    Hash order (not list order) makes the choice independent of how files are listed and keeps most assignments
    when images are added. A class keeps at least one training image, and gets a test image when it has two or more.
    """
    n = len(ids)
    n_test = min(max(round(n * test_fraction), 1 if n >= 2 else 0), n - 1)
    ranked = sorted(ids, key=lambda i: hashlib.sha1(f"{seed}:{i}".encode()).hexdigest())
    return ranked[:n_test]


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB consistently: alpha over a fixed background, 16-bit/float rescaled."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            arr = arr / 65535.0
        else:
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            arr = (arr - lo) / (hi - lo) if math.isfinite(hi - lo) and hi > lo else np.zeros_like(arr)
        image = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def content_hash(data: bytes) -> str:
    """The identity of a file's bytes (BLAKE2b-128, hex): tells a changed file from one that was only touched."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def hash_file(path: str | Path) -> str:
    """`content_hash` of a file, or "" when it cannot be read."""
    try:
        return content_hash(Path(path).read_bytes())
    except OSError:
        return ""


def file_stamp(path: str | Path) -> tuple[int, int]:
    """(size, mtime_ns) of a file, following links; (-1, -1) when it cannot be stat'ed (e.g. a broken link)."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def load_image(source: str | Path | io.BytesIO) -> Image.Image:
    """Decode one image (a path or in-memory bytes) into RGB, applying EXIF orientation; first frame if animated."""
    with Image.open(source) as image:
        image.seek(0)
        image = ImageOps.exif_transpose(image)
        image.load()
        return to_rgb(image)


class ImageDataset(torch.utils.data.Dataset):
    """Reader stage: index → (index, tensor, error, content hash). A file that fails to decode yields its error, not
    an exception, so that one bad image never stops a run and is recorded instead of silently dropped. The file is
    read once: its bytes are hashed (for incremental runs) and decoded from memory."""

    def __init__(self, paths: list[Path], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str, str]:
        try:
            data = self.paths[index].read_bytes()
            return index, self.transform(load_image(io.BytesIO(data))), "", content_hash(data)
        except Exception as exc:  # noqa: BLE001 - any decode failure becomes a recorded failure for this file
            return index, None, f"{type(exc).__name__}: {exc}".strip(), ""


@dataclass
class Batch:
    """A collated batch: `indices` of decoded images with their `images` and content `hashes`, plus failures as
    (index, reason)."""

    indices: np.ndarray
    images: torch.Tensor | None
    failures: list[tuple[int, str]]
    hashes: list[str]

    def pin_memory(self) -> Batch:
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def collate_batch(items: list[tuple[int, torch.Tensor | None, str, str]]) -> Batch:
    ok = [(i, x, h) for i, x, _, h in items if x is not None]
    failures = [(i, err) for i, x, err, _ in items if x is None]
    indices = np.array([i for i, _, _ in ok], dtype=np.int64)
    images = torch.stack([x for _, x, _ in ok]) if ok else None
    return Batch(indices=indices, images=images, failures=failures, hashes=[h for _, _, h in ok])
