"""The configured, scheduled pipeline: YAML config errors, the nightly scenario through `run` (first and incremental
run, artifacts and flow runs read back through Prefect's API), a scheduled deployment triggered once, and sharded
extraction on a Dask task runner with two local workers."""

from __future__ import annotations

import shutil
import textwrap

import numpy as np
import pytest

from pipeline.__main__ import main
from pipeline.errors import ConfigError
from pipeline.run_config import load_run_config
from tests.conftest import TINY_BACKBONE
from tests.helpers import write_image


def _config(tmp_path, images, **extra) -> str:
    text = textwrap.dedent(f"""\
        name: nightly-digits
        output_dir: out
        datasets:
          - name: digits
            data: {images}
        backbones: ["{TINY_BACKBONE}"]
        extract: {{workers: 0, random_init: true}}
        probe: {{grid: [1.0]}}
        knn: {{ks: [5]}}
        index: {{kind: auto}}
        schedule: {{cron: "0 2 * * *", timezone: Europe/Paris}}
        """)
    for key, value in extra.items():
        text += f"{key}: {value}\n"
    path = tmp_path / "nightly.yaml"
    path.write_text(text)
    return str(path)


def test_config_errors_name_the_field_and_the_choices(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndatasets: [{name: d}]\nbackbones: []\nprobe: {head: xgb}\nindex: {memory_budget: lots}\n"
                   "schedule: {cron: every night}\nextrakt: {}\n")
    with pytest.raises(ConfigError) as exc:
        load_run_config(bad)
    message = str(exc.value)
    assert "\n" not in message
    for needle in ("datasets.0.data: Field required", "backbones: List should have at least 1 item",
                   "probe.head: Input should be 'logreg', 'torch-logreg', 'svm', 'ridge' or 'mlp'",
                   "index.memory_budget", "schedule.cron: Value error, not a valid cron expression",
                   "extrakt: Extra inputs are not permitted"):
        assert needle in message
    (tmp_path / "broken.yaml").write_text("name: x\n  bad: [\n")
    with pytest.raises(ConfigError, match="not valid YAML at line 2"):
        load_run_config(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="no config file"):
        load_run_config(tmp_path / "none.yaml")


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    config = load_run_config(_config(tmp_path, "images"))
    assert config.datasets[0].data == str(tmp_path / "images") and config.output_dir == str(tmp_path / "out")


@pytest.mark.slow
def test_nightly_scenario_first_run_then_incremental(tmp_path, small_digits_root, prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.pipeline_flows import artifact_key
    from pipeline.outputs import slug

    images = shutil.copytree(small_digits_root, tmp_path / "images")
    config = _config(tmp_path, "images")
    assert main(["--quiet", "run", config]) == 0
    out = tmp_path / "out"
    assert "Leaderboard: digits" in (out / "leaderboard_digits.md").read_text()
    store = out / "stores" / f"digits__{TINY_BACKBONE.replace(':', '_')}.h5"
    assert store.is_file() and (out / "leaderboard_digits.csv").is_file()
    assert (out / "indexes" / store.stem / "index_infos.json").is_file()
    assert (out / "results" / f"{store.stem}.probe.html").is_file()

    from pipeline.store.read import read_attrs

    first_speed = read_attrs(store)["images_per_second"]
    for i in range(10):  # the collection grows overnight
        write_image(images / "train" / "3" / f"new_{i}.png", seed=100 + i, size=(8, 8), mode="L")
    from flows.pipeline_flows import run_pipeline

    outcome = run_pipeline(load_run_config(config))
    extraction = outcome["datasets"][0]["extraction"][0]
    assert extraction["computed"] == 10 and extraction["kept"] == 100 and extraction["rows"] == 110
    assert read_attrs(store)["images_per_second"] == first_speed  # 10 images say little about throughput
    from pipeline.index.build import load_index

    index = load_index(out / "indexes" / store.stem)
    assert index.infos.rows == 110 and index.infos.history[-1] == {**index.infos.history[-1], "action": "added",
                                                                    "rows": 10}

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        names = {r.name for r in runs}
        assert any(n.startswith("nightly-digits-") for n in names)
        assert {"benchmark-digits", "extract-digits-1-backbones"} <= names
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[
            "leaderboard-digits", "leaderboard-md-digits", artifact_key("progress", "digits", slug(TINY_BACKBONE))])))
        kinds = {a.key: a.type for a in artifacts}
        assert kinds["leaderboard-digits"] == "table" and kinds["leaderboard-md-digits"] == "markdown"
        progress = [a for a in artifacts if a.type == "progress"]
        assert progress and all(a.data == 100.0 for a in progress)
        table = [a for a in artifacts if a.key == "leaderboard-digits"][-1]
        assert TINY_BACKBONE in str(table.data)
        links = [a for a in client.read_artifacts() if (a.key or "").startswith("report-")]  # stored as markdown
        assert any(".probe.html" in str(a.data) and "file://" in str(a.data) for a in links)


