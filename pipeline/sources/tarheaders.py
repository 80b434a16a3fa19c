"""A plain tar's members read from its header blocks directly: what `tarfile` lists for a ustar shard of files and
folders (a shard of millions is listed in seconds, not minutes: no `TarInfo` object and its eight number fields per
member), and nothing for anything else.

`plain_entries` gives up (None) on whatever it does not read exactly as `tarfile` does: pax or GNU long-name headers,
sparse or unknown member types, V7 headers (no ustar magic), base-256 or malformed number fields, a bad checksum, a
member running past the end of the file, no end-of-archive marker. `tarfile` then reads the shard, and says what is
wrong with it; so both ways list the same members, or the same error.
"""

from __future__ import annotations

import mmap
import os
import re
import tarfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

BLOCK = 512
_END = bytes(2 * BLOCK)
_FILES = (b"0", b"\0", b"7")  # the regular types tarfile reads (its fourth, GNU sparse, is not read here)
_OTHERS = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, folders, FIFOs: a header and no data
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


def _entries(mapped: mmap.mmap, size: int) -> list[Entry] | None:
    entries: list[Entry] = []
    headers: list[bytes] = []
    stored: list[int] = []
    pos = end = 0
    encoding = tarfile.ENCODING
    while True:
        if pos + BLOCK > size:
            return None
        header = mapped[pos:pos + BLOCK]
        if header.count(0) == BLOCK:  # the end marker: two zero blocks, after one member at least
            if mapped[pos:pos + 2 * BLOCK] != _END or not headers or end > size:
                return None
            break
        kind = header[156:157]
        if header[257:262] != b"ustar" or (kind not in _FILES and kind not in _OTHERS):
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
        name = header[:100].split(b"\0", 1)[0].decode(encoding, "surrogateescape")
        prefix = header[345:500].split(b"\0", 1)[0].decode(encoding, "surrogateescape")
        if kind == b"\0" and name.endswith("/"):  # tarfile: a V7-style folder
            kind = b"5"
        if kind == b"5":
            name = name.rstrip("/")
        if prefix:
            name = f"{prefix}/{name}"
        headers.append(header)
        stored.append(checksum)
        data = pos + BLOCK
        end = data + length  # tarfile refuses a shard whose last member runs past its end
        if kind in _FILES:
            entries.append(Entry(name, data, length, mtime))
            pos = data + -(-length // BLOCK) * BLOCK
        else:
            pos = data
    return entries if _checksums_match(headers, stored) else None


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
