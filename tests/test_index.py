from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from pipeline.engine.runner import extract_to_store
from pipeline.errors import PipelineError
from pipeline.index.build import (
    MIN_GAIN,
    build_flat_index,
    build_index,
    exact_topk,
    load_index,
    new_index,
    search,
    tune_index,
    update_index,
)
from pipeline.index.files import INFOS_FILE
from pipeline.index.plan import NLIST_MAX, memory_estimate, plan_index
from pipeline.index.search import search_store
from pipeline.plan import ExtractConfig
from pipeline.store.read import load_store
from tests.conftest import TINY_BACKBONE
from tests.helpers import make_folder, write_image


@pytest.fixture(scope="module")
def digits_fs(digits_store):
    return load_store(digits_store)


def _independent_recall(index, x, *, queries=300, k=10, seed=5):
    """Recall@k of a loaded index against float64 brute force, on other queries than the tuning ones, each query's
    own row left out of both lists."""
    rows = np.random.default_rng(seed).choice(len(x), size=queries, replace=False)
    sims = x[rows].astype(np.float64) @ x.astype(np.float64).T
    sims[np.arange(queries), rows] = -np.inf
    exact = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    _, approx = index.search(x[rows], k + 1)
    shares = [len(set(a[a != r][:k]) & set(e)) / k for a, e, r in zip(approx, exact, rows, strict=True)]
    return float(np.mean(shares))


def test_faiss_search_matches_numpy_brute_force(digits_fs):
    bank = digits_fs.features[digits_fs.mask("train")]
    queries = digits_fs.features[digits_fs.mask("test")]
    sims, _ = search(build_flat_index(bank), queries, 5)
    ref = np.sort(queries.astype(np.float64) @ bank.astype(np.float64).T, axis=1)[:, ::-1][:, :5]
    np.testing.assert_allclose(sims, ref, atol=1e-5)


def test_k_larger_than_the_index_is_a_clear_error():
    index = build_flat_index(np.eye(3, dtype=np.float32))
    with pytest.raises(PipelineError, match="larger than the 3 indexed rows"):
        search(index, np.eye(3, dtype=np.float32), 4)


def test_the_type_follows_rows_and_memory_budget():
    d = 768
    assert plan_index(50_000, d).kind == "flat"
    big = plan_index(2_000_000, d, memory_budget=16 * 2**30)
    assert big.kind == "hnsw" and big.memory_bytes <= 16 * 2**30
    assert plan_index(20_000_000, d, memory_budget=200 * 2**30).kind == "ivf-flat"  # too many rows for HNSW
    pq = plan_index(20_000_000, d, memory_budget=4 * 2**30)  # even 8-bit vectors (15 GB) exceed it: rotated codes
    assert pq.kind == "ivf-opq" and pq.memory_bytes <= 4 * 2**30 and d % pq.pq_m == 0
    assert pq.factory == f"OPQ{pq.pq_m},IVF{pq.nlist},PQ{pq.pq_m}x8"
    assert memory_estimate("ivf-opq", 20_000_000, d, nlist=pq.nlist, pq_m=pq.pq_m) == pq.memory_bytes
    assert pq.nlist == NLIST_MAX and plan_index(1_000_000, 128, kind="ivf-flat").nlist == 4096  # 4 sqrt(n), capped
    refine = plan_index(2_000_000, d, memory_budget=4 * 2**30)  # raw 6.1 GB do not fit, 8-bit vectors (1.5 GB) do
    assert refine.kind == "ivf-pq-refine" and refine.factory == f"IVF{refine.nlist},PQ{refine.pq_m}x8,Refine(SQ8)"
    assert refine.memory_bytes <= 4 * 2**30 and refine.memory_bytes > 2_000_000 * d  # the 8-bit vectors are in it
    plain = plan_index(20_000_000, d, kind="ivf-pq", memory_budget=4 * 2**30)
    assert plain.factory == f"IVF{plain.nlist},PQ{plain.pq_m}x8"  # asked for, plain PQ as before
    with pytest.raises(PipelineError, match="raise --memory-budget"):
        plan_index(20_000_000, d, memory_budget=2**20)
    with pytest.raises(PipelineError, match="unknown index type 'annoy'"):
        plan_index(10, d, kind="annoy")
    with pytest.raises(PipelineError, match="at least 39 rows"):
        plan_index(20, d, kind="ivf-flat")


