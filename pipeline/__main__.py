"""`python -m pipeline ...`; the guard matters: DataLoader workers re-import this module."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
