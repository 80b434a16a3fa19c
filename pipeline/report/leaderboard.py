"""Leaderboards: one row per backbone on a data set (probe top-1, kNN top-1, balanced accuracy, dim, images/s, the
date the figures were computed), as CSV and markdown files that accumulate across runs: rows of backbones that were
not part of a run are kept with their date, unless the board is reset."""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.outputs import check_output, owned_text, sibling, write_atomic
from pipeline.report.render import LEGACY_MD, MD_MARK, Value, markdown_table, md_inline
from pipeline.report.tables import csv_text, unsafe_cell


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
    date: str = ""  # when these figures were computed (UTC day)


CSV_FIELDS = [f.name for f in fields(LeaderboardRow)]


def today() -> str:
    return dt.datetime.now(dt.timezone.utc).date().isoformat()


def fill_row(row: LeaderboardRow, *, probe: dict | None, knn: dict | None, k: int) -> LeaderboardRow:
    """A leaderboard row's figures from its store and its probe / kNN results (either may be absent)."""
    from pipeline.plan import Provenance
    from pipeline.store.read import read_attrs

    attrs = read_attrs(row.store)
    row.dim, row.images_per_second = Provenance.from_attrs(attrs).feature_dim, attrs.get("images_per_second")
    if probe:
        row.probe_top1, row.probe_balanced_accuracy = probe["test_top1"], probe["test_balanced_accuracy"]
    if knn:
        row.knn_top1 = knn["by_k"][str(k)]["weighted"]["top1"]
    row.date = row.date or today()
    return row


def ranked(rows: list[LeaderboardRow]) -> list[LeaderboardRow]:
    """Best probe first (then kNN); failed backbones last."""
    return sorted(rows, key=lambda r: (r.probe_top1 is None, -(r.probe_top1 or 0.0), -(r.knn_top1 or 0.0)))


def _owned_csv(path: Path) -> bool:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return "backbone" in header and set(header) <= set(CSV_FIELDS)


def check_leaderboard(stem: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """The leaderboard's two files may be (re)written: missing, or leaderboards this tool wrote."""
    return (check_output(sibling(stem, ".csv"), owned=_owned_csv, overwrite=overwrite, what="the leaderboard"),
            check_output(sibling(stem, ".md"), owned=owned_text(MD_MARK, *LEGACY_MD), overwrite=overwrite,
                         what="the leaderboard"))


def _parse(field_name: str, text: str) -> object:
    text = unsafe_cell(text)
    if field_name in ("probe_top1", "knn_top1", "probe_balanced_accuracy", "images_per_second"):
        return float(text) if text else None
    if field_name == "dim":
        return int(float(text)) if text else None
    if field_name == "cached":
        return text == "True"
    return text


def read_leaderboard(path: Path) -> list[LeaderboardRow]:
    """The rows of a leaderboard CSV written by this tool ([] when there is none)."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        try:
            return [LeaderboardRow(**{k: _parse(k, v or "") for k, v in row.items() if k in CSV_FIELDS})
                    for row in csv.DictReader(fh)]
        except (ValueError, TypeError) as exc:
            raise PipelineError(f"{path} is not a leaderboard this tool can update ({exc}); pass --reset-leaderboard "
                                "to start it afresh") from None


LEADERBOARD_HEADER = ("rank", "backbone", "probe top-1 %", "kNN top-1 %", "probe balanced acc %", "dim", "images/s",
                      "date", "note")


def _leaderboard_cells(rows: list[LeaderboardRow]) -> list[tuple[str, ...]]:
    from pipeline.report.blocks import pct

    table = []
    for rank, r in enumerate(rows, 1):
        note = f"error: {r.error}" if r.error else ("cached store" if r.cached else "")
        ips = "-" if r.images_per_second is None else f"{r.images_per_second:.1f}"
        table.append((str(rank), r.backbone, pct(r.probe_top1), pct(r.knn_top1), pct(r.probe_balanced_accuracy),
                      str(r.dim or "-"), ips, r.date or "-", note))
    return table


def leaderboard_markdown(rows: list[LeaderboardRow], *, title: str) -> str:
    """The leaderboard as markdown (every cell literal text)."""
    body = markdown_table(LEADERBOARD_HEADER, _leaderboard_cells(rows), align="rlrrrrrll")
    return f"{MD_MARK}\n\n# Leaderboard: {md_inline(Value(title))}\n\n{body}\n"


def leaderboard_text(rows: list[LeaderboardRow], *, title: str) -> str:
    """The leaderboard for the console."""
    from pipeline.report.blocks import text_table

    return f"Leaderboard: {title}\n" + text_table(LEADERBOARD_HEADER, _leaderboard_cells(rows), align="rlrrrrrll")


def write_leaderboard(rows: list[LeaderboardRow], stem: Path, *, title: str, reset: bool = False,
                      overwrite: bool = False) -> tuple[list[LeaderboardRow], Path, Path]:
    """Write the leaderboard CSV and markdown: this run's rows, plus (unless `reset`) the earlier rows of backbones
    not in this run, kept with their dates. Returns the ranked rows written."""
    csv_path, md_path = check_leaderboard(stem, overwrite=overwrite)
    for row in rows:
        row.date = row.date or today()
    here = {r.backbone for r in rows}
    kept = [] if reset else [r for r in read_leaderboard(csv_path) if r.backbone not in here]
    rows = ranked([*rows, *kept])
    write_atomic(csv_path, csv_text(CSV_FIELDS, [[asdict(r)[f] for f in CSV_FIELDS] for r in rows]))
    write_atomic(md_path, leaderboard_markdown(rows, title=title))
    return rows, csv_path, md_path

