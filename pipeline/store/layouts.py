"""Where a store's rows go while it is written: one file, or fixed-size shards behind a virtual dataset.

Both are written next to the final name (`NAME.h5.partial`) and moved into place by the writer once complete. A layout
is one class with the same five steps (`begin`, `append`, `finish`, `close`, `collect_garbage`), so a new layout is
one more class and one entry in `LAYOUTS`.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import StoreError
from pipeline.store.reuse import Listing, ReusePlanner
from pipeline.store.schema import PATHS, SCHEMA_VERSION, STR_DTYPE, partial_path, shards_dir
from pipeline.store.segment import COLUMNS, SPATIAL, Segment, read_index

log = logging.getLogger(__name__)
Index = tuple[dict[str, Any], list[str], np.ndarray, np.ndarray]  # what `read_index` gives for a segment file


class Layout:
    """The steps every layout has; `target` is the segment being appended to."""

    def __init__(self, path: Path, listing: Listing, *, dim: int, dtype: str, compression: str,
                 attrs: dict[str, Any], shard_rows: int | None = None,
                 spatial: tuple[tuple[int, ...], str] | None = None) -> None:
        self.path, self.listing, self.dim, self.dtype, self.compression = path, listing, dim, dtype, compression
        self.attrs, self.shard_rows, self.spatial = attrs, shard_rows, spatial
        self.target: Segment | None = None
        self.order: list[np.ndarray] = []  # the listing positions of the rows written, in store order

    def begin(self, planner: ReusePlanner, partial: Path | None, shards: list[Path],
              indexes: dict[Path, Index]) -> list[Path]:
        """Prepare the files to write; take whole what can be taken whole; return the sources whose valid rows are
        still to be copied, in order."""
        raise NotImplementedError

    def append(self, features: np.ndarray, positions: np.ndarray, hashes: np.ndarray,
               spatial: np.ndarray | None = None) -> None:
        raise NotImplementedError

    def columns(self, positions: np.ndarray, hashes: np.ndarray, spatial: np.ndarray | None) -> dict[str, Any]:
        columns = self.listing.columns(positions, hashes)
        if self.spatial is not None:
            columns[SPATIAL] = spatial
        return columns

    def finish(self, final_attrs: Callable[[h5py.File], None]) -> None:
        """Write what makes the partial complete (`final_attrs` adds failures and attributes to the entry)."""
        raise NotImplementedError

    def kept_files(self) -> set[str]:
        """The shard files the finished store refers to (the others are deleted after it is in place)."""
        return set()

    def close(self, *, error: bool) -> None:
        """Close the segment being written; after an error, cut it back to its committed rows first."""
        if self.target is not None:
            target, self.target = self.target, None
            if error:
                target.close_after_error()
            else:
                target.close(complete=False)

    def write_paths(self, f: h5py.File, positions: np.ndarray) -> None:
        """The path column (`PATHS`) of the finished store: where the image of each row (listing `positions`, in
        store order) lives, from the current listing, so that search and reports never list the source again."""
        paths = self.listing.paths
        if paths is None:
            return
        if PATHS in f:
            del f[PATHS]
        ds = f.create_dataset(PATHS, shape=(len(positions),), dtype=STR_DTYPE,
                              chunks=(min(max(len(positions), 1), 65536),))
        for start in range(0, len(positions), 65536):
            block = positions[start:start + 65536]
            ds[start:start + len(block)] = [paths[int(p)] for p in block]

    def collect_garbage(self) -> None:
        folder = shards_dir(self.path)
        if not folder.is_dir():
            return
        keep = self.kept_files()
        for path in folder.glob("*.h5"):
            if path.name not in keep:
                path.unlink(missing_ok=True)
        if not any(folder.iterdir()):
            folder.rmdir()


class SingleFile(Layout):
    """Everything in the entry file."""

    def begin(self, planner: ReusePlanner, partial: Path | None, shards: list[Path],
              indexes: dict[Path, Index]) -> list[Path]:
        """Continue the interrupted partial in place (dropping rows that are no longer valid), or start a new one;
        rows of shard files (a store that was sharded before) are copied."""
        path = partial_path(self.path)
        if partial is None:
            self.target = Segment.create(path, dim=self.dim, dtype=self.dtype, compression=self.compression,
                                         attrs=self.attrs, spatial=self.spatial)
            return shards
        _, ids, stamps, hashes = read_index(path)
        positions, usable, _ = planner.valid(ids, stamps, hashes)
        self.target = segment = Segment.reopen(path)
        if not usable.all():
            log.info("%s: dropping %d row(s) of the interrupted run whose images changed or left", path.name,
                     int((~usable).sum()))
            segment.compact(usable)
        kept = positions[usable]
        self.order.append(kept)
        if len(kept):
            self._follow_listing(segment.file, kept)
        planner.done[kept] = True
        planner.resumed += len(kept)
        log.info("resuming %s: %d row(s) already committed", path.name, len(kept))
        return shards

    def _follow_listing(self, f: h5py.File, kept: np.ndarray) -> None:
        """Labels, splits and stamps of resumed rows follow the current listing, and so do the listing's attrs."""
        f["labels"][:] = self.listing.labels[kept]
        f["splits"][:] = [self.listing.splits[p] for p in kept]
        f["files/size"][:] = self.listing.stamps[kept, 0]
        f["files/mtime_ns"][:] = self.listing.stamps[kept, 1]
        for key in ("class_names", "data_fingerprint", "num_images", "data_root", "split_source"):
            if key in self.attrs:
                f.attrs[key] = self.attrs[key]
        f.flush()

    def append(self, features: np.ndarray, positions: np.ndarray, hashes: np.ndarray,
               spatial: np.ndarray | None = None) -> None:
        self.target.append(features, self.columns(positions, hashes, spatial))
        self.order.append(np.asarray(positions, dtype=np.int64))

    def finish(self, final_attrs: Callable[[h5py.File], None]) -> None:
        target, self.target = self.target, None
        order = np.concatenate(self.order) if self.order else np.zeros(0, dtype=np.int64)
        if len(order) != target.rows:
            raise StoreError(f"{target.path}: {target.rows} rows written, {len(order)} accounted for")
        self.write_paths(target.file, order)
        target.file.attrs["committed_rows"] = target.rows
        final_attrs(target.file)
        target.close(complete=True)


