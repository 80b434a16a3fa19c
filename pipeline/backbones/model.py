"""The feature model: one face over timm and torchvision classifiers (the input of the final classifier, or a
pooled intermediate layer), and `Backbone`, a frozen extractor with its transform, weights id and forward pass."""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

PRE_LOGITS = "pre_logits"
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class _LayerReached(Exception):
    """Raised by a forward hook to stop the network once the requested layer has produced its output."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output


def _module_path_of_final_linear(net: torch.nn.Module) -> str:
    linears = [(name, m) for name, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise PipelineError(f"{type(net).__name__} has no final Linear classifier, so its penultimate layer is not "
                            "defined; pass --layer MODULE to pool an intermediate block instead")
    return linears[-1][0]


def _set_module(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def module_named(net: torch.nn.Module, name: str) -> torch.nn.Module:
    """A module of the network by its `named_modules()` name; unknown: close matches listed."""
    modules = dict(net.named_modules())
    if name not in modules or not name:
        close = difflib.get_close_matches(name, [n for n in modules if n], n=5)
        raise PipelineError(f"--layer {name!r} is not a module of this backbone; close matches: "
                            f"{', '.join(close) or 'none'}; module names are those of model.named_modules()")
    return modules[name]


def global_pool(x: torch.Tensor, *, channels_last_tokens: bool = False) -> torch.Tensor:
    """Pool a layer's output to [N, C]: mean over H, W of NCHW maps (or NHWC ones), over tokens of [N, L, C]."""
    if x.ndim == 2:
        return x
    if x.ndim == 3:
        return x.mean(dim=1)
    if x.ndim == 4:
        return x.mean(dim=(1, 2)) if channels_last_tokens else x.mean(dim=(2, 3))
    raise PipelineError(f"cannot pool a layer output of shape {tuple(x.shape)}; choose another --layer")


