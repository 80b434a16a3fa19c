"""Decoding augmented views (`extract --views K`): the reader stage for a source with view rows
(`pipeline.sources.views.with_views`). A view is its image through the model's training transform
(`pipeline.backbones.factory.training_transform`), with the random state seeded from the run's seed, the image's
content and the view number, so the same view comes out on every run, in any worker, in any order."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from pipeline.engine.decode import ImageDataset, decode, failure_reason, load_plugins
from pipeline.sources.views import View, view_seed


def seeded(transform: Callable[[Image.Image], torch.Tensor], image: Image.Image, seed: int) -> torch.Tensor:
    """`transform(image)` with Python's, NumPy's and torch's random state set from `seed`, restored after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            random.seed(seed)
            np.random.seed(seed % (1 << 32))
            torch.manual_seed(seed)
            return transform(image)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class ViewDataset(ImageDataset):
    """`ImageDataset` whose `View` locators are decoded through the seeded training transform."""

    def __init__(self, *args, train_transform: Callable[[Image.Image], torch.Tensor], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.train_transform = train_transform

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str, str]:
        locator = self.locators[index]
        if not isinstance(locator, View):
            return super().__getitem__(index)
        load_plugins(self.decoding.plugins)
        try:
            image, digest = decode(self.reader.read(locator, self.decoding.max_file_bytes), self.decoding)
            return index, seeded(self.train_transform, image, view_seed(locator.seed, locator, digest)), "", digest
        except Exception as exc:  # noqa: BLE001 - as ImageDataset: a recorded failure of this view
            return index, None, failure_reason(exc), ""
