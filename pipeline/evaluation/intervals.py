"""Intervals and paired comparisons for the figures the tool reports.

- Bootstrap over test images: each resample draws n test images with replacement (seeded); a metric's 95% interval
  is the 2.5th and 97.5th percentiles of its value over the resamples (the percentile method). Resamples are count
  vectors, so every metric is a weighted sum and all resamples of a block are one matrix product.
- Paired comparison of two classifiers on the same test images: the difference in top-1 with a paired bootstrap
  interval (the same resampled images for both), and McNemar's exact test (two-sided binomial test on the images
  exactly one of the two got right).
- Per-image correctness travels in results files packed as bits in a fixed order (content hash, then id), with a
  digest of that order, so two results can be paired only when they scored the same images.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
METHOD = "percentile bootstrap over test images"
_BLOCK_CELLS = 1 << 22  # resample-block size: resamples x images in one count matrix


def resample_counts(n: int, *, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of bootstrap count matrices [b, n] (float64): row r counts how often each image is drawn in resample
    r. The blocks together give `resamples` rows, the same for the same (n, resamples, seed)."""
    rng = np.random.default_rng(seed)
    block = max(1, min(resamples, _BLOCK_CELLS // max(n, 1)))
    done = 0
    while done < resamples:
        b = min(block, resamples - done)
        draws = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        yield np.bincount(draws.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
        done += b


def interval(samples: np.ndarray, level: float = DEFAULT_LEVEL) -> list[float]:
    """The percentile interval of bootstrap samples (NaN samples, from resamples where a metric is undefined, are
    left out)."""
    samples = samples[np.isfinite(samples)]
    if not len(samples):
        return [float("nan"), float("nan")]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return [float(low), float(high)]


def _class_sums(counts: np.ndarray, classes: np.ndarray, weights: np.ndarray, n_classes: int) -> np.ndarray:
    """[b, C]: for each resample, the sum of `weights` over the drawn images of each class (`classes` [n])."""
    from scipy import sparse

    onehot = sparse.csr_matrix((weights, (classes, np.arange(len(classes)))), shape=(n_classes, len(classes)))
    return np.asarray((onehot @ counts.T).T)


def classification_intervals(y_true: np.ndarray, y_pred: np.ndarray, top5_hit: np.ndarray | None, *,
                             resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                             level: float = DEFAULT_LEVEL) -> dict[str, list[float]]:
    """Intervals of top-1, top-5 (when given), balanced accuracy and macro-F1 over bootstrap resamples of the
    test images. The metrics are computed per resample as `classification_metrics` defines them: balanced accuracy
    and macro-F1 average over the classes present in that resample."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    n = len(y_true)
    if n == 0:
        return {}
    labels, true_idx = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    t_idx, p_idx = true_idx[:n], true_idx[n:]
    c = len(labels)
    correct = (y_true == y_pred).astype(np.float64)
    ones = np.ones(n)
    out: dict[str, list[np.ndarray]] = {"top1": [], "top5": [], "balanced_accuracy": [], "macro_f1": []}
    for counts in resample_counts(n, resamples=resamples, seed=seed):
        out["top1"].append(counts @ correct / n)
        if top5_hit is not None:
            out["top5"].append(counts @ np.asarray(top5_hit, dtype=np.float64) / n)
        support = _class_sums(counts, t_idx, ones, c)
        hits = _class_sums(counts, t_idx, correct, c)
        predicted = _class_sums(counts, p_idx, ones, c)
        present = support > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = np.where(present, hits / support, 0.0)
            f1 = np.where(present, 2 * hits / (support + predicted), 0.0)
        n_present = present.sum(axis=1)
        out["balanced_accuracy"].append(recall.sum(axis=1) / n_present)
        out["macro_f1"].append(f1.sum(axis=1) / n_present)
    return {k: interval(np.concatenate(v), level) for k, v in out.items() if v}


def mean_intervals(values: dict[str, np.ndarray], *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                   level: float = DEFAULT_LEVEL) -> dict[str, list[float]]:
    """Intervals of means of per-image values (e.g. a query's recall@k or AP@k), all over the same resamples."""
    if not values:
        return {}
    n = len(next(iter(values.values())))
    if n == 0:
        return {k: [float("nan"), float("nan")] for k in values}
    matrix = np.stack([np.asarray(v, dtype=np.float64) for v in values.values()], axis=1)  # [n, m]
    samples = np.concatenate([counts @ matrix / n for counts in resample_counts(n, resamples=resamples, seed=seed)])
    return {k: interval(samples[:, j], level) for j, k in enumerate(values)}


# -- paired comparisons ----------------------------------------------------------------------------------------------

def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: under the null, each of the `a_only + b_only` discordant images is equally
    likely to be one that only A or only B got right."""
    from scipy.stats import binom

    n = a_only + b_only
    if n == 0:
        return 1.0
    return float(min(1.0, 2 * binom.cdf(min(a_only, b_only), n, 0.5)))


def paired_comparison(correct_a: np.ndarray, correct_b: np.ndarray, *, resamples: int = DEFAULT_RESAMPLES,
                      seed: int = 0, level: float = DEFAULT_LEVEL, alpha: float = 0.05) -> dict[str, Any]:
    """A minus B in top-1 on the same test images (row-aligned correctness): the difference, its paired bootstrap
    interval, McNemar's exact p-value and whether the difference is significant at `alpha`."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison of {a.shape} and {b.shape} correctness vectors")
    n = len(a)
    diff = a.astype(np.float64) - b.astype(np.float64)
    samples = np.concatenate([counts @ diff / n for counts in resample_counts(n, resamples=resamples, seed=seed)])
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    p = mcnemar_exact(a_only, b_only)
    return {"difference": float(diff.mean()) if n else 0.0, "interval": interval(samples, level),
            "mcnemar_p": p, "a_only": a_only, "b_only": b_only, "n": n, "significant": bool(p < alpha)}


# -- per-image correctness in results files --------------------------------------------------------------------------

def scoring_order(keys: list[str], ids: list[str]) -> np.ndarray:
    """The order results record per-image values in: content hash, then id (the same whatever the source kind or
    listing order)."""
    return np.array(sorted(range(len(keys)), key=lambda i: (keys[i], str(ids[i]))), dtype=np.int64)


def order_digest(keys: list[str]) -> str:
    """What identifies a set of scored images: a hash of their content keys in scoring order."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:32]


def pack_correct(correct: np.ndarray, keys: list[str], ids: list[str]) -> dict[str, Any]:
    """Per-image correctness (row-aligned with keys/ids) as bits in scoring order, with the order's digest."""
    order = scoring_order(keys, ids)
    bits = np.packbits(np.asarray(correct, dtype=bool)[order])
    return {"order": "content hash, then id", "digest": order_digest(keys), "n": int(len(keys)),
            "bits": base64.b64encode(bits.tobytes()).decode("ascii")}


def pack_correct_arrays(correct: np.ndarray, keys: np.ndarray, ids: np.ndarray) -> dict[str, Any]:
    """`pack_correct` for keys and ids given as byte-string arrays (UTF-8), sorted by numpy instead of as Python
    tuples: the same record (UTF-8 bytes sort as their code points do) in a fraction of the memory, for millions of
    test images."""
    keys, ids = np.asarray(keys, dtype=bytes), np.asarray(ids, dtype=bytes)
    order = np.lexsort((ids, keys))
    bits = np.packbits(np.asarray(correct, dtype=bool)[order])
    return {"order": "content hash, then id", "digest": keys_digest(keys), "n": int(len(keys)),
            "bits": base64.b64encode(bits.tobytes()).decode("ascii")}


def keys_digest(keys: np.ndarray) -> str:
    """What a packed correctness record names its images by: the hash of their sorted content keys (bytes)."""
    return hashlib.sha256(b"\n".join(np.sort(np.asarray(keys, dtype=bytes)).tolist())).hexdigest()[:32]


def unpack_correct(packed: dict[str, Any]) -> np.ndarray:
    """The correctness vector (in scoring order) that `pack_correct` wrote; refuses a record that does not add up."""
    n = int(packed["n"])
    raw = np.frombuffer(base64.b64decode(packed["bits"], validate=True), dtype=np.uint8)
    if len(raw) != (n + 7) // 8:
        raise ValueError(f"a correctness record of {n} images has {len(raw)} bytes")
    return np.unpackbits(raw)[:n].astype(bool)


def compare_results(packed_a: dict[str, Any] | None, packed_b: dict[str, Any] | None, *,
                    resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict[str, Any] | None:
    """A paired comparison of two results' correctness records, or None when they did not score the same images."""
    if not packed_a or not packed_b or packed_a.get("digest") != packed_b.get("digest"):
        return None
    try:
        a, b = unpack_correct(packed_a), unpack_correct(packed_b)
    except (ValueError, KeyError, TypeError):
        return None
    if a.shape != b.shape:
        return None
    return paired_comparison(a, b, resamples=resamples, seed=seed)