def test_default_budget_sends_two_million_rows_to_pq():
    # 2M x 768-d: raw 6.1 GB > 4 GiB, so not HNSW (it stores raw vectors) but IVF-PQ, re-ranked on 8-bit vectors
    assert plan_index(2_000_000, 768).kind == "ivf-pq-refine"


@pytest.mark.parametrize("kind", ["hnsw", "ivf-flat"])
def test_approximate_index_reaches_the_recall_target(digits_store, digits_fs, tmp_path, kind):
    infos = build_index(digits_store, tmp_path / kind, kind=kind, target_recall=0.95, queries=500)
    assert infos.kind == kind and infos.rows == len(digits_fs) and infos.target_met
    assert infos.recall_at_10 >= 0.95 and infos.search_param in ("efSearch", "nprobe")
    recorded = json.loads((tmp_path / kind / INFOS_FILE).read_text())
    assert recorded["recall_at_10"] == infos.recall_at_10 and recorded["cache_key"] == digits_fs.attrs["cache_key"]
    assert recorded["tuning"][-1]["value"] == infos.search_value and recorded["faiss_version"]
    loaded = load_index(tmp_path / kind)  # the search parameter comes back with it
    assert _independent_recall(loaded.index, digits_fs.features) >= 0.95
    assert list(loaded.ids) == list(digits_fs.ids)


def test_auto_choice_on_a_small_exact_threshold_and_a_tight_budget(digits_store, digits_fs, tmp_path, caplog):
    infos = build_index(digits_store, tmp_path / "auto", exact_max_rows=1000, queries=300)
    assert infos.kind == "hnsw" and "1797 rows > 1000" in infos.reason and infos.recall_at_10 >= 0.95

    # a budget below the raw vectors: product quantisation, whose recall is measured honestly, not promised
    budget = 1_580_000
    with caplog.at_level(logging.WARNING, logger="pipeline.index.build"):
        pq = build_index(digits_store, tmp_path / "pq", memory_budget=budget, queries=300)
    assert pq.kind == "ivf-pq" and pq.memory_estimate <= budget
    loaded = load_index(tmp_path / "pq")
    independent = _independent_recall(loaded.index, digits_fs.features)
    assert abs(independent - pq.recall_at_10) < 0.08  # the recorded figure is a real measurement
    assert pq.target_met == (pq.recall_at_10 >= 0.95)
    if not pq.target_met:
        assert "below the target" in caplog.text


def test_tuning_stops_when_recall_is_capped_or_a_query_costs_more_than_exact(digits_store, digits_fs):
    x = np.ascontiguousarray(digits_fs.features, dtype=np.float32)
    plan = plan_index(len(x), x.shape[1], kind="ivf-pq", memory_budget=1_580_000)  # a few bytes per row: recall capped
    index = new_index(plan, x.shape[1])
    index.train(x)
    index.add(x)
    rows = np.arange(0, len(x), 7)
    exact = exact_topk(digits_store, None, x[rows], 11)
    capped = tune_index(index, plan.kind, plan.nlist, x[rows], rows, exact, np.arange(len(x)), target=0.99)
    values = [e["value"] for e in capped["tried"]]
    assert values == [2**i for i in range(len(values))] and len(values) < 1 + np.log2(plan.nlist)  # stopped early
    recalls = [e["recall_at_10"] for e in capped["tried"]]
    assert recalls[-1] < recalls[-3] + MIN_GAIN and capped["recall_at_10"] == max(recalls) < 0.99
    # exact search faster than any setting: tuning stops at the second and keeps the first
    slow = tune_index(index, plan.kind, plan.nlist, x[rows], rows, exact, np.arange(len(x)), target=0.99,
                      exact_ms=1e-9, exact_max_rows=0)
    assert [e["value"] for e in slow["tried"]] == [1, 2] and slow["value"] == 1
    assert slow["recall_at_10"] == capped["tried"][0]["recall_at_10"]
    # below the plan's brute-force size the exact time is not a limit: the same run as without it
    small = tune_index(index, plan.kind, plan.nlist, x[rows], rows, exact, np.arange(len(x)), target=0.99,
                       exact_ms=1e-9)
    assert [e["value"] for e in small["tried"]] == values


