"""Hostile and broken inputs, one test per finding of the audit (issue 15): no code runs from a data file, no
made-up number is printed with exit 0, no result is lost or overwritten, and every expected failure is one line
with exit code 2 before any compute."""

from __future__ import annotations

import dataclasses
import html
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.engine.forward import NON_FINITE
from pipeline.engine.runner import extract_to_store
from pipeline.errors import PipelineError
from pipeline.plan import ExtractConfig
from pipeline.store.read import load_store
from pipeline.store.verify import verify_store
from tests.conftest import TINY_BACKBONE
from tests.helpers import make_folder, write_image
from tests.sources_data import digit_images, png_bytes, webdataset_members, write_shard

TINY = ["--backbone", TINY_BACKBONE, "--random-init", "--workers", "0"]


def _run(capsys, *argv):
    try:
        code = main(["--quiet", *[str(a) for a in argv]])
    except SystemExit as exc:  # argparse's errors: what `python -m pipeline` exits with
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line(code, err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory, small_digits_root):
    """100 digits through the tiny model, with a probe head beside it."""
    out = tmp_path_factory.mktemp("hostile") / "s.h5"
    extract_to_store(ExtractConfig.of(data=small_digits_root, out=out, backbone=TINY_BACKBONE, random_init=True,
                                   workers=0, progress=False))
    assert main(["--quiet", "probe", "--store", str(out), "--grid", "1", "--no-report"]) == 0
    return out


def _copy(store: Path, tmp_path: Path, name: str = "c.h5") -> Path:
    return Path(shutil.copy(store, tmp_path / name))


# -- 1. no code from a saved head -------------------------------------------------------------------------------------

