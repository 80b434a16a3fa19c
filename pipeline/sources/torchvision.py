"""torchvision datasets as a source: `--data torchvision:CIFAR10 --root DIR`, any `torchvision.datasets` class that
yields images, read from a local root and downloaded only when asked. Ids are `split/index`, and a stratified split
is by id: a torchvision dataset has only the one spelling.

A dataset is listed as columns (a `SampleTable`): the ids made by arrow a split at a time, integer targets coded as
arrays, and the items' `(split, index)` locators as an `ItemColumn`, so a dataset of millions of items holds no
Python object per item beyond what the dataset itself holds."""

from __future__ import annotations

import difflib
import inspect
import logging
import operator
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipeline.engine.decode import SPLITS, PerProcessReader
from pipeline.errors import DataError
from pipeline.sources.base import (
    DEFAULT_OPTIONS,
    UNLABELLED,
    ListOptions,
    Source,
    class_index,
    finish_table,
    label_text,
    printable,
)
from pipeline.sources.table import UNDECIDED, FileColumn, TextBuilder, TextColumn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TorchvisionSpec:
    """How to construct a torchvision dataset per split in any process: the class, root and per-split arguments."""

    cls: type
    root: str | None
    splits: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]  # (split, constructor keyword arguments)


class TorchvisionReader(PerProcessReader):
    """Locators are (split, index); each process constructs the datasets once, lazily (never downloading)."""

    kept = ("spec",)

    def __init__(self, spec: TorchvisionSpec) -> None:
        self.spec = spec
        self.fresh()

    def fresh(self) -> None:
        self._datasets: dict[str, Any] = {}

    def dataset(self, split: str) -> Any:
        if split not in self._datasets:
            kwargs = dict(dict(self.spec.splits)[split])
            self._datasets[split] = _construct(self.spec.cls, self.spec.root, kwargs)
        return self._datasets[split]

    def read(self, locator: tuple[str, int], max_bytes: int | None = None) -> Image.Image:
        split, index = locator
        item = self.dataset(split)[index]
        image = item[0] if isinstance(item, tuple | list) else item
        return _as_pil(image)


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    import torch
    from torchvision.transforms.functional import to_pil_image

    if isinstance(image, torch.Tensor | np.ndarray):
        return to_pil_image(image)
    raise TypeError(f"the dataset yields {type(image).__name__}, not an image")


def _construct(cls: type, root: str | None, kwargs: dict) -> Any:
    params = inspect.signature(cls).parameters
    args = dict(kwargs)
    if "root" in params:
        args["root"] = root
    return cls(**args)


def _dataset_class(name: str) -> type:
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if not isinstance(cls, type):
        known = [n for n in dir(tvd) if isinstance(getattr(tvd, n), type) and not n.startswith("_")]
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise DataError(f"torchvision has no dataset {name!r}; {hint}see torchvision.datasets for the list")
    return cls


def _targets(dataset: Any) -> np.ndarray:
    """[n] each item's target: from the dataset's targets (labels, ...) attribute, else read from each item."""
    n = len(dataset)
    for attr in ("targets", "labels", "_labels", "y"):
        values = getattr(dataset, attr, None)
        if values is not None and not isinstance(values, str | bytes) and hasattr(values, "__len__") \
                and len(values) == n:
            return np.asarray(values).reshape(n, -1)[:, 0] if n else np.zeros(0, dtype=np.int64)
    log.info("%s has no targets attribute: reading each item for its label", type(dataset).__name__)
    found = np.empty(n, dtype=object)
    found[:] = [item[1] if isinstance(item, tuple | list) and len(item) > 1 else None for item in
                (dataset[i] for i in range(n))]
    return found


def _root_stamp(root: str | None) -> tuple[int, int]:
    """(total size, newest mtime_ns) of the files under a dataset root: changes when any of them does."""
    if not root or not Path(root).exists():
        return 0, 0
    size = newest = 0
    for folder, _, names in os.walk(root):
        for name in names:
            try:
                st = os.stat(os.path.join(folder, name))
            except OSError:
                continue
            size += st.st_size
            newest = max(newest, st.st_mtime_ns)
    return size, newest


