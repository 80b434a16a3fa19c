"""Every expected error path: one line on stderr, exit code 2, no traceback. And the happy path."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from pipeline.cli import main
from tests.helpers import make_folder

TINY = ["--backbone", "timm:test_resnet", "--random-init", "--workers", "0"]


def _run(capsys, *argv):
    code = main(["--quiet", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize(
    "make, needles",
    [
        (lambda tmp: tmp / "missing", ["does not exist", "--data"]),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", ["no images found"]),
        (lambda tmp: make_folder(tmp / "bad", {"train/a": 1, "other": 1}), ["mixes split folders"]),
    ],
)
def test_extract_data_errors(tmp_path, capsys, make, needles):
    data = make(tmp_path)
    code, _, err = _run(capsys, "extract", "--data", str(data), "--out", str(tmp_path / "s.h5"), *TINY)
    _assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "s.h5").exists()


def test_unknown_backbone(tmp_path, capsys):
    data = make_folder(tmp_path / "d", {"a": 2})
    code, _, err = _run(capsys, "extract", "--data", str(data), "--out", str(tmp_path / "s.h5"),
                        "--backbone", "efficientnet_lite9")
    _assert_one_line_error(code, err, "unknown backbone", "efficientnet_lite0", "python -m pipeline backbones")


@pytest.mark.parametrize("command", ["probe", "knn", "index build --out IX", "search --id x"])
def test_store_errors(tmp_path, capsys, command):
    command = command.replace("IX", str(tmp_path / "ix")).split()
    code, _, err = _run(capsys, *command, "--store", str(tmp_path / "none.h5"))
    _assert_one_line_error(code, err, "no feature store", "python -m pipeline extract")
    (tmp_path / "text.h5").write_text("hi")
    code, _, err = _run(capsys, *command, "--store", str(tmp_path / "text.h5"))
    _assert_one_line_error(code, err, "not an HDF5")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = np.arange(3)
    code, _, err = _run(capsys, *command, "--store", str(tmp_path / "foreign.h5"))
    _assert_one_line_error(code, err, "not a feature store")
    (tmp_path / "half.h5.partial").write_bytes(b"")
    code, _, err = _run(capsys, *command, "--store", str(tmp_path / "half.h5"))
    _assert_one_line_error(code, err, "not complete", "run extract again")


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["knn", "--store", "x.h5", "--k", "0,abc"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "comma-separated positive finite numbers such as 1,20" in err and err.count("\n") == 1


def test_extract_probe_knn_happy_path(tmp_path, capsys, small_digits_root):
    store = tmp_path / "s.h5"
    code, out, err = _run(capsys, "extract", "--data", str(small_digits_root), "--out", str(store), *TINY)
    assert code == 0, err
    assert "100 extracted, 0 failed" in out
    code, out, _ = _run(capsys, "extract", "--data", str(small_digits_root), "--out", str(store), *TINY)
    assert code == 0 and "no forward pass" in out
    code, out, _ = _run(capsys, "probe", "--store", str(store), "--C", "0.1,1")
    assert code == 0 and "logreg probe" in out
    probe = json.loads((tmp_path / "s.probe.json").read_text())
    assert probe["chosen"] in (0.1, 1.0) and (tmp_path / "s.probe.head.safetensors").exists()
    assert (tmp_path / "s.probe.html").exists()
    code, out, _ = _run(capsys, "probe", "--store", str(store), "--head", "ridge", "--shots", "2", "--seeds", "0,1",
                        "--out", str(tmp_path / "few.json"), "--no-report")
    assert code == 0 and "2-shot ridge (2 seeds)" in out and not (tmp_path / "few.html").exists()
    code, out, _ = _run(capsys, "knn", "--store", str(store), "--k", "1,5", "--out", str(tmp_path / "k.json"))
    assert code == 0 and "kNN k=5 weighted" in out
    assert set(json.loads((tmp_path / "k.json").read_text())["by_k"]) == {"1", "5"}
    code, _, err = _run(capsys, "knn", "--store", str(store), "--k", "500")
    _assert_one_line_error(code, err, "larger than")

    head = tmp_path / "s.probe.head.safetensors"
    image = next((small_digits_root / "test" / "3").glob("*.png"))
    code, out, err = _run(capsys, "predict", "--head", str(head), str(image), "--top", "2")
    assert code == 0, err
    assert out.splitlines()[0] == "id,class_1,score_1,class_2,score_2" and str(image) in out
    code, _, err = _run(capsys, "predict", "--head", str(head))
    _assert_one_line_error(code, err, "give image files or --store")
    code, _, err = _run(capsys, "predict", "--head", str(head), str(tmp_path / "missing.png"))
    _assert_one_line_error(code, err, "cannot read the image", "missing.png")

    code, out, err = _run(capsys, "index", "build", "--store", str(store), "--out", str(tmp_path / "ix"))
    assert code == 0 and "Flat over 100 rows" in out, err
    code, out, _ = _run(capsys, "index", "info", str(tmp_path / "ix"))
    assert code == 0 and json.loads(out)["rows"] == 100
    code, out, _ = _run(capsys, "search", "--index", str(tmp_path / "ix"), "--image", str(image), "--k", "3")
    assert code == 0 and out.splitlines()[1].split()[2] == image.relative_to(small_digits_root).as_posix()
    code, _, err = _run(capsys, "index", "build", "--store", str(store), "--out", str(tmp_path / "pq"), "--type",
                        "ivf-pq")
    _assert_one_line_error(code, err, "at least 256 rows")


def test_memory_budget_sizes():
    from pipeline.cli.types import memory_size

    assert memory_size("4GiB") == 4 * 2**30 and memory_size("512MB") == 512 * 10**6 and memory_size("1000") == 1000
    for bad in ("lots", "-1GB", "4 parsecs"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a size such as 4GB"):
            memory_size(bad)


def test_backbones_command_lists_and_marks_weights(capsys):
    code, out, _ = _run(capsys, "backbones")
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert code == 0 and "present" in lines["efficientnet_lite0"]
    assert "torchvision:resnet50.IMAGENET1K_V2" in lines and "timm pretrained models" in out
    code, out, _ = _run(capsys, "backbones", "timm:resnet18.a1*")
    assert code == 0 and out.splitlines()[0].split()[:2] == ["timm:resnet18.a1_in1k", "-"]
    code, _, err = _run(capsys, "backbones", "nothing*")
    _assert_one_line_error(code, err, "no backbone matches")


def test_weights_and_layer_options(tmp_path, capsys, small_digits_root):
    import timm
    import torch

    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "mine.pth")
    store = tmp_path / "s.h5"
    code, out, err = _run(capsys, "extract", "--data", str(small_digits_root), "--out", str(store), "--backbone",
                          "timm:test_resnet", "--weights", str(tmp_path / "mine.pth"), "--layer", "layer2",
                          "--workers", "0")
    assert code == 0, err
    with h5py.File(store) as f:
        assert f.attrs["weights"].startswith("file:mine.pth:sha256:") and f.attrs["layer"] == "layer2:avgpool"
        assert not f.attrs["random_init"]
    torch.save({"fc.weight": torch.zeros(2)}, tmp_path / "wrong.pth")
    code, _, err = _run(capsys, "extract", "--data", str(small_digits_root), "--out", str(tmp_path / "t.h5"),
                        "--backbone", "timm:test_resnet", "--weights", str(tmp_path / "wrong.pth"))
    _assert_one_line_error(code, err, "does not fit this architecture", "missing keys")


def test_real_entry_point_prints_one_line_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "probe", "--store", str(tmp_path / "x.h5")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: no feature store")


def test_sharded_float16_extract_then_store_info_and_verify(tmp_path, capsys, small_digits_root):
    store = tmp_path / "s.h5"
    code, out, err = _run(capsys, "extract", "--data", str(small_digits_root), "--out", str(store), *TINY,
                          "--shard-rows", "40", "--dtype", "float16", "--compression", "lzf")
    assert code == 0, err
    code, out, _ = _run(capsys, "store", "info", str(store), "--json")
    info = json.loads(out)
    assert code == 0 and info["rows"] == 100 and info["shards"] == 3 and info["dtype"] == "float16"
    assert info["complete"] and info["layout"] == "sharded" and info["splits"] == {"test": 50, "train": 50}
    code, out, _ = _run(capsys, "store", "info", str(store))
    assert code == 0 and "backbone           timm:test_resnet" in out and "MiB" in out
    code, out, _ = _run(capsys, "store", "verify", str(store))
    assert code == 0 and out.strip().endswith(": ok")
    with h5py.File(sorted((tmp_path / "s.h5.shards").glob("*.h5"))[1], "a") as f:
        f["features"][0] = np.full(f["features"].shape[1], np.nan)  # corrupt one row inside a shard
    code, out, err = _run(capsys, "store", "verify", str(store))
    assert code == 1 and "problem: 1 row(s) with non-finite features" in out and "1 problem(s)" in err


def test_other_dtype_is_another_configuration(tmp_path, capsys, small_digits_root):
    store = tmp_path / "s.h5"
    assert _run(capsys, "extract", "--data", str(small_digits_root), "--out", str(store), *TINY)[0] == 0
    code, _, err = _run(capsys, "extract", "--data", str(small_digits_root), "--out", str(store), *TINY,
                        "--dtype", "float16")
    _assert_one_line_error(code, err, "another configuration", "--overwrite")


def test_every_command_is_one_registry_entry_listed_in_help():
    """cli/{extract,inspect,evaluate,transfer,interchange}.COMMANDS and flows/commands.COMMANDS: names are unique,
    each is listed by `--help` of the real entry point, and each has its own --help."""
    from flows import commands as app
    from pipeline.cli import evaluate, extract, inspect, interchange, library_commands, transfer

    library = [*extract.COMMANDS, *inspect.COMMANDS, *evaluate.COMMANDS, *transfer.COMMANDS, *interchange.COMMANDS]
    assert [c.name for c in library_commands()] == [c.name for c in library]
    names = [c.name for c in (*library, *app.COMMANDS)]
    assert len(names) == len(set(names)) and {"extract", "store", "probe", "finetune", "finetune-images",
                                                 "transfer", "bench", "run", "serve", "export", "import"} <= set(names)
    out = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert all(f"    {name}" in out.stdout for name in names), out.stdout
    for command in (*library, *app.COMMANDS):
        parser = argparse.ArgumentParser(prog=command.name)
        command.add_arguments(parser)
        assert parser.format_help().startswith(f"usage: {command.name}")