@pytest.mark.slow
def test_scheduled_deployment_is_created_and_one_run_triggered(tmp_path, small_digits_root, prefect_harness):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.flow_engine import run_flow
    from prefect.schedules import Cron

    from flows.pipeline_flows import run_pipeline

    config = load_run_config(_config(tmp_path, str(small_digits_root)))
    deployment = run_pipeline.to_deployment(name=config.name, schedules=[Cron(config.schedule.cron,
                                                                               timezone=config.schedule.timezone)],
                                            parameters={"config": config.model_dump()})
    deployment_id = deployment.apply()
    with get_client(sync_client=True) as client:
        stored = client.read_deployment(deployment_id)
        assert stored.name == "nightly-digits"
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in stored.schedules] == [
            ("0 2 * * *", "Europe/Paris", True)]
    flow_run = run_deployment(f"run-pipeline/{config.name}", timeout=0)  # triggered now, not at 02:00
    assert flow_run.deployment_id == deployment_id
    state = run_flow(run_pipeline, flow_run=flow_run, parameters=flow_run.parameters, return_type="state")
    if asyncio.iscoroutine(state):
        state = asyncio.run(state)
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        finished = client.read_flow_run(flow_run.id)
    assert finished.state.is_completed() and finished.deployment_id == deployment_id
    assert (tmp_path / "out" / "leaderboard_digits.md").is_file()


@pytest.mark.slow
def test_sharded_extraction_on_two_dask_workers_equals_one_run(tmp_path, small_digits_root, prefect_harness):
    from flows.pipeline_flows import extract_features
    from pipeline.engine.parts import part_of, part_path
    from pipeline.engine.runner import extract_to_store
    from pipeline.plan import ExtractConfig
    from pipeline.recipe import store_for
    from pipeline.run_config import DatasetSpec, ExtractSpec
    from pipeline.store.read import load_store, read_attrs
    from pipeline.store.verify import verify_store

    dataset = DatasetSpec(name="digits", data=str(small_digits_root))
    spec = ExtractSpec(workers=0, random_init=True, shards=2)
    summaries = extract_features(dataset, [TINY_BACKBONE], str(tmp_path / "sharded"), spec)
    merged = store_for(tmp_path / "sharded", dataset.name, TINY_BACKBONE)
    assert summaries[0]["rows"] == 100 and summaries[0]["computed"] == 100 and not verify_store(merged)
    parts = [load_store(part_path(merged, k, 2)) for k in range(2)]
    assert sorted(len(p) for p in parts) != [0, 100]  # both workers had work
    assert all(part_of(i, 2) == k for k, p in enumerate(parts) for i in p.ids)

    single = tmp_path / "single.h5"
    extract_to_store(ExtractConfig.of(data=small_digits_root, out=single, backbone=TINY_BACKBONE, random_init=True,
                                   workers=0, progress=False))
    a, b = load_store(merged), load_store(single)
    assert list(a.ids) == list(b.ids) and np.array_equal(a.labels, b.labels) and list(a.splits) == list(b.splits)
    np.testing.assert_allclose(a.features, b.features, atol=1e-5)
    for key in ("cache_key", "data_fingerprint", "class_names", "num_images"):
        assert read_attrs(merged)[key] == read_attrs(single)[key]

    again = extract_features(dataset, [TINY_BACKBONE], str(tmp_path / "sharded"), spec)
    assert again[0]["skipped"] and again[0]["computed"] == 0  # a rerun is a no-op

    # a manifest of the same images: the rerun finds the merged store current before any part runs
    from tests.sources_data import write_manifest

    listed = write_manifest(tmp_path / "digits.csv", [
        {"path": str(p.relative_to(tmp_path)) if p.is_relative_to(tmp_path) else str(p), "label": p.parent.name,
         "split": p.parent.parent.name} for p in sorted(small_digits_root.glob("*/*/*.png"))])
    listed_set = DatasetSpec(name="digits-listed", data=str(listed))
    first = extract_features(listed_set, [TINY_BACKBONE], str(tmp_path / "sharded"), spec)
    stored = store_for(tmp_path / "sharded", listed_set.name, TINY_BACKBONE)
    assert first[0]["computed"] == 100 and not verify_store(stored)
    made = {k: part_path(stored, k, 2).stat().st_mtime_ns for k in range(2)}
    rerun = extract_features(listed_set, [TINY_BACKBONE], str(tmp_path / "sharded"), spec)
    assert rerun[0]["skipped"] and rerun[0]["rows"] == 100
    assert {k: part_path(stored, k, 2).stat().st_mtime_ns for k in range(2)} == made  # no part ran, none rewritten


