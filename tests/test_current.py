"""engine/current: a store made from a manifest is found current without listing the manifest: the streamed data
fingerprint is the listing's, byte for byte, for every manifest format and shape, and whatever changed (a file's
content or stamp, a path, a label) makes it differ, so the run that follows lists the source and updates the store."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import pipeline.sources.manifest as manifest_module
from pipeline.engine.current import manifest_fingerprint
from pipeline.engine.resolve import data_fingerprint, decoding_policy, source_listing
from pipeline.errors import DataError
from pipeline.sources import open_source
from pipeline.sources.base import ListOptions
from tests.sources_data import write_manifest


def _listed(manifest, options):
    source = open_source(str(manifest), options)
    return data_fingerprint(source, source_listing(source), decoding_policy({})), len(source)


def _rows(tmp_path, n=30):
    (tmp_path / "img" / "ü").mkdir(parents=True)
    rows = []
    for i in range(n):
        file = tmp_path / "img" / ("ü" if i % 4 else "") / f"{i}.png"
        file.write_bytes(b"x" * (i + 1))
        text = str(file) if i % 9 == 0 else f"./img//{'ü/' if i % 4 else ''}{i}.png" if i % 5 == 0 else \
            os.path.relpath(file, tmp_path)
        rows.append({"path": text, "id": f"r{i}" if i % 3 else "", "label": ["7", "10", "", "-1", "2"][i % 5],
                     "split": ["train", "test ", "val"][i % 3]})
    return rows


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl", "short-csv"])
def test_the_streamed_fingerprint_is_the_listings_for_every_shape_of_manifest(tmp_path, fmt, monkeypatch):
    """Relative, absolute and untidy paths, non-ASCII folders, ids for some rows, integer labels (numeric order),
    unlabelled rows, splits with stray spaces; blocks of 7 rows (parquet, JSON lines, a CSV with a short row that
    the csv module reads); stats here and in two processes; splits not decided (--split none). A stratified split
    cannot be streamed (None: the runner lists it)."""
    monkeypatch.setattr(manifest_module, "BATCH_ROWS", 7)
    rows = _rows(tmp_path)
    if fmt == "short-csv":
        manifest = tmp_path / "m.csv"
        manifest.write_text("path,split,label,id\n" + "".join(
            f"{r['path']},{r['split']}" + (f",{r['label']},{r['id']}" if i % 6 else "") + "\n"
            for i, r in enumerate(rows)))
    else:
        manifest = write_manifest(tmp_path / f"m.{fmt}", rows)
    decoding = decoding_policy({})
    for options in (ListOptions(), ListOptions(split="none")):
        expected = _listed(manifest, options)
        assert manifest_fingerprint(manifest, options, decoding) == expected
        assert manifest_fingerprint(manifest, options, decoding, workers=2) == expected
    assert manifest_fingerprint(manifest, ListOptions(split="stratified"), decoding) is None
    before = _listed(manifest, ListOptions())[0]
    changes = [lambda: (tmp_path / "img" / "ü" / "5.png").write_bytes(b"y" * 6),  # same size, new mtime
               lambda: manifest.write_bytes(manifest.read_bytes().replace(b"r4", b"r4b")) if fmt != "parquet"
               else write_manifest(manifest, [{**r, "id": "r4b" if r["id"] == "r4" else r["id"]} for r in rows])]
    seen = {before}
    for change in changes:
        change()
        streamed = manifest_fingerprint(manifest, ListOptions(), decoding)
        assert streamed == _listed(manifest, ListOptions()) and streamed[0] not in seen
        seen.add(streamed[0])


def test_a_bad_manifest_streamed_raises_the_listings_error(tmp_path):
    rows = _rows(tmp_path, 12)
    rows[8]["split"] = "tset"
    manifest = write_manifest(tmp_path / "m.csv", rows)
    with pytest.raises(DataError) as listed:
        open_source(str(manifest))
    with pytest.raises(DataError) as streamed:
        manifest_fingerprint(manifest, ListOptions(), decoding_policy({}))
    assert str(streamed.value) == str(listed.value) and "row 9" in str(streamed.value)
    rows[8]["split"], rows[3]["split"] = "train", ""
    half = write_manifest(tmp_path / "half.csv", rows)  # some rows with a split and one without: refused the same
    with pytest.raises(DataError, match="have a split"):
        manifest_fingerprint(half, ListOptions(), decoding_policy({}))
    (tmp_path / rows[5]["path"]).unlink()  # a missing file: another fingerprint, and the listing says what is wrong
    whole = write_manifest(tmp_path / "whole.csv", [{**r, "split": r["split"] or "train"} for r in rows])
    assert manifest_fingerprint(whole, ListOptions(), decoding_policy({})) is not None
    with pytest.raises(DataError, match="do not exist"):
        open_source(str(whole))


def test_an_unchanged_manifest_is_found_current_without_listing_and_a_change_is_extracted(tmp_path):
    """The CLI from another working directory: the second run finds the store current by the streamed check (its
    log says so) and runs nothing; after one image is added, the check's first pass sees the extra row and stops
    (no stats) and the listing extracts only it; after one image changes, the check says not current, the listing
    follows and only that image is extracted again; a manifest turned bad is one line, exit 2, and the store is
    untouched."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "data" / "img").mkdir(parents=True)
    rows = []
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "data" / "img" / f"{i}.png")
        rows.append({"path": f"img/{i}.png", "label": f"c{i % 2}", "split": "train" if i < 12 else "test"})
    manifest = write_manifest(tmp_path / "data" / "m.csv", rows)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()

    def extract():
        return subprocess.run([sys.executable, "-m", "pipeline", "extract", "--data", "../data/m.csv", "--out",
                               "s.h5", "--backbone", "timm:test_resnet", "--random-init", "--workers", "0"],
                              cwd=elsewhere, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})

    first = extract()
    assert first.returncode == 0 and "16 extracted" in first.stdout, first.stderr
    again = extract()
    assert again.returncode == 0 and "is up to date (16 rows" in again.stdout, again.stderr
    assert "found without listing the source" in again.stderr
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "data" / "img" / "16.png")
    manifest.write_text(manifest.read_text() + "img/16.png,c0,test\n")  # one image more
    more = extract()  # the first pass shows the new row: no stats, the listing follows and extracts it
    assert "has 17 rows and 2 classes, the store 16 and 2: listing it" in more.stderr, more.stderr
    assert more.returncode == 0 and "1 extracted" in more.stdout and "16 unchanged kept" in more.stdout
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "data" / "img" / "3.png")
    changed = extract()
    assert changed.returncode == 0 and "1 extracted" in changed.stdout and "16 unchanged kept" in changed.stdout
    assert "without listing" not in changed.stderr, changed.stderr
    assert "found without listing the source" in extract().stderr
    store = (elsewhere / "s.h5").read_bytes()
    manifest.write_text(manifest.read_text().replace("img/7.png,c1,train", "img/7.png,c1,tarin"))
    bad = extract()
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "row 8" in bad.stderr, bad.stderr
    assert bad.stderr.startswith("error: ") and (elsewhere / "s.h5").read_bytes() == store


