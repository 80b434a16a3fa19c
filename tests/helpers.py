"""Small builders for test image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, *, seed: int = 0, size: tuple[int, int] = (32, 24), mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "RGBA": 4, "L": None}[mode]
    shape = (size[1], size[0]) if channels is None else (size[1], size[0], channels)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def make_folder(root: Path, layout: dict[str, int], *, start_seed: int = 0) -> Path:
    """layout maps 'class' or 'split/class' to a number of random PNG images."""
    seed = start_seed
    for rel, n in layout.items():
        for i in range(n):
            write_image(root / rel / f"img_{i:03d}.png", seed=seed)
            seed += 1
    return root