def _split_candidates(params: Any) -> list[tuple[str, dict]]:
    """(split, constructor arguments) to try: `train=True/False`, or `split=` with the usual names, or one set."""
    if "train" in params:
        return [("train", {"train": True}), ("test", {"train": False})]
    if "split" in params:
        return [(s, {"split": v}) for s, values in (("train", ("train", "trainval")), ("val", ("val", "valid")),
                                                      ("test", ("test",))) for v in values]
    return [("", {})]


def _construct_splits(cls: type, root_text: str | None, download: bool) -> dict[str, tuple[dict, Any]]:
    """Each split the class can build over the root: {split: (constructor arguments, dataset)}."""
    params = inspect.signature(cls).parameters
    found: dict[str, tuple[dict, Any]] = {}
    problems = []
    for split, kwargs in _split_candidates(params):
        if split in found:
            continue
        args = {**kwargs, **({"download": True} if download and "download" in params else {})}
        try:
            found[split] = (kwargs, _construct(cls, root_text, args))
        except ValueError as exc:  # a split value this class does not know
            if "split" not in str(exc).lower():
                problems.append(f"{split or 'all'}: {exc}")
        except Exception as exc:  # noqa: BLE001 - not found, corrupted, or the download failed
            problems.append(f"{split or 'all'}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    if "train" not in found and "" not in found:
        what = "; ".join(problems[:2]) or "no split could be constructed"
        hint = "check --root and the network" if download else \
            "point --root at the folder that holds its files, or pass --download to fetch them (needs a network)"
        raise DataError(f"torchvision:{cls.__name__} could not be loaded from {root_text} ({what}); {hint}")
    return found


class ItemColumn(Sequence):
    """Dataset items as `(split, index)` locators, what `TorchvisionReader` reads: a split code into `names` ([n]
    int8) and the item's index ([n] int64) per row, not a tuple per item."""

    __slots__ = ("names", "codes", "index")

    def __init__(self, names: tuple[str, ...], codes: np.ndarray, index: np.ndarray) -> None:
        if len(codes) != len(index):
            raise ValueError("an item column needs as many split codes as indices")
        self.names, self.codes, self.index = names, codes, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, where: Any) -> Any:
        if isinstance(where, slice):
            return self.take(np.arange(len(self))[where])
        i = operator.index(where)
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {where} of {len(self)} dataset items")
        return self.names[self.codes[i]], int(self.index[i])

    def __iter__(self) -> Iterator[tuple[str, int]]:
        for start in range(0, len(self), 1 << 16):
            codes, index = self.codes[start:start + (1 << 16)].tolist(), self.index[start:start + (1 << 16)].tolist()
            yield from zip(map(self.names.__getitem__, codes), index, strict=True)

    def take(self, where: Any) -> ItemColumn:
        """The rows at these positions (an array or sequence of row numbers)."""
        positions = np.asarray(where, dtype=np.int64).reshape(-1)
        if len(positions) and (positions.min() < -len(self) or positions.max() >= len(self)):
            raise IndexError(f"rows outside {len(self)} dataset items")
        return ItemColumn(self.names, self.codes[positions], self.index[positions])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and not isinstance(other, str) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ItemColumn({len(self)} items of {', '.join(self.names) or 'one set'})"


_ID_ROWS = 1 << 20  # ids made a million at a time: ~50 MB of arrow temporaries


def _ids(prefix: str, start: int, stop: int, width: int) -> pa.Array:
    """`prefix` + each index from start to stop, zero-padded to `width`, as `f"{prefix}{i:0{width}d}"` would."""
    numbers = pa.array(np.arange(start, stop, dtype=np.int64)).cast(pa.large_string())
    return pc.binary_join_element_wise(pa.scalar(prefix, pa.large_string()),
                                       pc.utf8_lpad(numbers, width=width, padding="0"),
                                       pa.scalar("", pa.large_string()))


