"""Choosing a FAISS index for a store: the type by rows and memory budget (the way autofaiss does), and sizes.

No faiss here: the CLI and the run config take their choices and size parsing from this module, so they start fast.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pipeline.errors import ConfigError, PipelineError

INDEX_KINDS = ("auto", "flat", "hnsw", "ivf-flat", "ivf-pq")
DEFAULT_MEMORY_BUDGET = 4 * 2**30
EXACT_MAX_ROWS = 100_000  # brute force costs n*d per query: 100k x 1280-d is ~0.1 GFLOP, a few ms
HNSW_MAX_ROWS = 10_000_000  # beyond this HNSW builds take hours; IVF trains and adds far faster
HNSW_M = 32
PQ_MAX_M = 128  # bytes per vector; recall@10 on 1280-d digits features: 0.63 at 32, 0.74 at 64, 0.84 at 128

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
    """IVF lists: about 4 sqrt(n) (a power of two), with at least 39 training points per list."""
    return int(max(1, min(2 ** round(math.log2(max(4 * math.sqrt(n), 1))), n // 39)))


def memory_estimate(kind: str, n: int, d: int, *, nlist: int = 0, pq_m: int = 0) -> int:
    """Bytes an index of this kind takes for n rows of dimension d (ids included for IVF)."""
    if kind == "flat":
        return n * d * 4
    if kind == "hnsw":  # vectors + level-0 links (2M int32) + upper levels (~1/M as many)
        return int(n * (d * 4 + HNSW_M * 2 * 4 * 1.1))
    centroids = nlist * d * 4
    if kind == "ivf-flat":
        return n * (d * 4 + 8) + centroids
    if kind == "ivf-pq":
        return n * (pq_m + 8) + centroids + 256 * d * 4
    raise ConfigError(f"unknown index type {kind!r}; choose one of {', '.join(INDEX_KINDS)}")


def _pq_m(n: int, d: int, nlist: int, budget: int) -> int:
    """The most PQ bytes per vector that fit the budget: a divisor of d, sub-vectors of at least 4 dimensions, at
    most PQ_MAX_M (8-bit codebooks train one k-means each: measured ~0.8 s apiece on 2 cores)."""
    for m in sorted((m for m in range(1, min(d // 4, PQ_MAX_M) + 1) if d % m == 0), reverse=True):
        if memory_estimate("ivf-pq", n, d, nlist=nlist, pq_m=m) <= budget:
            return m
    return 0


def plan_index(n: int, d: int, *, kind: str = "auto", memory_budget: int = DEFAULT_MEMORY_BUDGET,
               exact_max_rows: int = EXACT_MAX_ROWS) -> IndexPlan:
    """Choose the index for n rows of dimension d: exact while small, then HNSW, IVF-Flat, IVF-PQ by memory."""
    if kind not in INDEX_KINDS:
        raise ConfigError(f"unknown index type {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    if n < 1:
        raise PipelineError("the store has no rows to index")
    budget = f"{memory_budget / 2**30:.2f} GiB budget"
    nlist = nlist_for(n)
    fits = {k: memory_estimate(k, n, d, nlist=nlist) <= memory_budget for k in ("flat", "hnsw", "ivf-flat")}
    if kind == "auto":
        if n <= exact_max_rows and fits["flat"]:
            kind, reason = "flat", f"{n} rows <= {exact_max_rows}: exact search is fast enough"
        elif n <= HNSW_MAX_ROWS and fits["hnsw"]:
            kind, reason = "hnsw", f"{n} rows > {exact_max_rows}; HNSW graph fits the {budget}"
        elif fits["ivf-flat"]:
            kind, reason = "ivf-flat", f"{n} rows; raw vectors fit the {budget} (HNSW does not, or is too slow)"
        else:
            kind, reason = "ivf-pq", f"{n} rows; raw vectors exceed the {budget}: product-quantised codes"
    else:
        reason = "asked for"
    if kind in ("ivf-flat", "ivf-pq") and n < 39:
        raise PipelineError(f"{kind} needs at least 39 rows to train, the store has {n}; use --type flat")
    if kind == "flat":
        return IndexPlan("flat", "Flat", memory_estimate("flat", n, d), reason)
    if kind == "hnsw":
        return IndexPlan("hnsw", f"HNSW{HNSW_M},Flat", memory_estimate("hnsw", n, d), reason)
    if kind == "ivf-flat":
        return IndexPlan("ivf-flat", f"IVF{nlist},Flat", memory_estimate("ivf-flat", n, d, nlist=nlist), reason,
                         nlist=nlist)
    if n < 256:
        raise PipelineError(f"ivf-pq needs at least 256 rows to train its codebooks, the store has {n}; use --type "
                            "flat or hnsw")
    m = _pq_m(n, d, nlist, memory_budget)
    if not m:
        need = memory_estimate("ivf-pq", n, d, nlist=nlist, pq_m=1)
        raise PipelineError(f"{n} rows of {d}-d do not fit a memory budget of {memory_budget:,} bytes even as 1-byte "
                            f"PQ codes (needs about {need:,}); raise --memory-budget")
    return IndexPlan("ivf-pq", f"IVF{nlist},PQ{m}x8", memory_estimate("ivf-pq", n, d, nlist=nlist, pq_m=m), reason,
                     nlist=nlist, pq_m=m)
