"""Backbones against each other on the same images: paired significance of their scores, and how alike their features
are (linear CKA, mutual k-NN overlap), for `bench` and the benchmark flow.

- Pairs: every two backbones whose results scored the same test images get McNemar's exact test and a paired
  bootstrap interval of their top-1 difference (`pipeline.evaluation.intervals`); the p-values of a run are adjusted
  together (Holm), and a pair is distinguishable when its adjusted p-value is below 0.05.
- Agreement: rows are matched across stores by content hash. Linear CKA (Kornblith et al., 2019) is computed from
  d x d cross-covariances accumulated over blocks of rows, so it never forms an N x N matrix; the mutual k-NN overlap
  is the mean share of a row's k nearest neighbours (cosine, itself left out) that the two feature spaces have in
  common, over a seeded sample of query rows searched blockwise against all matched rows.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np

from pipeline.evaluation.intervals import DEFAULT_RESAMPLES, compare_results

ALPHA = 0.05
AGREEMENT_K = 10
AGREEMENT_QUERIES = 5000
_BLOCK = 8192


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (same order as given)."""
    order = np.argsort(pvalues, kind="stable")
    m = len(pvalues)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return [float(p) for p in adjusted]


def pairwise(records: dict[str, dict[str, Any] | None], *, what: str,
             resamples: int = DEFAULT_RESAMPLES) -> list[dict[str, Any]]:
    """Paired comparisons of every two named correctness records (`pack_correct`) that scored the same images."""
    pairs = []
    for a, b in combinations(records, 2):
        outcome = compare_results(records[a], records[b], resamples=resamples)
        if outcome is not None:
            pairs.append({"what": what, "a": a, "b": b, **outcome})
    for pair, adjusted in zip(pairs, holm([p["mcnemar_p"] for p in pairs]), strict=True):
        pair["holm_p"] = adjusted
        pair["significant"] = adjusted < ALPHA
    return pairs


def verdict(pair: dict[str, Any]) -> str:
    if not pair["significant"]:
        return "tie"
    return f"{pair['a'] if pair['difference'] > 0 else pair['b']} better"


# -- agreement of feature spaces --------------------------------------------------------------------------------------

def matched_rows(key_lists: list[list[str]]) -> list[np.ndarray]:
    """Row numbers of the content keys every list has (each key once; keys met twice in a list are left out), in one
    order, for each list."""
    def unique_positions(keys: list[str]) -> dict[str, int]:
        seen: dict[str, int] = {}
        twice = set()
        for i, k in enumerate(keys):
            if k in seen:
                twice.add(k)
            seen[k] = i
        return {k: i for k, i in seen.items() if k not in twice}

    positions = [unique_positions(keys) for keys in key_lists]
    common = sorted(set.intersection(*(set(p) for p in positions))) if positions else []
    return [np.array([p[k] for k in common], dtype=np.int64) for p in positions]


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two row-aligned representations: ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), the
    cross-covariances summed over blocks of rows (memory d x d, not N x N)."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"linear CKA needs two row-aligned sets of at least 2 rows, got {len(x)} and {len(y)}")
    mx, my = x.mean(axis=0, dtype=np.float64), y.mean(axis=0, dtype=np.float64)
    xy = np.zeros((x.shape[1], y.shape[1]))
    xx = np.zeros((x.shape[1], x.shape[1]))
    yy = np.zeros((y.shape[1], y.shape[1]))
    for start in range(0, len(x), _BLOCK):
        bx = x[start:start + _BLOCK].astype(np.float64) - mx
        by = y[start:start + _BLOCK].astype(np.float64) - my
        xy += bx.T @ by
        xx += bx.T @ bx
        yy += by.T @ by
    denominator = np.linalg.norm(xx) * np.linalg.norm(yy)
    return float(np.linalg.norm(xy) ** 2 / denominator) if denominator > 0 else 0.0


def _neighbours(features: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    from pipeline.index.build import build_flat_index, search

    index = build_flat_index(np.ascontiguousarray(features, dtype=np.float32))
    found = []
    for start in range(0, len(queries), _BLOCK):
        rows = queries[start:start + _BLOCK]
        _, idx = search(index, np.ascontiguousarray(features[rows], dtype=np.float32), k + 1)
        not_self = idx != rows[:, None]
        order = np.argsort(~not_self, axis=1, kind="stable")[:, :k]
        found.append(np.take_along_axis(idx, order, axis=1))
    return np.concatenate(found) if found else np.zeros((0, k), dtype=np.int64)


def mutual_knn(x: np.ndarray, y: np.ndarray, *, k: int = AGREEMENT_K, queries: int = AGREEMENT_QUERIES,
               seed: int = 0) -> float:
    """Mean share of the k nearest neighbours (cosine) two row-aligned feature sets have in common, over a seeded
    sample of query rows."""
    n = len(x)
    k = min(k, n - 1)
    if k < 1:
        raise ValueError("mutual k-NN needs at least 2 rows")
    rows = np.sort(np.random.default_rng(seed).permutation(n)[:min(queries, n)])
    nx, ny = _neighbours(x, rows, k), _neighbours(y, rows, k)
    shared = [len(np.intersect1d(a, b, assume_unique=True)) for a, b in zip(nx, ny, strict=True)]
    return float(np.mean(shared) / k)


def agreement(features: dict[str, tuple[np.ndarray, list[str]]], *, k: int = AGREEMENT_K,
              queries: int = AGREEMENT_QUERIES) -> dict[str, Any]:
    """For every two named feature sets (features, content keys): linear CKA and mutual k-NN overlap on the rows they
    share. Returns the names, both matrices (diagonal 1) and the number of rows matched per pair."""
    names = list(features)
    m = len(names)
    cka, overlap, matched = np.eye(m), np.eye(m), np.zeros((m, m), dtype=np.int64)
    for i, j in combinations(range(m), 2):
        (xa, ka), (xb, kb) = features[names[i]], features[names[j]]
        ra, rb = matched_rows([ka, kb])
        matched[i, j] = matched[j, i] = len(ra)
        if len(ra) < 2:
            cka[i, j] = cka[j, i] = overlap[i, j] = overlap[j, i] = np.nan
            continue
        cka[i, j] = cka[j, i] = linear_cka(xa[ra], xb[rb])
        overlap[i, j] = overlap[j, i] = mutual_knn(xa[ra], xb[rb], k=k, queries=queries)
    return {"names": names, "linear_cka": cka.tolist(), f"mutual_knn_at_{k}": overlap.tolist(),
            "k": k, "rows_matched": matched.tolist(),
            "method": f"linear CKA over all matched rows; mutual {k}-NN overlap over up to {queries} sampled rows"}
