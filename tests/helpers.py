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


def load_tiny_family(name: str, random_init: bool):
    """A backbone family's loader, for the test that a new family is one `FAMILIES` entry: a small torch network
    whose final Linear is the classifier; `name` sets its width."""
    import torch
    from torchvision.transforms import v2

    from pipeline.backbones.weights import Loaded

    width = int(name)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(width, 10))
    transform = v2.Compose([v2.PILToTensor(), v2.Resize((32, 32)), v2.ToDtype(torch.float32, scale=True)])
    config = {"input_size": [3, 32, 32], "mean": [0.0] * 3, "std": [1.0] * 3, "interpolation": "bilinear",
              "crop_pct": 1.0, "crop_mode": "center"}
    return Loaded(net, "torchvision", config, f"tiny-{width}", transform)
