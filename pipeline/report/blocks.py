"""Results as JSON, a console table, and reports people read: markdown plus a self-contained HTML page with plots.

A report is built once as a list of blocks (headings, paragraphs, tables, figures; `pipeline.report.render`) and
rendered twice: markdown with the figures as PNG files in `STEM.plots/`, and HTML with the same PNGs embedded, so the
page can be mailed or attached to a Prefect artifact alone. Every name that comes from the user's data is a `Value`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.outputs import write_atomic
from pipeline.report.render import Block, Text, Value, check_report_outputs, write_report_blocks

log = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or Infinity
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


def save_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write JSON atomically (temporary file, then rename), so a reader never sees half a file."""
    return write_atomic(Path(path), json.dumps(_jsonable(payload), indent=2, sort_keys=False, allow_nan=False) + "\n")


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


HEADER = ("method", "top-1 %", "top-5 %", "balanced acc %", "macro-F1 %")
METRICS = ("top1", "top5", "balanced_accuracy", "macro_f1")
INTERVAL_NOTE = ("Figures in brackets are 95% intervals: percentile bootstrap over the test images (each resample "
                 "draws as many test images with replacement). They show how much a figure could move on another "
                 "test set of the same size; the spread over seeds (±) shows how much the protocol's random draws "
                 "move it on this one.")


def pct_interval(x: float | None, bounds: list[float] | None) -> str:
    """A percentage with its interval in brackets when there is one: `94.63 [92.59, 96.48]`."""
    if x is None or not bounds or any(b is None or not math.isfinite(b) for b in bounds):
        return pct(x)
    return f"{pct(x)} [{pct(bounds[0])}, {pct(bounds[1])}]"


def _cells(metrics: dict[str, Any], prefix: str = "") -> tuple[str, ...]:
    intervals = metrics.get(f"{prefix}intervals") or {}
    return tuple(pct_interval(metrics.get(prefix + m), intervals.get(m)) for m in METRICS)


def results_rows(probe: dict[str, Any] | None, knn: dict[str, Any] | None) -> list[tuple[str, ...]]:
    """(method, top-1, top-5, balanced accuracy, macro-F1), in percent with their 95% intervals, per evaluation."""
    rows: list[tuple[str, ...]] = []
    if probe and "by_shots" in probe:
        for k, entry in probe["by_shots"].items():
            runs = entry["runs"]
            ci = entry.get("top1_mean_interval")
            rows.append((f"{k}-shot {probe['head']} ({len(runs)} seeds)",
                         f"{pct(entry['top1_mean'])} ± {pct(entry['top1_std'])}"
                         + (f" [{pct(ci[0])}, {pct(ci[1])}]" if ci else ""), "-",
                         pct(float(np.mean([r["balanced_accuracy"] for r in runs]))),
                         pct(float(np.mean([r["macro_f1"] for r in runs])))))
    elif probe and "history" in probe:
        rows.append((f"finetune {probe['blocks_trained']} block(s) (epoch {probe['chosen']})",
                     *_cells(probe, "test_")))
    elif probe:
        rows.append((f"{probe['head']} probe ({probe['param']}={probe['chosen']:g})", *_cells(probe, "test_")))
    if knn:
        for k, votes in knn["by_k"].items():
            for vote, m in votes.items():
                label = f"kNN k={k} {vote}" + (f" (T={knn['temperature']:g})" if vote == "weighted" else "")
                rows.append((label, *_cells(m)))
    return rows


def retrieval_rows(retrieval: dict[str, Any]) -> list[tuple[str, ...]]:
    """(k, recall@k, precision@k, mAP@k) in percent with their intervals."""
    return [(k, *(pct_interval(m[name], (m.get("intervals") or {}).get(name)) for name in ("recall", "precision",
                                                                                           "map")))
            for k, m in retrieval.items()]


def format_table(probe: dict[str, Any] | None, knn: dict[str, Any] | None) -> str:
    """A fixed-width table for the console."""
    return text_table(HEADER, results_rows(probe, knn))


