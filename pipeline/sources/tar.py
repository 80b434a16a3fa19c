"""WebDataset-style tar shards (`key.jpg` + `key.cls`/`key.json`), read in place at each member's offset.

Labels come from `KEY.cls` (or `KEY.json` {"label": ...}). A tar with no such labels at all, made from an image folder
(`tar cf x.tar classA classB`, or `tar cf x.tar images` with class folders inside), is read like that folder: below
the folder its members share, the first folder is the class, or `train`/`val`/`test` then the class (as timm's tar
reader takes labels from member folders). Splits come from the json's "split", else a shard name starting with
train/val/test, else those split folders, else stratified.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import itertools
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from pipeline.engine.decode import SPLITS, PerProcessReader, check_file_size
from pipeline.errors import DataError
from pipeline.sources.base import (
    DATA_HINT,
    DEFAULT_OPTIONS,
    ListOptions,
    Source,
    check_unique,
    class_order,
    file_content_keys,
    finish_table,
    label_text,
    printable,
    recoded,
    split_cell,
)
from pipeline.sources.members import MemberBuilder, MemberFiles, ShardPaths, TarMember
from pipeline.sources.stamps import in_order, stat_workers
from pipeline.sources.table import UNDECIDED, TextBuilder
from pipeline.sources.tarheaders import Entry, plain_entries

log = logging.getLogger(__name__)

# Which member of a key is the image when several are, and which carry the label.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
LABEL_EXTS = ("cls", "cls.txt", "label", "label.txt")


class TarReader(PerProcessReader):
    """Reads members in place (no unpacking): one positional read per image, after checking the member's size.
    File handles are opened lazily per process and never pickled."""

    kept = ("shards",)

    def __init__(self, shards: tuple[Path, ...]) -> None:
        self.shards = shards
        self.fresh()

    def fresh(self) -> None:
        self._fds: dict[int, int] = {}

    def read(self, locator: TarMember, max_bytes: int | None = None) -> bytes:
        if locator.problem:
            raise ValueError(locator.problem)
        check_file_size(locator.size, max_bytes)
        if locator.shard not in self._fds:
            self._fds[locator.shard] = os.open(self.shards[locator.shard], os.O_RDONLY)
        data = os.pread(self._fds[locator.shard], locator.size, locator.offset)
        if len(data) < locator.size:
            raise OSError(f"truncated member: {len(data)} of {locator.size} bytes in {self.shards[locator.shard]}")
        return data


def expand_braces(pattern: str) -> list[str]:
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
    return [p for option in options for p in expand_braces(head + option + tail)]


def tar_shards(data: str | Path) -> list[Path]:
    """The tar shards `data` names (a .tar file, a folder holding .tar files and no sub-folders, a brace pattern or a
    glob); [] when it names none."""
    text = str(data)
    path = Path(text)
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.name.endswith(".tar") and p.is_file())
        has_dirs = any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir())
        return shards if shards and not has_dirs else []
    if ".tar" not in text and ".tgz" not in text:
        return []
    names = [n for pattern in expand_braces(text) for n in (sorted(glob.glob(pattern)) if glob.has_magic(pattern)
                                                              else [pattern])]
    missing = [n for n in names if not Path(n).is_file()]
    if missing:
        raise DataError(f"{len(missing)} of {len(names)} tar shard(s) do not exist (e.g. {missing[0]}); check --data")
    return [Path(n) for n in names]


SHARDS_LISTING = 1  # raise it when a change of `scan_tar_shards` gives unchanged shards another listing


def shards_stamp(shards: Sequence[Path]) -> str:
    """The shards as the up-to-date check compares them, hashed: each one's absolute path, size, mtime and inode
    (a shard rewritten in place, or replaced by another file, reads as changed; the stamp a folder's files get).
    `SHARDS_LISTING` is in it: a release that lists the same shards differently makes every stamp differ."""
    digest = hashlib.sha256(f"tar shards, listing {SHARDS_LISTING}\n".encode())
    for shard in shards:
        st = os.stat(shard)
        digest.update(os.fsencode(os.path.abspath(shard)) + f"\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
    return digest.hexdigest()[:32]


def _split_from_name(name: str) -> str | None:
    for split in SPLITS:
        if re.match(rf"{split}([-_.]|$)", name):
            return split
    return None


def _tar_groups(shard: Path) -> dict[str, dict[str, Entry]]:
    """key → {extension: member} for one shard, in member order (WebDataset: the key is the path up to the first
    dot of the file name, the extension is the rest). A plain ustar shard's headers are read directly
    (`plain_entries`), any other by `tarfile`."""
    with open(shard, "rb") as fh:
        magic = fh.read(3)
    if magic[:2] == b"\x1f\x8b" or magic == b"BZh" or magic[:3] == b"\xfd7z":
        raise DataError(f"{shard} is compressed; shards are read in place by offset, so they must be plain .tar "
                        "(images are compressed already): decompress it (e.g. gunzip) and point --data at the .tar")
    entries = plain_entries(shard)
    if entries is None:
        entries = _read_by_tarfile(shard)
    groups: dict[str, dict[str, Entry]] = {}
    for entry in entries:
        folder, _, base = entry.name.rpartition("/")
        stem, dot, ext = base.partition(".")
        if not dot or base.startswith("."):
            continue
        key = f"{folder}/{stem}" if folder else stem
        groups.setdefault(printable(key), {})[ext.lower()] = entry
    return groups


def _read_by_tarfile(shard: Path) -> list[Entry]:
    count = 0
    try:
        with tarfile.open(shard, "r:") as tar:
            entries = []
            for member in tar:
                count += 1
                if member.isfile():
                    entries.append(Entry(member.name, member.offset_data, member.size, int(member.mtime)))
            _check_whole(shard, tar)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{shard} is not a readable tar file after {count} member(s) ({exc}); re-create the shard "
                        "or leave it out of --data") from exc
    return entries


def _check_whole(shard: Path, tar: tarfile.TarFile) -> None:
    """A cut tar reads as a shorter one (tarfile stops at the end of the file): refuse a shard whose last member
    runs past its end, or that has no end-of-archive marker (two zero blocks) after its last member."""
    size = os.path.getsize(shard)
    last = tar.members[-1] if tar.members else None
    if last is not None and last.offset_data + last.size > size:
        raise tarfile.ReadError(f"truncated: member {last.name!r} runs past the end of the file")
    with open(shard, "rb") as fh:
        fh.seek(tar.offset)
        if fh.read(1024) != bytes(1024):
            raise tarfile.ReadError("truncated: no end-of-archive marker after the last member")


def _tar_meta(fh: Any, members: dict[str, Entry]) -> tuple[str | None, Any]:
    """(label, split as given) of one key from its `.cls` or `.json` member (`fh`: the shard, open for reading)."""
    def text(ext: str) -> str:
        fh.seek(members[ext].offset_data)
        return fh.read(min(members[ext].size, 1 << 20)).decode("utf-8", errors="replace")

    label = split = None
    if "json" in members:
        try:
            meta = json.loads(text("json"))
        except json.JSONDecodeError:
            meta = None
        if isinstance(meta, dict):
            label = label_text(next((meta[k] for k in ("label", "cls", "class") if k in meta), None))
            split = meta.get("split")
    for ext in LABEL_EXTS:
        if ext in members:
            label = label_text(text(ext))
            break
    return label, split


def folder_labels(keys: Sequence[str]) -> tuple[dict[str, int], np.ndarray, np.ndarray] | None:
    """Each key read as an image folder below the folders all keys share (keeping at least one folder per key):
    (class names numbered in order of appearance, each key's class number, each key's split code or UNDECIDED);
    None when some key has no folder. Two passes over the keys, nothing kept per key but the two codes."""
    shared: list[str] | None = None
    shortest = 0
    for key in keys:
        parts = key.split("/")[:-1]
        if not parts:
            return None
        if shared is None:
            shared, shortest = parts, len(parts)
        shortest = min(shortest, len(parts))
        while shared and parts[:len(shared)] != shared:
            shared = shared[:-1]
    if shared is None:
        return None
    depth = min(len(shared), shortest - 1)
    classes: dict[str, int] = {}
    labels = np.empty(len(keys), dtype=np.int32)
    splits = np.full(len(keys), UNDECIDED, dtype=np.int8)
    for i, key in enumerate(keys):
        rest = key.split("/")[depth:-1]
        if rest[0] in SPLITS and len(rest) >= 2:
            splits[i], rest = SPLITS.index(rest[0]), rest[1:]
        labels[i] = classes.setdefault(rest[0], len(classes))
    return classes, labels, splits


class ShardRows(NamedTuple):
    """One shard's keys as columns (what a listing process returns): the keys, the label texts they name
    (`classes`, numbered here) and each key's number among them (-1: none), split codes, the image members' offsets
    and sizes (and by row, why a key has none), and stamps: a member's (size, the shard's mtime), or for streamed
    shards (spooled anew each run) the mtime in the member's own tar header."""

    keys: pa.Array
    classes: list[str]
    labels: np.ndarray
    hints: np.ndarray
    offsets: list[int]
    sizes: list[int]
    problems: dict[int, str]
    stamps: np.ndarray


