"""`bench`: several backbones x one data set -> a leaderboard (probe top-1, kNN top-1, feature dim, images/s).

Stores are cached per (data set, backbone) under OUT/stores, so a rerun only extracts what changed; the throughput
of a cached store is the one recorded when it was computed. The leaderboard keeps the rows of backbones that were not
part of this run, with the date they were computed, unless asked to start afresh (`reset`).
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from pipeline.config import DINOV2_TEMPERATURE, KnnConfig, ProbeConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.outputs import check_output, owned_text, sibling, slug, store_stem, write_atomic
from pipeline.plan import ExtractConfig
from pipeline.report.render import LEGACY_MD, MD_MARK, Value, markdown_table, md_inline
from pipeline.report.tables import csv_text, unsafe_cell

log = logging.getLogger(__name__)


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


def data_name(data: str | Path) -> str:
    """The data set's name in file names: its folder or file name (every character kept, see `slug`)."""
    return slug(Path(str(data).rstrip("/")).name or "data")


def store_for(out_dir: str | Path, data_name: str, backbone: str) -> Path:
    """Where a data set's store for a backbone is cached under a bench or run output folder."""
    return Path(out_dir).resolve() / "stores" / f"{data_name}__{slug(backbone)}.h5"


def results_for(out_dir: str | Path, store: Path, kind: str) -> Path:
    """Results of one store under an output folder: OUT/results/STORE.KIND.json."""
    return Path(out_dir).resolve() / "results" / f"{store_stem(store)}.{kind}.json"


def fill_row(row: LeaderboardRow, *, probe: dict | None, knn: dict | None, k: int) -> LeaderboardRow:
    """A leaderboard row's figures from its store and its probe / kNN results (either may be absent)."""
    from pipeline.store.read import read_attrs

    attrs = read_attrs(row.store)
    row.dim, row.images_per_second = int(attrs["feature_dim"]), attrs.get("images_per_second")
    if probe:
        row.probe_top1, row.probe_balanced_accuracy = probe["test_top1"], probe["test_balanced_accuracy"]
    if knn:
        row.knn_top1 = knn["by_k"][str(k)]["weighted"]["top1"]
    row.date = row.date or today()
    return row


def ranked(rows: list[LeaderboardRow]) -> list[LeaderboardRow]:
    """Best probe first (then kNN); failed backbones last."""
    return sorted(rows, key=lambda r: (r.probe_top1 is None, -(r.probe_top1 or 0.0), -(r.knn_top1 or 0.0)))


def check_bench_args(backbones: list[str], *, k: int, extract: dict | None) -> None:
    """Everything that can be checked before the first extraction."""
    if not backbones:
        raise PipelineError("no backbones given; pass --backbones NAME[,NAME...]")
    if len(set(backbones)) != len(backbones):
        raise ConfigError(f"--backbones names a backbone twice: {backbones}")
    if k < 1:
        raise ConfigError(f"--k must be >= 1, got {k}")
    ExtractConfig.of(data="", out=Path("x.h5"), **(extract or {}))  # validates batch size, workers, ...


def run_bench(data: str | Path, backbones: list[str], out_dir: str | Path, *, extract: dict | None = None,
              head: str = "logreg", k: int = 20, temperature: float = DINOV2_TEMPERATURE,
              progress: bool = True, reset: bool = False) -> tuple[list[LeaderboardRow], Path, Path]:
    """Extract (or reuse), probe and kNN-classify `data` with each backbone; write leaderboard CSV and markdown.

    A backbone that fails (weights unavailable, say) gets a row with its error and the others still run.
    """
    from pipeline.engine.runner import extract_to_store
    from pipeline.evaluation.knn import run_knn
    from pipeline.evaluation.probes import run_probe

    check_bench_args(backbones, k=k, extract=extract)
    out_dir = Path(out_dir).resolve()
    name = data_name(data)
    stem = out_dir / f"leaderboard_{name}"
    check_leaderboard(stem)
    rows = []
    for backbone in backbones:
        store = store_for(out_dir, name, backbone)
        row = LeaderboardRow(backbone, store=str(store))
        try:
            extraction = extract_to_store(ExtractConfig.of(data=data, out=store, backbone=backbone, progress=progress,
                                                        **(extract or {})))
            row.cached = extraction.skipped
            probe, _ = run_probe(ProbeConfig(store=store, out=results_for(out_dir, store, "probe"), head=head))
            knn, _ = run_knn(KnnConfig(store=store, out=results_for(out_dir, store, "knn"), ks=(k,),
                                       temperature=temperature))
            fill_row(row, probe=probe, knn=knn, k=k)
        except PipelineError as exc:
            log.error("%s: %s", backbone, exc)
            row.error, row.date = str(exc), today()
        rows.append(row)
    rows, csv_path, md_path = write_leaderboard(rows, stem, title=bench_title(name, head, k, temperature), reset=reset)
    return rows, csv_path, md_path


def bench_title(name: str, head: str, k: int, temperature: float) -> str:
    return f"{name}: {head} probe, kNN k={k} weighted (T={temperature:g})"


# -- the leaderboard files -------------------------------------------------------------------------------------------

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
    here = {r.backbone for r in rows}
    kept = [] if reset else [r for r in read_leaderboard(csv_path) if r.backbone not in here]
    rows = ranked([*rows, *kept])
    write_atomic(csv_path, csv_text(CSV_FIELDS, [[asdict(r)[f] for f in CSV_FIELDS] for r in rows]))
    write_atomic(md_path, leaderboard_markdown(rows, title=title))
    return rows, csv_path, md_path

