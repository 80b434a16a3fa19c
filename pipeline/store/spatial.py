"""Reading the activations a store keeps with `--keep-spatial` (dataset `spatial`, [N, *shape], chunked per row):
the input of `finetune`. Rows are read in blocks of sorted row numbers, so that a store larger than memory is
trained from without loading it."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import h5py
import numpy as np

from pipeline.errors import StoreError
from pipeline.store.read import check_complete, open_checked
from pipeline.store.segment import SPATIAL


class SpatialReader:
    """An open store's activations: `shape` per row, `read(rows)` as float32 in the order given."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: h5py.File | None = open_checked(self.path)
        attrs = check_complete(self.path, self._file)
        if SPATIAL not in self._file:
            self._file.close()
            raise StoreError(f"{self.path} holds no activations; extract it with --layer MODULE --keep-spatial "
                             "to fine-tune from it")
        self._ds = self._file[SPATIAL]
        if self._ds.dtype.kind != "f" or self._ds.ndim < 2:
            self._file.close()
            raise StoreError(f"{self.path}: its activations are {self._ds.dtype} of {self._ds.ndim} dimension(s), not "
                             "floating point rows; the store is damaged: extract it again")
        self.shape = tuple(int(n) for n in self._ds.shape[1:])
        self.layer = str(attrs.get("spatial_layer", ""))
        if len(self._ds) != int(attrs["committed_rows"]):
            self._file.close()
            raise StoreError(f"{self.path}: {len(self._ds)} activation rows for {attrs['committed_rows']} feature "
                             "rows; the store is damaged: extract it again")

    def read(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return np.zeros((0, *self.shape), np.float32)
        order = np.argsort(rows, kind="stable")
        unique, inverse = np.unique(rows[order], return_inverse=True)
        block = self._ds[unique].astype(np.float32, copy=False)
        finite = np.isfinite(block.reshape(len(block), -1)).all(axis=1)
        if not finite.all():
            raise StoreError(f"{self.path}: the activations of row {int(unique[np.argmin(finite)])} are not finite; "
                             "the store is damaged: extract it again (store verify lists every problem)")
        out = np.empty((len(rows), *self.shape), np.float32)
        out[order] = block[inverse]
        return out

    @property
    def nbytes(self) -> int:
        return int(len(self._ds) * np.prod(self.shape) * 4)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> SpatialReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