def read_shard(shard: Path, streamed: bool) -> ShardRows:
    shard_mtime = os.stat(shard).st_mtime_ns
    groups = _tar_groups(shard)
    with open(shard, "rb") as fh:
        metas = [_tar_meta(fh, group) for group in groups.values()]
    named = _split_from_name(shard.name)
    classes: dict[str, int] = {}
    labels, hints, offsets, sizes, stamps, problems = [], [], [], [], [], {}
    for k, ((key, group), (label, split)) in enumerate(zip(groups.items(), metas, strict=True)):
        split = split_cell(split, f"{shard}: key {key!r}") or named
        image_ext = next((e for e in IMAGE_EXTS if e in group), None)
        if image_ext is None:
            problems[k] = f"no image member for key {key!r} (members: {', '.join(sorted(group))})"
            offsets.append(0), sizes.append(0), stamps.append((0, 0 if streamed else shard_mtime))
        else:
            info = group[image_ext]
            offsets.append(info.offset_data), sizes.append(info.size)
            stamps.append((info.size, int(info.mtime) * 10**9 if streamed else shard_mtime))
        labels.append(-1 if label is None else classes.setdefault(label, len(classes)))
        hints.append(UNDECIDED if split is None else SPLITS.index(split))
    return ShardRows(pa.array(list(groups), pa.large_string()), list(classes), np.array(labels, dtype=np.int32),
                     np.array(hints, dtype=np.int8), offsets, sizes, problems,
                     np.array(stamps, dtype=np.int64).reshape(-1, 2))  # the keys are printable: valid UTF-8


