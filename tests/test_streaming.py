"""Stores beyond the memory budget: the compact columns, the streamed exact kNN (the same figures as the in-memory
one), the approximate kNN with its measured gap, the streamed probe (within half a point of the full-batch head),
the refine / OPQ index kinds, and the one-line refusals. Run through the CLI from another working directory, on
synthetic stores written by the real writer (learnable, not separable)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.evaluation.audit import neighbour_table
from pipeline.evaluation.audit_stream import streamed_neighbour_table
from pipeline.evaluation.knn import knn_classify
from pipeline.evaluation.knn_stream import knn_streamed
from pipeline.evaluation.stream_probe import hash_holdout
from pipeline.store.budget import block_rows, fits, resolve_max_memory, store_budget
from pipeline.store.columns import hash_keys, read_text, scan_store
from pipeline.store.read import load_store, read_columns
from pipeline.store.synthetic import write_synthetic

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stream") / "s.h5"
    write_synthetic(path, 12000, dim=32, classes=12, noise=1.2, dtype="float16", shard_rows=5000)
    return path


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _strip(d):
    skip = {"seconds", "protocol", "streamed", "report", "examples"}
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if k not in skip}
    if isinstance(d, list):
        return [_strip(v) for v in d]
    return round(d, 9) if isinstance(d, float) else d


def test_the_columns_are_compact_and_agree_with_the_loaded_store(store):
    ss, fs = scan_store(store), load_store(store)
    assert len(ss) == len(fs) and ss.labels.dtype == np.int32 and ss.codes.dtype == np.int8
    assert np.array_equal(ss.labels, fs.labels) and np.array_equal(ss.mask("test"), fs.mask("test"))
    assert ss.keys.dtype == np.uint64 and len(np.unique(ss.keys)) == len(ss)
    keys, ids = ss.row_keys_of(np.array([5, 1, 9000]))
    assert [k.decode() for k in keys] == [fs.row_keys()[i] for i in (5, 1, 9000)]
    assert [i.decode() for i in ids] == [fs.ids[i] for i in (5, 1, 9000)]
    assert np.allclose(ss.features_of(np.array([9000, 3])), fs.features[[9000, 3]])
    assert hash_keys(np.array([b"00000000000000ff" + b"0" * 16]))[0] == 255


def test_streamed_exact_knn_gives_the_in_memory_figures(store):
    fs, ss = load_store(store), scan_store(store)
    whole = knn_classify(fs, ks=(1, 10), resamples=50)
    streamed = knn_streamed(ss, ks=(1, 10), resamples=50, max_memory=1 << 20)
    assert streamed["streamed"]["block_rows"] < len(ss) // 4  # really several query blocks and bank chunks
    assert _strip(streamed) == _strip(whole)
    assert 0.3 < streamed["by_k"]["10"]["weighted"]["top1"] < 0.99  # learnable, not trivially separable


def test_streamed_leave_one_out_gives_the_in_memory_figures(store):
    fs, ss = load_store(store), scan_store(store)
    whole = knn_classify(fs, ks=(5,), loo=True, resamples=0)
    streamed = knn_streamed(ss, ks=(5,), loo=True, resamples=0, max_memory=1 << 20)
    assert _strip(streamed) == _strip(whole)


def test_the_knn_command_streams_beyond_max_memory_and_records_the_approximate_gap(store, tmp_path):
    run = _cli(tmp_path, "knn", "--store", str(store), "--k", "10", "--max-memory", "1MiB", "--out", "e.json",
               "--no-report", "--resamples", "0")
    assert run.returncode == 0, run.stderr
    exact = json.loads((tmp_path / "e.json").read_text())
    assert "streamed" in exact and "(streamed" in run.stdout
    run = _cli(tmp_path, "knn", "--store", str(store), "--k", "10", "--approx", "--memory-budget", "1MiB",
               "--out", "a.json", "--resamples", "0")
    assert run.returncode == 0, run.stderr
    approx = json.loads((tmp_path / "a.json").read_text())["approximate"]
    assert approx["factory"].startswith(("IVF", "OPQ")) and approx["gap_queries"] == min(2000, exact["n_queries"])
    gap = approx["gap"]["10/weighted"]
    assert gap["exact_top1"] != gap["approx_top1"] or approx["recall_at_10"] > 0.9
    assert abs(gap["gap_points"]) < 10  # a tuned index stays close; the figure is the measured difference
    assert (tmp_path / "a.html").is_file() and "approximate kNN" in (tmp_path / "a.html").read_text()


def test_the_streamed_probe_is_within_half_a_point_of_the_full_batch_head(store, tmp_path):
    args = ["probe", "--store", str(store), "--head", "torch-logreg", "--grid", "0.1,1,10", "--resamples", "0",
            "--no-report", "--device", "cpu"]
    assert _cli(tmp_path, *args, "--out", "full.json").returncode == 0
    run = _cli(tmp_path, *args, "--out", "str.json", "--max-memory", "2MiB")
    assert run.returncode == 0, run.stderr
    full, streamed = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("full", "str"))
    assert "streamed" in streamed and "streamed" not in full
    assert abs(full["test_top1"] - streamed["test_top1"]) <= 0.005
    assert streamed["n_train"] + streamed["n_val"] == full["n_train"] + full["n_val"]
    run = _cli(tmp_path, "predict", "--head", "str.head.safetensors", "--store", str(store), "--out", "p.csv")
    assert run.returncode == 0, run.stderr  # the saved head is an ordinary head


@pytest.mark.gpu
def test_the_streamed_probe_on_cuda_gives_the_cpu_figures(store, tmp_path):
    args = ["probe", "--store", str(store), "--head", "torch-logreg", "--grid", "0.1,1,10", "--resamples", "0",
            "--no-report", "--max-memory", "2MiB"]
    for device in ("cpu", "cuda"):
        run = _cli(tmp_path, *args, "--device", device, "--out", f"{device}.json")
        assert run.returncode == 0, run.stderr
    cpu, gpu = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("cpu", "cuda"))
    assert "streamed" in gpu and gpu["n_train"] == cpu["n_train"] and gpu["n_val"] == cpu["n_val"]
    assert abs(cpu["test_top1"] - gpu["test_top1"]) <= 0.005


@pytest.mark.gpu
@pytest.mark.parametrize("memory", [None, "1MiB"])  # loaded whole, and streamed in blocks
def test_knn_on_cuda_gives_the_faiss_figures(store, tmp_path, memory):
    args = ["knn", "--store", str(store), "--k", "1,10", "--resamples", "0", "--no-report"]
    args += ["--max-memory", memory] if memory else []
    for device in ("cpu", "cuda"):
        run = _cli(tmp_path, *args, "--device", device, "--out", f"{device}.json")
        assert run.returncode == 0, run.stderr
    cpu, gpu = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("cpu", "cuda"))
    assert "torch float32 on cuda" in gpu["protocol"] and ("streamed" in gpu) == bool(memory)
    for k in ("1", "10"):
        for vote in ("majority", "weighted"):
            assert abs(cpu["by_k"][k][vote]["top1"] - gpu["by_k"][k][vote]["top1"]) <= 2 / cpu["n_queries"]


def test_the_sweep_stops_when_validation_accuracy_falls(store):
    from pipeline.evaluation.stream_probe import fit_streamed_probe

    _, result = fit_streamed_probe(scan_store(store), grid=(1e-4, 1e-5, 1e-6), device="cpu", max_memory=1 << 20,
                                   resamples=0, epochs=3)
    assert result["chosen"] == 1e-6 or len(result["val_top1_by_value"]) < 3  # tried from the strongest up
    _, result = fit_streamed_probe(scan_store(store), grid=(1.0, 1e-5), device="cpu", max_memory=1 << 20,
                                   resamples=0, epochs=3)
    assert list(result["val_top1_by_value"]) == ["1e-05", "1.0"]


def test_text_columns_read_compactly_are_the_same_text(store):
    columns = read_columns(store, "ids", "splits")
    for name in ("ids", "splits"):
        compact = read_text(store, name)
        assert compact.dtype.kind == "U" and compact.tolist() == columns[name].tolist()
        assert compact.nbytes < sum(sys.getsizeof(str(i)) + 8 for i in columns[name])  # no object per row


def test_compact_correctness_records_are_the_same_records():
    from pipeline.evaluation.intervals import pack_correct, pack_correct_arrays

    keys = ["b" * 32, "a" * 32, "é-id", "a" * 32, "z"]
    ids = ["x/2", "x/1", "é/ü", "x/0", "ß"]
    correct = np.array([True, False, True, True, False])
    assert pack_correct_arrays(correct, np.array([k.encode() for k in keys]), np.array([i.encode() for i in ids])) \
        == pack_correct(correct, keys, ids)


def test_the_hash_holdout_is_stratified_and_order_free():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=5000)
    keys = rng.integers(0, 2**63, size=5000, dtype=np.int64).astype(np.uint64)
    mask = hash_holdout(labels, keys, fraction=0.2, seed=0)
    for c in range(5):
        assert abs(mask[labels == c].mean() - 0.2) < 0.01
    perm = rng.permutation(5000)
    assert np.array_equal(hash_holdout(labels[perm], keys[perm], fraction=0.2, seed=0), mask[perm])
    assert not np.array_equal(hash_holdout(labels, keys, fraction=0.2, seed=1), mask)


def test_refusals_beyond_the_budget_are_one_line(store, tmp_path):
    run = _cli(tmp_path, "probe", "--store", str(store), "--max-memory", "1MiB", "--no-report")
    assert run.returncode == 2 and "--head torch-logreg" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    run = _cli(tmp_path, "audit", "--store", str(store), "--max-memory", "1MiB", "--no-report",
               "--write-manifest", "keep.csv", "--out", "a.json")
    assert run.returncode == 2 and "path column" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert "--write-splits" in run.stderr and not (tmp_path / "a.json").exists()
    held = store_budget(store, 1 << 20)
    assert not held.fits and held.rows == 12000 and held.need.endswith("more than --max-memory 1 MiB")
    assert store_budget(store, 1 << 34).fits
    run = _cli(tmp_path, "knn", "--store", str(store), "--max-memory", "nonsense")
    assert run.returncode == 2 and "--max-memory" in run.stderr
    with pytest.raises(PipelineError):
        resolve_max_memory(0)
    assert fits(1000, 100, 10 << 20) and not fits(10**6, 100, 10 << 20) and block_rows(1 << 30, 128) >= 65536


@pytest.mark.parametrize("kind", ["ivf-pq-refine", "ivf-opq"])
def test_the_refine_and_opq_indexes_build_from_the_streamed_store(store, tmp_path, kind):
    run = _cli(tmp_path, "index", "build", "--store", str(store), "--out", "ix", "--type", kind,
               "--memory-budget", "4MiB", "--queries", "200")
    assert run.returncode == 0, run.stderr
    infos = json.loads((tmp_path / "ix" / "index_infos.json").read_text())
    assert infos["kind"] == kind and infos["rows"] == 12000
    assert infos["recall_at_10"] > (0.8 if kind == "ivf-pq-refine" else 0.3)
    run = _cli(tmp_path, "search", "--index", "ix", "--id", "r00000007", "--k", "3", "--json")
    assert run.returncode == 0 and json.loads(run.stdout)[0]["hits"][0]["id"] == "r00000007"


def test_the_run_config_carries_max_memory_and_the_dask_address(store, tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.recipe import audit_store, knn_store, probe_store
    from pipeline.run_config import load_run_config

    cfg = tmp_path / "c.yaml"
    body = ("name: x\ndatasets: [{name: d, data: imgs}]\nbackbones: [b]\n"
            "probe: {head: torch-logreg, grid: [1.0], max_memory: 2MiB, resamples: 0}\n"
            "knn: {ks: [5], max_memory: 1MiB, resamples: 0}\n"
            "audit: {k: 5, max_memory: 1MiB}\n"
            "extract: {shards: 2, dask_address: 'tcp://127.0.0.1:8786'}\n")
    cfg.write_text(body)
    config = load_run_config(cfg)
    assert config.extract.dask_address == "tcp://127.0.0.1:8786" and config.probe.max_memory == "2MiB"
    probe = probe_store(str(store), str(tmp_path / "out"), config.probe)
    knn = knn_store(str(store), str(tmp_path / "out"), config.knn)
    assert "streamed" in probe and "streamed" in knn
    audit = audit_store(str(store), str(tmp_path / "out"), config.audit, probe, knn)  # as the flows call it
    assert "streamed" in audit and audit["k"] == 5
    assert audit["scores"]["probe"]["all"] == probe["test_top1"]  # the given results, mapped back by content
    assert audit["scores"]["knn"]["all"] == knn["by_k"]["5"]["weighted"]["top1"]
    for section in ("knn", "audit"):
        cfg.write_text(body.replace(f"{section}: {{" + ("ks: [5], " if section == "knn" else "k: 5, ") +
                                    "max_memory: 1MiB", f"{section}: {{max_memory: lots"))
        with pytest.raises(ConfigError, match=f"{section}.max_memory"):
            load_run_config(cfg)


def test_knn_through_a_saved_index_of_the_searched_rows(store, tmp_path):
    run = _cli(tmp_path, "index", "build", "--store", str(store), "--out", "all", "--type", "ivf-flat",
               "--queries", "200")
    assert run.returncode == 0, run.stderr
    run = _cli(tmp_path, "knn", "--store", str(store), "--k", "10", "--index", "all", "--no-report")
    assert run.returncode == 2 and "--splits train,val" in run.stderr  # its rows include the test queries
    run = _cli(tmp_path, "index", "build", "--store", str(store), "--out", "bank", "--type", "ivf-flat",
               "--splits", "train,val", "--queries", "200")
    assert run.returncode == 0, run.stderr
    run = _cli(tmp_path, "knn", "--store", str(store), "--k", "10", "--index", "bank", "--no-report",
               "--resamples", "0", "--out", "k.json")
    assert run.returncode == 0, run.stderr
    approx = json.loads((tmp_path / "k.json").read_text())["approximate"]
    assert approx["factory"].startswith("IVF") and approx["index"] == str((tmp_path / "bank").resolve())
    assert abs(approx["gap"]["10/weighted"]["gap_points"]) < 5


def test_an_index_is_searched_a_bounded_batch_of_queries_at_a_time_with_the_same_results(store):
    import faiss

    from pipeline.evaluation.knn_stream import index_searcher

    ss = scan_store(store)
    bank = ss.codes == 0
    feats = ss.features_of(np.flatnonzero(bank))
    index = faiss.index_factory(ss.dim, "IVF64,PQ8x8,Refine(SQ8)", faiss.METRIC_INNER_PRODUCT)
    index.train(feats)
    index.add(feats)
    faiss.extract_index_ivf(index).nprobe = 32
    positions = np.flatnonzero(bank)[:700]
    queries = ss.features_of(positions)
    whole = index_searcher(index, 10, np.flatnonzero(bank), leave_one_out=True, max_memory=2**30)
    # 8 KiB: two queries per FAISS call (nprobe 32 + 11 results x 9 candidates, ids and scores, twice)
    tight = index_searcher(index, 10, np.flatnonzero(bank), leave_one_out=True, max_memory=2**13)
    (s1, i1), (s2, i2) = whole(queries, positions), tight(queries, positions)
    assert i1.shape == (700, 10) and np.array_equal(i1, i2) and np.array_equal(s1, s2)
    assert not (i1 == np.arange(700)[:, None]).any()  # each query's own row left out


def test_the_streamed_neighbour_table_is_the_loaded_one(store):
    """Every row against every row in 12 blocks x 12 chunks equals one search of the loaded matrix: the same
    neighbours in the same order (exact ties by row), similarities and nearest other-class cosines to rounding."""
    ss, fs = scan_store(store), load_store(store)
    keys = np.array(fs.row_keys(), dtype=object)
    sims, idx, other = neighbour_table(fs.features, 7, fs.labels, keys)
    s_sims, s_idx, s_other = streamed_neighbour_table(ss, 7, max_memory=1 << 20)
    assert s_idx.shape == (12000, 7) and not (s_idx == np.arange(12000)[:, None]).any()  # the row itself left out
    assert np.mean((s_idx == idx).all(axis=1)) > 0.995
    np.testing.assert_allclose(s_sims, sims, atol=1e-6)
    np.testing.assert_allclose(s_other, other, atol=1e-6)
    one = dataclasses.replace(ss, rows=ss.rows[:1], labels=ss.labels[:1], codes=ss.codes[:1], keys=ss.keys[:1])
    with pytest.raises(PipelineError, match="at least 2"):
        streamed_neighbour_table(one, 7, max_memory=1 << 20)


def _same_pairs(x: np.ndarray, hashes: np.ndarray, threshold: float) -> tuple[set, set]:
    """Brute force: the pairs of rows with the same hash, and those of other content at or above `threshold`."""
    exact, near = set(), set()
    for start in range(0, len(x), 2000):
        sims = x[start:start + 2000] @ x.T
        for a, b in zip(*np.nonzero(sims >= threshold), strict=True):
            a += start
            if a < b:
                (exact if hashes[a] == hashes[b] else near).add((int(a), int(b)))
    _, first, counts = np.unique(hashes, return_index=True, return_counts=True)
    for h in hashes[first[counts > 1]]:  # exact copies are paired whatever their cosine (float16 rounding)
        rows = np.flatnonzero(hashes == h)
        exact |= {(int(a), int(b)) for i, a in enumerate(rows) for b in rows[i + 1:]}
    return exact, near


@pytest.mark.slow
def test_the_streamed_audit_finds_what_the_loaded_one_finds(tmp_path):
    """A store with 2% planted copies (half exact, half near), audited loaded and beyond --max-memory (12 blocks of
    rows, each searched against 12 chunks): the same pairs (those brute force finds), leaked rows, clean assignment
    and kNN figures, hints within float rounding; its probe figure is the streamed probe's."""
    store = tmp_path / "copies.h5"
    write_synthetic(store, 12000, dim=32, classes=12, noise=1.2, dtype="float16", shard_rows=5000, copies=0.02)
    common = ("audit", "--store", str(store), "--knn-k", "10", "--head", "torch-logreg", "--threshold", "0.97",
              "--resamples", "100", "--no-report")
    runs = {}
    for name, extra in (("loaded", ()), ("streamed", ("--max-memory", "1MiB"))):
        run = _cli(tmp_path, *common, *extra, "--out", f"{name}.json", "--write-splits", f"{name}.splits.csv")
        assert run.returncode == 0, run.stderr
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    loaded, streamed = runs["loaded"], runs["streamed"]
    assert "streamed" in streamed and "streamed" not in loaded and "streamed in blocks" in streamed["protocol"]
    fs = load_store(store)
    exact, near = _same_pairs(fs.features, fs.hashes, 0.97)
    with open(tmp_path / "streamed.pairs.csv") as f:
        found = [line.split(",") for line in f.read().splitlines()[1:]]
    index = {i: n for n, i in enumerate(fs.ids)}
    got = {kind: {tuple(sorted((index[a], index[b]))) for kind_, _, a, _, _, b, *_ in found if kind_ == kind}
           for kind in ("exact", "near")}
    assert got["exact"] == exact and got["near"] == near and len(exact) > 50 and len(near) > 50
    leaked = {fs.ids[r] for pair in exact | near for r, o in (pair, pair[::-1])
              if fs.splits[r] == "test" and fs.splits[o] == "train"}
    assert set(streamed["leaked_test_ids"]) == leaked and streamed["leaked_test_rows"] == len(leaked)
    for key in ("exact_pairs", "near_pairs", "cross_split_pairs", "pairs_by_splits", "leaked_test_ids", "threshold",
                "dropped_by_clean_assignment", "cross_split", "n_rows", "n_test"):
        assert streamed[key] == loaded[key], key
    assert streamed["scores"]["knn"] == loaded["scores"]["knn"]
    for hint in ("label_noise", "outliers"):
        a, b = loaded["hints"][hint], streamed["hints"][hint]
        assert [r["id"] for r in a] == [r["id"] for r in b] and len(a) > 5
        assert np.allclose([r["centre_distance"] for r in a], [r["centre_distance"] for r in b], atol=1e-6)
        assert np.allclose([h["score"] for r in a for h in r["neighbours"]],
                           [h["score"] for r in b for h in r["neighbours"]], atol=1e-5)
    assert (tmp_path / "loaded.splits.csv").read_bytes() == (tmp_path / "streamed.splits.csv").read_bytes()
    assert (tmp_path / "loaded.pairs.csv").read_bytes() == (tmp_path / "streamed.pairs.csv").read_bytes()
    run = _cli(tmp_path, "probe", "--store", str(store), "--head", "torch-logreg", "--max-memory", "1MiB",
               "--no-report", "--resamples", "0", "--out", "probe.json")
    assert run.returncode == 0, run.stderr
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert streamed["scores"]["probe"]["all"] == probe["test_top1"]
    assert streamed["scores"]["probe"]["chosen"] == probe["chosen"]