def test_only_some_splits_and_refusals(digits_store, digits_fs, tmp_path):
    infos = build_index(digits_store, tmp_path / "train", kind="flat", splits=("train",), queries=100)
    assert infos.rows == int(digits_fs.mask("train").sum()) and infos.recall_at_10 == 1.0
    with pytest.raises(PipelineError, match="no rows in the splits"):
        build_index(digits_store, tmp_path / "x", splits=("val",))
    (tmp_path / "notindex").mkdir()
    (tmp_path / "notindex" / "keep.txt").write_text("mine")
    with pytest.raises(PipelineError, match="not an index folder"):
        build_index(digits_store, tmp_path / "notindex", kind="flat")
    assert (tmp_path / "notindex" / "keep.txt").read_text() == "mine"
    with pytest.raises(PipelineError, match="not an index folder"):
        load_index(tmp_path / "nothing")


def test_new_rows_are_added_and_changed_rows_rebuild(tmp_path, caplog):
    """Updates add the new rows in place and re-tune under the build's own brute-force threshold (recorded in the
    infos): with 20, the 60 rows' automatic HNSW stays the automatic choice at 70 (the default 100,000 would say
    flat)."""
    root = make_folder(tmp_path / "imgs", {"a": 30, "b": 30})
    store = tmp_path / "s.h5"
    config = ExtractConfig.of(data=root, out=store, backbone=TINY_BACKBONE, random_init=True, workers=0,
                           progress=False)
    extract_to_store(config)
    assert build_index(store, tmp_path / "ix", exact_max_rows=20, queries=50).kind == "hnsw"
    before = load_index(tmp_path / "ix")
    assert before.infos.exact_max_rows == 20

    for i in range(10):  # the collection grows
        write_image(root / "a" / f"new_{i}.png", seed=1000 + i)
    extract_to_store(config)
    with caplog.at_level(logging.WARNING, logger="pipeline.index.build"):
        infos = update_index(tmp_path / "ix")
    assert "automatic choice is now" not in caplog.text and infos.exact_max_rows == 20
    after = load_index(tmp_path / "ix")
    fs = load_store(store)
    assert infos.rows == after.index.ntotal == len(fs) == before.infos.rows + 10
    assert infos.history[-1]["action"] == "added" and infos.history[-1]["rows"] == 10
    assert list(after.ids[: before.infos.rows]) == list(before.ids)  # old rows keep their positions
    assert set(after.ids) == set(fs.ids)
    # every indexed vector is the store's vector for that id: searching a row finds that very id
    _, idx = after.index.search(fs.features, 1)
    assert [after.ids[j] for j in idx[:, 0]] == list(fs.ids)
    assert update_index(tmp_path / "ix").history == infos.history  # nothing new: no-op

    target = root / "b" / "img_000.png"
    write_image(target, seed=5000)  # an indexed image changes
    os.utime(target, ns=(10**18, 10**18))
    extract_to_store(config)
    rebuilt = update_index(tmp_path / "ix")
    assert rebuilt.history[-1]["action"] == "rebuilt" and rebuilt.rows == len(fs) and rebuilt.exact_max_rows == 20


def test_search_by_ids_and_image_files(digits_store, digits_root, digits_fs, tmp_path):
    build_index(digits_store, tmp_path / "ix", kind="hnsw", queries=200)
    some = [str(digits_fs.ids[7]), str(digits_fs.ids[900])]
    results = search_store(index=tmp_path / "ix", ids=some, images=[digits_root / some[1]], k=5)
    assert [r["query"] for r in results] == [str(digits_root / some[1]), *some]
    first_image, first_id, second_id = results
    assert first_id["hits"][0]["id"] == some[0] and first_id["hits"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert first_image["hits"][0]["id"] == some[1] and first_image["hits"][0]["score"] > 0.999
    hit = second_id["hits"][0]
    assert hit["label"] == digits_fs.class_names[digits_fs.labels[900]] and hit["split"] == digits_fs.splits[900]
    assert hit["path"] == str(digits_root.resolve() / some[1])
    assert len(first_id["hits"]) == 5 and all(a["score"] >= b["score"] for a, b in
                                              zip(first_id["hits"], first_id["hits"][1:], strict=False))
    exact = search_store(store=digits_store, ids=some, k=5)  # without an index: exact search, same neighbours here
    assert [h["id"] for h in exact[0]["hits"]] == [h["id"] for h in first_id["hits"]]
    with pytest.raises(PipelineError, match="not in"):
        search_store(store=digits_store, ids=["nope.png"])
    with pytest.raises(PipelineError, match="nothing to search for"):
        search_store(store=digits_store)
