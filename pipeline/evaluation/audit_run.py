"""`audit`: find duplicates and leakage (`pipeline.evaluation.audit`), score the test split with and without the
leaked images, and write the results JSON, every pair as CSV, the report, and on request a clean split assignment or
a manifest of the rows to keep."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import AuditConfig
from pipeline.errors import PipelineError
from pipeline.evaluation.audit import AuditFindings, find, hint_rows, pair_rows
from pipeline.evaluation.intervals import mean_intervals
from pipeline.outputs import check_output, owned_json, owned_text, results_stem, sibling, write_atomic
from pipeline.report.tables import csv_text
from pipeline.store.read import FeatureSet, load_store

PAIR_HEADER = ("kind", "cosine", "a_id", "a_split", "a_label", "b_id", "b_split", "b_label", "cross_split")
SPLITS_HEADER = ("id", "split", "audit")
MANIFEST_HEADER = ("path", "label", "split", "id")


def clean_assignment(fs: FeatureSet, findings: AuditFindings) -> list[str]:
    """Per row, why a clean split assignment drops it ("" to keep): a test image with a copy in train/val, or a
    later exact copy within its own split (the first row of each content hash in a split is kept)."""
    reasons = ["" for _ in range(len(fs))]
    copy_of = {}
    pairs = findings.pairs
    for a, b in zip(pairs["a"], pairs["b"], strict=True):
        for one, other in ((a, b), (b, a)):
            if fs.splits[one] == "test" and fs.splits[other] in ("train", "val"):
                copy_of.setdefault(int(one), int(other))
    for row, other in copy_of.items():
        reasons[row] = f"copy of {fs.ids[other]} in {fs.splits[other]}"
    seen: dict[tuple[str, str], int] = {}
    for row, key in enumerate(fs.row_keys()):
        first = seen.setdefault((str(fs.splits[row]), key), row)
        if first != row and not reasons[row]:
            reasons[row] = f"same content as {fs.ids[first]} in {fs.splits[row]}"
    return reasons


def _figure(right: np.ndarray, keep: np.ndarray, resamples: int) -> dict[str, Any]:
    """Top-1 on every scored test image and on those without a copy in train/val, with intervals."""
    out: dict[str, Any] = {"all": float(right.mean()), "without_leaked": float(right[keep].mean()) if keep.any()
                           else None, "n_all": int(len(right)), "n_without_leaked": int(keep.sum())}
    if resamples:
        out["all_interval"] = mean_intervals({"x": right.astype(float)}, resamples=resamples)["x"]
        if keep.any():
            out["without_leaked_interval"] = mean_intervals({"x": right[keep].astype(float)},
                                                            resamples=resamples)["x"]
    return out


def scores_without_leaks(fs: FeatureSet, leaked: np.ndarray, config: AuditConfig, *, probe: dict | None = None,
                         knn: dict | None = None, device: str = "cpu") -> dict[str, Any]:
    """The probe's and kNN's test top-1 on all test images and without the leaked ones, from their per-image
    correctness (the `probe` and `knn` results given, else fitted here; the kNN search on `device`). Test rows
    never enter a fit or a choice, so this equals recomputing on the store without those rows."""
    from pipeline.evaluation.knn import knn_classify
    from pipeline.evaluation.probes import canonical_order, correct_by_row, fit_probe

    test = canonical_order(fs, fs.mask("test") & (fs.labels >= 0))  # the order the probe's intervals are drawn in
    if not len(test):
        return {"note": "no labelled test split: nothing to score"}
    out: dict[str, Any] = {}
    keep = ~leaked[test]
    try:
        probe = probe or (fit_probe(fs, head=config.head, resamples=0)[1] if config.fit else None)
        out["probe"] = {"note": "no probe results (not computed)"} if probe is None else {
            "head": probe["head"], "chosen": probe["chosen"],
            **_figure(correct_by_row(fs, test, probe["test_correct"]), keep, config.resamples)}
    except PipelineError as exc:
        out["probe"] = {"note": str(exc)}
    try:
        knn = knn or (knn_classify(fs, ks=(config.knn_k,), temperature=config.temperature, resamples=0,
                                   device=device) if config.fit else None)
        if knn is None:
            raise PipelineError("no kNN results (not computed)")
        if knn["mode"] != "test vs train+val":
            raise PipelineError(f"kNN ran {knn['mode']}, not on the test split")
        k = str(config.knn_k) if str(config.knn_k) in knn["by_k"] else str(max(knn["ks"]))
        right = correct_by_row(fs, test, knn["by_k"][k]["weighted"]["correct"])
        out["knn"] = {"k": int(k), "vote": "weighted", "temperature": knn["temperature"],
                      **_figure(right, keep, config.resamples)}
    except PipelineError as exc:
        out["knn"] = {"note": str(exc)}
    return out


def audit_store(fs: FeatureSet, config: AuditConfig, *, probe: dict | None = None,
                knn: dict | None = None) -> tuple[dict[str, Any], AuditFindings]:
    """Find duplicates and leakage in a loaded store, and score the test split with and without the leaked rows."""
    from pipeline.evaluation.knn import exact_device

    device = exact_device(config.device)  # checked once, before any search
    findings = find(fs, threshold=config.threshold, k=config.k, device=device)
    findings.dropped = clean_assignment(fs, findings)
    pairs = findings.pairs
    cross = fs.splits[pairs["a"]] != fs.splits[pairs["b"]]
    by_splits = Counter("-".join(sorted((str(fs.splits[a]), str(fs.splits[b]))))
                        for a, b in zip(pairs["a"], pairs["b"], strict=True))
    start = time.perf_counter()
    scores = (scores_without_leaks(fs, findings.leaked, config, probe=probe, knn=knn, device=device)
              if config.fit or probe or knn  # without fit, only the results given are scored
              else {"note": "not computed (--no-fit)"})
    result = {
        "protocol": f"exact duplicates by content hash; near duplicates: another image among a row's "
                    f"{findings.idx.shape[1]} nearest neighbours (exact FAISS search) with cosine at or above the "
                    "threshold; leaked: a test image with a copy in train or val",
        "threshold": {"rule": findings.threshold_rule, "min": float(findings.thresholds.min()),
                      "max": float(findings.thresholds.max())},
        "k": int(findings.idx.shape[1]), "n_rows": len(fs),
        "exact_pairs": int((pairs["kind"] == "exact").sum()), "near_pairs": int((pairs["kind"] == "near").sum()),
        "cross_split_pairs": int(cross.sum()), "pairs_by_splits": dict(sorted(by_splits.items())),
        "n_test": int(fs.mask("test").sum()), "leaked_test_rows": int(findings.leaked.sum()),
        "leaked_test_ids": [str(i) for i in fs.ids[findings.leaked]][:1000],
        "cross_split": pair_rows(fs, pairs, cross_split_only=True, limit=1000),
        "scores": scores, "hints": hint_rows(fs, findings),
        "dropped_by_clean_assignment": sum(bool(r) for r in findings.dropped),
        "seconds": {"search": findings.seconds, "scores": round(time.perf_counter() - start, 3)},
    }
    return result, findings


def audit_outputs(config: AuditConfig) -> dict[str, Path | None]:
    """Every file `run_audit` writes, checked before any compute."""
    from pipeline.evaluation.probes import default_results_path
    from pipeline.report.render import check_report_outputs

    out = Path(config.out) if config.out else default_results_path(Path(config.store), "audit")
    protect = [config.store]
    stem = results_stem(out)
    targets: dict[str, Path | None] = {
        "out": out, "stem": stem,
        "results": check_output(out, owned=owned_json("audit-results"), overwrite=config.overwrite, protect=protect),
        "pairs": check_output(sibling(stem, ".pairs.csv"), owned=owned_text(",".join(PAIR_HEADER)),
                              overwrite=config.overwrite, protect=protect, what="the pairs file")}
    targets["splits"] = config.write_splits and check_output(
        config.write_splits, owned=owned_text(",".join(SPLITS_HEADER)), overwrite=config.overwrite, protect=protect,
        what="--write-splits")
    targets["manifest"] = config.write_manifest and check_output(
        config.write_manifest, owned=owned_text(",".join(MANIFEST_HEADER)), overwrite=config.overwrite,
        protect=protect, what="--write-manifest")
    if config.report:
        check_report_outputs(stem, overwrite=config.overwrite, protect=protect)
    return targets


def _manifest_rows(fs: FeatureSet, keep: np.ndarray) -> list[tuple[str, ...]]:
    from pipeline.engine.embed import paths_for_ids

    paths = paths_for_ids(fs.made, [str(i) for i in fs.ids[keep]], fs.path)
    missing = [str(i) for i in fs.ids[keep] if str(i) not in paths]
    if missing:
        raise PipelineError(f"{len(missing)} image(s) of the store are no longer listed by its source (e.g. "
                            f"{missing[0]!r}); --write-manifest needs the images where they were extracted from")
    return [(paths[str(i)], fs.class_names[label] if label >= 0 else "", str(split), str(i))
            for i, label, split in zip(fs.ids[keep], fs.labels[keep], fs.splits[keep], strict=True)]


def _check_budget(config: AuditConfig) -> None:
    """The audit's all-pairs search holds the matrix: beyond `max_memory` it refuses before reading it."""
    from pipeline.store.budget import store_budget

    held = store_budget(config.store, config.max_memory)
    if not held.fits:
        raise PipelineError(f"{held.need}, and the audit's all-pairs search loads them whole; raise --max-memory, or "
                            "audit a sample of it (export --splits / a manifest of some rows)")


