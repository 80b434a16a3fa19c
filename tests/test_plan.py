"""The one extraction spec (`pipeline.plan`): every surface builds it with the same defaults and checks, and
`Provenance` is the one reader and writer of what made a store."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.cli import build_parser, library_commands
from pipeline.cli.extract import config_from_args
from pipeline.errors import ConfigError
from pipeline.plan import SPECS, ExtractConfig, ModelSpec, Provenance, spec_fields
from pipeline.recipe import extract_config, store_for
from pipeline.run_config import DatasetSpec, ExtractSpec, RunConfig
from pipeline.store.read import read_attrs
from tests.conftest import TINY_BACKBONE


def _parse(*argv: str):
    return build_parser(library_commands()).parse_args(list(argv))


def test_fields_are_routed_to_their_spec_by_name():
    config = ExtractConfig.of(data="imgs", out="s.h5", workers=0, backbone="timm:x", feature_dtype="float16",
                              batch_size=8, seed=3)
    assert (config.decode.workers, config.model.backbone, config.layout.feature_dtype, config.run.batch_size,
            config.source.seed) == (0, "timm:x", "float16", 8, 3)
    assert config.out == Path("s.h5")
    names = [f.name for part in SPECS for f in spec_fields(part)]
    assert len(names) == len(set(names)), "a field name in two specs could not be routed by name"
    with pytest.raises(ConfigError, match=r"unknown extract option\(s\) \['wokers'\]"):
        ExtractConfig.of(data="imgs", out="s.h5", wokers=0)


def test_replace_changes_only_the_named_fields():
    config = ExtractConfig.of(data="imgs", out="s.h5", workers=0, seed=3)
    changed = config.replace(out="t.h5", batch_size=16)
    assert changed.out == Path("t.h5") and changed.run.batch_size == 16
    assert (changed.decode, changed.source, changed.model) == (config.decode, config.source, config.model)
    with pytest.raises(ConfigError, match="unknown"):
        config.replace(batchsize=16)


@pytest.mark.parametrize(("flat", "message"), [
    ({"test_fraction": 1.0}, "test_fraction"), ({"workers": -1}, "workers"), ({"decode_timeout": float("nan")},
                                                                                 "decode_timeout"),
    ({"device": "gpu"}, "unknown device"), ({"image_plugins": ["os:system"]}, "register"),
    ({"shard_rows": 0}, "shard_rows")])
def test_each_spec_checks_its_own_fields(flat, message):
    with pytest.raises(ConfigError, match=message):
        ExtractConfig.of(data="imgs", out="s.h5", **flat)


def test_the_cli_builds_the_spec_with_the_specs_own_defaults():
    args = _parse("extract", "--data", "imgs", "--out", "s.h5")
    assert config_from_args(args, out=args.out) == ExtractConfig.of(data="imgs", out="s.h5")
    flagged = [f for part in SPECS for f in spec_fields(part) if f.metadata["flag"] != ""]
    assert all(hasattr(args, f.name) for f in flagged)  # every field with a flag is a CLI argument
    args = _parse("extract", "--data", "imgs", "--out", "s.h5", "--workers", "0", "--dtype", "float16", "--eager",
                  "--batch-size", "auto", "--max-pixels", "0", "--image-plugin", "pillow_heif:register_heif_opener")
    config = config_from_args(args, out=args.out)
    assert (config.decode.workers, config.layout.feature_dtype, config.model.optimize, config.run.batch_size,
            config.decode.max_pixels, config.decode.image_plugins) == (
        0, "float16", False, None, None, ("pillow_heif:register_heif_opener",))


def test_bench_takes_the_spec_flags_it_passes_on_with_the_same_defaults():
    args = _parse("bench", "--data", "imgs", "--backbones", "a,b")
    defaults = ExtractConfig.of(data="imgs", out="s.h5")
    assert (args.batch_size, args.workers, args.device, args.random_init) == (
        defaults.run.batch_size, defaults.decode.workers, defaults.run.device, defaults.model.random_init)


def test_the_run_config_has_the_specs_fields_defaults_and_checks():
    section = ExtractSpec()
    spec_defaults = {f.name: f.default for part in ("model", "decode", "layout", "run") for f in spec_fields(part)}
    # shards and dask_address say how the run is spread over processes, not what is extracted
    for name, value in section.model_dump(exclude={"shards", "dask_address"}).items():
        default = spec_defaults[name]
        assert value == default, name
    assert section.shards == 1 and section.dask_address is None
    with pytest.raises(ValidationError, match="dask_address"):
        ExtractSpec(dask_address="")
    with pytest.raises(ValidationError, match="decode_timeout must be a finite number"):
        ExtractSpec(decode_timeout=-1.0)
    with pytest.raises(ValidationError, match="test_fraction must be in"):
        DatasetSpec(name="d", data="imgs", test_fraction=0.0)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ExtractSpec(batchsize=3)


def test_a_yaml_run_and_the_cli_extract_the_same_way_by_default(tmp_path):
    config = RunConfig(name="r", datasets=[{"name": "d", "data": "imgs"}], backbones=["b"])
    from_yaml = extract_config(config.datasets[0], "b", tmp_path, config.extract, progress=True)
    out = store_for(tmp_path, "d", "b")
    args = _parse("extract", "--data", "imgs", "--out", str(out), "--backbone", "b")
    assert from_yaml == config_from_args(args, out=args.out)


def test_provenance_round_trips_through_store_attributes(tmp_path, small_digits_root):
    from pipeline.engine.runner import extract_to_store

    out = tmp_path / "s.h5"
    extract_to_store(ExtractConfig.of(data=small_digits_root, out=out, backbone=TINY_BACKBONE, random_init=True,
                                      workers=0, progress=False))
    made = Provenance.from_store(out)
    assert made.backbone == TINY_BACKBONE and made.random_init and made.feature_dim > 0
    assert made.num_images == 100 and len(made.class_names) == 10 and made.decoding
    assert Provenance.from_attrs(made.to_attrs()) == made
    attrs = read_attrs(out)
    assert {k: attrs[k] for k in made.to_attrs()} == made.to_attrs()  # what the store holds is what it wrote
    older = {k: v for k, v in made.to_attrs().items() if k not in ("decoding", "normalized", "optimization")}
    legacy = Provenance.from_attrs(older)
    assert (legacy.decoding, legacy.normalized, legacy.optimization) == ({}, True, "")
    assert dataclasses.replace(legacy, decoding=made.decoding, optimization=made.optimization) == made


def test_model_spec_defaults_are_the_documented_ones():
    spec = ModelSpec()
    assert (spec.precision, spec.optimize, spec.compile, spec.layer) == ("auto", True, False, None)
