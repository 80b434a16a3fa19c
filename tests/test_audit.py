"""`audit` on real features: planted copies of test images (byte-identical, re-encoded, resized) are found, the clean
digits give no near pairs, the figures without leaked images equal a recomputation without them, label noise planted
by flipping labels comes first in the hints, and the command writes what it says from another directory."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import AuditConfig
from pipeline.engine.runner import extract_to_store
from pipeline.evaluation.audit import find, hint_rows, neighbour_table
from pipeline.evaluation.audit_run import audit_store, clean_assignment
from pipeline.evaluation.knn import knn_classify
from pipeline.evaluation.probes import fit_probe
from pipeline.plan import ExtractConfig
from pipeline.store.read import load_store

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from images import copy_variant, write_photo_quadrants  # noqa: E402  (benchmarks/images.py)

DIGIT_KINDS = ("exact", "png_resave")  # on 8x8 digits lite0 cannot tell lossy copies from other digits (README)
PHOTO_KINDS = ("exact", "png_resave", "jpeg95", "up2_bilinear")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


@pytest.fixture(scope="module")
def planted(tmp_path_factory, small_digits_root, lite0):
    """100 digits and 16 photo crops, with copies of test images planted in train; the store and what was planted."""
    root = tmp_path_factory.mktemp("planted") / "data"
    shutil.copytree(small_digits_root, root)
    write_photo_quadrants(root, PHOTOS)
    tests = sorted((root / "test").rglob("*.png"))
    digits = [p for p in tests if not p.parent.name.startswith("photo_")][::9][:6]
    photos = [p for p in tests if p.parent.name.startswith("photo_")]
    copies = []
    for originals, kinds in ((digits, DIGIT_KINDS), (photos, PHOTO_KINDS)):
        for n, original in enumerate(originals):
            kind = kinds[n % len(kinds)]
            copy = root / "train" / original.parent.name / f"copy_{kind}_{original.stem}.png"
            copy.write_bytes(copy_variant(original, kind))
            copies.append((kind, original.relative_to(root).as_posix(), copy.relative_to(root).as_posix()))
    store = root.parent / "planted.h5"
    extract_to_store(ExtractConfig.of(data=root, out=store, workers=0, progress=False), backbone=lite0)
    return load_store(store), copies


def _pairs(findings) -> set[frozenset]:
    return {frozenset((int(a), int(b))) for a, b in zip(findings.pairs["a"], findings.pairs["b"], strict=True)}


def test_every_planted_copy_is_found_and_its_test_image_marked_leaked(planted):
    fs, copies = planted
    row = {str(i): n for n, i in enumerate(fs.ids)}
    findings = find(fs)
    found = _pairs(findings)
    for kind, original, copy in copies:
        assert frozenset((row[original], row[copy])) in found, (kind, original)
        assert findings.leaked[row[original]]
    kinds = dict(zip(map(frozenset, zip(findings.pairs["a"], findings.pairs["b"], strict=True)),
                     findings.pairs["kind"], strict=True))
    assert {kinds[frozenset((row[o], row[c]))] for k, o, c in copies if k == "exact"} == {"exact"}
    assert {kinds[frozenset((row[o], row[c]))] for k, o, c in copies if k != "exact"} == {"near"}
    planted_rows = {row[o] for _, o, _ in copies}
    assert set(np.flatnonzero(findings.leaked)) == planted_rows  # nothing else in test leaks


def test_the_clean_digits_give_no_near_pairs(digits_store):
    """All 1,797 digits: distinct digits are as close as 0.99 in lite0's space; the per-class threshold keeps every
    one of them apart (the digits have no byte-identical images either)."""
    fs = load_store(digits_store)
    findings = find(fs)
    assert int((findings.pairs["kind"] == "near").sum()) == 0
    keys = fs.row_keys()
    for a, b in zip(findings.pairs["a"], findings.pairs["b"], strict=True):
        assert keys[a] == keys[b]
    assert 0.95 <= findings.thresholds.min() <= findings.thresholds.max() <= 0.995
    assert "per class" in findings.threshold_rule


def test_figures_without_leaked_images_equal_a_recomputation_without_them(planted):
    fs, _ = planted
    result, findings = audit_store(fs, AuditConfig(store=fs.path, knn_k=5, resamples=200))
    probe, knn = result["scores"]["probe"], result["scores"]["knn"]
    clean = fs.subset(~findings.leaked)
    _, again = fit_probe(clean, resamples=0)
    assert probe["without_leaked"] == pytest.approx(again["test_top1"], abs=1e-12)
    assert probe["n_without_leaked"] == again["n_test"] == int((fs.mask("test") & ~findings.leaked).sum())
    _, full = fit_probe(fs, resamples=0)
    assert probe["all"] == pytest.approx(full["test_top1"], abs=1e-12)
    redone = knn_classify(clean, ks=(5,), resamples=0)
    assert knn["without_leaked"] == pytest.approx(redone["by_k"]["5"]["weighted"]["top1"], abs=1e-12)
    assert probe["all_interval"][0] <= probe["all"] <= probe["all_interval"][1]
    _, with_intervals = fit_probe(fs, resamples=200)
    assert probe["all_interval"] == with_intervals["test_intervals"]["top1"]  # the same resamples as the probe's
    assert result["leaked_test_rows"] == len(planted[1])
    assert probe["without_leaked"] != probe["all"] or knn["without_leaked"] != knn["all"]  # the copies did help


def test_flipped_labels_top_the_label_noise_hints(digits_store):
    fs = load_store(digits_store)
    rng = np.random.default_rng(0)
    flipped = rng.choice(np.flatnonzero(fs.mask("train")), 12, replace=False)
    labels = fs.labels.copy()
    labels[flipped] = (labels[flipped] + 1 + rng.integers(0, 9, 12)) % 10
    noisy = dataclasses.replace(fs, labels=labels)
    hints = hint_rows(noisy, find(noisy))
    listed = {h["id"] for h in hints["label_noise"]}  # at most 50 of 1,797 rows: by chance 0.3 of the 12
    assert len(listed & {str(fs.ids[i]) for i in flipped}) >= 7
    assert all(h["label_noise"] >= 0.5 for h in hints["label_noise"])
    clean_hints = hint_rows(fs, find(fs))
    assert len({h["id"] for h in clean_hints["label_noise"]} & {str(fs.ids[i]) for i in flipped}) <= 1
    assert len(hints["outliers"]) == 50 and hints["outliers"][0]["centre_distance"] >= hints["outliers"][-1][
        "centre_distance"]


def test_the_neighbour_table_in_blocks_equals_one_exact_search(monkeypatch):
    import pipeline.evaluation.audit as audit

    rng = np.random.default_rng(1)
    x = rng.normal(size=(700, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.integers(0, 3, 700)
    monkeypatch.setattr(audit, "_QUERY_BLOCK", 64)  # many blocks, the last one short
    sims, idx, other = neighbour_table(x, 5, labels, np.array([str(i) for i in range(700)], dtype=object))
    full = x @ x.T
    np.fill_diagonal(full, -np.inf)
    expected = np.argsort(-full, axis=1, kind="stable")[:, :5]
    assert np.allclose(sims, np.take_along_axis(full, expected, axis=1), atol=1e-5)
    other_class = np.where(labels[None, :] != labels[:, None], full, -np.inf).max(axis=1)
    assert np.allclose(other, other_class, atol=1e-5)


@pytest.mark.gpu
def test_the_neighbour_table_on_cuda_is_the_faiss_one():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels, keys = rng.integers(0, 5, 5000), np.array([str(i) for i in range(5000)], dtype=object)
    cpu = neighbour_table(x, 10, labels, keys)
    gpu = neighbour_table(x, 10, labels, keys, device="cuda")
    np.testing.assert_allclose(gpu[0], cpu[0], atol=1e-5)
    assert np.mean(gpu[1] == cpu[1]) > 0.999
    np.testing.assert_allclose(gpu[2], cpu[2], atol=1e-5)


def test_a_large_group_of_copies_is_paired_through_one_row_per_split():
    from pipeline.evaluation.audit import duplicate_pairs, leaked_test_rows
    from pipeline.store.read import FeatureSet

    n = 300
    x = np.tile(np.eye(4, dtype=np.float32)[:1], (n, 1))
    splits = np.array(["train"] * 200 + ["test"] * 100, dtype=object)
    fs = FeatureSet(path=Path("x.h5"), features=x, ids=np.array([f"i{k}" for k in range(n)], dtype=object),
                    labels=np.zeros(n, dtype=np.int64), splits=splits, class_names=["a"], attrs={},
                    hashes=np.array([b"same"] * n))
    pairs = duplicate_pairs(fs, np.zeros((n, 1), np.float32), np.zeros((n, 1), np.int64), thresholds=np.ones(n))
    assert len(pairs["a"]) < 2 * n  # not n^2 / 2
    assert leaked_test_rows(fs, pairs).sum() == 100


def test_audit_command_from_another_directory_writes_what_it_says(planted, tmp_path):
    fs, copies = planted
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = tmp_path / "results" / "audit.json"
    splits, manifest = tmp_path / "splits.csv", tmp_path / "keep.csv"
    run = subprocess.run([sys.executable, "-m", "pipeline", "audit", "--store", str(fs.path), "--out", str(out),
                          "--knn-k", "5", "--write-splits", str(splits), "--write-manifest", str(manifest)],
                         cwd=work, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert f"{len(copies)} of {int(fs.mask('test').sum())} test images have a copy" in run.stdout
    result = json.loads(out.read_text())
    assert result["featpipe"]["kind"] == "audit-results" and result["leaked_test_rows"] == len(copies)
    with open(out.with_name("audit.pairs.csv"), newline="") as f:
        pairs = list(csv.DictReader(f))
    assert {(p["a_id"], p["b_id"]) for p in pairs if p["cross_split"] == "True"} >= {
        tuple(sorted((o, c), key=lambda i: int(np.flatnonzero(fs.ids == i)[0]))) for _, o, c in copies}
    html = Path(result["report"][1]).read_text()
    assert "Pairs across splits" in html and html.count("<img") >= 3
    with open(splits, newline="") as f:
        assignment = {r["id"]: r for r in csv.DictReader(f)}
    assert {i for i, r in assignment.items() if r["audit"] != "kept"} == {o for _, o, _ in copies}
    with open(manifest, newline="") as f:
        kept = list(csv.DictReader(f))
    assert len(kept) == len(fs) - len(copies) and all(Path(r["path"]).is_file() for r in kept)
    again = tmp_path / "again.h5"
    extract_to_store(ExtractConfig.of(data=manifest, out=again, workers=0, progress=False,
                                      backbone="efficientnet_lite0"))
    reaudit, _ = audit_store(load_store(again), AuditConfig(store=again, fit=False))
    assert reaudit["leaked_test_rows"] == 0


def test_beyond_max_memory_the_audit_streams_and_writes_the_same_files(planted, tmp_path):
    """The planted store audited loaded and streamed (`--max-memory 1KiB`): the same pairs, clean assignment and
    manifest (its paths from the store's path column), and a report with the pictures."""
    fs, copies = planted
    work = tmp_path / "elsewhere"
    work.mkdir()
    written = {}
    for name, extra in (("loaded", ()), ("streamed", ("--max-memory", "1KiB"))):
        out = tmp_path / name / "audit.json"
        run = subprocess.run([sys.executable, "-m", "pipeline", "audit", "--store", str(fs.path), "--out", str(out),
                              "--knn-k", "5", "--head", "torch-logreg", "--resamples", "0",
                              "--write-splits", str(out.with_name("splits.csv")),
                              "--write-manifest", str(out.with_name("keep.csv")), *extra],
                             cwd=work, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr
        written[name] = {f: (out.parent / f).read_bytes() for f in ("audit.pairs.csv", "splits.csv", "keep.csv")}
        written[name]["result"] = json.loads(out.read_text())
    loaded, streamed = written["loaded"].pop("result"), written["streamed"].pop("result")
    assert written["loaded"] == written["streamed"]
    assert "streamed" in streamed and streamed["leaked_test_rows"] == loaded["leaked_test_rows"] == len(copies)
    assert streamed["scores"]["knn"] == loaded["scores"]["knn"] and streamed["hints"].keys() == loaded["hints"].keys()
    assert "without_leaked" in streamed["scores"]["probe"]
    html = Path(streamed["report"][1]).read_text()
    assert "Pairs across splits" in html and html.count("<img") >= 3


def test_bad_audit_arguments_are_one_line_before_any_search(planted, tmp_path, capsys):
    from pipeline.cli import main

    fs, _ = planted
    with pytest.raises(SystemExit) as exit_:
        main(["audit", "--store", str(fs.path), "--threshold", "1.5"])
    assert exit_.value.code == 2 and "--threshold" in capsys.readouterr().err
    (tmp_path / "foreign.csv").write_text("not ours\n")
    assert main(["audit", "--store", str(fs.path), "--out", str(tmp_path / "a.json"),
                 "--write-splits", str(tmp_path / "foreign.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--write-splits" in err and "--overwrite" in err
    assert not (tmp_path / "a.json").exists()
    assert main(["audit", "--store", str(fs.path), "--out", str(tmp_path / "a.json"), "--device", "cuda:99"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA" in err and not (tmp_path / "a.json").exists()
    clean = [c for c in clean_assignment(fs, find(fs)) if c]
    assert len(clean) == len(planted[1])


def test_the_audit_report_shows_the_findings_and_their_pictures(planted, tmp_path):
    from pipeline.report.audit import audit_blocks
    from pipeline.report.render import md_text, write_report_blocks

    fs, copies = planted
    result, _ = audit_store(fs, AuditConfig(store=fs.path, fit=False))
    md, html = write_report_blocks(tmp_path / "audit", audit_blocks(fs, result))
    text = md.read_text()
    assert f"| test images with a copy in train or val (leaked) | {len(copies)} of {int(fs.mask('test').sum())} |" \
        in text
    for _, original, copy in copies:
        assert md_text(original) in text and md_text(copy) in text
    assert "not computed" in text  # no fit asked for
    assert html.read_text().count("<img") == 3  # leaked pairs, label-noise rows, outliers


def test_an_unlabelled_store_is_audited_without_hints_or_figures():
    from pipeline.store.read import FeatureSet

    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    x[150:] = x[:50] + 0.001  # 50 near copies
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    splits = np.array(["train"] * 150 + ["test"] * 50, dtype=object)
    fs = FeatureSet(path=Path("u.h5"), features=x, ids=np.array([f"i{k}" for k in range(200)], dtype=object),
                    labels=np.full(200, -1, dtype=np.int64), splits=splits, class_names=[], attrs={},
                    hashes=np.array([f"{k:032x}".encode() for k in range(200)]))
    findings = find(fs)
    assert "0.95" in findings.threshold_rule and findings.leaked.sum() == 50
    assert np.isnan(findings.noise).all() and np.isnan(findings.far).all()
    assert hint_rows(fs, findings) == {"label_noise": [], "outliers": []}
    result, _ = audit_store(fs, AuditConfig(store=fs.path))
    assert result["scores"] == {"note": "no labelled test split: nothing to score"}


def _in_chromium(page: Path, shot: Path) -> tuple[str, np.ndarray]:
    """The page as the browser's DOM after load, and a screenshot of it (real headless Chromium)."""
    from PIL import Image

    chromium = shutil.which("chromium")
    assert chromium, "the report tests need Chromium (make test installs it as root; else apt-get install chromium)"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([*flags, "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    run = subprocess.run([*flags, "--window-size=1200,6000", f"--screenshot={shot}", page.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    return dom.stdout, np.asarray(Image.open(shot).convert("RGB")).astype(int)


def test_the_audit_and_probe_reports_render_in_a_real_browser(planted, tmp_path):
    """The HTML as users open it: Chromium parses the tables, and draws the embedded pictures (the green frames of
    same-class neighbours are pixels of the decoded PNGs, not of the page's own styling)."""
    from pipeline.config import ProbeConfig
    from pipeline.evaluation.audit_run import run_audit
    from pipeline.evaluation.probes import run_probe

    fs, copies = planted
    result, _ = run_audit(AuditConfig(store=fs.path, out=tmp_path / "a.json", knn_k=5, resamples=100))
    dom, pixels = _in_chromium(Path(result["report"][1]), tmp_path / "audit.png")
    assert dom.count("<img") == 3 and dom.count('src="data:image/png;base64,') == 3
    assert "Pairs across splits" in dom and f"{len(copies)} of {int(fs.mask('test').sum())}" in dom
    for _, original, copy in copies[:3]:
        assert original in dom and copy in dom
    green = (pixels[..., 1] > 100) & (pixels[..., 0] < 40) & (pixels[..., 2] < 40)
    assert green.sum() > 500
    probe, _ = run_probe(ProbeConfig(store=fs.path, out=tmp_path / "p.json", grid=(1.0,), resamples=100))
    dom, pixels = _in_chromium(Path(probe["report"][1]), tmp_path / "probe.png")
    low, high = probe["test_intervals"]["top1"]
    assert f"{100 * probe['test_top1']:.2f} [{100 * low:.2f}, {100 * high:.2f}]" in dom
    assert dom.count('src="data:image/png;base64,') == 3  # confusion, per class, projection
    assert pixels.std() > 20  # not a blank page
