"""Image folders: `ROOT/<class>/<image>` or `ROOT/{train,val,test}/<class>/<image>` (images may be nested below the
class folder). Ids are paths relative to ROOT.

Symbolic links are followed while they stay inside the data root. A linked folder that leads out of it is not walked
(a warning says so) and a linked image file that does is listed but never read (a recorded failure), unless
`follow_links` trusts them: a data set from someone else must not make the tool read the rest of the machine. Names
that are not valid UTF-8 keep their bytes as `\\xNN` in ids and class names; the files are read by their real names.

A folder is listed as columns (a `SampleTable`: the ids as one text buffer, label, split and stamp arrays), gathered
a folder at a time, so a folder of millions holds no Python object per image. A folder with a name that is not UTF-8
or an image linked from outside the root (rare, and each such row needs its own reader) is listed as `Sample`s, to
the same listing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.engine.decode import IMAGE_EXTENSIONS, SPLITS, FileReader, Refused, file_stamp, read_file
from pipeline.errors import DataError
from pipeline.sources.base import (
    DATA_HINT,
    DEFAULT_OPTIONS,
    ListOptions,
    Source,
    class_index,
    class_order,
    content_keys,
    file_content_keys,
    finish,
    finish_table,
    printable,
    recoded,
)
from pipeline.sources.stamps import file_stamps
from pipeline.sources.table import UNDECIDED, FileColumn, TextBuilder, TextColumn

LAYOUT_HINT = "expected ROOT/<class>/<image> or ROOT/{train,val,test}/<class>/<image>"


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not name.startswith(".")


def _inside(path: str, root_real: str) -> bool:
    return os.path.commonpath([os.path.realpath(path), root_real]) == root_real


class _Walk:
    """Lists folders and images under the data root, applying the link policy and remembering what it skipped."""

    def __init__(self, root: Path, follow_links: bool) -> None:
        self.root_real = os.path.realpath(root)
        self.follow_links = follow_links
        self.skipped: list[str] = []

    def _entries(self, folder: Path) -> list[os.DirEntry]:
        try:
            with os.scandir(folder) as it:
                return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError:
            return []

    def _is_dir(self, entry: os.DirEntry) -> bool:
        try:
            is_dir = entry.is_dir()
        except OSError:  # a link loop: treated as a file (an image name fails to read, with the reason)
            return False
        if is_dir and entry.is_symlink() and not self.follow_links and not _inside(entry.path, self.root_real):
            self.skipped.append(f"{printable(entry.path)} -> {printable(os.path.realpath(entry.path))}")
            return False
        return is_dir

    def dirs(self, folder: Path) -> list[Path]:
        return [Path(e.path) for e in self._entries(folder) if self._is_dir(e)]

    def stray_images(self, folder: Path) -> list[str]:
        return [e.name for e in self._entries(folder) if not self._is_dir(e) and _is_image_name(e.name)]

    def image_entries(self, top: Path, prefix: str = "") -> Iterator[tuple[str, list[os.DirEntry]]]:
        """Per folder below `top` (in no set order): its id prefix (`prefix` + its posix path below `top`) and its
        entries with an image name that are not folders (files, links, broken links, FIFOs: the unreadable ones
        become recorded failures, never silent omissions)."""
        stack, seen = [(top, prefix)], {os.path.realpath(top)}
        while stack:
            folder, where = stack.pop()
            images = []
            for entry in self._entries(folder):
                if self._is_dir(entry):
                    real = os.path.realpath(entry.path)
                    if real not in seen:  # a link back up the tree would loop
                        seen.add(real)
                        stack.append((Path(entry.path), f"{where}{entry.name}/"))
                elif _is_image_name(entry.name):
                    images.append(entry)
            if images:
                yield where, images

    def refused(self, entry: os.DirEntry) -> Refused | None:
        """Why an image entry must not be read: a link out of the data root (unless links are trusted)."""
        if entry.is_symlink() and not self.follow_links and not _inside(entry.path, self.root_real):
            return Refused(Path(entry.path), f"a symbolic link to {printable(os.path.realpath(entry.path))}, outside "
                                             "the data root: not read (pass --follow-links to trust such links)")
        return None

    def images(self, top: Path) -> list[tuple[Path, Refused | None]]:
        """Every `image_entries` entry below `top` with its refusal, in sorted order."""
        return sorted(((Path(e.path), self.refused(e)) for _, entries in self.image_entries(top) for e in entries),
                      key=lambda item: item[0])

    def image_ids(self, top: Path, prefix: str) -> Iterator[list[str]]:
        """The ids of `image_entries(top, prefix)`, a folder at a time; `_Irregular` at a refused one."""
        for where, entries in self.image_entries(top, prefix):
            if any(self.refused(e) is not None for e in entries):
                raise _Irregular
            yield [where + e.name for e in entries]

    def class_dirs(self, split_dir: Path) -> list[Path]:
        stray = self.stray_images(split_dir)
        if stray:
            raise DataError(f"{len(stray)} image(s) lie directly in {split_dir} (e.g. {printable(stray[0])}) with no "
                            f"class folder; {LAYOUT_HINT}")
        return self.dirs(split_dir)

    def class_files(self, split_dir: Path) -> dict[str, list[tuple[Path, Refused | None]]]:
        return {printable(d.name): files for d in self.class_dirs(split_dir) if (files := self.images(d))}


class _Irregular(Exception):
    """The folder cannot be listed as columns (a name that is not UTF-8, an image linked from outside the root)."""


def scan_image_folder(root: str | Path, options: ListOptions = DEFAULT_OPTIONS) -> Source:
    """List the images of an image folder with their labels and splits (split folders, else stratified)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; {DATA_HINT}")
    if not root.is_dir():
        raise DataError(f"--data {root} is a file of a kind not recognised (not a manifest or tar shard); {DATA_HINT}")
    try:
        return _as_table(root, options)
    except _Irregular:
        return _as_samples(root, options)


