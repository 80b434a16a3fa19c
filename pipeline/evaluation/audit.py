"""Leakage, duplicates and label-noise hints of a store (`python -m pipeline audit`).

- Exact duplicates: rows with the same content hash (recorded at extraction).
- Near duplicates: pairs of rows with cosine similarity at or above a threshold among each row's k nearest
  neighbours (one exact FAISS search per row, in blocks of rows). The default threshold is set from re-encoded and
  resized copies of real images (see `benchmarks/audit.py` and the README): it sits between the cosine of such copies
  with their originals and that of the closest distinct images.
- Leakage: test rows with an exact or near copy in train or val. The probe and kNN test figures are given on every
  test image and on the test images without a copy; the fits never see test rows, so dropping leaked test rows is
  the same as recomputing on a store without them.
- Hints: a row's label-noise score is the share of its labelled neighbours with another label (the standard kNN
  score); a row's distance from its classes is 1 - its highest cosine to any class centre.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.store.read import FeatureSet

DEFAULT_AUDIT_K = 10
SCALE_DEPTH = 32  # neighbours searched per row to find its nearest row of another class
AUTO_FLOOR, AUTO_CEILING = 0.95, 0.995
LIST_LIMIT = 50
_QUERY_BLOCK = 4096


def neighbour_table(features: np.ndarray, k: int, labels: np.ndarray | None = None, keys: np.ndarray | None = None,
                    depth: int = SCALE_DEPTH, device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's k nearest other rows (cosine, best first; the row itself left out by index), searched in blocks of
    rows (memory N x k, one search per row); and each row's cosine to its nearest row of another class and other
    content (`keys`) among its `depth` nearest (when there is none that near, the depth-th cosine: an upper bound;
    NaN for unlabelled rows). The search runs on `device`: FAISS on CPU, torch on CUDA (in bigger blocks, each
    a pass over the bank)."""
    from pipeline.index.build import build_flat_index, on_cuda, search
    from pipeline.index.torch_flat import torch_top_k

    n = len(features)
    k = min(k, n - 1)
    if k < 1:
        raise PipelineError(f"the store has {n} row(s); an audit needs at least 2")
    depth = min(max(k, depth), n - 1)
    on_gpu = on_cuda(device)
    index = None if on_gpu else build_flat_index(features)
    sims, idx = np.empty((n, k), dtype=np.float32), np.empty((n, k), dtype=np.int64)
    other = np.full(n, np.nan)
    block = _QUERY_BLOCK * (16 if on_gpu else 1)
    for start in range(0, n, block):
        rows = np.arange(start, min(n, start + block))
        s, i = torch_top_k(features, features[rows], depth + 1, device) if on_gpu else \
            search(index, features[rows], depth + 1)
        if (i < 0).any():
            raise PipelineError("the search found fewer neighbours than asked (non-finite features?); run python -m "
                                "pipeline store verify on the store")
        order = np.argsort(i == rows[:, None], axis=1, kind="stable")[:, :depth]  # the non-self hits, in rank order
        s, i = np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)
        sims[rows], idx[rows] = s[:, :k], i[:, :k]
        if labels is not None:
            same = keys[i] == keys[rows][:, None] if keys is not None else np.zeros(i.shape, dtype=bool)
            other[rows] = _nearest_other_class(labels[rows], np.where(same, -1, labels[i]), s)
    return sims, idx, other


def _nearest_other_class(own: np.ndarray, neighbour_labels: np.ndarray, sims: np.ndarray) -> np.ndarray:
    differs = (neighbour_labels != own[:, None]) & (neighbour_labels >= 0)
    first = np.argmax(differs, axis=1)
    found = differs[np.arange(len(own)), first]
    out = np.where(found, sims[np.arange(len(own)), first], sims[:, -1]).astype(np.float64)
    return np.where(own >= 0, out, np.nan)


def auto_thresholds(other_class: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, str]:
    """Per row, the near-duplicate cosine for pairs it is in (a pair uses the higher of its two rows'): halfway
    between how close its class gets to other classes (the 99.9th percentile over the class of each row's cosine to
    its nearest row of another class) and identity, within [0.95, 0.995]. Unlabelled rows take the value over all
    labelled rows; 0.95 when there are not two labelled classes. Copies share their label, so other-class
    neighbours are distinct images: the rule adapts to classes whose distinct images are close (tiny or uniform
    images), class by class."""
    known = np.isfinite(other_class)
    if known.sum() < 2:
        return np.full(len(labels), AUTO_FLOOR), f"auto: {AUTO_FLOOR:g} (no two labelled classes to measure with)"

    def threshold(values: np.ndarray) -> float:
        return float(np.clip((1 + np.percentile(values, 99.9)) / 2, AUTO_FLOOR, AUTO_CEILING))

    out = np.full(len(labels), threshold(other_class[known]))
    for c in np.unique(labels[known]):
        rows = labels == c
        out[rows] = threshold(other_class[rows & known])
    return out, (f"auto, per class: (1 + the class's 99.9th percentile of the cosine to the nearest image of another "
                 f"class) / 2 within [{AUTO_FLOOR:g}, {AUTO_CEILING:g}]; here {out.min():.4f} to {out.max():.4f} "
                 f"(median {np.median(out):.4f})")


