"""The scheduled pipeline as Prefect flows: recipes of `pipeline` calls, configured by one YAML file.

They run the library's recipe (`pipeline.recipe`) with Prefect tasks and subflows as its steps, so each step shows in
the UI, and add only what is Prefect's: artifacts, retries on I/O errors, the run's final state.

- `extract_features`: a data set x backbones, one task per backbone; each store's cache key makes a rerun a no-op
  and an incremental run compute only new images. With `extract.shards > 1` each extraction is split into parts run
  by a Dask task runner (one worker per part, or per GPU) and merged into one store.
- `evaluate`: probe + kNN + FAISS index on one store, with the results table and report links as artifacts.
- `benchmark`: backbones x data set -> leaderboard (table and markdown artifacts, CSV and markdown files).
- `run_pipeline`: the top-level flow, one benchmark per data set of a `RunConfig`.
Tasks retry only on I/O errors (OSError); they pass paths and small dicts, never arrays.
"""

import contextvars
import dataclasses
import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from pipeline import recipe
from pipeline.errors import PipelineError
from pipeline.outputs import slug, store_stem
from pipeline.report.leaderboard import leaderboard_markdown
from pipeline.run_config import AuditSpec, DatasetSpec, ExtractSpec, IndexSpec, KnnSpec, ProbeSpec, RunConfig

DEFAULT_EXTRACT, DEFAULT_PROBE, DEFAULT_KNN, DEFAULT_INDEX = ExtractSpec(), ProbeSpec(), KnnSpec(), IndexSpec()
DEFAULT_AUDIT = AuditSpec()


def _retry_on_io(task_: Any, task_run: Any, state: Any) -> bool:
    """Retry a task only when it failed on I/O (a flaky disk or network share), never on bad input or bugs."""
    try:
        state.result()
    except OSError:
        return True
    except Exception:  # noqa: BLE001 - anything else is not worth retrying
        return False
    return False


def artifact_key(*parts: str) -> str:
    """An artifact key: lowercase letters, digits and dashes; when that loses characters of the names (`v1.0` and
    `v1-0`, case), a short hash of the exact names keeps keys of different stores apart."""
    text = "-".join(parts)
    key = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if key != text:
        key += "-" + hashlib.sha256(text.encode()).hexdigest()[:6]
    return key


def _param(name: str, field: str) -> str:
    value = flow_run.parameters.get(name)
    return str(value.get(field) if isinstance(value, dict) else getattr(value, field, value))


def _extract_run_name() -> str:
    return f"extract-{_param('dataset', 'name')}-{len(flow_run.parameters.get('backbones', []))}-backbones"


def _benchmark_run_name() -> str:
    return f"benchmark-{_param('dataset', 'name')}"


def _pipeline_run_name() -> str:
    """NAME-YYYYMMDD-HHMM of the run's scheduled time, in the schedule's time zone (UTC without a schedule)."""
    config = flow_run.parameters.get("config")
    schedule = config.get("schedule") if isinstance(config, dict) else getattr(config, "schedule", None)
    zone = (schedule.get("timezone") if isinstance(schedule, dict) else getattr(schedule, "timezone", None)) or "UTC"
    when = flow_run.scheduled_start_time.astimezone(ZoneInfo(zone))
    return f"{_param('config', 'name')}-{when.strftime('%Y%m%d-%H%M')}"


def _progress() -> bool:
    return sys.stderr.isatty() and os.environ.get("PREFECT_LOGGING_LEVEL") != "WARNING"


@task(name="extract", retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_on_io, cache_policy=NO_CACHE,
      task_run_name="extract-{backbone}")
def extract_store(dataset: DatasetSpec, backbone: str, output_dir: str, spec: ExtractSpec) -> dict:
    """One backbone over one data set into its store, with a progress artifact while it runs."""
    artifact = create_progress_artifact(0.0, key=artifact_key("progress", dataset.name, slug(backbone)),
                                        description=f"extracting {dataset.name} with {backbone}")
    context = contextvars.copy_context()  # the callback runs in the writer thread: give it this run's context
    last = [0.0]

    def on_progress(done: int, total: int) -> None:
        percent = 100.0 * done / max(total, 1)
        if percent - last[0] >= 5 or done == total:
            last[0] = percent
            context.run(update_progress_artifact, artifact, percent)

    summary = recipe.extract_one(dataset, backbone, output_dir, spec, progress=_progress(), on_progress=on_progress)
    update_progress_artifact(artifact, 100.0)
    return summary


