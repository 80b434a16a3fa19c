"""Deterministic splits that belong to the image, not to how it is spelt or listed.

A sample's place in a split is decided by a seeded hash of its *key*: its content hash (the BLAKE2b of its bytes, the
same hash the store records) for file-based sources, so that a folder, a manifest and tar shards holding the same
images split them the same way, and byte-identical copies always land on the same side. Within a group (a class),
the `n` samples with the smallest hash are picked; samples with the same key are picked together, so a group's
count can exceed `n` by the size of the last duplicate set. Listing order never matters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def split_rank(key: str, seed: int) -> str:
    return hashlib.sha1(f"{seed}:{key}".encode("utf-8", "surrogateescape")).hexdigest()


def pick_by_hash(keys: Sequence[str], n: int, *, seed: int, ties: Sequence[str] | None = None,
                 keep_out: int = 0) -> np.ndarray:
    """Boolean mask over `keys`: about `n` of them by smallest seeded hash, equal keys together, leaving at least
    `keep_out` unpicked. `ties` (e.g. ids) orders samples whose key is empty (unreadable) or equal."""
    ties = list(ties) if ties is not None else [""] * len(keys)
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key if key else f"\0{ties[i]}\0{i}", []).append(i)
    order = sorted(groups, key=lambda k: (split_rank(k, seed), min(ties[i] for i in groups[k])))
    picked = np.zeros(len(keys), dtype=bool)
    taken = 0
    for k in order:
        if taken >= n:
            break
        members = groups[k]
        if len(keys) - taken - len(members) < keep_out:
            continue
        picked[members] = True
        taken += len(members)
    return picked


def held_out_count(n: int, fraction: float) -> int:
    """How many of a class's n samples go to test: round(n * fraction), at least one when n >= 2, at most n - 1."""
    return min(max(round(n * fraction), 1 if n >= 2 else 0), n - 1) if n else 0


def stratified_splits(keys: Sequence[str], labels: Sequence[int], *, test_fraction: float, seed: int,
                      ties: Sequence[str] | None = None) -> list[str]:
    """train/test per label group (unlabelled samples form one group): `held_out_count` per group by content hash, and
    each group keeps at least one training sample."""
    ties = list(ties) if ties is not None else [str(i) for i in range(len(keys))]
    splits = ["train"] * len(keys)
    by_label: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(int(label), []).append(i)
    for rows in by_label.values():
        mask = pick_by_hash([keys[i] for i in rows], held_out_count(len(rows), test_fraction), seed=seed,
                            ties=[ties[i] for i in rows], keep_out=1)
        for i, chosen in zip(rows, mask, strict=True):
            if chosen:
                splits[i] = "test"
    return splits


def holdout_mask(labels: np.ndarray, keys: Sequence[str], *, fraction: float, seed: int) -> np.ndarray:
    """A fixed stratified slice (e.g. validation out of train): per class `held_out_count(n, fraction)` rows picked by
    content hash, so the slice does not depend on the order of the rows."""
    mask = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        rows = np.flatnonzero(labels == cls)
        mask[rows] = pick_by_hash([keys[i] for i in rows], held_out_count(len(rows), fraction), seed=seed,
                                  ties=[str(i) for i in rows], keep_out=1)
    return mask
