"""Image sources → samples (id, label, split, locator), and the reader that turns a locator into bytes or an image.

Four kinds give the same `Source`, so that extraction and the store never care where images come from:
- an image folder: `ROOT/<class>/<image>` or `ROOT/{train,val,test}/<class>/<image>`; ids are paths relative to ROOT;
- a manifest (CSV, Parquet, JSON Lines) with `path` and optional `label`, `split`, `id` columns;
- WebDataset-style tar shards (`key.jpg` + `key.cls`/`key.json`), read in place at each member's offset;
- a `torchvision.datasets` class over a local root (`torchvision:CIFAR10`; see `pipeline.torchvision_sets`).
Ids never depend on worker count, batch size or read order. Problems of the source as a whole (paths that do not
exist, duplicate ids, classes with no training images, bad split names) are errors here, before any compute;
problems of single images are failures recorded by the decode stage (`pipeline.datasets`).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import logging
import math
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.datasets import (
    IMAGE_EXTENSIONS,
    SPLITS,
    FileReader,
    Reader,
    file_stamp,
    raw_hash,
)
from pipeline.errors import DataError

log = logging.getLogger(__name__)

LAYOUT_HINT = "expected ROOT/<class>/<image> or ROOT/{train,val,test}/<class>/<image>"
MANIFEST_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
DATA_HINT = ("pass --data an image folder, a manifest (.csv, .parquet, .jsonl), WebDataset tar shards (a .tar, a "
             "folder of them, or a pattern like shards/train-{000000..000009}.tar) or torchvision:NAME with --root DIR")
UNLABELLED = -1
# WebDataset: which member of a key is the image when several are, and which carry the label.
_TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_TAR_LABEL_EXTS = ("cls", "cls.txt", "label", "label.txt")


@dataclass(frozen=True)
class Sample:
    """One image: a stable `id`, where it lives (`path`: the file, or the tar shard / dataset root holding it), its
    `label` (index into the class names, -1 when unlabelled), its split, and the reader's `locator` (None: `path`).
    `stamp` is the (size, mtime_ns)-like pair that tells an incremental run whether to look again (None: the file's)."""

    id: str
    path: Path
    label: int
    split: str
    locator: Any = None
    stamp: tuple[int, int] | None = None


@dataclass(frozen=True)
class Source:
    """A listed image source: samples in store order, class names, how splits were decided, and its reader."""

    kind: str  # folder | manifest | tar | torchvision
    root: Path
    samples: tuple[Sample, ...]
    class_names: tuple[str, ...]
    split_source: str
    reader: Reader = field(default_factory=FileReader)
    description: str = ""

    def __len__(self) -> int:
        return len(self.samples)

    def split_counts(self) -> dict[str, int]:
        counts = Counter(s.split for s in self.samples)
        return {k: counts[k] for k in SPLITS if counts[k]}

    def locators(self, positions: Iterable[int] | None = None) -> list:
        picked = self.samples if positions is None else [self.samples[int(i)] for i in positions]
        return [s.path if s.locator is None else s.locator for s in picked]

    def stamps(self) -> np.ndarray:
        """[n, 2] int64: each sample's stamp (a file's size and mtime_ns unless the source set its own)."""
        pairs = [s.stamp if s.stamp is not None else file_stamp(s.path) for s in self.samples]
        return np.array(pairs, dtype=np.int64).reshape(-1, 2)

    def content_hash(self, position: int) -> str:
        """The content hash the decode stage records for this sample (file bytes or image pixels); "" if unreadable."""
        try:
            raw = self.reader.read(self.locators([position])[0])
        except Exception:  # noqa: BLE001 - unreadable: no hash, so the row is recomputed (and fails there)
            return ""
        return raw_hash(raw)


# -- shared checks ------------------------------------------------------------------------------------------------

def assign_splits(ids: list[str], *, test_fraction: float, seed: int) -> list[str]:
    """Return the ids of one class that go to test: the `round(n * test_fraction)` with the smallest seeded hash.

    Hash order (not list order) makes the choice independent of how files are listed and keeps most assignments
    when images are added. A class keeps at least one training image, and gets a test image when it has two or more.
    """
    n = len(ids)
    n_test = min(max(round(n * test_fraction), 1 if n >= 2 else 0), n - 1)
    ranked = sorted(ids, key=lambda i: hashlib.sha1(f"{seed}:{i}".encode()).hexdigest())
    return ranked[:n_test]


def _stratified(ids: list[str], labels: list[int], *, test_fraction: float, seed: int) -> list[str]:
    """Train/test per label group (unlabelled images form one group of their own)."""
    groups: dict[int, list[str]] = {}
    for i, label in zip(ids, labels, strict=True):
        groups.setdefault(label, []).append(i)
    test = {i for group in groups.values() for i in assign_splits(group, test_fraction=test_fraction, seed=seed)}
    return ["test" if i in test else "train" for i in ids]


def _check_split_classes(names: list[str | None], splits: list[str], where: str) -> None:
    """Every class seen in val/test needs training images (a probe could never predict it)."""
    train = {n for n, s in zip(names, splits, strict=True) if s == "train" and n is not None}
    unseen = sorted({n for n, s in zip(names, splits, strict=True) if s != "train" and n is not None} - train)
    if unseen:
        raise DataError(f"classes {unseen[:5]}{' ...' if len(unseen) > 5 else ''} of {where} appear in val/test "
                        "but have no training images; every class needs training images (fix the labels or splits)")


def _check_unique(ids: list[str], where: str, *, owners: list[str] | None = None) -> None:
    dupes = [i for i, n in Counter(ids).items() if n > 1]
    if dupes:
        example = dupes[0]
        seen = [owners[k] for k, i in enumerate(ids) if i == example] if owners else []
        raise DataError(f"{len(dupes)} id(s) occur more than once in {where} (e.g. {example!r}"
                        f"{' in ' + ', '.join(seen[:3]) if seen else ''}); ids must be unique: fix or add an id column")


def _class_index(values: list[str | None]) -> tuple[tuple[str, ...], list[int]]:
    """Class names (integers in numeric order when every label is an integer, else sorted text) and label indices;
    None stays unlabelled."""
    present = sorted({v for v in values if v is not None})
    if present and all(re.fullmatch(r"-?\d+", v) for v in present):
        present.sort(key=int)
    index = {name: i for i, name in enumerate(present)}
    return tuple(present), [UNLABELLED if v is None else index[v] for v in values]


def _cell(value: Any) -> str | None:
    """A manifest cell as stripped text; empty, missing and NaN cells are None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return None if not text or text.lower() in ("nan", "none", "null") else text


def _label_text(value: Any) -> str | None:
    """A label as text; missing, empty and negative integers (the usual -1) mean unlabelled."""
    text = _cell(value)
    return None if text is None or re.fullmatch(r"-\d+", text) else text


# -- image folders ------------------------------------------------------------------------------------------------

def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_under(path: Path) -> list[Path]:
    """Every entry with an image extension below `path` that is not a folder (regular files, links, broken links,
    FIFOs: the ones that cannot be read become recorded failures, never silent omissions); hidden ones skipped."""
    found = []
    for p in path.rglob("*"):
        if any(part.startswith(".") for part in p.relative_to(path).parts):
            continue
        if _is_image_name(p) and not p.is_dir():
            found.append(p)
    return sorted(found)


def _class_files(split_dir: Path) -> dict[str, list[Path]]:
    stray = [p for p in split_dir.iterdir() if _is_image_name(p)]
    if stray:
        raise DataError(f"{len(stray)} image(s) lie directly in {split_dir} (e.g. {stray[0].name}) with no class "
                        f"folder; {LAYOUT_HINT}")
    return {d.name: files for d in _visible_dirs(split_dir) if (files := _images_under(d))}


def scan_image_folder(root: str | Path, *, test_fraction: float = 0.3, seed: int = 0) -> Source:
    """List the images of an image folder with their labels and splits.

    With split folders the folder gives the split; otherwise each class is split deterministically into train and
    test (see `assign_splits`) and `split_source` records how.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; {DATA_HINT}")
    if not root.is_dir():
        raise DataError(f"--data {root} is a file of a kind not recognised (not a manifest or tar shard); {DATA_HINT}")
    subdirs = _visible_dirs(root)
    split_dirs = [d for d in subdirs if d.name in SPLITS]
    if split_dirs:
        others = [d.name for d in subdirs if d.name not in SPLITS]
        if others:
            raise DataError(f"{root} mixes split folders ({', '.join(d.name for d in split_dirs)}) with other "
                            f"folders ({', '.join(others[:5])}); {LAYOUT_HINT}")
        per_split = {d.name: _class_files(d) for d in split_dirs}
        if not per_split.get("train"):
            raise DataError(f"{root} has split folders but no images in {root / 'train'}; {LAYOUT_HINT}")
        found = [(p, cls, split) for split, classes in per_split.items() for cls, files in classes.items()
                 for p in files]
        _check_split_classes([cls for _, cls, _ in found], [split for _, _, split in found], str(root))
        split_source = "folders"
    else:
        classes = _class_files(root)
        found = [(p, cls, "") for cls, files in classes.items() for p in files]
        split_source = f"stratified(test_fraction={test_fraction}, seed={seed})"
    if not found:
        raise DataError(f"no images found under {root} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                        f"{LAYOUT_HINT}")
    class_names = tuple(sorted({cls for _, cls, _ in found}))
    index = {name: i for i, name in enumerate(class_names)}
    ids = [p.relative_to(root).as_posix() for p, _, _ in found]
    labels = [index[cls] for _, cls, _ in found]
    splits = [s for _, _, s in found] if split_dirs else _stratified(ids, labels, test_fraction=test_fraction,
                                                                     seed=seed)
    rows = zip(ids, found, labels, splits, strict=True)
    samples = sorted((Sample(i, p, label, split) for i, (p, _, _), label, split in rows), key=lambda s: s.id)
    return Source("folder", root, tuple(samples), class_names, split_source, FileReader(), str(root))


# -- manifests ----------------------------------------------------------------------------------------------------

def _manifest_rows(path: Path) -> list[dict[str, Any]]:
    fmt = MANIFEST_FORMATS[path.suffix.lower()]
    try:
        if fmt == "csv":
            with open(path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
                columns = [c.strip() for c in reader.fieldnames or []]
        elif fmt == "parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError as exc:
                raise DataError(f"reading {path} needs pyarrow; pip install pyarrow (or use a CSV manifest)") from exc
            table = pq.read_table(path)
            columns, rows = list(table.column_names), table.to_pylist()
        else:
            rows, columns = [], []
            with open(path, encoding="utf-8") as fh:
                for number, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path} line {number} is not valid JSON ({exc.msg}); one object per line") \
                            from exc
                    if not isinstance(row, dict):
                        raise DataError(f"{path} line {number} is a JSON {type(row).__name__}, not an object "
                                        '(expected {"path": ..., "label": ...} per line)')
                    rows.append(row)
                    columns.extend(k for k in row if k not in columns)
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as exc:
        raise DataError(f"cannot read manifest {path} ({type(exc).__name__}: {exc})") from exc
    if "path" not in columns:
        raise DataError(f"manifest {path} has no 'path' column (columns: {', '.join(map(str, columns)) or 'none'}); "
                        "expected path and optionally label, split, id")
    return rows


def scan_manifest(path: str | Path, *, test_fraction: float = 0.3, seed: int = 0) -> Source:
    """List the images of a manifest: `path` (absolute or relative to the manifest's folder), optional `label`
    (missing or empty: unlabelled), `split` (train/val/test; when absent, stratified as for folders) and `id`
    (default: the path as written). Missing files, duplicate ids and bad splits are errors before any compute."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist; {DATA_HINT}")
    rows = _manifest_rows(path)
    if not rows:
        raise DataError(f"manifest {path} lists no images; add rows with a path column")
    base = path.parent
    ids, files, names, splits = [], [], [], []
    has_split = any(_cell(r.get("split")) is not None for r in rows)
    for number, row in enumerate(rows, 1):
        raw = row.get("path")
        text = "" if raw is None else str(raw).strip()
        if not text:
            raise DataError(f"{path} row {number} has an empty path; every row needs one")
        file = Path(text) if Path(text).is_absolute() else base / text
        files.append(file)
        ids.append(_cell(row.get("id")) or Path(text).as_posix())
        names.append(_label_text(row.get("label")))
        split = _cell(row.get("split"))
        if has_split and split not in SPLITS:
            raise DataError(f"{path} row {number} has split {row.get('split')!r}; valid splits are "
                            f"{', '.join(SPLITS)} (give every row one, or drop the column to split automatically)")
        splits.append(split)
    missing = [(n, f) for n, f in enumerate(files, 1) if not os.path.lexists(f)]
    if missing:
        n, f = missing[0]
        raise DataError(f"{len(missing)} path(s) in {path} do not exist (e.g. row {n}: {f}); paths are absolute or "
                        f"relative to {base}: fix them or remove the rows")
    _check_unique(ids, str(path))
    class_names, labels = _class_index(names)
    if has_split:
        _check_split_classes(names, splits, str(path))
        split_source = "manifest"
    else:
        splits = _stratified(ids, labels, test_fraction=test_fraction, seed=seed)
        split_source = f"stratified(test_fraction={test_fraction}, seed={seed})"
    samples = tuple(Sample(i, f, label, s) for i, f, label, s in zip(ids, files, labels, splits, strict=True))
    return Source("manifest", path, samples, class_names, split_source, FileReader(), str(path))


# -- WebDataset tar shards ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TarMember:
    """Where a sample's image lies: shard number, byte offset and size of the member (`problem`: why there is none)."""

    shard: int
    offset: int
    size: int
    problem: str = ""


class TarReader:
    """Reads members in place (no unpacking): one positional read per image. File handles are opened lazily per
    process and never pickled."""

    def __init__(self, shards: tuple[Path, ...]) -> None:
        self.shards = shards
        self._fds: dict[int, int] = {}

    def __getstate__(self) -> dict:
        return {"shards": self.shards}

    def __setstate__(self, state: dict) -> None:
        self.shards, self._fds = state["shards"], {}

    def read(self, locator: TarMember) -> bytes:
        if locator.problem:
            raise ValueError(locator.problem)
        if locator.shard not in self._fds:
            self._fds[locator.shard] = os.open(self.shards[locator.shard], os.O_RDONLY)
        data = os.pread(self._fds[locator.shard], locator.size, locator.offset)
        if len(data) < locator.size:
            raise OSError(f"truncated member: {len(data)} of {locator.size} bytes in {self.shards[locator.shard]}")
        return data


def _expand_braces(pattern: str) -> list[str]:
    """WebDataset/bash brace patterns: `a-{000..003}.tar` (zero-padded ranges) and `{train,val}.tar`."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail, body = pattern[:match.start()], pattern[match.end():], match.group(1)
    ranged = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if ranged:
        lo, hi = ranged.groups()
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [p for option in options for p in _expand_braces(head + option + tail)]


def tar_shards(data: str | Path) -> list[Path]:
    """The tar shards `data` names (a .tar file, a folder holding .tar files and no sub-folders, a brace pattern or a
    glob); [] when it names none."""
    text = str(data)
    path = Path(text)
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.name.endswith(".tar") and p.is_file())
        return shards if shards and not _visible_dirs(path) else []
    if ".tar" not in text and ".tgz" not in text:
        return []
    names = [n for pattern in _expand_braces(text) for n in (sorted(glob.glob(pattern)) if glob.has_magic(pattern)
                                                               else [pattern])]
    missing = [n for n in names if not Path(n).is_file()]
    if missing:
        raise DataError(f"{len(missing)} of {len(names)} tar shard(s) do not exist (e.g. {missing[0]}); check --data")
    return [Path(n) for n in names]


def _split_from_name(name: str) -> str | None:
    for split in SPLITS:
        if re.match(rf"{split}([-_.]|$)", name):
            return split
    return None


def _tar_groups(shard: Path) -> dict[str, dict[str, tarfile.TarInfo]]:
    """key → {extension: member} for one shard, in member order (WebDataset: the key is the path up to the first
    dot of the file name, the extension is the rest)."""
    with open(shard, "rb") as fh:
        magic = fh.read(3)
    if magic[:2] == b"\x1f\x8b" or magic == b"BZh" or magic[:3] == b"\xfd7z":
        raise DataError(f"{shard} is compressed; shards are read in place by offset, so they must be plain .tar "
                        "(images are compressed already): decompress it (e.g. gunzip) and point --data at the .tar")
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    count = 0
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                count += 1
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot or base.startswith("."):
                    continue
                key = f"{folder}/{stem}" if folder else stem
                groups.setdefault(key, {})[ext.lower()] = member
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{shard} is not a readable tar file after {count} member(s) ({exc}); re-create the shard "
                        "or leave it out of --data") from exc
    return groups


def _tar_meta(fh: Any, members: dict[str, tarfile.TarInfo]) -> tuple[str | None, str | None]:
    """(label, split) of one key from its `.cls` or `.json` member (`fh`: the shard, open for reading)."""
    def text(ext: str) -> str:
        fh.seek(members[ext].offset_data)
        return fh.read(members[ext].size).decode("utf-8", errors="replace")

    label = split = None
    if "json" in members:
        try:
            meta = json.loads(text("json"))
        except json.JSONDecodeError:
            meta = None
        if isinstance(meta, dict):
            label = _label_text(next((meta[k] for k in ("label", "cls", "class") if k in meta), None))
            split = _cell(meta.get("split"))
    for ext in _TAR_LABEL_EXTS:
        if ext in members:
            label = _label_text(text(ext))
            break
    return label, split


def scan_tar_shards(shards: list[Path], *, test_fraction: float = 0.3, seed: int = 0) -> Source:
    """List WebDataset-style tar shards: one sample per key with an image member; the label comes from `.cls` (or
    `.json` {"label": ...}); the split from the json's "split", else from a shard name starting with train/val/test,
    else stratified. A key without an image becomes a recorded failure; duplicate keys across shards are an error."""
    if not shards:
        raise DataError(f"no tar shards given; {DATA_HINT}")
    ids, owners, names, splits, members, stamps = [], [], [], [], [], []
    for number, shard in enumerate(shards):
        mtime = os.stat(shard).st_mtime_ns
        groups = _tar_groups(shard)
        with open(shard, "rb") as fh:
            metas = [_tar_meta(fh, group) for group in groups.values()]
        for (key, group), (label, split) in zip(groups.items(), metas, strict=True):
            if split is not None and split not in SPLITS:
                raise DataError(f"{shard}: key {key!r} has split {split!r}; valid splits are {', '.join(SPLITS)}")
            image_ext = next((e for e in _TAR_IMAGE_EXTS if e in group), None)
            if image_ext is None:
                found = ", ".join(sorted(group))
                members.append(TarMember(number, 0, 0, f"no image member for key {key!r} (members: {found})"))
                stamps.append((0, mtime))
            else:
                info = group[image_ext]
                members.append(TarMember(number, info.offset_data, info.size))
                stamps.append((info.size, mtime))
            ids.append(key)
            owners.append(shard.name)
            names.append(label)
            splits.append(split or _split_from_name(shard.name))
    if not ids:
        raise DataError(f"the {len(shards)} tar shard(s) hold no samples (expected members like KEY.jpg + KEY.cls)")
    _check_unique(ids, f"{len(shards)} tar shard(s)", owners=owners)
    class_names, labels = _class_index(names)
    if all(s is not None for s in splits):
        _check_split_classes(names, splits, "the tar shards")
        split_source = "shards"
    elif any(s is not None for s in splits):
        raise DataError("some tar samples have a split (json 'split' or a train/val/test shard name) and others do "
                        "not; give all of them one, or none to split automatically")
    else:
        splits = _stratified(ids, labels, test_fraction=test_fraction, seed=seed)
        split_source = f"stratified(test_fraction={test_fraction}, seed={seed})"
    samples = tuple(Sample(i, shards[m.shard], label, s, m, stamp)
                    for i, label, s, m, stamp in zip(ids, labels, splits, members, stamps, strict=True))
    description = str(shards[0]) if len(shards) == 1 else f"{shards[0]} .. {shards[-1].name} ({len(shards)} shards)"
    return Source("tar", shards[0].parent, samples, class_names, split_source, TarReader(tuple(shards)), description)


# -- dispatch -----------------------------------------------------------------------------------------------------

def open_source(data: str | Path, *, root: str | Path | None = None, download: bool = False,
                test_fraction: float = 0.3, seed: int = 0) -> Source:
    """The source `data` names: `torchvision:NAME` (with `root`), a manifest file, tar shards, or an image folder."""
    text = str(data)
    if text.startswith("torchvision:"):
        from pipeline.torchvision_sets import scan_torchvision

        return scan_torchvision(text.split(":", 1)[1], root=root, download=download, test_fraction=test_fraction,
                                seed=seed)
    if root is not None or download:
        raise DataError("--root and --download apply only to --data torchvision:NAME; drop them or use that form")
    path = Path(text)
    if path.suffix.lower() in MANIFEST_FORMATS:
        return scan_manifest(path, test_fraction=test_fraction, seed=seed)
    shards = tar_shards(text)
    if shards:
        return scan_tar_shards(shards, test_fraction=test_fraction, seed=seed)
    if not path.exists():
        raise DataError(f"--data {text} does not exist; {DATA_HINT}")
    return scan_image_folder(path, test_fraction=test_fraction, seed=seed)