@task(name="extract-part", retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_on_io, cache_policy=NO_CACHE,
      task_run_name="extract-{backbone}-part-{part}")
def extract_part_task(dataset: DatasetSpec, backbone: str, output_dir: str, spec: ExtractSpec, part: int) -> dict:
    from pipeline.engine.parts import extract_part

    config = recipe.extract_config(dataset, backbone, output_dir, spec, progress=_progress())
    return recipe.summarize(extract_part(config, part, spec.shards))


@task(name="merge-parts", retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_on_io, cache_policy=NO_CACHE)
def merge_task(dataset: DatasetSpec, backbone: str, output_dir: str, spec: ExtractSpec, parts: list[dict]) -> dict:
    from pipeline.engine.parts import merge_parts

    config = recipe.extract_config(dataset, backbone, output_dir, spec, progress=False)
    merged = recipe.summarize(merge_parts(config, spec.shards))
    merged["computed"] = sum(p["computed"] for p in parts)
    merged["skipped"] = all(p["skipped"] for p in parts) and merged["skipped"]
    return merged


def dask_runner(workers: int, address: str | None = None) -> Any:
    """A local Dask cluster with one single-threaded worker process per part (workers not daemonic, so an extraction
    inside one can still start its decode processes), or the existing cluster at `address`."""
    import dask
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    dask.config.set({"distributed.worker.daemon": False})
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


@task(name="check-current", cache_policy=NO_CACHE, task_run_name="check-{backbone}")
def check_current_task(dataset: DatasetSpec, backbone: str, output_dir: str, spec: ExtractSpec) -> dict | None:
    """The merged store's summary when it is current (a manifest or tar source, checked without listing it), else
    None."""
    from pipeline.engine.parts import current_merged

    found = current_merged(recipe.extract_config(dataset, backbone, output_dir, spec, progress=False))
    return None if found is None else recipe.summarize(found)


@flow(name="extract-sharded", flow_run_name="extract-sharded-{backbone}")
def extract_sharded(dataset: DatasetSpec, backbone: str, output_dir: str, spec: ExtractSpec) -> dict:
    """The parts of one extraction in parallel on the flow's task runner, then merged into its store; nothing when
    the store is found current first."""
    current = check_current_task(dataset, backbone, output_dir, spec)
    if current is not None:
        return current
    futures = [extract_part_task.submit(dataset, backbone, output_dir, spec, k) for k in range(spec.shards)]
    parts = [f.result() for f in futures]
    return merge_task(dataset, backbone, output_dir, spec, parts)


def _extract_backbone(dataset: DatasetSpec, backbone: str, output_dir: str, spec: ExtractSpec) -> dict:
    if spec.shards > 1 or spec.dask_address:
        runner = dask_runner(spec.shards, spec.dask_address)
        return extract_sharded.with_options(task_runner=runner)(dataset, backbone, output_dir, spec)
    return extract_store(dataset, backbone, output_dir, spec)


@flow(name="extract-features", flow_run_name=_extract_run_name)
def extract_features(dataset: DatasetSpec, backbones: list[str], output_dir: str,
                     extract: ExtractSpec = DEFAULT_EXTRACT) -> list[dict]:
    """Each backbone over the data set into its own store; computes only what the stores do not hold yet."""
    return recipe.extract_all(dataset, backbones, output_dir, extract, one=_extract_backbone,
                              logger=get_run_logger())


probe_task = task(name="probe", cache_policy=NO_CACHE)(recipe.probe_store)
knn_task = task(name="knn", cache_policy=NO_CACHE)(recipe.knn_store)
index_task = task(name="index", retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_on_io,
                  cache_policy=NO_CACHE)(recipe.index_store)
audit_task = task(name="audit", cache_policy=NO_CACHE)(recipe.audit_store)
TASK_STEPS = recipe.EvaluationSteps(probe=probe_task, knn=knn_task, index=index_task, audit=audit_task)


def _evaluate_run_name() -> str:
    return f"evaluate-{store_stem(str(flow_run.parameters.get('store')))}"


