"""A listing of millions of rows as a few compact arrays, not a Python object per row: text columns (one UTF-8
buffer and an offsets array), label codes, split codes and an [n, 2] stamp array. `SampleTable` is a sequence of
`Sample`s built on access, so code that walks a source's samples one by one works unchanged, while planning (the
listing, the fingerprint, split counts, stamps) reads the arrays whole.

A manifest's table keeps its ids and its path texts (one column when the ids are the paths), the folder they are
relative to (`FileColumn`), and 8 + 1 + 16 bytes a row of codes and stamps, where a tuple of `Sample`s took about
600 bytes a row."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.engine.decode import SPLITS

SPLIT_CODES = (*SPLITS, "")  # the code of a split is its index here; the last one: not decided
UNDECIDED = len(SPLITS)
_CHUNK = 1 << 16  # rows decoded at a time when a column is walked


def _positions(where: Any, n: int) -> np.ndarray:
    """Row positions of a slice or of an array of positions (negative ones count from the end)."""
    if isinstance(where, slice):
        return np.arange(n, dtype=np.int64)[where]
    positions = np.asarray(where, dtype=np.int64).reshape(-1)
    return np.where(positions < 0, positions + n, positions)


class TextColumn(Sequence):
    """Strings as one UTF-8 buffer (`data`: bytes, bytearray or a memoryview) and `offsets` ([n + 1] int64): row i
    is data[offsets[i]:offsets[i + 1]]. Text that is not UTF-8 (a file name kept by Python as surrogates)
    round-trips through surrogateescape."""

    __slots__ = ("data", "offsets")

    def __init__(self, data: bytes, offsets: np.ndarray) -> None:
        self.data, self.offsets = data, offsets

    @classmethod
    def from_strings(cls, strings: Iterable[str]) -> TextColumn:
        return cls.from_bytes([s.encode("utf-8", "surrogateescape") for s in strings])

    @classmethod
    def from_arrow(cls, array: pa.Array | pa.ChunkedArray) -> TextColumn:
        """A string column without nulls, copied once into one buffer."""
        offsets, data = _arrow_bounds(array)
        start, end = int(offsets[0]), int(offsets[-1])
        return cls(data.slice(start, end - start).to_pybytes() if data is not None else b"", offsets - start)

    def to_arrow(self) -> pa.Array:
        """The column as an arrow large_string array over the same memory."""
        return pa.Array.from_buffers(pa.large_string(), len(self), [None, pa.py_buffer(self.offsets),
                                                                     pa.py_buffer(self.data)])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, where: Any) -> Any:
        if isinstance(where, slice):
            return self.take(_positions(where, len(self)))
        i = operator.index(where)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"row {where} of a column of {len(self)}")
        return str(self.data[self.offsets[i]:self.offsets[i + 1]], "utf-8", "surrogateescape")

    def __iter__(self) -> Iterator[str]:
        data = self.data
        for start in range(0, len(self), _CHUNK):
            bounds = self.offsets[start:start + _CHUNK + 1].tolist()
            yield from (str(data[a:b], "utf-8", "surrogateescape") for a, b in zip(bounds, bounds[1:], strict=False))

    def take(self, where: Any) -> TextColumn:
        """The rows at these positions, copied by arrow's kernel (as bytes: text kept as surrogates survives)."""
        positions = _positions(where, len(self))
        if len(positions) and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"rows outside a column of {len(self)}")
        raw = pa.Array.from_buffers(pa.large_binary(), len(self), [None, pa.py_buffer(self.offsets),
                                                                    pa.py_buffer(self.data)])
        _, offsets, data = raw.take(pa.array(positions, pa.int64())).buffers()
        return TextColumn(data.to_pybytes() if data is not None else b"",
                          np.frombuffer(offsets, dtype=np.int64, count=len(positions) + 1).copy())

    @classmethod
    def from_bytes(cls, parts: list[bytes]) -> TextColumn:
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, parts), dtype=np.int64, count=len(parts)), out=offsets[1:])
        return cls(b"".join(parts), offsets)

    def block(self, start: int, stop: int) -> TextColumn:
        """Rows start..stop as a column of their own (one copy of their bytes)."""
        stop = min(stop, len(self))
        first, last = int(self.offsets[start]), int(self.offsets[stop])
        return TextColumn(self.data[first:last], self.offsets[start:stop + 1] - first)

    def distinct(self) -> bool:
        """Whether no text occurs twice: the rows' 64-bit hashes sorted (8 bytes a row, where a hash table of the
        texts took 150 at 10M rows), then, only when two hashes are equal (a duplicate, or rarely a collision),
        the texts counted exactly."""
        hashes = np.fromiter(map(hash, self), dtype=np.int64, count=len(self))
        hashes.sort()
        if not np.any(hashes[1:] == hashes[:-1]):
            return True
        return len(set(self)) == len(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TextColumn):
            return bool(np.array_equal(self.offsets, other.offsets)) and self.data == other.data
        return isinstance(other, Sequence) and not isinstance(other, str) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def digest_into(self, digest: Any) -> None:
        """Hash the column: its offsets (little-endian int64, from 0), then its bytes."""
        digest.update(np.ascontiguousarray(self.offsets, dtype="<i8"))  # no copy: the column's own offsets
        digest.update(self.data)

    def __repr__(self) -> str:
        return f"TextColumn({len(self)} rows, {len(self.data)} bytes)"


