"""The Prefect-backed commands of `python -m pipeline`: `demo`, `run` and `serve`. Their arguments cost nothing to
set up (no Prefect is imported until one runs); the application entry point (`pipeline/__main__.py`) adds them to
the library's commands."""

import argparse
import os
from pathlib import Path

from pipeline.cli import Command
from pipeline.cli.types import non_negative_int, positive_int
from pipeline.config import DEFAULT_BACKBONE


def _prefect_logging(args: argparse.Namespace) -> None:
    """Prefect's console logging follows --quiet/--verbose, and shows the library's own (standard) loggers."""
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING" if args.quiet else "DEBUG" if args.verbose else "INFO"
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipeline")


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--backbone", default=DEFAULT_BACKBONE)
    p.add_argument("--per-class", type=positive_int, default=None, help="only N images per class and split")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--workers", type=non_negative_int, default=None)
    p.add_argument("--device", default="auto")


def _run_demo(args: argparse.Namespace) -> None:
    from flows.demo import demo_flow

    outcome = demo_flow(data_dir=str(args.data_dir), backbone=args.backbone, per_class=args.per_class,
                        batch_size=args.batch_size, workers=args.workers, device=args.device,
                        progress=not args.quiet)
    print(outcome["table"])
    print(f"results: {outcome['results']}  report: {outcome['report']}  {outcome['html']}")


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path)


def _run_run(args: argparse.Namespace) -> None:
    from pipeline.report.leaderboard import leaderboard_text, read_leaderboard
    from pipeline.run_config import load_run_config

    config = load_run_config(args.config)
    _prefect_logging(args)
    from flows.pipeline_flows import run_pipeline

    for result in run_pipeline(config)["datasets"]:
        print(leaderboard_text(read_leaderboard(Path(result["leaderboard_csv"])), title=result["dataset"]))
        print(f"leaderboard: {result['leaderboard_csv']}  {result['leaderboard_md']}")


def _run_serve(args: argparse.Namespace) -> None:
    from pipeline.run_config import load_run_config

    config = load_run_config(args.config)
    _prefect_logging(args)
    from flows.pipeline_flows import serve

    serve(config, config_path=str(args.config))


COMMANDS = [
    Command("demo", "digits -> extract -> probe + kNN + index -> leaderboard and report, as Prefect flows; writes "
                    "under data/", _add_demo, _run_demo),
    Command("run", "run a YAML config once (data sets x backbones -> stores, evaluations, indexes, leaderboards) as "
                   "a Prefect flow", _add_config, _run_run),
    Command("serve", "serve a YAML config on its cron schedule (Prefect serve; Ctrl-C stops)", _add_config,
            _run_serve),
]
