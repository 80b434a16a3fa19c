"""Output files: how they are named beside their inputs, and how they are written.

Names keep every character of what they are named after: `sibling(path, ".probe.json")` appends, it never replaces
a "suffix" (a data set `v1.0` and one `v1.1`, or backbones `timm:convnext_tiny.fb_in22k` and `...in12k`, would
otherwise write the same files).

Writes are atomic (a scratch file with a unique name in the same folder, then a rename), go through a symbolic link
to its target, and never replace a file this tool did not write (nor the store being read) unless asked to
(`--overwrite`): each kind of output says how to recognise its own files (`owned`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from pipeline.errors import PipelineError

MARK = "featpipe"  # the key/marker by which outputs of this tool are recognised
STORE_SUFFIXES = (".h5", ".hdf5")
_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
MAX_OWNED_BYTES = 64 << 20  # an existing output larger than this is not one of ours: not even read


def sibling(path: str | Path, ext: str) -> Path:
    """`path` with `ext` appended to its name (never replacing what looks like a suffix)."""
    path = Path(path)
    return path.with_name(path.name + ext)


def store_stem(path: str | Path) -> str:
    """A store's name without its `.h5`/`.hdf5` extension (and nothing else removed)."""
    name = Path(path).name
    for suffix in STORE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def results_stem(out: str | Path) -> Path:
    """The stem beside a results file for its report and head: `x.probe.json` -> `x.probe` (only `.json` goes)."""
    out = Path(out)
    return out.with_name(out.name[:-5]) if out.name.lower().endswith(".json") and len(out.name) > 5 else out


def slug(name: str) -> str:
    """A file-name-safe form of a data set or backbone name: `:` becomes `_` (readable), any other character outside
    letters, digits, `-`, `_` and `.` becomes `%XX`, so different names give different files."""
    return "".join(c if c in _SAFE else "_" if c == ":" else "".join(f"%{b:02X}" for b in c.encode()) for c in name)


# -- ownership ------------------------------------------------------------------------------------------------------

def _small_text(path: Path) -> str | None:
    try:
        if path.stat().st_size > MAX_OWNED_BYTES:
            return None
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def owned_json(kind: str) -> Callable[[Path], bool]:
    """A results JSON of this tool of this kind (older versions: a JSON object with `protocol` and `store`)."""

    def check(path: Path) -> bool:
        text = _small_text(path)
        try:
            data = json.loads(text) if text is not None else None
        except ValueError:
            return False
        if not isinstance(data, dict):
            return False
        mark = data.get(MARK)
        if isinstance(mark, dict):
            return mark.get("kind") == kind
        return "protocol" in data and "store" in data  # written before outputs were marked

    return check


def owned_text(first_line: str, *legacy_prefixes: str) -> Callable[[Path], bool]:
    """A text output whose first line is `first_line` (or, written before outputs were marked, starts with one of
    `legacy_prefixes`)."""

    def check(path: Path) -> bool:
        text = _small_text(path)
        line = text.split("\n", 1)[0].rstrip("\r") if text is not None else None
        return line is not None and (line == first_line or any(line.startswith(p) for p in legacy_prefixes))

    return check


def owned_marker(*markers: str) -> Callable[[Path], bool]:
    """A text output that contains one of `markers` (e.g. an HTML generator tag)."""

    def check(path: Path) -> bool:
        text = _small_text(path)
        return text is not None and any(m in text for m in markers)

    return check


def write_target(path: str | Path) -> Path:
    """The file a write to `path` lands in: `path`, or the target of a symbolic link there (written through)."""
    path = Path(path)
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if not target.parent.is_dir():
            raise PipelineError(f"--out {path} is a symbolic link to {target}, whose folder does not exist; fix the "
                                "link or choose another --out")
        return target
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output(path: str | Path, *, owned: Callable[[Path], bool], overwrite: bool = False,
                 protect: Iterable[str | Path] = (), what: str = "--out") -> Path:
    """Where an output will be written, checked before any compute: never one of the `protect`ed inputs (the store
    being read), never a folder, and a file there only if this tool wrote it (or `overwrite`). Also checks that the
    folder can be written to, so that a read-only folder is an error now rather than after the work."""
    path = Path(path)
    target = write_target(path)
    for p in protect:
        if _same_file(target, Path(p)) or target.resolve() == Path(p).resolve():
            raise PipelineError(f"{what} {path} is the input {Path(p).name} itself; choose another output path")
    if target.is_dir():
        raise PipelineError(f"{what} {path} is a folder; give a file path")
    if target.exists() and not overwrite and not owned(target):
        raise PipelineError(f"{what} {path} exists and was not written by this command; choose another path, or "
                            "pass --overwrite to replace it")
    check_writable_dir(target.parent, what=what, path=path)
    return target


def check_writable_dir(folder: Path, *, what: str, path: Path) -> None:
    """The folder (made if missing) accepts a new file: tried for real, since root ignores permission bits but not
    read-only mounts or immutable folders. Also catches names too long for the file system."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"cannot create the folder for {what} {path} ({exc.strerror or exc}); choose another "
                            "path") from None
    limit = _name_max(folder)
    if len(os.fsencode(path.name)) + 24 > limit:  # room for the scratch and lock names beside it
        raise PipelineError(f"{what} {path}: the file name is too long for this file system ({limit} bytes with "
                            "the suffixes added); choose a shorter name")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".featpipe-write-check-")
    except OSError as exc:
        raise PipelineError(f"{what} {path}: the folder {folder} cannot be written to ({exc.strerror or exc}); "
                            "choose another path or fix its permissions") from None
    os.close(fd)
    os.unlink(probe)


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def write_atomic(path: str | Path, data: str | bytes | Iterable[str | bytes]) -> Path:
    """Write a whole file atomically: a uniquely named scratch file beside it, then a rename (through a symbolic
    link to its target). `data` may come in parts (an iterator: written as they come). The scratch file is removed
    if anything fails, so a failure leaves the old file, never part of a new one."""
    target = write_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name[:100]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            for part in [data] if isinstance(data, (str, bytes)) else data:
                fh.write(part.encode("utf-8") if isinstance(part, str) else part)
        os.chmod(scratch, 0o644 & ~_umask())
        os.replace(scratch, target)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise
    return Path(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
