"""A fine-tuned top as a file, and applying it to new images.

`finetune` saves `NAME.finetune.safetensors`: the head's weight and bias, the state of the blocks it trained (only
those: the rest of the network comes from the backbone's own weights, which are checked to be the same), the class
list and the feature space, in safetensors (arrays only; nothing is unpickled). Loading checks the format, the
metadata's types, that every array is finite and that every trained tensor is one of the rebuilt top's with the same
shape, so a file from someone else can neither run code nor silently give wrong numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.backbones.model import Backbone
from pipeline.backbones.top import Top, build_top
from pipeline.errors import PipelineError
from pipeline.plan import Provenance

MODEL_FORMAT = "featpipe-finetune/1"
MODEL_SUFFIX = ".model.safetensors"
MAX_MODEL_BYTES = 4 << 30
_META_TYPES: dict[str, type | tuple[type, ...]] = {
    "format": str, "spatial_layer": str, "blocks": int, "class_names": list, "classes": list, "test_top1": (int, float),
    "store": str, "cache_key": str, "random_init": bool, "backbone": str, "weights": str, "layer": str,
    "preprocessing": str, "feature_dim": int, "alpha": str, "precision": str,
}


def build_for_store(made: Provenance, *, device: torch.device | str = "cpu",
                    weights_path: str | Path | None = None) -> tuple[Backbone, Top]:
    """The store's backbone (checked to be the one that made it) keeping its spatial layer, and the top after it."""
    from pipeline.engine.embed import backbone_for

    backbone = backbone_for(made, device=str(device), weights_path=weights_path, keep=made.spatial_layer)
    if made.spatial_shape and list(backbone.spatial_shape) != list(made.spatial_shape):
        raise PipelineError(f"{made.backbone} gives activations of shape {list(backbone.spatial_shape)} after "
                            f"{made.spatial_layer}, the store holds {made.spatial_shape}; extract it again")
    return backbone, build_top(backbone.model, made.spatial_layer, backbone.data_config["input_size"])


def model_outputs(config: Any) -> dict[str, Path]:
    """Every file `run_finetune` writes, checked before training."""
    from pipeline.evaluation.probes import default_results_path
    from pipeline.outputs import check_output, owned_json, results_stem, sibling
    from pipeline.report.render import check_report_outputs

    out = Path(config.out) if config.out else default_results_path(Path(config.store), "finetune")
    stem = results_stem(out)
    targets = {"results": check_output(out, owned=owned_json("finetune-results"), overwrite=config.overwrite,
                                       protect=[config.store]),
               "model": check_output(sibling(stem, MODEL_SUFFIX), owned=_owned_model, overwrite=config.overwrite,
                                     protect=[config.store], what="the model file")}
    if config.report:
        check_report_outputs(stem, overwrite=config.overwrite, protect=[config.store])
    return {**targets, "stem": stem, "out": out}