def _results_artifacts(name: str, outcome: dict) -> None:
    """The results table and index line as a markdown artifact, and a link to each HTML report."""
    from pipeline.report.blocks import HEADER, results_rows
    from pipeline.report.render import Value, markdown_table, md_inline

    lines = [f"# {md_inline(Value(name))}", "", markdown_table(HEADER, results_rows(outcome["probe"], outcome["knn"])),
             ""]
    if index := outcome["index"]:
        lines.append(md_inline((f"Index: {index['factory']} over {index['rows']} rows, recall@10 "
                                f"{index['recall_at_10']:.4f} (", Value(index["path"]), ").")))
    if audit := outcome.get("audit"):
        lines.append(md_inline(f"Audit: {audit['exact_pairs']} exact and {audit['near_pairs']} near duplicate pairs, "
                               f"{audit['leaked_test_rows']} of {audit['n_test']} test images with a copy in "
                               "train/val."))
    create_markdown_artifact("\n".join(lines), key=artifact_key("results", name), description=f"results for {name}")
    for result in (outcome["probe"], outcome["knn"], outcome.get("audit")):
        for report in (result or {}).get("report", []):
            if report.endswith(".html"):
                create_link_artifact(Path(report).resolve().as_uri(), link_text=Path(report).name,
                                     key=artifact_key("report", Path(report).stem))


@flow(name="evaluate", flow_run_name=_evaluate_run_name)
def evaluate(store: str, output_dir: str, probe: ProbeSpec = DEFAULT_PROBE, knn: KnnSpec = DEFAULT_KNN,
             index: IndexSpec = DEFAULT_INDEX, audit: AuditSpec = DEFAULT_AUDIT) -> dict:
    """Probe, kNN, index and audit on one store (one task each); the results table and links to the reports as
    artifacts."""
    outcome = recipe.evaluate_store(store, output_dir, probe, knn, index, audit, steps=TASK_STEPS)
    _results_artifacts(store_stem(store), outcome)
    return outcome


@flow(name="benchmark", flow_run_name=_benchmark_run_name)
def benchmark(dataset: DatasetSpec, backbones: list[str], output_dir: str, extract: ExtractSpec = DEFAULT_EXTRACT,
              probe: ProbeSpec = DEFAULT_PROBE, knn: KnnSpec = DEFAULT_KNN, index: IndexSpec = DEFAULT_INDEX,
              reset_leaderboard: bool = False, audit: AuditSpec = DEFAULT_AUDIT) -> dict:
    """The library's recipe (`pipeline.recipe.benchmark`) with a subflow for each step, then the leaderboard as
    table and markdown artifacts. A failed backbone fails the run, after the leaderboard is published."""
    outcome = recipe.benchmark(dataset, backbones, output_dir, extract=extract, probe=probe, knn=knn, index=index,
                               audit=audit, reset=reset_leaderboard,
                               steps=recipe.Steps(extract_all=extract_features, evaluate=evaluate))
    rows, title = outcome["rows"], outcome["title"]
    table = [dataclasses.asdict(r) for r in rows]
    create_table_artifact(table, key=artifact_key("leaderboard", dataset.name), description=title)
    create_markdown_artifact(leaderboard_markdown(rows, title=title, sections=outcome["sections"]),
                             key=artifact_key("leaderboard-md", dataset.name))
    get_run_logger().info("leaderboard: %s", outcome["leaderboard_md"])
    failed = [r for r in rows if r.error]
    if failed:  # the leaderboard is published; the run still ends failed, so the schedule's owner hears of it
        raise PipelineError(f"{len(failed)} of {len(rows)} backbones failed on {dataset.name}: "
                            + "; ".join(f"{r.backbone}: {r.error}" for r in failed))
    return {**outcome, "rows": table}


@flow(name="run-pipeline", flow_run_name=_pipeline_run_name)
def run_pipeline(config: RunConfig) -> dict:
    """The whole configured run: one benchmark per data set."""
    results = [benchmark(ds, config.backbones, config.output_dir, config.extract, config.probe, config.knn,
                         config.index, config.reset_leaderboard, config.audit) for ds in config.datasets]
    return {"name": config.name, "datasets": results}


def serve(config: RunConfig, *, config_path: str) -> None:
    """Serve `run_pipeline` with the config's cron schedule (blocks; Ctrl-C stops it)."""
    from prefect.schedules import Cron

    from pipeline.errors import ConfigError

    if config.schedule is None:
        raise ConfigError(f"{config_path} has no 'schedule' (e.g. schedule: {{cron: '0 2 * * *'}}); add one to serve")
    run_pipeline.serve(name=config.name, schedules=[Cron(config.schedule.cron, timezone=config.schedule.timezone)],
                       parameters={"config": config.model_dump()}, tags=["featpipe"],
                       description=f"featpipe run from {config_path}")
