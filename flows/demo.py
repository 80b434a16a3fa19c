"""The demo flow: digits as PNG files → embedded default backbone → HDF5 → linear probe + FAISS kNN → report."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from flows.tasks import extract, knn, prepare_digits, probe, report
from pipeline.bench import slug
from pipeline.config import DEFAULT_BACKBONE


@flow(name="demo", flow_run_name="demo-digits-{backbone}")
def demo_flow(data_dir: str = "data", backbone: str = DEFAULT_BACKBONE, per_class: int | None = None,
              batch_size: int = 64, workers: int | None = None, device: str = "auto", progress: bool = True) -> dict:
    """Run the whole slice on scikit-learn's digits and write results under `data_dir`."""
    logger = get_run_logger()
    data = Path(data_dir)
    name = "digits" if per_class is None else f"digits-{per_class}pc"
    stem = f"{name}__{slug(backbone)}"
    images = prepare_digits(str(data / name), per_class)
    store = str(data / "stores" / f"{stem}.h5")
    extraction = extract(images, store, backbone=backbone, batch_size=batch_size, workers=workers, device=device,
                         progress=progress)
    logger.info(extraction["summary"])
    results = data / "results"
    probe_result = probe(store, str(results / f"{stem}.probe.json"))
    knn_result = knn(store, str(results / f"{stem}.knn.json"))
    outcome = report(str(results / f"{stem}.results.json"), str(results / f"{stem}.report"),
                     title=f"Demo: {name} with {backbone}", extraction=extraction, probe_result=probe_result,
                     knn_result=knn_result)
    logger.info("results:\n%s", outcome["table"])
    return {**outcome, "extraction": extraction, "probe": probe_result, "knn": knn_result}


if __name__ == "__main__":
    demo_flow()
