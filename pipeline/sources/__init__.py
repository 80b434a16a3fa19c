"""Image sources → samples (id, label, split, locator) and the reader that turns a locator into bytes or an image.

Each kind is a module here with `open_if_mine(data, options)`, tried in `KINDS` order; all give the same `Source`
(`pipeline.sources.base`), so that extraction and the store never care where images come from:
- `torchvision`: `torchvision:CIFAR10 --root DIR`, any `torchvision.datasets` class that yields images;
- `manifest`: a CSV, Parquet or JSON Lines table with `path` and optional `label`, `split`, `id` columns;
- `tar`: WebDataset-style tar shards, read in place at each member's offset;
- `folder`: `ROOT/<class>/<image>` or `ROOT/{train,val,test}/<class>/<image>` (the fallback).
A new kind is one module with `open_if_mine` and one entry in `KINDS`. Nothing heavy is imported until a source is
opened.
"""

from __future__ import annotations

import gc
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.sources.base import ListOptions, Source

KINDS = ("torchvision", "manifest", "tar", "folder")


@contextmanager
def _collector_paused(pause: bool) -> Iterator[None]:
    """Listing builds millions of small acyclic objects (strings, tuples): the cyclic garbage collector, triggered by
    the allocations, would walk them all again and again (a quarter to a third of a 1M-row manifest's listing time,
    measured), and has nothing to free there. The collector is restored as it was, also on errors."""
    enabled = gc.isenabled()
    if pause:
        gc.disable()
    try:
        yield
    finally:
        if pause and enabled:
            gc.enable()


def list_options(**given: Any) -> ListOptions:
    from pipeline.sources.base import ListOptions

    return ListOptions(**given)


def open_source(data: str | Path, options: ListOptions | None = None, **given: Any) -> Source:
    """The source `data` names, listed with `options` (or the `ListOptions` fields given as keywords)."""
    from pipeline.errors import DataError

    options = options if options is not None else list_options(**given)
    text = str(data)
    with _collector_paused(not text.startswith("torchvision:")):  # a dataset class's own loading keeps it on
        for kind in KINDS:
            source = importlib.import_module(f"pipeline.sources.{kind}").open_if_mine(text, options)
            if source is not None:
                return source
            if kind == "torchvision" and (options.root is not None or options.download):
                raise DataError("--root and --download apply only to --data torchvision:NAME; drop them or use "
                                "that form")
    raise DataError(f"--data {text} is not a source this tool can read")  # the folder kind claims everything