def _rows(found: dict[str, tuple[dict, Any]]) -> tuple[tuple[str, ...], TextColumn, np.ndarray, np.ndarray,
                                                       ItemColumn]:
    """(the datasets' class names, ids, targets, split codes, locators) of every item of every split, as columns."""
    class_names: tuple[str, ...] = ()
    total = sum(len(dataset) for _, dataset in found.values())
    ids, targets = TextBuilder(), []
    hints, codes, index = np.empty(total, np.int8), np.empty(total, np.int8), np.empty(total, np.int64)
    row = 0
    for number, (split, (_, dataset)) in enumerate(found.items()):
        n = len(dataset)
        classes = getattr(dataset, "classes", None)
        if classes and not class_names:
            class_names = tuple(str(c) for c in classes)
        for start in range(0, n, _ID_ROWS):
            ids.append(_ids(f"{split or 'all'}/", start, min(n, start + _ID_ROWS), max(5, len(str(n - 1)))))
        targets.append(_targets(dataset))
        hints[row:row + n] = SPLITS.index(split) if split else UNDECIDED
        codes[row:row + n] = number
        index[row:row + n] = np.arange(n)
        row += n
    if not all(t.dtype.kind in "iu" for t in targets):  # texts, objects or mixed kinds: each as a Python value
        targets = [t.astype(object) for t in targets]
    return class_names, ids.finish(), np.concatenate(targets), hints, ItemColumn(tuple(found), codes, index)


def _labels(targets: np.ndarray, class_names: tuple[str, ...]) -> tuple[tuple[str, ...], np.ndarray]:
    """(class names, [n] label codes) of the targets: integer targets index the dataset's own classes when they
    name them all; otherwise (or without classes) each distinct label text is a class (`class_index`), and
    missing or negative targets are unlabelled. Integer targets are coded as arrays, others a row at a time."""
    if targets.dtype.kind in "iu":
        labelled = targets >= 0
        if class_names and not np.any(targets[labelled] >= len(class_names)):
            return class_names, np.where(labelled, targets, UNLABELLED).astype(np.int64, copy=False)
        present = np.unique(targets[labelled])
        return tuple(str(v) for v in present.tolist()), \
            np.where(labelled, np.searchsorted(present, targets), UNLABELLED).astype(np.int64, copy=False)
    names = [label_text(target) for target in targets.tolist()]
    if class_names and all(v is None or (re.fullmatch(r"\d+", v) and int(v) < len(class_names)) for v in names):
        return class_names, np.array([UNLABELLED if v is None else int(v) for v in names], dtype=np.int64)
    class_names, labels = class_index(names)
    return class_names, np.array(labels, dtype=np.int64)


def scan_torchvision(name: str | type, options: ListOptions = DEFAULT_OPTIONS) -> Source:
    """List a `torchvision.datasets` class (by name, or the class itself) over a local root.

    Splits come from the constructor: `train=True/False` gives train/test, `split=` is tried with train, val and
    test; a class with neither is one set, split stratified. Ids are `split/index`. Files are fetched only with
    `download=True` (and a network); otherwise they must already be under `root`.
    """
    cls = _dataset_class(name.removeprefix("torchvision:")) if isinstance(name, str) else name
    root = options.root
    if "root" in inspect.signature(cls).parameters and root is None:
        raise DataError(f"torchvision:{cls.__name__} needs --root DIR (the folder that holds or will hold its files)")
    root_text = None if root is None else str(Path(root))
    found = _construct_splits(cls, root_text, options.download)
    class_names, ids, targets, hints, locators = _rows(found)
    class_names, labels = _labels(targets, class_names)
    del targets
    spec = TorchvisionSpec(cls, root_text, tuple((s, tuple(sorted(kw.items()))) for s, (kw, _) in found.items()))
    reader = TorchvisionReader(spec)
    reader._datasets = {s: ds for s, (_, ds) in found.items()}  # reuse in this process
    # every row's stamp is the root's: one pair seen n times (a read-only view; what is taken from it is copied)
    stamps = np.broadcast_to(np.array(_root_stamp(root_text), dtype=np.int64), (len(ids), 2))
    base = Path(root_text) if root_text else Path(".")
    # every row's path is the root (the store's path column: where the dataset lives), "." under it
    paths = FileColumn(printable(os.path.abspath(base)), TextColumn(b"." * len(ids), np.arange(len(ids) + 1)))
    description = f"torchvision:{cls.__name__}" + (f" (root {root_text})" if root_text else "")
    return finish_table("torchvision", base, ids, paths, class_names, labels, hints, stamps, options=options,
                        hinted_by="torchvision", key_of=ids.__getitem__, reader=reader, description=description,
                        locators=locators, label_source="dataset targets" if class_names else "")


def open_if_mine(data: str, options: ListOptions) -> Source | None:
    return scan_torchvision(data, options) if data.startswith("torchvision:") else None
