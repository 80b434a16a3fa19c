"""`extract`: its arguments come from the extraction spec (`pipeline.plan`): every option is declared there once,
with its default, its check and its flag, and this module only turns the fields into argparse arguments."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

from pipeline.cli import Command
from pipeline.cli.types import PARSERS
from pipeline.plan import SPECS, ExtractConfig, spec_fields


def add_spec_arguments(parser: argparse.ArgumentParser, *, only: Iterable[str] | None = None) -> None:
    """One argument per field of the extraction spec (all, or those named in `only`)."""
    wanted = set(only) if only is not None else None
    for part in SPECS:
        for f in spec_fields(part):
            meta = f.metadata
            if meta["flag"] == "" or (wanted is not None and f.name not in wanted):
                continue
            flag = meta["flag"] or "--" + f.name.replace("_", "-")
            kwargs = dict(meta["cli"])
            if isinstance(f.default, bool):
                kwargs["action"] = "store_false" if f.default else "store_true"
            else:
                kwargs["default"] = list(f.default) if kwargs.get("action") == "append" else f.default
                if meta["parse"]:
                    kwargs["type"] = PARSERS[meta["parse"]]
            parser.add_argument(flag, dest=f.name, help=meta["help"], **kwargs)


def config_from_args(args: argparse.Namespace, **given: object) -> ExtractConfig:
    """The spec from parsed arguments (the fields present in `args`), plus `given` ones."""
    flat = {f.name: getattr(args, f.name) for part in SPECS for f in spec_fields(part) if hasattr(args, f.name)}
    return ExtractConfig.of(**{**flat, "progress": not args.quiet, **given})


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="the HDF5 store to write (e.g. data/stores/x.h5)")
    add_spec_arguments(p)
    p.add_argument("--shards", type=PARSERS["positive_int"], default=1,
                   help="extract in this many parts (each its own incremental store), then merge them")
    p.add_argument("--dask-address", default=None, metavar="ADDRESS",
                   help="run the parts on this existing Dask cluster, e.g. tcp://10.0.0.5:8786 (README: Slurm, "
                        "Kubernetes, GPUs)")


def _run(args: argparse.Namespace) -> None:
    from pipeline.engine.runner import extract_to_store

    config = config_from_args(args, out=args.out)
    if args.shards > 1 or args.dask_address:
        from pipeline.engine.parts import extract_in_parts

        print(extract_in_parts(config, args.shards, dask_address=args.dask_address).summary())
        return
    print(extract_to_store(config).summary())


COMMANDS = [Command("extract", "images -> L2-normalised penultimate features in an HDF5 store", _add, _run)]
