"""Results as JSON, a console table, and reports people read: markdown plus a self-contained HTML page with plots.

A report is built once as a list of blocks (headings, paragraphs, tables, figures) and rendered twice: markdown with
the figures as PNG files in `STEM.plots/`, and HTML with the same PNGs embedded, so the page can be mailed or
attached to a Prefect artifact alone.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


def write_atomic(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    tmp.replace(path)
    return path


def save_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write JSON atomically (temporary file, then rename), so a reader never sees half a file."""
    return write_atomic(Path(path), json.dumps(_jsonable(payload), indent=2, sort_keys=False) + "\n")


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


HEADER = ("method", "top-1 %", "top-5 %", "balanced acc %", "macro-F1 %")


def results_rows(probe: dict[str, Any] | None, knn: dict[str, Any] | None) -> list[tuple[str, ...]]:
    """(method, top-1, top-5, balanced accuracy, macro-F1), in percent, for each evaluation."""
    rows: list[tuple[str, ...]] = []
    if probe and "by_shots" in probe:
        for k, entry in probe["by_shots"].items():
            runs = entry["runs"]
            rows.append((f"{k}-shot {probe['head']} ({len(runs)} seeds)",
                         f"{pct(entry['top1_mean'])} ± {pct(entry['top1_std'])}", "-",
                         pct(float(np.mean([r["balanced_accuracy"] for r in runs]))),
                         pct(float(np.mean([r["macro_f1"] for r in runs])))))
    elif probe:
        rows.append((f"{probe['head']} probe ({probe['param']}={probe['chosen']:g})", pct(probe["test_top1"]),
                     pct(probe["test_top5"]), pct(probe["test_balanced_accuracy"]), pct(probe["test_macro_f1"])))
    if knn:
        for k, votes in knn["by_k"].items():
            for vote, m in votes.items():
                label = f"kNN k={k} {vote}" + (f" (T={knn['temperature']:g})" if vote == "weighted" else "")
                rows.append((label, pct(m["top1"]), pct(m["top5"]), pct(m["balanced_accuracy"]),
                             pct(m["macro_f1"])))
    return rows


def format_table(probe: dict[str, Any] | None, knn: dict[str, Any] | None) -> str:
    """A fixed-width table for the console."""
    return text_table(HEADER, results_rows(probe, knn))


