"""Deterministic splits that belong to the image, not to how it is spelt or listed.

A sample's place in a split is decided by a seeded hash of its *key*: its content hash (the BLAKE2b of its bytes, the
same hash the store records) for file-based sources, so that a folder, a manifest and tar shards holding the same
images split them the same way, and byte-identical copies always land on the same side. Within a group (a class),
the `n` samples with the smallest hash are picked; samples with the same key are picked together, so a group's
count can exceed `n` by the size of the last duplicate set. Listing order never matters. The picking works on
arrays (a 20-byte rank a row), so a listing of 10M rows is split without a Python object per row kept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np


def held_out_count(n: int, fraction: float) -> int:
    """How many of a class's n samples go to test: round(n * fraction), at least one when n >= 2, at most n - 1."""
    return min(max(round(n * fraction), 1 if n >= 2 else 0), n - 1) if n else 0


def stratified_splits(keys: Sequence[str], labels: Sequence[int], *, test_fraction: float, seed: int,
                      ties: Sequence[str] | None = None) -> list[str]:
    """train/test per label group (unlabelled samples form one group): `held_out_count` per group by content hash, and
    each group keeps at least one training sample."""
    mask = pick_per_label(np.asarray(labels, dtype=np.int64), keys.__getitem__, fraction=test_fraction, seed=seed,
                          tie_of=str if ties is None else ties.__getitem__)
    return [("train", "test")[t] for t in mask.tolist()]


def holdout_mask(labels: np.ndarray, keys: Sequence[str], *, fraction: float, seed: int) -> np.ndarray:
    """A fixed stratified slice (e.g. validation out of train): per class `held_out_count(n, fraction)` rows picked by
    content hash, so the slice does not depend on the order of the rows."""
    return pick_per_label(np.asarray(labels, dtype=np.int64), keys.__getitem__, fraction=fraction, seed=seed,
                          tie_of=str)


_RANK = np.dtype([("hi", ">u8"), ("mid", ">u8"), ("lo", ">u4")])  # a SHA-1 digest, compared as its hex text is


def pick_per_label(labels: np.ndarray, key_of: Callable[[int], str], *, fraction: float, seed: int,
                   tie_of: Callable[[int], str]) -> np.ndarray:
    """Boolean mask over rows: per label, `held_out_count(n, fraction)` of its n rows picked by smallest seeded hash
    of their key (SHA-1 of `{seed}:{key}`), rows of equal key together, and at least one row of each label left
    unpicked.

    `key_of(i)` is row i's key ("" when unreadable: such a row is a group of its own, ranked by `tie_of(i)`, its
    id, and its place among its label's rows). Compact at any size: 20 bytes of rank a row and a few sorts, not a
    dict and list per row; a group of equal keys has one rank, so ordering by rank alone is ordering by key (up to
    a SHA-1 collision)."""
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if n == 0:
        return np.zeros(0, dtype=bool)
    by_label = np.argsort(labels, kind="stable")
    firsts = np.flatnonzero(np.r_[True, labels[by_label][1:] != labels[by_label][:-1]])
    place = np.empty(n, dtype=np.int64)  # a row's place among its label's rows, in row order
    place[by_label] = np.arange(n) - np.repeat(firsts, np.diff(np.r_[firsts, n]))
    ranks = bytearray(n * _RANK.itemsize)
    for i in range(n):
        key = key_of(i)
        text = f"{seed}:{key}" if key else f"{seed}:\0{tie_of(i)}\0{place[i]}"
        ranks[i * 20:i * 20 + 20] = hashlib.sha1(text.encode("utf-8", "surrogateescape")).digest()
    rank = np.frombuffer(ranks, dtype=_RANK)
    order = np.lexsort((rank["lo"], rank["mid"], rank["hi"], labels))
    ranked, grouped = rank[order], labels[order]
    starts = np.r_[True, (grouped[1:] != grouped[:-1]) | (ranked[1:] != ranked[:-1])]
    group = np.cumsum(starts) - 1  # each sorted row's group (one label, one key)
    first = np.flatnonzero(starts)
    size = np.diff(np.r_[first, n])
    label_first = np.r_[True, grouped[first][1:] != grouped[first][:-1]]
    label_of = np.cumsum(label_first) - 1  # each group's label, numbered in sorted order
    label_start = first[label_first]  # sorted row where each label begins
    label_rows = np.diff(np.r_[label_start, n])
    wanted = np.array([held_out_count(int(m), fraction) for m in label_rows], dtype=np.int64)
    before = first - label_start[label_of]  # rows of its label in groups ranked ahead
    # greedy by rank: a group is taken while fewer than `wanted` are; one that would leave its label no training
    # row is skipped, which can only be the label's last group, so the taken count ahead of a group is `before`
    taken = (before < wanted[label_of]) & (label_rows[label_of] - before - size >= 1)
    picked = np.zeros(n, dtype=bool)
    picked[order] = taken[group]
    return picked