class _Evil:
    """Unpickling this creates a file: the proof that a loader ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_1_a_pickled_head_is_refused_unread(tmp_path, capsys, small_digits_root):
    marker = tmp_path / "code-ran"
    image = next((small_digits_root / "test" / "3").iterdir())
    for name in ("x.head.joblib", "x.head.safetensors", "x.head"):
        head = tmp_path / name
        head.write_bytes(pickle.dumps({"format": 1, "estimator": _Evil(marker)}))
        code, _, err = _run(capsys, "predict", "--head", head, image)
        _one_line(code, err, str(head))
        assert not marker.exists()


def test_1_a_head_with_a_poisoned_field_is_refused(store, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    real = store.with_name("s.probe.head.safetensors")
    with safe_open(str(real), framework="np") as f:
        meta, tensors = json.loads(f.metadata()["featpipe"]), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    cases = {"extra field": ({**meta, "estimator": "gASV..."}, tensors),
             "class out of range": (meta, {**tensors, "classes": tensors["classes"] + 50}),
             "non-finite weight": (meta, {**tensors, "weight_0": np.full_like(tensors["weight_0"], np.nan)}),
             "wrong dimension": ({**meta, "feature_dim": meta["feature_dim"] + 1}, tensors),
             "wrong type": ({**meta, "test_top1": "0.99"}, tensors)}
    for what, (m, t) in cases.items():
        path = tmp_path / f"{what.replace(' ', '_')}.head.safetensors"
        save_file(t, str(path), metadata={"featpipe": json.dumps(m)})
        code, _, err = _run(capsys, "predict", "--head", path, "--store", store)
        _one_line(code, err, "not a usable probe head")


# -- 2. non-finite features --------------------------------------------------------------------------------------------

def test_2_weights_that_give_nan_are_one_line_naming_the_weights(tmp_path, capsys, small_digits_root):
    import timm

    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
             for k, v in timm.create_model("test_resnet").state_dict().items()}
    torch.save(state, tmp_path / "nan.pth")
    out = tmp_path / "s.h5"
    code, _, err = _run(capsys, "extract", "--data", small_digits_root, "--out", out, "--backbone", TINY_BACKBONE,
                        "--weights", tmp_path / "nan.pth", "--workers", "0")
    _one_line(code, err, "gave no usable features", "file:nan.pth")
    assert not out.exists() and not out.with_name("s.h5.partial").exists()


def test_2_rows_that_come_out_non_finite_become_failures(tmp_path, small_digits_root, tiny):
    from pipeline.engine.decode import load_image

    paths = sorted(small_digits_root.rglob("*.png"))
    brightness = {p.relative_to(small_digits_root).as_posix(): float(tiny.transform(load_image(p)).mean())
                  for p in paths}
    threshold = float(np.median(list(brightness.values())))

    def runner(x: torch.Tensor) -> torch.Tensor:  # a model that breaks on the brighter half of the images
        feats = tiny.model.features(x)
        return torch.where((x.mean(dim=(1, 2, 3)) > threshold)[:, None], torch.full_like(feats, float("nan")), feats)

    broken = dataclasses.replace(tiny, runner=runner)
    out = tmp_path / "s.h5"
    result = extract_to_store(ExtractConfig.of(data=small_digits_root, out=out, workers=0, progress=False),
                              backbone=broken)
    fs = load_store(out)
    assert result.failed > 0 and result.rows + result.failed == 100
    assert set(fs.failed.values()) == {NON_FINITE} and verify_store(out) == []
    assert set(fs.failed) == {i for i, b in brightness.items() if b > threshold}  # exactly those, recounted


def test_2_readers_refuse_stores_with_non_finite_rows(store, tmp_path, capsys):
    bad = _copy(store, tmp_path)
    with h5py.File(bad, "a") as f:
        for row in (3, 40, 77):
            f["features"][row] = np.nan
    for argv in (["knn", "--store", bad], ["probe", "--store", bad], ["index", "build", "--store", bad, "--out",
                 tmp_path / "ix"], ["search", "--store", bad, "--id", "train/0/digit_0000.png"]):
        code, _, err = _run(capsys, *argv)
        _one_line(code, err, "3 row(s) with non-finite features")
    from pipeline.evaluation.knn import _check_found

    with pytest.raises(PipelineError, match="fewer neighbours"):
        _check_found(np.array([[0, 1], [2, -1]]))


# -- 3. outputs --------------------------------------------------------------------------------------------------------

def test_3_outputs_never_replace_the_store_or_a_foreign_file(store, tmp_path, capsys):
    s = _copy(store, tmp_path)
    for command in ("knn", "probe"):
        code, _, err = _run(capsys, command, "--store", s, "--out", s)
        _one_line(code, err, "is the input")
        assert load_store(s).features.shape[0] == 100
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    for argv in (["knn", "--store", s, "--out", notes], ["probe", "--store", s, "--out", notes],
                 ["predict", "--head", store.with_name("s.probe.head.safetensors"), "--store", s, "--out", notes]):
        code, _, err = _run(capsys, *argv)
        _one_line(code, err, "was not written by this command", "--overwrite")
        assert notes.read_text() == "mine\n"
    assert _run(capsys, "knn", "--store", s, "--out", notes, "--overwrite", "--no-report")[0] == 0
    assert json.loads(notes.read_text())["featpipe"]["kind"] == "knn-results"
    assert _run(capsys, "knn", "--store", s, "--out", notes, "--no-report")[0] == 0  # now ours: replaced freely
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob("*.tmp"))  # no scratch left


def test_3_index_build_leaves_neighbouring_folders_alone(store, tmp_path, capsys):
    for name in ("ix.new", "ix.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text(name)
    assert _run(capsys, "index", "build", "--store", store, "--out", tmp_path / "ix")[0] == 0
    assert _run(capsys, "index", "build", "--store", store, "--out", tmp_path / "ix")[0] == 0  # rebuilt in place
    assert [(tmp_path / n / "keep.txt").read_text() for n in ("ix.new", "ix.old")] == ["ix.new", "ix.old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix", "ix.new", "ix.old"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.txt").write_text("x")
    code, _, err = _run(capsys, "index", "build", "--store", store, "--out", tmp_path / "other")
    _one_line(code, err, "not an index folder")
    other = _copy(store, tmp_path, "other.h5")
    with h5py.File(other, "a") as f:
        f.attrs["store_id"] = "someone-else"
    code, _, err = _run(capsys, "index", "build", "--store", other, "--out", tmp_path / "ix")
    _one_line(code, err, "index of another store", "--overwrite")


def test_3_a_symlinked_out_is_written_through(store, tmp_path, capsys):
    target = tmp_path / "real" / "results.json"
    target.parent.mkdir()
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert _run(capsys, "knn", "--store", store, "--out", link, "--no-report")[0] == 0
    assert link.is_symlink() and json.loads(target.read_text())["featpipe"]["kind"] == "knn-results"


# -- 4. markdown and tables --------------------------------------------------------------------------------------------

def _render_both(text: str) -> list[str]:
    import markdown
    from markdown_it import MarkdownIt

    return [markdown.markdown(text, extensions=["tables"]), MarkdownIt("commonmark").enable("table").render(text)]


def _tables_are_rectangular(html_text: str) -> bool:
    import re

    for table in re.findall(r"<table>.*?</table>", html_text, flags=re.S):
        rows = re.findall(r"<tr>(.*?)</tr>", table, flags=re.S)
        widths = {len(re.findall(r"<t[hd][ >]", r)) for r in rows}
        if len(widths) != 1:
            return False
    return True


def test_4_names_never_become_markup(tmp_path, capsys, tiny):
    root = tmp_path / "st`<b>ore`|x"  # no "/" in these names: it would make folders
    hostile = ["a`<img src=x onerror=alert(1)>`", "b|c|d", "<script>alert(1)", "_e_ *f* [g](h)"]
    for k, name in enumerate(hostile):
        for i in range(6):
            write_image(root / name / f"img_{i}.png", seed=10 * k + i)
    out = tmp_path / "s`<i>x`|y_*z*.h5"  # the store's name is in the reports' title and text
    extract_to_store(ExtractConfig.of(data=root, out=out, workers=0, progress=False), backbone=tiny)
    assert _run(capsys, "probe", "--store", out, "--grid", "1")[0] == 0
    assert _run(capsys, "knn", "--store", out, "--k", "1")[0] == 0
    for report in (out.with_name(out.name[:-3] + ".probe.md"), out.with_name(out.name[:-3] + ".knn.md")):
        for rendered in _render_both(report.read_text()):
            for tag in ("<img src=x", "<script>", "<b>", "<i>", "<a href", "<em>e</em>", "<em>f</em>"):
                assert tag not in rendered, (tag, report.name)
            assert _tables_are_rectangular(rendered)
            assert html.unescape(rendered).count("s`<i>x`|y_*z*.h5") >= 2  # shown as the text it is: title, text
    # a leaderboard whose failing backbone's name (and error row) is hostile
    code = main(["--quiet", "bench", "--data", str(root), "--backbones", f"{TINY_BACKBONE},<img src=x>|y",
                 "--out-dir", str(tmp_path / "bench"), "--workers", "0", "--k", "1"])
    assert code == 1
    board = next((tmp_path / "bench").glob("leaderboard_*.md"))
    for rendered in _render_both(board.read_text()):
        assert "<img src=x" not in rendered and "<img src=x>|y" in html.unescape(rendered)
        assert _tables_are_rectangular(rendered) and rendered.count("<tr>") == 3


# -- 5. memory ---------------------------------------------------------------------------------------------------------

def test_5_a_large_16_bit_image_converts_without_wide_temporaries(tmp_path):
    from PIL import Image

    pixels = np.zeros((9400, 9400), dtype=np.uint16)  # 88 Mpx: under the default pixel limit
    pixels[::97, ::89] = 65535
    Image.fromarray(pixels).save(tmp_path / "big.png")
    del pixels
    # the child's own peak (VmHWM): ru_maxrss would carry over the high-water mark of the forking test process
    code = ("import re, sys; from pipeline.engine.decode import Decoding, decode; "
            "image, _ = decode(open(sys.argv[1], 'rb').read(), Decoding()); "
            "peak = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024; "
            "print(image.mode, image.size[0], peak)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "big.png")], capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    assert out[:2] == ["RGB", "9400"]
    assert int(out[2]) < 1400, f"peak RSS {out[2]} MB (float64 temporaries took 2,871 MB)"


def test_5_files_and_members_over_the_byte_limit_are_refused_unread(tmp_path, tiny):
    root = make_folder(tmp_path / "d", {"a": 3, "b": 3})
    write_image(root / "a" / "big.png", seed=99, size=(200, 200))  # ~120 KB of noise
    write_shard(tmp_path / "s.tar", webdataset_members(["k0", "k1"], [png_bytes(digit_images(1)[0][0]),
                                                                     (root / "a" / "big.png").read_bytes()], [0, 1]))
    for data in (root, tmp_path / "s.tar"):
        out = tmp_path / f"{data.name}.h5"
        config = ExtractConfig.of(data=data, out=out, workers=0, progress=False, max_file_bytes=20_000)
        result = extract_to_store(config, backbone=tiny)
        failed = load_store(out).failed
        assert result.failed == 1 and "over the limit of 20,000" in next(iter(failed.values()))
        assert json.loads(load_store(out).attrs["decoding"])["max_file_bytes"] == 20_000  # recorded


# -- 6. tampered stores and indexes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("tamper, reader_error", [
    (lambda f: f["splits"].__setitem__(5, "holdout"), "split value"),
    (lambda f: f["labels"].__setitem__(7, 99), "label(s) outside"),
    (lambda f: f.attrs.__setitem__("feature_dim", 7), "feature_dim=7"),
    (lambda f: f.attrs.__delitem__("cache_key"), "no cache_key"),
    (lambda f: f.attrs.__setitem__("preprocessing", "{broken"), "preprocessing is not a JSON"),
    (lambda f: f.__delitem__("ids"), "missing"),
    (lambda f: (f.__delitem__("features"), f.create_dataset("features", data=np.zeros(100))), "shape"),
    (lambda f: f.attrs.__setitem__("committed_rows", "abc"), "committed_rows"),
    (lambda f: f.attrs.__setitem__("class_names", "not json"), "class_names"),
])
def test_6_tampered_stores_are_refused_by_readers_and_reported_by_verify(store, tmp_path, capsys, tamper,
                                                                         reader_error):
    bad = _copy(store, tmp_path)
    with h5py.File(bad, "a") as f:
        tamper(f)
    problems = verify_store(bad)
    assert problems and any(reader_error in p for p in problems), problems
    for argv in (["probe", "--store", bad], ["knn", "--store", bad], ["search", "--store", bad, "--id", "x"],
                 ["predict", "--head", store.with_name("s.probe.head.safetensors"), "--store", bad]):
        code, _, err = _run(capsys, *argv)
        _one_line(code, err)
    code, out, _ = _run(capsys, "store", "verify", bad)
    assert code == 1 and "problem:" in out


@pytest.fixture()
def index(store, tmp_path, capsys):
    assert _run(capsys, "index", "build", "--store", store, "--out", tmp_path / "ix")[0] == 0
    return tmp_path / "ix"


@pytest.mark.parametrize("damage", ["infos-json", "infos-fields", "rows", "faiss"])
def test_6_damaged_index_files_are_one_line(index, capsys, damage):
    if damage == "infos-json":
        (index / "index_infos.json").write_text("{")
    elif damage == "infos-fields":
        infos = json.loads((index / "index_infos.json").read_text())
        (index / "index_infos.json").write_text(json.dumps({**infos, "rows": "many", "__class__": "x"}))
    elif damage == "rows":
        (index / "rows.npz").write_bytes(b"PK\x03\x04 not a zip")
    else:
        (index / "index.faiss").write_bytes(b"\x00" * 100)
    for argv in (["index", "info", index], ["search", "--index", index, "--id", "x"], ["index", "add", index]):
        code, _, err = _run(capsys, *argv)
        _one_line(code, err, "not a usable index folder")


def test_6_an_index_whose_rows_were_permuted_is_refused(store, index, capsys):
    with np.load(index / "rows.npz") as rows:
        ids, hashes = rows["ids"], rows["hashes"]
    order = np.random.default_rng(0).permutation(len(ids))
    np.savez(index / "rows.npz", ids=ids[order], hashes=hashes[order])  # consistent id/hash pairs, wrong rows
    some = str(ids[0])
    code, _, err = _run(capsys, "search", "--index", index, "--id", some)
    _one_line(code, err, "not the store's features")
    code, _, err = _run(capsys, "index", "add", index)
    _one_line(code, err, "not the store's features")


# -- 7. one bad name does not stop a run -------------------------------------------------------------------------------

def test_7_a_file_name_that_is_not_utf8_becomes_a_row(tmp_path, capsys, tiny):
    root = make_folder(tmp_path / "d", {"a": 4, "b": 4})
    raw = os.fsencode(root / "a") + b"/caf\xe9.png"
    with open(raw, "wb") as fh:
        fh.write(png_bytes(digit_images(1)[0][0]))
    out = tmp_path / "s.h5"
    result = extract_to_store(ExtractConfig.of(data=root, out=out, workers=0, progress=False), backbone=tiny)
    fs = load_store(out)
    assert result.rows == 9 and "a/caf\\xe9.png" in set(fs.ids) and verify_store(out) == []
    code, printed, _ = _run(capsys, "search", "--store", out, "--id", "a/caf\\xe9.png", "--k", "1", "--json")
    assert code == 0 and json.loads(printed)[0]["hits"][0]["id"] == "a/caf\\xe9.png"
    assert _run(capsys, "knn", "--store", out, "--k", "1")[0] == 0  # the report's image grid too


def test_7_class_names_with_dollar_signs_render_as_text(tmp_path, capsys, tiny):
    root = make_folder(tmp_path / "d", {"$x^$": 6, "$\\frac{1}{$": 6, "plain": 6})
    out = tmp_path / "s.h5"
    extract_to_store(ExtractConfig.of(data=root, out=out, workers=0, progress=False), backbone=tiny)
    code, _, err = _run(capsys, "probe", "--store", out, "--grid", "1")
    assert code == 0, err
    assert out.with_name("s.probe.head.safetensors").is_file() and out.with_name("s.probe.json").is_file()
    assert (tmp_path / "s.probe.plots" / "probe_confusion.png").stat().st_size > 1000


# -- 8. one line, before any compute -----------------------------------------------------------------------------------

@pytest.fixture()
def immutable(tmp_path):
    """A folder nothing can be written into: immutable for root (which ignores permission bits), read-only else."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
    yield folder
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


