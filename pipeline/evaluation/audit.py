"""Leakage, duplicates and label-noise hints of a store (`python -m pipeline audit`).

- Exact duplicates: rows with the same content hash (recorded at extraction).
- Near duplicates: pairs of rows with cosine similarity at or above a threshold among each row's k nearest
  neighbours (one exact search per row, in blocks of rows; equal similarities ordered by row). The default
  threshold is set from re-encoded and resized copies of real images (see `benchmarks/audit.py` and the README): it
  sits between the cosine of such copies with their originals and that of the closest distinct images.
- Leakage: test rows with an exact or near copy in train or val. The probe and kNN test figures are given on every
  test image and on the test images without a copy; the fits never see test rows, so dropping leaked test rows is
  the same as recomputing on a store without them.
- Hints: a row's label-noise score is the share of its labelled neighbours with another label (the standard kNN
  score); a row's distance from its classes is 1 - its highest cosine to any class centre.

Everything here takes a loaded `FeatureSet` or, for a store beyond `--max-memory`, its compact `StreamedSet`
(`pipeline.evaluation.audit_stream` searches it in blocks): the same rules, the same figures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.store.columns import StreamedSet
from pipeline.store.read import FeatureSet
from pipeline.store.schema import SPLITS

DEFAULT_AUDIT_K = 10
SCALE_DEPTH = 32  # neighbours searched per row to find its nearest row of another class
AUTO_FLOOR, AUTO_CEILING = 0.95, 0.995
LIST_LIMIT = 50
_QUERY_BLOCK = 4096
_PAIR_BLOCK = 65536  # pairs whose features are read at a time (a streamed store)
Rows = FeatureSet | StreamedSet


def ids_of(fs: Rows, rows: np.ndarray) -> np.ndarray:
    """The ids of some rows (read from the store for a streamed one)."""
    rows = np.asarray(rows, dtype=np.int64)
    return fs.ids_of(rows) if isinstance(fs, StreamedSet) else fs.ids[rows]


def splits_of(fs: Rows, rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64)
    return np.asarray(SPLITS, dtype=object)[fs.codes[rows]] if isinstance(fs, StreamedSet) else fs.splits[rows]


def split_column(fs: Rows) -> np.ndarray:
    """One comparable split value per row (codes for a streamed store)."""
    return fs.codes if isinstance(fs, StreamedSet) else fs.splits


def content_keys(fs: Rows) -> np.ndarray:
    """Per row, what "same content" is compared by: the content hash (else the id) as text; for a streamed store
    its 64-bit prefix (`StreamedSet.keys`), which `content_groups` confirms on the full hash."""
    return fs.keys if isinstance(fs, StreamedSet) else np.array(fs.row_keys(), dtype=object)


def content_groups(fs: Rows, keys: np.ndarray | None = None) -> list[np.ndarray]:
    """The groups of two or more rows with the same content hash, each in row order, the groups in hash order
    (`keys`: the rows' `content_keys`, when already made)."""
    keys = content_keys(fs) if keys is None else keys
    order = np.argsort(keys, kind="stable")
    ranked = keys[order]
    bounds = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1], True])
    sizes = np.diff(bounds)
    if isinstance(fs, StreamedSet) and (sizes > 1).any():  # confirm the 64-bit matches on the whole hashes
        candidates = np.sort(np.concatenate([order[lo:hi] for lo, hi, m in zip(bounds[:-1], bounds[1:], sizes,
                                                                                 strict=True) if m > 1]))
        full = fs.row_keys_of(candidates)[0]
        by_full = np.lexsort((candidates, full))
        order, ranked = candidates[by_full], full[by_full]
        bounds = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1], True])
        sizes = np.diff(bounds)
    return [order[lo:hi] for lo, hi, m in zip(bounds[:-1], bounds[1:], sizes, strict=True) if m > 1]


def feature_blocks(fs: Rows, block_rows: int = _QUERY_BLOCK):
    """(rows, float32 features) of every row, `block_rows` at a time."""
    if isinstance(fs, StreamedSet):
        yield from fs.blocks(block_rows=block_rows)
        return
    for start in range(0, len(fs), block_rows):
        yield np.arange(start, min(len(fs), start + block_rows)), fs.features[start:start + block_rows]


