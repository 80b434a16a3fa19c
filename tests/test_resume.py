"""Crash safety end to end: real extractions killed with SIGKILL and resumed, incremental runs over changed folders,
concurrent writers and a failing disk. Real model (tiny, random-init), real images, real HDF5 files."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.engine.runner import extract_to_store
from pipeline.plan import ExtractConfig
from pipeline.store.read import load_store
from pipeline.store.reuse import Listing
from pipeline.store.schema import partial_path, shards_dir
from pipeline.store.verify import verify_store
from pipeline.store.writer import StoreWriter
from tests.conftest import TINY_BACKBONE

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "pipeline", "-v", "extract", "--backbone", TINY_BACKBONE, "--random-init",
       "--workers", "0", "--batch-size", "16"]


def _extract(root, out, tiny, **kwargs):
    return extract_to_store(ExtractConfig.of(data=root, out=out, workers=0, batch_size=16, progress=False, **kwargs),
                            backbone=tiny)


def _by_id(fs) -> dict[str, np.ndarray]:
    return {i: fs.features[k] for k, i in enumerate(fs.ids)}


def _assert_same_store(path, reference) -> None:
    fs = load_store(path)
    got, want = _by_id(fs), _by_id(reference)
    assert set(got) == set(want) and len(fs) == len(reference)
    ids = sorted(want)
    np.testing.assert_allclose(np.stack([got[i] for i in ids]), np.stack([want[i] for i in ids]), atol=1e-5)
    order = {i: k for k, i in enumerate(reference.ids)}
    assert [reference.labels[order[i]] for i in fs.ids] == list(fs.labels)
    assert verify_store(path) == []


def _start(argv):
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _kill_after(argv, rows: int) -> int:
    """Run an extraction and SIGKILL it once it has committed at least `rows` rows; return the rows it reported."""
    proc = _start(argv)
    committed = -1
    for line in proc.stderr:  # text mode turns tqdm's carriage returns into line ends
        found = re.search(r"committed (\d+) of (\d+) rows", line)
        if found and int(found.group(1)) >= rows:
            committed = int(found.group(1))
            proc.send_signal(signal.SIGKILL)
            break
    proc.stderr.close()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the extraction ended before it could be killed ({proc.returncode})"
    return committed


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_root, tiny):
    """An uninterrupted run over the 1,797 digits."""
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    _extract(digits_root, out, tiny)
    return load_store(out)


@pytest.mark.parametrize("kill_at", [1, 700, 1500])
def test_sigkill_at_any_point_then_rerun_gives_the_uninterrupted_store(tmp_path, digits_root, tiny, reference,
                                                                       kill_at):
    out = tmp_path / "s.h5"
    committed = _kill_after([*CLI, "--data", str(digits_root), "--out", str(out)], kill_at)
    assert not out.exists() and partial_path(out).exists()  # an incomplete store never looks complete
    result = _extract(digits_root, out, tiny)
    assert result.resumed >= committed - 16  # at most the batch in flight is lost
    assert result.resumed + result.computed == len(reference)
    _assert_same_store(out, reference)
    assert not partial_path(out).exists()


def test_sigkill_during_a_sharded_run_loses_at_most_the_shard_in_progress(tmp_path, digits_root, tiny, reference):
    out = tmp_path / "s.h5"
    _kill_after([*CLI, "--data", str(digits_root), "--out", str(out), "--shard-rows", "256"], 1100)
    shards = sorted(shards_dir(out).glob("*.h5"))
    assert len(shards) >= 5 and not out.exists()
    result = _extract(digits_root, out, tiny, shard_rows=256)
    assert result.resumed >= 1024 and result.resumed + result.computed == len(reference)
    _assert_same_store(out, reference)
    assert load_store(out).attrs["layout"] == "sharded"


def test_sigkill_during_an_incremental_run_leaves_the_old_store_readable(tmp_path, digits_root, tiny, reference):
    root = tmp_path / "digits"
    shutil.copytree(digits_root, root, ignore=shutil.ignore_patterns("[5-9]"))  # classes 0-4 first
    out = tmp_path / "s.h5"
    first = _extract(root, out, tiny)
    shutil.rmtree(root)
    shutil.copytree(digits_root, root)  # classes 5-9 arrive (the copy also gives every file a new mtime)
    _kill_after([*CLI, "--data", str(root), "--out", str(out)], first.rows + 200)
    old = load_store(out)  # the last complete store is untouched and readable
    assert len(old) == first.rows
    result = _extract(root, out, tiny)
    assert result.resumed + result.kept + result.computed == len(reference)
    assert result.resumed >= first.rows + 200 - 16  # the killed run's copied and new rows were reused
    _assert_same_store(out, reference)


def _rewrite(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(path)


def test_incremental_run_computes_only_added_and_changed_images(tmp_path, small_digits_root, tiny):
    root = tmp_path / "digits"
    shutil.copytree(small_digits_root, root)
    out = tmp_path / "s.h5"
    _extract(root, out, tiny)
    before = _by_id(load_store(out))
    files = sorted(p for p in root.rglob("*.png"))
    removed, changed, touched = files[0], files[1], files[2]
    removed.unlink()
    _rewrite(changed, seed=1)
    os.utime(touched, ns=(10**18, 10**18))  # new mtime, same bytes
    for k in range(3):
        _rewrite(root / "train" / "3" / f"new_{k}.png", seed=10 + k)
    calls = []
    hook = next(tiny.model.net.children()).register_forward_hook(lambda m, i, o: calls.append(len(o)))
    try:
        result = _extract(root, out, tiny)
    finally:
        hook.remove()
    assert (result.computed, result.kept, result.resumed) == (4, 98, 0)
    assert sum(calls) == 4  # only the 3 added and the 1 changed image went through the model
    after = _by_id(load_store(out))
    rel = {p: p.relative_to(root).as_posix() for p in (removed, changed, touched)}
    assert rel[removed] not in after
    untouched = set(before) - {rel[removed], rel[changed]}
    for i in untouched:  # kept rows are the very same bytes
        assert after[i].tobytes() == before[i].tobytes()
    assert not np.allclose(after[rel[changed]], before[rel[changed]])
    clean = tmp_path / "clean.h5"
    _extract(root, clean, tiny)
    _assert_same_store(out, load_store(clean))
    assert _extract(root, out, tiny).skipped  # and now it is current


def test_a_new_class_shifts_labels_of_kept_rows(tmp_path, tiny):
    from tests.helpers import make_folder

    root = make_folder(tmp_path / "imgs", {"b": 3, "c": 3})
    out = tmp_path / "s.h5"
    _extract(root, out, tiny)
    make_folder(root, {"a": 2}, start_seed=50)  # sorts first: b and c move to labels 1 and 2
    result = _extract(root, out, tiny)
    assert result.computed == 2 and result.kept == 6
    fs = load_store(out)
    assert fs.class_names == ["a", "b", "c"]
    assert {i.split("/")[0]: int(lab) for i, lab in zip(fs.ids, fs.labels, strict=True)} == {"a": 0, "b": 1, "c": 2}


def test_two_concurrent_runs_do_not_corrupt_the_store(tmp_path, digits_root, reference):
    out = tmp_path / "s.h5"
    argv = [*CLI, "--data", str(digits_root), "--out", str(out)]
    first, second = _start(argv), _start(argv)
    errors = [p.communicate()[1] for p in (first, second)]
    codes = sorted(p.returncode for p in (first, second))
    assert codes in ([0, 0], [0, 2]), errors
    if codes == [0, 2]:
        loser = errors[[first.returncode, second.returncode].index(2)]
        assert "error: another process is writing" in loser and "Traceback" not in loser
    _assert_same_store(out, reference)


def test_a_waiting_run_starts_when_the_lock_is_released(tmp_path, small_digits_root):
    out = tmp_path / "s.h5"
    listing = Listing(ids=["x"], labels=np.zeros(1, dtype=np.int64), splits=["train"], stamps=np.zeros((1, 2)))
    with StoreWriter(out, listing=listing, dim=4, attrs={"cache_key": "other"}):
        blocked = subprocess.run([*CLI, "--data", str(small_digits_root), "--out", str(out)], cwd=REPO,
                                 capture_output=True, text=True)
        assert blocked.returncode == 2 and "another process is writing" in blocked.stderr
        waiting = _start([*CLI, "--data", str(small_digits_root), "--out", str(out), "--wait", "120"])
        for line in waiting.stderr:
            if "waiting up to" in line:
                break
    _, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert verify_store(out) == []


ATTRS = {"cache_key": "k", "class_names": '["a"]', "backbone": "b", "weights": "w", "preprocessing": "{}"}
FAILING_DISK = textwrap.dedent("""
    import resource, signal, sys
    import numpy as np
    ATTRS = ATTRS_HERE
    from pipeline.errors import StoreError
    from pipeline.store.reuse import Listing
    from pipeline.store.writer import StoreWriter
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (3 << 20, 3 << 20))
    n, dim = 2000, 1024
    x = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    listing = Listing(ids=[f"i{k:05d}" for k in range(n)], labels=np.zeros(n, dtype=np.int64), splits=["train"] * n,
                      stamps=np.zeros((n, 2), dtype=np.int64))
    try:
        with StoreWriter(sys.argv[1], listing=listing, dim=dim, attrs=ATTRS) as w:
            todo = w.prepare()
            for s in range(0, n, 64):
                w.write(todo[s:s + 64], x[s:s + 64], ["0" * 32] * len(todo[s:s + 64]))
            w.finish()
    except StoreError as exc:
        print("StoreError:", exc)
        sys.exit(3)
