from __future__ import annotations

import csv
import json

import numpy as np
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
    assert float(best["probe_top1_low"]) <= float(best["probe_top1"]) <= float(best["probe_top1_high"])
    assert float(best["knn_top1_low"]) <= float(best["knn_top1"]) <= float(best["knn_top1_high"])

    # a rerun reuses the cached store (no forward pass) and reports the same figures
    rows2, _, _ = run_bench(small_digits_root, ["efficientnet_lite0"], out, extract={"workers": 0}, k=5,
                            progress=False)
    assert rows2[0].cached and rows2[0].probe_top1 == pytest.approx(float(best["probe_top1"]))
    assert rows2[0].images_per_second == pytest.approx(float(best["images_per_second"]))


@pytest.mark.slow
def test_bench_says_which_differences_are_significant(small_digits_root, tmp_path):
    """Two packaged backbones on the same 100 digits: every pair is tested on the same test images (McNemar from
    the per-image results, recomputed here from the probe results files), each rank is marked against the one
    above, and the leaderboard shows how alike the two feature spaces are."""
    from pipeline.evaluation.intervals import mcnemar_exact, unpack_correct
    from pipeline.store.read import load_store

    out = tmp_path / "bench"
    rows, _, md_path = run_bench(small_digits_root, ["efficientnet_lite0", "efficientnet_lite1"], out,
                                 extract={"workers": 0}, k=5, progress=False, resamples=300)
    comparisons = json.loads((out / "leaderboard_digits.comparisons.json").read_text())
    probe_pair = next(p for p in comparisons["pairs"] if p["what"] == "probe top-1")
    records = {b: json.loads((out / "results" / f"digits__{b}.probe.json").read_text())["test_correct"]
               for b in ("efficientnet_lite0", "efficientnet_lite1")}
    a, b = unpack_correct(records[probe_pair["a"]]), unpack_correct(records[probe_pair["b"]])
    assert probe_pair["a_only"] == int((a & ~b).sum()) and probe_pair["b_only"] == int((~a & b).sum())
    assert probe_pair["mcnemar_p"] == pytest.approx(mcnemar_exact(probe_pair["a_only"], probe_pair["b_only"]))
    assert probe_pair["difference"] == pytest.approx(a.mean() - b.mean())
    assert {p["what"] for p in comparisons["pairs"]} == {"probe top-1", "kNN top-1 (k=5 weighted)"}
    verdict = "distinct" if probe_pair["holm_p"] < 0.05 else "tie"
    assert rows[0].vs_above == "" and rows[1].vs_above == f"{verdict} (p={probe_pair['holm_p']:.3g})"
    agreement = comparisons["agreement"]
    cka = np.array(agreement["linear_cka"])
    assert np.allclose(np.diag(cka), 1) and np.allclose(cka, cka.T) and 0.2 < cka[0, 1] < 1
    assert agreement["rows_matched"][0][1] == len(load_store(rows[0].store))
    text = md_path.read_text()
    assert "## Paired comparisons" in text and "## Linear CKA" in text and "## Mutual 10-NN overlap" in text
    assert text.count(verdict) >= 2