@pytest.mark.slow
def test_a_failing_backbone_does_not_stop_the_others(tmp_path, small_digits_root, prefect_harness, capsys):
    path = _config(tmp_path, str(small_digits_root))
    text = open(path).read()
    open(path, "w").write(text.replace(f'["{TINY_BACKBONE}"]', f'["{TINY_BACKBONE}", "timm:resnet_18"]'))
    assert main(["--quiet", "run", path]) == 2  # the run ends failed, and says why in one line
    assert "1 of 2 backbones failed on digits: timm:resnet_18" in capsys.readouterr().err
    board = (tmp_path / "out" / "leaderboard_digits.md").read_text()  # published anyway, with the good backbone
    assert f"| 1 | {TINY_BACKBONE} |" in board and "error:" in board


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_workers(address: str, n: int, timeout: float = 90) -> None:
    from distributed import Client

    with Client(address, timeout=timeout) as client:
        client.wait_for_workers(n, timeout=timeout)


@pytest.mark.slow
def test_extract_on_a_real_dask_cluster_equals_a_local_run(tmp_path, small_digits_root):
    """A real `dask scheduler` and two `dask worker` processes on loopback: `extract --shards 2 --dask-address`
    runs one part on each, and the merged store equals a plain local extraction."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from pipeline.store.read import load_store, read_attrs

    dask = Path(sys.executable).with_name("dask")
    address = f"tcp://127.0.0.1:{_free_port()}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": tmp_path, "env": env}
    cluster = [subprocess.Popen([str(dask), "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                                 "--no-dashboard"], **quiet)]
    try:
        cluster += [subprocess.Popen([str(dask), "worker", address, "--nworkers", "1", "--nthreads", "1",
                                      "--no-dashboard", "--name", f"w{k}", "--local-directory",
                                      str(tmp_path / f"w{k}")], **quiet) for k in range(2)]
        _wait_for_workers(address, 2)  # the client retries until the scheduler listens
        tiny = ["--backbone", TINY_BACKBONE, "--random-init", "--workers", "0"]
        other = tmp_path / "elsewhere"
        other.mkdir()
        run = subprocess.run([sys.executable, "-m", "pipeline", "--quiet", "extract", "--data", str(small_digits_root),
                              "--out", "dask.h5", "--shards", "2", "--dask-address", address, *tiny], cwd=other,
                             env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr
        from distributed import Client

        with Client(address, timeout=30) as client:  # both workers ran a part
            ran = client.run(lambda dask_worker: dask_worker.state.executed_count)
        assert len(ran) == 2 and all(v >= 1 for v in ran.values()), ran
    finally:
        for p in cluster[::-1]:
            p.terminate()
        for p in cluster:
            p.wait(timeout=30)
    local = subprocess.run([sys.executable, "-m", "pipeline", "--quiet", "extract", "--data", str(small_digits_root),
                            "--out", "local.h5", *tiny], cwd=other, env=env, capture_output=True, text=True,
                           timeout=600)
    assert local.returncode == 0, local.stderr
    a, b = load_store(other / "dask.h5"), load_store(other / "local.h5")
    assert len(a) == 100 and list(a.ids) == list(b.ids) and np.array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.features, b.features, atol=1e-5)
    assert read_attrs(other / "dask.h5")["cache_key"] == read_attrs(other / "local.h5")["cache_key"]
    bad = subprocess.run([sys.executable, "-m", "pipeline", "extract", "--data", str(small_digits_root), "--out",
                          "x.h5", "--shards", "2", "--dask-address", address, *tiny], cwd=other, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "cannot reach the Dask scheduler" in bad.stderr