""").replace("ATTRS_HERE", repr(ATTRS))


def test_a_failing_disk_stops_with_a_clear_message_and_the_committed_rows_survive(tmp_path):
    out = tmp_path / "s.h5"
    run = subprocess.run([sys.executable, "-c", FAILING_DISK, str(out)], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 3, run.stderr
    assert "File too large" in run.stdout and "run the same command again to resume" in run.stdout
    n, dim = 2000, 1024
    x = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    listing = Listing(ids=[f"i{k:05d}" for k in range(n)], labels=np.zeros(n, dtype=np.int64), splits=["train"] * n,
                      stamps=np.zeros((n, 2), dtype=np.int64))
    with StoreWriter(out, listing=listing, dim=dim, attrs=ATTRS) as w:
        todo = w.prepare()
        assert w.resumed >= 256  # what was committed before the failure is still there
        w.write(todo, x[todo], ["0" * 32] * len(todo))
        w.finish()
    fs = load_store(out)
    np.testing.assert_array_equal(fs.features[np.argsort(fs.ids)], x)
    assert verify_store(out) == []


def _descendants(pid: int) -> set[int]:
    """Live descendants of a process, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def test_decode_workers_do_not_outlive_a_killed_extraction(tmp_path, digits_root):
    out = tmp_path / "s.h5"
    proc = _start([*CLI[:-4], "--workers", "1", "--batch-size", "16", "--data", str(digits_root), "--out", str(out)])
    for line in proc.stderr:
        if "committed" in line:
            break
    helpers = _descendants(proc.pid)  # the forkserver and its decode worker
    assert helpers, "expected decode worker processes"
    proc.send_signal(signal.SIGKILL)
    proc.stderr.close()
    proc.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in helpers):
        time.sleep(0.5)
    assert not any(Path(f"/proc/{p}").exists() for p in helpers), "decode workers outlived the killed extraction"