def test_8_unwritable_output_folders_fail_before_any_compute(store, immutable, capsys, small_digits_root):
    head = store.with_name("s.probe.head.safetensors")
    for argv in (["extract", "--data", small_digits_root, "--out", immutable / "s.h5", *TINY],
                 ["probe", "--store", store, "--out", immutable / "p.json"],
                 ["knn", "--store", store, "--out", immutable / "k.json"],
                 ["index", "build", "--store", store, "--out", immutable / "ix"],
                 ["predict", "--head", head, "--store", store, "--out", immutable / "p.csv"]):
        code, _, err = _run(capsys, *argv)
        _one_line(code, err, "cannot be written to")


@pytest.mark.parametrize("argv, needle", [
    (["extract", "--data", "D", "--out", "DIR", "--overwrite", *TINY], "is a folder"),
    (["extract", "--data", "D", "--out", "OUT/" + "n" * 245 + ".h5", *TINY], "too long"),
    (["probe", "--store", "S", "--grid", "nan"], "finite"),
    (["probe", "--store", "S", "--grid", "inf"], "finite"),
    (["knn", "--store", "S", "--temperature", "nan"], "finite"),
    (["extract", "--data", "D", "--out", "OUT/x.h5", "--decode-timeout", "nan"], "finite"),
    (["extract", "--data", "D", "--out", "OUT/x.h5", "--wait", "-5"], "finite number >= 0"),
    (["probe", "--store", "S", "--head", "torch-logreg", "--device", "cuda:99"], "CUDA"),
    (["knn", "--store", "S", "--device", "cuda:99"], "CUDA"),
    (["knn", "--store", "S", "--device", "tpu"], "--device"),
    (["probe", "--store", "S", "--shots", "1", "--seeds", "0"], None),
    (["index", "build", "--store", "S", "--out", "OUT/ix", "--queries", "0"], "integer >= 1"),
    (["bench", "--data", "D", "--backbones", TINY_BACKBONE, "--out-dir", "OUT/b", "--k", "0"], "integer >= 1"),
    (["bench", "--data", "D", "--backbones", TINY_BACKBONE, "--out-dir", "OUT/b", "--batch-size", "0"], ">= 1"),
    (["extract", "--data", "D", "--out", "OUT/x.h5", "--image-plugin", "os:system", *TINY], "register"),
])
def test_8_bad_arguments_are_one_line_before_any_compute(store, tmp_path, capsys, small_digits_root, argv, needle):
    one_class = tmp_path / "one.h5"
    if needle is None:  # few-shot on a store with a single class
        extract_to_store(ExtractConfig.of(data=make_folder(tmp_path / "d1", {"only": 8}), out=one_class,
                                       backbone=TINY_BACKBONE, random_init=True, workers=0, progress=False))
        needle = "fewer than two"
    (tmp_path / "DIR").mkdir()
    replace = {"D": str(small_digits_root), "DIR": str(tmp_path / "DIR"), "S": str(one_class if one_class.exists()
                                                                                     else store)}
    argv = [replace.get(a, a.replace("OUT/", f"{tmp_path}/out/")) for a in argv]
    code, _, err = _run(capsys, *argv)
    _one_line(code, err, needle)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.h5"))