def duplicate_pairs(fs: FeatureSet, sims: np.ndarray, idx: np.ndarray, *,
                    thresholds: np.ndarray) -> dict[str, np.ndarray]:
    """Pairs (a < b row numbers) that are exact duplicates (same content hash) or near duplicates (other content,
    among the neighbours, cosine at or above the higher of the two rows' `thresholds`), with cosine and kind."""
    keys = np.array(fs.row_keys(), dtype=object)
    order = np.argsort(keys, kind="stable")
    exact_a, exact_b = [], []
    bounds = np.flatnonzero(np.r_[True, keys[order][1:] != keys[order][:-1], True])
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if hi - lo > 1:
            a, b = _group_pairs(np.sort(order[lo:hi]), fs.splits)
            exact_a.append(a)
            exact_b.append(b)
    near = sims >= np.maximum(thresholds[:, None], thresholds[idx])
    a = np.repeat(np.arange(len(fs)), near.sum(axis=1))
    b = idx[near]
    a, b = np.minimum(a, b), np.maximum(a, b)
    near_pairs = np.unique(np.stack([a, b], axis=1), axis=0) if len(a) else np.zeros((0, 2), dtype=np.int64)
    near_pairs = near_pairs[keys[near_pairs[:, 0]] != keys[near_pairs[:, 1]]] if len(near_pairs) else near_pairs
    ea = np.concatenate(exact_a) if exact_a else np.zeros(0, dtype=np.int64)
    eb = np.concatenate(exact_b) if exact_b else np.zeros(0, dtype=np.int64)
    pa, pb = np.r_[ea, near_pairs[:, 0]].astype(np.int64), np.r_[eb, near_pairs[:, 1]].astype(np.int64)
    cosine = np.einsum("ij,ij->i", fs.features[pa], fs.features[pb]) if len(pa) else np.zeros(0, dtype=np.float32)
    kind = np.array(["exact"] * len(ea) + ["near"] * len(near_pairs), dtype=object)
    return {"a": pa, "b": pb, "cosine": cosine.astype(np.float64), "kind": kind}


