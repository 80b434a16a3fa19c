"""The same images give the same store, splits and metrics whichever way they come: a folder, a manifest with other
ids, WebDataset shards with other keys, or a plain `tar` of the class folders. Splits belong to the image (its
content), not to how it is spelt or listed."""

from __future__ import annotations

import logging
import subprocess

import numpy as np
import pytest

from pipeline.config import KnnConfig, ProbeConfig
from pipeline.engine.runner import extract_to_store
from pipeline.errors import PipelineError
from pipeline.evaluation.knn import knn_classify
from pipeline.evaluation.probes import fit_probe
from pipeline.plan import ExtractConfig
from pipeline.sources import open_source
from pipeline.store.read import load_store
from tests.sources_data import digit_images, png_bytes, webdataset_members, write_manifest, write_shard

N = 135


@pytest.fixture(scope="module")
def three_ways(tmp_path_factory):
    """135 real digits (no split given anywhere) as class folders, as a manifest listing the same files under other
    ids in another order, as two WebDataset shards with other keys, and as `tar cf` of the class folders."""
    root = tmp_path_factory.mktemp("three")
    images, labels = digit_images(N)
    rows = []
    for k in range(N):
        rel = f"{labels[k]}/img_{k:03d}.png"
        (root / "folder" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "folder" / rel).write_bytes(png_bytes(images[k]))
        rows.append({"path": f"folder/{rel}", "label": str(labels[k]), "id": f"sample-{N - k:04d}"})
    write_manifest(root / "list.csv", rows[::-1])
    order = np.random.default_rng(0).permutation(N)
    for shard, part in enumerate(np.array_split(order, 2)):
        write_shard(root / "shards" / f"part-{shard:06d}.tar",
                    webdataset_members([f"w{shard}/{k:05d}" for k in part], [png_bytes(images[k]) for k in part],
                                       [int(labels[k]) for k in part]))
    subprocess.run(["tar", "cf", str(root / "plain.tar"), *sorted(p.name for p in (root / "folder").iterdir())],
                   cwd=root / "folder", check=True)
    return root, {k: png_bytes(images[k]) for k in range(N)}


def _by_content(fs) -> dict[bytes, tuple[str, int]]:
    return {h: (s, int(y)) for h, s, y in zip(fs.hashes, fs.splits, fs.labels, strict=True)}


def test_folder_manifest_shards_and_plain_tar_split_and_score_alike(three_ways, tmp_path, tiny):
    root, _ = three_ways
    stores = {}
    for kind, data in (("folder", root / "folder"), ("manifest", root / "list.csv"), ("tar", root / "shards"),
                       ("plain tar", root / "plain.tar")):
        out = tmp_path / f"{kind.replace(' ', '_')}.h5"
        extract_to_store(ExtractConfig.of(data=data, out=out, workers=0, progress=False), backbone=tiny)
        stores[kind] = load_store(out)
    reference = stores["folder"]
    assert len(reference) == N and set(reference.splits) == {"train", "test"}
    assert reference.attrs["split_source"].startswith("stratified") and "by content" in reference.attrs["split_source"]
    for kind, fs in stores.items():
        assert fs.class_names == reference.class_names, kind
        assert _by_content(fs) == _by_content(reference), kind  # each image: the same split and label
    assert stores["plain tar"].attrs["source"] == "tar"  # labels from the member folders, like timm's tar reader
    probes = {kind: fit_probe(fs, grid=(0.1, 1.0, 10.0))[1] for kind, fs in stores.items()}
    knns = {kind: knn_classify(fs, ks=(5,)) for kind, fs in stores.items()}
    for kind in stores:
        assert probes[kind]["chosen"] == probes["folder"]["chosen"], kind
        assert probes[kind]["val_top1_by_value"] == probes["folder"]["val_top1_by_value"], kind
        assert probes[kind]["test_top1"] == probes["folder"]["test_top1"], kind
        assert knns[kind]["by_k"]["5"]["weighted"]["top1"] == knns["folder"]["by_k"]["5"]["weighted"]["top1"], kind


