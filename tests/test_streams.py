"""Streamed shards (`pipe:COMMAND`, http URLs) as WebDataset names them: the same store as the local shards, resume
after SIGKILL and incremental runs by key and member stamp, failures of the stream named, and `pipe:` refused where
it would run someone else's command (a run config, a store's record)."""

from __future__ import annotations

import functools
import http.server
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConfigError, PipelineError
from pipeline.plan import Provenance
from pipeline.run_config import load_run_config
from pipeline.sources.lookup import source_for
from pipeline.sources.stream import shard_name, spool_root
from pipeline.store.read import load_store, read_failed
from tests.conftest import TINY_BACKBONE
from tests.sources_data import digit_images, png_bytes, webdataset_members, write_shard

EXTRACT = ["extract", "--backbone", TINY_BACKBONE, "--random-init", "--workers", "0", "--batch-size", "16"]


@pytest.fixture()
def spool(tmp_path, monkeypatch):
    where = tmp_path / "spool"
    monkeypatch.setenv("FEATPIPE_SPOOL", str(where))
    return where


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Three WebDataset shards of real digits: train-000, train-001 (one key without an image) and test-000."""
    root = tmp_path_factory.mktemp("wds")
    images, labels = digit_images(360)
    for name, rows in (("train-000", range(0, 150)), ("train-001", range(150, 260)), ("test-000", range(260, 360))):
        members = webdataset_members([f"{name}/{i:04d}" for i in rows], [png_bytes(images[i]) for i in rows],
                                     [int(labels[i]) for i in rows])
        if name == "train-001":
            members.append(("train-001/orphan.cls", b"3"))
        write_shard(root / f"{name}.tar", members)
    return root


def _cli(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "--quiet", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})


def _same(a: Path, b: Path) -> None:
    x, y = load_store(a), load_store(b)
    order = {i: n for n, i in enumerate(y.ids)}
    assert sorted(x.ids) == sorted(y.ids)
    rows = [order[i] for i in x.ids]
    np.testing.assert_allclose(x.features, y.features[rows], atol=1e-5)
    assert x.labels.tolist() == y.labels[rows].tolist() and x.splits.tolist() == y.splits[rows].tolist()
    assert x.class_names == y.class_names and read_failed(a) == read_failed(b)


def test_pipe_shards_give_the_local_shards_store_and_run_incrementally(tmp_path, shards, spool):
    work = tmp_path / "elsewhere"
    work.mkdir()
    local = _cli(work, *EXTRACT, "--data", str(shards / "{train-000,train-001,test-000}.tar"), "--out", "local.h5")
    assert local.returncode == 0, local.stderr
    pattern = f"pipe:cat {shards}/{{train-000,train-001,test-000}}.tar"
    proc = _cli(work, *EXTRACT, "--data", pattern, "--out", "piped.h5", env={"FEATPIPE_SPOOL": str(spool)})
    assert proc.returncode == 0, proc.stderr
    _same(work / "piped.h5", work / "local.h5")
    made = Provenance.from_store(work / "piped.h5")
    assert made.data == pattern and "streamed" in made.source_description
    assert read_failed(work / "piped.h5") == {"train-001/orphan": read_failed(work / "local.h5")["train-001/orphan"]}
    assert (load_store(work / "piped.h5").splits == "test").sum() == 100  # split hint from the shard names
    # nothing changed: the streams are read again, every row kept, nothing computed
    again = _cli(work, "-v", *EXTRACT, "--data", pattern, "--out", "piped.h5", env={"FEATPIPE_SPOOL": str(spool)})
    assert again.returncode == 0 and re.search(r"\b0 extracted\b|up to date", again.stdout + again.stderr), \
        again.stdout + again.stderr
    # a store's record is never re-run (search, report pictures)
    with pytest.raises(PipelineError, match="streamed"):
        source_for(made)


def test_a_killed_piped_extraction_resumes_to_the_uninterrupted_store(tmp_path, shards, spool):
    pattern = f"pipe:cat {shards}/{{train-000,train-001,test-000}}.tar"
    reference = tmp_path / "reference.h5"
    assert _cli(tmp_path, *EXTRACT, "--data", pattern, "--out", str(reference)).returncode == 0
    out = tmp_path / "killed.h5"
    argv = [sys.executable, "-m", "pipeline", "-v", *EXTRACT, "--data", pattern, "--out", str(out)]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stderr:
        found = re.search(r"committed (\d+) of (\d+) rows", line)
        if found and int(found.group(1)) >= 100:
            proc.send_signal(signal.SIGKILL)
            break
    proc.stderr.close()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the extraction ended before it could be killed"
    assert not out.exists()
    resumed = _cli(tmp_path, "-v", *EXTRACT, "--data", pattern, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"(\d+) resumed", resumed.stdout + resumed.stderr), resumed.stdout + resumed.stderr
    assert int(re.search(r"(\d+) resumed", resumed.stdout + resumed.stderr).group(1)) >= 100
    _same(out, reference)


def test_http_shards_give_the_local_shards_store(tmp_path, shards, spool):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{{train-000,test-000}}.tar"
        proc = _cli(tmp_path, *EXTRACT, "--data", url, "--out", "http.h5")
        assert proc.returncode == 0, proc.stderr
        local = _cli(tmp_path, *EXTRACT, "--data", str(shards / "{train-000,test-000}.tar"), "--out", "local.h5")
        assert local.returncode == 0, local.stderr
        _same(tmp_path / "http.h5", tmp_path / "local.h5")
        missing = _cli(tmp_path, *EXTRACT, "--data", url.replace("test-000", "nope"), "--out", "x.h5")
        _one_line_error(missing, "cannot be downloaded", "nope.tar")
    finally:
        server.shutdown()


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_a_failing_or_broken_stream_is_one_line_and_nothing_is_written(tmp_path, shards, spool):
    failing = _cli(tmp_path, *EXTRACT, "--data", "pipe:echo oops >&2; exit 3", "--out", "x.h5")
    _one_line_error(failing, "exited with status 3", "oops")
    cut = tmp_path / "cut.tar"
    cut.write_bytes((shards / "train-000.tar").read_bytes()[:5000])
    broken = _cli(tmp_path, *EXTRACT, "--data", f"pipe:cat {cut}", "--out", "x.h5")
    _one_line_error(broken, "not a readable tar")
    assert not (tmp_path / "x.h5").exists()


def test_a_run_config_may_not_run_a_command(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("name: evil\ndatasets:\n  - name: d\n    data: 'pipe:touch /tmp/owned; cat x.tar'\n"
                      "backbones: [efficientnet_lite0]\n")
    with pytest.raises(ConfigError, match="runs a shell command"):
        load_run_config(config)
    ok = tmp_path / "ok.yaml"
    ok.write_text("name: fine\ndatasets:\n  - name: d\n    data: 'https://example.org/train-{000..003}.tar'\n"
                  "backbones: [efficientnet_lite0]\n")
    assert load_run_config(ok).datasets[0].data == "https://example.org/train-{000..003}.tar"


def test_shard_names_keep_the_split_hint():
    assert shard_name("pipe:aws s3 cp s3://b/train-007.tar -", 0) == "train-007.tar"
    assert shard_name("https://host/data/test-001.tar?sig=x", 3) == "test-001.tar"
    assert shard_name("pipe:curl -s http://h/get?id=9", 4) == "shard-00004.tar"
    assert spool_root().name.startswith("featpipe-spool") or os.environ.get("FEATPIPE_SPOOL")


def test_shards_written_by_webdataset_stream_as_webdataset_reads_them(tmp_path, spool):
    import braceexpand
    import webdataset as wds

    from pipeline.sources.tar import expand_braces

    images, labels = digit_images(60)
    for n in range(2):
        with wds.TarWriter(str(tmp_path / f"train-{n:03d}.tar")) as sink:  # the real writer
            for i in range(n * 30, n * 30 + 30):
                sink.write({"__key__": f"sample{i:05d}", "png": png_bytes(images[i]), "cls": int(labels[i])})
    pattern = str(tmp_path / "train-{000..001}.tar")
    assert expand_braces(pattern) == list(braceexpand.braceexpand(pattern))
    proc = _cli(tmp_path, *EXTRACT, "--data", f"pipe:cat {pattern}", "--out", "w.h5", "--split", "stratified")
    assert proc.returncode == 0, proc.stderr
    fs = load_store(tmp_path / "w.h5")
    seen = {s["__key__"]: int(s["cls"]) for s in wds.WebDataset(f"pipe:cat {pattern}", shardshuffle=False).decode()}
    assert dict(zip(fs.ids.tolist(), (int(fs.class_names[y]) for y in fs.labels), strict=True)) == seen
