"""The penultimate layer across families: features must equal the input of the final classifier, captured by a
forward hook on an independently built copy of the original model (same seed, random init)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image

from pipeline.backbones.factory import create_backbone
from pipeline.backbones.families import torchvision_weights_file
from pipeline.backbones.weights import file_sha256
from pipeline.errors import PipelineError, UnknownBackboneError

# (name, path of the final classifier in the original model, expected feature dimension)
FAMILIES = [
    ("torchvision:alexnet", "classifier.6", 4096),
    ("torchvision:vgg16", "classifier.6", 4096),
    ("torchvision:resnet18", "fc", 512),
    ("torchvision:resnet50", "fc", 2048),
    ("torchvision:mobilenet_v2", "classifier.1", 1280),
    ("torchvision:mobilenet_v3_small", "classifier.3", 1024),
    ("torchvision:densenet121", "classifier", 1024),
    ("torchvision:efficientnet_b0", "classifier.1", 1280),
    ("torchvision:convnext_tiny", "classifier.2", 768),
    ("torchvision:regnet_y_400mf", "fc", 440),
    ("torchvision:vit_b_16", "heads.head", 768),
    ("torchvision:swin_t", "head", 768),
    ("torchvision:shufflenet_v2_x0_5", "fc", 1024),
    ("torchvision:googlenet", "fc", 1024),
    ("torchvision:mnasnet0_5", "classifier.1", 1280),
    ("timm:resnet18", "fc", 512),
    ("timm:mobilenetv3_small_100", "classifier", 1024),  # pre-logits (1024) wider than num_features (576)
    ("timm:efficientnet_b0", "classifier", 1280),
    ("timm:convnext_atto", "head.fc", 320),
    ("timm:regnetx_002", "head.fc", 368),
    ("timm:vit_tiny_patch16_224", "head", 192),
    ("timm:deit_tiny_patch16_224", "head", 192),
    ("timm:eva02_tiny_patch14_336.mim_in22k_ft_in1k", "head", 192),
    ("timm:vit_base_patch16_clip_224.openai_ft_in1k", "head", 768),  # a CLIP image tower
    ("timm:densenet121", "classifier", 1024),
    ("timm:swin_tiny_patch4_window7_224", "head.fc", 768),
]


def _original(name: str) -> torch.nn.Module:
    library, arch = name.split(":", 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if library == "timm":
            return timm.create_model(arch, pretrained=False).eval()
        return torchvision.models.get_model(arch, weights=None).eval()


@pytest.mark.parametrize("name, classifier, dim", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_features_are_the_input_of_the_final_linear(name, classifier, dim):
    backbone = create_backbone(name, random_init=True)
    assert backbone.dim == dim
    original = _original(name)
    head = original.get_submodule(classifier)
    assert isinstance(head, torch.nn.Linear) and head.out_features == 1000
    captured = []
    head.register_forward_hook(lambda m, inp, out: captured.append(inp[0].flatten(1)))
    x = torch.randn(2, *backbone.data_config["input_size"], generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits = original(x)
    feats = backbone.features(x)
    assert feats.shape == (2, dim)
    ref = captured[-1]
    a, b = feats.double(), ref.double()  # random-init magnitudes can be ~1e-14: no eps, float64
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    assert float(cos.min()) > 0.9999, cos
    torch.testing.assert_close(feats, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
    torch.testing.assert_close(backbone.logits(x), logits, rtol=1e-3, atol=1e-3 * float(logits.abs().max()))
    cfg = backbone.data_config
    assert set(cfg) == {"input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode"}


def test_headless_models_give_their_pooled_embedding():
    """DINOv2 in timm has no classifier: its pre-logits are the pooled (class-token) embedding."""
    backbone = create_backbone("timm:vit_small_patch14_dinov2", random_init=True)
    original = _original("timm:vit_small_patch14_dinov2")
    x = torch.randn(1, *backbone.data_config["input_size"])
    with torch.inference_mode():
        ref = original.forward_head(original.forward_features(x), pre_logits=True)
    assert backbone.dim == original.num_features == 384
    torch.testing.assert_close(backbone.features(x), ref, rtol=1e-3, atol=1e-3)


def test_torchvision_preprocessing_is_the_weights_own():
    backbone = create_backbone("torchvision:resnet50", random_init=True)
    preset = torchvision.models.ResNet50_Weights.DEFAULT.transforms()
    assert backbone.data_config["input_size"] == [3, 224, 224] and backbone.data_config["interpolation"] == "bilinear"
    assert backbone.data_config["crop_pct"] == pytest.approx(224 / 232)
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    torch.testing.assert_close(backbone.transform(image), preset(image))


@pytest.mark.parametrize("layer, dim", [("layer3", 256), ("layer4", 512)])
def test_intermediate_layer_is_global_average_pooled(layer, dim):
    backbone = create_backbone("torchvision:resnet18", random_init=True, layer=layer)
    original = _original("torchvision:resnet18")
    captured = []
    original.get_submodule(layer).register_forward_hook(lambda m, i, out: captured.append(out))
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        original(x)
    feats = backbone.features(x)
    assert backbone.dim == dim and backbone.layer == f"{layer}:avgpool"
    torch.testing.assert_close(feats, captured[0].mean(dim=(2, 3)), rtol=1e-4, atol=1e-4)


def test_unknown_layer_lists_close_module_names():
    with pytest.raises(PipelineError, match="layer3"):
        create_backbone("torchvision:resnet18", random_init=True, layer="layer33")


def test_local_weights_file_loads_strictly(tmp_path):
    source = create_backbone("timm:resnet18", random_init=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        trained = timm.create_model("resnet18", pretrained=False)
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "ckpt.pth")
    from safetensors.torch import save_file

    save_file(trained.state_dict(), tmp_path / "ckpt.safetensors")
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        expected = trained.eval().forward_head(trained.forward_features(x), pre_logits=True)
    for path in (tmp_path / "ckpt.pth", tmp_path / "ckpt.safetensors"):
        backbone = create_backbone("timm:resnet18", weights_path=path)
        assert backbone.weights == f"file:{path.name}:sha256:{file_sha256(path)}" and not backbone.random_init
        torch.testing.assert_close(backbone.features(x), expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(source.features(x), expected)


def test_mismatched_checkpoint_lists_the_keys(tmp_path):
    state = timm.create_model("resnet18").state_dict()
    state.pop("fc.weight")
    state["extra.weight"] = torch.zeros(1)
    state["conv1.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(PipelineError) as err:
        create_backbone("timm:resnet18", weights_path=tmp_path / "bad.pth")
    message = str(err.value)
    assert "1 missing keys (fc.weight)" in message and "1 unexpected keys (extra.weight)" in message
    assert "conv1.weight" in message and "mis-shaped" in message
    with pytest.raises(PipelineError, match="does not exist"):
        create_backbone("timm:resnet18", weights_path=tmp_path / "none.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(PipelineError, match="cannot read"):
        create_backbone("timm:resnet18", weights_path=tmp_path / "junk.pth")


def test_torchvision_weights_resolve_from_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    expected = torchvision_weights_file(weights)
    assert expected.parent == tmp_path / "hub" / "checkpoints"
    with pytest.raises(PipelineError) as err:  # no file and no network: says where to put it
        create_backbone("torchvision:resnet18")
    assert str(expected) in str(err.value) and "TORCH_HOME" in str(err.value)
    expected.parent.mkdir(parents=True, exist_ok=True)
    state = _original("torchvision:resnet18").state_dict()
    torch.save(state, expected)
    backbone = create_backbone("torchvision:resnet18")
    assert backbone.weights == f"torchvision:ResNet18_Weights.IMAGENET1K_V1:sha256:{file_sha256(expected)}"


def test_unknown_torchvision_names_and_tags():
    with pytest.raises(PipelineError, match="torchvision:resnet50"):
        create_backbone("torchvision:resnet5O")
    with pytest.raises(PipelineError, match="IMAGENET1K_V2"):
        create_backbone("torchvision:resnet50.IMAGENET9K")


def test_timm_weights_resolve_from_the_hugging_face_cache(tmp_path):
    """A real HF cache layout (refs/main -> snapshot) for a timm tag; loaded offline, identified by sha256."""
    import os
    import subprocess
    import sys

    from safetensors.torch import save_file

    repo = tmp_path / "hub" / "models--timm--resnet18.a1_in1k"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    state = _original("timm:resnet18").state_dict()
    save_file(state, snapshot / "model.safetensors")
    code = ("from pipeline.backbones.factory import create_backbone; b = create_backbone('timm:resnet18.a1_in1k'); "
            "print(b.weights, b.random_init)")
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [f"timm:timm/resnet18.a1_in1k:sha256:{file_sha256(snapshot / 'model.safetensors')}",
                                  "False"]


def test_a_new_backbone_family_is_one_entry(monkeypatch):
    """The family registry is the only place that names families: add one, and its names build, pool the input
    of their final Linear, and are refused as registered names."""
    from pipeline.backbones import catalog

    family = catalog.Family("tiny:", "tests.helpers:load_tiny_family", "no listing")
    monkeypatch.setattr(catalog, "FAMILIES", (*catalog.FAMILIES, family))
    backbone = create_backbone("tiny:24")
    assert backbone.dim == 24 and backbone.weights == "tiny-24"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    features = backbone.features(backbone.transform(image)[None])
    assert features.shape == (1, 24)
    with pytest.raises(ValueError, match="family prefix"):
        catalog.register_backbone(catalog.BackboneSpec("tiny:x", "", lambda r: None, lambda: False))
    with pytest.raises(UnknownBackboneError, match="tiny:<model>"):
        create_backbone("tinyy:24")
