"""Leaderboards: one row per backbone on a data set (probe top-1 and kNN top-1 with their 95% intervals, the paired
test against the row ranked above, balanced accuracy, dim, images/s, the date the figures were computed), as CSV and
markdown files that accumulate across runs: rows of backbones that were not part of a run are kept with their date,
unless the board is reset. The markdown adds this run's paired comparisons and the agreement of the features."""

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
    probe_top1_low: float | None = None  # 95% interval (bootstrap over test images)
    probe_top1_high: float | None = None
    vs_above: str = ""  # the paired test against the row ranked above: "tie (p=...)" or "distinct (p=...)"
    knn_top1: float | None = None
    knn_top1_low: float | None = None
    knn_top1_high: float | None = None
    probe_balanced_accuracy: float | None = None
    dim: int | None = None
    images_per_second: float | None = None
    cached: bool = False
    store: str = ""
    error: str = ""
    date: str = ""  # when these figures were computed (UTC day)


CSV_FIELDS = [f.name for f in fields(LeaderboardRow)]
FLOAT_FIELDS = ("probe_top1", "knn_top1", "probe_balanced_accuracy", "images_per_second", "probe_top1_low",
                "probe_top1_high", "knn_top1_low", "knn_top1_high")


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
        row.probe_top1_low, row.probe_top1_high = (probe.get("test_intervals") or {}).get("top1", (None, None))
    if knn:
        weighted = knn["by_k"][str(k)]["weighted"]
        row.knn_top1 = weighted["top1"]
        row.knn_top1_low, row.knn_top1_high = (weighted.get("intervals") or {}).get("top1", (None, None))
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
    if field_name in FLOAT_FIELDS:
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


LEADERBOARD_HEADER = ("rank", "backbone", "probe top-1 % [95% interval]", "vs rank above", "kNN top-1 % [95% interval]",
                      "probe balanced acc %", "dim", "images/s", "date", "note")
ALIGN = "rlrlrrrrll"


def _leaderboard_cells(rows: list[LeaderboardRow]) -> list[tuple[str, ...]]:
    from pipeline.report.blocks import pct, pct_interval

    table = []
    for rank, r in enumerate(rows, 1):
        note = f"error: {r.error}" if r.error else ("cached store" if r.cached else "")
        ips = "-" if r.images_per_second is None else f"{r.images_per_second:.1f}"
        table.append((str(rank), r.backbone, pct_interval(r.probe_top1, [r.probe_top1_low, r.probe_top1_high]),
                      r.vs_above or "-", pct_interval(r.knn_top1, [r.knn_top1_low, r.knn_top1_high]),
                      pct(r.probe_balanced_accuracy), str(r.dim or "-"), ips, r.date or "-", note))
    return table


def mark_ties(rows: list[LeaderboardRow], pairs: list[dict]) -> None:
    """Each ranked row's paired test against the row above it (probe top-1, Holm-adjusted McNemar p): `tie` when
    the two cannot be told apart at 0.05, `distinct` when they can; empty when the two were not compared (a row
    kept from an earlier run, a failed backbone)."""
    by_pair = {frozenset((p["a"], p["b"])): p for p in pairs if p["what"] == "probe top-1"}
    for above, row in zip(rows, rows[1:], strict=False):
        pair = by_pair.get(frozenset((above.backbone, row.backbone)))
        row.vs_above = "" if pair is None else f"{'distinct' if pair['significant'] else 'tie'} " \
                                               f"(p={pair['holm_p']:.3g})"
    if rows:
        rows[0].vs_above = ""


def leaderboard_markdown(rows: list[LeaderboardRow], *, title: str, sections: str = "") -> str:
    """The leaderboard as markdown (every cell literal text), with the comparison sections after it."""
    body = markdown_table(LEADERBOARD_HEADER, _leaderboard_cells(rows), align=ALIGN)
    return f"{MD_MARK}\n\n# Leaderboard: {md_inline(Value(title))}\n\n{body}\n" + (f"\n{sections}" if sections else "")


def leaderboard_text(rows: list[LeaderboardRow], *, title: str) -> str:
    """The leaderboard for the console."""
    from pipeline.report.blocks import text_table

    return f"Leaderboard: {title}\n" + text_table(LEADERBOARD_HEADER, _leaderboard_cells(rows), align=ALIGN)


def write_leaderboard(rows: list[LeaderboardRow], stem: Path, *, title: str, reset: bool = False,
                      overwrite: bool = False, pairs: list[dict] | None = None,
                      sections: str = "") -> tuple[list[LeaderboardRow], Path, Path]:
    """Write the leaderboard CSV and markdown: this run's rows, plus (unless `reset`) the earlier rows of backbones
    not in this run, kept with their dates; each row marked against the one above from this run's paired tests.
    Returns the ranked rows written."""
    csv_path, md_path = check_leaderboard(stem, overwrite=overwrite)
    for row in rows:
        row.date = row.date or today()
    here = {r.backbone for r in rows}
    kept = [] if reset else [r for r in read_leaderboard(csv_path) if r.backbone not in here]
    rows = ranked([*rows, *kept])
    mark_ties(rows, pairs or [])
    write_atomic(csv_path, csv_text(CSV_FIELDS, [[asdict(r)[f] for f in CSV_FIELDS] for r in rows]))
    write_atomic(md_path, leaderboard_markdown(rows, title=title, sections=sections))
    return rows, csv_path, md_path



def comparison_sections(pairs: list[dict], agreement: dict | None) -> str:
    """Markdown after the leaderboard: every paired comparison of this run, and the agreement matrices."""
    from pipeline.report.blocks import pct_interval

    parts = []
    if pairs:
        rows = [(p["what"], p["a"], p["b"], pct_interval(p["difference"], p["interval"]),
                 f"{p['a_only']}/{p['b_only']}", f"{p['mcnemar_p']:.3g}", f"{p['holm_p']:.3g}", _verdict(p))
                for p in pairs]
        parts.append("## Paired comparisons\n\nOn the same test images: A minus B in top-1 with its paired bootstrap "
                     "interval, the images only A / only B got right, McNemar's exact p-value and the same adjusted "
                     "for all the comparisons of this run (Holm). Distinct: adjusted p < 0.05.\n\n"
                     + markdown_table(("figure", "A", "B", "A - B, points [95% interval]", "only A / only B",
                                       "McNemar p", "Holm p", "verdict"), rows, align="lllrrrrl"))
    if agreement and len(agreement["names"]) > 1:
        names = agreement["names"]
        k = agreement["k"]
        for title, key in (("Linear CKA", "linear_cka"), (f"Mutual {k}-NN overlap", f"mutual_knn_at_{k}")):
            rows = [(a, *("-" if v is None or v != v else f"{v:.3f}" for v in agreement[key][i]))
                    for i, a in enumerate(names)]
            parts.append(f"## {title}\n\nHow alike the backbones' features are on the same images "
                         f"({agreement['method']}; 1 = the same up to rotation and scale).\n\n"
                         + markdown_table(("backbone", *names), rows))
    return "\n\n".join(parts) + ("\n" if parts else "")


def _verdict(pair: dict) -> str:
    from pipeline.evaluation.compare import verdict

    return verdict(pair)
