"""torchvision datasets as a source: `--data torchvision:CIFAR10 --root DIR`, any `torchvision.datasets` class that
yields images, read from a local root and downloaded only when asked. Ids are `split/index`, and a stratified split
is by id: a torchvision dataset has only the one spelling."""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.engine.decode import PerProcessReader
from pipeline.errors import DataError
from pipeline.sources.base import DEFAULT_OPTIONS, UNLABELLED, ListOptions, Source, class_index, finish, label_text

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


def _targets(dataset: Any) -> list[Any]:
    n = len(dataset)
    for attr in ("targets", "labels", "_labels", "y"):
        values = getattr(dataset, attr, None)
        if values is not None and not isinstance(values, str | bytes) and hasattr(values, "__len__") \
                and len(values) == n:
            return np.asarray(values).reshape(n, -1)[:, 0].tolist() if n else []
    log.info("%s has no targets attribute: reading each item for its label", type(dataset).__name__)
    return [item[1] if isinstance(item, tuple | list) and len(item) > 1 else None for item in
            (dataset[i] for i in range(n))]


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


def _rows(found: dict[str, tuple[dict, Any]]) -> tuple[tuple[str, ...], list, list, list, list]:
    """(the datasets' class names, ids, label names, splits, locators) of every item of every split."""
    class_names: tuple[str, ...] = ()
    ids, names, splits, locators = [], [], [], []
    for split, (_, dataset) in found.items():
        n = len(dataset)
        width = max(5, len(str(n - 1)))
        classes = getattr(dataset, "classes", None)
        if classes and not class_names:
            class_names = tuple(str(c) for c in classes)
        for index, target in enumerate(_targets(dataset)):
            ids.append(f"{split or 'all'}/{index:0{width}d}")
            names.append(None if target is None else label_text(target))
            splits.append(split)
            locators.append((split, index))
    return class_names, ids, names, splits, locators


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
    class_names, ids, names, splits, locators = _rows(found)
    if class_names and all(v is None or (re.fullmatch(r"\d+", v) and int(v) < len(class_names)) for v in names):
        labels = [UNLABELLED if v is None else int(v) for v in names]  # targets index the dataset's own classes
    else:
        class_names, labels = class_index(names)
    spec = TorchvisionSpec(cls, root_text, tuple((s, tuple(sorted(kw.items()))) for s, (kw, _) in found.items()))
    reader = TorchvisionReader(spec)
    reader._datasets = {s: ds for s, (_, ds) in found.items()}  # reuse in this process
    stamp = _root_stamp(root_text)
    base = Path(root_text) if root_text else Path(".")
    description = f"torchvision:{cls.__name__}" + (f" (root {root_text})" if root_text else "")
    return finish("torchvision", base, ids, [base] * len(ids), class_names, labels,
                  [s if s else None for s in splits], options=options, hinted_by="torchvision",
                  key_of=lambda i: ids[i], reader=reader, description=description, locators=locators,
                  stamps=[stamp] * len(ids), label_source="dataset targets" if class_names else "")


def open_if_mine(data: str, options: ListOptions) -> Source | None:
    return scan_torchvision(data, options) if data.startswith("torchvision:") else None
