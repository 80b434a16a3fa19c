"""Augmented views in a store (`extract --views K`): K extra rows per training image, each the image through the
model's training transform with its own seed, stored with the id `<source id>#view<k>` and the source's label and
split (train). The store's attribute `views` says how many; val and test images never get views.

Readers leave view rows out unless asked (`load_store(views=True)`), so kNN, indexes, audits, exports and plain
probes see each image once; `probe --views` and `finetune --views` train on them, and the protocol treats an image
and its views as one image: validation is drawn from the source images only, and the views of a validation image
are not trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import DataError

VIEW_SEPARATOR = "#view"
VIEW_ID = re.compile(r"(.+)#view(\d+)")


def view_id(source_id: str, k: int) -> str:
    return f"{source_id}{VIEW_SEPARATOR}{k}"


def store_views(attrs: dict[str, Any]) -> int:
    """How many views per training image the store holds (0: none)."""
    try:
        return max(0, int(attrs.get("views", 0) or 0))
    except (TypeError, ValueError):
        return 0


def view_mask(ids: np.ndarray, attrs: dict[str, Any]) -> np.ndarray:
    """Which rows are augmented views (all False for a store made without --views)."""
    if not store_views(attrs):
        return np.zeros(len(ids), dtype=bool)
    return np.fromiter((VIEW_ID.fullmatch(str(i)) is not None for i in ids), dtype=bool, count=len(ids))


def view_sources(ids: np.ndarray, attrs: dict[str, Any]) -> np.ndarray:
    """For each row, the id of the image it is a view of ("" for the images themselves)."""
    mask = view_mask(ids, attrs)
    out = np.full(len(ids), "", dtype=object)
    for i in np.flatnonzero(mask):
        out[i] = VIEW_ID.fullmatch(str(ids[i])).group(1)
    return out


def view_rows_of(fs: Any, rows: np.ndarray) -> np.ndarray:
    """The rows of `fs` (loaded with its views) that are views of the images at `rows`, in row order."""
    sources = view_sources(fs.ids, fs.attrs)
    wanted = {str(fs.ids[r]) for r in rows}
    return np.array([i for i, s in enumerate(sources) if s and s in wanted], dtype=np.int64)


@dataclass(frozen=True)
class View:
    """The locator of an augmented view: the image's own locator and which view (1..K) it is."""

    locator: Any
    k: int
    seed: int


class ViewReader:
    """A source's reader that also reads `View` locators (the bytes of the image they are a view of)."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader

    def read(self, locator: Any, max_bytes: int | None = None) -> Any:
        return self.reader.read(locator.locator if isinstance(locator, View) else locator, max_bytes)


def with_views(source: Any, views: int, *, seed: int) -> Any:
    """The source with `views` augmented views of every training image, each right after its image. Ids that
    already look like views are refused (the views' ids would be ambiguous)."""
    if views < 1:
        return source
    clash = next((s.id for s in source.samples if VIEW_ID.fullmatch(s.id)), None)
    if clash is not None:
        raise DataError(f"--views: the id {clash!r} of {source.description} already ends in {VIEW_SEPARATOR}N, the "
                        "way views are named; rename that file or extract without --views")
    samples = []
    for s in source.samples:
        samples.append(s)
        if s.split == "train":
            base = s.path if s.locator is None else s.locator
            samples += [s._replace(id=view_id(s.id, k), locator=View(base, k, seed))
                        for k in range(1, views + 1)]
    return dataclasses.replace(source, samples=tuple(samples), reader=ViewReader(source.reader),
                               stamp="")  # the shards' stats no longer fix the listing


def view_seed(seed: int, locator: View, digest: str) -> int:
    """The seed of one view's augmentation: the run's seed, the image's content and the view number, so that a view
    is the same on every run and machine whatever the listing order."""
    text = f"{seed}\0{digest}\0{locator.k}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") & ((1 << 63) - 1)
