"""`python -m pipeline ...`: the application entry point. It adds the Prefect-backed commands (`flows.commands`:
demo, run, serve) to the library's (`pipeline.cli`); nothing else in `pipeline/` refers to `flows`. The guard
matters: decode workers re-import this module."""

import sys

from flows.commands import COMMANDS as FLOW_COMMANDS
from pipeline.cli import main as library_main


def main(argv: list[str] | None = None) -> int:
    return library_main(argv, commands=FLOW_COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