class Sharded(Layout):
    """Features in fixed-size shard files in `NAME.h5.shards/`; the entry holds every other dataset and `features`
    as a virtual dataset over the shards (paths relative to the entry, so the store moves as a whole)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kept_shards: list[dict[str, Any]] = []
        self.new_shards: list[dict[str, Any]] = []
        self.run = secrets.token_hex(4)

    def begin(self, planner: ReusePlanner, partial: Path | None, shards: list[Path],
              indexes: dict[Path, Index]) -> list[Path]:
        """Keep every complete shard whose rows are all still valid as it is; copy the valid rows of the others
        (complete ones first) and of a single-file partial."""
        shards = sorted(shards, key=lambda p: (not indexes[p][0].get("complete", False), p.name))
        sources = []
        for shard in shards:
            attrs, ids, stamps, hashes = indexes[shard]
            positions, _, whole = planner.valid(ids, stamps, hashes)
            if whole and attrs.get("complete", False) and len(ids):
                planner.done[positions] = True
                self.kept_shards.append({"file": shard.name, "rows": len(ids)})
                planner.count(shard, len(ids))
            else:
                sources.append(shard)
        return sources + ([partial] if partial is not None else [])

    def _next_shard(self) -> Segment:
        name = f"{self.run}-{len(self.new_shards):06d}.h5"
        folder = shards_dir(self.path)
        folder.mkdir(parents=True, exist_ok=True)
        self.new_shards.append({"file": name, "rows": 0})
        attrs = {k: v for k, v in self.attrs.items() if k != "layout"}
        return Segment.create(folder / name, dim=self.dim, dtype=self.dtype, compression=self.compression,
                              attrs={**attrs, "layout": "shard"}, max_rows=self.shard_rows, spatial=self.spatial)

    def append(self, features: np.ndarray, positions: np.ndarray, hashes: np.ndarray,
               spatial: np.ndarray | None = None) -> None:
        start = 0
        while start < len(features):
            if self.target is None or self.target.rows >= self.shard_rows:
                if self.target is not None:
                    self.target.close(complete=True)
                self.target = self._next_shard()
            take = min(len(features) - start, self.shard_rows - self.target.rows)
            part = slice(start, start + take)
            self.target.append(features[part], self.columns(positions[part], hashes[part],
                                                            None if spatial is None else spatial[part]))
            self.new_shards[-1]["rows"] = self.target.rows
            start += take

    def kept_files(self) -> set[str]:
        return {s["file"] for s in self.kept_shards + self.new_shards if s["rows"]}

    def finish(self, final_attrs: Callable[[h5py.File], None]) -> None:
        if self.target is not None:
            self.target.close(complete=True)
            self.target = None
        shards = self.kept_shards + [s for s in self.new_shards if s["rows"]]
        n = sum(s["rows"] for s in shards)
        with h5py.File(partial_path(self.path), "w") as f:
            f.create_virtual_dataset("features", self._virtual(shards, n, "features", (self.dim,), self.dtype),
                                     fillvalue=np.nan)
            if self.spatial is not None:
                f.create_virtual_dataset(SPATIAL, self._virtual(shards, n, SPATIAL, *self.spatial), fillvalue=np.nan)
            self._entry_columns(f, shards, n)
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["committed_rows"] = n
            f.attrs["shards"] = json.dumps(shards)
            final_attrs(f)

    def _virtual(self, shards: list[dict[str, Any]], n: int, name: str, shape: tuple[int, ...],
                 dtype: str) -> h5py.VirtualLayout:
        folder = shards_dir(self.path)
        layout = h5py.VirtualLayout(shape=(n, *shape), dtype=dtype)
        start = 0
        for shard in shards:  # relative to the entry's folder, so the store can be moved or copied as a whole
            source = h5py.VirtualSource(f"{folder.name}/{shard['file']}", name, shape=(shard["rows"], *shape))
            layout[start:start + shard["rows"]] = source
            start += shard["rows"]
        return layout

    def _entry_columns(self, f: h5py.File, shards: list[dict[str, Any]], n: int) -> None:
        """Every row dataset inline in the entry, in shard order, from the shards' ids and the current listing."""
        columns = {name: f.create_dataset(name, shape=(n,), dtype=dtype, chunks=(min(max(n, 1), 65536),))
                   for name, dtype in COLUMNS}
        index = {sample_id: i for i, sample_id in enumerate(self.listing.ids)}
        start, order = 0, []
        for shard in shards:
            _, ids, _, hashes = read_index(shards_dir(self.path) / shard["file"])
            ids, hashes = ids[: shard["rows"]], hashes[: shard["rows"]]
            positions = np.fromiter((index[i] for i in ids), dtype=np.int64, count=len(ids))
            for name, values in self.listing.columns(positions, hashes).items():
                columns[name][start:start + len(ids)] = values
            order.append(positions)
            start += len(ids)
        self.write_paths(f, np.concatenate(order) if order else np.zeros(0, dtype=np.int64))


LAYOUTS = {"single": SingleFile, "sharded": Sharded}
