"""A plain tar's members read from its header blocks directly: what `tarfile` lists for a ustar shard of files and
folders (a shard of millions is listed in seconds, not minutes: no `TarInfo` object and its eight number fields per
member), and nothing for anything else.

GNU long names (`L` headers) and pax headers (`x`: the path, size and mtime records; `g`, global, when it sets none
of those), as Python's tarfile, GNU tar (`--format=gnu`, `posix`), libarchive and `git archive` write them, are read
too. `plain_entries` gives up (None) on whatever it does not read exactly as `tarfile` does: a pax charset
(`hdrcharset`), GNU sparse files or long link names, malformed pax records, unknown member types, V7 headers (no
ustar magic), base-256 or malformed number fields, a bad checksum, a member running past the end of the file, no
end-of-archive marker. `tarfile` then reads the shard, and says what is wrong with it; so both ways list the same
members, or the same error.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import tarfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

BLOCK = 512
_END = bytes(2 * BLOCK)
_FILES = (b"0", b"\0", b"7")  # the regular types tarfile reads (its fourth, GNU sparse, is not read here)
_OTHERS = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, folders, FIFOs: a header and no data
_EXTENDED = (b"L", b"x", b"g")  # a GNU long name, a pax header, a pax global header: about the next member
_KNOWN = _FILES + _OTHERS + _EXTENDED
_PAX = re.compile(rb"([1-9][0-9]*) ([A-Za-z0-9._]+)=")
_NUMBERS = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (148, 156), (329, 337), (337, 345))
# mode, uid, gid, size, mtime and checksum, and the device numbers, as tarfile and GNU tar write them: read at once
_USUAL = re.compile(rb"(?:[0-7]{7}\0){3}([0-7]{11})\0([0-7]{11})\0([0-7]{6})\0 ")
_DEVICES = re.compile(rb"(?:[0-7]{7}\0|\0{8}){2}")
_CHECK = 2048  # headers whose checksums are summed at once (1 MiB)


class Entry(NamedTuple):
    """A regular member: its name as `tarfile` gives it, where its data starts, its size and mtime (seconds)."""

    name: str
    offset_data: int
    size: int
    mtime: int


def plain_entries(shard: str | Path) -> list[Entry] | None:
    """The regular members of a plain ustar shard, read from its headers; None where `tarfile` must read it."""
    with open(shard, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 3 * BLOCK:  # one header and the end marker at least
            return None
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return _entries(mapped, size)


def _number(header: bytes, start: int, stop: int) -> int:
    """`tarfile.nti` of an octal field; ValueError for a base-256 one (left to tarfile) or one tarfile refuses.
    (`int` of the bytes skips the ASCII spaces tarfile strips and refuses what is not ASCII, as tarfile does; a field
    of only spaces it refuses, and tarfile reads as 0: such a shard is left to tarfile.)"""
    if header[start] in (0o200, 0o377):
        raise ValueError("a base-256 number")
    return int(header[start:stop].split(b"\0", 1)[0] or b"0", 8)


def _header(header: bytes) -> tuple[bytes, str, int, int, int] | None:
    """One ustar header's (kind, name, size, mtime, checksum) as tarfile reads them (the prefix joined to the name;
    a V7-style folder's type); None for a kind or field this does not read. (A plain tuple: cheaper than a named
    one, made once a member.)"""
    kind = header[156:157]
    if header[257:262] != b"ustar" or kind not in _KNOWN:
        return None
    usual = _USUAL.match(header, 100)
    if usual is not None and _DEVICES.match(header, 329) is not None:  # the fields as tarfile and GNU tar write
        length, mtime, checksum = int(usual[1], 8), int(usual[2], 8), int(usual[3], 8)
    else:
        try:
            numbers = [_number(header, a, b) for a, b in _NUMBERS]
        except ValueError:  # UnicodeDecodeError too
            return None
        length, mtime, checksum = numbers[3], numbers[4], numbers[5]
    if length < 0:
        return None
    name = header[:100].split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")
    prefix = header[345:500].split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")
    if kind == b"\0" and name.endswith("/"):  # tarfile: a V7-style folder
        kind = b"5"
    if kind == b"5":
        name = name.rstrip("/")
    if prefix and kind not in _EXTENDED:
        name = f"{prefix}/{name}"
    return kind, name, length, mtime, checksum


def _entries(mapped: mmap.mmap, size: int) -> list[Entry] | None:
    entries: list[Entry] = []
    headers: list[bytes] = []
    stored: list[int] = []
    pos = end = 0
    extended: dict[str, Any] = {}  # what a pax or GNU long-name header says of the member that follows
    while True:
        if pos + BLOCK > size:
            return None
        block = mapped[pos:pos + BLOCK]
        if block.count(0) == BLOCK:  # the end marker: two zero blocks, after one member at least
            if mapped[pos:pos + 2 * BLOCK] != _END or not headers or end > size or extended:
                return None
            break
        fields = _header(block)
        if fields is None:
            return None
        kind, name, length, mtime, checksum = fields
        headers.append(block)
        stored.append(checksum)
        data = pos + BLOCK
        if kind in _EXTENDED:
            pos = data + -(-length // BLOCK) * BLOCK
            if extended or pos > size or not _extend(extended, kind, mapped[data:pos], length):
                return None
            continue
        if extended:  # what the pax or long-name header said
            name, length, mtime = extended.get("name", name), extended.get("size", length), extended.get("mtime", mtime)
            extended.clear()
        end = data + length  # tarfile refuses a shard whose last member runs past its end
        if kind in _FILES:
            entries.append(Entry(name, data, length, mtime))
            pos = data + -(-length // BLOCK) * BLOCK
        else:
            pos = data
    return entries if _checksums_match(headers, stored) else None


def _extend(extended: dict[str, Any], kind: bytes, data: bytes, length: int) -> bool:
    """`extended` given what a header of this `kind` with this `data` (`length` bytes and padding) says of the
    next member: a GNU long name (`L`), a pax header's path, size and mtime (`x`), or nothing (a pax global header,
    `g`, that sets none of those); False for what this does not read as tarfile does."""
    if any(data[length:]):
        return False
    if kind == b"L":
        extended["name"] = data.split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")
        return True
    records = _pax_records(data[:length])
    if records is None or (kind == b"g" and records.keys() & {"path", "size", "mtime"}):
        return False
    if kind == b"g":
        return True
    if "path" in records:
        extended["name"] = _pax_text(records["path"], tarfile.ENCODING).rstrip("/")
    for keyword, number in (("size", int), ("mtime", float)):
        if keyword in records:
            try:
                value = number(_pax_text(records[keyword], "utf-8"))
            except ValueError:  # tarfile's value for a number it cannot read
                value = 0
            if not math.isfinite(value) or value < 0 and keyword == "size":
                return False
            extended[keyword] = int(value)
    return True


def _pax_records(data: bytes) -> dict[str, bytes] | None:
    """A pax header's `LENGTH KEYWORD=VALUE\n` records, filling `data` exactly, keyword to value (the last one
    given wins, as in tarfile); None for anything else, a charset (`hdrcharset`) or a GNU sparse file."""
    records: dict[str, bytes] = {}
    pos = 0
    if b"hdrcharset=" in data:  # tarfile looks for it anywhere in the header, values included
        return None
    while pos < len(data):
        match = _PAX.match(data, pos)
        stop = pos + int(match[1]) if match is not None else 0
        if match is None or not match.end() < stop <= len(data) or data[stop - 1:stop] != b"\n":
            return None
        keyword = match[2].decode("ascii")
        if keyword == "hdrcharset" or keyword.startswith("GNU.sparse."):
            return None
        records[keyword] = data[match.end():stop - 1]
        pos = stop
    return records


def _pax_text(value: bytes, fallback: str) -> str:
    """A pax value as tarfile decodes it: UTF-8, else `fallback` (a name: the file system's encoding) with escapes."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode(fallback, "surrogateescape")


def _checksums_match(headers: list[bytes], stored: list[int]) -> bool:
    """Each header's stored checksum is its bytes' sum (the checksum field as spaces), unsigned or signed, as
    tarfile accepts."""
    for start in range(0, len(headers), _CHECK):
        blocks = np.frombuffer(b"".join(headers[start:start + _CHECK]), dtype=np.uint8).reshape(-1, BLOCK)
        want = np.asarray(stored[start:start + _CHECK], dtype=np.int64)
        matched = np.zeros(len(want), dtype=bool)
        for view in (blocks, blocks.view(np.int8)):
            matched |= view.sum(axis=1, dtype=np.int64) - view[:, 148:156].sum(axis=1, dtype=np.int64) + 256 == want
        if not matched.all():
            return False
    return True
