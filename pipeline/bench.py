"""`bench`: several backbones x one data set -> a leaderboard (probe top-1, kNN top-1, feature dim, images/s).

Stores are cached per (data set, backbone) under OUT/stores, so a rerun only extracts what changed; the throughput
of a cached store is the one recorded when it was computed.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from pipeline.config import DINOV2_TEMPERATURE, ExtractConfig, KnnConfig, ProbeConfig
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


@dataclass
class LeaderboardRow:
    backbone: str
    probe_top1: float | None = None
    knn_top1: float | None = None
    probe_balanced_accuracy: float | None = None
    dim: int | None = None
    images_per_second: float | None = None
    cached: bool = False
    store: str = ""
    error: str = ""


def store_for(out_dir: str | Path, data_name: str, backbone: str) -> Path:
    """Where a data set's store for a backbone is cached under a bench or run output folder."""
    return Path(out_dir) / "stores" / f"{data_name}__{slug(backbone)}.h5"


def fill_row(row: LeaderboardRow, *, probe: dict | None, knn: dict | None, k: int) -> LeaderboardRow:
    """A leaderboard row's figures from its store and its probe / kNN results (either may be absent)."""
    from pipeline.store import read_attrs

    attrs = read_attrs(row.store)
    row.dim, row.images_per_second = int(attrs["feature_dim"]), attrs.get("images_per_second")
    if probe:
        row.probe_top1, row.probe_balanced_accuracy = probe["test_top1"], probe["test_balanced_accuracy"]
    if knn:
        row.knn_top1 = knn["by_k"][str(k)]["weighted"]["top1"]
    return row


def ranked(rows: list[LeaderboardRow]) -> list[LeaderboardRow]:
    """Best probe first (then kNN); failed backbones last."""
    return sorted(rows, key=lambda r: (r.probe_top1 is None, -(r.probe_top1 or 0.0), -(r.knn_top1 or 0.0)))


def run_bench(data: str | Path, backbones: list[str], out_dir: str | Path, *, extract: dict | None = None,
              head: str = "logreg", k: int = 20, temperature: float = DINOV2_TEMPERATURE,
              progress: bool = True) -> tuple[list[LeaderboardRow], Path, Path]:
    """Extract (or reuse), probe and kNN-classify `data` with each backbone; write leaderboard CSV and markdown.

    A backbone that fails (weights unavailable, say) gets a row with its error and the others still run.
    """
    from pipeline.extract import extract_to_store
    from pipeline.knn import run_knn
    from pipeline.probes import run_probe

    if not backbones:
        raise PipelineError("no backbones given; pass --backbones NAME[,NAME...]")
    out_dir = Path(out_dir)
    name = slug(Path(str(data).rstrip("/")).name or "data")
    rows = []
    for backbone in backbones:
        store = store_for(out_dir, name, backbone)
        row = LeaderboardRow(backbone, store=str(store))
        results = out_dir / "results" / store.stem
        try:
            extraction = extract_to_store(ExtractConfig(data=data, out=store, backbone=backbone, progress=progress,
                                                        **(extract or {})))
            row.cached = extraction.skipped
            probe, _ = run_probe(ProbeConfig(store=store, out=results.with_suffix(".probe.json"), head=head))
            knn, _ = run_knn(KnnConfig(store=store, out=results.with_suffix(".knn.json"), ks=(k,),
                                       temperature=temperature))
            fill_row(row, probe=probe, knn=knn, k=k)
        except PipelineError as exc:
            log.error("%s: %s", backbone, exc)
            row.error = str(exc)
        rows.append(row)
    rows = ranked(rows)
    csv_path, md_path = write_leaderboard(rows, out_dir / f"leaderboard_{name}", title=f"{name}: {head} probe, "
                                          f"kNN k={k} weighted (T={temperature:g})")
    return rows, csv_path, md_path


def leaderboard_markdown(rows: list[LeaderboardRow], *, title: str) -> str:
    from pipeline.report import pct

    lines = [f"# Leaderboard: {title}", "",
             "| rank | backbone | probe top-1 % | kNN top-1 % | probe balanced acc % | dim | images/s | note |",
             "|---:|---|---:|---:|---:|---:|---:|---|"]
    for rank, r in enumerate(rows, 1):
        note = f"error: {r.error}" if r.error else ("cached store" if r.cached else "")
        ips = "-" if r.images_per_second is None else f"{r.images_per_second:.1f}"
        lines.append(f"| {rank} | `{r.backbone}` | {pct(r.probe_top1)} | {pct(r.knn_top1)} | "
                     f"{pct(r.probe_balanced_accuracy)} | {r.dim or '-'} | {ips} | {note} |")
    return "\n".join(lines) + "\n"


def write_leaderboard(rows: list[LeaderboardRow], stem: Path, *, title: str) -> tuple[Path, Path]:
    from pipeline.report import write_atomic

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[f.name for f in fields(LeaderboardRow)])
    writer.writeheader()
    writer.writerows(asdict(r) for r in rows)
    csv_path = write_atomic(stem.with_suffix(".csv"), buffer.getvalue())
    md_path = write_atomic(stem.with_suffix(".md"), leaderboard_markdown(rows, title=title))
    return csv_path, md_path