@dataclass
class _Rows:
    """The listing of the shards as columns, gathered a shard at a time (`add`): ids as a text buffer, provisional
    class codes (numbered in `classes`), split codes from the shards, stamps and members."""

    ids: TextBuilder = field(default_factory=TextBuilder)
    members: MemberBuilder = field(default_factory=MemberBuilder)
    classes: dict[str, int] = field(default_factory=dict)
    labels: list[np.ndarray] = field(default_factory=list)
    hints: list[np.ndarray] = field(default_factory=list)
    stamps: list[np.ndarray] = field(default_factory=list)

    def add(self, number: int, part: ShardRows) -> None:
        self.ids.append(part.keys)
        self.members.add(number, part.offsets, part.sizes, part.problems)
        remap = np.array([self.classes.setdefault(name, len(self.classes)) for name in part.classes] or [-1],
                         dtype=np.int32)
        self.labels.append(np.where(part.labels >= 0, remap[part.labels], -1).astype(np.int32))
        self.hints.append(part.hints)
        self.stamps.append(part.stamps)


PARALLEL_TAR_KEYS = 1 << 19  # about 10 us a key: from 500k keys (judged by the first shard) processes pay off


def _read_shards(shards: list[Path], streamed: bool, workers: int, parallel_from: int = PARALLEL_TAR_KEYS) -> _Rows:
    """Every shard's rows, in order: the first here, then, when the shards look like `parallel_from` keys or more,
    the others in `workers` processes (the forkserver the decode stage uses), else here."""
    first = read_shard(shards[0], streamed)
    if workers > 1 and len(shards) > 2 and len(first.keys) * len(shards) >= parallel_from:
        from concurrent.futures.process import BrokenProcessPool

        try:
            return _gathered(first, in_order(read_shard, ((shard, streamed) for shard in shards[1:]), workers))
        except (OSError, RuntimeError, AssertionError, BrokenProcessPool) as exc:  # e.g. in a daemonic worker
            log.info("reading the %d shards in this process (%s: %s)", len(shards), type(exc).__name__, exc)
    return _gathered(first, (read_shard(shard, streamed) for shard in shards[1:]))


