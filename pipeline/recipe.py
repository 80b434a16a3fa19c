"""The benchmark recipe, written once: one data set x backbones → stores (incrementally) → evaluations (probe, kNN,
index) → leaderboard, and where each file of it goes under an output folder.

`bench`, the demo and the Prefect flows all run `benchmark`. The steps are injectable (`Steps`): the library runs
them as plain calls; a flow passes its tasks and subflows (same signatures), so that the UI shows each step, and
adds only what is Prefect's (artifacts, the run's final state).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import DINOV2_TEMPERATURE
from pipeline.errors import ConfigError, PipelineError
from pipeline.evaluation.intervals import DEFAULT_RESAMPLES
from pipeline.outputs import check_output, owned_json, sibling, slug, store_stem
from pipeline.plan import ExtractConfig
from pipeline.report.blocks import save_json
from pipeline.report.leaderboard import (
    LeaderboardRow,
    check_leaderboard,
    comparison_sections,
    fill_row,
    write_leaderboard,
)
from pipeline.run_config import AuditSpec, DatasetSpec, ExtractSpec, IndexSpec, KnnSpec, ProbeSpec

log = logging.getLogger(__name__)


# -- where things go under an output folder --------------------------------------------------------------------------

def data_name(data: str | Path) -> str:
    """The data set's name in file names: its folder or file name (every character kept, see `slug`)."""
    return slug(Path(str(data).rstrip("/")).name or "data")


def store_for(output_dir: str | Path, name: str, backbone: str) -> Path:
    """Where a data set's store for a backbone is cached: OUT/stores/NAME__BACKBONE.h5."""
    return Path(output_dir).resolve() / "stores" / f"{name}__{slug(backbone)}.h5"


def results_for(output_dir: str | Path, store: str | Path, kind: str) -> Path:
    """Results of one store: OUT/results/STORE.KIND.json."""
    return Path(output_dir).resolve() / "results" / f"{store_stem(store)}.{kind}.json"


def index_for(output_dir: str | Path, store: str | Path) -> Path:
    """The index folder of one store: OUT/indexes/STORE."""
    return Path(output_dir).resolve() / "indexes" / store_stem(store)


def report_stem(output_dir: str | Path, store: str | Path) -> Path:
    """The combined report of one store (extraction, probe and kNN on one page): OUT/results/STORE.report."""
    return Path(output_dir).resolve() / "results" / f"{store_stem(store)}.report"


def leaderboard_stem(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir).resolve() / f"leaderboard_{name}"


def leaderboard_title(name: str, head: str, k: int, temperature: float) -> str:
    return f"{name}: {head} probe, kNN k={k} weighted (T={temperature:g})"


def extract_config(dataset: DatasetSpec, backbone: str, output_dir: str | Path, spec: ExtractSpec, *,
                   progress: bool = True) -> ExtractConfig:
    """The one extraction spec, from a data set and extract section (their fields are the spec's)."""
    return ExtractConfig.of(out=store_for(output_dir, dataset.name, backbone), backbone=backbone, progress=progress,
                            **dataset.model_dump(exclude={"name"}),
                            **spec.model_dump(exclude={"shards", "dask_address"}))


# -- the steps, as plain library calls -------------------------------------------------------------------------------

def extract_one(dataset: DatasetSpec, backbone: str, output_dir: str, spec: ExtractSpec, *, progress: bool = True,
                on_progress: Callable[[int, int], None] | None = None) -> dict:
    """One backbone over the data set into its store; a summary small enough for a Prefect task to return."""
    from pipeline.engine.runner import extract_to_store

    config = extract_config(dataset, backbone, output_dir, spec, progress=progress)
    return summarize(extract_to_store(config, on_progress=on_progress))


def summarize(result: Any) -> dict:
    import dataclasses

    summary = dataclasses.asdict(result)
    summary["failures"] = summary["failures"][:20]
    summary["summary"] = result.summary()
    return summary


def failed_extraction(store: str | Path, backbone: str, exc: Exception) -> dict:
    return {"store": str(store), "backbone": backbone, "skipped": False, "computed": 0, "error": str(exc),
            "summary": f"{backbone} failed: {exc}"}


def extract_all(dataset: DatasetSpec, backbones: list[str], output_dir: str, spec: ExtractSpec, *,
                progress: bool = True, one: Callable[..., dict] | None = None,
                logger: logging.Logger | logging.LoggerAdapter = log) -> list[dict]:
    """Each backbone in turn (`one` extracts one: `extract_one` by default, a flow's task or subflow); one
    backbone's problem (weights missing, say) does not stop the others."""
    summaries = []
    for backbone in backbones:
        try:
            summary = (one(dataset, backbone, output_dir, spec) if one else
                       extract_one(dataset, backbone, output_dir, spec, progress=progress))
        except PipelineError as exc:
            logger.error("%s: %s", backbone, exc)
            summary = failed_extraction(store_for(output_dir, dataset.name, backbone), backbone, exc)
        logger.info(summary["summary"])
        summaries.append(summary)
    return summaries


