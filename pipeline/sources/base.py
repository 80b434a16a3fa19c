"""What every source kind gives: samples (id, label, split, where to read it), class names, how labels and splits were
decided, and the reader. Each kind lists its rows; `finish` decides the splits and checks the whole the same way for
all of them, so that the same images give the same store whichever way they come.

Splits follow the source when it gives them for every sample (split folders, a manifest column, shard names, json)
and are otherwise stratified by content (`pipeline.splits`); `--split stratified` ignores what the source says.
Problems of the source as a whole (duplicate ids, a split for some samples only, classes with no training images)
are errors here, before any compute; problems of single images are failures recorded by the decode stage.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pipeline.engine.decode import (
    DEFAULT_MAX_FILE_BYTES,
    SPLITS,
    FileReader,
    Reader,
    content_hash,
    file_stamp,
    raw_hash,
)
from pipeline.errors import DataError
from pipeline.sources.hints import how_to
from pipeline.sources.stamps import DIGEST_WIDTH, file_digests
from pipeline.sources.table import UNDECIDED, SampleTable, TextColumn
from pipeline.splits import pick_per_label

log = logging.getLogger(__name__)

UNLABELLED = -1
SPLIT_MODES = ("auto", "stratified")
DATA_HINT = ("pass --data an image folder, a manifest (.csv, .parquet, .jsonl), WebDataset tar shards (a .tar, a "
             "folder of them, or a pattern like shards/train-{000000..000009}.tar) or torchvision:NAME with --root DIR")


class Sample(NamedTuple):
    """One image: a stable `id`, where it lives (`path`: the file, or the tar shard / dataset root holding it), its
    `label` (index into the class names, -1 when unlabelled), its split, and the reader's `locator` (None: `path`).
    `stamp` is the (size, mtime_ns)-like pair that tells an incremental run whether to look again (None: the file's).
    A named tuple, not a dataclass: a listing of millions builds one per row, and a tuple is several times faster to
    build and smaller."""

    id: str
    path: str | Path
    label: int
    split: str
    locator: Any = None
    stamp: tuple[int, int] | None = None


@dataclass(frozen=True)
class ListOptions:
    """How to list a source: the stratified split's share and seed; `split` "auto" (the source's own splits when it
    gives them), "stratified" (always stratified) or "none" (no split decided: for looking images up); whether links
    may leave the data root; the byte limit for content hashing; and the content hashes already known from the
    store being updated (id -> (size, mtime_ns, hash)), so that only new or changed files are read to split."""

    test_fraction: float = 0.3
    seed: int = 0
    split: str = "auto"
    root: str | Path | None = None
    download: bool = False
    follow_links: bool = False
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES
    known: Mapping[str, tuple[int, int, str]] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.split not in (*SPLIT_MODES, "none"):
            raise DataError(f"unknown --split {self.split!r}; choose one of {', '.join(SPLIT_MODES)}")


DEFAULT_OPTIONS = ListOptions()


@dataclass(frozen=True)
class Source:
    """A listed image source: samples in store order (a tuple of `Sample`s, or a `SampleTable` of columns for a
    source of millions), class names, how splits and labels were decided, its reader, and warnings for the user (a
    labelled-looking source without labels, links that were not followed)."""

    kind: str  # folder | manifest | tar | torchvision
    root: Path
    samples: Sequence[Sample]
    class_names: tuple[str, ...]
    split_source: str
    reader: Reader = field(default_factory=FileReader)
    description: str = ""
    label_source: str = ""
    warnings: tuple[str, ...] = ()
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES
    stamp: str = ""  # the stats of the files the listing was read from, where they alone fix it (tar shards)

    def __len__(self) -> int:
        return len(self.samples)

    def split_counts(self) -> dict[str, int]:
        if isinstance(self.samples, SampleTable):
            return self.samples.split_counts()
        counts = Counter(s.split for s in self.samples)
        return {k: counts[k] for k in SPLITS if counts[k]}

    def locators(self, positions: Iterable[int] | None = None) -> Sequence:
        """Where each sample (all, or those at `positions`) is read from. A table's are its paths as a column
        (`FileColumn`/`TextColumn`: one buffer, not a string per row) or, for tar shards, its `MemberColumn`: what
        the decode workers receive."""
        if isinstance(self.samples, SampleTable):  # the paths, unless the table has other locators (tar members)
            column = self.samples.paths if self.samples.locators is None else self.samples.locators
            if positions is None:
                return column
            return column.take(positions if isinstance(positions, np.ndarray) else np.asarray(list(positions)))
        picked = self.samples if positions is None else [self.samples[int(i)] for i in positions]
        return [s.path if s.locator is None else s.locator for s in picked]

    def stamps(self) -> np.ndarray:
        """[n, 2] int64: each sample's stamp (a file's size and mtime_ns unless the source set its own)."""
        if isinstance(self.samples, SampleTable):
            return self.samples.stamps
        pairs = [s.stamp if s.stamp is not None else file_stamp(s.path) for s in self.samples]
        return np.array(pairs, dtype=np.int64).reshape(-1, 2)

    def content_hash(self, position: int) -> str:
        """The content hash the decode stage records for this sample (file bytes or image pixels); "" if unreadable."""
        try:
            raw = self.reader.read(self.locators([position])[0], self.max_file_bytes)
        except Exception:  # noqa: BLE001 - unreadable: no hash, so the row is recomputed (and fails there)
            return ""
        return raw_hash(raw)


def printable(text: str) -> str:
    """A file name as valid UTF-8 text: bytes that are not UTF-8 (kept by Python as surrogates) become `\\xNN`."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def known_key(options: ListOptions, sample_id: str, stamp: tuple[int, int]) -> str | None:
    """The content hash recorded for this id by the store being updated, if its stamp is unchanged."""
    if not options.known:
        return None
    found = options.known.get(sample_id)
    return found[2] if found is not None and (found[0], found[1]) == tuple(stamp) and found[2] else None


