"""Where tar samples lie, as columns: a `MemberColumn` holds each member's shard number, byte offset and size in one
structured array (20 bytes a row, pickled to the decode workers as that array), not a `TarMember` object per row;
indexing builds the `TarMember` the reader takes. A key without an image member keeps its reason (`problem`) in a
small dict, by row. `ShardPaths`: their `shard.tar:key` texts as each shard's path once and the keys. `MemberFiles`:
the members' content digests for a split by content, a shard at a time, in processes for many rows."""

from __future__ import annotations

import logging
import operator
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.engine.decode import check_file_size, content_hash
from pipeline.sources.stamps import DIGEST_WIDTH, PARALLEL_HASH_ROWS, in_order, stat_workers
from pipeline.sources.table import TextColumn

log = logging.getLogger(__name__)

MEMBER = np.dtype([("shard", "<i4"), ("offset", "<i8"), ("size", "<i8")])


@dataclass(frozen=True)
class TarMember:
    """Where a sample's image lies: shard number, byte offset and size of the member (`problem`: why there is none)."""

    shard: int
    offset: int
    size: int
    problem: str = ""


class MemberColumn(Sequence):
    """`TarMember`s as a [n] `MEMBER` array and the problems of the rows that have one (row -> reason)."""

    __slots__ = ("rows", "problems")

    def __init__(self, rows: np.ndarray, problems: Mapping[int, str] | None = None) -> None:
        if rows.dtype != MEMBER or rows.ndim != 1:
            raise ValueError(f"tar member rows must be a 1-d array of {MEMBER}, not {rows.dtype} x {rows.shape}")
        self.rows, self.problems = rows, dict(problems or {})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, where: Any) -> Any:
        if isinstance(where, slice):
            return self.take(np.arange(len(self))[where])
        i = operator.index(where)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"row {where} of {len(self)} tar members")
        shard, offset, size = self.rows[i].tolist()
        return TarMember(shard, offset, size, self.problems.get(i, ""))

    def __iter__(self) -> Iterator[TarMember]:
        for i in range(len(self)):
            yield self[i]

    def take(self, where: Any) -> MemberColumn:
        """The rows at these positions (an array or sequence of row numbers)."""
        positions = np.asarray(where, dtype=np.int64).reshape(-1)
        if len(positions) and (positions.min() < -len(self) or positions.max() >= len(self)):
            raise IndexError(f"rows outside {len(self)} tar members")
        positions = np.where(positions < 0, positions + len(self), positions)
        problems = {}
        if self.problems:
            wanted = np.fromiter(self.problems, dtype=np.int64, count=len(self.problems))
            for new in np.flatnonzero(np.isin(positions, wanted)).tolist():
                problems[new] = self.problems[int(positions[new])]
        return MemberColumn(self.rows[positions], problems)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, MemberColumn):
            return bool(np.array_equal(self.rows, other.rows)) and self.problems == other.problems
        return isinstance(other, Sequence) and not isinstance(other, str) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"MemberColumn({len(self)} members, {len(self.problems)} without an image)"


class MemberBuilder:
    """A `MemberColumn` built a shard at a time: each shard's members as an array, joined once at the end."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.problems: dict[int, str] = {}
        self.rows = 0

    def add(self, shard: int, offsets: list[int], sizes: list[int], problems: Mapping[int, str]) -> None:
        """One shard's members in row order: the image member's offset and size (0 and 0 where `problems`, by row
        within the shard, says why there is none)."""
        part = np.zeros(len(offsets), dtype=MEMBER)
        part["shard"], part["offset"], part["size"] = shard, offsets, sizes
        self.problems.update((self.rows + k, reason) for k, reason in problems.items())
        self.parts.append(part)
        self.rows += len(part)

    def finish(self) -> MemberColumn:
        rows = np.concatenate(self.parts) if self.parts else np.zeros(0, dtype=MEMBER)
        return MemberColumn(rows, self.problems)


class MemberFiles:
    """Tar members as the split by content reads them (`file_content_keys`): `take` some rows, and `digests` of
    them all, each shard's members read in one pass over it, by processes for many rows."""

    def __init__(self, shards: Sequence[Path], members: MemberColumn) -> None:
        self.shards, self.members = tuple(shards), members

    def __len__(self) -> int:
        return len(self.members)

    def take(self, rows: Any) -> MemberFiles:
        return MemberFiles(self.shards, self.members.take(rows))

    def digests(self, max_bytes: int | None, workers: int | None = None,
                parallel_from: int = PARALLEL_HASH_ROWS) -> np.ndarray:
        """[n, DIGEST_WIDTH]: each member's `content_hash` as 16 bytes and 1, as `TarReader.read` would give its
        bytes; zeros for a key without an image member, one over `max_bytes`, or one that cannot be read. By
        `workers` processes (default `stat_workers`), a shard a job, from `parallel_from` rows."""
        workers = stat_workers() if workers is None else workers
        rows = self.members.rows.copy()
        rows["size"][np.fromiter(self.members.problems, dtype=np.int64, count=len(self.members.problems))] = -1
        order = np.argsort(rows["shard"], kind="stable")
        groups = np.split(order, np.flatnonzero(np.diff(rows["shard"][order])) + 1) if len(order) else []
        jobs = [(str(self.shards[rows["shard"][g[0]]]), rows[g], max_bytes) for g in groups]
        out = np.zeros((len(rows), DIGEST_WIDTH), dtype=np.uint8)
        if len(rows) >= parallel_from and workers > 1:
            from concurrent.futures.process import BrokenProcessPool

            try:
                for group, part in zip(groups, in_order(shard_digests, jobs, workers), strict=True):
                    out[group] = part
                return out
            except (OSError, RuntimeError, AssertionError, BrokenProcessPool) as exc:  # e.g. in a daemonic worker
                log.info("reading the %d members in this process (%s: %s)", len(rows), type(exc).__name__, exc)
        for group, job in zip(groups, jobs, strict=True):
            out[group] = shard_digests(*job)
        return out


