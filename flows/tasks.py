"""Prefect tasks of the demo that are not part of the pipeline recipe: writing the digits, and the combined report.
They take paths and small configs and return paths and small dicts."""

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE


@task(name="prepare-digits", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def prepare_digits(root: str, per_class: int | None = None) -> str:
    """Write the digits image folder (first run only). File I/O, so it may retry."""
    from pipeline.demo import write_digits_folder

    return str(write_digits_folder(root, per_class=per_class))


@task(name="report", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def report(results_path: str, report_stem: str, *, title: str, extraction: dict, probe_result: dict,
           knn_result: dict) -> dict:
    """Write the combined results JSON and the markdown + HTML report; return their paths and the console table."""
    from pipeline.report.blocks import format_table, save_json, write_report
    from pipeline.report.render import Value
    from pipeline.store.read import load_store

    save_json(results_path, {"extraction": extraction, "probe": probe_result, "knn": knn_result,
                             "featpipe": {"kind": "demo-results", "version": 1}})
    md, page = write_report(report_stem, fs=load_store(extraction["store"]), title=(Value(title),),
                            extraction=extraction, probe=probe_result, knn=knn_result)
    return {"results": results_path, "report": str(md), "html": str(page),
            "table": format_table(probe_result, knn_result), "html_uri": Path(page).resolve().as_uri()}