def text_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    rows = [header, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


# -- report blocks --------------------------------------------------------------------------------------------------

@dataclass
class Block:
    kind: str  # h1 | h2 | p | table | figure
    text: str = ""
    header: tuple[str, ...] = ()
    rows: list[tuple[str, ...]] | None = None
    png: bytes = b""
    name: str = ""


def _features_blocks(fs: Any, extraction: dict[str, Any] | None) -> list[Block]:
    a = fs.attrs
    counts = ", ".join(f"{s} {int(fs.mask(s).sum())}" for s in fs.split_names())
    lines = [f"store `{fs.path}`", f"backbone `{a['backbone']}` ({a['feature_dim']}-d, layer {a.get('layer')}, "
             f"L2-normalised), weights `{a['weights']}`",
             f"{len(fs)} rows ({counts}), {len(fs.class_names)} classes, {len(fs.failed)} failed images"]
    if extraction and not extraction.get("skipped"):
        lines.append(f"this run computed {extraction['computed']} images at {extraction['images_per_second']:.1f} "
                     "img/s")
    return [Block("h2", "Features"), *[Block("p", "- " + line) for line in lines]]


def _probe_blocks(fs: Any, probe: dict[str, Any]) -> list[Block]:
    from pipeline.plots import confusion_png, per_class_png

    blocks = [Block("h2", "Probe"), Block("p", probe["protocol"] + ".")]
    if "by_shots" in probe:
        rows = [(f"{k}-shot", f"{pct(e['top1_mean'])} ± {pct(e['top1_std'])}",
                 ", ".join(pct(r["top1"]) for r in e["runs"]), str(e["n_train"]))
                for k, e in probe["by_shots"].items()]
        return blocks + [Block("table", header=("shots per class", "test top-1 % (mean ± std)", "per seed",
                                                "train images"), rows=rows)]
    blocks.append(Block("p", f"{probe['param']}={probe['chosen']:g} chosen on the {probe['val_source']} "
                             f"({probe['n_train']} train / {probe['n_val']} val / {probe['n_test']} test), "
                             "refit on train+val, scored once on test."))
    blocks.append(Block("table", header=(probe["param"], "val top-1 %", "converged"),
                        rows=[(v, pct(a), str(probe["converged_by_value"][v]))
                              for v, a in probe["val_top1_by_value"].items()]))
    names = fs.class_names
    blocks.append(Block("figure", "Confusion matrix of the probe on the test split", png=confusion_png(
        probe["test_confusion_matrix"], names, title="probe: confusion (test)"), name="probe_confusion"))
    blocks.append(Block("figure", "Per-class accuracy of the probe on the test split", png=per_class_png(
        probe["test_per_class_accuracy"], title="probe: per-class accuracy (test)"), name="probe_per_class"))
    return blocks


def _knn_blocks(fs: Any, knn: dict[str, Any]) -> list[Block]:
    from pipeline.plots import confusion_png, neighbours_png

    blocks = [Block("h2", "kNN and retrieval"), Block("p", knn["protocol"] + f"; {knn['n_queries']} queries, "
                                                           f"{knn['n_bank']} rows searched.")]
    if knn.get("retrieval"):
        blocks.append(Block("table", header=("k", "recall@k %", "precision@k %", "mAP@k %"),
                            rows=[(k, pct(m["recall"]), pct(m["precision"]), pct(m["map"]))
                                  for k, m in knn["retrieval"].items()]))
    best_k, best_vote = max(((k, v) for k, votes in knn["by_k"].items() for v in votes),
                            key=lambda kv: knn["by_k"][kv[0]][kv[1]]["top1"])
    best = knn["by_k"][best_k][best_vote]
    blocks.append(Block("figure", f"Confusion matrix of the best kNN (k={best_k}, {best_vote} vote)",
                        png=confusion_png(best["confusion_matrix"], fs.class_names,
                                          title=f"kNN k={best_k} {best_vote}: confusion"), name="knn_confusion"))
    examples = knn.get("examples") or []
    if examples:
        from pipeline.embed import images_for_ids

        wanted = [e["id"] for e in examples] + [h["id"] for e in examples for h in e["hits"]]
        try:
            images = images_for_ids(fs.attrs, wanted)
        except Exception as exc:  # noqa: BLE001 - the results stand without their pictures; the report says why
            log.warning("nearest-neighbour images unavailable: %s", exc)
            images = {}
        note = "" if images else " (the images could not be found: the source moved or is unreadable)"
        blocks.append(Block("figure", "Queries (left) and their nearest neighbours; green: same class, red: "
                                      f"another{note}", png=neighbours_png(examples, images, fs.class_names,
                                                                         title="nearest neighbours"),
                            name="neighbours"))
    return blocks


def report_blocks(fs: Any, *, title: str, probe: dict[str, Any] | None = None, knn: dict[str, Any] | None = None,
                  extraction: dict[str, Any] | None = None) -> list[Block]:
    from pipeline.plots import projection_png

    blocks = [Block("h1", title), *_features_blocks(fs, extraction)]
    if probe or knn:
        blocks += [Block("h2", "Results"), Block("table", header=HEADER, rows=results_rows(probe, knn))]
    if probe:
        blocks += _probe_blocks(fs, probe)
    if knn:
        blocks += _knn_blocks(fs, knn)
    labelled = fs.labels >= 0
    if labelled.sum() >= 3:
        blocks.append(Block("figure", "The features on their first two principal components, one colour per class",
                            png=projection_png(fs.features[labelled], fs.labels[labelled], fs.class_names,
                                               title="features: PCA"), name="projection"))
    return blocks


def render_markdown(blocks: list[Block], plots_dir: Path, base: Path) -> str:
    out = []
    for b in blocks:
        if b.kind == "h1":
            out += [f"# {b.text}", ""]
        elif b.kind == "h2":
            out += [f"## {b.text}", ""]
        elif b.kind == "p":
            out += [b.text, ""]
        elif b.kind == "table":
            out += ["", markdown_table(b.header, b.rows or []), ""]
        elif b.kind == "figure":
            png = write_atomic(plots_dir / f"{b.name}.png", b.png)
            out += ["", f"![{b.text}]({png.relative_to(base).as_posix()})", "", f"*{b.text}*", ""]
    return "\n".join(out) + "\n"


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}"
        "td:not(:first-child){text-align:right}th{background:#f3f3f3}img{max-width:100%}"
        "figure{margin:1.5em 0}figcaption{color:#555;font-size:.9em}code{background:#f3f3f3;padding:0 3px}")


def _inline(text: str) -> str:
    """Escape, then turn `code` spans into <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(blocks: list[Block]) -> str:
    title = next((b.text for b in blocks if b.kind == "h1"), "report")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
           f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        if b.kind in ("h1", "h2"):
            out.append(f"<{b.kind}>{_inline(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{_inline(b.text.removeprefix('- '))}</p>")
        elif b.kind == "table":
            out.append("<table><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in b.header) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in b.rows or []]
            out.append("</table>")
        elif b.kind == "figure":
            data = base64.b64encode(b.png).decode()
            out.append(f'<figure><img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{_inline(b.text)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(stem: str | Path, *, fs: Any, probe: dict[str, Any] | None = None,
                 knn: dict[str, Any] | None = None, extraction: dict[str, Any] | None = None,
                 title: str | None = None) -> tuple[Path, Path]:
    """Write STEM.md (figures in STEM.plots/) and the self-contained STEM.html; return both paths."""
    stem = Path(stem)
    title = title or f"Evaluation of {fs.attrs['backbone']} on {fs.path.name}"
    blocks = report_blocks(fs, title=title, probe=probe, knn=knn, extraction=extraction)
    md = write_atomic(stem.with_name(stem.name + ".md"),
                       render_markdown(blocks, stem.with_name(stem.name + ".plots"), stem.parent))
    page = write_atomic(stem.with_name(stem.name + ".html"), render_html(blocks))
    return md, page