def content_keys(options: ListOptions, ids: list[str], stamps: list, read: Callable[[int], bytes]) -> Callable[[int],
                                                                                                               str]:
    """`key_of(i)` for `finish`: sample i's content hash, as recorded by the store being updated when its stamp is
    unchanged, else of the bytes `read(i)` returns ("" for a sample that cannot be read, or is refused with a
    ValueError)."""

    def key_of(i: int) -> str:
        known = known_key(options, ids[i], stamps[i])
        if known is not None:
            return known
        try:
            return content_hash(read(i))
        except (OSError, ValueError):
            return ""

    return key_of


def file_content_keys(options: ListOptions, ids: TextColumn, stamps: np.ndarray, files: Any,
                      workers: int | None = None) -> Callable[[int], str]:
    """`content_keys` of a table's files (a TextColumn or FileColumn of paths, or tar `MemberFiles`), found at the
    first key asked for: the files without a recorded hash read and hashed at once (`file_digests`: shared among
    processes for many rows), kept as 17 bytes a row."""
    found: list[tuple[np.ndarray, dict[int, str]]] = []

    def key_of(i: int) -> str:
        if not found:
            found.append(_digests(options, ids, stamps, files, workers))
        digests, known = found[0]
        digest = digests[i]
        return digest[:16].tobytes().hex() if digest[16] else known.get(i, "")

    return key_of


def _digests(options: ListOptions, ids: TextColumn, stamps: np.ndarray, files: Any,
             workers: int | None) -> tuple[np.ndarray, dict[int, str]]:
    """Each row's digest (`file_digests`; zeros for a row whose hash the store being updated records) and those
    recorded hashes by row: one look-up of a row's recorded hash, one read of each other file."""
    if not options.known:
        return _read(files, options.max_file_bytes, workers), {}
    known: dict[int, str] = {}
    for i in range(len(ids)):
        key = known_key(options, ids[i], stamps[i])
        if key is not None:
            known[i] = key
    unknown = np.setdiff1d(np.arange(len(ids), dtype=np.int64), np.fromiter(known, dtype=np.int64, count=len(known)),
                           assume_unique=True)
    digests = np.zeros((len(ids), DIGEST_WIDTH), dtype=np.uint8)
    if len(unknown):
        digests[unknown] = _read(files.take(unknown), options.max_file_bytes, workers)
    return digests, known


def _read(files: Any, max_bytes: int | None, workers: int | None) -> np.ndarray:
    """`file_digests`, or the files' own `digests` (tar members: `MemberFiles`)."""
    own = getattr(files, "digests", None)
    return file_digests(files, max_bytes, workers) if own is None else own(max_bytes, workers)


# -- labels ---------------------------------------------------------------------------------------------------------

def class_index(values: list[str | None]) -> tuple[tuple[str, ...], list[int]]:
    """Class names (integers in numeric order when every label is an integer, else sorted text) and label indices;
    None stays unlabelled."""
    present = sorted({v for v in values if v is not None})
    if present and all(re.fullmatch(r"-?\d+", v) for v in present):
        present.sort(key=int)
    index = {name: i for i, name in enumerate(present)}
    return tuple(present), [UNLABELLED if v is None else index[v] for v in values]