def file_cells(base: str, texts: pa.Array) -> pa.Array:
    """`str(Path(base) / text)` of posix texts: the file each names (absolute ones as they are, "." the folder)."""
    prefix = pa.scalar(base if base.endswith("/") else base + "/", pa.large_string())
    texts = texts.cast(pa.large_string())
    joined = pc.binary_join_element_wise(prefix, texts, pa.scalar("", pa.large_string()))
    files = pc.if_else(pc.starts_with(texts, "/"), texts, joined)
    return pc.if_else(pc.equal(texts, "."), pa.scalar(base, pa.large_string()), files)


class FileColumn(Sequence):
    """The files of a manifest as its folder plus its posix path texts (`file_cells` of each, made when read): no
    absolute path held per row, and without an id column the texts are the ids column itself. Reads as the
    TextColumn of the absolute paths would: by row, in blocks (as TextColumns), hashed the same."""

    def __init__(self, base: str, texts: TextColumn) -> None:
        self.base, self.texts = base, texts
        self.prefix = base if base.endswith("/") else base + "/"

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, where: Any) -> Any:
        if isinstance(where, slice):
            return self.take(_positions(where, len(self)))
        text = self.texts[where]
        return text if text.startswith("/") else self.base if text == "." else self.prefix + text

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self), _CHUNK):
            yield from self.block(start, start + _CHUNK)

    def take(self, where: Any) -> FileColumn:
        return FileColumn(self.base, self.texts.take(where))

    def block(self, start: int, stop: int) -> TextColumn:
        return TextColumn.from_arrow(file_cells(self.base, self.texts.block(start, stop).to_arrow()))

    def digest_into(self, digest: Any) -> None:
        """`TextColumn.digest_into` of the absolute paths, a block at a time (`digest_files`)."""
        digest_files(digest, self.base, lambda: (self.texts.block(start, start + _DIGEST_ROWS).to_arrow()
                                                 for start in range(0, len(self), _DIGEST_ROWS)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and not isinstance(other, str) and len(self) == len(other) and \
            all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"FileColumn({len(self)} rows under {self.base})"


_DIGEST_ROWS = 1 << 18


def digest_files(digest: Any, base: str, blocks: Callable[[], Iterable[pa.Array]]) -> None:
    """Hash the files of posix path texts under `base` (`file_cells`) as `TextColumn.digest_into` hashes a column of
    them, given the texts a block at a time by `blocks()` (called twice: for the offsets, found from the texts'
    lengths without joining, then for the bytes)."""
    digest.update(np.zeros(1, dtype="<i8"))
    prefix = base if base.endswith("/") else base + "/"
    base_bytes, prefix_bytes = (len(t.encode("utf-8", "surrogateescape")) for t in (base, prefix))
    total = 0
    for texts in blocks():
        lengths = pc.binary_length(texts).to_numpy(zero_copy_only=False).astype(np.int64)
        absolute = pc.starts_with(texts, "/").to_numpy(zero_copy_only=False)
        dot = pc.equal(texts, ".").to_numpy(zero_copy_only=False)
        ends = np.cumsum(np.where(absolute, lengths, np.where(dot, base_bytes, prefix_bytes + lengths))) + total
        digest.update(ends.astype("<i8"))
        total = int(ends[-1]) if len(ends) else total
    for texts in blocks():
        digest.update(TextColumn.from_arrow(file_cells(base, texts)).data)


def _arrow_bounds(array: pa.Array) -> tuple[np.ndarray, Any]:
    """The offsets ([n + 1] int64, into the data buffer) and data buffer of a string array without nulls."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    array = array.cast(pa.large_string())
    if array.null_count:
        raise ValueError("a text column cannot hold nulls")
    _, offsets, data = array.buffers()
    return np.frombuffer(offsets, dtype=np.int64, count=len(array) + 1, offset=array.offset * 8), data


def release_freed_memory() -> None:
    """Hand back to the system what a large listing's last phase freed: arrow's pool, and the C heap (glibc's
    `malloc_trim`, where there is one), so that the next phase's arrays do not sit beside pages the last one left."""
    import ctypes

    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


class TextBuilder:
    """A `TextColumn` built from arrow string arrays a block at a time: their bytes appended to one growing
    buffer (grown in place, not copied whole at the end) and their lengths."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lengths: list[np.ndarray] = []
        self.rows = 0

    def __len__(self) -> int:
        return self.rows

    def append(self, array: pa.Array) -> None:
        offsets, data = _arrow_bounds(array)
        start, end = int(offsets[0]), int(offsets[-1])
        if end > start:
            self.data += memoryview(data)[start:end]
        self.lengths.append(np.diff(offsets).astype(np.int32))  # one block's lengths: each far below 2 GiB
        self.rows += len(offsets) - 1

    def finish(self) -> TextColumn:
        """The column; its offsets summed block by block into one array (no joined copy of the lengths)."""
        offsets = np.zeros(self.rows + 1, dtype=np.int64)
        row = 0
        while self.lengths:
            lengths = self.lengths.pop(0)
            np.cumsum(lengths, dtype=np.int64, out=offsets[row + 1:row + 1 + len(lengths)])
            offsets[row + 1:row + 1 + len(lengths)] += offsets[row]
            row += len(lengths)
        data, self.data, self.rows = self.data, bytearray(), 0
        return TextColumn(data, offsets)


class SplitColumn(Sequence):
    """Split names from their codes (`SPLIT_CODES`): three strings for any number of rows."""

    __slots__ = ("codes",)

    def __init__(self, codes: np.ndarray) -> None:
        self.codes = codes

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, where: Any) -> Any:
        if isinstance(where, slice):
            return SplitColumn(self.codes[where])
        return SPLIT_CODES[self.codes[where]]

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self), _CHUNK):
            yield from map(SPLIT_CODES.__getitem__, self.codes[start:start + _CHUNK].tolist())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and not isinstance(other, str) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]


class SampleTable(Sequence):
    """Samples of a listed source as columns: `ids` (TextColumn) and `paths` (TextColumn, a FileColumn whose texts
    may be the ids themselves, or tar `ShardPaths`), `labels` ([n] int64, -1 unlabelled),
    `codes` ([n] int8 split codes), `stamps` ([n, 2] int64) and, where the reader takes other locators than the
    paths (tar members), `locators` (a column with `take`; None: the paths). Indexing and iteration build `Sample`s
    (with the path as text, the stamp as a pair); `take` selects rows as another table."""

    __slots__ = ("ids", "paths", "labels", "codes", "stamps", "locators")

    def __init__(self, ids: TextColumn, paths: TextColumn | FileColumn, labels: np.ndarray, codes: np.ndarray,
                 stamps: np.ndarray, locators: Any = None) -> None:
        n = len(ids)
        if not (len(paths) == len(labels) == len(codes) == len(stamps) == n) or (locators is not None
                                                                                  and len(locators) != n):
            raise ValueError("a sample table needs ids, paths, labels, split codes, stamps (and locators) of the same "
                             "length")
        self.ids, self.paths, self.labels, self.codes, self.stamps = ids, paths, labels, codes, stamps
        self.locators = locators

    @property
    def splits(self) -> SplitColumn:
        return SplitColumn(self.codes)

    def __len__(self) -> int:
        return len(self.labels)

    def _sample(self, i: int) -> Any:
        from pipeline.sources.base import Sample

        size, mtime = self.stamps[i].tolist()
        return Sample(self.ids[i], self.paths[i], int(self.labels[i]), SPLIT_CODES[self.codes[i]],
                      None if self.locators is None else self.locators[i], (size, mtime))

    def __getitem__(self, where: Any) -> Any:
        if isinstance(where, slice):
            return self.take(where)
        return self._sample(operator.index(where))

    def __iter__(self) -> Iterator[Any]:
        from pipeline.sources.base import Sample

        for start in range(0, len(self), _CHUNK):
            stop = start + _CHUNK
            rows = zip(self.ids.block(start, stop), self.paths.block(start, stop), self.labels[start:stop].tolist(),
                       map(SPLIT_CODES.__getitem__, self.codes[start:stop].tolist()),
                       map(tuple, self.stamps[start:stop].tolist()),
                       itertools.repeat(None) if self.locators is None else self.locators.take(range(start, min(
                           stop, len(self)))), strict=False)
            yield from (Sample(i, p, lab, s, at, st) for i, p, lab, s, st, at in rows)

    def take(self, where: Any) -> SampleTable:
        positions = _positions(where, len(self))
        ids = self.ids.take(positions)
        shared = isinstance(self.paths, FileColumn) and self.paths.texts is self.ids  # the ids are the path texts
        return SampleTable(ids, FileColumn(self.paths.base, ids) if shared else self.paths.take(positions),
                           self.labels[positions], self.codes[positions], self.stamps[positions],
                           None if self.locators is None else self.locators.take(positions))

    def split_counts(self) -> dict[str, int]:
        counts = np.bincount(self.codes, minlength=len(SPLIT_CODES))
        return {name: int(counts[i]) for i, name in enumerate(SPLITS) if counts[i]}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and not isinstance(other, str) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SampleTable({len(self)} rows)"
