"""Output names keep every character that tells data sets and backbones apart, and leaderboards accumulate: rows of
backbones not in this run stay, with their dates, unless the board is reset."""

from __future__ import annotations

import csv
import shutil

import pytest

from pipeline.errors import PipelineError
from pipeline.outputs import results_stem, sibling, slug, store_stem
from pipeline.recipe import run_bench
from pipeline.report.leaderboard import read_leaderboard
from tests.conftest import TINY_BACKBONE

TAGGED = f"{TINY_BACKBONE}.r160_in1k"  # `Path.with_suffix` would turn both into the same name
EXTRACT = {"workers": 0, "random_init": True}


def test_name_helpers_never_cut_at_a_dot():
    assert sibling("out/v1.0", ".probe.json").name == "v1.0.probe.json"
    assert store_stem("stores/v1.0__timm_convnext_tiny.fb_in22k.h5") == "v1.0__timm_convnext_tiny.fb_in22k"
    assert store_stem("stores/v1.1") == "v1.1"
    assert results_stem("r/x.probe.json").name == "x.probe" and results_stem("r/v1.0").name == "v1.0"
    assert slug("timm:convnext_tiny.fb_in22k") == "timm_convnext_tiny.fb_in22k"
    assert slug("a b/c") == "a%20b%2Fc" and slug("a/b") != slug("a_b")


@pytest.mark.slow
def test_datasets_and_backbones_differing_after_a_dot_get_their_own_files(tmp_path, small_digits_root):
    out = tmp_path / "bench"
    for name in ("v1.0", "v1.1"):
        data = shutil.copytree(small_digits_root, tmp_path / name)
        rows, csv_path, md_path = run_bench(data, [TINY_BACKBONE, TAGGED], out, extract=EXTRACT, k=5, progress=False)
        assert [r.error for r in rows] == ["", ""] and csv_path.name == f"leaderboard_{name}.csv"
    stores = sorted(p.name for p in (out / "stores").glob("*.h5"))
    assert stores == sorted(f"{d}__{slug(b)}.h5" for d in ("v1.0", "v1.1") for b in (TINY_BACKBONE, TAGGED))
    for pattern in ("*.probe.json", "*.knn.json", "*.head.safetensors"):
        assert len(list((out / "results").glob(pattern))) == 4, pattern
    for name in ("v1.0", "v1.1"):
        assert {r.backbone for r in read_leaderboard(out / f"leaderboard_{name}.csv")} == {TINY_BACKBONE, TAGGED}


@pytest.mark.slow
def test_leaderboards_keep_other_backbones_with_their_date_unless_reset(tmp_path, small_digits_root):
    out = tmp_path / "bench"
    run_bench(small_digits_root, [TINY_BACKBONE], out, extract=EXTRACT, k=5, progress=False)
    path = out / "leaderboard_digits.csv"
    first = read_leaderboard(path)[0]
    assert first.backbone == TINY_BACKBONE and first.date and first.probe_top1 is not None
    rows, _, md = run_bench(small_digits_root, [TAGGED], out, extract=EXTRACT, k=5, progress=False)
    kept = {r.backbone: r for r in read_leaderboard(path)}
    assert set(kept) == {TINY_BACKBONE, TAGGED} and kept[TINY_BACKBONE] == first  # unchanged, date included
    assert {r.backbone for r in rows} == {TINY_BACKBONE, TAGGED}
    assert md.read_text().count(first.date) >= 2
    run_bench(small_digits_root, [TAGGED], out, extract=EXTRACT, k=5, progress=False, reset=True)
    assert [r.backbone for r in read_leaderboard(path)] == [TAGGED]
    with open(path, newline="") as fh:
        assert next(csv.reader(fh))[-1] == "date"


def test_a_foreign_file_at_the_leaderboard_path_is_not_replaced(tmp_path, small_digits_root):
    (tmp_path / "leaderboard_digits.csv").write_text("name,score\nmine,1\n")
    with pytest.raises(PipelineError, match="was not written by this command"):
        run_bench(small_digits_root, [TINY_BACKBONE], tmp_path, extract=EXTRACT, k=5, progress=False)
    assert (tmp_path / "leaderboard_digits.csv").read_text() == "name,score\nmine,1\n"
    assert not (tmp_path / "stores").exists()  # refused before any extraction