def _bytes(size: str | None) -> int | None:
    from pipeline.index.plan import parse_memory_size

    return None if size is None else parse_memory_size(size)


def probe_store(store: str, output_dir: str, spec: ProbeSpec) -> dict:
    from pipeline.config import ProbeConfig
    from pipeline.evaluation.probes import run_probe

    result, _ = run_probe(ProbeConfig(store=Path(store), out=results_for(output_dir, store, "probe"), head=spec.head,
                                      grid=tuple(spec.grid) if spec.grid else None, resamples=spec.resamples,
                                      val_seeds=tuple(spec.val_seeds), max_memory=_bytes(spec.max_memory)))
    return result


def knn_store(store: str, output_dir: str, spec: KnnSpec) -> dict:
    from pipeline.config import KnnConfig
    from pipeline.evaluation.knn import run_knn

    result, _ = run_knn(KnnConfig(store=Path(store), out=results_for(output_dir, store, "knn"), ks=tuple(spec.ks),
                                  temperature=spec.temperature, resamples=spec.resamples,
                                  max_memory=_bytes(spec.max_memory)))
    result.pop("examples", None)  # for the report's image grid only: not worth passing around
    return result


def index_store(store: str, output_dir: str, spec: IndexSpec) -> dict:
    """Add the store's new rows to its index, or build it (the first time, or when the store was replaced)."""
    import dataclasses

    from pipeline.index.build import refresh_index
    from pipeline.index.plan import parse_memory_size

    out = index_for(output_dir, store)
    infos = refresh_index(store, out, kind=spec.kind, memory_budget=parse_memory_size(spec.memory_budget),
                          target_recall=spec.target_recall)
    return dataclasses.asdict(infos) | {"path": str(out)}


def audit_store(store: str, output_dir: str, spec: AuditSpec, probe: dict | None = None,
                knn: dict | None = None) -> dict:
    """Duplicates and leakage of one store; the test figures without leaked images come from the probe's and kNN's
    per-image results (nothing is fitted again)."""
    from pipeline.config import AuditConfig
    from pipeline.evaluation.audit_run import run_audit

    k = max(knn["ks"]) if knn else AuditConfig.knn_k
    result, _ = run_audit(AuditConfig(store=Path(store), out=results_for(output_dir, store, "audit"),
                                      threshold=spec.threshold, k=spec.k, fit=False, knn_k=k,
                                      max_memory=_bytes(spec.max_memory)), probe=probe, knn=knn)
    for name in ("cross_split", "hints", "leaked_test_ids"):  # in the results file: not worth passing around
        result.pop(name, None)
    return result


@dataclass(frozen=True)
class EvaluationSteps:
    probe: Callable[[str, str, ProbeSpec], dict] = probe_store
    knn: Callable[[str, str, KnnSpec], dict] = knn_store
    index: Callable[[str, str, IndexSpec], dict] = index_store
    audit: Callable[..., dict] = audit_store


def evaluate_store(store: str, output_dir: str, probe: ProbeSpec, knn: KnnSpec, index: IndexSpec,
                   audit: AuditSpec | None = None, *, steps: EvaluationSteps = EvaluationSteps()) -> dict:
    """Probe, kNN, index and audit one store (each when enabled)."""
    audit = audit or AuditSpec()
    outcome = {"store": store,
               "probe": steps.probe(store, output_dir, probe) if probe.enabled else None,
               "knn": steps.knn(store, output_dir, knn) if knn.enabled else None,
               "index": steps.index(store, output_dir, index) if index.enabled else None}
    outcome["audit"] = (steps.audit(store, output_dir, audit, outcome["probe"], outcome["knn"]) if audit.enabled
                        else None)
    return outcome


@dataclass(frozen=True)
class Steps:
    """How `benchmark` runs its two steps (a flow passes a subflow for each)."""

    extract_all: Callable[..., list[dict]] = extract_all
    evaluate: Callable[..., dict] = evaluate_store


def write_combined_report(output_dir: str, store: str, *, title: str, extraction: dict, probe: dict,
                          knn: dict, audit: dict | None = None) -> dict:
    """One store's extraction, probe, kNN and audit results as one JSON file (OUT/results/STORE.results.json) and
    one markdown + HTML report; their paths and the console table."""
    from pipeline.report.blocks import format_table, save_json, write_report
    from pipeline.report.render import Value
    from pipeline.store.read import load_store

    results = results_for(output_dir, store, "results")
    save_json(results, {"extraction": extraction, "probe": probe, "knn": knn, "audit": audit,
                        "featpipe": {"kind": "demo-results", "version": 1}})
    md, page = write_report(report_stem(output_dir, store), fs=load_store(store), title=(Value(title),),
                            extraction=extraction, probe=probe, knn=knn, audit=audit)
    return {"results": str(results), "report": str(md), "html": str(page), "table": format_table(probe, knn),
            "html_uri": Path(page).resolve().as_uri()}