# -- 9. smaller ones ---------------------------------------------------------------------------------------------------

def test_9_links_out_of_the_data_root_are_not_followed(tmp_path, tiny, caplog):
    outside = make_folder(tmp_path / "elsewhere", {"secret": 3})
    root = make_folder(tmp_path / "d", {"a": 4, "b": 4})
    (root / "c").symlink_to(outside / "secret")  # a linked class folder
    (root / "a" / "leak.png").symlink_to(outside / "secret" / "img_000.png")  # a linked file
    (root / "b" / "inside.png").symlink_to(root / "b" / "img_000.png")  # a link that stays inside: fine
    out = tmp_path / "s.h5"
    result = extract_to_store(ExtractConfig.of(data=root, out=out, workers=0, progress=False), backbone=tiny)
    fs = load_store(out)
    assert "c" not in fs.class_names and not any(i.startswith("c/") for i in fs.ids)
    assert "b/inside.png" in set(fs.ids) and "outside the data root" in fs.failed["a/leak.png"]
    assert result.rows == 9 and any("lead outside it" in r.message for r in caplog.records)
    followed = extract_to_store(ExtractConfig.of(data=root, out=tmp_path / "f.h5", workers=0, progress=False,
                                              follow_links=True), backbone=tiny)
    assert followed.rows == 13