def text_table(header: tuple[str, ...], rows: list[tuple[str, ...]], *, align: str = "") -> str:
    """A fixed-width table; `align` is l or r per column (default: the first left, the others right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rows = [header, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align, strict=True))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- report blocks --------------------------------------------------------------------------------------------------

def title_for(fs: Any) -> Text:
    return ("Evaluation of ", Value(fs.made.backbone), " on ", Value(Path(fs.path).name))


def _features_blocks(fs: Any, extraction: dict[str, Any] | None) -> list[Block]:
    made = fs.made
    counts = ", ".join(f"{s} {int(fs.mask(s).sum())}" for s in fs.split_names())
    lines: list[Text] = [
        ("store ", Value(str(Path(fs.path).resolve()))),
        ("backbone ", Value(made.backbone), f" ({made.feature_dim}-d, layer ", Value(made.layer),
         ", L2-normalised), weights ", Value(made.weights)),
        f"{len(fs)} rows ({counts}), {len(fs.class_names)} classes, {len(fs.failed)} failed images"]
    if extraction and not extraction.get("skipped"):
        lines.append(f"this run computed {extraction['computed']} images at {extraction['images_per_second']:.1f} "
                     "img/s")
    return [Block("h2", "Features"), *[Block("p", ("- ", *((line,) if isinstance(line, str) else line)))
                                       for line in lines]]


def _probe_blocks(fs: Any, probe: dict[str, Any]) -> list[Block]:
    from pipeline.report.plots import confusion_png, per_class_png

    blocks = [Block("h2", "Probe"), Block("p", probe["protocol"] + ".")]
    if "by_shots" in probe:
        rows = [(f"{k}-shot", f"{pct(e['top1_mean'])} ± {pct(e['top1_std'])}",
                 pct_interval(e["top1_mean"], e.get("top1_mean_interval")),
                 ", ".join(pct_interval(r["top1"], r.get("intervals", {}).get("top1")) for r in e["runs"]),
                 str(e["n_train"]))
                for k, e in probe["by_shots"].items()]
        return blocks + [Block("table", header=("shots per class", "test top-1 % (mean ± std over seeds)",
                                                "mean [95% interval over test images]", "per seed",
                                                "train images"), rows=rows)]
    if "history" in probe:  # finetune: one row per epoch, the best one kept
        blocks.append(Block("p", f"epoch {probe['chosen']} of {probe['epochs_run']} kept (lowest loss on the "
                                 f"{probe['val_source']}; {probe['n_train']} train / {probe['n_val']} val / "
                                 f"{probe['n_test']} test), scored once on test."))
        blocks.append(Block("table", header=("epoch", "train loss", "val loss", "val top-1 %"),
                            rows=[(str(h["epoch"]), f"{h['train_loss']:.4f}", f"{h['val_loss']:.4f}",
                                   pct(h["val_top1"])) for h in probe["history"]]))
    else:
        blocks.append(Block("p", f"{probe['param']}={probe['chosen']:g} chosen on the {probe['val_source']} "
                                 f"({probe['n_train']} train / {probe['n_val']} val / {probe['n_test']} test), "
                                 "refit on train+val, scored once on test."))
        blocks.append(Block("table", header=(probe["param"], "val top-1 %", "converged"),
                            rows=[(v, pct(a), str(probe["converged_by_value"][v]))
                                  for v, a in probe["val_top1_by_value"].items()]))
    blocks += _seed_spread_blocks(probe)
    names = fs.class_names
    blocks.append(Block("figure", "Confusion matrix of the probe on the test split", png=confusion_png(
        probe["test_confusion_matrix"], names, title="probe: confusion (test)"), name="probe_confusion"))
    blocks.append(Block("figure", "Per-class accuracy of the probe on the test split", png=per_class_png(
        probe["test_per_class_accuracy"], title="probe: per-class accuracy (test)"), name="probe_per_class"))
    return blocks


def _seed_spread_blocks(probe: dict[str, Any]) -> list[Block]:
    spread = probe.get("val_seed_spread")
    if not spread:
        return []
    if not spread.get("seeds"):
        return [Block("p", f"Seed spread: {spread['note']}.")]
    runs = spread["seeds"]
    return [Block("p", f"Seed spread: the validation slice drawn with {len(runs)} seeds gives test top-1 "
                       f"{pct(spread['top1_mean'])} ± {pct(spread['top1_std'])} (range {pct(spread['top1_range'][0])}"
                       f" to {pct(spread['top1_range'][1])}), against the bootstrap interval "
                       f"{pct_interval(probe['test_top1'], (probe.get('test_intervals') or {}).get('top1'))}: the "
                       "first is the protocol's randomness, the second the test set's."),
            Block("table", header=("seed", probe["param"], "test top-1 %"),
                  rows=[(str(r["seed"]), f"{r['chosen']:g}", pct(r["test_top1"])) for r in runs])]


def _knn_blocks(fs: Any, knn: dict[str, Any]) -> list[Block]:
    from pipeline.report.plots import confusion_png, neighbours_png

    blocks = [Block("h2", "kNN and retrieval"), Block("p", knn["protocol"] + f"; {knn['n_queries']} queries, "
                                                           f"{knn['n_bank']} rows searched.")]
    if knn.get("retrieval"):
        blocks.append(Block("table", header=("k", "recall@k %", "precision@k %", "mAP@k %"),
                            rows=retrieval_rows(knn["retrieval"])))
    best_k, best_vote = max(((k, v) for k, votes in knn["by_k"].items() for v in votes),
                            key=lambda kv: knn["by_k"][kv[0]][kv[1]]["top1"])
    best = knn["by_k"][best_k][best_vote]
    blocks.append(Block("figure", f"Confusion matrix of the best kNN (k={best_k}, {best_vote} vote)",
                        png=confusion_png(best["confusion_matrix"], fs.class_names,
                                          title=f"kNN k={best_k} {best_vote}: confusion"), name="knn_confusion"))
    examples = knn.get("examples") or []
    if examples:
        from pipeline.engine.embed import images_for_ids

        wanted = [e["id"] for e in examples] + [h["id"] for e in examples for h in e["hits"]]
        try:
            images = images_for_ids(fs.made, wanted, store=fs.path)
        except Exception as exc:  # noqa: BLE001 - the results stand without their pictures; the report says why
            log.warning("nearest-neighbour images unavailable: %s", exc)
            images = {}
        note = "" if images else " (the images could not be found: the source moved or is unreadable)"
        blocks.append(Block("figure", "Queries (left) and their nearest neighbours; green: same class, red: "
                                      f"another{note}", png=neighbours_png(examples, images, fs.class_names,
                                                                         title="nearest neighbours"),
                            name="neighbours"))
    return blocks


def _audit_blocks(audit: dict[str, Any]) -> list[Block]:
    report = next((p for p in audit.get("report", []) if p.endswith(".html")), None)
    return [Block("h2", "Audit"),
            Block("p", (f"{audit['exact_pairs']} exact and {audit['near_pairs']} near duplicate pairs, "
                        f"{audit['cross_split_pairs']} across splits; {audit['leaked_test_rows']} of {audit['n_test']} "
                        "test images have a copy in train or val.", *((" Full audit: ", Value(report)) if report
                                                                      else ())))]


def report_blocks(fs: Any, *, title: Text, probe: dict[str, Any] | None = None, knn: dict[str, Any] | None = None,
                  extraction: dict[str, Any] | None = None, audit: dict[str, Any] | None = None) -> list[Block]:
    from pipeline.report.plots import projection_png

    blocks = [Block("h1", title), *_features_blocks(fs, extraction)]
    if probe or knn:
        blocks += [Block("h2", "Results"), Block("table", header=HEADER, rows=results_rows(probe, knn)),
                   Block("p", INTERVAL_NOTE)]
    if probe:
        blocks += _probe_blocks(fs, probe)
    if knn:
        blocks += _knn_blocks(fs, knn)
    if audit:
        blocks += _audit_blocks(audit)
    labelled = fs.labels >= 0
    if labelled.sum() >= 3:
        features, labels = (fs.projection_sample() if hasattr(fs, "projection_sample")  # a store too big to load
                            else (fs.features[labelled], fs.labels[labelled]))
        blocks.append(Block("figure", "The features on their first two principal components, one colour per class",
                            png=projection_png(features, labels, fs.class_names, title="features: PCA"),
                            name="projection"))
    return blocks


def write_report(stem: str | Path, *, fs: Any, probe: dict[str, Any] | None = None,
                 knn: dict[str, Any] | None = None, extraction: dict[str, Any] | None = None,
                 audit: dict[str, Any] | None = None, title: Text | None = None,
                 overwrite: bool = False) -> tuple[Path, Path]:
    """Write STEM.md (figures in STEM.plots/) and the self-contained STEM.html; return both paths. The files are
    checked first (a foreign file there is refused unless `overwrite`), and written once every block is built."""
    check_report_outputs(stem, overwrite=overwrite, protect=(fs.path,))
    blocks = report_blocks(fs, title=title or title_for(fs), probe=probe, knn=knn, extraction=extraction, audit=audit)
    return write_report_blocks(stem, blocks)