def class_order(classes: dict[str, int]) -> tuple[tuple[str, ...], np.ndarray]:
    """`class_index` of the label texts numbered in `classes`: the class names in order, and for each provisional
    code its class code (`recoded`)."""
    class_names, _ = class_index(list(classes))
    order = {name: i for i, name in enumerate(class_names)}
    return class_names, np.array([order[name] for name in classes] or [-1], dtype=np.int64)


def recoded(provisional: np.ndarray, remap: np.ndarray) -> np.ndarray:
    return np.where(provisional >= 0, remap[provisional], UNLABELLED).astype(np.int64)


_EMPTY_CELLS = frozenset(("nan", "none", "null"))
_NEGATIVE_INT = re.compile(r"-\d+")


def cell(value: Any) -> str | None:
    """A manifest cell as stripped text; empty, missing and NaN cells are None."""
    if type(value) is str:  # a CSV's cells: the common case, first
        text = value.strip()
        return None if not text or text.lower() in _EMPTY_CELLS else text
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return None if not text or text.lower() in _EMPTY_CELLS else text


def label_text(value: Any) -> str | None:
    """A label as text; missing, empty and negative integers (the usual -1) mean unlabelled."""
    text = cell(value)
    return None if text is None or (text[0] == "-" and _NEGATIVE_INT.fullmatch(text)) else text


_SPLIT_NAMES = {name: name for name in SPLITS}


def split_cell(value: Any, where: str, fix: str = "") -> str | None:
    """A split given by the source (`cell` text), which must be one of SPLITS; None where it gives none. The split is
    the SPLITS constant itself, not the cell's own string: a listing of millions then holds three strings, not one
    per row."""
    split = cell(value)
    if split is None:
        return None
    try:
        return _SPLIT_NAMES[split]
    except KeyError:
        raise DataError(f"{where} has split {value!r}; valid splits are {', '.join(SPLITS)}{fix}") from None


# -- checks of the whole ---------------------------------------------------------------------------------------------

def check_unique(ids: list[str], where: str, *, owners: list[str] | None = None) -> None:
    if len(set(ids)) == len(ids):  # the usual case, in a set (no count per id) freed at once
        return
    dupes = [i for i, n in Counter(ids).items() if n > 1]
    if dupes:
        example = dupes[0]
        seen = [owners[k] for k, i in enumerate(ids) if i == example] if owners else []
        raise DataError(f"{len(dupes)} id(s) occur more than once in {where} (e.g. {example!r}"
                        f"{' in ' + ', '.join(seen[:3]) if seen else ''}); ids must be unique: fix or add an id column")


def check_split_classes(names: list[str | None], splits: list[str], where: str, kind: str) -> None:
    """Every class seen in val/test needs training images (a probe could never predict it)."""
    train = {n for n, s in zip(names, splits, strict=True) if s == "train" and n is not None}
    _refuse_unseen(sorted({n for n, s in zip(names, splits, strict=True) if s != "train" and n is not None} - train),
                   where, kind)


def check_split_codes(class_names: tuple[str, ...], labels: np.ndarray, codes: np.ndarray, where: str,
                      kind: str) -> None:
    """`check_split_classes` of label and split codes."""
    labelled = labels >= 0
    unseen = np.setdiff1d(labels[labelled & (codes != 0)], labels[labelled & (codes == 0)])
    _refuse_unseen(sorted(class_names[i] for i in unseen.tolist()), where, kind)


def _refuse_unseen(unseen: list[str], where: str, kind: str) -> None:
    if unseen:
        raise DataError(f"classes {unseen[:5]}{' ...' if len(unseen) > 5 else ''} of {where} appear in val/test "
                        "but have no training images; every class needs training images (fix the labels or splits, "
                        f"or {how_to(kind, 'splits').split(', or ')[-1]})")


def split_mode(kind: str, n: int, given: int, *, options: ListOptions, hinted_by: str, description: str) -> str:
    """How the splits of n samples are decided when the source gives `given` of them: "none" (not decided),
    "given" (the source's own) or "stratified"; some given and not all is an error."""
    if options.split == "none":
        return "none"
    if options.split == "auto" and given and given == n:
        return "given"
    if options.split == "auto" and given:
        raise DataError(f"{given} of the {n} samples of {description} have a split ({hinted_by}) and the others "
                        f"do not; {how_to(kind, 'splits')}")
    return "stratified"