def test_9_csv_cells_cannot_run_as_formulas(tmp_path, capsys, tiny):
    import csv

    from pipeline.report.tables import unsafe_cell
    from tests.sources_data import write_manifest

    images, _ = digit_images(24)
    rows = []
    for k in range(24):
        (tmp_path / f"{k}.png").write_bytes(png_bytes(images[k]))
        rows.append({"path": f"{k}.png", "id": f'=HYPERLINK("http://x/{k}")', "label": "=1+1" if k % 2 else "@SUM"})
    write_manifest(tmp_path / "m.csv", rows)
    store = tmp_path / "s.h5"
    extract_to_store(ExtractConfig.of(data=tmp_path / "m.csv", out=store, workers=0, progress=False), backbone=tiny)
    assert _run(capsys, "probe", "--store", store, "--grid", "1", "--no-report")[0] == 0
    out = tmp_path / "p.csv"
    code, _, err = _run(capsys, "predict", "--head", tmp_path / "s.probe.head.safetensors", "--store", store,
                        "--out", out)
    assert code == 0, err
    with open(out, newline="") as fh:
        header, *rows = list(csv.reader(fh))
    assert header == ["id", "class_1", "score_1"] and len(rows) == 24
    assert not any(cell.startswith(("=", "+", "@")) for row in rows for cell in row)
    assert {unsafe_cell(r[0]) for r in rows} == {f'=HYPERLINK("http://x/{k}")' for k in range(24)}
    assert {unsafe_cell(r[1]) for r in rows} <= {"=1+1", "@SUM"} and all(0 <= float(r[2]) <= 1 for r in rows)