class FeatureModel(torch.nn.Module):
    """One face over timm and torchvision classifiers.

    `features(x)` is the input of the final classifier: timm's `forward_head(pre_logits=True)`, or for torchvision
    the network with its final Linear replaced by Identity (the Linear is the last operation of every torchvision
    classifier, so this includes hidden head layers such as MobileNetV3's and VGG's 4096-d fc7). With `layer`, it
    is that module's output, globally average-pooled, and the rest of the network is not run.
    """

    def __init__(self, net: torch.nn.Module, *, library: str, layer: str | None = None,
                 keep: str | None = None) -> None:
        super().__init__()
        self.net = net
        self.library = library
        if library == "timm":
            self.classifier = net.get_classifier()
        else:
            path = _module_path_of_final_linear(net)
            self.classifier = net.get_submodule(path)
            _set_module(net, path, torch.nn.Identity())
        self.layer = layer
        self._nhwc = getattr(net, "output_fmt", "NCHW") == "NHWC" or type(net).__name__.startswith("SwinTransformer")
        self._capture = False
        self.keep, self._keeping, self._kept = keep, False, None
        if layer is not None:
            module_named(net, layer).register_forward_hook(self._on_layer)
        if keep is not None:
            module_named(net, keep).register_forward_hook(self._on_keep)

    def _on_layer(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self._capture:
            raise _LayerReached(output[0] if isinstance(output, (tuple, list)) else output)

    def _on_keep(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self._keeping:
            self._kept = output[0] if isinstance(output, (tuple, list)) else output

    def features_and_activation(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The features and, from the same forward pass, the un-pooled output of the `keep` module."""
        self._keeping, self._kept = True, None
        try:
            feats = self.features(x)
        finally:
            self._keeping = False
        kept, self._kept = self._kept, None
        if kept is None:
            raise PipelineError(f"--layer {self.keep!r} did not run in the forward pass; choose another module")
        return feats, kept

    def _pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.library == "timm":
            return self.net.forward_head(self.net.forward_features(x), pre_logits=True)
        return self.net(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer is None:
            return self._pre_logits(x)
        self._capture = True
        try:
            self._pre_logits(x)
        except _LayerReached as reached:
            return global_pool(reached.output, channels_last_tokens=self._nhwc)
        finally:
            self._capture = False
        raise PipelineError(f"--layer {self.layer!r} did not run in the forward pass; choose another module")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self._pre_logits(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def transform_text(transform: Callable) -> str:
    """The transform that runs, as its library prints it, on one line (recorded in the store)."""
    return " ".join(repr(transform).split())


@dataclass(frozen=True, eq=False)
class Backbone:
    """A frozen feature extractor and everything needed to feed it and to identify its outputs."""

    name: str
    model: FeatureModel
    transform: Callable
    data_config: dict
    dim: int
    weights: str
    random_init: bool
    device: torch.device
    layer: str = PRE_LOGITS
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast dtype of the forward pass
    compiled: bool = False  # forward pass through torch.compile
    runner: Callable | None = None  # what runs the forward pass when not the eager model (compiled or frozen)
    optimization: str = "eager"  # eager | torch.compile | jit-freeze
    overrides: dict = dataclasses.field(default_factory=dict)  # preprocessing overrides applied to data_config
    spatial_layer: str | None = None  # --keep-spatial: the module whose un-pooled output is kept too
    spatial_shape: tuple[int, ...] = ()  # that output's shape for one image (e.g. (1024, 14, 14))

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, non_blocking=True, memory_format=torch.channels_last)

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (the input of the final classifier), or the pooled output of `layer`, as float32."""
        run = self.runner if self.runner is not None else self.model.features
        with torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES.get(self.precision),
                            enabled=self.precision != "fp32"):
            return run(self._to_device(images)).float()

    @torch.inference_mode()
    def features_and_activations(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`features` and the un-pooled output of `spatial_layer` from one forward pass, both float32."""
        with torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES.get(self.precision),
                            enabled=self.precision != "fp32"):
            feats, kept = self.model.features_and_activation(self._to_device(images))
        return feats.float(), kept.float()

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class scores of the backbone's own classifier (used to prove the weights are the real ones)."""
        return self.model.logits(self._to_device(images)).float()

    def optimized(self) -> Backbone:
        """This backbone with a faster CPU forward pass when one is safe, else itself.

        A TorchScript trace, frozen and optimised for inference (BatchNorm folded into convolutions, ops fused):
        measured 1.65x eager for EfficientNet-Lite0 on 2 cores. Tracing can bake in shapes or control flow, so the
        result is checked against eager on two batch sizes and dropped on any difference (cosine < 0.9999).
        Only for fp32 on CPU, without --layer and without torch.compile.
        """
        if (self.device.type != "cpu" or self.precision != "fp32" or self.layer != PRE_LOGITS or self.runner
                or self.spatial_layer):
            return self
        shape = self.data_config["input_size"]
        probe = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
        probe = probe.contiguous(memory_format=torch.channels_last)
        try:
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings: the check below decides
                frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(self.model, probe[:2])))
                for n in (1, 3):
                    eager, traced = self.model.features(probe[:n]).float(), frozen(probe[:n]).float()
                    cosine = torch.nn.functional.cosine_similarity(eager, traced, dim=-1)
                    if eager.shape != traced.shape or not bool((cosine >= 0.9999).all()):
                        raise ValueError(f"traced output differs from eager (cosine {cosine.min().item():.6f})")
        except Exception as exc:  # noqa: BLE001 - any failure means: stay eager
            log.info("%s stays eager: tracing did not reproduce it (%s)", self.name, str(exc).splitlines()[0][:200])
            return self
        return dataclasses.replace(self, runner=frozen, optimization="jit-freeze")

    def preprocessing_json(self) -> str:
        """The resolved data config in timm's keys, as stored in the feature store."""
        return json.dumps(self.data_config, sort_keys=True)
