"""sources/tarheaders: a plain ustar shard's members read from its headers are what `tarfile` lists (names, data
offsets, sizes, mtimes), for shards written by Python's tarfile and by GNU tar; anything else (pax and GNU long-name
headers, V7 and base-256 fields, bad checksums, cut shards) is left to tarfile, which lists it or refuses it as
before."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile

import pytest

from pipeline.errors import DataError
from pipeline.sources.tar import _tar_groups
from pipeline.sources.tarheaders import Entry, plain_entries


def _by_tarfile(path) -> list[Entry]:
    with tarfile.open(path, "r:") as tar:
        return [Entry(m.name, m.offset_data, m.size, int(m.mtime)) for m in tar if m.isfile()]


def _write(path, members, fmt=tarfile.USTAR_FORMAT, mtime=1_700_000_000):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
            elif isinstance(data, tuple):
                info.type, info.linkname = data
            else:
                info.size = len(data)
            info.mtime = mtime
            tar.addfile(info, io.BytesIO(data) if isinstance(data, bytes) else None)
    return path


def _patch(path, offset: int, field: bytes) -> None:
    """Overwrite bytes of the header at `offset` and give it a valid checksum again."""
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(field)] = field
    header = raw[offset - offset % 512:offset - offset % 512 + 512]
    header[148:156] = b" " * 8
    raw[offset - offset % 512 + 148:offset - offset % 512 + 156] = b"%06o\0 " % sum(header)
    path.write_bytes(bytes(raw))


_MEMBERS = [("a/", None), ("a/k0.jpg", b"x" * 700), ("a/k0.cls", b"3"), ("a/empty.jpg", b""),
            ("link.jpg", (tarfile.SYMTYPE, "a/k0.jpg")), ("hard.jpg", (tarfile.LNKTYPE, "a/k0.jpg")),
            ("d" * 90 + "/" + "n" * 90 + ".png", b"y" * 512), ("caf\udce9.jpg", b"z"), ("k1.jpg", b"w" * 1025)]


def test_plain_shards_read_from_their_headers_as_tarfile_lists_them(tmp_path):
    long = "d" * 90 + "/" + "n" * 90 + ".png"  # ustar: in the prefix and name fields; GNU: a long-name header
    for name, fmt in (("ustar.tar", tarfile.USTAR_FORMAT), ("gnu.tar", tarfile.GNU_FORMAT)):
        shard = _write(tmp_path / name, [m for m in _MEMBERS if fmt == tarfile.USTAR_FORMAT or m[0] != long], fmt)
        entries = plain_entries(shard)
        assert entries is not None and entries == _by_tarfile(shard)
        longs = [long] if fmt == tarfile.USTAR_FORMAT else []
        assert [e.name for e in entries] == ["a/k0.jpg", "a/k0.cls", "a/empty.jpg", *longs, "caf\udce9.jpg",
                                             "k1.jpg"]  # the prefix joined; no links, no folders
        assert shard.read_bytes()[entries[-1].offset_data:entries[-1].offset_data + 1025] == b"w" * 1025
    shard = _write(tmp_path / "spaced.tar", _MEMBERS[:3])
    _patch(shard, 512 + 100, b"  00644 ")  # an old tar's spaced number field: read exactly, the slow way
    assert plain_entries(shard) == _by_tarfile(shard) and len(_by_tarfile(shard)) == 2


def test_a_shard_written_by_gnu_tar(tmp_path):
    folder = tmp_path / "images"
    for i in range(30):
        (folder / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        (folder / f"c{i % 3}" / f"{i:03d}.jpg").write_bytes(bytes([i]) * (i * 37 + 1))
    os.utime(folder / "c0" / "000.jpg", (1_000_000_000, 1_000_000_000))
    for fmt in ("ustar", "gnu", "posix"):  # GNU tar (Debian's essential tar) writes pax headers for posix
        shard = tmp_path / f"{fmt}.tar"
        subprocess.run(["tar", f"--format={fmt}", "-cf", str(shard), "-C", str(tmp_path), "images"], check=True)
        entries = plain_entries(shard)
        assert (entries is None) == (fmt == "posix")
        listed = _by_tarfile(shard)
        assert entries in (None, listed) and len(listed) == 30
        assert {e.mtime for e in listed if e.name.endswith("/000.jpg")} == {1_000_000_000}
        assert sorted(_tar_groups(shard)) == sorted(e.name.rpartition(".")[0] for e in listed)


def test_other_shards_are_left_to_tarfile_with_the_same_members_or_errors(tmp_path):
    pax = _write(tmp_path / "pax.tar", [("caf\u00e9.jpg", b"x"), ("k.cls", b"1")], tarfile.PAX_FORMAT)
    long_gnu = _write(tmp_path / "long.tar", [("n" * 150 + ".jpg", b"x")], tarfile.GNU_FORMAT)  # a ././@LongLink
    old_mtime = _write(tmp_path / "old.tar", [("k.jpg", b"x")], tarfile.GNU_FORMAT, mtime=-(1 << 40))  # base-256
    v7 = _write(tmp_path / "v7.tar", [("k.jpg", b"x"), ("f/", None)])
    _patch(v7, 257, bytes(8))  # no ustar magic: a V7 header
    for shard in (pax, long_gnu, old_mtime, v7):
        assert plain_entries(shard) is None
        assert {k: list(g.values()) for k, g in _tar_groups(shard).items()} == {
            e.name.rpartition(".")[0]: [e] for e in _by_tarfile(shard)}
    good = _write(tmp_path / "good.tar", [("k0.jpg", b"x" * 600), ("k1.jpg", b"y")])
    whole = good.read_bytes()
    broken = {"bad checksum": bytearray(whole), "cut": whole[:1024 + 512], "garbage": whole[:2048] + b"\1" * 1024,
              "member past the end": whole[:1024]}
    broken["bad checksum"][512 * 3 + 10] ^= 1  # the second member's name
    for problem, raw in broken.items():
        shard = tmp_path / f"{problem}.tar"
        shard.write_bytes(bytes(raw))
        assert plain_entries(shard) is None, problem
    with pytest.raises(DataError, match="is not a readable tar file"):
        _tar_groups(tmp_path / "cut.tar")
    with pytest.raises(DataError, match="no end-of-archive marker"):
        _tar_groups(tmp_path / "garbage.tar")
    with pytest.raises(DataError, match="unexpected end of data"):
        _tar_groups(tmp_path / "member past the end.tar")
    assert [e.name for e in _by_tarfile(tmp_path / "bad checksum.tar")] == ["k0.jpg"]  # tarfile stops there ...
    with pytest.raises(DataError, match="no end-of-archive marker"):  # ... and the shard is refused
        _tar_groups(tmp_path / "bad checksum.tar")
