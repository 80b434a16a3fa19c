"""Command line: parse, call the library, print. Expected errors become one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.cli_types import batch_size, byte_size, finite_float, max_pixels, non_negative_int, positive_int
from pipeline.config import (
    COMPRESSIONS,
    DEFAULT_BACKBONE,
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_PIXELS,
    FEATURE_DTYPES,
    PRECISIONS,
    SPLIT_MODES,
    ExtractConfig,
)
from pipeline.errors import PipelineError

EXIT_USAGE = 2
EXIT_PROBLEMS = 1  # `store verify` found problems


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line too (no usage block): what was wrong, and where the valid forms are listed."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m pipeline", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors; no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("extract", help="images -> L2-normalised penultimate features in an HDF5 store")
    p.add_argument("--data", required=True,
                   help="image folder (ROOT/<class>/<img> or ROOT/<split>/<class>/<img>), manifest (.csv, .parquet, "
                        ".jsonl: path[,label,split,id]), WebDataset tar shards (a .tar, a folder of them, or "
                        "'shards-{000..009}.tar'), or torchvision:NAME with --root")
    p.add_argument("--root", type=Path, default=None, help="torchvision:NAME only: the folder holding its files")
    p.add_argument("--download", action="store_true",
                   help="torchvision:NAME only: fetch the files into --root when they are missing (needs a network)")
    p.add_argument("--test-fraction", type=finite_float(0, 1, low_open=True, high_open=True), default=0.3,
                   help="share of each class sent to test when the source gives no splits (default 0.3)")
    p.add_argument("--split", choices=SPLIT_MODES, default="auto",
                   help="auto: the source's own splits when it gives them (split folders, a split column, shard "
                        "names), else stratified by content; stratified: always stratified, ignoring them")
    p.add_argument("--follow-links", action="store_true",
                   help="read symbolic links that lead out of the data folder (by default they are not followed)")
    p.add_argument("--seed", type=int, default=0, help="seed of that split (default 0)")
    p.add_argument("--out", required=True, type=Path, help="the HDF5 store to write (e.g. data/stores/x.h5)")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"registered name or timm:<model> ({DEFAULT_BACKBONE})")
    p.add_argument("--batch-size", type=batch_size, default=64,
                   help="images per forward pass, or 'auto' (the largest that fits on a GPU; 64 on CPU)")
    p.add_argument("--workers", type=non_negative_int, default=None,
                   help="decode worker processes (default: cores - 1, at least 1, at most 16); 0 decodes in this "
                        "process: a little faster on 2 cores, but a decoder crash or hang then stops the run")
    p.add_argument("--max-pixels", type=max_pixels, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse images with more pixels, as decompression bombs (default {DEFAULT_MAX_PIXELS:,}; "
                        "0: no limit)")
    p.add_argument("--max-file-bytes", type=byte_size, default=DEFAULT_MAX_FILE_BYTES, metavar="SIZE",
                   help="refuse image files (and tar members) larger than this before reading them (default 1GiB; "
                        "0: no limit)")
    p.add_argument("--decode-timeout", type=finite_float(0, low_open=True), default=ExtractConfig.decode_timeout,
                   metavar="SECONDS",
                   help="a batch slower than this to decode is checked image by image; an image that takes this "
                        "long alone, twice, is recorded as failed (default %(default)g)")
    p.add_argument("--image-plugin", dest="image_plugins", action="append", default=[], metavar="MODULE[:FUNC]",
                   help="Pillow plugin to load in the decoders, e.g. pillow_heif:register_heif_opener (repeatable)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast dtype: auto = bf16 (or fp16) on CUDA, fp32 on CPU; fp32 forces full precision")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster after)")
    p.add_argument("--eager", action="store_true",
                   help="plain eager forward pass (by default on CPU a frozen TorchScript trace is used when it "
                        "reproduces eager)")
    p.add_argument("--random-init", action="store_true", help="untrained weights (recorded in the store)")
    p.add_argument("--weights", type=Path, default=None, help="local .pth/.safetensors for the architecture (strict)")
    p.add_argument("--layer", default=None, help="pool this module's output (e.g. layer3) instead of the pre-logits")
    p.add_argument("--overwrite", action="store_true",
                   help="replace whatever is at --out (another configuration, or recompute every row)")
    p.add_argument("--dtype", dest="feature_dtype", choices=FEATURE_DTYPES, default="float32",
                   help="feature storage type; float16 halves the size (default float32)")
    p.add_argument("--compression", choices=COMPRESSIONS, default="none", help="HDF5 compression of the features")
    p.add_argument("--shard-rows", type=positive_int, default=None,
                   help="write fixed-size shards of N rows plus one entry file (for millions of images)")
    p.add_argument("--check-content", action="store_true",
                   help="hash every image to find changes that keep the size and mtime (slower)")
    p.add_argument("--wait", type=finite_float(0), default=0.0, metavar="SECONDS",
                   help="wait this long for another run writing the same store (default: fail at once)")

    from pipeline import cli_eval

    cli_eval.add_commands(sub)

    p = sub.add_parser("demo", help="digits -> extract -> probe + kNN as one Prefect flow; writes under data/")
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--backbone", default=DEFAULT_BACKBONE)
    p.add_argument("--per-class", type=positive_int, default=None, help="only N images per class and split")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--workers", type=non_negative_int, default=None)
    p.add_argument("--device", default="auto")

    p = sub.add_parser("run", help="run a YAML config once (data sets x backbones -> stores, evaluations, "
                                   "indexes, leaderboards) as a Prefect flow")
    p.add_argument("config", type=Path)
    p = sub.add_parser("serve", help="serve a YAML config on its cron schedule (Prefect serve; Ctrl-C stops)")
    p.add_argument("config", type=Path)

    p = sub.add_parser("store", help="inspect or verify a feature store")
    store_sub = p.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    q = store_sub.add_parser("info", help="rows, dim, backbone, splits, classes, failures, completeness, size")
    q.add_argument("store", type=Path)
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q = store_sub.add_parser("verify", help="check completeness, alignment, finite unit-norm rows, unique ids")
    q.add_argument("store", type=Path)

    p = sub.add_parser("backbones", help="list backbones, marking those whose weights are present locally")
    p.add_argument("pattern", nargs="?", default=None, help="shell-style filter, e.g. 'timm:resnet*'")
    return parser


def _cmd_extract(args: argparse.Namespace) -> None:
    from pipeline.extract import extract_to_store

    config = ExtractConfig(data=args.data, out=args.out, backbone=args.backbone, batch_size=args.batch_size,
                           workers=args.workers, device=args.device, overwrite=args.overwrite, progress=not args.quiet,
                           random_init=args.random_init, weights=args.weights, layer=args.layer,
                           feature_dtype=args.feature_dtype, compression=args.compression, shard_rows=args.shard_rows,
                           check_content=args.check_content, lock_timeout=args.wait, precision=args.precision,
                           compile=args.compile, optimize=not args.eager, root=args.root, download=args.download,
                           test_fraction=args.test_fraction, seed=args.seed, max_pixels=args.max_pixels or None,
                           decode_timeout=args.decode_timeout, image_plugins=tuple(args.image_plugins),
                           split=args.split, follow_links=args.follow_links, max_file_bytes=args.max_file_bytes or None)
    result = extract_to_store(config)
    print(result.summary())


def _cmd_demo(args: argparse.Namespace) -> None:
    import importlib

    # flows/ holds the Prefect code; importing it here (and only here) keeps pipeline/ free of Prefect.
    demo = importlib.import_module("flows.demo")
    outcome = demo.demo_flow(data_dir=str(args.data_dir), backbone=args.backbone, per_class=args.per_class,
                             batch_size=args.batch_size, workers=args.workers, device=args.device,
                             progress=not args.quiet)
    print(outcome["table"])
    print(f"results: {outcome['results']}  report: {outcome['report']}  {outcome['html']}")


def _prefect_logging(args: argparse.Namespace) -> None:
    """Prefect's console logging follows --quiet/--verbose, and shows the library's own (standard) loggers."""
    import os

    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING" if args.quiet else "DEBUG" if args.verbose else "INFO"
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipeline")


def _cmd_run(args: argparse.Namespace) -> None:
    import importlib

    from pipeline.run_config import load_run_config

    config = load_run_config(args.config)
    _prefect_logging(args)
    flows = importlib.import_module("flows.pipeline_flows")  # Prefect only here: pipeline/ stays free of it
    outcome = flows.run_pipeline(config)
    from pipeline.bench import leaderboard_text, read_leaderboard

    for result in outcome["datasets"]:
        rows = read_leaderboard(Path(result["leaderboard_csv"]))
        print(leaderboard_text(rows, title=result["dataset"]))
        print(f"leaderboard: {result['leaderboard_csv']}  {result['leaderboard_md']}")


def _cmd_serve(args: argparse.Namespace) -> None:
    import importlib

    from pipeline.run_config import load_run_config

    config = load_run_config(args.config)
    _prefect_logging(args)
    importlib.import_module("flows.pipeline_flows").serve(config, config_path=str(args.config))


def _cmd_store(args: argparse.Namespace) -> int:
    import json

    from pipeline.store_verify import store_info, verify_store

    if args.store_command == "info":
        info = store_info(args.store)
        if args.json:
            print(json.dumps(info, indent=2))
            return 0
        size = info.pop("size_bytes")
        for key, value in info.items():
            print(f"{key:18s} {value}")
        print(f"{'size':18s} {size / 2**20:.1f} MiB")
        return 0
    problems = verify_store(args.store)
    for problem in problems:
        print(f"problem: {problem}")
    if problems:
        print(f"{args.store}: {len(problems)} problem(s) found", file=sys.stderr)
        return EXIT_PROBLEMS
    print(f"{args.store}: ok")
    return 0


def _cmd_backbones(args: argparse.Namespace) -> None:
    from pipeline.catalog import available_backbones

    rows, timm_tags = available_backbones(args.pattern)
    if not rows:
        raise PipelineError(f"no backbone matches {args.pattern!r}; try a wider pattern such as 'timm:*resnet*' or "
                            "run without a pattern")
    width = max(len(name) for name, _, _ in rows)
    for name, present, description in rows:
        print(f"{name:{width}s}  {'present' if present else '-':8s} {description}")
    if args.pattern is None:
        print(f"... and {timm_tags} timm pretrained models as timm:<model>.<tag>; "
              "filter with a pattern, e.g. python -m pipeline backbones 'timm:convnext*'")
    print("'present': weights are on this machine (package, torch hub cache or Hugging Face cache)")


def _commands() -> dict:
    from pipeline import cli_eval

    return {"extract": _cmd_extract, "demo": _cmd_demo, "run": _cmd_run, "serve": _cmd_serve, "store": _cmd_store,
            "backbones": _cmd_backbones, **cli_eval.COMMANDS}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(level)  # our logs only: third-party INFO (faiss, httpx) stays quiet
    try:
        code = _commands()[args.command](args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code or 0