def test_identical_files_land_in_the_same_split(tmp_path):
    images, labels = digit_images(40)
    for k in range(40):
        (tmp_path / "d" / str(labels[k])).mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / str(labels[k]) / f"a{k}.png").write_bytes(png_bytes(images[k]))
        (tmp_path / "d" / str(labels[k]) / f"b{k}.png").write_bytes(png_bytes(images[k]))  # a byte-identical copy
    source = open_source(tmp_path / "d")
    split = {s.id: s.split for s in source.samples}
    assert {"train", "test"} == set(split.values())
    for k in range(40):
        assert split[f"{labels[k]}/a{k}.png"] == split[f"{labels[k]}/b{k}.png"]


def test_split_stratified_overrides_split_names_and_errors_say_what_to_do(three_ways, tmp_path, tiny):
    root, data = three_ways
    write_shard(tmp_path / "train-000000.tar", webdataset_members([f"k{k}" for k in range(40)],
                                                                 [data[k] for k in range(40)],
                                                                 [k % 3 for k in range(40)]))
    named = tmp_path / "named.h5"
    extract_to_store(ExtractConfig.of(data=tmp_path / "train-000000.tar", out=named, workers=0, progress=False),
                     backbone=tiny)
    fs = load_store(named)
    assert set(fs.splits) == {"train"}  # the shard's name says train
    with pytest.raises(PipelineError, match=r"no labelled test split; name shards .*--split stratified"):
        fit_probe(fs, grid=(1.0,))
    overridden = tmp_path / "overridden.h5"
    extract_to_store(ExtractConfig.of(data=tmp_path / "train-000000.tar", out=overridden, workers=0, progress=False,
                                   split="stratified"), backbone=tiny)
    fs = load_store(overridden)
    assert set(fs.splits) == {"train", "test"} and "overriding the shards" in fs.attrs["split_source"]
    assert fit_probe(fs, grid=(1.0,))[1]["n_test"] == int((fs.splits == "test").sum())


def test_a_labelled_looking_source_without_labels_warns_and_says_how(three_ways, tmp_path, tiny, caplog):
    _, data = three_ways
    write_shard(tmp_path / "flat.tar", [(f"k{k:03d}.png", data[k]) for k in range(20)])  # no .cls, no folders
    out = tmp_path / "flat.h5"
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        extract_to_store(ExtractConfig.of(data=tmp_path / "flat.tar", out=out, workers=0, progress=False),
                         backbone=tiny)
    assert any("none of the 20 images has a label" in r.message and "KEY.cls" in r.message for r in caplog.records)
    fs = load_store(out)
    with pytest.raises(PipelineError, match=r"no labelled rows.*KEY\.cls"):
        fit_probe(fs, grid=(1.0,))
    with pytest.raises(PipelineError, match=r"no labelled rows.*KEY\.cls"):
        knn_classify(fs, ks=(1,))
    from pipeline.sources.hints import how_to

    assert "label column" in how_to("manifest", "labels") and "class folders" in how_to("folder", "labels")


def test_probe_and_knn_configs_run_on_each_kind(three_ways, tmp_path, tiny):
    """The commands' own entry points (run_probe / run_knn) agree across kinds too, results files included."""
    from pipeline.evaluation.knn import run_knn
    from pipeline.evaluation.probes import run_probe

    root, _ = three_ways
    results = {}
    for kind, data in (("folder", root / "folder"), ("tar", root / "shards")):
        out = tmp_path / f"{kind}.h5"
        extract_to_store(ExtractConfig.of(data=data, out=out, workers=0, progress=False), backbone=tiny)
        probe, _ = run_probe(ProbeConfig(store=out, grid=(1.0,), report=False))
        knn, _ = run_knn(KnnConfig(store=out, ks=(5,), report=False))
        results[kind] = (probe["test_top1"], knn["by_k"]["5"]["majority"]["top1"])
    assert results["folder"] == results["tar"]
