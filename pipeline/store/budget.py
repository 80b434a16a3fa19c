"""How much feature data a command may hold in memory (`--max-memory`, config `max_memory`), and what follows from it.

Within the budget a command loads the feature matrix whole (`load_store`), as it always did; beyond it, it streams
the store in blocks (`iter_store`, `pipeline.store.columns`) sized from the budget, so a store of any size is read in
bounded memory. The default is half of the memory available when the command starts. The budget counts feature data
(the float32 copies the math works on), not the interpreter, torch or FAISS themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError

DEFAULT_FRACTION = 0.5  # of the memory available at start
FALLBACK_AVAILABLE = 4 << 30  # when the system does not say
WHOLE_OVERHEAD = 3.0  # a whole load holds the float32 matrix about three times at its peak (read, slices, fit)
MIN_BLOCK_ROWS = 1024


def available_memory() -> int:
    """Bytes of memory available now (Linux MemAvailable, else the physical pages, else 4 GiB)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return FALLBACK_AVAILABLE


def default_max_memory() -> int:
    return int(available_memory() * DEFAULT_FRACTION)


def resolve_max_memory(value: int | None) -> int:
    """The budget in bytes: `value` when given (a positive number of bytes), else the default."""
    if value is None:
        return default_max_memory()
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"max_memory must be a positive number of bytes (e.g. --max-memory 4GiB), got {value!r}")
    return value


def whole_bytes(rows: int, dim: int) -> int:
    """What loading `rows` x `dim` features whole costs at its peak (float32, with the copies the math makes)."""
    return int(rows * dim * 4 * WHOLE_OVERHEAD)


def fits(rows: int, dim: int, budget: int) -> bool:
    return whole_bytes(rows, dim) <= budget


def block_rows(budget: int, dim: int, *, parts: int = 4, most: int = 1 << 20) -> int:
    """Rows per streamed block when `parts` blocks of float32 features (and their working copies) share `budget`."""
    return int(max(MIN_BLOCK_ROWS, min(most, budget // max(1, parts * dim * 4 * 2))))


def size_text(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def stored_shape(attrs: dict) -> tuple[int, int]:
    """(rows, dim) as a store's attributes record them, to decide between loading and streaming; (0, 0) when they
    are not integers, so the caller takes the loaded path, whose checks refuse the damaged store in one line."""
    try:
        n, d = int(attrs.get("committed_rows", 0)), int(attrs.get("feature_dim", 0))
    except (TypeError, ValueError, OverflowError):
        return 0, 0
    return (n, d) if n >= 0 and d >= 0 else (0, 0)


@dataclass(frozen=True)
class StoreBudget:
    """A store's features against a command's `--max-memory`: whether loading them whole fits, and, when not, the
    first half of the one-line refusal or notice ("X's features need about 2.1 GiB loaded, more than ...")."""

    store: Path
    rows: int
    dim: int
    budget: int

    @property
    def fits(self) -> bool:
        return fits(self.rows, self.dim, self.budget)

    @property
    def need(self) -> str:
        return (f"{self.store}'s features need about {size_text(whole_bytes(self.rows, self.dim))} loaded, more than "
                f"--max-memory {size_text(self.budget)}")


def store_budget(store: str | Path, max_memory: int | None) -> StoreBudget:
    """The budget (`max_memory`, or the default) against the shape `store`'s attributes record."""
    from pipeline.store.read import read_attrs

    budget = resolve_max_memory(max_memory)
    return StoreBudget(Path(store), *stored_shape(read_attrs(store)), budget)
