"""Choosing a FAISS index for a store: the type by rows and memory budget (the way autofaiss does), and sizes.

Each kind of index is one class in `KINDS`: its memory, its factory string, the rows it needs to train, its search
parameter and the values tuning tries, and when the automatic choice takes it (kinds are tried in `KINDS` order).
A new kind of index is one more class and one entry. No faiss here: the CLI and the run config take their choices
and size parsing from this module, so they start fast.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pipeline.errors import ConfigError, PipelineError

DEFAULT_MEMORY_BUDGET = 4 * 2**30
EXACT_MAX_ROWS = 100_000  # brute force costs n*d per query: 100k x 1280-d is ~0.1 GFLOP, a few ms
HNSW_MAX_ROWS = 10_000_000  # beyond this HNSW builds take hours; IVF trains and adds far faster
HNSW_M = 32
PQ_MAX_M = 128  # bytes per vector; recall@10 on 1280-d digits features: 0.63 at 32, 0.74 at 64, 0.84 at 128
EF_SEARCH = (16, 32, 64, 128, 256, 512, 1024, 2048)
NLIST_MAX = 4096  # training k-means and assigning each added row cost ~nlist; 16384 lists took >20 min to train on
# 2 cores at 10M rows, while 4096 lists of ~2,400 rows each keep a query's scan to a few hundred thousand codes

_SIZE_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20, "g": 1e9,
               "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_memory_size(text: str) -> int:
    """'4GB', '512MiB', '1e9' -> bytes; anything else is a ConfigError."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    try:
        value = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()] if match else -1
    except (KeyError, ValueError):
        value = -1
    if value <= 0:
        raise ConfigError(f"expected a size such as 4GB, 512MiB or 1000000 (bytes); got {text!r}")
    return int(value)


@dataclass(frozen=True)
class IndexPlan:
    """An index type and its construction parameters, with the memory it is expected to take and why."""

    kind: str
    factory: str  # faiss.index_factory string (inner-product metric)
    memory_bytes: int
    reason: str
    nlist: int = 0
    pq_m: int = 0


