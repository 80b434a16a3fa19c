"""`audit`: find duplicates and leakage (`pipeline.evaluation.audit`), score the test split with and without the
leaked images, and write the results JSON, every pair as CSV, the report, and on request a clean split assignment or
a manifest of the rows to keep."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import AuditConfig
from pipeline.errors import PipelineError
from pipeline.evaluation.audit import (
    AuditFindings,
    Rows,
    find,
    hint_rows,
    ids_of,
    pair_rows,
    split_column,
    splits_of,
)
from pipeline.evaluation.intervals import mean_intervals
from pipeline.outputs import check_output, owned_json, owned_text, results_stem, sibling, write_atomic
from pipeline.report.tables import csv_chunks, csv_text
from pipeline.store.columns import StreamedSet
from pipeline.store.read import FeatureSet, load_store

PAIR_HEADER = ("kind", "cosine", "a_id", "a_split", "a_label", "b_id", "b_split", "b_label", "cross_split")
SPLITS_HEADER = ("id", "split", "audit")
MANIFEST_HEADER = ("path", "label", "split", "id")


def drop_codes(fs: Rows, findings: AuditFindings) -> tuple[np.ndarray, np.ndarray]:
    """Per row, whether a clean split assignment drops it and because of which row: (0 keep, 1 a test image with a
    copy in train/val, 2 a later exact copy within its own split (the first row of each content hash in a split is
    kept); the row it copies)."""
    kind, ref = np.zeros(len(fs), dtype=np.int8), np.full(len(fs), -1, dtype=np.int64)
    pairs = findings.pairs
    one = np.stack([pairs["a"], pairs["b"]], axis=1).ravel()  # each pair both ways, in pair order
    other = np.stack([pairs["b"], pairs["a"]], axis=1).ravel()
    test, fit = fs.mask("test"), fs.mask("train", "val")
    hit = test[one] & fit[other] if len(one) else np.zeros(0, dtype=bool)
    rows, first = np.unique(one[hit], return_index=True)  # the first copy named for each row
    kind[rows], ref[rows] = 1, other[hit][first]
    splits = split_column(fs)
    for group in findings.groups:
        _, firsts = np.unique(splits[group], return_index=True)
        keeper = {splits[group[i]]: group[i] for i in firsts}
        for row in group:
            if kind[row] == 0 and keeper[splits[row]] != row:
                kind[row], ref[row] = 2, keeper[splits[row]]
    return kind, ref


def reason_texts(fs: Rows, kind: np.ndarray, ref: np.ndarray) -> list[str]:
    """The drop reasons of some rows as text ("" to keep), from `drop_codes`."""
    named = ref[kind > 0]
    ids, splits = ids_of(fs, named), splits_of(fs, named)
    texts = iter([f"copy of {i} in {s}" if c == 1 else f"same content as {i} in {s}"
                  for c, i, s in zip(kind[kind > 0], ids, splits, strict=True)])
    return [next(texts) if c else "" for c in kind]


def clean_assignment(fs: Rows, findings: AuditFindings) -> list[str]:
    """Per row, why a clean split assignment drops it ("" to keep): a test image with a copy in train/val, or a
    later exact copy within its own split (the first row of each content hash in a split is kept)."""
    return reason_texts(fs, *drop_codes(fs, findings))


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


def _scorers(fs: Rows, config: AuditConfig, device: str, max_memory: int | None) -> tuple[Any, Any, Any, Any]:
    """(test rows in the canonical order, correctness of a packed record per test row, probe fit, kNN fit) for a
    loaded or a streamed store."""
    if isinstance(fs, StreamedSet):
        from pipeline.evaluation.audit_stream import streamed_correct, streamed_knn, streamed_probe
        from pipeline.store.budget import resolve_max_memory

        budget = resolve_max_memory(max_memory)
        test = fs.ordered(fs.mask("test") & (fs.labels >= 0))
        return (test, lambda packed: streamed_correct(fs, test, packed),
                lambda: streamed_probe(fs, config.head, max_memory=budget, device=device),
                lambda: streamed_knn(fs, config.knn_k, config.temperature, max_memory=budget, device=device))
    from pipeline.evaluation.knn import knn_classify
    from pipeline.evaluation.probes import canonical_order, correct_by_row, fit_probe

    test = canonical_order(fs, fs.mask("test") & (fs.labels >= 0))  # the order the probe's intervals are drawn in
    return (test, lambda packed: correct_by_row(fs, test, packed),
            lambda: fit_probe(fs, head=config.head, resamples=0)[1],
            lambda: knn_classify(fs, ks=(config.knn_k,), temperature=config.temperature, resamples=0, device=device))


def scores_without_leaks(fs: Rows, leaked: np.ndarray, config: AuditConfig, *, probe: dict | None = None,
                         knn: dict | None = None, device: str = "cpu",
                         max_memory: int | None = None) -> dict[str, Any]:
    """The probe's and kNN's test top-1 on all test images and without the leaked ones, from their per-image
    correctness (the `probe` and `knn` results given, else fitted here; the kNN search on `device`; a streamed
    store's fits within `max_memory`). Test rows never enter a fit or a choice, so this equals recomputing on the
    store without those rows."""
    test, correct, fit_probe, fit_knn = _scorers(fs, config, device, max_memory)
    if not len(test):
        return {"note": "no labelled test split: nothing to score"}
    out: dict[str, Any] = {}
    keep = ~leaked[test]
    try:
        probe = probe or (fit_probe() if config.fit else None)
        out["probe"] = {"note": "no probe results (not computed)"} if probe is None else {
            "head": probe["head"], "chosen": probe["chosen"],
            **_figure(correct(probe["test_correct"]), keep, config.resamples)}
    except PipelineError as exc:
        out["probe"] = {"note": str(exc)}
    try:
        knn = knn or (fit_knn() if config.fit else None)
        if knn is None:
            raise PipelineError("no kNN results (not computed)")
        if knn["mode"] != "test vs train+val":
            raise PipelineError(f"kNN ran {knn['mode']}, not on the test split")
        k = str(config.knn_k) if str(config.knn_k) in knn["by_k"] else str(max(knn["ks"]))
        right = correct(knn["by_k"][k]["weighted"]["correct"])
        out["knn"] = {"k": int(k), "vote": "weighted", "temperature": knn["temperature"],
                      **_figure(right, keep, config.resamples)}
    except PipelineError as exc:
        out["knn"] = {"note": str(exc)}
    return out


def audit_store(fs: Rows, config: AuditConfig, *, probe: dict | None = None,
                knn: dict | None = None) -> tuple[dict[str, Any], AuditFindings]:
    """Find duplicates and leakage in a store (loaded, or streamed within `config.max_memory`), and score the test
    split with and without the leaked rows."""
    from pipeline.evaluation.knn import exact_device
    from pipeline.store.budget import resolve_max_memory

    device = exact_device(config.device)  # checked once, before any search
    budget = resolve_max_memory(config.max_memory)
    findings = find(fs, threshold=config.threshold, k=config.k, device=device, max_memory=budget)
    kind, _ = findings.dropped = drop_codes(fs, findings)
    pairs = findings.pairs
    split_a, split_b = splits_of(fs, pairs["a"]), splits_of(fs, pairs["b"])
    cross = split_a != split_b
    by_splits = Counter("-".join(sorted((str(a), str(b)))) for a, b in zip(split_a, split_b, strict=True))
    start = time.perf_counter()
    scores = (scores_without_leaks(fs, findings.leaked, config, probe=probe, knn=knn, device=device,
                                   max_memory=budget)
              if config.fit or probe or knn  # without fit, only the results given are scored
              else {"note": "not computed (--no-fit)"})
    streamed = isinstance(fs, StreamedSet)
    result = {
        "protocol": f"exact duplicates by content hash; near duplicates: another image among a row's "
                    f"{findings.idx.shape[1]} nearest neighbours (exact search"
                    f"{', streamed in blocks' if streamed else ''}) with cosine at or above the threshold; leaked: "
                    "a test image with a copy in train or val",
        "threshold": {"rule": findings.threshold_rule, "min": float(findings.thresholds.min()),
                      "max": float(findings.thresholds.max())},
        "k": int(findings.idx.shape[1]), "n_rows": len(fs),
        "exact_pairs": int((pairs["kind"] == "exact").sum()), "near_pairs": int((pairs["kind"] == "near").sum()),
        "cross_split_pairs": int(cross.sum()), "pairs_by_splits": dict(sorted(by_splits.items())),
        "n_test": int(fs.mask("test").sum()), "leaked_test_rows": int(findings.leaked.sum()),
        "leaked_test_ids": [str(i) for i in ids_of(fs, np.flatnonzero(findings.leaked)[:1000])],
        "cross_split": pair_rows(fs, pairs, cross_split_only=True, limit=1000),
        "scores": scores, "hints": hint_rows(fs, findings),
        "dropped_by_clean_assignment": int((kind > 0).sum()),
        "seconds": {"search": findings.seconds, "scores": round(time.perf_counter() - start, 3)},
        **({"streamed": {"max_memory": budget}} if streamed else {}),
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


def _assignment_rows(fs: Rows, kind: np.ndarray, ref: np.ndarray, block: int = 1 << 18) -> Iterator[list[tuple]]:
    """The clean split assignment (id, split or "", reason or "kept"), a block of rows at a time."""
    for start in range(0, len(fs), block):
        rows = np.arange(start, min(len(fs), start + block))
        reasons = reason_texts(fs, kind[rows], ref[rows])
        yield [(i, "" if r else s, r or "kept")
               for i, s, r in zip(ids_of(fs, rows), splits_of(fs, rows), reasons, strict=True)]


def _open_store(config: AuditConfig) -> Rows:
    """The store loaded whole when it fits `max_memory`, else its compact columns (the audit then streams)."""
    from pipeline.store.budget import store_budget
    from pipeline.store.columns import scan_store

    if store_budget(config.store, config.max_memory).fits:
        fs = load_store(config.store)
    else:
        fs = scan_store(config.store)
        if config.write_manifest:
            from pipeline.evaluation.audit_stream import check_manifest_source

            check_manifest_source(fs)
    if config.write_manifest and fs.made.source == "tar":
        raise PipelineError("--write-manifest needs one file per image, and this store was extracted from tar shards; "
                            "use --write-splits for the clean split assignment")
    return fs


def run_audit(config: AuditConfig, *, probe: dict | None = None, knn: dict | None = None) -> tuple[dict[str, Any],
                                                                                                  Path]:
    """Audit a store (loaded, or streamed beyond `max_memory`) and write everything (each output checked before
    the search). `probe` and `knn` are results of this store whose per-image correctness to use instead of fitting
    again."""
    from pipeline.report.audit import audit_blocks
    from pipeline.report.blocks import save_json
    from pipeline.report.render import write_report_blocks

    fs = _open_store(config)
    targets = audit_outputs(config)
    result, findings = audit_store(fs, config, probe=probe, knn=knn)
    result.update(fs.provenance())
    kind, ref = findings.dropped
    write_atomic(targets["pairs"], csv_text(PAIR_HEADER, [[p[h] for h in PAIR_HEADER]
                                                          for p in pair_rows(fs, findings.pairs)]))
    if targets["splits"]:
        write_atomic(targets["splits"], csv_chunks(SPLITS_HEADER, _assignment_rows(fs, kind, ref)))
    if targets["manifest"]:
        if isinstance(fs, StreamedSet):
            from pipeline.evaluation.audit_stream import manifest_chunks

            chunks = manifest_chunks(fs, kind == 0)
        else:
            chunks = iter([_manifest_rows(fs, kind == 0)])
        write_atomic(targets["manifest"], csv_chunks(MANIFEST_HEADER, chunks))
    result["files"] = {k: str(Path(v).resolve()) for k, v in targets.items() if v and k not in ("out", "stem")}
    if config.report:
        result["report"] = [str(p.resolve()) for p in write_report_blocks(targets["stem"],
                                                                          audit_blocks(fs, result))]
    save_json(targets["results"], {**result, "featpipe": {"kind": "audit-results", "version": 1}})
    return result, targets["out"]
