"""Interchange: exports read back by their real consumers (autofaiss, Hugging Face datasets, LanceDB, pyarrow, h5py
as ann-benchmarks reads it), imports that probe to the same numbers, the alpha policy against `convert("RGB")` on
real RGBA icons, timm-style preprocessing overrides, and the transform a torchvision backbone really runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.backbones.factory import create_backbone
from pipeline.backbones.model import transform_text
from pipeline.cli import main
from pipeline.engine.decode import Decoding, decode
from pipeline.engine.embed import backbone_for
from pipeline.engine.forward import l2_normalize
from pipeline.engine.runner import extract_to_store
from pipeline.errors import PipelineError
from pipeline.interchange.export import METADATA, exact_neighbors, export_store
from pipeline.interchange.ingest import import_features
from pipeline.plan import ExtractConfig, Provenance
from pipeline.store.read import load_store, read_attrs
from tests.conftest import TINY_BACKBONE


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "--quiet", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory, small_digits_root, tiny):
    out = tmp_path_factory.mktemp("interchange") / "digits.h5"
    extract_to_store(ExtractConfig.of(data=small_digits_root, out=out, workers=0, progress=False), backbone=tiny)
    return out


# -- the alpha policy ------------------------------------------------------------------------------------------------

def test_alpha_drop_is_convert_rgb_bit_for_bit_on_real_rgba_icons(tango_icons):
    differ = 0
    for path in tango_icons:
        data = path.read_bytes()
        with Image.open(path) as image:
            expected = np.asarray(image.convert("RGB"))  # timm's, torchvision's and open_clip's loaders
        dropped = np.asarray(decode(data, Decoding(alpha="drop"))[0])
        np.testing.assert_array_equal(dropped, expected, err_msg=str(path))
        white = np.asarray(decode(data, Decoding())[0])
        black = np.asarray(decode(data, Decoding(alpha="0,0,0"))[0])
        with Image.open(path) as image:
            alpha = np.asarray(image)[:, :, 3]
        assert (white[alpha == 0] == 255).all() and (black[alpha == 0] == 0).all()
        np.testing.assert_array_equal(white[alpha == 255], expected[alpha == 255])  # opaque pixels are the same
        differ += not np.array_equal(white, expected)
    assert differ == len(tango_icons)


def test_alpha_policy_is_in_the_store_and_its_cache_key_and_drop_reproduces_the_timm_loader(tmp_path, tango_icons,
                                                                                            tiny):
    for k, path in enumerate(tango_icons[:24]):  # two "classes", so that a probe can be fitted
        folder = tmp_path / "icons" / ("even" if k % 2 == 0 else "odd")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / f"{path.parent.name}-{path.name}")
    white, drop = tmp_path / "white.h5", tmp_path / "drop.h5"
    for out, alpha in ((white, "white"), (drop, "drop")):
        extract_to_store(ExtractConfig.of(data=tmp_path / "icons", out=out, workers=0, progress=False, alpha=alpha),
                         backbone=tiny)
    a, b = read_attrs(white), read_attrs(drop)
    assert a["cache_key"] != b["cache_key"]
    assert json.loads(b["decoding"])["alpha"] == "drop" and "alpha" not in json.loads(a["decoding"])
    assert json.loads(a["decoding"])["alpha_background"] == [255, 255, 255]  # as before the policy existed
    assert Provenance.from_store(white).alpha == "white" and Provenance.from_store(drop).alpha == "drop"
    fs = load_store(drop)
    files = [tmp_path / "icons" / i for i in fs.ids]
    with torch.inference_mode():
        batch = torch.stack([tiny.transform(Image.open(f).convert("RGB")) for f in files])
        expected = l2_normalize(tiny.features(batch)).numpy()
    np.testing.assert_allclose(fs.features, expected, atol=1e-5)
    cosine = (load_store(white).features * fs.features).sum(axis=1)
    assert cosine.min() < 0.999  # the policies give different features for transparent images
    # a head fitted on one policy's features is refused on the other's
    from pipeline.config import ProbeConfig
    from pipeline.evaluation.predict import load_head, predict_store
    from pipeline.evaluation.probes import run_probe

    run_probe(ProbeConfig(store=white, out=tmp_path / "white.json", grid=(1.0,), report=False))
    head = load_head(tmp_path / "white.head.safetensors")
    assert head.meta["alpha"] == "white"
    with pytest.raises(PipelineError, match="alpha"):
        predict_store(head, drop)
    # the same --out with another policy is another configuration: refused, not silently mixed
    with pytest.raises(PipelineError, match="another configuration"):
        extract_to_store(ExtractConfig.of(data=tmp_path / "icons", out=white, workers=0, progress=False,
                                          alpha="black"), backbone=tiny)


def test_a_bad_alpha_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["extract", "--data", str(tmp_path), "--out", str(tmp_path / "x.h5"), "--alpha", "purple"])
    assert exc.value.code == 2
    assert "--alpha 'purple' is not drop, white, black or R,G,B" in capsys.readouterr().err


# -- preprocessing overrides and the transform that ran -------------------------------------------------------------

def test_preprocessing_overrides_are_recorded_keyed_and_reproduced(tmp_path, small_digits_root):
    base, changed = tmp_path / "base.h5", tmp_path / "changed.h5"
    common = dict(data=small_digits_root, workers=0, progress=False, backbone=TINY_BACKBONE, random_init=True)
    extract_to_store(ExtractConfig.of(out=base, **common))
    extract_to_store(ExtractConfig.of(out=changed, img_size=64, crop_pct=1.0, interpolation="bilinear",
                                      mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), **common))
    made, plain = Provenance.from_store(changed), Provenance.from_store(base)
    assert made.preprocessing["input_size"] == [3, 64, 64] and made.preprocessing["crop_pct"] == 1.0
    assert made.preprocessing["interpolation"] == "bilinear" and made.preprocessing["std"] == [0.25] * 3
    assert made.preprocessing_overrides == {"input_size": [3, 64, 64], "crop_pct": 1.0, "interpolation": "bilinear",
                                            "mean": [0.5] * 3, "std": [0.25] * 3}
    assert made.cache_key != plain.cache_key
    from pipeline.store.verify import store_info

    info = store_info(changed)
    assert info["overrides"] == made.preprocessing_overrides and info["alpha"] == "white"
    assert info["transform"] == made.transform and store_info(base)["overrides"] is None
    assert "size=64" in made.transform and "bilinear" in made.transform.lower()
    assert "size=(64, 64)" not in plain.transform and plain.transform
    # the store's backbone is rebuilt with the same overrides (predict, search), and gives the stored features
    backbone = backbone_for(made, device="cpu")
    assert backbone.data_config == made.preprocessing
    fs = load_store(changed)
    files = [small_digits_root / i for i in fs.ids[:8]]
    with torch.inference_mode():
        batch = torch.stack([backbone.transform(decode(f.read_bytes(), Decoding())[0]) for f in files])
        again = l2_normalize(backbone.features(batch)).numpy()
    np.testing.assert_allclose(again, fs.features[:8], atol=1e-5)
    # a head records the preprocessing only: the overrides are derived from it
    head_made = Provenance.from_attrs({**read_attrs(changed), "preprocessing_overrides": "{}"})
    assert backbone_for(head_made, device="cpu").data_config == made.preprocessing


def test_torchvision_records_its_own_preset_and_overrides_rebuild_it():
    from torchvision.models import ResNet18_Weights

    plain = create_backbone("torchvision:resnet18", random_init=True)
    assert transform_text(plain.transform) == transform_text(ResNet18_Weights.DEFAULT.transforms())
    assert "ImageClassification" in transform_text(plain.transform)
    changed = create_backbone("torchvision:resnet18", random_init=True,
                              overrides={"input_size": [3, 128, 128], "crop_pct": 0.8})
    text = transform_text(changed.transform)
    assert "crop_size=[128]" in text and "resize_size=[160]" in text and "ImageClassification" in text
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8))
    assert tuple(changed.transform(image).shape) == (3, 128, 128)


def test_bad_overrides_are_one_line_and_exit_2(tmp_path, capsys):
    for flag, value, needle in (("--crop-pct", "1.5", "--crop-pct"), ("--mean", "0.5,0.5", "three"),
                                ("--interpolation", "cubic", "--interpolation"), ("--img-size", "0", "--img-size")):
        with pytest.raises(SystemExit) as exc:
            main(["extract", "--data", str(tmp_path), "--out", str(tmp_path / "x.h5"), flag, value])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err


# -- exports, read by their consumers -------------------------------------------------------------------------------

def test_clip_retrieval_export_is_read_by_autofaiss_row_for_row(store, tmp_path):
    from autofaiss.external.quantize import Quantizer

    fs = load_store(store)
    out = tmp_path / "cr"
    result = export_store(store, out, format="clip-retrieval", part_rows=37)
    assert result.rows == len(fs) and len(list((out / "img_emb").glob("*.npy"))) == -(-len(fs) // 37)
    meta = pa.concat_tables([pq.read_table(f) for f in sorted((out / "metadata").glob("*.parquet"))])
    vectors = np.concatenate([np.load(f) for f in sorted((out / "img_emb").glob("*.npy"))])
    row = {i: n for n, i in enumerate(fs.ids)}
    order = np.array([row[i] for i in meta.column("id").to_pylist()])
    np.testing.assert_array_equal(vectors, fs.features[order])
    assert meta.column("label").to_pylist() == fs.labels[order].tolist()
    assert meta.column("split").to_pylist() == fs.splits[order].tolist()
    assert all(Path(p).is_file() for p in meta.column("path").to_pylist())
    Quantizer().quantize(embeddings_path=str(out / "img_emb"), output_path=str(tmp_path / "index"),
                         max_index_memory_usage="50M", current_memory_available="1G", metric_type="ip")
    import faiss

    index = faiss.read_index(str(next((tmp_path / "index").glob("*.index"))))
    assert index.ntotal == len(fs)
    np.testing.assert_allclose(index.reconstruct_n(0, index.ntotal), vectors, atol=1e-6)  # index row i = meta row i
    _, found = index.search(vectors[:20], 1)
    assert (found[:, 0] == np.arange(20)).mean() >= 0.9
    assert json.loads((out / METADATA).read_text())["cache_key"] == fs.made.cache_key


def test_parquet_export_is_read_by_datasets_lancedb_and_pyarrow(store, tmp_path):
    import datasets
    import lancedb
    import pyarrow.dataset as pads

    fs = load_store(store)
    out = tmp_path / "pq"
    export_store(store, out, format="parquet", part_rows=64, splits=("train",))
    train = fs.subset(fs.mask("train"))
    loaded = datasets.load_dataset("parquet", data_dir=str(out), split="train")
    assert loaded.num_rows == len(train) and set(loaded["split"]) == {"train"}
    row = {i: n for n, i in enumerate(train.ids)}
    order = np.array([row[i] for i in loaded["id"]])
    np.testing.assert_array_equal(np.asarray(loaded.with_format("numpy")["embedding"]), train.features[order])
    table = pads.dataset(out).to_table()
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), fs.features.shape[1])
    assert table.column("class_name").to_pylist() == [fs.class_names[y] for y in train.labels[order]]
    db = lancedb.connect(tmp_path / "lance")
    lance = db.create_table("features", pads.dataset(out))
    for n in (0, 7, 33):
        hits = lance.search(train.features[n], vector_column_name="embedding").metric("cosine").limit(1).to_list()
        assert hits[0]["id"] == train.ids[n]


def test_parquet_export_in_float16(store, tmp_path):
    export_store(store, tmp_path / "f16", format="parquet", dtype="float16")
    table = pq.read_table(next((tmp_path / "f16").glob("*.parquet")))
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), load_store(store).features.shape[1])


def test_ann_benchmarks_export_has_exact_ground_truth(store, tmp_path):
    fs = load_store(store)
    export_store(store, tmp_path / "ann", format="ann-benchmarks", k=10)
    with h5py.File(tmp_path / "ann" / "dataset.hdf5", "r") as f:
        assert f.attrs["distance"] == "angular" and f.attrs["dimension"] == fs.features.shape[1]
        train, test, neighbors, distances = (f[k][...] for k in ("train", "test", "neighbors", "distances"))
    np.testing.assert_array_equal(test, fs.features[fs.mask("test")])
    np.testing.assert_array_equal(train, fs.features[fs.mask("train", "val")])
    sims = test @ train.T
    truth = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(neighbors, truth)
    np.testing.assert_allclose(distances, 1 - np.take_along_axis(sims, truth, 1), atol=1e-5)


def test_exact_neighbors_blockwise_equals_one_block():
    rng = np.random.default_rng(0)
    bank, queries = rng.normal(size=(1000, 16)).astype(np.float32), rng.normal(size=(50, 16)).astype(np.float32)
    one = exact_neighbors(bank, queries, 7, block=10_000)
    many = exact_neighbors(bank, queries, 7, block=33, query_block=7)
    np.testing.assert_array_equal(one[0], many[0])
    np.testing.assert_array_equal(one[0], np.argsort(-(queries @ bank.T), axis=1, kind="stable")[:, :7])


def test_export_refusals_keep_what_is_there(store, tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = _cli(tmp_path, "export", "--store", str(store), "--format", "parquet", "--out", "x")
    _one_line_error(proc, "not empty")
    proc = _cli(tmp_path, "export", "--store", str(store), "--format", "parquet", "--out", "x", "--overwrite")
    _one_line_error(proc, "not a featpipe export")
    assert (out / "notes.txt").read_text() == "mine"
    proc = _cli(tmp_path, "export", "--store", str(store), "--format", "ann-benchmarks", "--out", "y",
                "--splits", "train,test")
    _one_line_error(proc, "test split is the queries")
    proc = _cli(tmp_path, "export", "--store", str(tmp_path / "none.h5"), "--format", "parquet", "--out", "z")
    _one_line_error(proc, "no feature store")
    first = _cli(tmp_path, "export", "--store", str(store), "--format", "parquet", "--out", "ok")
    assert first.returncode == 0, first.stderr
    again = _cli(tmp_path, "export", "--store", str(store), "--format", "parquet", "--out", "ok", "--overwrite",
                 "--splits", "test")
    assert again.returncode == 0, again.stderr
    assert set(pq.read_table(tmp_path / "ok").column("split").to_pylist()) == {"test"}
    assert not (tmp_path / "ok.partial").exists()


# -- imports --------------------------------------------------------------------------------------------------------

def test_an_imported_export_probes_to_the_same_numbers(store, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    for fmt in ("clip-retrieval", "parquet"):
        assert _cli(work, "export", "--store", str(store), "--format", fmt, "--out", fmt).returncode == 0
        proc = _cli(work, "import", "--from", fmt, "--out", f"{fmt}.h5")
        assert proc.returncode == 0, proc.stderr
    results = {}
    for name, path in (("store", store), ("cr", work / "clip-retrieval.h5"), ("pq", work / "parquet.h5")):
        proc = _cli(work, "probe", "--store", str(path), "--grid", "0.1,1,10", "--out", f"{name}.json")
        assert proc.returncode == 0, proc.stderr
        results[name] = json.loads((work / f"{name}.json").read_text())
    for name in ("cr", "pq"):
        for key in ("test_top1", "val_top1_by_value", "chosen", "test_confusion_matrix", "test_intervals",
                    "test_correct"):
            assert results[name][key] == results["store"][key], (name, key)
    imported = Provenance.from_store(work / "parquet.h5")
    assert imported.source == "import" and imported.backbone == TINY_BACKBONE
    assert imported.cache_key == Provenance.from_store(store).cache_key


def test_import_of_foreign_parquet_normalises_labels_and_splits(tmp_path):
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(60, 8)).astype(np.float32) * 3  # not unit norm
    names = ["cat", "dog", "owl"]
    table = pa.table({"key": [f"img{i:03d}.jpg" for i in range(60)], "label": [names[i % 3] for i in range(60)],
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 8)})
    pq.write_table(table, tmp_path / "feats.parquet")
    result = import_features(tmp_path / "feats.parquet", tmp_path / "x.h5", backbone="openclip-vit-b32")
    fs = load_store(tmp_path / "x.h5")
    assert result.normalized == 60 and fs.class_names == names
    np.testing.assert_allclose(fs.features, vectors / np.linalg.norm(vectors, axis=1, keepdims=True), rtol=1e-6)
    assert fs.made.backbone == "external:openclip-vit-b32" and fs.made.weights == "external"
    assert fs.labels.tolist() == [i % 3 for i in range(60)]
    assert {int((fs.splits == "test").sum()), int((fs.splits == "train").sum())} == {18, 42}  # 70/30 per class


def test_hostile_or_broken_imports_are_one_line_errors(tmp_path):
    good = np.eye(4, dtype=np.float32)
    cases = {
        "nan": pa.table({"id": list("abcd"), "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(np.where(good == 1, np.nan, good).reshape(-1)), 4)}),
        "dupes": pa.table({"id": list("aacd"), "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(good.reshape(-1)), 4)}),
        "noid": pa.table({"embedding": pa.FixedSizeListArray.from_arrays(pa.array(good.reshape(-1)), 4)}),
        "text": pa.table({"id": list("abcd"), "embedding": pa.array(["1", "2", "3", "4"])}),
        "splits": pa.table({"id": list("abcd"), "split": ["train", "holdout", "test", "train"],
                            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(good.reshape(-1)), 4)}),
    }
    needles = {"nan": "not finite", "dupes": "duplicate ids", "noid": "no id column", "text": "not a list of floats",
               "splits": "not train/val/test"}
    for name, table in cases.items():
        pq.write_table(table, tmp_path / f"{name}.parquet")
        proc = _cli(tmp_path, "import", "--from", f"{name}.parquet", "--out", f"{name}.h5")
        _one_line_error(proc, needles[name])
        assert not (tmp_path / f"{name}.h5").exists()
    # an npy that is a pickle is refused, never loaded
    layout = tmp_path / "pickled"
    (layout / "img_emb").mkdir(parents=True)
    (layout / "metadata").mkdir()
    np.save(layout / "img_emb" / "img_emb_0.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    pq.write_table(pa.table({"id": ["a"]}), layout / "metadata" / "metadata_0.parquet")
    _one_line_error(_cli(tmp_path, "import", "--from", "pickled", "--out", "p.h5"), "not a numeric .npy")
    (tmp_path / "notes.h5").write_text("not a store")
    pq.write_table(pa.table({"id": ["a"], "embedding": pa.FixedSizeListArray.from_arrays(pa.array(good[0]), 4)}),
                   tmp_path / "one.parquet")
    _one_line_error(_cli(tmp_path, "import", "--from", "one.parquet", "--out", "notes.h5"), "not a feature store")
    assert (tmp_path / "notes.h5").read_text() == "not a store"


# -- the scikit-learn transformer -----------------------------------------------------------------------------------

def test_feature_encoder_in_a_pipeline_caches_in_a_store(tmp_path, small_digits_root, store):
    import pickle

    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    from pipeline.interchange.encoder import FeatureEncoder

    fs = load_store(store)  # the same images through `extract` with the same backbone
    train, test = fs.mask("train"), fs.mask("test")
    paths = np.array([str(small_digits_root / i) for i in fs.ids], dtype=object)
    cache = tmp_path / "cache.h5"
    encoder = FeatureEncoder(backbone=TINY_BACKBONE, store=cache, random_init=True, device="cpu")
    model = Pipeline([("features", encoder), ("head", LogisticRegression(max_iter=2000))])
    model.fit(paths[train], fs.labels[train])
    np.testing.assert_allclose(encoder.transform(paths[train][:5]), fs.features[train][:5], atol=1e-5)
    before = load_store(cache)
    assert len(before) == int(train.sum()) and before.made.source == "encoder"
    stamp = cache.stat().st_mtime_ns
    direct = LogisticRegression(max_iter=2000).fit(fs.features[train], fs.labels[train])
    assert (model.predict(paths[test]) == direct.predict(fs.features[test])).mean() >= 0.95  # same model, same data
    after = load_store(cache)
    assert len(after) == len(fs) and cache.stat().st_mtime_ns != stamp
    kept = {i: n for n, i in enumerate(after.ids)}
    np.testing.assert_array_equal(after.features[[kept[i] for i in before.ids]], before.features)  # bit for bit
    stamp = cache.stat().st_mtime_ns
    np.testing.assert_allclose(encoder.transform(paths), fs.features, atol=1e-5)  # all cached: no rewrite
    assert cache.stat().st_mtime_ns == stamp
    # a changed file is recomputed; the pipeline pickles without its model and clones as an estimator
    changed = tmp_path / "changed.png"
    shutil.copy(paths[0], changed)
    first = encoder.transform([changed])
    shutil.copy(paths[1], changed)
    np.testing.assert_allclose(encoder.transform([changed])[0], fs.features[1], atol=1e-5)
    assert not np.allclose(first, fs.features[1])
    again = pickle.loads(pickle.dumps(model))
    assert "_built" not in again.named_steps["features"].__dict__
    np.testing.assert_array_equal(again.predict(paths[test]), model.predict(paths[test]))
    assert clone(encoder).get_params() == encoder.get_params()
    with pytest.raises(PipelineError, match="cannot read the image"):
        encoder.transform([tmp_path / "missing.png"])


def test_exact_neighbors_breaks_ties_to_the_lower_index_across_blocks():
    rng = np.random.default_rng(2)
    bank = rng.integers(-2, 3, size=(300, 8)).astype(np.float32)  # small integers: every product exact
    bank[150:] = bank[:150]  # every row twice: every similarity is tied, and many more by chance
    queries = bank[:40] + 0
    idx, _ = exact_neighbors(bank, queries, 6, block=64, query_block=16)
    np.testing.assert_array_equal(idx, np.lexsort((np.broadcast_to(np.arange(300), (40, 300)), -(queries @ bank.T)),
                                                  axis=1)[:, :6])


def test_the_package_says_what_it_holds():
    import pipeline.interchange

    assert all(word in pipeline.interchange.__doc__ for word in ("export", "import", "FeatureEncoder"))


def test_import_reads_what_hugging_face_datasets_writes(store, tmp_path):
    import datasets

    fs = load_store(store)
    written = datasets.Dataset.from_dict({"image_path": [str(i) for i in fs.ids], "label": fs.labels.tolist(),
                                          "split": fs.splits.tolist(), "embeddings": fs.features.tolist()})
    written.to_parquet(str(tmp_path / "hf.parquet"))  # a variable-length list<float> column, as datasets writes it
    assert pa.types.is_list(pq.read_schema(tmp_path / "hf.parquet").field("embeddings").type)
    import_features(tmp_path / "hf.parquet", tmp_path / "hf.h5", backbone="hf")
    back = load_store(tmp_path / "hf.h5")
    assert back.ids.tolist() == fs.ids.tolist() and back.splits.tolist() == fs.splits.tolist()
    np.testing.assert_allclose(back.features, fs.features, rtol=1e-6)  # float64 lists back to float32
    assert back.labels.tolist() == fs.labels.tolist()


def test_import_into_float16_keeps_unit_rows_and_normalises_large_ones(tmp_path):
    rng = np.random.default_rng(3)
    unit = rng.normal(size=(20, 16)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    rows = np.concatenate([unit, unit[:5] * 1e6])  # too large for float16 as given
    table = pa.table({"id": [f"r{i}" for i in range(25)],
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), 16)})
    pq.write_table(table, tmp_path / "big.parquet")
    result = import_features(tmp_path / "big.parquet", tmp_path / "h.h5", feature_dtype="float16")
    fs = load_store(tmp_path / "h.h5")
    assert result.normalized == 5 and fs.attrs["feature_dtype"] == "float16"
    with h5py.File(tmp_path / "h.h5", "r") as f:
        stored = f["features"][...]
    np.testing.assert_array_equal(stored[:20], unit.astype(np.float16))  # unit rows: the cast, bit for bit
    np.testing.assert_allclose(stored[20:].astype(np.float32), unit[:5], atol=2e-3)


def test_the_default_alpha_leaves_existing_stores_fingerprints_and_keys_as_they_were():
    from pipeline.store.schema import cache_key

    # what Decoding().as_attrs() was before the policy existed: its hash is in every store's data fingerprint
    assert Decoding().as_attrs() == {"max_pixels": 89_478_485, "max_aspect": 16.0, "alpha_background": [255, 255, 255],
                                     "plugins": [], "max_file_bytes": 1 << 30}
    same = dict(backbone="b", weights="w", preprocessing="{}", layer="pre_logits")
    assert cache_key(**same) == cache_key(**same, alpha="white") != cache_key(**same, alpha="drop")
    assert Decoding.from_attrs(Decoding(alpha="10,20,30").as_attrs()).alpha == "10,20,30"
    assert Decoding.from_attrs({"alpha_background": [255, 255, 255]}).alpha == "white"


def test_an_input_size_the_model_cannot_take_is_one_line(tmp_path, small_digits_root):
    with pytest.raises(PipelineError, match=r"does not take input of size \[160, 160\].*its own is \[224, 224\]"):
        create_backbone("timm:vit_tiny_patch16_224", random_init=True, overrides={"input_size": [3, 160, 160]})
    proc = _cli(tmp_path, "extract", "--data", str(small_digits_root), "--out", "v.h5", "--backbone",
                "timm:vit_tiny_patch16_224", "--random-init", "--img-size", "160", "--workers", "0")
    _one_line_error(proc, "does not take input of size")
    assert not (tmp_path / "v.h5").exists()


def test_export_within_a_small_max_memory_writes_the_same_rows_in_smaller_parts(store, tmp_path):
    """`export --max-memory`: a part asked for beyond the budget is made smaller (said on stderr); the rows, their
    order and the ground truth are those of an export without the limit."""
    import pyarrow.dataset as pads

    dim = load_store(store).features.shape[1]
    export_store(store, tmp_path / "free", format="parquet")
    budget = 40 * 4 * 4 * dim  # parts of 40 rows
    run = subprocess.run([sys.executable, "-m", "pipeline", "export", "--store", str(store), "--format", "parquet",
                          "--out", "small", "--max-memory", str(budget)], cwd=tmp_path, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    assert "writing parts of 40 rows" in run.stderr
    free, small = pads.dataset(tmp_path / "free").to_table(), pads.dataset(tmp_path / "small").to_table()
    assert small.equals(free) and len(list((tmp_path / "small").glob("*.parquet"))) == -(-free.num_rows // 40)
    export_store(store, tmp_path / "ann", format="ann-benchmarks", k=10)
    export_store(store, tmp_path / "ann_small", format="ann-benchmarks", k=10, max_memory=budget)
    with h5py.File(tmp_path / "ann" / "dataset.hdf5") as a, h5py.File(tmp_path / "ann_small" / "dataset.hdf5") as b:
        for name in ("train", "test", "neighbors", "distances"):
            np.testing.assert_array_equal(a[name][...], b[name][...])
