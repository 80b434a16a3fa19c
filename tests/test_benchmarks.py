"""The benchmark scripts still run against the library as it is (they import its modules by path, so a move breaks
them silently otherwise): each at its smallest size, from another working directory, checking the JSON it writes.
The figures themselves are not asserted: timings belong to the benchmarks, not to the suite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_BACKBONE

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, script: str, *args: str, timeout: int = 600) -> dict:
    out = tmp_path / f"{script}.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args, "--out", str(out)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_the_throughput_benchmark_runs_every_stage(tmp_path):
    result = _run(tmp_path, "throughput", "--backbone", TINY_BACKBONE, "--random-init", "--images", "48",
                  "--batch-size", "16", "--workers", "1")
    assert result["images"] == 48 and result["backbone"] == TINY_BACKBONE
    for stage in ("ceiling", "decode", "baseline", "pipeline"):
        assert result["stages"][stage]["images_per_s"] > 0, stage
    assert result["pipeline_over_baseline"] > 0 and result["bound_by"] in result["stages"]
    decode = result["stages"]["decode"]
    assert 0 < decode["first_batch_s"] and decode["after_first_batch_images_per_s"] >= 0


def test_the_heads_benchmark_runs(tmp_path):
    result = _run(tmp_path, "heads", "--rows", "2000", "--dim", "32", "--classes", "5", "--device", "cpu")
    assert set(result["results"]) == {"sklearn", "torch"} and result["agreement"] > 0.9


def test_the_transfer_benchmark_sizes_the_activations_of_common_backbones(tmp_path):
    rows = {(r["backbone"], r["layer"]): r for r in _run(tmp_path, "transfer", "storage")["storage"]}
    resnet = rows[("timm:resnet50", "layer3")]
    assert resnet["shape"] == [1024, 14, 14] and resnet["bytes"] == 1024 * 14 * 14 * 2  # the example
    assert rows[("timm:vit_base_patch16_224", "blocks.9")]["shape"] == [197, 768]
    assert rows[("timm:resnet50", "layer4.1")]["trainable"].startswith("refused")


def test_the_scale_benchmark_runs_every_step_at_two_sizes(tmp_path):
    result = _run(tmp_path, "scale", "--sizes", "3000,6000", "--dim", "16", "--max-memory", "256KiB",
                  "--memory-budget", "256KiB", "--exact-queries", "300", "--grid", "1", "--work", str(tmp_path / "w"),
                  "--steps", "probe,knn_exact,knn_approx,index_build,audit", "--copies", "0.01")
    assert [r["rows"] for r in result["results"]] == [3000, 6000]
    for r in result["results"]:
        assert set(r["steps"]) == {"probe", "knn_exact", "knn_approx", "index_build", "audit"}
        assert "streamed" in r["figures"]["audit"] and " 0 exact" not in r["figures"]["audit"]
        assert all(m["seconds"] > 0 and m["peak_rss_mib"] > 10 for m in r["steps"].values())
        assert r["figures"]["probe_streamed"] and 0.02 < r["figures"]["knn_exact_top1"] <= 1  # 100 classes: chance 0.01
    assert set(result["growth"]["3000->6000"]) == {"probe", "knn_exact", "knn_approx", "index_build", "audit"}


def test_the_planning_benchmark_lists_a_manifest_source_and_streams_its_up_to_date_check(tmp_path):
    result = _run(tmp_path, "plan_scale", "--sizes", "1000,3000", "--files", "2000", "--work", str(tmp_path / "w"))
    # 3,000 rows over 2,000 files: the rows past 2,000 name files again under ids of their own
    assert [r["rows"] for r in result["results"]] == [1000, 3000]  # every file listed, none dropped
    assert all(len(r["fingerprint"]) == 32 and r["list_s"] > 0 for r in result["results"])
    assert all(r["check"]["check_s"] > 0 and r["listing"]["peak_rss_mib"] > 10 for r in result["results"])
    assert result["results"][0]["fingerprint"] != result["results"][1]["fingerprint"]
    for way in ("listing", "check"):  # the streamed check's fingerprint equals the listing's (the script checks)
        assert set(result["growth"][way]["1000->3000"]) == {"time_per_row_ratio", "rss_ratio", "rss_exponent"}


def test_the_planning_benchmark_lists_an_image_folder(tmp_path):
    result = _run(tmp_path, "plan_scale", "--source", "folder", "--sizes", "500,1500", "--work", str(tmp_path / "w"))
    assert [r["rows"] for r in result["results"]] == [500, 1500]  # the script checks every file was listed
    assert all(len(r["fingerprint"]) == 32 and r["list_s"] > 0 for r in result["results"])
    assert "check" not in result["results"][0] and set(result["growth"]) == {"listing"}


def test_the_planning_benchmark_splits_a_manifest_by_content(tmp_path):
    from pipeline.splits import held_out_count

    result = _run(tmp_path, "plan_scale", "--source", "stratified", "--sizes", "500,1500", "--work",
                  str(tmp_path / "w"))
    # 100 classes of distinct files: each class gives held_out_count of its rows (test fraction 0.3) to test
    assert [r["test"] for r in result["results"]] == [100 * held_out_count(n // 100, 0.3) for n in (500, 1500)]
    assert "check" not in result["results"][0] and result["results"][1]["list_s"] > 0


def test_the_planning_benchmark_lists_a_torchvision_dataset(tmp_path):
    result = _run(tmp_path, "plan_scale", "--source", "torchvision", "--sizes", "1000,5000", "--work",
                  str(tmp_path / "w"))
    assert [r["rows"] for r in result["results"]] == [1000, 5000]  # the script checks every item was listed
    assert [r["test"] for r in result["results"]] == [200, 1000]  # the class's test split: a fifth of the items
    assert all(len(r["fingerprint"]) == 32 and r["list_s"] > 0 for r in result["results"])
    assert set(result["growth"]) == {"listing"}


@pytest.mark.parametrize("fmt", ["ustar", "pax", "gnu-long", "by content"])
def test_the_planning_benchmark_lists_tar_shards(tmp_path, fmt):
    from pipeline.splits import held_out_count

    how = ["--tar-split", "content"] if fmt == "by content" else ["--tar-format", fmt]
    result = _run(tmp_path, "plan_scale", "--source", "tar", *how, "--sizes", "12000,25000", "--work",
                  str(tmp_path / "w"))
    assert [r["rows"] for r in result["results"]] == [12000, 25000]  # the script checks every key was listed
    # shards of 10,000 keys, every fifth one (the first) a test shard: the split comes from the shard names; or
    # by content (distinct images, 100 classes): each class gives held_out_count of its keys
    assert [r["test"] for r in result["results"]] == ([100 * held_out_count(n // 100, 0.3) for n in (12000, 25000)]
                                                      if fmt == "by content" else [10000, 10000])
    assert all(len(r["fingerprint"]) == 32 and r["list_s"] > 0 for r in result["results"])
    # the check stats the shards (its stamp equals the listing's, or the script stops) and reads none of them
    assert all(len(r["stamp"]) == 32 and 0 < r["check"]["check_s"] < r["list_s"] for r in result["results"])
    assert set(result["growth"]) == {"listing", "check"}


def test_the_worker_memory_benchmark_reads_through_real_workers_all_three_ways(tmp_path):
    result = _run(tmp_path, "worker_memory", "--sizes", "2000", "--files", "100", "--work", str(tmp_path / "w"))
    (row,) = result["results"]
    assert row["rows"] == row["list"]["rows"] == row["column"]["rows"] == row["shared"]["rows"] == 2000
    assert (row["list"]["type"], row["column"]["type"], row["shared"]["type"]) == ("list", "FileColumn", "FileColumn")
    assert len(row["shared"]["worker_private_mib"]) == 2 and row["pickled_ratio"] < 1
    assert row["shared"]["pickled_mib"] < row["column"]["pickled_mib"]
