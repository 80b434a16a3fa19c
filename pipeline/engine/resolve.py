"""An extraction resolved once: the source listed, the backbone built, the decoding policy, the cache key, the data
fingerprint and the store's provenance, computed in one place (`resolve_plan`) for the runner, sharded runs and
the up-to-date check alike."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.backbones.factory import create_backbone
from pipeline.backbones.model import Backbone, transform_text
from pipeline.config import DEFAULT_ALPHA
from pipeline.engine.decode import MAX_ASPECT, Decoding, load_plugins
from pipeline.errors import PipelineError, StoreError
from pipeline.outputs import check_writable_dir
from pipeline.plan import DecodeSpec, ExtractConfig, Provenance
from pipeline.sources import open_source
from pipeline.sources.base import ListOptions, Source
from pipeline.sources.lookup import sample_path
from pipeline.sources.stream import is_stream
from pipeline.sources.table import SPLIT_CODES, SampleTable, SplitColumn, TextColumn
from pipeline.store.read import check_target, is_current, known_hashes, read_attrs, read_columns
from pipeline.store.reuse import Listing
from pipeline.store.schema import cache_key, layout_attrs, library_versions


def absolute_data(data: str | Path) -> str:
    """`--data` as recorded: absolute (a shard pattern keeps its braces and globs), so that the store finds its
    images again from any working directory; `torchvision:NAME` as given."""
    text = str(data)
    if text.startswith("torchvision:") or is_stream(text):
        return text
    return os.path.abspath(os.path.expanduser(text))


def list_options(config: ExtractConfig, *, known: bool = True) -> ListOptions:
    """How to list the source; with `known`, content hashes already recorded in the store at `config.out` are reused
    for the stratified split, so only new or changed files are read to place them."""
    s = config.source
    return ListOptions(test_fraction=s.test_fraction, seed=s.seed, split=s.split, root=s.root, download=s.download,
                       follow_links=s.follow_links, max_file_bytes=config.decode.max_file_bytes,
                       known=known_hashes(Path(config.out)) if known else None)


def data_options(config: ExtractConfig) -> dict[str, Any]:
    """How to open the source again (for search results and report image grids)."""
    s = config.source
    return {"root": str(Path(s.root).resolve()) if s.root else None, "test_fraction": s.test_fraction,
            "seed": s.seed, "split": s.split, "follow_links": s.follow_links,
            "max_file_bytes": config.decode.max_file_bytes}


def decoding_policy(data_config: dict, decode: DecodeSpec | None = None) -> Decoding:
    """The one derivation of how files become this backbone's input: the limits, the plugins, and the aspect guard
    (only for resize-shorter-side + centre-crop transforms, which only see the middle anyway)."""
    decode = decode or DecodeSpec()
    centre = data_config.get("crop_mode", "center") == "center"
    return Decoding(max_pixels=decode.max_pixels, plugins=tuple(decode.image_plugins),
                    max_aspect=MAX_ASPECT if centre else None, max_file_bytes=decode.max_file_bytes,
                    alpha=decode.alpha)


def open_source_with_views(config: ExtractConfig) -> Source:
    """The configured source, listed, with its augmented view rows when --views is given."""
    from pipeline.sources.views import with_views

    return with_views(open_source(config.source.data, list_options(config)), config.source.views,
                      seed=config.source.seed)


def source_listing(source: Source) -> Listing:
    """What the store must hold for this source: every sample with its stamp, and how to hash its content (a
    table's columns as they are)."""
    samples = source.samples
    if isinstance(samples, SampleTable):
        return Listing(ids=samples.ids, labels=samples.labels, splits=samples.splits, stamps=samples.stamps,
                       hasher=source.content_hash, paths=samples.paths)
    return Listing(ids=[s.id for s in samples], labels=np.array([s.label for s in samples], dtype=np.int64),
                   splits=[s.split for s in samples], stamps=source.stamps(), hasher=source.content_hash,
                   paths=[sample_path(source.kind, s) for s in samples])


def data_fingerprint(source: Source, listing: Listing, decoding: Decoding) -> str:
    """Hash of the listing (ids, labels, splits, stamps), the class names and the decoding policy: changes when any
    input changes (a new decoding policy retries the images that failed under the old one), and the paths the
    store's path column records (images moved under the same ids and stamps)."""
    digest = fingerprint_digest(source.class_names, decoding)
    for start in range(0, len(listing), _FINGERPRINT_BLOCK):
        digest.update(listing_lines(listing, start, start + _FINGERPRINT_BLOCK))
    if listing.paths is not None:
        paths = listing.paths if hasattr(listing.paths, "digest_into") else TextColumn.from_strings(listing.paths)
        digest.update(b"paths\0")
        paths.digest_into(digest)  # a TextColumn's offsets and bytes; a FileColumn's the same, a block at a time
    return digest.hexdigest()[:32]


def source_stamp(kind: str, stamp: str, fingerprint: str, options: dict[str, Any], decoding: Decoding) -> str:
    """What the store records so that the up-to-date check need not list the source again ("" when it must): the
    source's own `stamp` (tar shards: their stats, `Source.stamp`) bound to the fingerprint the listing gave, to how
    it was listed (`data_options`) and to the decoding policy, the other inputs of that fingerprint."""
    if not stamp:
        return ""
    bound = json.dumps([kind, stamp, fingerprint, options, decoding.as_attrs()], sort_keys=True)
    return hashlib.sha256(bound.encode()).hexdigest()[:32]


def fingerprint_digest(class_names: Sequence[str], decoding: Decoding) -> Any:
    """The fingerprint's hash before the rows: the class names, then the decoding policy."""
    digest = hashlib.sha256(json.dumps(list(class_names)).encode())
    digest.update(json.dumps(decoding.as_attrs(), sort_keys=True).encode())
    return digest


_FINGERPRINT_BLOCK = 1 << 18  # rows formatted at a time: about 60 MB of arrow temporaries
_TEXT = pa.large_string()


def _text(values: Any, start: int, stop: int) -> pa.Array:
    if isinstance(values, TextColumn):
        return values.block(start, stop).to_arrow()
    if isinstance(values, SplitColumn):
        return pa.array(SPLIT_CODES, _TEXT).take(pa.array(values.codes[start:stop]))
    if isinstance(values, np.ndarray):
        return pa.array(values[start:stop]).cast(_TEXT)
    return pa.array(values[start:stop], _TEXT)


def listing_lines(listing: Listing, start: int, stop: int) -> bytes:
    """Rows start..stop of the listing as the fingerprint hashes them, `id\0label\0split\0size\0mtime\n` each
    (UTF-8), formatted by arrow's kernels a block at a time rather than by Python row by row."""
    stamps = listing.stamps[start:stop]
    line = pc.binary_join_element_wise(
        _text(listing.ids, start, stop), _text(listing.labels, start, stop), _text(listing.splits, start, stop),
        _text(stamps[:, 0], 0, None), _text(stamps[:, 1], 0, None), pa.scalar("\0", _TEXT))
    line = pc.binary_join_element_wise(line, pa.scalar("\n", _TEXT), pa.scalar("", _TEXT))
    if not len(line):
        return b""
    _, offsets, data = line.buffers()
    bounds = np.frombuffer(offsets, dtype=np.int64, count=len(line) + 1, offset=line.offset * 8)
    return data.slice(int(bounds[0]), int(bounds[-1] - bounds[0])).to_pybytes()


def backbone_key(backbone: Backbone, feature_dtype: str, alpha: str = DEFAULT_ALPHA, spatial_dtype: str = "",
                 views: str = "") -> str:
    spatial = f"{backbone.spatial_layer}:{spatial_dtype}" if backbone.spatial_layer else ""
    return cache_key(backbone=backbone.name, weights=backbone.weights, preprocessing=backbone.preprocessing_json(),
                     layer=backbone.layer, feature_dtype=feature_dtype, precision=backbone.precision, alpha=alpha,
                     spatial=spatial, views=views)


def view_policy(config: ExtractConfig, backbone: Backbone) -> tuple[Any, str]:
    """With --views: the training transform of the view rows and how the cache key spells it; else (None, "")."""
    if not config.source.views:
        return None, ""
    from pipeline.backbones.factory import training_transform

    train = training_transform(backbone)
    return train, f"{transform_text(train)} seed={config.source.seed}"


def check_output_path(out: Path) -> None:
    """Before any compute: `--out` is a file path whose folder can be written (with room for `.partial`/`.lock`)."""
    if out.is_dir():
        raise StoreError(f"--out {out} is a folder; give the store's file path, e.g. {out / 'features.h5'}")
    check_writable_dir(out.parent, what="--out", path=out)


def check_same_dataset(out: Path, data: str, ids: list[str], *, overwrite: bool) -> None:
    """Refuse to turn a store of one data set into a store of another: when `--data` is not the recorded source and
    fewer than half of the store's images are in it, that is another data set, not the same one moved."""
    if overwrite or not data or not out.is_file():
        return
    try:
        recorded = read_attrs(out).get("data", "")
        stored = read_columns(out, "ids")["ids"] if recorded and recorded != data else None
    except PipelineError:
        return
    if stored is None or not len(stored):
        return
    shared = len(set(stored.tolist()) & set(ids))
    if shared < len(stored) / 2:
        raise StoreError(f"{out} holds features of {recorded} ({len(stored)} images, {shared} of them in --data "
                         f"{data}); choose another --out for this data set, or pass --overwrite to replace it")


@dataclass
class Plan:
    """Everything an extraction computed before any image went through the model."""

    config: ExtractConfig
    source: Source
    backbone: Backbone
    decoding: Decoding
    listing: Listing
    key: str
    fingerprint: str
    data: str  # the source as recorded ("" when the source was passed in)
    optimize: bool  # trace the backbone for CPU before computing (only a backbone built here)
    train_transform: Any = None  # --views: the seeded augmentation of the view rows

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    def layout(self) -> dict[str, Any]:
        return layout_attrs(shard_rows=self.config.layout.shard_rows, compression=self.config.layout.compression)

    def is_current(self) -> bool:
        run = self.config.run
        return not run.overwrite and not run.check_content and is_current(
            self.out, key=self.key, fingerprint=self.fingerprint, layout=self.layout(), data=self.data)

    def check_target(self) -> None:
        """The store at `out` may be updated by this run (same configuration and data set, or --overwrite)."""
        check_target(self.out, key=self.key, overwrite=self.config.run.overwrite)
        check_same_dataset(self.out, self.data, self.listing.ids, overwrite=self.config.run.overwrite)

    def provenance(self, backbone: Backbone) -> Provenance:
        source, b = self.source, backbone
        return Provenance(
            backbone=b.name, weights=b.weights, random_init=b.random_init, layer=b.layer,
            preprocessing=b.data_config, precision=b.precision, optimization=b.optimization, feature_dim=b.dim,
            cache_key=self.key, class_names=list(source.class_names), decoding=self.decoding.as_attrs(),
            data=self.data, data_options=data_options(self.config) if self.data else {},
            data_root=str(source.root.resolve()), source=source.kind, source_description=source.description,
            split_source=source.split_source, label_source=source.label_source, num_images=len(source),
            data_fingerprint=self.fingerprint, versions=library_versions(), preprocessing_overrides=b.overrides,
            transform=transform_text(b.transform), spatial_layer=b.spatial_layer or "",
            spatial_shape=list(b.spatial_shape), spatial_dtype=self.spatial_dtype, views=self.config.source.views,
            view_transform=transform_text(self.train_transform) if self.train_transform is not None else "",
            source_stamp=source_stamp(source.kind, source.stamp if self.data else "", self.fingerprint,
                                      data_options(self.config), self.decoding))

    @property
    def spatial_dtype(self) -> str:
        return self.config.layout.spatial_dtype if self.backbone.spatial_layer else ""


def build_backbone(config: ExtractConfig) -> Backbone:
    m = config.model
    spatial = m.keeps_spatial()
    return create_backbone(m.backbone, device=config.run.device, random_init=m.random_init, weights_path=m.weights,
                           layer=None if spatial else m.layer, precision=m.precision, compile=m.compile,
                           overrides=m.preprocessing_overrides(), keep=m.layer if spatial else None)


def plan_key(config: ExtractConfig, backbone: Backbone, decoding: Decoding) -> str:
    """The cache key of the store this configuration makes with this backbone."""
    return backbone_key(backbone, config.layout.feature_dtype, decoding.alpha,
                        config.layout.spatial_dtype if backbone.spatial_layer else "", view_policy(config, backbone)[1])


def resolve_plan(config: ExtractConfig, *, backbone: Backbone | None = None, source: Source | None = None,
                 optimize: bool | None = None) -> Plan:
    """List the source (or take `source`), build the backbone (or take `backbone`), and derive the decoding policy,
    cache key and fingerprint. Problems of the input are errors here, before any compute. The backbone is traced
    for CPU before computing when `optimize` (default: when it is built here) and the configuration asks for it."""
    check_output_path(Path(config.out))
    given = source is not None
    source = source if given else open_source_with_views(config)
    load_plugins(config.decode.image_plugins)  # a missing plugin is an error now, not a failure for every image
    optimize = backbone is None if optimize is None else optimize
    backbone = build_backbone(config) if backbone is None else backbone
    decoding = decoding_policy(backbone.data_config, config.decode)
    listing = source_listing(source)
    train, _ = view_policy(config, backbone)
    return Plan(config=config, source=source, backbone=backbone, decoding=decoding, listing=listing,
                key=plan_key(config, backbone, decoding), train_transform=train,
                fingerprint=data_fingerprint(source, listing, decoding),
                data="" if given else absolute_data(config.source.data), optimize=optimize and config.model.optimize)
