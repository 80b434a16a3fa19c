from __future__ import annotations

import csv

import pytest

from pipeline.cli import main
from pipeline.recipe import run_bench
from pipeline.store.read import read_attrs


@pytest.mark.slow
def test_bench_leaderboard_reuses_stores_and_reports_failures(small_digits_root, tmp_path, capsys):
    """Two backbones on 100 digits: the real default, and a misspelt one that fails alone."""
    out = tmp_path / "bench"
    argv = ["--quiet", "bench", "--data", str(small_digits_root), "--backbones", "efficientnet_lite0,timm:resnet_18",
            "--out-dir", str(out), "--workers", "0", "--k", "5"]
    assert main(argv) == 1  # one backbone failed: the command says so
    printed = capsys.readouterr().out
    assert "Leaderboard" in printed and "efficientnet_lite0" in printed

    with open(out / "leaderboard_digits.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["backbone"] for r in rows] == ["efficientnet_lite0", "timm:resnet_18"]
    best, failed = rows
    store = out / "stores" / "digits__efficientnet_lite0.h5"
    attrs = read_attrs(store)
    assert int(best["dim"]) == 1280 == attrs["feature_dim"] and best["cached"] == "False"
    assert float(best["images_per_second"]) == pytest.approx(attrs["images_per_second"])
    assert attrs["images_per_second"] > 0
    assert 0.5 < float(best["probe_top1"]) <= 1 and 0.3 < float(best["knn_top1"]) <= 1
    assert "resnet_18" in failed["error"] and failed["probe_top1"] == ""
    assert "error:" in (out / "leaderboard_digits.md").read_text()

    # a rerun reuses the cached store (no forward pass) and reports the same figures
    rows2, _, _ = run_bench(small_digits_root, ["efficientnet_lite0"], out, extract={"workers": 0}, k=5,
                            progress=False)
    assert rows2[0].cached and rows2[0].probe_top1 == pytest.approx(float(best["probe_top1"]))
    assert rows2[0].images_per_second == pytest.approx(float(best["images_per_second"]))
