"""The demo data set: scikit-learn's digits written as an image folder with fixed train/test split folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

DIGITS_TEST_FRACTION = 0.3
DIGITS_SEED = 0
_DONE = ".complete"


def digits_folder(data_dir: str | Path, per_class: int | None = None) -> tuple[str, Path]:
    """The demo data set's name and where its images go under the demo's output folder."""
    name = "digits" if per_class is None else f"digits-{per_class}pc"
    return name, Path(data_dir).resolve() / name


def write_digits_folder(root: str | Path, *, per_class: int | None = None) -> Path:
    """Write the 1,797 digits as 8x8 grayscale PNGs under ROOT/{train,test}/<digit>/ (first call only).

    The split is a fixed stratified 70/30 split (seed 0). `per_class` keeps only the first n images of each class
    in each split (for quick runs). A marker file is written last, so an interrupted write is redone.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = Path(root)
    if (root / _DONE).exists():
        return root
    digits = load_digits()
    index = np.arange(len(digits.target))
    train, test = train_test_split(index, test_size=DIGITS_TEST_FRACTION, stratify=digits.target,
                                   random_state=DIGITS_SEED)
    for split, rows in (("train", np.sort(train)), ("test", np.sort(test))):
        kept: dict[int, int] = {}
        for i in rows:
            label = int(digits.target[i])
            if per_class is not None and kept.get(label, 0) >= per_class:
                continue
            kept[label] = kept.get(label, 0) + 1
            path = root / split / str(label) / f"digit_{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.round(digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
            Image.fromarray(pixels).save(path)  # uint8 [8, 8] -> mode L
    (root / _DONE).write_text("written by pipeline.demo.write_digits_folder\n")
    return root
