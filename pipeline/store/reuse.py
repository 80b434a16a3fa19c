"""What a store being written can take from earlier runs, and what it must still compute.

Given the listing (every row the finished store must account for), the planner finds the files earlier runs left
(`candidates`): the partial of an interrupted run, the complete store being updated, shard files. It decides which
of their rows are still valid (`valid`): an image is unchanged when its size and mtime match, or, when they differ,
its content hash still matches. It also keeps count of what was resumed (from an interrupted run) and what was kept
(from the previous store), and of which listing rows are accounted for (`done`).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import StoreError
from pipeline.store.schema import SCHEMA_VERSION, attrs_to_dict, partial_path, shard_list, shards_dir
from pipeline.store.segment import COLUMNS, open_segment


@dataclass(frozen=True)
class Listing:
    """The rows a store must account for, in order: ids, labels, splits and each image's (size, mtime_ns) stamp
    (sequences: lists, or a source table's columns), and where each image lives (`paths`, for the store's path
    column; None: a store of features that came without images).

    `hasher(position)` gives the content hash of an image whose stamp changed, to see whether its content did (the
    same hash the decode stage records); without it a changed stamp means a changed image.
    """

    ids: Sequence[str]
    labels: np.ndarray
    splits: Sequence[str]
    stamps: np.ndarray
    hasher: Callable[[int], str] | None = None
    paths: Sequence[str] | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        if not (len(self.labels) == len(self.splits) == len(self.stamps) == n) or (
                self.paths is not None and len(self.paths) != n):
            raise StoreError("a store listing needs ids, labels, splits, stamps (and paths) of the same length")

    def __len__(self) -> int:
        return len(self.ids)

    def columns(self, positions: np.ndarray, hashes: np.ndarray) -> dict[str, Any]:
        """The row datasets of these listing positions (labels, splits and stamps always from the listing)."""
        return {"ids": [self.ids[p] for p in positions], "labels": self.labels[positions],
                "splits": [self.splits[p] for p in positions], "files/size": self.stamps[positions, 0],
                "files/mtime_ns": self.stamps[positions, 1], "files/hash": hashes}


class ReusePlanner:
    """Decides what a store at `path` can reuse; `done` marks the listing rows accounted for so far."""

    def __init__(self, path: Path, listing: Listing, *, key: str | None, dim: int, check_content: bool) -> None:
        self.path, self.listing, self.key, self.dim, self.check_content = path, listing, key, dim, check_content
        self.index = {sample_id: i for i, sample_id in enumerate(listing.ids)}
        if len(self.index) != len(listing.ids):
            raise StoreError(f"duplicate ids in the listing for {path}")
        self.done = np.zeros(len(listing), dtype=bool)
        self.resumed = 0  # rows taken from an interrupted run
        self.kept = 0  # rows taken from the previous complete store
        self._hash_cache: dict[int, str] = {}
        self._store_shards: set[str] | None = None

    def usable(self, path: Path) -> bool:
        """A segment file we may take rows from: a feature-store segment with our cache key and dimension."""
        try:
            with open_segment(path, "r") as f:
                a = f.attrs
                return (int(a.get("schema_version", -1)) == SCHEMA_VERSION and a.get("cache_key") == self.key
                        and a.get("layout", "single") != "sharded" and "committed_rows" in a and "features" in f
                        and f["features"].shape[1:] == (self.dim,) and all(c in f for c, _ in COLUMNS))
        except (OSError, KeyError, ValueError):
            return False

    def candidates(self) -> tuple[Path | None, Path | None, list[Path]]:
        """(interrupted single-file partial, complete single store, shard files), each usable by this run."""
        partial = partial_path(self.path)
        partial = partial if partial.is_file() and self.usable(partial) else None
        store = self.path if self.path.is_file() and self.usable(self.path) else None
        if store is not None:
            with h5py.File(store, "r") as f:
                if not f.attrs.get("complete", False):
                    store = None
        folder = shards_dir(self.path)
        shards = sorted(p for p in folder.glob("*.h5") if self.usable(p)) if folder.is_dir() else []
        return partial, store, shards

    def _current_hash(self, position: int) -> str:
        if position not in self._hash_cache:
            self._hash_cache[position] = self.listing.hasher(position) if self.listing.hasher else ""
        return self._hash_cache[position]

    def valid(self, ids: list[str], stamps: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        """For rows of a source: (positions in the listing or -1, usable mask, all usable without rehashing)."""
        positions = np.fromiter((self.index.get(i, -1) for i in ids), dtype=np.int64, count=len(ids))
        usable = positions >= 0
        usable[usable] &= ~self.done[positions[usable]]
        # a source never lists an id twice, but guard anyway: the first occurrence wins
        _, first = np.unique(np.where(usable, positions, -1), return_index=True)
        once = np.zeros(len(ids), dtype=bool)
        once[first] = True
        usable &= once
        same_stamp = np.zeros(len(ids), dtype=bool)
        same_stamp[usable] = (stamps[usable] == self.listing.stamps[positions[usable]]).all(axis=1)
        stamps_only = bool(same_stamp[usable].all()) and not self.check_content
        for row in np.flatnonzero(usable & (~same_stamp | self.check_content)):
            stored = hashes[row].decode()
            usable[row] = bool(stored) and stored == self._current_hash(int(positions[row]))
        return positions, usable, stamps_only and bool(usable.all())

    def count(self, source: Path, n: int) -> None:
        """Rows taken from `source`: kept when it is (part of) the complete store, resumed otherwise."""
        if source == self.path or (source.parent == shards_dir(self.path) and self._referenced_by_store(source.name)):
            self.kept += n
        else:
            self.resumed += n

    def _referenced_by_store(self, name: str) -> bool:
        if self._store_shards is None:
            self._store_shards = set()
            if self.path.is_file() and h5py.is_hdf5(self.path):
                with h5py.File(self.path, "r") as f:
                    self._store_shards = {s["file"] for s in shard_list(attrs_to_dict(f.attrs))}
        return name in self._store_shards

    def store_id(self, partial: Path | None, *, keep: bool) -> str:
        """The store's identity: kept from the run being resumed or the store being updated (indexes built on it
        stay valid), new for a fresh store or --overwrite (`keep` False)."""
        for candidate in (partial, self.path) if keep else ():
            if candidate is not None and candidate.is_file() and self.usable(candidate):
                with h5py.File(candidate, "r") as f:
                    found = f.attrs.get("store_id")
                if isinstance(found, str | bytes) and found:
                    return found.decode() if isinstance(found, bytes) else found
        return secrets.token_hex(16)
