"""`export` and `import`: features to and from other tools' layouts (see `pipeline.interchange`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli import Command
from pipeline.cli.evaluate import add_max_memory
from pipeline.cli.types import names, positive_int
from pipeline.config import DEFAULT_PART_ROWS
from pipeline.config import EXPORT_FORMATS as FORMATS


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, type=Path, help="the feature store to export")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="clip-retrieval: img_emb/*.npy + metadata/*.parquet (autofaiss, clip-retrieval); parquet: "
                        "one dataset with an embedding column (pyarrow, pandas, datasets, LanceDB); ann-benchmarks: "
                        "train/test/neighbors/distances HDF5 (queries: the test split)")
    p.add_argument("--out", required=True, type=Path, help="the folder to write (created; must be empty)")
    p.add_argument("--splits", type=names, default=None,
                   help="only these splits, e.g. train,val (ann-benchmarks: the searched rows, default train,val)")
    p.add_argument("--dtype", choices=("float16", "float32"), default=None,
                   help="vector type (default: the store's)")
    p.add_argument("--part-rows", type=positive_int, default=DEFAULT_PART_ROWS,
                   help=f"rows per file (default {DEFAULT_PART_ROWS:,})")
    p.add_argument("--k", type=positive_int, default=100, help="ann-benchmarks: neighbours per query (default 100)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous export in --out")
    add_max_memory(p)


def _run_export(args: argparse.Namespace) -> None:
    from pipeline.interchange.export import export_store

    print(export_store(args.store, args.out, format=args.format, splits=tuple(args.splits or ()) or None,
                       part_rows=args.part_rows, dtype=args.dtype, k=args.k, overwrite=args.overwrite,
                       max_memory=args.max_memory).summary())


def _add_import(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True, type=Path,
                   help="a clip-retrieval/autofaiss folder (img_emb/*.npy + metadata/*.parquet), a .parquet file "
                        "with an embedding column, or a folder of them")
    p.add_argument("--out", required=True, type=Path, help="the HDF5 store to write")
    p.add_argument("--embedding-column", default=None,
                   help="the Parquet column holding the vectors (default: embedding, embeddings, vector or emb)")
    p.add_argument("--backbone", default=None,
                   help="name the features' model (recorded as external:NAME); default: the .featpipe.json of an "
                        "export, else external:unknown")
    p.add_argument("--dtype", choices=("float16", "float32"), default=None,
                   help="feature storage type (default: the input's)")
    p.add_argument("--overwrite", action="store_true", help="replace whatever is at --out")


def _run_import(args: argparse.Namespace) -> None:
    from pipeline.interchange.ingest import import_features

    print(import_features(args.source, args.out, embedding_column=args.embedding_column, backbone=args.backbone,
                          feature_dtype=args.dtype, overwrite=args.overwrite).summary())


COMMANDS = [Command("export", "a store to clip-retrieval/autofaiss npy+parquet, Parquet or ann-benchmarks HDF5",
                    _add_export, _run_export),
            Command("import", "features made elsewhere (npy+parquet, Parquet) into a store", _add_import, _run_import)]
