"""Benchmark image folders: real images written as ROOT/<class>/<file>, shared by the benchmark scripts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digit_images(root: Path, n: int, *, start: int = 0) -> None:
    """n digit images as 10 classes of PNGs, named from `start` on (digits reused under new names past 1,797)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for k in range(start, start + n):
        i = k % len(digits.target)
        path = root / str(int(digits.target[i])) / f"img_{k:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(digits.images[i] * (255 / 16)).astype(np.uint8)).save(path)


def write_photo_images(root: Path, n: int) -> None:
    """n JPEG crops (60-100% of each side) of the scikit-learn and scikit-image photos, one class per photo."""
    from skimage import data as skdata
    from sklearn.datasets import load_sample_image

    photos = [load_sample_image("china.jpg"), load_sample_image("flower.jpg"), skdata.astronaut(), skdata.coffee(),
              skdata.chelsea(), skdata.rocket()]
    rng = np.random.default_rng(0)
    for k in range(n):
        photo = photos[k % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        path = root / f"photo{k % len(photos)}" / f"img_{k:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(photo[y:y + ch, x:x + cw])).save(path, quality=90)
