"""Image folders: `ROOT/<class>/<image>` or `ROOT/{train,val,test}/<class>/<image>` (images may be nested below the
class folder). Ids are paths relative to ROOT.

Symbolic links are followed while they stay inside the data root. A linked folder that leads out of it is not walked
(a warning says so) and a linked image file that does is listed but never read (a recorded failure), unless
`follow_links` trusts them: a data set from someone else must not make the tool read the rest of the machine. Names
that are not valid UTF-8 keep their bytes as `\\xNN` in ids and class names; the files are read by their real names.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.engine.decode import IMAGE_EXTENSIONS, SPLITS, FileReader, Refused, file_stamp, read_file
from pipeline.errors import DataError
from pipeline.sources.base import (
    DATA_HINT,
    DEFAULT_OPTIONS,
    ListOptions,
    Source,
    class_index,
    content_keys,
    finish,
    printable,
)

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

    def images(self, top: Path) -> list[tuple[Path, Refused | None]]:
        """Every entry with an image name below `top` that is not a folder (files, links, broken links, FIFOs: the
        unreadable ones become recorded failures, never silent omissions), in sorted order."""
        found, stack, seen = [], [top], {os.path.realpath(top)}
        while stack:
            folder = stack.pop()
            for entry in self._entries(folder):
                path = Path(entry.path)
                if self._is_dir(entry):
                    real = os.path.realpath(path)
                    if real not in seen:  # a link back up the tree would loop
                        seen.add(real)
                        stack.append(path)
                elif _is_image_name(entry.name):
                    refused = None
                    if entry.is_symlink() and not self.follow_links and not _inside(entry.path, self.root_real):
                        refused = Refused(path, f"a symbolic link to {printable(os.path.realpath(path))}, outside "
                                                "the data root: not read (pass --follow-links to trust such links)")
                    found.append((path, refused))
        return sorted(found, key=lambda item: item[0])

    def class_files(self, split_dir: Path) -> dict[str, list[tuple[Path, Refused | None]]]:
        stray = self.stray_images(split_dir)
        if stray:
            raise DataError(f"{len(stray)} image(s) lie directly in {split_dir} (e.g. {printable(stray[0])}) with no "
                            f"class folder; {LAYOUT_HINT}")
        return {printable(d.name): files for d in self.dirs(split_dir) if (files := self.images(d))}


def scan_image_folder(root: str | Path, options: ListOptions = DEFAULT_OPTIONS) -> Source:
    """List the images of an image folder with their labels and splits (split folders, else stratified)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; {DATA_HINT}")
    if not root.is_dir():
        raise DataError(f"--data {root} is a file of a kind not recognised (not a manifest or tar shard); {DATA_HINT}")
    walk = _Walk(root, options.follow_links)
    subdirs = walk.dirs(root)
    split_dirs = [d for d in subdirs if d.name in SPLITS]
    if split_dirs:
        others = [d.name for d in subdirs if d.name not in SPLITS]
        if others:
            raise DataError(f"{root} mixes split folders ({', '.join(d.name for d in split_dirs)}) with other "
                            f"folders ({', '.join(map(printable, others[:5]))}); {LAYOUT_HINT}")
        found = [(p, refused, cls, d.name) for d in split_dirs for cls, files in walk.class_files(d).items()
                 for p, refused in files]
        if not any(split == "train" for *_, split in found):
            raise DataError(f"{root} has split folders but no images in {root / 'train'}; {LAYOUT_HINT}")
    else:
        found = [(p, refused, cls, None) for cls, files in walk.class_files(root).items() for p, refused in files]
    if not found:
        raise DataError(f"no images found under {root} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                        f"{LAYOUT_HINT}")
    found.sort(key=lambda item: printable(item[0].relative_to(root).as_posix()))
    ids = [printable(p.relative_to(root).as_posix()) for p, *_ in found]
    class_names, labels = class_index([cls for _, _, cls, _ in found])
    stamps = [file_stamp(p) if refused is None else _lstamp(p) for p, refused, *_ in found]
    warnings = []
    if walk.skipped:
        warnings.append(f"{len(walk.skipped)} linked folder(s) under {root} lead outside it and were not read (e.g. "
                        f"{walk.skipped[0]}); pass --follow-links to trust them")

    def read(i: int) -> bytes:
        path, refused = found[i][0], found[i][1]
        if refused is not None:
            raise ValueError(refused)  # a link out of the root: never read
        return read_file(path, options.max_file_bytes)

    key_of = content_keys(options, ids, stamps, read)

    return finish("folder", root, ids, [p for p, *_ in found], class_names, labels, [s for *_, s in found],
                  options=options, hinted_by="folders", key_of=key_of, reader=FileReader(),
                  description=str(root), locators=[refused for _, refused, *_ in found], stamps=stamps,
                  label_source="class folders", warnings=warnings)


def _lstamp(path: Path) -> tuple[int, int]:
    try:
        st = os.lstat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def open_if_mine(data: str, options: ListOptions) -> Source | None:
    return scan_image_folder(data, options)
