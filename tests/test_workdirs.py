"""Commands run the way users run them: as processes, from more than one working directory, with relative paths.
Everything a store, index, report or results file records must still lead to the right files from elsewhere, and
an index must refuse a store that is not the one it was built from (even one at the same relative path)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_BACKBONE
from tests.helpers import write_image
from tests.sources_data import digit_images, png_bytes, webdataset_members, write_shard

TINY = ["--backbone", TINY_BACKBONE, "--random-init", "--workers", "0"]


def _cli(cwd: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--quiet", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, (args, proc.stderr)
    return proc


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.slow
def test_extract_probe_index_search_and_add_from_two_directories(tmp_path, small_digits_root):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(small_digits_root, a / "images")
    b.mkdir()
    _cli(a, "extract", "--data", "images", "--out", "stores/x.h5", *TINY)
    store = (a / "stores" / "x.h5").resolve()

    _cli(b, "probe", "--store", "../a/stores/x.h5", "--grid", "1")
    probe = json.loads((a / "stores" / "x.probe.json").read_text())
    assert probe["store"] == str(store) and Path(probe["head_file"]).is_absolute()
    assert str(store) in (a / "stores" / "x.probe.md").read_text()  # the report names the store absolutely

    _cli(a, "index", "build", "--store", "stores/x.h5", "--out", "ix")
    infos = json.loads((a / "ix" / "index_infos.json").read_text())
    assert infos["store"] == str(store) and infos["store_id"] and infos["store_relative"] == "../stores/x.h5"

    some_id = "train/3/" + sorted(p.name for p in (a / "images" / "train" / "3").iterdir())[0]
    hits = json.loads(_cli(b, "search", "--index", "../a/ix", "--id", some_id, "--k", "3", "--json").stdout)
    top = hits[0]["hits"][0]
    assert top["id"] == some_id and top["path"] == str((a / "images" / some_id).resolve())

    for i in range(10):  # the collection grows; an incremental run, then `index add` from the other directory
        write_image(a / "images" / "train" / "3" / f"new_{i}.png", seed=300 + i, size=(8, 8), mode="L")
    assert "10 extracted" in _cli(a, "extract", "--data", "images", "--out", "stores/x.h5", *TINY).stdout
    assert "over 110 rows" in _cli(b, "index", "add", "../a/ix").stdout
    assert json.loads((a / "ix" / "index_infos.json").read_text())["history"][-1]["rows"] == 10

    # another store at the same relative path, seen from b: refused, not rebuilt over
    shutil.copytree(small_digits_root / "test", b / "other" / "test")
    shutil.copytree(small_digits_root / "train", b / "other" / "train")
    write_image(b / "other" / "train" / "3" / "extra.png", seed=999, size=(8, 8), mode="L")
    _cli(b, "extract", "--data", "other", "--out", "stores/x.h5", *TINY)
    _one_line_error(_cli(b, "index", "add", "../a/ix", "--store", "stores/x.h5", ok=False), "another store",
                    "index build")
    _one_line_error(_cli(b, "search", "--index", "../a/ix", "--store", "stores/x.h5", "--id", some_id, ok=False),
                    "another store")
    assert json.loads((a / "ix" / "index_infos.json").read_text())["rows"] == 110  # untouched

    # the index's own store, extracted again from scratch (--overwrite): a new store, refused too
    _cli(a, "extract", "--data", "images", "--out", "stores/x.h5", "--overwrite", *TINY)
    _one_line_error(_cli(a, "index", "add", "ix", ok=False), "another store")


@pytest.mark.slow
def test_a_relative_shard_pattern_keeps_its_images_for_reports_and_search(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    b.mkdir()
    images, labels = digit_images(60)
    for shard in range(2):
        rows = range(shard * 30, (shard + 1) * 30)
        write_shard(a / "shards" / f"data-{shard:06d}.tar",
                    webdataset_members([f"s{shard}/{k:03d}" for k in rows], [png_bytes(images[k]) for k in rows],
                                       [int(labels[k]) for k in rows]))
    _cli(a, "extract", "--data", "shards/data-{000000..000001}.tar", "--out", "stores/wds.h5", *TINY)
    from pipeline.store.read import read_attrs

    attrs = read_attrs(a / "stores" / "wds.h5")
    assert attrs["data"] == str((a / "shards").resolve() / "data-{000000..000001}.tar")

    _cli(b, "knn", "--store", "../a/stores/wds.h5", "--k", "1,5")
    report = (a / "stores" / "wds.knn.md").read_text()
    assert "could not be found" not in report and "neighbours.png" in report
    result = json.loads((a / "stores" / "wds.knn.json").read_text())
    from pipeline.engine.embed import images_for_ids
    from pipeline.plan import Provenance

    shown = images_for_ids(Provenance.from_attrs(attrs), [e["id"] for e in result["examples"]])
    assert len(shown) == len(result["examples"]) > 0  # every query of the grid has its picture

    hits = json.loads(_cli(b, "search", "--store", "../a/stores/wds.h5", "--id", "s0/000", "--k", "2",
                           "--json").stdout)
    assert hits[0]["hits"][0]["path"] == f"{(a / 'shards' / 'data-000000.tar').resolve()}:s0/000"
