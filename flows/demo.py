"""The demo flow: digits as PNG files → embedded default backbone → HDF5 → linear probe + kNN + index → leaderboard
and report. It runs the same recipe as a configured run (`benchmark`), so it publishes the same artifacts (progress,
results table, report links, leaderboard), then adds the combined report."""

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact

from flows.pipeline_flows import _key, benchmark
from flows.tasks import prepare_digits, report
from pipeline.config import DEFAULT_BACKBONE, DEFAULT_KS
from pipeline.outputs import store_stem
from pipeline.recipe import store_for
from pipeline.run_config import DatasetSpec, ExtractSpec, IndexSpec, KnnSpec, ProbeSpec


@flow(name="demo", flow_run_name="demo-digits-{backbone}")
def demo_flow(data_dir: str = "data", backbone: str = DEFAULT_BACKBONE, per_class: int | None = None,
              batch_size: int = 64, workers: int | None = None, device: str = "auto", progress: bool = True) -> dict:
    """Run the whole slice on scikit-learn's digits and write results under `data_dir`."""
    logger = get_run_logger()
    data = Path(data_dir).resolve()
    name = "digits" if per_class is None else f"digits-{per_class}pc"
    images = prepare_digits(str(data / name), per_class)
    outcome = benchmark(DatasetSpec(name=name, data=images), [backbone], str(data),
                        ExtractSpec(batch_size=batch_size, workers=workers, device=device), ProbeSpec(),
                        KnnSpec(ks=list(DEFAULT_KS)), IndexSpec())
    extraction, evaluation = outcome["extraction"][0], outcome["evaluations"][0]
    logger.info(extraction["summary"])
    stem = data / "results" / store_stem(store_for(data, name, backbone))
    combined = report(str(stem) + ".results.json", str(stem) + ".report", title=f"Demo: {name} with {backbone}",
                      extraction=extraction, probe_result=evaluation["probe"], knn_result=evaluation["knn"])
    create_link_artifact(combined["html_uri"], link_text=Path(combined["html"]).name,
                         key=_key("report", name, "demo"), description="the demo's combined report")
    logger.info("results:\n%s", combined["table"])
    return {**combined, "extraction": extraction, "probe": evaluation["probe"], "knn": evaluation["knn"],
            "leaderboard_md": outcome["leaderboard_md"]}


if __name__ == "__main__":
    demo_flow()