def pair_cosines(fs: Rows, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if not isinstance(fs, StreamedSet):
        return np.einsum("ij,ij->i", fs.features[a], fs.features[b]) if len(a) else np.zeros(0, dtype=np.float32)
    parts = [np.einsum("ij,ij->i", fs.features_of(a[i:i + _PAIR_BLOCK]), fs.features_of(b[i:i + _PAIR_BLOCK]))
             for i in range(0, len(a), _PAIR_BLOCK)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


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
        s, i = tie_order(np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1))
        sims[rows], idx[rows] = s[:, :k], i[:, :k]
        if labels is not None:
            same = keys[i] == keys[rows][:, None] if keys is not None else np.zeros(i.shape, dtype=bool)
            other[rows] = _nearest_other_class(labels[rows], np.where(same, -1, labels[i]), s)
    return sims, idx, other


def tie_order(sims: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's neighbours best first, equal similarities (exact copies) by row number: one order whichever
    search, block size or device found them."""
    order = np.lexsort((idx, -sims))
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(idx, order, axis=1)


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


def duplicate_pairs(fs: Rows, sims: np.ndarray, idx: np.ndarray, *, thresholds: np.ndarray,
                    groups: list[np.ndarray] | None = None,
                    keys: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Pairs (a < b row numbers) that are exact duplicates (same content hash: `groups`, else `content_groups`) or
    near duplicates (other content, among the neighbours, cosine at or above the higher of the two rows'
    `thresholds`), with cosine and kind (`keys`: the rows' `content_keys`, when already made)."""
    exact_a, exact_b = [], []
    keys = content_keys(fs) if keys is None else keys
    for group in content_groups(fs, keys) if groups is None else groups:
        a, b = _group_pairs(group, split_column(fs))
        exact_a.append(a)
        exact_b.append(b)
    near = sims >= np.maximum(thresholds[:, None], thresholds[idx])
    a = np.repeat(np.arange(len(fs)), near.sum(axis=1))
    b = idx[near].astype(np.int64)
    a, b = np.minimum(a, b), np.maximum(a, b)
    near_pairs = np.unique(np.stack([a, b], axis=1), axis=0) if len(a) else np.zeros((0, 2), dtype=np.int64)
    near_pairs = near_pairs[keys[near_pairs[:, 0]] != keys[near_pairs[:, 1]]] if len(near_pairs) else near_pairs
    ea = np.concatenate(exact_a) if exact_a else np.zeros(0, dtype=np.int64)
    eb = np.concatenate(exact_b) if exact_b else np.zeros(0, dtype=np.int64)
    pa, pb = np.r_[ea, near_pairs[:, 0]].astype(np.int64), np.r_[eb, near_pairs[:, 1]].astype(np.int64)
    kind = np.array(["exact"] * len(ea) + ["near"] * len(near_pairs), dtype=object)
    return {"a": pa, "b": pb, "cosine": pair_cosines(fs, pa, pb).astype(np.float64), "kind": kind}


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


def leaked_test_rows(fs: Rows, pairs: dict[str, np.ndarray]) -> np.ndarray:
    """Boolean mask of the test rows that have an exact or near copy in train or val."""
    test, fit = fs.mask("test"), fs.mask("train", "val")
    leaked = np.zeros(len(fs), dtype=bool)
    for one, other in ((pairs["a"], pairs["b"]), (pairs["b"], pairs["a"])):
        leaked[one[test[one] & fit[other]]] = True
    return leaked


def label_noise_scores(fs: Rows, idx: np.ndarray) -> np.ndarray:
    """Per row: the share of its labelled neighbours that carry the one other label most of them agree on (1: every
    neighbour has the same label, not this row's), the kNN vote against the row's label; NaN for unlabelled rows or
    rows without a labelled neighbour. Counted a block of rows at a time (rows x classes votes)."""
    labels = fs.labels
    n_classes = max(int(labels.max()) + 1, 1) if len(labels) else 1
    out = np.full(len(fs), np.nan)
    block = max(1, (1 << 22) // n_classes)  # 32 MiB of votes at a time
    for start in range(0, len(fs), block):
        own, neighbour = labels[start:start + block], labels[idx[start:start + block]]
        labelled = neighbour >= 0
        votes = np.zeros((len(own), n_classes))
        rows = np.repeat(np.arange(len(own)), idx.shape[1])[labelled.ravel()]
        np.add.at(votes, (rows, neighbour[labelled]), 1.0)
        votes[np.arange(len(own)), np.clip(own, 0, None)] = 0.0
        with np.errstate(invalid="ignore", divide="ignore"):
            score = votes.max(axis=1) / labelled.sum(axis=1)
        out[start:start + len(own)] = np.where(own >= 0, score, np.nan)
    return out


def centre_distances(fs: Rows, block_rows: int = _QUERY_BLOCK) -> np.ndarray:
    """Per row: 1 - the highest cosine to any class centre (the normalised mean of the class's labelled rows); two
    passes over the features, `block_rows` at a time."""
    labels = fs.labels
    labelled = labels >= 0
    if not labelled.any():
        return np.full(len(fs), np.nan)
    classes = np.unique(labels[labelled])
    sums = np.zeros((int(classes.max()) + 1, fs.features.shape[1] if isinstance(fs, FeatureSet) else fs.dim))
    for rows, x in feature_blocks(fs, block_rows):
        own = labels[rows]
        np.add.at(sums, own[own >= 0], x[own >= 0].astype(np.float64))
    centres = sums[classes] / np.bincount(labels[labelled], minlength=len(sums))[classes][:, None]
    centres /= np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    best = np.full(len(fs), -np.inf)
    for rows, x in feature_blocks(fs, block_rows):
        best[rows] = (x @ centres.T.astype(np.float32)).max(axis=1)
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
    groups: list[np.ndarray]  # the rows of each content hash held more than once (`content_groups`)
    dropped: tuple[np.ndarray, np.ndarray] | None = None  # per row, why a clean assignment drops it; set by the run


def find(fs: Rows, *, threshold: float | None = None, k: int = DEFAULT_AUDIT_K, device: str = "cpu",
         max_memory: int | None = None) -> AuditFindings:
    """Duplicates, leakage and hints of a store (the search on `device`): loaded, or streamed within `max_memory`
    bytes of feature data; `threshold` None: `auto_threshold`."""
    if threshold is not None and (not np.isfinite(threshold) or not 0 < threshold <= 1):
        raise PipelineError(f"the near-duplicate threshold is a cosine in (0, 1], got {threshold}")
    start = time.perf_counter()
    block, keys = _QUERY_BLOCK, content_keys(fs)  # made once: on a loaded store, an object array of texts
    if isinstance(fs, StreamedSet):
        from pipeline.evaluation.audit_stream import streamed_neighbour_table
        from pipeline.store.budget import block_rows, resolve_max_memory

        budget = resolve_max_memory(max_memory)
        block = block_rows(budget, fs.dim, parts=6)
        sims, idx, other = streamed_neighbour_table(fs, k, max_memory=budget, device=device)
    else:
        sims, idx, other = neighbour_table(fs.features, k, fs.labels, keys, device=device)
    if threshold is None:
        thresholds, how = auto_thresholds(other, fs.labels)
    else:
        thresholds, how = np.full(len(fs), float(threshold)), f"given: {threshold:g}"
    groups = content_groups(fs, keys)
    pairs = duplicate_pairs(fs, sims, idx, thresholds=thresholds, groups=groups, keys=keys)
    return AuditFindings(pairs=pairs, groups=groups, leaked=leaked_test_rows(fs, pairs),
                         noise=label_noise_scores(fs, idx), far=centre_distances(fs, block), sims=sims, idx=idx,
                         thresholds=thresholds, threshold_rule=how, seconds=round(time.perf_counter() - start, 3))


def pair_rows(fs: Rows, pairs: dict[str, np.ndarray], *, cross_split_only: bool = False,
              limit: int | None = None) -> list[dict[str, Any]]:
    """Pairs as records with both ids and splits (cross-split pairs first, then by cosine)."""
    split_a, split_b = splits_of(fs, pairs["a"]), splits_of(fs, pairs["b"])
    cross = split_a != split_b
    order = np.lexsort((-pairs["cosine"], ~cross))
    if cross_split_only:
        order = order[cross[order]]
    order = order[:limit]
    a, b = pairs["a"][order], pairs["b"][order]
    id_a, id_b = ids_of(fs, a), ids_of(fs, b)
    return [{"kind": pairs["kind"][i], "cosine": round(float(pairs["cosine"][i]), 6),
             "a_id": str(id_a[n]), "a_split": str(split_a[i]), "a_label": int(fs.labels[a[n]]),
             "b_id": str(id_b[n]), "b_split": str(split_b[i]), "b_label": int(fs.labels[b[n]]),
             "cross_split": bool(cross[i])} for n, i in enumerate(order)]


def hint_rows(fs: Rows, findings: AuditFindings, *, limit: int = LIST_LIMIT) -> dict[str, list[dict]]:
    """The rows most likely mislabelled (highest label-noise score: at least half the neighbours agreeing on one
    other label) and the rows farthest from every class centre."""
    noise = np.nan_to_num(findings.noise, nan=-1.0)
    noisy = np.lexsort((np.arange(len(fs)), -noise))
    noisy = noisy[noise[noisy] >= 0.5][:limit]
    far = np.nan_to_num(findings.far, nan=-np.inf)
    farthest = np.lexsort((np.arange(len(fs)), -far))
    farthest = farthest[np.isfinite(far[farthest])][:limit]
    shown = np.unique(np.r_[noisy, farthest, findings.idx[np.r_[noisy, farthest], :6].ravel()]).astype(np.int64)
    ids = dict(zip(shown.tolist(), (str(i) for i in ids_of(fs, shown)), strict=True))
    splits = dict(zip(shown.tolist(), (str(s) for s in splits_of(fs, shown)), strict=True))

    def record(i: int) -> dict[str, Any]:
        return {"id": ids[i], "split": splits[i], "label": int(fs.labels[i]),
                "label_noise": _rounded(findings.noise[i]), "centre_distance": _rounded(findings.far[i]),
                "neighbours": [{"id": ids[int(j)], "label": int(fs.labels[j]), "score": float(s)}
                               for j, s in zip(findings.idx[i, :6], findings.sims[i, :6], strict=True)]}

    return {"label_noise": [record(int(i)) for i in noisy], "outliers": [record(int(i)) for i in farthest]}


def _rounded(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), 6)