def _group_pairs(group: np.ndarray, splits: np.ndarray, *, all_pairs_up_to: int = 64) -> tuple[np.ndarray,
                                                                                                np.ndarray]:
    """The pairs of one group of identical rows: all of them for a small group; for a large one (thousands of
    copies of a blank image, say), each row with the first row of every split, which is enough to find every
    cross-split copy without m^2 pairs."""
    if len(group) <= all_pairs_up_to:
        a, b = np.triu_indices(len(group), 1)
        return group[a], group[b]
    firsts = [group[np.argmax(splits[group] == s)] for s in np.unique(splits[group])]
    a = np.concatenate([np.full(len(group), f) for f in firsts])
    b = np.tile(group, len(firsts))
    keep = a != b
    a, b = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
    pairs = np.unique(np.stack([a, b], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def leaked_test_rows(fs: FeatureSet, pairs: dict[str, np.ndarray]) -> np.ndarray:
    """Boolean mask of the test rows that have an exact or near copy in train or val."""
    split = fs.splits
    fit = np.isin(split, ["train", "val"])
    leaked = np.zeros(len(fs), dtype=bool)
    for one, other in ((pairs["a"], pairs["b"]), (pairs["b"], pairs["a"])):
        hit = (split[one] == "test") & fit[other]
        leaked[one[hit]] = True
    return leaked


def label_noise_scores(fs: FeatureSet, idx: np.ndarray) -> np.ndarray:
    """Per row: the share of its labelled neighbours that carry the one other label most of them agree on (1: every
    neighbour has the same label, not this row's), the kNN vote against the row's label; NaN for unlabelled rows or
    rows without a labelled neighbour."""
    labels = fs.labels
    neighbour = labels[idx]
    labelled = neighbour >= 0
    n_classes = max(int(labels.max()) + 1, 1)
    votes = np.zeros((len(fs), n_classes))
    rows = np.repeat(np.arange(len(fs)), idx.shape[1])[labelled.ravel()]
    np.add.at(votes, (rows, neighbour[labelled]), 1.0)
    own = np.clip(labels, 0, None)
    votes[np.arange(len(fs)), own] = 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        score = votes.max(axis=1) / labelled.sum(axis=1)
    return np.where(labels >= 0, score, np.nan)


def centre_distances(fs: FeatureSet) -> np.ndarray:
    """Per row: 1 - the highest cosine to any class centre (the normalised mean of the class's labelled rows)."""
    labelled = fs.labels >= 0
    if not labelled.any():
        return np.full(len(fs), np.nan)
    classes = np.unique(fs.labels[labelled])
    centres = np.stack([fs.features[fs.labels == c].mean(axis=0) for c in classes])
    centres /= np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    best = np.full(len(fs), -np.inf)
    for start in range(0, len(fs), _QUERY_BLOCK):
        block = fs.features[start:start + _QUERY_BLOCK] @ centres.T
        best[start:start + len(block)] = block.max(axis=1)
    return 1.0 - best


@dataclass
class AuditFindings:
    """What `find` computed: the pairs, the leaked test rows, each row's hints, and the neighbour table."""

    pairs: dict[str, np.ndarray]
    leaked: np.ndarray
    noise: np.ndarray
    far: np.ndarray
    sims: np.ndarray
    idx: np.ndarray
    thresholds: np.ndarray
    threshold_rule: str
    seconds: float
    dropped: list[str] | None = None  # per row, why a clean split assignment drops it ("" to keep); set by the run


def find(fs: FeatureSet, *, threshold: float | None = None, k: int = DEFAULT_AUDIT_K,
         device: str = "cpu") -> AuditFindings:
    """Duplicates, leakage and hints of a loaded store (the search on `device`); `threshold` None:
    `auto_threshold`."""
    if threshold is not None and (not np.isfinite(threshold) or not 0 < threshold <= 1):
        raise PipelineError(f"the near-duplicate threshold is a cosine in (0, 1], got {threshold}")
    start = time.perf_counter()
    sims, idx, other = neighbour_table(fs.features, k, fs.labels, np.array(fs.row_keys(), dtype=object),
                                       device=device)
    if threshold is None:
        thresholds, how = auto_thresholds(other, fs.labels)
    else:
        thresholds, how = np.full(len(fs), float(threshold)), f"given: {threshold:g}"
    pairs = duplicate_pairs(fs, sims, idx, thresholds=thresholds)
    return AuditFindings(pairs=pairs, leaked=leaked_test_rows(fs, pairs), noise=label_noise_scores(fs, idx),
                         far=centre_distances(fs), sims=sims, idx=idx, thresholds=thresholds, threshold_rule=how,
                         seconds=round(time.perf_counter() - start, 3))


def pair_rows(fs: FeatureSet, pairs: dict[str, np.ndarray], *, cross_split_only: bool = False,
              limit: int | None = None) -> list[dict[str, Any]]:
    """Pairs as records with both ids and splits (cross-split pairs first, then by cosine)."""
    cross = fs.splits[pairs["a"]] != fs.splits[pairs["b"]]
    order = np.lexsort((-pairs["cosine"], ~cross))
    if cross_split_only:
        order = order[cross[order]]
    out = []
    for i in order[:limit]:
        a, b = int(pairs["a"][i]), int(pairs["b"][i])
        out.append({"kind": pairs["kind"][i], "cosine": round(float(pairs["cosine"][i]), 6),
                    "a_id": str(fs.ids[a]), "a_split": str(fs.splits[a]), "a_label": int(fs.labels[a]),
                    "b_id": str(fs.ids[b]), "b_split": str(fs.splits[b]), "b_label": int(fs.labels[b]),
                    "cross_split": bool(cross[i])})
    return out


def hint_rows(fs: FeatureSet, findings: AuditFindings, *, limit: int = LIST_LIMIT) -> dict[str, list[dict]]:
    """The rows most likely mislabelled (highest label-noise score: at least half the neighbours agreeing on one
    other label) and the rows farthest from every class centre."""
    def record(i: int) -> dict[str, Any]:
        return {"id": str(fs.ids[i]), "split": str(fs.splits[i]), "label": int(fs.labels[i]),
                "label_noise": _rounded(findings.noise[i]), "centre_distance": _rounded(findings.far[i]),
                "neighbours": [{"id": str(fs.ids[j]), "label": int(fs.labels[j]), "score": float(s)}
                               for j, s in zip(findings.idx[i, :6], findings.sims[i, :6], strict=True)]}

    noise = np.nan_to_num(findings.noise, nan=-1.0)
    noisy = [i for i in np.lexsort((np.arange(len(fs)), -noise)) if noise[i] >= 0.5][:limit]
    far = np.nan_to_num(findings.far, nan=-np.inf)
    farthest = [i for i in np.lexsort((np.arange(len(fs)), -far)) if np.isfinite(far[i])][:limit]
    return {"label_noise": [record(i) for i in noisy], "outliers": [record(i) for i in farthest]}


def _rounded(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), 6)
