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
from pipeline.sources.base import printable
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
    (folder / "c1" / ("\u00fc" * 60 + ".jpg")).write_bytes(b"u" * 99)  # 120 bytes: pax path, GNU long name
    for fmt in ("ustar", "gnu", "posix"):  # GNU tar (Debian's essential tar) writes pax headers for posix
        shard = tmp_path / f"{fmt}.tar"
        subprocess.run(["tar", f"--format={fmt}", "-cf", str(shard), "-C", str(tmp_path), "images"],
                       capture_output=True)  # ustar cannot hold the long name: tar leaves it out, and says so
        entries = plain_entries(shard)
        listed = _by_tarfile(shard)
        assert entries == listed and len(listed) == (30 if fmt == "ustar" else 31)
        assert {e.mtime for e in listed if e.name.endswith("/000.jpg")} == {1_000_000_000}
        assert sorted(_tar_groups(shard)) == sorted(e.name.rpartition(".")[0] for e in listed)


def test_other_shards_are_left_to_tarfile_with_the_same_members_or_errors(tmp_path):
    old_mtime = _write(tmp_path / "old.tar", [("k.jpg", b"x")], tarfile.GNU_FORMAT, mtime=-(1 << 40))  # base-256
    v7 = _write(tmp_path / "v7.tar", [("k.jpg", b"x"), ("f/", None)])
    _patch(v7, 257, bytes(8))  # no ustar magic: a V7 header
    for shard in (old_mtime, v7):
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


def _pax_shard(path, *, global_headers=None, member_headers=None, name="k.jpg", data=b"x" * 10):
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, pax_headers=global_headers or {}) as tar:
        for n, body in ((name, data), ("k.cls", b"1")):
            info = tarfile.TarInfo(n)
            info.size, info.mtime = len(body), 1_700_000_000
            if n == name and member_headers:
                info.pax_headers = dict(member_headers)
            tar.addfile(info, io.BytesIO(body))
    return path


def test_pax_and_gnu_long_name_headers_are_read_from_the_headers_as_tarfile_lists_them(tmp_path):
    """Python's tarfile (pax: non-ASCII and long names, a fractional mtime, other records, a global header; GNU: a
    ././@LongLink name), a pax size record that overrides the ustar field, and `git archive` (a global header with
    the commit id): read directly, and what tarfile lists."""
    long = "d" * 120 + "/" + "n" * 120 + ".jpg"
    shards = [_write(tmp_path / "pax.tar", [("caf\u00e9/\u00fc.jpg", b"x" * 600), (long, b"y"), ("k.cls", b"1")],
                     tarfile.PAX_FORMAT),
              _write(tmp_path / "gnu.tar", [(long, b"y" * 513), ("k.cls", b"1")], tarfile.GNU_FORMAT),
              _pax_shard(tmp_path / "records.tar", member_headers={"mtime": "1700000000.75", "comment": "a=b\nc",
                                                                   "SCHILY.dev": "64"}),
              _pax_shard(tmp_path / "global.tar", global_headers={"comment": "made here"})]
    sized = _pax_shard(tmp_path / "sized.tar", member_headers={"size": "10"})
    raw = sized.read_bytes()
    header = raw.index(b"k.jpg\0")  # the member's own header, after the pax header's: its size field says 0
    _patch(sized, header + 124, b"00000000000\0")
    shards.append(sized)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "k0.jpg").write_bytes(b"z" * 40)
    (repo / "k0.cls").write_text("2")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    for step in (["init", "-q"], ["add", "."], ["commit", "-qm", "images"]):
        subprocess.run(git + step, check=True, capture_output=True)
    subprocess.run(git + ["archive", "--format=tar", "-o", str(tmp_path / "git.tar"), "HEAD"], check=True)
    shards.append(tmp_path / "git.tar")
    for shard in shards:
        entries = plain_entries(shard)
        assert entries is not None and entries == _by_tarfile(shard), shard.name
    assert [e.name for e in plain_entries(shards[0])] == ["caf\u00e9/\u00fc.jpg", long, "k.cls"]
    assert plain_entries(shards[2])[0].mtime == 1_700_000_000 and plain_entries(sized)[0].size == 10
    assert b"pax_global_header" in (tmp_path / "git.tar").read_bytes()[:512]
    assert {e.name for e in plain_entries(tmp_path / "git.tar")} == {"k0.jpg", "k0.cls"}


def test_pax_headers_this_does_not_read_are_left_to_tarfile(tmp_path):
    """A name that is not UTF-8 (tarfile writes `hdrcharset=BINARY`), a global header that names the path, a
    record whose length is wrong, and sparse files from GNU tar (pax `GNU.sparse.*` records; GNU `S` headers):
    None, and the shard lists as tarfile lists it (or is refused as before: a sparse member)."""
    binary = _pax_shard(tmp_path / "binary.tar", name="caf\udce9.jpg")
    pathed = _pax_shard(tmp_path / "pathed.tar", global_headers={"path": "all.jpg"})
    wrong = _pax_shard(tmp_path / "wrong.tar", member_headers={"comment": "abc"})
    at = wrong.read_bytes().index(b" comment=abc")
    _patch(wrong, at - 2, b"13")  # "12 comment=abc\n" said to be 13 bytes long
    sparse = tmp_path / "holes.jpg"
    with open(sparse, "wb") as fh:
        fh.write(b"s")
        fh.truncate(1 << 20)
    made = []
    for fmt in ("posix", "gnu"):
        made.append(tmp_path / f"sparse-{fmt}.tar")
        subprocess.run(["tar", f"--format={fmt}", "--sparse", "-cf", str(made[-1]), "-C", str(tmp_path),
                        "holes.jpg"], check=True)
    assert b"GNU.sparse" in made[0].read_bytes()
    for shard in made:  # tarfile lists a sparse member by its full size, which runs past the stored bytes
        assert plain_entries(shard) is None
        with pytest.raises(DataError, match="runs past the end of the file"):
            _tar_groups(shard)
    for shard in (binary, pathed, wrong):
        assert plain_entries(shard) is None, shard.name
        grouped = {(key, ext): e for key, group in _tar_groups(shard).items() for ext, e in group.items()}
        listed = {(printable(e.name.partition(".")[0]), e.name.partition(".")[2]): e for e in _by_tarfile(shard)}
        assert grouped == listed, shard.name  # (a key's member named twice: the last one, both ways)