def nlist_for(n: int) -> int:
    """IVF lists: about 4 sqrt(n) (a power of two) up to `NLIST_MAX`, with at least 39 training points per list."""
    return int(max(1, min(2 ** round(math.log2(max(4 * math.sqrt(n), 1))), NLIST_MAX, n // 39)))


def _budget(budget: int) -> str:
    return f"{budget / 2**30:.2f} GiB budget"


class IndexKind:
    """One kind of index. `memory` in bytes for n rows of dimension d; `plan` its construction for a budget;
    `auto_reason` why the automatic choice takes it, or None to try the next kind."""

    name = ""
    min_rows = 1
    search_param: str | None = None

    def memory(self, n: int, d: int, *, nlist: int = 0, pq_m: int = 0) -> int:
        raise NotImplementedError

    def plan(self, n: int, d: int, budget: int, reason: str) -> IndexPlan:
        raise NotImplementedError

    def auto_reason(self, n: int, d: int, budget: int, exact_max_rows: int) -> str | None:
        raise NotImplementedError

    def search_values(self, nlist: int) -> tuple[int, ...]:
        return ()

    def check_rows(self, n: int) -> None:
        if n < self.min_rows:
            raise PipelineError(f"{self.name} needs at least {self.min_rows} rows to train, the store has {n}; use "
                                "--type flat")


class Flat(IndexKind):
    """Exact search: every vector, brute force."""

    name = "flat"

    def memory(self, n: int, d: int, *, nlist: int = 0, pq_m: int = 0) -> int:
        return n * d * 4

    def plan(self, n: int, d: int, budget: int, reason: str) -> IndexPlan:
        return IndexPlan(self.name, "Flat", self.memory(n, d), reason)

    def auto_reason(self, n: int, d: int, budget: int, exact_max_rows: int) -> str | None:
        if n <= exact_max_rows and self.memory(n, d) <= budget:
            return f"{n} rows <= {exact_max_rows}: exact search is fast enough"
        return None


class HNSW(IndexKind):
    """A graph over the raw vectors: fast and accurate, tuned by efSearch; slow to build past ~10M rows."""

    name = "hnsw"
    search_param = "efSearch"

    def memory(self, n: int, d: int, *, nlist: int = 0, pq_m: int = 0) -> int:
        return int(n * (d * 4 + HNSW_M * 2 * 4 * 1.1))  # vectors + level-0 links (2M int32) + upper levels (~1/M)

    def plan(self, n: int, d: int, budget: int, reason: str) -> IndexPlan:
        return IndexPlan(self.name, f"HNSW{HNSW_M},Flat", self.memory(n, d), reason)

    def auto_reason(self, n: int, d: int, budget: int, exact_max_rows: int) -> str | None:
        if n <= HNSW_MAX_ROWS and self.memory(n, d) <= budget:
            return f"{n} rows > {exact_max_rows}; HNSW graph fits the {_budget(budget)}"
        return None

    def search_values(self, nlist: int) -> tuple[int, ...]:
        return EF_SEARCH


class IVFFlat(IndexKind):
    """Inverted lists over the raw vectors, tuned by nprobe."""

    name = "ivf-flat"
    min_rows = 39
    search_param = "nprobe"

    def memory(self, n: int, d: int, *, nlist: int = 0, pq_m: int = 0) -> int:
        return n * (d * 4 + 8) + nlist * d * 4

    def plan(self, n: int, d: int, budget: int, reason: str) -> IndexPlan:
        nlist = nlist_for(n)
        return IndexPlan(self.name, f"IVF{nlist},Flat", self.memory(n, d, nlist=nlist), reason, nlist=nlist)

    def auto_reason(self, n: int, d: int, budget: int, exact_max_rows: int) -> str | None:
        if self.memory(n, d, nlist=nlist_for(n)) <= budget:
            return f"{n} rows; raw vectors fit the {_budget(budget)} (HNSW does not, or is too slow)"
        return None

    def search_values(self, nlist: int) -> tuple[int, ...]:
        return tuple(2**i for i in range(int(math.log2(max(nlist, 1))) + 1))


class IVFPQ(IVFFlat):
    """Inverted lists over product-quantised codes (the most bytes per vector that fit the budget), tuned by
    nprobe; the codes cap the recall."""

    name = "ivf-pq"
    min_rows = 256  # its codebooks train 256 centroids each

    def memory(self, n: int, d: int, *, nlist: int = 0, pq_m: int = 0) -> int:
        return n * (pq_m + 8) + nlist * d * 4 + 256 * d * 4

    def _pq_m(self, n: int, d: int, nlist: int, budget: int) -> int:
        """The most PQ bytes per vector that fit: a divisor of d, sub-vectors of at least 4 dimensions, at most
        PQ_MAX_M (8-bit codebooks train one k-means each: measured ~0.8 s apiece on 2 cores)."""
        for m in sorted((m for m in range(1, min(d // 4, PQ_MAX_M) + 1) if d % m == 0), reverse=True):
            if self.memory(n, d, nlist=nlist, pq_m=m) <= budget:
                return m
        return 0

    def plan(self, n: int, d: int, budget: int, reason: str) -> IndexPlan:
        nlist = nlist_for(n)
        m = self._pq_m(n, d, nlist, budget)
        if not m:
            need = self.memory(n, d, nlist=nlist, pq_m=1)
            raise PipelineError(f"{n} rows of {d}-d do not fit a memory budget of {budget:,} bytes even as 1-byte "
                                f"PQ codes (needs about {need:,}); raise --memory-budget")
        return IndexPlan(self.name, f"IVF{nlist},PQ{m}x8", self.memory(n, d, nlist=nlist, pq_m=m), reason,
                         nlist=nlist, pq_m=m)

    def auto_reason(self, n: int, d: int, budget: int, exact_max_rows: int) -> str | None:
        return f"{n} rows; raw vectors exceed the {_budget(budget)}, a rotation does not fit: product-quantised codes"


class IVFPQRefine(IVFPQ):
    """IVF-PQ whose candidates (`REFINE_K_FACTOR` times k) are re-ranked on 8-bit scalar-quantised vectors (d bytes
    each): the recall that PQ codes alone cap is recovered at a quarter of the raw vectors' memory."""

    name = "ivf-pq-refine"

    def memory(self, n: int, d: int, *, nlist: int = 0, pq_m: int = 0) -> int:
        return n * (pq_m + 8 + d) + nlist * d * 4 + 256 * d * 4 + 2 * d * 4

    def plan(self, n: int, d: int, budget: int, reason: str) -> IndexPlan:
        nlist = nlist_for(n)
        m = self._pq_m(n, d, nlist, budget)
        if not m:
            raise PipelineError(f"{n} rows of {d}-d with a refine stage do not fit a memory budget of {budget:,} bytes "
                                f"(needs about {self.memory(n, d, nlist=nlist, pq_m=1):,}); raise --memory-budget or "
                                "use --type ivf-opq")
        return IndexPlan(self.name, f"IVF{nlist},PQ{m}x8,Refine(SQ8)", self.memory(n, d, nlist=nlist, pq_m=m),
                         reason, nlist=nlist, pq_m=m)

    def _pq_m(self, n: int, d: int, nlist: int, budget: int) -> int:
        """PQ bytes for the first pass: sub-vectors of 4 dimensions at the most (the refine stage does the fine
        ranking)."""
        for m in sorted((m for m in range(1, min(PQ_MAX_M, max(1, d // 4)) + 1) if d % m == 0), reverse=True):
            if self.memory(n, d, nlist=nlist, pq_m=m) <= budget:
                return m
        return 0

    def auto_reason(self, n: int, d: int, budget: int, exact_max_rows: int) -> str | None:
        if self._pq_m(n, d, nlist_for(n), budget):
            return f"{n} rows; raw vectors exceed the {_budget(budget)}, 8-bit vectors fit: PQ codes re-ranked on them"
        return None


class IVFOPQ(IVFPQ):
    """IVF-PQ after a learned rotation (OPQ) that balances the sub-vectors, for budgets where only the codes fit:
    higher recall than plain PQ at the same bytes."""

    name = "ivf-opq"

    def memory(self, n: int, d: int, *, nlist: int = 0, pq_m: int = 0) -> int:
        return super().memory(n, d, nlist=nlist, pq_m=pq_m) + d * d * 4

    def plan(self, n: int, d: int, budget: int, reason: str) -> IndexPlan:
        base = super().plan(n, d, budget, reason)
        return IndexPlan(self.name, f"OPQ{base.pq_m},{base.factory}", self.memory(n, d, nlist=base.nlist,
                                                                                    pq_m=base.pq_m),
                         reason, nlist=base.nlist, pq_m=base.pq_m)

    def auto_reason(self, n: int, d: int, budget: int, exact_max_rows: int) -> str | None:
        if self._pq_m(n, d, nlist_for(n), budget):
            return f"{n} rows; even 8-bit vectors exceed the {_budget(budget)}: rotated (OPQ) product-quantised codes"
        return None  # the d x d rotation itself does not fit: plain PQ


REFINE_K_FACTOR = 8  # candidates re-ranked per result by the refine stage
KINDS: dict[str, IndexKind] = {k.name: k for k in (Flat(), HNSW(), IVFFlat(), IVFPQRefine(), IVFOPQ(), IVFPQ())}
INDEX_KINDS = ("auto", *KINDS)


def index_kind(name: str) -> IndexKind:
    if name not in KINDS:
        raise ConfigError(f"unknown index type {name!r}; choose one of {', '.join(INDEX_KINDS)}")
    return KINDS[name]


def memory_estimate(kind: str, n: int, d: int, *, nlist: int = 0, pq_m: int = 0) -> int:
    """Bytes an index of this kind takes for n rows of dimension d (ids included for IVF)."""
    return index_kind(kind).memory(n, d, nlist=nlist, pq_m=pq_m)


def plan_index(n: int, d: int, *, kind: str = "auto", memory_budget: int = DEFAULT_MEMORY_BUDGET,
               exact_max_rows: int = EXACT_MAX_ROWS) -> IndexPlan:
    """Choose the index for n rows of dimension d: the first kind in `KINDS` whose `auto_reason` takes it (exact
    while small, then HNSW, IVF-Flat, IVF-PQ by memory), or the kind asked for."""
    if n < 1:
        raise PipelineError("the store has no rows to index")
    if kind == "auto":
        chosen, reason = next((k, r) for k in KINDS.values()
                              if (r := k.auto_reason(n, d, memory_budget, exact_max_rows)) is not None)
    else:
        chosen, reason = index_kind(kind), "asked for"
    chosen.check_rows(n)
    return chosen.plan(n, d, memory_budget, reason)


def sizes_of(factory: str) -> dict[str, int]:
    """nlist and PQ bytes back from a factory string such as IVF256,PQ64x8."""
    sizes = {"nlist": 0, "pq_m": 0}
    for part in factory.split(","):
        if part.startswith("OPQ"):
            continue
        if part.startswith("IVF"):
            sizes["nlist"] = int(part[3:])
        if part.startswith("PQ"):
            sizes["pq_m"] = int(part[2:].split("x")[0])
    return sizes