def run_audit(config: AuditConfig, *, probe: dict | None = None, knn: dict | None = None) -> tuple[dict[str, Any],
                                                                                                  Path]:
    """Load the store, audit it, write everything (each output checked before the search). `probe` and `knn` are
    results of this store whose per-image correctness to use instead of fitting again."""
    from pipeline.report.audit import audit_blocks
    from pipeline.report.blocks import save_json
    from pipeline.report.render import write_report_blocks

    _check_budget(config)
    fs = load_store(config.store)
    if config.write_manifest and fs.made.source == "tar":
        raise PipelineError("--write-manifest needs one file per image, and this store was extracted from tar shards; "
                            "use --write-splits for the clean split assignment")
    targets = audit_outputs(config)
    result, findings = audit_store(fs, config, probe=probe, knn=knn)
    result.update(fs.provenance())
    reasons = findings.dropped
    write_atomic(targets["pairs"], csv_text(PAIR_HEADER, [[p[h] for h in PAIR_HEADER]
                                                          for p in pair_rows(fs, findings.pairs)]))
    if targets["splits"]:
        write_atomic(targets["splits"], csv_text(SPLITS_HEADER, [(i, "" if r else s, r or "kept") for i, s, r in
                                                                 zip(fs.ids, fs.splits, reasons, strict=True)]))
    if targets["manifest"]:
        keep = np.array([not r for r in reasons], dtype=bool)
        write_atomic(targets["manifest"], csv_text(MANIFEST_HEADER, _manifest_rows(fs, keep)))
    result["files"] = {k: str(Path(v).resolve()) for k, v in targets.items() if v and k not in ("out", "stem")}
    if config.report:
        result["report"] = [str(p.resolve()) for p in write_report_blocks(targets["stem"],
                                                                          audit_blocks(fs, result))]
    save_json(targets["results"], {**result, "featpipe": {"kind": "audit-results", "version": 1}})
    return result, targets["out"]
