"""engine/current on tar shards: a store made from shards records their stats bound to the fingerprint they gave
(`source_stamp`), so a rerun over unchanged shards is found current by one stat a shard, without reading a header;
a changed, added or replaced shard, other listing options or another decoding policy list the shards again."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

import pipeline.sources.tar as tar_module
from pipeline.engine.current import check_without_listing
from pipeline.engine.parts import current_merged
from pipeline.plan import ExtractConfig, Provenance
from pipeline.sources import open_source
from pipeline.sources.base import ListOptions
from pipeline.sources.tar import scan_tar_shards, shards_stamp, tar_shards
from pipeline.sources.views import with_views
from tests.sources_data import webdataset_members, write_shard

TINY = ["--backbone", "timm:test_resnet", "--random-init", "--workers", "0"]


def _png(rng) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def _shard(folder, number, rng, n=8):
    keys = [f"s{number}k{i}" for i in range(n)]
    return write_shard(folder / f"shard-{number:03d}.tar",
                       webdataset_members(keys, [_png(rng) for _ in keys], [i % 2 for i in range(n)]))


def _extract(cwd, *args):
    return subprocess.run([sys.executable, "-m", "pipeline", "extract", "--data", "../data", "--out", "s.h5", *TINY,
                           *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})


def _splits(store):
    import h5py

    with h5py.File(store, "r") as f:
        return [s.decode() if isinstance(s, bytes) else s for s in f["splits"][:]]


@pytest.mark.slow
def test_unchanged_shards_are_found_current_without_listing_and_every_change_is_listed(tmp_path):
    """The CLI from another working directory, shards without split names (split by content): the rerun finds the
    store current from the shards' stats; a shard added is listed and only its keys extracted; a shard rewritten
    (one image changed) too; another `--seed` lists the shards again and re-splits the store, and the next run
    with that seed is found current without listing."""
    rng = np.random.default_rng(0)
    data, cwd = tmp_path / "data", tmp_path / "cwd"
    cwd.mkdir()
    for number in range(2):
        _shard(data, number, rng)
    first = _extract(cwd)
    assert first.returncode == 0 and "16 extracted" in first.stdout, first.stderr
    again = _extract(cwd)
    assert again.returncode == 0 and "is up to date (16 rows" in again.stdout, again.stderr
    assert "found without listing the source" in again.stderr
    _shard(data, 2, rng)
    grown = _extract(cwd)
    assert grown.returncode == 0 and "8 extracted" in grown.stdout and "16 unchanged kept" in grown.stdout, grown
    assert "without listing" not in grown.stderr and "listing them" in grown.stderr
    assert "found without listing the source" in _extract(cwd).stderr
    with tarfile.open(data / "shard-001.tar") as tar:  # the same shard with one image changed
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    write_shard(data / "shard-001.tar", [(name, _png(rng) if name == "s1k3.png" else body) for name, body in members])
    changed = _extract(cwd)
    assert changed.returncode == 0 and "1 extracted" in changed.stdout and "23 unchanged kept" in changed.stdout
    assert "without listing" not in changed.stderr, changed.stderr
    before = _splits(cwd / "s.h5")
    reseeded = _extract(cwd, "--seed", "5")
    assert reseeded.returncode == 0 and "without listing" not in reseeded.stderr, reseeded.stderr
    assert _splits(cwd / "s.h5") != before  # the listing ran again with the new seed: another split by content
    assert "found without listing the source" in _extract(cwd, "--seed", "5").stderr


def _config(data, out, **given):
    return ExtractConfig.of(data=str(data), out=out, backbone="timm:test_resnet", random_init=True, workers=0,
                            progress=False, **given)


def test_the_check_reads_no_shard_and_any_stat_change_or_other_option_sends_it_to_the_listing(tmp_path,
                                                                                               monkeypatch):
    """In process: with `read_shard` made to fail, the check still answers (it stats the shards, reads none);
    a new mtime, a shard replaced by a copy (same size and mtime, another inode), a shard more, another listing
    option or decoding policy each make it say "list them" (None), and the listing then decides."""
    from pipeline.engine.runner import extract_to_store

    rng = np.random.default_rng(1)
    data = tmp_path / "data"
    shards = [_shard(data, number, rng, n=6) for number in range(2)]
    config = _config(data, tmp_path / "s.h5")
    assert extract_to_store(config).rows == 12
    assert Provenance.from_store(config.out).source_stamp
    real = tar_module.read_shard

    def refuse(*args):
        raise AssertionError("the check read a shard")

    monkeypatch.setattr(tar_module, "read_shard", refuse)
    assert check_without_listing(config, None)[0] == 12
    for other in (_config(data, config.out, test_fraction=0.5), _config(data, config.out, max_pixels=10**6)):
        assert check_without_listing(other, None)[0] is None
    stat = os.stat(shards[0])
    os.utime(shards[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert check_without_listing(config, None)[0] is None
    os.utime(shards[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert check_without_listing(config, None)[0] == 12  # the stats as recorded again
    shutil.copy2(shards[1], data / "copy.tmp")
    os.replace(data / "copy.tmp", shards[1])  # the same bytes, size and mtime: another file all the same
    assert check_without_listing(config, None)[0] is None
    monkeypatch.setattr(tar_module, "read_shard", real)
    assert extract_to_store(config).skipped  # the listing finds the same fingerprint: nothing to compute
    _shard(data, 2, rng, n=3)
    assert check_without_listing(config, None)[0] is None
    assert extract_to_store(config).computed == 3


def test_a_sharded_run_over_unchanged_shards_runs_no_part(tmp_path, monkeypatch):
    """`--shards 2` merges into a store whose stamp is the whole source's: the coordinator's check finds it
    current without listing, as the single run's does."""
    from pipeline.engine.parts import extract_in_parts

    rng = np.random.default_rng(2)
    data = tmp_path / "data"
    for number in range(3):
        _shard(data, number, rng, n=4)
    config = _config(data, tmp_path / "s.h5")
    assert extract_in_parts(config, 2).rows == 12
    monkeypatch.setattr(tar_module, "read_shard", lambda *a: (_ for _ in ()).throw(AssertionError("read")))
    found = current_merged(config)
    assert found is not None and found.skipped and found.rows == 12


def test_the_stamp_is_the_shards_stats_and_only_local_listed_shards_carry_one(tmp_path):
    rng = np.random.default_rng(3)
    shards = [_shard(tmp_path, number, rng, n=2) for number in range(2)]
    source = open_source(str(tmp_path))
    assert source.stamp == shards_stamp(tar_shards(str(tmp_path))) == shards_stamp(shards)
    assert shards_stamp(shards[:1]) != source.stamp and shards_stamp(shards[::-1]) != source.stamp
    assert with_views(source, 1, seed=0).stamp == ""  # view rows: the stats alone no longer fix the listing
    streamed = scan_tar_shards(shards, ListOptions(), addresses=["http://x/a.tar", "http://x/b.tar"])
    assert streamed.stamp == ""  # spooled anew each run: its stats say nothing
