"""Results as JSON, a console table and a short markdown report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


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


def save_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write JSON atomically (temporary file, then rename), so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(payload), indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def results_rows(probe: dict[str, Any] | None, knn: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    """(method, top-1 %, top-5 %, balanced accuracy %) for each evaluation."""
    rows = []
    if probe:
        rows.append((f"linear probe (C={probe['chosen_C']:g})", _pct(probe["test_top1"]), _pct(probe["test_top5"]),
                     _pct(probe["test_balanced_accuracy"])))
    if knn:
        for k, votes in knn["by_k"].items():
            for vote, m in votes.items():
                label = f"kNN k={k} {vote}" + (f" (T={knn['temperature']:g})" if vote == "weighted" else "")
                rows.append((label, _pct(m["top1"]), _pct(m["top5"]), _pct(m["balanced_accuracy"])))
    return rows


HEADER = ("method", "top-1 %", "top-5 %", "balanced acc %")


def format_table(probe: dict[str, Any] | None, knn: dict[str, Any] | None) -> str:
    """A fixed-width table for the console."""
    rows = [HEADER, *results_rows(probe, knn)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(probe: dict[str, Any] | None, knn: dict[str, Any] | None) -> str:
    rows = [HEADER, *results_rows(probe, knn)]
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 1)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def write_markdown_report(path: str | Path, *, title: str, extraction: dict[str, Any] | None,
                          probe: dict[str, Any] | None, knn: dict[str, Any] | None) -> Path:
    """A short human-readable report: what was extracted, the results table, the probe's per-class accuracy."""
    lines = [f"# {title}", ""]
    if extraction:
        lines += [
            "## Features",
            "",
            f"- store: `{extraction['store']}`",
            f"- backbone: `{extraction['backbone']}` ({extraction['feature_dim']}-d pre-logits, L2-normalised)",
            f"- images: {extraction['rows']} extracted, {extraction['failed']} failed"
            + ("" if extraction["skipped"] else f", {extraction['images_per_second']:.1f} img/s"),
            "",
        ]
    lines += ["## Results (test split)", "", markdown_table(probe, knn), ""]
    if probe:
        lines += [
            f"Linear probe: C={probe['chosen_C']:g} chosen on the {probe['val_source']} "
            f"({probe['n_train']} train / {probe['n_val']} val / {probe['n_test']} test), refit on train+val.",
            "",
            "| class | probe accuracy % |",
            "|---|---:|",
            *[f"| {c} | {_pct(a)} |" for c, a in probe["test_per_class_accuracy"].items()],
            "",
        ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path
