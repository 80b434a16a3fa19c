"""Command line: each command is one registered entry (its parser, what it runs); expected errors become one line on
stderr and exit code 2.

The library's commands are here: `extract` (`pipeline.cli.extract`), `store` and `backbones`
(`pipeline.cli.inspect`), `probe`, `finetune`, `predict`, `knn`, `audit`, `index`, `search`, `bench`
(`pipeline.cli.evaluate`), and `finetune-images`, `transfer` (`pipeline.cli.transfer`). The Prefect-backed
ones (`demo`, `run`, `serve`) are in `flows.commands`; the application entry point, `python -m pipeline`
(`pipeline/__main__.py`), adds them, so that this package never imports Prefect.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pipeline.errors import PipelineError

EXIT_USAGE = 2
EXIT_PROBLEMS = 1  # `store verify` found problems


@dataclass(frozen=True)
class Command:
    """One command: its name and help, how to add its arguments, and what it runs (returning the exit code)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line too (no usage block): what was wrong, and where the valid forms are listed."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def library_commands() -> list[Command]:
    from pipeline.cli import evaluate, extract, inspect, interchange, transfer

    return [*extract.COMMANDS, *inspect.COMMANDS, *evaluate.COMMANDS, *transfer.COMMANDS, *interchange.COMMANDS]


def build_parser(commands: Iterable[Command]) -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors; no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands:
        command.add_arguments(sub.add_parser(command.name, help=command.help, description=command.help))
    return parser


def main(argv: list[str] | None = None, *, commands: Iterable[Command] = ()) -> int:
    """Parse and run one command (the library's, plus `commands`); the exit code."""
    table = {c.name: c for c in (*library_commands(), *commands)}
    args = build_parser(table.values()).parse_args(argv)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(level)  # our logs only: third-party INFO (faiss, httpx) stays quiet
    try:
        code = table[args.command].run(args)
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
