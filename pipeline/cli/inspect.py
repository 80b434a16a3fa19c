"""`store info`, `store verify` and `backbones`: quick looks that import none of the heavy libraries."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.cli import EXIT_PROBLEMS, Command
from pipeline.errors import PipelineError


def _add_store(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    q = actions.add_parser("info", help="rows, dim, backbone, splits, classes, failures, completeness, size")
    q.add_argument("store", type=Path)
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q = actions.add_parser("verify", help="check completeness, alignment, finite unit-norm rows, unique ids")
    q.add_argument("store", type=Path)


def _run_store(args: argparse.Namespace) -> int:
    from pipeline.store.verify import store_info, verify_store

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


def _add_backbones(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default=None, help="shell-style filter, e.g. 'timm:resnet*'")


def _run_backbones(args: argparse.Namespace) -> None:
    from pipeline.backbones.catalog import available_backbones

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


COMMANDS = [Command("store", "inspect or verify a feature store", _add_store, _run_store),
            Command("backbones", "list backbones, marking those whose weights are present locally", _add_backbones,
                    _run_backbones)]