def is_tuned_model(path: str | Path) -> bool:
    """Whether a file is a fine-tuned model (by its metadata, not its name), for `predict --head`."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("featpipe") or "{}"
        return json.loads(raw).get("format") == MODEL_FORMAT
    except Exception:  # noqa: BLE001 - not readable as one: the head loader gives the error
        return False


def _owned_model(path: Path) -> bool:
    try:
        _read(path)
    except PipelineError:
        return False
    return True


def model_bytes(backbone: Backbone, top: Top, head: torch.nn.Linear, classes: np.ndarray, *, blocks: int, fs: Any,
                result: dict[str, Any]) -> bytes:
    """The trained part of the model as safetensors bytes (see the module docstring)."""
    from safetensors.torch import save

    trained = [f"blocks.{i}." for i in range(top.frozen_prefix(blocks), len(top.blocks))] + ["tail."] if blocks else []
    tensors = {f"top.{k}": v.detach().cpu().contiguous() for k, v in top.state_dict().items()
               if any(k.startswith(p) for p in trained)}
    tensors["head.weight"] = head.weight.detach().cpu().contiguous()
    tensors["head.bias"] = head.bias.detach().cpu().contiguous()
    made = fs.made
    meta = {"format": MODEL_FORMAT, "spatial_layer": made.spatial_layer, "blocks": int(blocks),
            "class_names": list(fs.class_names), "classes": [int(c) for c in classes],
            "test_top1": float(result["test_top1"]), "store": str(Path(fs.path).resolve()),
            "cache_key": made.cache_key, "random_init": bool(made.random_init), "precision": made.precision or "fp32",
            **made.feature_space()}
    return save(tensors, metadata={"featpipe": json.dumps(meta)})


def _refuse(path: Path, why: str) -> PipelineError:
    return PipelineError(f"{path} is not a fine-tuned model this tool can use ({why}); fine-tune again with "
                         "python -m pipeline finetune --store STORE.h5")


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not path.is_file():
        raise PipelineError(f"no fine-tuned model at {path}; make one with: python -m pipeline finetune --store S.h5")
    if path.stat().st_size > MAX_MODEL_BYTES:
        raise _refuse(path, f"larger than {MAX_MODEL_BYTES >> 30} GiB")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("featpipe")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        meta = json.loads(raw) if raw else None
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign file: one line, whatever went wrong
        raise _refuse(path, f"unreadable: {type(exc).__name__}") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise _refuse(path, "no featpipe-finetune metadata")
    for key, kind in _META_TYPES.items():
        if not isinstance(meta.get(key), kind) or (kind is int and isinstance(meta.get(key), bool)):
            raise _refuse(path, f"metadata field {key!r} is missing or not {getattr(kind, '__name__', kind)}")
    if not all(isinstance(c, str) for c in meta["class_names"]):
        raise _refuse(path, "class names that are not strings")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise _refuse(path, f"tensor {bad[0]!r} is not finite")
    return meta, tensors


@dataclass
class TunedModel:
    """A loaded fine-tuned model: backbone (keeping the spatial layer), rebuilt top with its trained state, head."""

    backbone: Backbone
    top: Top
    head: torch.nn.Linear
    meta: dict[str, Any]

    @torch.inference_mode()
    def scores(self, images: torch.Tensor) -> np.ndarray:
        """Class probabilities [n, classes] for a batch of transformed images."""
        _, kept = self.backbone.features_and_activations(images)
        return torch.softmax(self.head(self.top(kept)), dim=1).float().cpu().numpy()


def load_tuned(path: str | Path, *, device: str = "auto", weights_path: str | Path | None = None) -> TunedModel:
    """Load and check a fine-tuned model file, rebuilding its backbone and top (see the module docstring)."""
    path = Path(path)
    meta, tensors = _read(path)
    made = Provenance.from_attrs({**{k: meta[k] for k in ("backbone", "weights", "layer", "random_init",
                                                          "spatial_layer", "precision")},
                                  "preprocessing": meta["preprocessing"], "feature_dim": meta["feature_dim"]})
    backbone, top = build_for_store(made, device=device, weights_path=weights_path)
    if backbone.dim != meta["feature_dim"]:
        raise _refuse(path, f"its backbone gives {backbone.dim}-d features, the file says {meta['feature_dim']}")
    state = top.state_dict()
    for key, value in tensors.items():
        if key.startswith("top."):
            name = key[4:]
            if name not in state or tuple(state[name].shape) != tuple(value.shape):
                raise _refuse(path, f"tensor {key!r} is not a parameter of the rebuilt network")
            state[name] = value
    top.load_state_dict(state)
    weight, bias = tensors.get("head.weight"), tensors.get("head.bias")
    n = len(meta["classes"])
    if weight is None or bias is None or tuple(weight.shape) != (n, backbone.dim) or tuple(bias.shape) != (n,):
        raise _refuse(path, f"the head must be [{n}, {backbone.dim}] and [{n}] for its {n} classes")
    if any(not isinstance(c, int) or not 0 <= c < len(meta["class_names"]) for c in meta["classes"]):
        raise _refuse(path, "classes outside its class list")
    head = torch.nn.Linear(backbone.dim, n)
    head.load_state_dict({"weight": weight, "bias": bias})
    return TunedModel(backbone, top.to(backbone.device).eval(), head.to(backbone.device).eval(), meta)


def predict_images_tuned(model: TunedModel, paths: list[str | Path], *, top: int = 1,
                         batch_size: int = 32) -> list[dict[str, Any]]:
    """The `top` (class, probability) pairs for each image file, decoded as the store's images were."""
    from pipeline.engine.embed import transformed_files
    from pipeline.engine.resolve import decoding_policy
    from pipeline.plan import DecodeSpec

    decoding = decoding_policy(model.backbone.data_config, DecodeSpec(alpha=model.meta["alpha"]))
    tensors, _ = transformed_files(paths, model.backbone.transform, decoding)
    scores = np.concatenate([model.scores(torch.stack(tensors[i:i + batch_size]))
                             for i in range(0, len(tensors), batch_size)])
    names, classes = model.meta["class_names"], model.meta["classes"]
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
    return [{"id": str(p), "predictions": [(names[classes[j]], float(scores[i, j])) for j in row]}
            for i, (p, row) in enumerate(zip(paths, order, strict=True))]
