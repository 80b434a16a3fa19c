"""The audit: how its near-duplicate threshold was chosen, how well it finds planted copies, and its cost at scale.

    python benchmarks/audit.py calibrate      # digits + scikit-image photos with planted copies, real lite0 features
    python benchmarks/audit.py scale --rows 200000 --dim 256
    python benchmarks/audit.py intervals      # the cost of the bootstrap intervals next to the probe's fit

`calibrate` writes the digits (70/30 split) and scikit-image's example photos, plants copies of some test images in
train (byte-identical, JPEG re-encoded at quality 75, resized x2 / x0.5 bicubic, and both), extracts everything with
the packaged EfficientNet-Lite0, and prints the cosine of each kind of copy with its original next to the cosine of
each clean image with its nearest *distinct* neighbour; then runs the audit at the default threshold and counts what
it found and what it falsely paired.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from images import COPY_KINDS, copy_variant, write_photo_quadrants  # benchmarks/images.py


def plant(root: Path, per_kind: int, seed: int) -> list[dict[str, str]]:
    """Copies of test images into train: for each kind, `per_kind` digits and every test photo."""
    rng = np.random.default_rng(seed)
    tests = sorted(p for p in (root / "test").rglob("*.png"))
    digits = [p for p in tests if not p.parent.name.startswith("photo_")]
    photos = [p for p in tests if p.parent.name.startswith("photo_")]
    planted = []
    for kind in COPY_KINDS:
        for original in [digits[i] for i in rng.permutation(len(digits))[:per_kind]] + photos:
            suffix = ".jpg" if "jpeg" in kind else ".png"
            copy = root / "train" / original.parent.name / f"copy_{kind}_{original.stem}{suffix}"
            copy.write_bytes(copy_variant(original, kind))
            planted.append({"kind": kind, "domain": "photo" if original.parent.name.startswith("photo_") else "digit",
                            "original": original.relative_to(root).as_posix(),
                            "copy": copy.relative_to(root).as_posix()})
    return planted


def _summary(fs, planted: list[dict], found: set, clean: np.ndarray) -> dict:
    row = {str(i): n for n, i in enumerate(fs.ids)}
    by_kind: dict[str, dict] = {}
    for p in planted:
        entry = by_kind.setdefault(f"{p['domain']}/{p['kind']}", {"cosines": [], "found": 0, "planted": 0})
        a, b = row[p["original"]], row[p["copy"]]
        entry["cosines"].append(float(fs.features[a] @ fs.features[b]))
        entry["planted"] += 1
        entry["found"] += frozenset((a, b)) in found
    return {k: {"planted": v["planted"], "found": v["found"], "cosine_min": round(min(v["cosines"]), 4),
                "cosine_median": round(float(np.median(v["cosines"])), 4)} for k, v in sorted(by_kind.items())}


def calibrate(args: argparse.Namespace) -> dict:
    """Planted copies against the audit's auto threshold, and the clean images' closest distinct neighbours."""
    from pipeline.demo import write_digits_folder
    from pipeline.engine.runner import extract_to_store
    from pipeline.evaluation.audit import find
    from pipeline.plan import ExtractConfig
    from pipeline.store.read import load_store

    work = Path(tempfile.mkdtemp(prefix="audit-bench-")) if args.keep is None else args.keep
    try:
        store = work / "store.h5"
        if not store.exists():
            root = write_digits_folder(work / "data")
            write_photo_quadrants(root)
            (work / "planted.json").write_text(json.dumps(plant(root, args.per_kind, args.seed)))
            extract_to_store(ExtractConfig.of(data=root, out=store, workers=0, progress=False))
        planted = json.loads((work / "planted.json").read_text())
        fs = load_store(store)
        copies = {p["copy"] for p in planted}
        clean = np.array([n for n, i in enumerate(fs.ids) if str(i) not in copies])
        photo = np.array([str(i).split("/")[1].startswith("photo_") for i in fs.ids])
        start = time.perf_counter()
        findings = find(fs)
        seconds = time.perf_counter() - start
        found = {frozenset((int(a), int(b))) for a, b in zip(findings.pairs["a"], findings.pairs["b"], strict=True)}
        row = {str(i): n for n, i in enumerate(fs.ids)}
        wanted = {frozenset((row[p["original"]], row[p["copy"]])) for p in planted}
        clean_set = set(clean.tolist())
        false_pairs = [sorted(pair) for pair in found - wanted if pair <= clean_set]
        on_clean = find(fs.subset(clean), threshold=1.0, k=5)
        keys = np.array(fs.subset(clean).row_keys(), dtype=object)
        distinct = np.where(keys[on_clean.idx] != keys[:, None], on_clean.sims, -1).max(axis=1)
        return {
            "rows": len(fs), "planted": len(planted), "threshold_rule": findings.threshold_rule,
            "audit_seconds": round(seconds, 3),
            "by_kind": _summary(fs, planted, found, clean),
            "false_pairs_among_clean": {"digit": sum(not photo[a] and not photo[b] for a, b in false_pairs),
                                        "photo": sum(bool(photo[a] or photo[b]) for a, b in false_pairs)},
            "clean_nearest_distinct_cosine": {
                dom: {q: round(float(np.percentile(distinct[mask], q)), 4) for q in (50, 99, 100)}
                for dom, mask in (("digit", ~photo[clean]), ("photo", photo[clean]))},
        }
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def synthetic_store(path: Path, rows: int, dim: int, classes: int, seed: int, noise: float = 1.5,
                    copies: int = 0) -> None:
    """A complete store of synthetic unit rows (class means plus noise, 20% test), written by the store writer. The
    last `copies` rows are test rows that are near copies (a little noise) of the first `copies` train rows."""
    from pipeline.store.reuse import Listing
    from pipeline.store.writer import StoreWriter

    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)).astype(np.float32)
    labels = rng.integers(0, classes, rows)
    splits = np.where(rng.random(rows) < 0.2, "test", "train")
    splits[:copies], splits[rows - copies:] = "train", "test"
    labels[rows - copies:] = labels[:copies]
    x = means[labels] + rng.normal(scale=noise, size=(rows, dim)).astype(np.float32)
    x[rows - copies:] = x[:copies] + rng.normal(scale=0.02 * noise, size=(copies, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    listing = Listing(ids=[f"img/{k:09d}.jpg" for k in range(rows)], labels=labels.astype(np.int64),
                      splits=splits.tolist(), stamps=np.zeros((rows, 2), dtype=np.int64))
    attrs = {"cache_key": "synthetic", "class_names": json.dumps([f"class_{c}" for c in range(classes)])}
    with StoreWriter(path, listing=listing, dim=dim, attrs=attrs) as writer:
        todo = writer.prepare()
        for start in range(0, rows, 8192):
            pos = todo[start:start + 8192]
            writer.write(pos, x[pos], [f"{k:032x}" for k in pos])
        writer.finish()


def scale(args: argparse.Namespace) -> dict:
    from pipeline.config import AuditConfig
    from pipeline.evaluation.audit_run import audit_store
    from pipeline.store.read import load_store

    work = Path(tempfile.mkdtemp(prefix="audit-scale-"))
    try:
        store = work / "synthetic.h5"
        synthetic_store(store, args.rows, args.dim, args.classes, args.seed, noise=args.noise, copies=args.copies)
        fs = load_store(store)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        result, findings = audit_store(fs, AuditConfig(store=store, fit=False))
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"rows": args.rows, "dim": args.dim, "seconds": round(seconds, 1), "search_seconds": findings.seconds,
                "planted_near_copies": args.copies, "near_pairs": result["near_pairs"],
                "leaked_test_rows": result["leaked_test_rows"], "threshold": result["threshold"]["rule"],
                "features_mib": round(fs.features.nbytes / 2**20, 1), "peak_rss_mib_before": round(before, 1),
                "peak_rss_mib_after": round(peak, 1)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def intervals(args: argparse.Namespace) -> dict:
    """The probe on a synthetic store with and without the intervals: their cost next to the fit's."""
    from pipeline.evaluation.metrics import classification_metrics
    from pipeline.evaluation.probes import fit_probe
    from pipeline.store.read import load_store

    work = Path(tempfile.mkdtemp(prefix="audit-iv-"))
    try:
        store = work / "synthetic.h5"
        synthetic_store(store, args.rows, args.dim, args.classes, args.seed, noise=args.noise)
        fs = load_store(store)
        times = {}
        for resamples in (0, 1000):
            start = time.perf_counter()
            model, result = fit_probe(fs, grid=(1.0, 10.0), resamples=resamples)
            times[resamples] = time.perf_counter() - start
        test = fs.mask("test")
        scores = model.predict_proba(fs.features[test])
        start = time.perf_counter()
        classification_metrics(fs.labels[test], scores, model.classes_, fs.class_names, resamples=1000)
        with_intervals = time.perf_counter() - start
        start = time.perf_counter()
        classification_metrics(fs.labels[test], scores, model.classes_, fs.class_names)
        without = time.perf_counter() - start
        return {"rows": args.rows, "test_rows": result["n_test"], "classes": args.classes,
                "metrics_seconds_without": round(without, 3), "metrics_seconds_with_1000": round(with_intervals, 3),
                "probe_seconds_without": round(times[0], 2), "probe_seconds_with_1000": round(times[1000], 2),
                "overhead_seconds": round(times[1000] - times[0], 2),
                "overhead_ratio": round(times[1000] / times[0], 3), "test_top1": round(result["test_top1"], 4),
                "interval": [round(v, 4) for v in result["test_intervals"]["top1"]]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("calibrate", "scale", "intervals"))
    parser.add_argument("--per-kind", type=int, default=20, help="calibrate: planted copies of each kind")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=1.5, help="scale/intervals: per-coordinate noise of the "
                                                                 "synthetic rows (larger: harder)")
    parser.add_argument("--copies", type=int, default=1000, help="scale: near copies of train rows planted in test")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--keep", type=Path, default=None, help="calibrate: keep the images and store in this folder "
                                                                "(and reuse them when it has them)")
    args = parser.parse_args()
    figures = {"calibrate": calibrate, "scale": scale, "intervals": intervals}[args.mode](args)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
