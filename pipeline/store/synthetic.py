"""Synthetic feature stores with learnable structure, written through the real store writer (for the scale and index
benchmarks and the tests that stream a store): each class a few unit-norm modes, each row a mode plus Gaussian noise,
L2-normalised, so that a linear probe and kNN learn something real but nothing is trivially separable (a linear
probe reaches about 67% top-1 at the defaults).

    python -m pipeline.store.synthetic --rows 100000 --dim 128 --out data/synthetic/s100k.h5
"""

from __future__ import annotations

import argparse
import binascii
import json
import time
from pathlib import Path

import numpy as np

BATCH = 65536


def class_modes(dim: int, classes: int, *, modes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(classes, modes, dim)).astype(np.float32)
    return m / np.linalg.norm(m, axis=2, keepdims=True)


def rows_of(start: int, stop: int, *, dim: int, classes: int, modes: int, noise: float,
            seed: int, copies: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, labels, hex hashes) of rows [start, stop): the same rows whatever the batching (in batches
    starting at multiples of `BATCH`). With `copies`, that share of the rows are copies of another row of the same
    batch, half of them exact (same features and content hash), half near (a little noise, cosine ~0.9999, their
    own hash): what the audit must find."""
    centres = class_modes(dim, classes, modes=modes, seed=seed)
    rng = np.random.default_rng([seed, start])
    labels = rng.integers(0, classes, size=stop - start)
    x = centres[labels, rng.integers(0, modes, size=stop - start)]
    x = x + rng.normal(scale=noise / np.sqrt(dim), size=x.shape).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    raw = rng.bytes(16 * (stop - start))
    hashes = np.frombuffer(binascii.hexlify(raw), dtype="S32").copy()
    if copies > 0:
        pick = np.random.default_rng([seed, start, 7]).random(stop - start) < copies
        _plant_copies(np.random.default_rng([seed, start, 8]), pick, x, labels, hashes)
    return x.astype(np.float32), labels, hashes


def _plant_copies(rng: np.random.Generator, pick: np.ndarray, x: np.ndarray, labels: np.ndarray,
                  hashes: np.ndarray) -> None:
    """Rows `pick` become copies (in place) of rows that are not copies themselves."""
    originals = np.flatnonzero(~pick)
    rows = np.flatnonzero(pick)
    if not len(rows) or not len(originals):
        return
    source = rng.choice(originals, size=len(rows))
    exact = rng.random(len(rows)) < 0.5
    labels[rows] = labels[source]
    near = x[source] + (~exact)[:, None] * rng.normal(scale=0.01 / np.sqrt(x.shape[1]), size=(len(rows), x.shape[1]))
    x[rows] = near / np.linalg.norm(near, axis=1, keepdims=True)
    x[rows[exact]] = x[source[exact]]
    hashes[rows[exact]] = hashes[source[exact]]


def write_synthetic(path: Path, rows: int, *, dim: int = 128, classes: int = 100, modes: int = 3,
                    noise: float = 2.0, dtype: str = "float16", shard_rows: int | None = None, seed: int = 0,
                    test_fraction: float = 0.2, copies: float = 0.0) -> dict:
    """Write the store (ids r0000000..., splits train/test by a seeded draw; `copies`: see `rows_of`) and return
    what was written."""
    from pipeline.store.reuse import Listing
    from pipeline.store.writer import StoreWriter

    start = time.perf_counter()
    ids = [f"r{i:08d}" for i in range(rows)]
    labels = np.concatenate([rows_of(s, min(rows, s + BATCH), dim=dim, classes=classes, modes=modes, noise=noise,
                                     seed=seed, copies=copies)[1]
                             for s in range(0, rows, BATCH)]) if rows else np.zeros(0, int)
    test = np.random.default_rng([seed, 1]).random(rows) < test_fraction
    splits = np.where(test, "test", "train").tolist()
    stamps = np.zeros((rows, 2), dtype=np.int64)
    listing = Listing(ids=ids, labels=labels.astype(np.int64), splits=splits, stamps=stamps)
    attrs = {"backbone": "synthetic", "weights": f"seed{seed}", "preprocessing": "{}",
             "class_names": json.dumps([f"c{c:03d}" for c in range(classes)]), "cache_key": f"synthetic-{seed}-{dim}",
             "data_fingerprint": f"synthetic-{rows}-{seed}", "feature_dim": dim, "normalized": True,
             "source": "synthetic"}
    with StoreWriter(path, listing=listing, dim=dim, attrs=attrs, feature_dtype=dtype, shard_rows=shard_rows) as w:
        todo = w.prepare(reuse=False)
        for s in range(0, rows, BATCH):
            x, _, hashes = rows_of(s, min(rows, s + BATCH), dim=dim, classes=classes, modes=modes, noise=noise,
                                   seed=seed, copies=copies)
            w.write(todo[s:s + len(x)], x, hashes)
        w.finish()
    return {"rows": rows, "dim": dim, "classes": classes, "dtype": dtype, "shard_rows": shard_rows, "copies": copies,
            "seconds": round(time.perf_counter() - start, 2), "bytes": _size(path)}


def _size(path: Path) -> int:
    shards = path.parent / f"{path.name}.shards"
    return path.stat().st_size + (sum(p.stat().st_size for p in shards.iterdir()) if shards.is_dir() else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument("--shard-rows", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--copies", type=float, default=0.0, help="share of rows planted as exact or near copies")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(json.dumps(write_synthetic(args.out, args.rows, dim=args.dim, classes=args.classes, dtype=args.dtype,
                                     shard_rows=args.shard_rows, seed=args.seed, copies=args.copies)))


if __name__ == "__main__":
    main()
