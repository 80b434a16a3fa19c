"""The audit's report: what was found, the test figures with and without leaked images, and pictures of the pairs
and of the rows the hints point at."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.report.blocks import pct, pct_interval
from pipeline.report.render import Block, Value

log = logging.getLogger(__name__)
SHOWN = 8  # rows per picture


def _summary(result: dict[str, Any]) -> list[Block]:
    by = ", ".join(f"{k} {v}" for k, v in result["pairs_by_splits"].items()) or "none"
    return [Block("h2", "What was found"), Block("p", result["protocol"] + "."),
            Block("table", header=("finding", "count"), rows=[
                ("rows", str(result["n_rows"])),
                ("exact duplicate pairs (same content hash)", str(result["exact_pairs"])),
                ("near duplicate pairs (see the threshold below)", str(result["near_pairs"])),
                ("pairs across splits", str(result["cross_split_pairs"])),
                ("test images with a copy in train or val (leaked)",
                 f"{result['leaked_test_rows']} of {result['n_test']}"),
                ("rows a clean split assignment drops", str(result["dropped_by_clean_assignment"]))]),
            Block("p", f"Threshold: {result['threshold']['rule']}. Pairs by splits: {by}.")]


def _scores(result: dict[str, Any]) -> list[Block]:
    scores = result["scores"]
    blocks = [Block("h2", "Test figures with and without leaked images")]
    if "note" in scores:
        return blocks + [Block("p", scores["note"])]
    rows = []
    for name, entry in (("probe", scores.get("probe", {})), ("kNN", scores.get("knn", {}))):
        if "note" in entry:
            rows.append((name, entry["note"], "-", "-"))
            continue
        label = f"{name} ({entry['head']})" if name == "probe" else f"{name} (k={entry['k']} {entry['vote']})"
        rows.append((label, pct_interval(entry["all"], entry.get("all_interval")),
                     pct_interval(entry["without_leaked"], entry.get("without_leaked_interval")),
                     f"{entry['n_all']} / {entry['n_without_leaked']}"))
    return blocks + [Block("table", header=("figure", "top-1 % on all test images", "top-1 % without leaked",
                                            "test images (all / without)"), rows=rows),
                     Block("p", "The heads are fitted on train and val only, so leaving leaked test images out is "
                                "the same as recomputing on a store without them.")]


def _pairs_table(result: dict[str, Any]) -> list[Block]:
    pairs = result["cross_split"][:50]
    if not pairs:
        return [Block("h2", "Pairs across splits"), Block("p", "None.")]
    rows = [(p["kind"], f"{p['cosine']:.4f}", p["a_id"], p["a_split"], p["b_id"], p["b_split"]) for p in pairs]
    more = result["cross_split_pairs"] - len(pairs)
    return [Block("h2", "Pairs across splits"),
            Block("table", header=("kind", "cosine", "id", "split", "id", "split"), rows=rows),
            *([Block("p", f"... and {more} more in the pairs CSV.")] if more > 0 else [])]


def _hints_table(title: str, rows: list[dict], class_names: list[str], text: str) -> list[Block]:
    if not rows:
        return [Block("h2", title), Block("p", "None.")]
    cells = [(r["id"], r["split"], class_names[r["label"]] if r["label"] >= 0 else "-",
              "-" if r["label_noise"] is None else pct(r["label_noise"]),
              "-" if r["centre_distance"] is None else f"{r['centre_distance']:.3f}") for r in rows[:20]]
    return [Block("h2", title), Block("p", text),
            Block("table", header=("id", "split", "label", "neighbours on another label %", "distance from centres"),
                  rows=cells)]


def _with_neighbours(rows: list[dict]) -> list[dict]:
    return [{"id": r["id"], "label": r["label"], "hits": r["neighbours"]} for r in rows[:SHOWN]]


def _pictures(fs: Any, result: dict[str, Any]) -> list[Block]:
    from pipeline.engine.embed import images_for_ids
    from pipeline.report.plots import neighbours_png

    groups = {
        "leaked pairs: a test image (left) and its copy": [
            {"id": p["b_id"] if p["b_split"] == "test" else p["a_id"],
             "label": p["b_label"] if p["b_split"] == "test" else p["a_label"],
             "hits": [{"id": p["a_id"] if p["b_split"] == "test" else p["b_id"],
                       "label": p["a_label"] if p["b_split"] == "test" else p["b_label"], "score": p["cosine"]}]}
            for p in result["cross_split"] if "test" in (p["a_split"], p["b_split"])][:SHOWN],
        "likely mislabelled: the row (left) and its nearest neighbours": _with_neighbours(
            result["hints"]["label_noise"]),
        "farthest from every class centre: the row (left) and its nearest neighbours": _with_neighbours(
            result["hints"]["outliers"]),
    }
    wanted = [i for examples in groups.values() for e in examples for i in (e["id"], *(h["id"] for h in e["hits"]))]
    try:
        images = images_for_ids(fs.made, wanted, store=fs.path) if wanted else {}
    except Exception as exc:  # noqa: BLE001 - the findings stand without their pictures; the report says why
        log.warning("audit images unavailable: %s", exc)
        images = {}
    note = "" if images or not wanted else " (the images could not be found: the source moved or is unreadable)"
    return [Block("figure", f"{title}{note}", png=neighbours_png(examples, images, fs.class_names, title=title),
                  name=f"audit_{n}") for n, (title, examples) in enumerate(groups.items()) if examples]


def audit_blocks(fs: Any, result: dict[str, Any]) -> list[Block]:
    blocks = [Block("h1", ("Audit of ", Value(Path(fs.path).name), " (", Value(fs.made.backbone), ")")),
              *_summary(result), *_scores(result), *_pairs_table(result)]
    blocks += _hints_table("Likely mislabelled", result["hints"]["label_noise"], fs.class_names,
                           "Rows whose nearest neighbours mostly agree on another label (the share of the labelled "
                           "neighbours carrying the most common other label; at least half).")
    blocks += _hints_table("Outliers", result["hints"]["outliers"], fs.class_names,
                           "Rows farthest from every class centre (1 - the highest cosine to a class's mean "
                           "feature).")
    return blocks + _pictures(fs, result)