def shard_digests(path: str, rows: np.ndarray, max_bytes: int | None) -> np.ndarray:
    """`MemberFiles.digests` of one shard's rows (`MEMBER`, size -1 where there is no image member), in the order
    given: one process's share."""
    digests = np.zeros((len(rows), DIGEST_WIDTH), dtype=np.uint8)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return digests
    try:
        for i, (offset, size) in enumerate(zip(rows["offset"].tolist(), rows["size"].tolist(), strict=True)):
            if size < 0:
                continue
            try:
                check_file_size(size, max_bytes)
                data = os.pread(fd, size, offset)
            except (OSError, ValueError):
                continue
            if len(data) == size:
                digests[i, :16] = np.frombuffer(bytes.fromhex(content_hash(data)), dtype=np.uint8)
                digests[i, 16] = 1
    finally:
        os.close(fd)
    return digests


class ShardPaths(Sequence):
    """The `shard.tar:key` texts of tar samples (what the store's path column records) as each shard's path once and
    the keys column, not a text per row: reads as the TextColumn of the joined texts would (by row, in blocks as
    TextColumns, hashed the same), joining a block at a time with arrow's kernel."""

    __slots__ = ("prefixes", "shards", "keys", "_prefixes")

    def __init__(self, prefixes: Sequence[str], shards: np.ndarray, keys: TextColumn) -> None:
        if len(shards) != len(keys):
            raise ValueError("tar paths need a shard number for every key")
        self.prefixes, self.shards, self.keys = list(prefixes), shards, keys
        self._prefixes = pa.array(self.prefixes, pa.large_string())  # taken by shard number for each block

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, where: Any) -> Any:
        if isinstance(where, slice):
            return self.take(np.arange(len(self))[where])
        key = self.keys[where]  # IndexError for a row outside
        return self.prefixes[int(self.shards[operator.index(where)])] + key

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self), _BLOCK):
            yield from self.block(start, start + _BLOCK)

    def take(self, where: Any) -> ShardPaths:
        positions = np.asarray(where, dtype=np.int64).reshape(-1)
        return ShardPaths(self.prefixes, self.shards[positions], self.keys.take(positions))

    def _joined(self, start: int, stop: int) -> pa.Array:
        shards = pa.array(np.ascontiguousarray(self.shards[start:stop], dtype=np.int32))
        prefixes = self._prefixes.take(shards)
        return pc.binary_join_element_wise(prefixes, self.keys.block(start, stop).to_arrow(),
                                           pa.scalar("", pa.large_string()))

    def block(self, start: int, stop: int) -> TextColumn:
        return TextColumn.from_arrow(self._joined(start, min(stop, len(self))))

    def digest_into(self, digest: Any) -> None:
        """`TextColumn.digest_into` of the joined texts: their offsets (from the lengths, without joining), then
        their bytes a block at a time."""
        lengths = np.array([len(p.encode("utf-8", "surrogateescape")) for p in self.prefixes] or [0], dtype=np.int64)
        digest.update(np.zeros(1, dtype="<i8"))
        total = 0
        for start in range(0, len(self), _BLOCK):
            stop = min(start + _BLOCK, len(self))
            ends = np.cumsum(lengths[self.shards[start:stop]] + np.diff(self.keys.offsets[start:stop + 1])) + total
            digest.update(ends.astype("<i8"))
            total = int(ends[-1])
        for start in range(0, len(self), _BLOCK):
            digest.update(self.block(start, start + _BLOCK).data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and not isinstance(other, str) and len(self) == len(other) and \
            all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ShardPaths({len(self)} keys in {len(self.prefixes)} shards)"


_BLOCK = 1 << 16
