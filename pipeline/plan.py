"""The typed spec of an extraction, and the record of what produced a store.

`ExtractConfig` nests five specs (source, model, decoding, layout, run). Each field is declared once, here, with its
default, its check and its command-line flag: the CLI (`pipeline.cli.extract`), the YAML run config
(`pipeline.run_config`), `bench` and the demo all build this one type, so no default is written twice.
`ExtractConfig.of(data=..., out=..., workers=0)` takes the fields by their (unique) names.

`Provenance` is what a store records about how its features were made: the only code that writes provenance
attributes (`to_attrs`) or reads them back (`from_attrs`, `from_store`); embedding new images, merging shards,
predicting, searching and the reports all go through it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pipeline.config import (
    COMPRESSIONS,
    DEFAULT_ALPHA,
    DEFAULT_BACKBONE,
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_PIXELS,
    FEATURE_DTYPES,
    INTERPOLATIONS,
    PLUGIN_SPEC,
    PRECISIONS,
    SPLIT_MODES,
    parse_alpha,
)
from pipeline.errors import ConfigError


def option(default: Any, help: str, *, flag: str | None = None, parse: str | None = None, **cli: Any) -> Any:
    """A spec field: its default, its help, and how the CLI spells it (`flag`, default `--name-with-dashes`;
    `parse`: the name of a `pipeline.cli.types` parser; other argparse keywords as given)."""
    return field(default=default, metadata={"help": help, "flag": flag, "parse": parse, "cli": cli})


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True, kw_only=True)
class SourceSpec:
    """Which images, and how they are listed, labelled and split (see `pipeline.sources`)."""

    data: str | Path = option(None, "image folder (ROOT/<class>/<img> or ROOT/<split>/<class>/<img>), manifest "
                                    "(.csv, .parquet, .jsonl: path[,label,split,id]), WebDataset tar shards (a .tar, a "
                                    "folder of them, or 'shards-{000..009}.tar'), or torchvision:NAME with --root",
                              required=True)
    root: Path | None = option(None, "torchvision:NAME only: the folder holding its files", parse="path")
    download: bool = option(False, "torchvision:NAME only: fetch the files into --root when they are missing "
                                   "(needs a network)")
    test_fraction: float = option(0.3, "share of each class sent to test when the source gives no splits "
                                       "(default 0.3)", parse="open_unit")
    seed: int = option(0, "seed of that split (default 0)", parse="int")
    split: str = option("auto", "auto: the source's own splits when it gives them (split folders, a split column, "
                                "shard names), else stratified by content; stratified: always stratified, ignoring "
                                "them", choices=SPLIT_MODES)
    follow_links: bool = option(False, "read symbolic links that lead out of the data folder (by default they are "
                                       "not followed)")
    views: int = option(0, "also store K augmented views of every training image (the model's training transform, "
                           "seeded by --seed), as rows <id>#view<k>; val and test images get none",
                        parse="non_negative_int", metavar="K")

    def __post_init__(self) -> None:
        _check(isinstance(self.test_fraction, int | float) and 0.0 < self.test_fraction < 1.0,
               f"test_fraction must be in (0, 1), got {self.test_fraction}")
        _check(self.split in SPLIT_MODES, f"split must be one of {', '.join(SPLIT_MODES)}, got {self.split!r}")
        _check(isinstance(self.views, int) and 0 <= self.views <= 1000, f"views must be 0 to 1000, got {self.views!r}")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Which backbone, with which weights, and how its forward pass runs (see `pipeline.backbones`)."""

    backbone: str = option(DEFAULT_BACKBONE, f"registered name, timm:<model> or torchvision:<model> "
                                             f"({DEFAULT_BACKBONE})")
    weights: Path | None = option(None, "local .pth/.safetensors for the architecture (strict)", parse="path")
    random_init: bool = option(False, "untrained weights (recorded in the store)")
    layer: str | None = option(None, "pool this module's output (e.g. layer3) instead of the pre-logits")
    precision: str = option("auto", "autocast dtype: auto = bf16 (or fp16) on CUDA, fp32 on CPU; fp32 forces full "
                                    "precision", choices=PRECISIONS)
    keep_spatial: bool = option(False, "also store the un-pooled output of --layer (e.g. layer3: 1024x14x14 for "
                                       "ResNet-50) next to the pre-logits features, for finetune")
    compile: bool = option(False, "torch.compile the model (slow start, faster after)")
    optimize: bool = option(True, "plain eager forward pass (by default on CPU a frozen TorchScript trace is used "
                                  "when it reproduces eager)", flag="--eager")
    # Preprocessing overrides, as timm's validate.py spells them; recorded in the store and its cache key.
    img_size: int | None = option(None, "input size (square) instead of the weights' own", parse="positive_int",
                                  metavar="PIXELS")
    crop_pct: float | None = option(None, "centre-crop fraction (crop = resize x crop_pct) instead of the weights' "
                                          "own", parse="unit")
    interpolation: str | None = option(None, "resize interpolation instead of the weights' own",
                                       choices=INTERPOLATIONS)
    mean: tuple[float, float, float] | None = option(None, "normalisation mean R,G,B instead of the weights' own",
                                                     parse="channel_triple", metavar="R,G,B")
    std: tuple[float, float, float] | None = option(None, "normalisation std R,G,B instead of the weights' own",
                                                    parse="channel_triple", metavar="R,G,B")

    def __post_init__(self) -> None:
        _check(self.img_size is None or (isinstance(self.img_size, int) and self.img_size >= 1),
               f"img_size must be an integer >= 1, got {self.img_size!r}")
        _check(self.crop_pct is None or (math.isfinite(self.crop_pct) and 0 < self.crop_pct <= 1),
               f"crop_pct must be in (0, 1], got {self.crop_pct!r}")
        _check(self.interpolation is None or self.interpolation in INTERPOLATIONS,
               f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(float(v) for v in value)
                _check(len(value) == 3 and all(math.isfinite(v) for v in value),
                       f"{name} must be three finite numbers (R,G,B), got {value!r}")
                _check(name == "mean" or all(v > 0 for v in value), f"std must be positive, got {value!r}")
                object.__setattr__(self, name, value)

    def keeps_spatial(self) -> bool:
        """--keep-spatial given, checked: it needs the module whose output to keep."""
        _check(not self.keep_spatial or bool(self.layer), "--keep-spatial needs --layer MODULE: the block whose "
                                                           "un-pooled output to store (e.g. --layer layer3)")
        return self.keep_spatial

    def preprocessing_overrides(self) -> dict[str, Any]:
        """The overrides given, in timm's data-config keys (empty: the weights' own preprocessing)."""
        out: dict[str, Any] = {}
        if self.img_size is not None:
            out["input_size"] = [3, int(self.img_size), int(self.img_size)]
        for name in ("crop_pct", "interpolation"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        for name in ("mean", "std"):
            if getattr(self, name) is not None:
                out[name] = list(getattr(self, name))
        return out


@dataclass(frozen=True, kw_only=True)
class DecodeSpec:
    """How files become images, and in how many processes (see `pipeline.engine.decode`)."""

    workers: int | None = option(None, "decode worker processes (default: cores - 1, at least 1, at most 16); 0 "
                                       "decodes in this process: a little faster on 2 cores, but a decoder crash or "
                                       "hang then stops the run", parse="non_negative_int")
    max_pixels: int | None = option(DEFAULT_MAX_PIXELS, f"refuse images with more pixels, as decompression bombs "
                                                        f"(default {DEFAULT_MAX_PIXELS:,}; 0: no limit)",
                                    parse="max_pixels", metavar="N")
    max_file_bytes: int | None = option(DEFAULT_MAX_FILE_BYTES, "refuse image files (and tar members) larger than "
                                                                "this before reading them (default 1GiB; 0: no "
                                                                "limit)", parse="byte_size", metavar="SIZE")
    decode_timeout: float = option(60.0, "a batch slower than this to decode is checked image by image; an image "
                                         "that takes this long alone, twice, is recorded as failed (default 60)",
                                   parse="positive_float", metavar="SECONDS")
    image_plugins: tuple[str, ...] = option((), "Pillow plugin to load in the decoders, e.g. "
                                                "pillow_heif:register_heif_opener (repeatable)",
                                            flag="--image-plugin", action="append", metavar="MODULE[:register...]")
    alpha: str = option(DEFAULT_ALPHA, "transparency: composited over white (default), black or R,G,B, or drop "
                                       "(as timm's, torchvision's and open_clip's loaders do: convert('RGB'))",
                        parse="alpha", metavar="drop|white|black|R,G,B")

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_plugins", tuple(self.image_plugins or ()))
        try:
            object.__setattr__(self, "alpha", parse_alpha(self.alpha))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        _check(self.workers is None or self.workers >= 0, f"workers must be >= 0, got {self.workers}")
        _check(self.max_pixels is None or self.max_pixels >= 1,
               f"max_pixels must be >= 1 (or None for no limit), got {self.max_pixels}")
        _check(self.max_file_bytes is None or self.max_file_bytes >= 1,
               f"max_file_bytes must be >= 1 (or None for no limit), got {self.max_file_bytes}")
        _check(math.isfinite(self.decode_timeout) and self.decode_timeout > 0,
               f"decode_timeout must be a finite number of seconds > 0, got {self.decode_timeout}")
        bad = [p for p in self.image_plugins if not PLUGIN_SPEC.fullmatch(p)]
        _check(not bad, f"--image-plugin {bad[0]!r} is not MODULE or MODULE:register_FUNCTION (only registration "
                        "hooks named register... are called), e.g. pillow_heif:register_heif_opener" if bad else "")


@dataclass(frozen=True, kw_only=True)
class LayoutSpec:
    """How the features are stored (see `pipeline.store`); none of it changes a feature's bytes but the dtype."""

    feature_dtype: str = option("float32", "feature storage type; float16 halves the size (default float32)",
                                flag="--dtype", choices=FEATURE_DTYPES)
    compression: str = option("none", "HDF5 compression of the features", choices=COMPRESSIONS)
    shard_rows: int | None = option(None, "write fixed-size shards of N rows plus one entry file (for millions of "
                                          "images)", parse="positive_int")
    spatial_dtype: str = option("float16", "storage type of --keep-spatial activations (default float16)",
                                choices=FEATURE_DTYPES)

    def __post_init__(self) -> None:
        _check(self.feature_dtype in FEATURE_DTYPES, f"feature dtype {self.feature_dtype!r} is not one of "
                                                     f"{FEATURE_DTYPES}")
        _check(self.compression in COMPRESSIONS, f"compression {self.compression!r} is not one of {COMPRESSIONS}")
        _check(self.shard_rows is None or self.shard_rows >= 1, f"shard_rows must be >= 1, got {self.shard_rows}")
        _check(self.spatial_dtype in FEATURE_DTYPES, f"spatial dtype {self.spatial_dtype!r} is not one of "
                                                     f"{FEATURE_DTYPES}")


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """Where and how this run computes and writes."""

    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    batch_size: int | None = option(64, "images per forward pass, or 'auto' (the largest that fits on a GPU; 64 on "
                                        "CPU)", parse="batch_size")
    overwrite: bool = option(False, "replace whatever is at --out (another configuration, or recompute every row)")
    check_content: bool = option(False, "hash every image to find changes that keep the size and mtime (slower)")
    lock_timeout: float = option(0.0, "wait this long for another run writing the same store (default: fail at "
                                      "once)", flag="--wait", parse="non_negative_float", metavar="SECONDS")
    progress: bool = option(True, "", flag="")  # progress bars (the CLI's --quiet turns them off)

    def __post_init__(self) -> None:
        _check(isinstance(self.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
               f"unknown device {self.device!r}; use auto, cpu, cuda or cuda:N")
        _check(self.batch_size is None or self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(math.isfinite(self.lock_timeout) and self.lock_timeout >= 0,
               f"the lock wait (--wait) must be a finite number of seconds >= 0, got {self.lock_timeout}")


SPECS = {"source": SourceSpec, "model": ModelSpec, "decode": DecodeSpec, "layout": LayoutSpec, "run": RunSpec}
_OWNER = {f.name: part for part, cls in SPECS.items() for f in fields(cls)}  # field name -> the spec it belongs to


@dataclass(frozen=True)
class ExtractConfig:
    """What `extract` needs: the image source, the store to write, and how to run the backbone."""

    source: SourceSpec
    out: Path
    model: ModelSpec = ModelSpec()
    decode: DecodeSpec = DecodeSpec()
    layout: LayoutSpec = LayoutSpec()
    run: RunSpec = RunSpec()

    @classmethod
    def of(cls, *, out: str | Path, **flat: Any) -> ExtractConfig:
        """Build from fields given by name, e.g. `ExtractConfig.of(data="images", out="s.h5", workers=0)`."""
        unknown = sorted(set(flat) - set(_OWNER))
        if unknown:
            raise ConfigError(f"unknown extract option(s) {unknown}; valid ones: {', '.join(sorted(_OWNER))}")
        parts: dict[str, dict[str, Any]] = {name: {} for name in SPECS}
        for name, value in flat.items():
            parts[_OWNER[name]][name] = value
        return cls(out=Path(out), **{name: SPECS[name](**values) for name, values in parts.items()})

    def replace(self, **flat: Any) -> ExtractConfig:
        """A copy with some fields (by name, `out` included) changed."""
        out = flat.pop("out", self.out)
        parts = {name: dataclasses.replace(getattr(self, name), **{k: v for k, v in flat.items()
                                                                    if _OWNER.get(k) == name})
                 for name in SPECS}
        unknown = sorted(set(flat) - set(_OWNER))
        if unknown:
            raise ConfigError(f"unknown extract option(s) {unknown}")
        return ExtractConfig(out=Path(out), **parts)


def spec_fields(part: str) -> list[dataclasses.Field]:
    """The fields of one part of an extraction spec ("source", "model", ...), for the CLI and the run config."""
    return list(fields(SPECS[part]))


# -- provenance ------------------------------------------------------------------------------------------------------

_JSON = ("preprocessing", "class_names", "decoding", "data_options", "versions", "preprocessing_overrides",
         "spatial_shape")


@dataclass(frozen=True)
class Provenance:
    """What a store records about how its features were made, typed. Attributes that are JSON in the file
    (preprocessing, class names, decoding, data options, versions) are Python values here."""

    backbone: str
    weights: str
    random_init: bool
    layer: str
    preprocessing: dict
    precision: str
    optimization: str
    feature_dim: int
    cache_key: str
    class_names: list[str]
    decoding: dict
    data: str
    data_options: dict
    data_root: str
    source: str
    source_description: str
    split_source: str
    label_source: str
    num_images: int
    data_fingerprint: str
    versions: dict = field(default_factory=dict)
    normalized: bool = True
    preprocessing_overrides: dict = field(default_factory=dict)  # what --img-size, --crop-pct, ... changed
    transform: str = ""  # the transform that ran, as its library prints it (torchvision's own preset, or timm's)
    spatial_layer: str = ""  # --keep-spatial: the module whose un-pooled output is in `spatial` ("" when none)
    spatial_shape: list = field(default_factory=list)  # that output's shape per image
    spatial_dtype: str = ""
    views: int = 0  # --views: augmented views stored per training image
    view_transform: str = ""  # their transform, as its library prints it
    source_stamp: str = ""  # tar shards: their stats bound to the fingerprint they gave (`engine.current`)

    def to_attrs(self) -> dict[str, Any]:
        """The store attributes: JSON strings for the structured ones (h5py stores only plain values)."""
        return {f.name: json.dumps(getattr(self, f.name), sort_keys=True) if f.name in _JSON else getattr(self, f.name)
                for f in fields(self)}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> Provenance:
        """Read back from a store's attributes (stores written before a field existed get its neutral value)."""
        values = {}
        for f in fields(cls):
            raw = attrs.get(f.name)
            if f.name in _JSON:
                try:
                    raw = json.loads(raw) if isinstance(raw, str) and raw else None
                except ValueError:
                    raw = None
                raw = raw if raw is not None else ([] if f.name in ("class_names", "spatial_shape") else {})
            elif raw is None:
                raw = {"random_init": False, "feature_dim": 0, "num_images": 0, "normalized": True,
                       "views": 0}.get(f.name, "")
            values[f.name] = raw
        return cls(**values)

    @classmethod
    def from_store(cls, path: str | Path) -> Provenance:
        from pipeline.store.read import read_attrs

        return cls.from_attrs(read_attrs(path))

    def preprocessing_json(self) -> str:
        return json.dumps(self.preprocessing, sort_keys=True)

    def feature_space(self) -> dict[str, Any]:
        """What decides which features a head or an index fits: backbone, weights, layer, preprocessing, the alpha
        policy and the dimension (as a saved head records them)."""
        return {"backbone": self.backbone, "weights": self.weights, "layer": self.layer,
                "preprocessing": self.preprocessing_json(), "feature_dim": int(self.feature_dim),
                "alpha": self.alpha}

    @property
    def alpha(self) -> str:
        """How transparency was handled (stores made before the policy existed: composited over white)."""
        return str(self.decoding.get("alpha") or DEFAULT_ALPHA) if isinstance(self.decoding, dict) else DEFAULT_ALPHA