def stratified_source(options: ListOptions, hinted_by: str, given: int) -> str:
    text = f"stratified(test_fraction={options.test_fraction}, seed={options.seed}, by content)"
    return text + (f", overriding the {hinted_by}" if given else "")


def unlabelled_warning(kind: str, n: int, class_names: tuple[str, ...], description: str) -> list[str]:
    if n and not class_names and kind in ("manifest", "tar"):
        return [f"{description}: none of the {n} images has a label, so probe and kNN will refuse the store; "
                f"to label them, {how_to(kind, 'labels')}"]
    return []


def finish(kind: str, root: Path, ids: list[str], paths: list[Path], class_names: tuple[str, ...], labels: list[int],
           hints: list[str | None], *, options: ListOptions, hinted_by: str, key_of: Callable[[int], str],
           reader: Reader, description: str, locators: list | None = None,
           stamps: list[tuple[int, int] | None] | None = None, label_source: str = "",
           warnings: list[str] | None = None) -> Source:
    """Decide the splits, check the whole and build the `Source` (rows in the order given).

    `hints` are the source's own splits (None where it gives none); `key_of(i)` is sample i's content key for the
    stratified split, asked for only when one is needed."""
    n = len(ids)
    given = sum(h is not None for h in hints)
    mode = split_mode(kind, n, given, options=options, hinted_by=hinted_by, description=description)
    if mode == "none":
        splits, split_source = [""] * n, "not decided (lookup)"
    elif mode == "given":
        check_split_classes([None if label < 0 else class_names[label] for label in labels], list(hints),
                            description, kind)
        splits, split_source = list(hints), hinted_by
    else:
        test = pick_per_label(np.asarray(labels, dtype=np.int64), key_of, fraction=options.test_fraction,
                              seed=options.seed, tie_of=ids.__getitem__)
        splits = [("train", "test")[t] for t in test.tolist()]  # two strings shared by all rows
        split_source = stratified_source(options, hinted_by, given)
    warnings = [*(warnings or []), *unlabelled_warning(kind, n, class_names, description)]
    locators = locators or [None] * n
    stamps = stamps or [None] * n
    samples = tuple(map(Sample._make, zip(ids, paths, labels, splits, locators, stamps, strict=True)))
    return _source(kind, root, samples, class_names, split_source, reader, description, label_source, warnings,
                   options)


def finish_table(kind: str, root: Path, ids: TextColumn, paths: TextColumn, class_names: tuple[str, ...],
                 labels: np.ndarray, hints: np.ndarray, stamps: np.ndarray, *, options: ListOptions, hinted_by: str,
                 key_of: Callable[[int], str], reader: Reader, description: str, label_source: str = "",
                 warnings: list[str] | None = None, locators: Any = None) -> Source:
    """`finish` of columns: `labels` codes, `hints` split codes (UNDECIDED where the source gives none), [n, 2]
    `stamps` and the reader's `locators` where they are not the paths; the source's samples are a `SampleTable`."""
    n = len(ids)
    given = int(np.count_nonzero(hints != UNDECIDED))
    mode = split_mode(kind, n, given, options=options, hinted_by=hinted_by, description=description)
    if mode == "none":
        codes, split_source = np.full(n, UNDECIDED, dtype=np.int8), "not decided (lookup)"
    elif mode == "given":
        check_split_codes(class_names, labels, hints, description, kind)
        codes, split_source = hints.astype(np.int8, copy=False), hinted_by
    else:
        test = pick_per_label(labels, key_of, fraction=options.test_fraction, seed=options.seed,
                              tie_of=ids.__getitem__)  # keys asked for one at a time, kept as 20-byte ranks
        codes = np.where(test, SPLITS.index("test"), SPLITS.index("train")).astype(np.int8)
        split_source = stratified_source(options, hinted_by, given)
    samples = SampleTable(ids, paths, labels.astype(np.int64, copy=False), codes, stamps, locators)
    return _source(kind, root, samples, class_names, split_source, reader, description, label_source,
                   [*(warnings or []), *unlabelled_warning(kind, n, class_names, description)], options)


def _source(kind: str, root: Path, samples: Sequence[Sample], class_names: tuple[str, ...], split_source: str,
            reader: Reader, description: str, label_source: str, warnings: list[str], options: ListOptions) -> Source:
    if options.split != "none":
        for warning in warnings:
            log.warning("%s", warning)
    return Source(kind, root, samples, class_names, split_source, reader, description, label_source, tuple(warnings),
                  options.max_file_bytes)