def _tops(root: Path, walk: _Walk) -> list[tuple[str | None, Path]]:
    """The folders that hold the class folders, with their split: the split folders, else the root itself."""
    subdirs = walk.dirs(root)
    split_dirs = [d for d in subdirs if d.name in SPLITS]
    if not split_dirs:
        return [(None, root)]
    others = [d.name for d in subdirs if d.name not in SPLITS]
    if others:
        raise DataError(f"{root} mixes split folders ({', '.join(d.name for d in split_dirs)}) with other "
                        f"folders ({', '.join(map(printable, others[:5]))}); {LAYOUT_HINT}")
    return [(d.name, d) for d in split_dirs]


def _no_images(root: Path) -> DataError:
    return DataError(f"no images found under {root} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                     f"{LAYOUT_HINT}")


def _no_train(root: Path) -> DataError:
    return DataError(f"{root} has split folders but no images in {root / 'train'}; {LAYOUT_HINT}")


def _skipped(walk: _Walk, root: Path) -> list[str]:
    return [f"{len(walk.skipped)} linked folder(s) under {root} lead outside it and were not read (e.g. "
            f"{walk.skipped[0]}); pass --follow-links to trust them"] if walk.skipped else []


class _Columns:
    """The ids, provisional class codes (`classes`) and split codes of a folder's images, gathered folder by folder
    and turned into arrays BLOCK_ROWS ids at a time."""

    BLOCK_ROWS = 1 << 16

    def __init__(self) -> None:
        self.ids, self.classes = TextBuilder(), {}
        self.labels: list[np.ndarray] = []
        self.codes: list[np.ndarray] = []
        self.pending: list[str] = []
        self.runs: list[tuple[int, int, int]] = []  # (rows, class, split code) of the pending ids

    def add(self, ids: list[str], class_name: str, code: int) -> None:
        self.pending += ids
        self.runs.append((len(ids), self.classes.setdefault(class_name, len(self.classes)), code))
        if len(self.pending) >= self.BLOCK_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        try:
            self.ids.append(pa.array(self.pending, pa.large_string()))
        except UnicodeEncodeError as exc:  # a name kept by Python as surrogates: not UTF-8
            raise _Irregular from exc
        rows = [r for r, _, _ in self.runs]
        self.labels.append(np.repeat(np.array([c for _, c, _ in self.runs], dtype=np.int32), rows))
        self.codes.append(np.repeat(np.array([c for *_, c in self.runs], dtype=np.int8), rows))
        self.pending, self.runs = [], []

    def sorted(self) -> tuple[TextColumn, np.ndarray, np.ndarray]:
        """The ids in order (UTF-8 byte order: the code point order `_as_samples` sorts in), provisional class codes
        and split codes."""
        self.flush()
        ids = self.ids.finish()
        labels, codes = np.concatenate(self.labels), np.concatenate(self.codes)
        order = pc.sort_indices(ids.to_arrow()).to_numpy()
        if np.any(order[1:] < order[:-1]):
            ids = TextColumn.from_arrow(ids.to_arrow().take(pa.array(order)))
            labels, codes = labels[order], codes[order]
        return ids, labels, codes


def _as_table(root: Path, options: ListOptions) -> Source:
    """The folder as columns; `_Irregular` when it needs `_as_samples`."""
    walk = _Walk(root, options.follow_links)
    columns, tops = _Columns(), _tops(root, walk)
    for split, top in tops:
        code = UNDECIDED if split is None else SPLITS.index(split)
        for class_dir in walk.class_dirs(top):
            prefix = class_dir.relative_to(root).as_posix() + "/"
            for ids in walk.image_ids(class_dir, prefix):
                columns.add(ids, class_dir.name, code)
    has_splits = tops[0][0] is not None
    if not columns.classes:
        raise _no_train(root) if has_splits else _no_images(root)
    class_names, remap = class_order(columns.classes)
    ids, provisional, hints = columns.sorted()
    del columns
    if has_splits and not np.any(hints == SPLITS.index("train")):
        raise _no_train(root)
    labels = recoded(provisional, remap)
    files = FileColumn(os.path.abspath(root), ids)
    stamps = file_stamps(files)
    key_of = file_content_keys(options, ids, stamps, files)
    return finish_table("folder", root, ids, files, class_names, labels, hints, stamps, options=options,
                        hinted_by="folders", key_of=key_of, reader=FileReader(), description=str(root),
                        label_source="class folders", warnings=_skipped(walk, root))


def _as_samples(root: Path, options: ListOptions) -> Source:
    """The folder as a tuple of `Sample`s, each with its own locator: names that are not UTF-8 printed as `\\xNN`
    in ids and class names, images linked from outside the root refused when read."""
    walk = _Walk(root, options.follow_links)
    tops = _tops(root, walk)
    found = [(p, refused, cls, split) for split, top in tops for cls, files in walk.class_files(top).items()
             for p, refused in files]
    if tops[0][0] is not None and not any(split == "train" for *_, split in found):
        raise _no_train(root)
    if not found:
        raise _no_images(root)
    found.sort(key=lambda item: printable(item[0].relative_to(root).as_posix()))
    ids = [printable(p.relative_to(root).as_posix()) for p, *_ in found]
    class_names, labels = class_index([cls for _, _, cls, _ in found])
    stamps = [file_stamp(p) if refused is None else _lstamp(p) for p, refused, *_ in found]

    def read(i: int) -> bytes:
        path, refused = found[i][0], found[i][1]
        if refused is not None:
            raise ValueError(refused)  # a link out of the root: never read
        return read_file(path, options.max_file_bytes)

    key_of = content_keys(options, ids, stamps, read)
    return finish("folder", root, ids, [p for p, *_ in found], class_names, labels, [s for *_, s in found],
                  options=options, hinted_by="folders", key_of=key_of, reader=FileReader(),
                  description=str(root), locators=[refused for _, refused, *_ in found], stamps=stamps,
                  label_source="class folders", warnings=_skipped(walk, root))


def _lstamp(path: Path) -> tuple[int, int]:
    try:
        st = os.lstat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def open_if_mine(data: str, options: ListOptions) -> Source | None:
    return scan_image_folder(data, options)
