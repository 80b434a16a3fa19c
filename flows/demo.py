"""The demo flow: digits as PNG files → embedded default backbone → HDF5 → linear probe + kNN + index → leaderboard
and report. It runs the same recipe as a configured run (`benchmark`), so it publishes the same artifacts (progress,
results table, report links, leaderboard), then adds the combined report."""

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact

from flows.pipeline_flows import artifact_key, benchmark
from flows.tasks import prepare_digits, report
from pipeline.config import DEFAULT_BACKBONE, DEFAULT_KS
from pipeline.demo import digits_folder
from pipeline.run_config import DatasetSpec, ExtractSpec, IndexSpec, KnnSpec, ProbeSpec


@flow(name="demo", flow_run_name="demo-digits-{backbone}")
def demo_flow(data_dir: str = "data", backbone: str = DEFAULT_BACKBONE, per_class: int | None = None,
              batch_size: int = 64, workers: int | None = None, device: str = "auto", progress: bool = True) -> dict:
    """Run the whole slice on scikit-learn's digits and write results under `data_dir`."""
    logger = get_run_logger()
    name, images = digits_folder(data_dir, per_class)
    output_dir = str(images.parent)
    outcome = benchmark(DatasetSpec(name=name, data=prepare_digits(str(images), per_class)), [backbone], output_dir,
                        ExtractSpec(batch_size=batch_size, workers=workers, device=device),
                        ProbeSpec(val_seeds=[0, 1, 2]), KnnSpec(ks=list(DEFAULT_KS)), IndexSpec())
    extraction, evaluation = outcome["extraction"][0], outcome["evaluations"][0]
    logger.info(extraction["summary"])
    combined = report(output_dir, extraction["store"], title=f"Demo: {name} with {backbone}", extraction=extraction,
                      probe=evaluation["probe"], knn=evaluation["knn"], audit=evaluation["audit"])
    create_link_artifact(combined["html_uri"], link_text=Path(combined["html"]).name,
                         key=artifact_key("report", name, "demo"), description="the demo's combined report")
    logger.info("results:\n%s", combined["table"])
    return {**combined, "extraction": extraction, "probe": evaluation["probe"], "knn": evaluation["knn"],
            "leaderboard_md": outcome["leaderboard_md"]}


if __name__ == "__main__":
    demo_flow()
