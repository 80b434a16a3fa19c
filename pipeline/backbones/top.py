"""The top of a backbone: the part of the network after one of its blocks, rebuilt from the same module objects (so
the same weights), taking that block's cached output (`extract --layer BLOCK --keep-spatial`) to the pre-logits
features. `finetune` trains its trailing blocks with a new head, without re-running the trunk below.

Networks are a stem, a trunk of blocks and a tail. The trunk is found by name: timm's `blocks` / `stages` / `layers`
(EfficientNet, MobileNet, ViT, ConvNeXt, Swin, ...) and `features` (torchvision's EfficientNet, MobileNet, ConvNeXt,
VGG), or ResNet's `layer1`..`layer4`. The tail after the trunk differs by family; the candidates are tried and the
one that reproduces the original forward pass from that block on a probe batch is kept, so a network this does not
understand is refused, never rebuilt wrong.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import torch

from pipeline.backbones.model import FeatureModel
from pipeline.errors import PipelineError

TRUNKS = ("blocks", "stages", "layers", "features")
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
# What timm's forward_features runs after the trunk, by family (tried in order, the first that reproduces it wins).
TIMM_TAILS = ((), ("conv_head", "bn2"), ("norm",), ("norm_pre",))
MATCH_TOLERANCE = 1e-4  # max |rebuilt - original| relative to the features' scale on the probe batch


class Top(torch.nn.Module):
    """Activations of one block -> pre-logits features: the trunk's later `blocks`, then the family's tail and
    pooling (`finish`). Its parameters are the backbone's own modules (shared, not copied)."""

    def __init__(self, blocks: list[torch.nn.Module], tail: list[torch.nn.Module],
                 finish: Callable[[torch.Tensor], torch.Tensor], *, layer: str) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)
        self.tail = torch.nn.ModuleList(tail)
        self._finish = finish
        self.layer = layer

    def frozen_prefix(self, trained_blocks: int) -> int:
        """How many leading blocks stay frozen when the last `trained_blocks` (and the tail) are trained."""
        return max(0, len(self.blocks) - trained_blocks)

    def run_blocks(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        for block in list(self.blocks)[start:stop]:
            x = block(x)
        return x

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.tail:
            x = module(x)
        return self._finish(x)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Pre-logits features from the activations (or, with `start`, from the output of block `start - 1`)."""
        return self.finish(self.run_blocks(x, start))


def _trunk_after(net: torch.nn.Module, layer: str) -> tuple[list[torch.nn.Module], str]:
    """The blocks after `layer` and the trunk's name; an error naming the blocks that can be used otherwise."""
    if layer in RESNET_STAGES and all(hasattr(net, s) for s in RESNET_STAGES):
        return [getattr(net, s) for s in RESNET_STAGES[RESNET_STAGES.index(layer) + 1:]], "layer"
    found = re.fullmatch(r"([A-Za-z_]+)\.(\d+)", layer)
    if found and found.group(1) in TRUNKS and isinstance(getattr(net, found.group(1), None), torch.nn.Sequential):
        trunk, k = getattr(net, found.group(1)), int(found.group(2))
        if k < len(trunk):
            return list(trunk)[k + 1:], found.group(1)
    usable = [f"{name}.{k}" for name in TRUNKS if isinstance(getattr(net, name, None), torch.nn.Sequential)
              for k in range(len(getattr(net, name)))]
    if all(hasattr(net, s) for s in RESNET_STAGES):
        usable = list(RESNET_STAGES)
    raise PipelineError(f"finetune cannot rebuild the network after --layer {layer!r}: it needs a block of the "
                        f"backbone's trunk ({', '.join(usable[-6:]) or 'none found for this architecture'}); "
                        "extract again with one of them")


def _candidates(model: FeatureModel, trunk: str) -> list[tuple[list[torch.nn.Module], Callable]]:
    """(tail modules, finish) pairs that may follow the trunk in this network's forward pass."""
    net = model.net
    if model.library == "timm":
        def head(x: torch.Tensor) -> torch.Tensor:
            return net.forward_head(x, pre_logits=True)

        return [([getattr(net, n) for n in names], head) for names in TIMM_TAILS
                if all(isinstance(getattr(net, n, None), torch.nn.Module) for n in names)]
    pool = getattr(net, "avgpool", torch.nn.Identity())
    rest = [getattr(net, n) for n in ("fc", "classifier") if isinstance(getattr(net, n, None), torch.nn.Module)]

    def finish(x: torch.Tensor, *, flatten: bool) -> torch.Tensor:
        x = torch.flatten(pool(x), 1) if flatten else pool(x)
        for module in rest:
            x = module(x)
        return x

    return [([], functools.partial(finish, flatten=True)), ([], functools.partial(finish, flatten=False))]


def build_top(model: FeatureModel, layer: str, input_size: tuple[int, ...] | list[int]) -> Top:
    """The network after `layer`, checked on a probe batch to give the backbone's own features from that layer's
    output (in eval mode, fp32). `model` must keep `layer` (`FeatureModel(keep=layer)`)."""
    if model.keep != layer:
        raise PipelineError(f"the backbone keeps {model.keep!r}, not {layer!r}")
    blocks, trunk = _trunk_after(model.net, layer)
    probe = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    param = next(model.parameters())
    probe = probe.to(param.device)
    was_training = model.training
    model.eval()
    tried = []
    with torch.no_grad():
        features, kept = model.features_and_activation(probe)
        scale = float(features.abs().max().clamp_min(1e-6))
        for tail, finish in _candidates(model, trunk):
            top = Top(blocks, tail, finish, layer=layer)
            try:
                rebuilt = top(kept)
            except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
                tried.append(type(exc).__name__)
                continue
            if rebuilt.shape == features.shape and float((rebuilt - features).abs().max()) / scale < MATCH_TOLERANCE:
                model.train(was_training)
                return top
            tried.append("different output")
    model.train(was_training)
    raise PipelineError(f"finetune cannot rebuild {type(model.net).__name__} after {layer!r}: no known tail "
                        f"reproduces its forward pass ({', '.join(tried) or 'no candidate'}); supported are timm and "
                        "torchvision CNNs and ViTs whose blocks are a Sequential trunk")
