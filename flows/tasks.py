"""Prefect tasks wrapping library calls. They take paths and small configs and return paths and small dicts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.config import DEFAULT_CS, DEFAULT_KS, ExtractConfig, KnnConfig, ProbeConfig


@task(name="prepare-digits", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def prepare_digits(root: str, per_class: int | None = None) -> str:
    """Write the digits image folder (first run only). File I/O, so it may retry."""
    from pipeline.demo import write_digits_folder

    return str(write_digits_folder(root, per_class=per_class))


@task(name="extract", cache_policy=NO_CACHE)
def extract(data: str, out: str, *, backbone: str, batch_size: int = 64, workers: int | None = None,
            device: str = "auto", progress: bool = True) -> dict:
    """Extract features into a store; the store's own cache key makes a rerun a no-op."""
    from pipeline.extract import extract_to_store

    config = ExtractConfig(data=data, out=Path(out), backbone=backbone, batch_size=batch_size,
                           workers=workers, device=device, progress=progress)
    result = extract_to_store(config)
    summary = dataclasses.asdict(result)
    summary["failures"] = summary["failures"][:20]
    summary["summary"] = result.summary()
    return summary


@task(name="linear-probe", cache_policy=NO_CACHE)
def probe(store: str, out: str, Cs: tuple[float, ...] = DEFAULT_CS) -> dict:
    from pipeline.probes import run_probe

    result, _ = run_probe(ProbeConfig(store=Path(store), out=Path(out), grid=tuple(Cs), report=False))
    return result


@task(name="knn", cache_policy=NO_CACHE)
def knn(store: str, out: str, ks: tuple[int, ...] = DEFAULT_KS, temperature: float = 0.07) -> dict:
    from pipeline.knn import run_knn

    result, _ = run_knn(KnnConfig(store=Path(store), out=Path(out), ks=tuple(ks), temperature=temperature,
                                  report=False))
    return result


@task(name="report", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def report(results_path: str, report_stem: str, *, title: str, extraction: dict, probe_result: dict,
           knn_result: dict) -> dict:
    """Write the combined results JSON and the markdown + HTML report; return their paths and the console table."""
    from pipeline.report import format_table, save_json, write_report
    from pipeline.store import load_store

    save_json(results_path, {"extraction": extraction, "probe": probe_result, "knn": knn_result})
    md, page = write_report(report_stem, fs=load_store(extraction["store"]), title=title, extraction=extraction,
                            probe=probe_result, knn=knn_result)
    return {"results": results_path, "report": str(md), "html": str(page),
            "table": format_table(probe_result, knn_result)}