def test_9_failure_reasons_carry_no_object_addresses(tmp_path, tiny):
    root = make_folder(tmp_path / "d", {"a": 3})
    (root / "a" / "junk.png").write_bytes(b"not an image at all")
    out = tmp_path / "s.h5"
    extract_to_store(ExtractConfig.of(data=root, out=out, workers=0, progress=False), backbone=tiny)
    reason = load_store(out).failed["a/junk.png"]
    assert "cannot identify image file" in reason and "0x" not in reason


def test_9_no_lock_file_is_left_behind_and_the_lock_still_excludes(tmp_path, small_digits_root, tiny):
    out = tmp_path / "s.h5"
    extract_to_store(ExtractConfig.of(data=small_digits_root, out=out, workers=0, progress=False), backbone=tiny)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]  # no s.h5.lock, no scratch
    from pipeline.store.lock import StoreLock

    counter, inside, overlaps = tmp_path / "counter", [0], []

    counter.write_text("0")

    def work() -> None:
        for _ in range(50):
            with StoreLock(tmp_path / "x.lock", timeout=60, poll=0.001):
                inside[0] += 1
                overlaps.append(inside[0])
                counter.write_text(str(int(counter.read_text()) + 1))  # a read-modify-write: needs the lock
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter.read_text() == "200" and max(overlaps) == 1 and not (tmp_path / "x.lock").exists()


def test_9_reusing_an_out_for_another_data_set_is_refused(tmp_path, capsys, small_digits_root):
    out = tmp_path / "s.h5"
    assert _run(capsys, "extract", "--data", small_digits_root, "--out", out, *TINY)[0] == 0
    other = make_folder(tmp_path / "other", {"cat": 5, "dog": 5})
    code, _, err = _run(capsys, "extract", "--data", other, "--out", out, *TINY)
    _one_line(code, err, "holds features of", "--overwrite")
    assert len(load_store(out)) == 100
    moved = shutil.copytree(small_digits_root, tmp_path / "moved")  # the same data set in a new place: fine
    code, printed, err = _run(capsys, "extract", "--data", moved, "--out", out, *TINY)
    assert code == 0 and "0 extracted" in printed, err