def check_backbones(backbones: list[str]) -> None:
    if not backbones:
        raise PipelineError("no backbones given; pass --backbones NAME[,NAME...]")
    if len(set(backbones)) != len(backbones):
        raise ConfigError(f"backbones are named twice: {backbones}")


def benchmark(dataset: DatasetSpec, backbones: list[str], output_dir: str | Path, *, extract: ExtractSpec,
              probe: ProbeSpec, knn: KnnSpec, index: IndexSpec, audit: AuditSpec | None = None, reset: bool = False,
              steps: Steps = Steps()) -> dict:
    """Backbones x one data set: extract (incrementally), evaluate each store, write the leaderboard. A backbone
    that fails gets a row with its error and the others still run; everything is checked before the first step."""
    check_backbones(backbones)
    output_dir = str(Path(output_dir).resolve())
    stem = leaderboard_stem(output_dir, dataset.name)
    check_leaderboard(stem)
    comparisons_path = check_output(sibling(stem, ".comparisons.json"), owned=owned_json("bench-comparisons"),
                                    what="the comparisons file")
    summaries = steps.extract_all(dataset, backbones, output_dir, extract)
    rows, evaluations, k = [], {}, max(knn.ks)
    for backbone, summary in zip(backbones, summaries, strict=True):
        row = LeaderboardRow(backbone, cached=summary["skipped"], store=summary["store"],
                             error=summary.get("error", ""))
        if not row.error:
            try:
                evaluations[backbone] = steps.evaluate(summary["store"], output_dir, probe, knn, index,
                                                       audit or AuditSpec())
                fill_row(row, probe=evaluations[backbone]["probe"], knn=evaluations[backbone]["knn"], k=k)
            except PipelineError as exc:
                log.error("%s: %s", backbone, exc)
                row.error = str(exc)
        rows.append(row)
    comparisons = compare_backbones(evaluations, k=k, resamples=probe.resamples)
    title = leaderboard_title(dataset.name, probe.head, k, knn.temperature)
    sections = comparison_sections(comparisons["pairs"], comparisons["agreement"])
    rows, csv_path, md_path = write_leaderboard(rows, stem, title=title, reset=reset, pairs=comparisons["pairs"],
                                                sections=sections)
    save_json(comparisons_path, {**comparisons, "featpipe": {"kind": "bench-comparisons", "version": 1}})
    return {"dataset": dataset.name, "title": title, "rows": rows, "leaderboard_csv": str(csv_path),
            "leaderboard_md": str(md_path), "comparisons": str(comparisons_path), "sections": sections,
            "extraction": summaries, "evaluations": list(evaluations.values())}


def compare_backbones(evaluations: dict[str, dict], *, k: int, resamples: int) -> dict[str, Any]:
    """This run's backbones against each other: paired tests of probe top-1 and of kNN top-1 (weighted vote at
    `k`) on the same test images, and the agreement of their features (linear CKA, mutual k-NN)."""
    from pipeline.evaluation.compare import agreement, pairwise
    from pipeline.store.read import load_store

    probes = {b: (e["probe"] or {}).get("test_correct") for b, e in evaluations.items()}
    knns = {b: (e["knn"] or {}).get("by_k", {}).get(str(k), {}).get("weighted", {}).get("correct")
            for b, e in evaluations.items()}
    pairs = pairwise(probes, what="probe top-1", resamples=resamples or DEFAULT_RESAMPLES)
    pairs += pairwise(knns, what=f"kNN top-1 (k={k} weighted)", resamples=resamples or DEFAULT_RESAMPLES)
    feature_sets = {}
    if len(evaluations) > 1:
        for backbone, e in evaluations.items():
            fs = load_store(e["store"])
            feature_sets[backbone] = (fs.features, fs.row_keys())
    return {"pairs": pairs, "agreement": agreement(feature_sets) if feature_sets else None}


def run_bench(data: str | Path, backbones: list[str], output_dir: str | Path, *, extract: dict | None = None,
              head: str = "logreg", k: int = 20, temperature: float = DINOV2_TEMPERATURE, progress: bool = True,
              reset: bool = False, resamples: int = DEFAULT_RESAMPLES) -> tuple[list[LeaderboardRow], Path, Path]:
    """`bench`: the recipe on one data set given by path, with the probe and one kNN k, no index; returns the
    ranked leaderboard rows and its two files."""
    from functools import partial

    from pydantic import ValidationError

    from pipeline.run_config import validation_message

    try:
        dataset = DatasetSpec(name=data_name(data), data=str(data))
        specs = {"extract": ExtractSpec(**(extract or {})), "probe": ProbeSpec(head=head, resamples=resamples),
                 "knn": KnnSpec(ks=[k], temperature=temperature, resamples=resamples),
                 "index": IndexSpec(enabled=False), "audit": AuditSpec()}
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, "bench")) from None
    outcome = benchmark(dataset, backbones, output_dir, reset=reset,
                        steps=Steps(extract_all=partial(extract_all, progress=progress)), **specs)
    return outcome["rows"], Path(outcome["leaderboard_csv"]), Path(outcome["leaderboard_md"])
