"""Scheduled runs the way users run them: a real `prefect server start`, `python -m pipeline serve CONFIG` from
another working directory, and the run the server's scheduler creates, executed by Prefect's runner in a spawned
subprocess. Plus the fast reproduction of that subprocess: each flow pickled and its parameters validated in a
`spawn` child (where postponed annotations once left the pydantic parameter model unresolvable)."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from datetime import timezone
from pathlib import Path

import pytest

from tests.conftest import TINY_BACKBONE


def _validate_in_spawned_child(blob: bytes, parameters: dict, queue: multiprocessing.Queue) -> None:
    import cloudpickle

    try:
        cloudpickle.loads(blob).validate_parameters(parameters)
        queue.put("ok")
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        queue.put(f"{type(exc).__name__}: {exc}")


def test_flows_survive_the_runners_pickling_into_a_spawned_process(tmp_path):
    import cloudpickle

    from flows.demo import demo_flow
    from flows.pipeline_flows import benchmark, evaluate, extract_features, run_pipeline
    from pipeline.run_config import DatasetSpec, RunConfig

    config = RunConfig(name="x", datasets=[{"name": "d", "data": str(tmp_path)}], backbones=[TINY_BACKBONE])
    dataset = DatasetSpec(name="d", data=str(tmp_path)).model_dump()
    cases = [(run_pipeline, {"config": config.model_dump()}),
             (benchmark, {"dataset": dataset, "backbones": ["a"], "output_dir": str(tmp_path)}),
             (extract_features, {"dataset": dataset, "backbones": ["a"], "output_dir": str(tmp_path)}),
             (evaluate, {"store": "s.h5", "output_dir": str(tmp_path)}),
             (demo_flow, {"data_dir": str(tmp_path)})]
    context = multiprocessing.get_context("spawn")
    for flow_, parameters in cases:
        queue = context.Queue()
        child = context.Process(target=_validate_in_spawned_child, args=(cloudpickle.dumps(flow_), parameters, queue))
        child.start()
        child.join(120)
        assert queue.get(timeout=5) == "ok", flow_.name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_health(url: str, server: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"prefect server exited: {log.read_text()[-2000:]}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"prefect server did not answer in {timeout} s: {log.read_text()[-2000:]}")


def _stop(process: subprocess.Popen) -> None:
    """Stop a process and everything it started, by its process group."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _scheduled_runs(client, deployment_name: str) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    return client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment_name])))


@pytest.mark.slow
def test_a_served_schedule_runs_to_completion_on_a_real_server(tmp_path, small_digits_root):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_LOGGING_LEVEL", None)
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    (work / "nightly.yaml").write_text(textwrap.dedent(f"""\
        name: minutely-digits
        output_dir: out
        datasets:
          - name: digits
            data: {small_digits_root}
        backbones: ["{TINY_BACKBONE}"]
        extract: {{workers: 0, random_init: true}}
        probe: {{grid: [1.0]}}
        knn: {{ks: [5]}}
        schedule: {{cron: "* * * * *"}}
        """))
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=open(server_log, "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    served = None
    try:
        _wait_for_health(api, server, server_log)
        # `serve` from another working directory, with the config given by a relative path
        served = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "../work/nightly.yaml"], cwd=elsewhere,
                                  env=env, stdout=open(serve_log, "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        deadline, finished = time.monotonic() + 300, None
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            while finished is None and time.monotonic() < deadline:
                assert served.poll() is None, f"serve exited: {serve_log.read_text()[-3000:]}"
                for run in _scheduled_runs(client, "minutely-digits"):
                    assert run.state_name not in ("Failed", "Crashed"), \
                        f"{run.name} {run.state_name}: {run.state.message}\n{serve_log.read_text()[-3000:]}"
                    if run.auto_scheduled and run.state_name == "Completed":
                        finished = run
                time.sleep(2)
            assert finished is not None, f"no scheduled run completed in time:\n{serve_log.read_text()[-3000:]}"
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[finished.id])))
            artifacts = client.read_artifacts()
        expected = finished.expected_start_time.astimezone(timezone.utc)
        assert finished.name == f"minutely-digits-{expected:%Y%m%d-%H%M}"  # named after its scheduled time
        assert re.fullmatch(r"minutely-digits-\d{8}-\d{4}", finished.name)
        assert logs and any("run-pipeline" in log.message or "Finished" in log.message for log in logs)
        kinds = {a.key: a.type for a in artifacts if a.key}
        assert kinds.get("leaderboard-digits") == "table" and kinds.get("leaderboard-md-digits") == "markdown"
        assert any(k.startswith("results-digits") for k in kinds)
        results_md = next(a.data for a in artifacts if a.key and a.key.startswith("results-digits"))
        assert "Audit: " in results_md and "test images with a copy in" in results_md  # the audit step ran
        assert "\\[" in results_md  # the results table carries its intervals
        assert any("audit" in k for k in kinds if k.startswith("report-"))  # and links the audit's report
        audit = json.loads(next((work / "out" / "results").glob("*.audit.json")).read_text())
        assert audit["featpipe"]["kind"] == "audit-results" and audit["n_test"] == 50
        board = work / "out" / "leaderboard_digits.md"  # relative to the config file, not to where serve ran
        assert board.is_file() and TINY_BACKBONE in board.read_text()
        assert not (elsewhere / "out").exists()
        timeline = {"created": finished.created, "scheduled": finished.expected_start_time,
                    "started": finished.start_time, "completed": finished.end_time}
        print("served run timeline:", json.dumps({k: str(v) for k, v in timeline.items()}))
        assert finished.created <= finished.start_time <= finished.end_time
    finally:
        if served is not None:
            _stop(served)
        _stop(server)