def _fingerprint_in_daemon(manifest, queue):
    queue.put(manifest_fingerprint(manifest, ListOptions(), decoding_policy({}), workers=2))


def test_inside_a_daemonic_worker_the_stats_run_in_the_worker_itself(tmp_path):
    """A daemonic process (a pool worker) cannot start the stat processes: the check stats the files itself and
    gives the same fingerprint."""
    import multiprocessing

    manifest = write_manifest(tmp_path / "m.csv", [{**r, "split": r["split"].strip()} for r in _rows(tmp_path, 12)])
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    worker = context.Process(target=_fingerprint_in_daemon, args=(manifest, queue), daemon=True)
    worker.start()
    found = queue.get(timeout=120)
    worker.join(30)
    assert worker.exitcode == 0 and found == _listed(manifest, ListOptions())


def test_a_sharded_extraction_of_an_unchanged_manifest_runs_no_part(tmp_path):
    """`extract --shards 2` from another working directory: the rerun finds the merged store current before any part
    runs (the parts' stores are not touched); after a label changes, the parts and the merge run again."""
    from PIL import Image

    rng = np.random.default_rng(1)
    (tmp_path / "data").mkdir()
    rows = []
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "data" / f"{i}.png")
        rows.append({"path": f"{i}.png", "label": f"c{i % 2}", "split": "train" if i < 7 else "test"})
    manifest = write_manifest(tmp_path / "data" / "m.csv", rows)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()

    def extract():
        return subprocess.run([sys.executable, "-m", "pipeline", "extract", "--data", str(manifest), "--out",
                               "s.h5", "--shards", "2", "--backbone", "timm:test_resnet", "--random-init",
                               "--workers", "0"], cwd=elsewhere, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})

    assert extract().returncode == 0
    parts = [elsewhere / f"s.part{k}of2.h5" for k in range(2)]
    made = [p.stat().st_mtime_ns for p in parts]
    again = extract()
    assert again.returncode == 0 and "is up to date (10 rows" in again.stdout, again.stderr
    assert "no part runs" in again.stderr and [p.stat().st_mtime_ns for p in parts] == made
    from pipeline.engine.parts import current_merged
    from pipeline.plan import ExtractConfig

    config = ExtractConfig.of(data=str(manifest), out=elsewhere / "s.h5", backbone="timm:test_resnet",
                              random_init=True, workers=0, progress=False)
    assert current_merged(config).skipped  # the same check in-process; a coordinator without the parts' GPU
    assert current_merged(config.replace(device="cuda")) is None  # leaves the check to the parts, no error here
    manifest.write_text(manifest.read_text().replace("3.png,c1,train", "3.png,c0,train"))
    changed = extract()
    assert changed.returncode == 0 and "no part runs" not in changed.stderr, changed.stderr
    assert [p.stat().st_mtime_ns for p in parts] != made