def _gathered(first: ShardRows, rest: Iterable[ShardRows]) -> _Rows:
    rows = _Rows()
    for number, part in enumerate(itertools.chain([first], rest)):
        rows.add(number, part)
    return rows


def scan_tar_shards(shards: list[Path], options: ListOptions = DEFAULT_OPTIONS, *,
                    addresses: list[str] | None = None, workers: int | None = None,
                    parallel_from: int = PARALLEL_TAR_KEYS) -> Source:
    """List WebDataset-style tar shards as columns (a `SampleTable` whose locators are a `MemberColumn`): one
    sample per key with an image member (a key without one becomes a recorded failure); duplicate keys across
    shards are an error. `addresses`: where streamed shards came from (`pipeline.sources.stream`), for the
    description. Many shards are read by `workers` processes (`_read_shards`)."""
    if not shards:
        raise DataError(f"no tar shards given; {DATA_HINT}")
    stamp = shards_stamp(shards) if addresses is None else ""  # before reading: a shard changed meanwhile differs
    rows = _read_shards(shards, addresses is not None, stat_workers() if workers is None else workers, parallel_from)
    ids, members = rows.ids.finish(), rows.members.finish()
    paths = ShardPaths([printable(os.path.abspath(shard)) + ":" for shard in shards], members.rows["shard"], ids)
    if not len(ids):
        raise DataError(f"the {len(shards)} tar shard(s) hold no samples (expected members like KEY.jpg + KEY.cls)")
    if not ids.distinct():
        check_unique(list(ids), f"{len(shards)} tar shard(s)", owners=[shards[k].name for k in members.rows["shard"]])
    provisional, hints, classes = np.concatenate(rows.labels), np.concatenate(rows.hints), rows.classes
    stamps = np.concatenate(rows.stamps)
    del rows
    label_source = "KEY.cls / KEY.json members" if classes else ""
    if not label_source and (from_folders := folder_labels(ids)) is not None:
        classes, provisional, folder_splits = from_folders
        hints = np.where(hints != UNDECIDED, hints, folder_splits).astype(np.int8)
        label_source = "member folders"
    class_names, remap = class_order(classes)
    reader = TarReader(tuple(shards))
    key_of = file_content_keys(options, ids, stamps, MemberFiles(shards, members), workers)
    named = addresses or [str(p) for p in shards]
    description = named[0] if len(named) == 1 else f"{named[0]} .. {named[-1]} ({len(named)} shards)"
    if addresses is not None:
        description += ", streamed"
    source = finish_table("tar", shards[0].parent, ids, paths, class_names, recoded(provisional, remap), hints,
                          stamps, options=options, hinted_by="shards", key_of=key_of, reader=reader,
                          description=description, label_source=label_source, locators=members)
    return dataclasses.replace(source, stamp=stamp)


def open_if_mine(data: str, options: ListOptions) -> Source | None:
    from pipeline.sources.stream import is_stream, spool

    if is_stream(data):
        addresses = expand_braces(data)
        return scan_tar_shards([spool(a, n) for n, a in enumerate(addresses)], options, addresses=addresses)
    shards = tar_shards(data)
    return scan_tar_shards(shards, options) if shards else None
