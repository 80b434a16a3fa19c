"""Spatial activations in the store, partial fine-tuning on them, and augmented views: real models (the packaged
EfficientNet-Lite0, timm and torchvision networks), real digit images, real HDF5 stores, the real CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.backbones.factory import create_backbone
from pipeline.backbones.top import build_top
from pipeline.cli import main
from pipeline.config import FinetuneConfig
from pipeline.engine.runner import extract_to_store
from pipeline.errors import PipelineError
from pipeline.evaluation.finetune import run_finetune
from pipeline.evaluation.finetune_model import load_tuned, predict_images_tuned
from pipeline.evaluation.probes import image_splits
from pipeline.plan import ExtractConfig
from pipeline.sources.views import view_mask, view_sources
from pipeline.store.read import load_store
from pipeline.store.schema import partial_path
from pipeline.store.spatial import SpatialReader
from pipeline.store.verify import verify_store
from tests.conftest import TINY_BACKBONE
from tests.test_resume import _kill_after

REPO = Path(__file__).resolve().parents[1]


def _digit_batch(root: Path, backbone, n: int = 6) -> torch.Tensor:
    files = sorted(root.rglob("*.png"))[:: max(1, len(sorted(root.rglob("*.png"))) // n)][:n]
    return torch.stack([backbone.transform(Image.open(f).convert("RGB")) for f in files])


@pytest.mark.parametrize("name, layer, random_init", [
    ("efficientnet_lite0", "blocks.4", False),  # the packaged CNN with its real weights
    (TINY_BACKBONE, "layer2", True),  # a timm ResNet
    ("timm:test_vit", "blocks.0", True),  # a timm ViT (class token, final norm, token pooling)
    ("torchvision:resnet18", "layer3", True),  # a torchvision network
])
def test_the_rebuilt_top_is_the_network_from_that_layer(small_digits_root, name, layer, random_init):
    backbone = create_backbone(name, random_init=random_init, keep=layer)
    top = build_top(backbone.model, layer, backbone.data_config["input_size"])
    images = _digit_batch(small_digits_root, backbone)
    with torch.no_grad():
        features, kept = backbone.features_and_activations(images)
        rebuilt = top(kept)
        plain = create_backbone(name, random_init=random_init).features(images)
    assert tuple(kept.shape[1:]) == backbone.spatial_shape and len(top.blocks) >= 1
    torch.testing.assert_close(rebuilt, features, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(features, plain, rtol=1e-4, atol=1e-4)  # keeping the layer changes nothing


def test_a_layer_outside_the_trunk_is_refused_in_one_line():
    backbone = create_backbone("efficientnet_lite0", keep="conv_stem")
    with pytest.raises(PipelineError, match="needs a block of the backbone's trunk.*blocks.6"):
        build_top(backbone.model, "conv_stem", backbone.data_config["input_size"])


def _extract(root, out, *, backbone="efficientnet_lite0", layer="blocks.4", **kw):
    config = ExtractConfig.of(data=root, out=out, backbone=backbone, layer=layer, keep_spatial=True, workers=0,
                              progress=False, batch_size=16, **kw)
    return extract_to_store(config)


@pytest.fixture(scope="module")
def spatial_store(tmp_path_factory, small_digits_root):
    """50 digits through EfficientNet-Lite0 keeping blocks.4 (112 x 14 x 14), with 2 augmented views per train
    image."""
    out = tmp_path_factory.mktemp("spatial") / "digits.h5"
    _extract(small_digits_root, out, views=2)
    return out


def test_spatial_activations_are_stored_beside_the_features(spatial_store):
    with h5py.File(spatial_store) as f:
        ds = f["spatial"]
        assert ds.shape[1:] == (112, 14, 14) and ds.dtype == np.float16 and ds.chunks == (1, 112, 14, 14)
        assert len(ds) == len(f["features"]) and f.attrs["spatial_layer"] == "blocks.4"
        assert f.attrs["layer"] == "pre_logits"  # the features are the usual pooled ones
        first = ds[0].astype(np.float32)
    fs = load_store(spatial_store, views=True)
    backbone = create_backbone("efficientnet_lite0", keep="blocks.4")
    with torch.no_grad():
        feats, kept = backbone.features_and_activations(
            backbone.transform(Image.open(Path(fs.made.data_root) / fs.ids[0]).convert("RGB"))[None])
    np.testing.assert_allclose(first, kept[0].numpy(), atol=2e-2, rtol=1e-2)  # float16 storage
    assert verify_store(spatial_store) == []


def test_the_cache_key_covers_the_spatial_layer_and_its_dtype(tmp_path, small_digits_root, spatial_store):
    plain = tmp_path / "plain.h5"
    extract_to_store(ExtractConfig.of(data=small_digits_root, out=plain, workers=0, progress=False))
    keys = {load_store(p).made.cache_key for p in (plain, spatial_store)}
    assert len(keys) == 2
    code = main(["--quiet", "extract", "--data", str(small_digits_root), "--out", str(plain), "--layer", "blocks.4",
                 "--keep-spatial", "--workers", "0"])
    assert code == 2  # another configuration at --out: refused, not mixed


def test_views_are_deterministic_train_only_and_left_out_unless_asked(tmp_path, small_digits_root, spatial_store):
    fs = load_store(spatial_store, views=True)
    views = view_mask(fs.ids, fs.attrs)
    sources = view_sources(fs.ids, fs.attrs)
    train_images = {str(i) for i, s, v in zip(fs.ids, fs.splits, views, strict=True) if s == "train" and not v}
    assert views.sum() == 2 * len(train_images) and set(fs.splits[views]) == {"train"}
    assert set(sources[views]) == train_images  # views of training images only, never of test ones
    assert len(load_store(spatial_store)) == len(fs) - views.sum()  # plain readers see each image once
    again = tmp_path / "again.h5"
    _extract(small_digits_root, again, views=2)
    other = tmp_path / "seed1.h5"
    _extract(small_digits_root, other, views=2, seed=1)
    with h5py.File(spatial_store) as a, h5py.File(again) as b, h5py.File(other) as c:
        rows = np.flatnonzero(views)
        np.testing.assert_array_equal(a["features"][rows], b["features"][rows])  # the same views on every run
        same = np.isclose(a["features"][rows], c["features"][rows], atol=1e-6).all(axis=1)
        assert not same.any()  # another seed, other views
    # validation is drawn from images; the views of a validation image are not trained on
    train, val, test, _ = image_splits(fs, val_fraction=0.2, seed=0)
    assert not views[val].any() and not views[test].any() and not views[train].any()
    held = {str(fs.ids[i]) for i in val}
    from pipeline.evaluation.probes import train_rows
    fit = train_rows(fs, train, views=True)
    assert not held & {str(s) for s in sources[fit] if s}


def test_finetune_lowers_validation_loss_and_keeps_the_best_epoch(tmp_path, spatial_store, small_digits_root):
    out = tmp_path / "ft.json"
    # learning rates that fit 40 images fast, so that validation loss turns up and the best epoch matters
    result, _ = run_finetune(FinetuneConfig(store=spatial_store, out=out, blocks=1, epochs=15, patience=4,
                                            lr_block=1e-3, lr_head=1e-2, batch_size=8, resamples=0))
    losses = [h["val_loss"] for h in result["history"]]
    assert min(losses) < result["initial_val_loss"] - 1.0  # training learns (an untrained head: about ln 10)
    best = int(np.argmin(losses)) + 1
    assert result["chosen"] == best < len(losses)  # a later epoch was worse: keeping the last would differ
    assert result["stopped_early"] and len(losses) == best + 4
    saved = json.loads(out.read_text())
    assert saved["test_top1"] == result["test_top1"] and saved["featpipe"]["kind"] == "finetune-results"
    report = (tmp_path / "ft.md").read_text()  # the report: the results row and one row per epoch
    assert f"finetune 1 block(s) (epoch {best})" in report and "| epoch | train loss | val loss |" in report
    # the saved model is the best epoch's: applied to the validation images it gives the best validation loss
    fs = load_store(spatial_store, views=True)
    _, val, test, _ = image_splits(fs, val_fraction=0.2, seed=0)
    model = load_tuned(result["model_file"], device="cpu")
    with SpatialReader(spatial_store) as reader, torch.no_grad():
        logits = model.head(model.top(torch.from_numpy(reader.read(val))))
    classes = list(model.meta["classes"])
    target = torch.tensor([classes.index(int(y)) for y in fs.labels[val]])
    assert float(torch.nn.functional.cross_entropy(logits, target)) == pytest.approx(min(losses), abs=2e-3)
    # and applied to the test images' files it gives the reported test top-1
    root = Path(fs.made.data_root)
    predictions = predict_images_tuned(model, [root / fs.ids[i] for i in test])
    right = [p["predictions"][0][0] == fs.class_names[fs.labels[i]] for p, i in zip(predictions, test, strict=True)]
    assert np.mean(right) == pytest.approx(result["test_top1"], abs=1.01 / len(test))


def test_finetune_and_predict_through_the_cli_from_another_directory(tmp_path, spatial_store, small_digits_root):
    work = tmp_path / "elsewhere"
    work.mkdir()
    store = shutil.copy(spatial_store, work / "s.h5")
    run = subprocess.run([sys.executable, "-m", "pipeline", "--quiet", "finetune", "--store", "s.h5", "--blocks",
                          "2", "--epochs", "2", "--views", "--resamples", "0", "--no-report"], cwd=work,
                         capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    result = json.loads((work / "s.finetune.json").read_text())
    assert result["blocks_trained"] == 2 and result["n_train_views"] > 0 and 0 <= result["test_top1"] <= 1
    image = sorted(Path(small_digits_root).rglob("*.png"))[0]
    run = subprocess.run([sys.executable, "-m", "pipeline", "--quiet", "predict", "--head",
                          "s.finetune.model.safetensors", str(image), "--top", "2"], cwd=work,
                         capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    header, row = run.stdout.strip().splitlines()
    assert header == "id,class_1,score_1,class_2,score_2" and row.startswith(str(image))
    assert Path(store).exists()


@pytest.mark.parametrize("argv, needles", [
    (["--blocks", "5"], ["only 2 block(s)", "earlier --layer"]),
    (["--views"], ["holds no augmented views"]),
])
def test_finetune_refusals_are_one_line(tmp_path, capsys, small_digits_root, argv, needles):
    store = tmp_path / "s.h5"
    _extract(small_digits_root, store)
    code = main(["--quiet", "finetune", "--store", str(store), "--epochs", "1", "--resamples", "0", *argv])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and all(n in err for n in needles), err


def test_finetune_refuses_a_store_without_activations_and_a_tampered_model(tmp_path, capsys, small_digits_root,
                                                                          spatial_store):
    plain = tmp_path / "plain.h5"
    extract_to_store(ExtractConfig.of(data=small_digits_root, out=plain, workers=0, progress=False))
    assert main(["--quiet", "finetune", "--store", str(plain)]) == 2
    assert "--keep-spatial" in capsys.readouterr().err
    result, _ = run_finetune(FinetuneConfig(store=spatial_store, out=tmp_path / "f.json", epochs=1, resamples=0,
                                            report=False))
    from safetensors.torch import load_file, save_file
    path = Path(result["model_file"])
    with open(path, "rb") as fh:
        header = json.loads(fh.read(8 + int.from_bytes(open(path, "rb").read(8), "little"))[8:])
    original = load_file(path)
    image = sorted(Path(small_digits_root).rglob("*.png"))[0]
    meta = json.loads(header["__metadata__"]["featpipe"])
    tampered = [
        ({**original, "head.weight": original["head.weight"].clone().fill_(float("nan"))}, meta, "not finite"),
        ({**original, "top.blocks.9.weight": torch.zeros(3)}, meta, "not a parameter of the rebuilt network"),
        (original, {**meta, "class_names": [{"x": 1}] * len(meta["class_names"])}, "not strings"),
        (original, {**meta, "classes": [99] * len(meta["classes"])}, "classes outside its class list"),
        (original, {**meta, "blocks": "1"}, "'blocks' is missing or not int"),
    ]
    for tensors, fields, needle in tampered:
        save_file(tensors, path, metadata={"featpipe": json.dumps(fields)})
        assert main(["--quiet", "predict", "--head", str(path), str(image)]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err


def test_a_killed_spatial_extraction_resumes_to_the_uninterrupted_store(tmp_path, digits_root):
    reference = tmp_path / "ref.h5"
    args = dict(backbone=TINY_BACKBONE, layer="layer2", random_init=True)
    _extract(digits_root, reference, **args)
    out = tmp_path / "s.h5"
    cli = [sys.executable, "-m", "pipeline", "-v", "extract", "--backbone", TINY_BACKBONE, "--random-init",
           "--workers", "0", "--batch-size", "16", "--layer", "layer2", "--keep-spatial"]
    _kill_after([*cli, "--data", str(digits_root), "--out", str(out)], 700)
    assert partial_path(out).exists() and not out.exists()
    result = _extract(digits_root, out, **args)
    assert result.resumed >= 600 and result.resumed + result.computed == 1797
    with h5py.File(reference) as a, h5py.File(out) as b:
        order = {i: k for k, i in enumerate(a["ids"].asstr()[:])}
        rows = np.array([order[i] for i in b["ids"].asstr()[:]])
        np.testing.assert_allclose(b["spatial"][:].astype(np.float32), a["spatial"][:][rows].astype(np.float32),
                                   atol=1e-2, rtol=1e-3)
        np.testing.assert_allclose(b["features"][:], a["features"][:][rows], atol=1e-5)
    assert verify_store(out) == []


def test_sharded_and_incremental_spatial_stores(tmp_path, small_digits_root):
    root = tmp_path / "digits"
    shutil.copytree(small_digits_root, root)
    single, sharded = tmp_path / "one.h5", tmp_path / "shards.h5"
    args = dict(backbone=TINY_BACKBONE, layer="layer2", random_init=True)
    _extract(root, single, **args)
    _extract(root, sharded, shard_rows=16, **args)
    with h5py.File(single) as a, h5py.File(sharded) as b:
        np.testing.assert_array_equal(a["spatial"][:], b["spatial"][:])  # the same rows through the shards
        before = {i: a["spatial"][k] for k, i in enumerate(a["ids"].asstr()[:])}
    new = root / "train" / "3" / "new.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (8, 8), dtype=np.uint8)).save(new)
    result = _extract(root, single, **args)
    assert result.computed == 1 and result.kept == len(before)
    with h5py.File(single) as f:
        after = {i: f["spatial"][k] for k, i in enumerate(f["ids"].asstr()[:])}
    assert all(np.array_equal(after[i], v) for i, v in before.items())  # kept rows copied bit for bit


def test_a_view_is_its_seed_s_and_leaves_the_callers_random_state_alone(small_digits_root):
    import random

    from pipeline.backbones.factory import training_transform
    from pipeline.engine.views import seeded

    backbone = create_backbone(TINY_BACKBONE, random_init=True)
    transform = training_transform(backbone)
    image = Image.open(sorted(Path(small_digits_root).rglob("*.png"))[0]).convert("RGB")
    state = (random.getstate(), torch.get_rng_state())
    a, b, c = seeded(transform, image, 7), seeded(transform, image, 7), seeded(transform, image, 8)
    assert random.getstate() == state[0] and torch.equal(torch.get_rng_state(), state[1])
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (3, *backbone.data_config["input_size"][1:])


def test_index_search_export_and_knn_see_each_image_once(tmp_path, spatial_store):
    import pyarrow.parquet as pq

    from pipeline.config import KnnConfig
    from pipeline.evaluation.knn import run_knn
    from pipeline.index.build import build_index
    from pipeline.index.search import search_store
    from pipeline.interchange.export import export_store

    images = load_store(spatial_store)
    assert len(load_store(spatial_store, views=True)) > len(images)
    infos = build_index(spatial_store, tmp_path / "index", queries=20)
    assert infos.rows == len(images)
    hits = search_store(index=tmp_path / "index", ids=[str(images.ids[3])], k=3)[0]["hits"]
    assert hits[0]["id"] == images.ids[3] and not any("#view" in h["id"] for h in hits)
    exact = search_store(store=spatial_store, ids=[str(images.ids[3])], k=len(images))[0]["hits"]
    assert exact[0]["id"] == images.ids[3] and len(exact) == len(images)
    export_store(spatial_store, tmp_path / "parquet", format="parquet")
    table = pq.read_table(tmp_path / "parquet")
    assert table.num_rows == len(images) and not any("#view" in i for i in table.column("id").to_pylist())
    result, _ = run_knn(KnnConfig(store=spatial_store, out=tmp_path / "knn.json", report=False, resamples=0))
    assert result["n_queries"] + result["n_bank"] == len(images)


def test_activations_read_per_batch_train_the_same_model_as_cached_ones(tmp_path, spatial_store):
    runs = [run_finetune(FinetuneConfig(store=spatial_store, out=tmp_path / f"{m}.json", blocks=2, epochs=2,
                                        max_memory=m, resamples=0, report=False))[0] for m in (1 << 30, 1)]
    assert runs[0]["activations_cached"] and not runs[1]["activations_cached"]
    for a, b in zip(runs[0]["history"], runs[1]["history"], strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)
    assert runs[0]["test_top1"] == runs[1]["test_top1"]


def test_more_views_compute_only_the_new_ones_and_a_plain_store_is_another_configuration(tmp_path,
                                                                                       small_digits_root):
    out = tmp_path / "s.h5"
    base = dict(data=small_digits_root, out=out, backbone=TINY_BACKBONE, random_init=True, workers=0,
                progress=False)
    first = extract_to_store(ExtractConfig.of(**base, views=1))
    train_images = int((load_store(out).splits == "train").sum())
    second = extract_to_store(ExtractConfig.of(**base, views=2))
    assert second.computed == train_images and second.kept == first.rows  # only the second view of each image
    with pytest.raises(PipelineError, match="--overwrite"):
        extract_to_store(ExtractConfig.of(**base))  # no views: another cache key


def test_damaged_activations_are_refused_not_trained_on(tmp_path, capsys, spatial_store):
    store = Path(shutil.copy(spatial_store, tmp_path / "s.h5"))
    with h5py.File(store, "r+") as f:
        f["spatial"][3, 0, 0, 0] = np.nan
    assert any("non-finite activations" in p for p in verify_store(store))
    assert main(["--quiet", "finetune", "--store", str(store), "--epochs", "1", "--resamples", "0"]) == 2
    err = capsys.readouterr().err
    assert "not finite" in err and len(err.strip().splitlines()) == 1, err
    with h5py.File(store, "r+") as f:  # activations of another shape than the backbone gives
        del f["spatial"]
        f.create_dataset("spatial", data=np.zeros((f.attrs["committed_rows"], 8, 2, 2), np.float16))
    assert main(["--quiet", "finetune", "--store", str(store), "--epochs", "1", "--resamples", "0"]) == 2
    assert "holds activations of shape [8, 2, 2]" in capsys.readouterr().err
