"""Writers for test sources in their real on-disk formats: manifests, WebDataset tar shards, and the files that
torchvision's MNIST, FashionMNIST, CIFAR-10 and CIFAR-100 classes read (idx-ubyte and pickled batches)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def digit_images(n: int, *, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """n real digits (8x8 scaled to size x size, uint8) and their labels."""
    digits = load_digits()
    images = (digits.images[:n] * (255.0 / 16.0)).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])
    return big, digits.target[:n].astype(np.int64)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_manifest(path: Path, rows: list[dict], *, fmt: str | None = None) -> Path:
    """rows: dicts with path and optional label, split, id; fmt from the suffix (csv, parquet, jsonl)."""
    fmt = fmt or path.suffix.lstrip(".")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        columns = list(dict.fromkeys(k for row in rows for k in row))
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = list(dict.fromkeys(k for row in rows for k in row))
        pq.write_table(pa.table({c: [row.get(c) for row in rows] for c in columns}), path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A plain tar with the given (name, bytes) members, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return path


def webdataset_members(keys: list[str], images: list[bytes], labels: list[int | None], *,
                       json_meta: list[dict] | None = None) -> list[tuple[str, bytes]]:
    members = []
    for k, (key, data, label) in enumerate(zip(keys, images, labels, strict=True)):
        members.append((f"{key}.png", data))
        if label is not None:
            members.append((f"{key}.cls", str(label).encode()))
        if json_meta is not None:
            members.append((f"{key}.json", json.dumps(json_meta[k]).encode()))
    return members


def write_mnist(root: Path, folder: str = "MNIST", *, n_train: int = 40, n_test: int = 20) -> Path:
    """MNIST's raw idx-ubyte files (what torchvision.datasets.MNIST reads) under root/<folder>/raw."""
    images, labels = digit_images(n_train + n_test)
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, sl in (("train", slice(0, n_train)), ("t10k", slice(n_train, n_train + n_test))):
        x, y = images[sl], labels[sl]
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, len(x), 28, 28) + x.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, len(y)) +
                                                          y.astype(np.uint8).tobytes())
    return root


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar(root: Path, cls: type, *, per_file: int = 6) -> type:
    """CIFAR-10 or CIFAR-100 pickled batches (torchvision's on-disk format) under root, from real digit images
    coloured to 32x32x3; returns a subclass of `cls` whose checksums are those of these files (the real ones check
    the md5 of the published archives, which synthetic files cannot match)."""
    images, labels = digit_images(per_file * (len(cls.train_list) + len(cls.test_list)), size=32)
    rgb = np.stack([images, images[:, ::-1], 255 - images], axis=1).reshape(len(images), -1)  # CHW rows of 3072
    folder = root / cls.base_folder
    folder.mkdir(parents=True, exist_ok=True)
    label_key = "labels" if cls.meta["key"] == "label_names" else "fine_labels"
    names = [f"class_{i}" for i in range(10 if label_key == "labels" else 100)]
    sums = {}
    for k, (name, _) in enumerate(cls.train_list + cls.test_list):
        sl = slice(k * per_file, (k + 1) * per_file)
        entry = {"data": rgb[sl], label_key: labels[sl].tolist()}
        if label_key == "fine_labels":
            entry["coarse_labels"] = [0] * per_file
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh)
        sums[name] = _md5(folder / name)
    with open(folder / cls.meta["filename"], "wb") as fh:
        pickle.dump({cls.meta["key"]: names}, fh)
    attrs = {
        "train_list": [[n, sums[n]] for n, _ in cls.train_list],
        "test_list": [[n, sums[n]] for n, _ in cls.test_list],
        "meta": {**cls.meta, "md5": _md5(folder / cls.meta["filename"])},
    }
    return type(f"Local{cls.__name__}", (cls,), attrs)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG whose header declares width x height but whose data is tiny: the shape of a decompression bomb
    (a real one carries the zeros compressed, ~1000:1), refused from the header before any decoding."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) +
                     chunk(b"IEND", b""))
    return path
