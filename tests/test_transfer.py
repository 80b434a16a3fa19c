"""The transfer comparison end to end through the real CLI, from another working directory: every method runs as
its own process (a tiny real network on real digit images), and the table holds what each results file says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.transfer import measured, transfer_table
from tests.conftest import TINY_BACKBONE

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_transfer_runs_every_method_and_tabulates_them(tmp_path, small_digits_root):
    work = tmp_path / "work"
    work.mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "pipeline", "--quiet", "transfer", "--data", str(small_digits_root), "--out-dir", "out",
         "--backbone", TINY_BACKBONE, "--layer", "layer2", "--views", "1", "--epochs", "3", "--full-epochs", "2",
         "--resamples", "50", "--extract-args", "--random-init --workers 0", "--finetune-args", "--device cpu"],
        cwd=work, capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    result = json.loads((work / "out" / "transfer.json").read_text())
    keys = [r["key"] for r in result["rows"]]
    assert keys == ["extract", "probe", "probe_views", "finetune_1", "finetune_2", "finetune_1_views", "full"]
    for row in result["rows"]:
        assert row["seconds"] > 0 and 50 < row["peak_rss_mib"] < 20000
        if row["key"] != "extract":
            own = json.loads((work / "out" / f"{row['key']}.json").read_text())
            assert row["test_top1"] == own["test_top1"] and row["n_train"] == own["n_train"]
    rows = {r["key"]: r for r in result["rows"]}
    assert rows["probe_views"]["n_train"] == 2 * rows["probe"]["n_train"]  # one view per training image
    assert rows["finetune_1_views"]["n_train"] == 2 * rows["finetune_1"]["n_train"]
    full = json.loads((work / "out" / "full.json").read_text())
    losses = [h["val_loss"] for h in full["history"]]
    probe = json.loads((work / "out" / "probe.json").read_text())
    assert full["chosen"] == losses.index(min(losses)) + 1 and full["n_test"] == probe["n_test"]  # same protocol
    table = (work / "out" / "transfer.md").read_text().strip().splitlines()
    assert len(table) == 2 + len(keys) and table[0].startswith("| method | test top-1 %")
    assert run.stdout.strip().splitlines()[0] == table[0]


def test_measured_is_the_child_alone_and_reports_its_error(tmp_path):
    ok = measured(["backbones", "--help"])
    assert ok.returncode == 0 and ok.seconds > 0 and ok.peak_mib > 5
    bad = measured(["probe", "--store", str(tmp_path / "missing.h5")])
    assert bad.returncode == 2 and bad.error.startswith("error: ") and "missing.h5" in bad.error


def test_the_table_shows_accuracy_with_its_interval():
    table = transfer_table([{"method": "extract", "seconds": 3.0, "peak_rss_mib": 900.0},
                            {"method": "probe", "seconds": 1.25, "peak_rss_mib": 200.4, "test_top1": 0.9463,
                             "interval": [0.9278, 0.9667], "n_train": 1257}])
    assert table.splitlines()[2] == "| extract | - | - | 3.0 | 900 |"
    assert table.splitlines()[3] == "| probe | 94.63 [92.78, 96.67] | 1257 | 1.2 | 200 |"


def test_the_full_loop_refuses_large_sets_and_bad_options_are_one_line(tmp_path, capsys, small_digits_root):
    import argparse

    from pipeline.cli import main
    from pipeline.cli.transfer import add_transfer
    from pipeline.config import FullFinetuneConfig
    from pipeline.engine.runner import extract_to_store
    from pipeline.errors import PipelineError
    from pipeline.evaluation.full_finetune import full_finetune
    from pipeline.plan import ExtractConfig

    store = tmp_path / "s.h5"
    extract_to_store(ExtractConfig.of(data=small_digits_root, out=store, backbone=TINY_BACKBONE, random_init=True,
                                      workers=0, progress=False))
    with pytest.raises(PipelineError, match="has 100 images.*at most 10"):
        full_finetune(FullFinetuneConfig(store=store, out=tmp_path / "f.json", max_images=10))
    assert not (tmp_path / "f.json").exists()
    parser = argparse.ArgumentParser()
    add_transfer(parser)
    assert parser.parse_args(["--data", "d", "--out-dir", "o", "--blocks", "0,2"]).blocks == (0, 2)
    with pytest.raises(SystemExit) as exit_:
        main(["transfer", "--data", "d", "--out-dir", str(tmp_path), "--blocks", "one"])
    assert exit_.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_the_full_loop_reads_a_tar_store_through_its_reader(tmp_path):
    """The reference loop decodes a tar store's images in place (the shard's reader at each member's offset), as
    the extraction did: one epoch, every split scored (it read the shard path as an image file before)."""
    from pipeline.config import FullFinetuneConfig
    from pipeline.engine.runner import extract_to_store
    from pipeline.evaluation.full_finetune import full_finetune
    from pipeline.plan import ExtractConfig
    from tests.sources_data import digit_images, png_bytes, webdataset_members, write_shard

    images, labels = digit_images(36)
    data = [png_bytes(im) for im in images]
    for split, rows in (("train", range(0, 27)), ("test", range(27, 36))):
        write_shard(tmp_path / "shards" / f"{split}-000.tar", webdataset_members(
            [f"k{i:02d}" for i in rows], [data[i] for i in rows], [int(labels[i]) % 3 for i in rows]))
    store = tmp_path / "s.h5"
    extract_to_store(ExtractConfig.of(data=str(tmp_path / "shards"), out=store, backbone=TINY_BACKBONE,
                                      random_init=True, workers=0, progress=False))
    result = full_finetune(FullFinetuneConfig(store=store, out=tmp_path / "f.json", epochs=1, batch_size=8,
                                              device="cpu", resamples=0))
    assert result["n_test"] == 9 and result["n_train"] + result["n_val"] == 27 and len(result["history"]) == 1
    assert 0 <= result["test_top1"] <= 1 and json.loads((tmp_path / "f.json").read_text())["n_test"] == 9
