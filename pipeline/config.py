"""Typed configuration for each command. No I/O here: the CLI and the flows build these and pass them on."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError

DEFAULT_BACKBONE = "efficientnet_lite0"
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb threshold (pipeline.datasets uses the same)
DEFAULT_MAX_FILE_BYTES = 1 << 30  # files and tar members larger than this are refused unread (pipeline.datasets)
SPLIT_MODES = ("auto", "stratified")  # auto: the source's own splits when it gives them; stratified: always ours
# An image plugin: a module to import, or a module and its registration hook (only register... functions are called).
PLUGIN_SPEC = re.compile(r"[A-Za-z_][\w.]*(:register\w*)?")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FEATURE_DTYPES = ("float32", "float16")  # feature storage types of a store
COMPRESSIONS = ("none", "lzf")  # HDF5 compression of the features
DEFAULT_KS: tuple[int, ...] = (1, 20)
# C grid for the logistic-regression probe: log-spaced, wide enough for unit-norm features (weak to almost no L2).
DEFAULT_CS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)
# Grid for heads regularised by a strength (ridge, MLP): log-spaced.
DEFAULT_ALPHAS: tuple[float, ...] = (0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
# DINOv2's kNN evaluation: cosine similarity, these k, temperature 0.07.
DINOV2_KS: tuple[int, ...] = (10, 20, 100, 200)
DINOV2_TEMPERATURE = 0.07


@dataclass(frozen=True)
class ExtractConfig:
    """What `extract` needs: the image source, the store to write, and how to run the backbone."""

    data: Path | str  # an image folder, a manifest, tar shards, or "torchvision:NAME" (see pipeline.sources)
    out: Path
    backbone: str = DEFAULT_BACKBONE
    batch_size: int | None = 64  # None: 64 on CPU, the largest that fits on a GPU
    workers: int | None = None  # None: chosen from the core count
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    test_fraction: float = 0.3  # used only when the folder has no split sub-folders
    seed: int = 0
    overwrite: bool = False
    progress: bool = True
    random_init: bool = False  # untrained weights, recorded in the store
    weights: Path | None = None  # a local checkpoint for the backbone's architecture
    layer: str | None = None  # pool this module's output instead of the pre-logits
    feature_dtype: str = "float32"  # float32 | float16 (half the size; cosine changes < 1e-4)
    compression: str = "none"  # none | lzf
    shard_rows: int | None = None  # None: one file; N: fixed-size shards of N rows plus an entry file
    check_content: bool = False  # hash every image to detect changes that keep size and mtime
    lock_timeout: float = 0.0  # seconds to wait for another writer of the same store (0: fail at once)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (auto: bf16/fp16 on CUDA, fp32 on CPU)
    compile: bool = False  # torch.compile the forward pass (slow first batch; measured 1.5x on CPU)
    optimize: bool = True  # CPU fp32: a frozen TorchScript trace when it reproduces eager (see Backbone.optimized)
    root: Path | None = None  # torchvision datasets: the folder holding (or to hold) their files
    download: bool = False  # torchvision datasets: fetch the files when they are missing (needs a network)
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # larger images are refused as decompression bombs (None: no limit)
    decode_timeout: float = 60.0  # seconds a batch may take to decode before its images are checked one by one
    image_plugins: tuple[str, ...] = ()  # Pillow plugins to import in decode processes ("module" or "module:func")
    split: str = "auto"  # auto: splits from the source when it gives them; stratified: by content, ignoring them
    follow_links: bool = False  # read symbolic links that lead out of the data root (a folder source)
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES  # larger files/tar members are refused unread (None: no limit)

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ConfigError(f"max_pixels must be >= 1 (or None for no limit), got {self.max_pixels}")
        if not math.isfinite(self.decode_timeout) or self.decode_timeout <= 0:
            raise ConfigError(f"decode_timeout must be a finite number of seconds > 0, got {self.decode_timeout}")
        if not math.isfinite(self.lock_timeout) or self.lock_timeout < 0:
            raise ConfigError(f"the lock wait (--wait) must be a finite number of seconds >= 0, got "
                              f"{self.lock_timeout}")
        if self.shard_rows is not None and self.shard_rows < 1:
            raise ConfigError(f"shard_rows must be >= 1, got {self.shard_rows}")
        bad = [p for p in self.image_plugins if not PLUGIN_SPEC.fullmatch(p)]
        if bad:
            raise ConfigError(f"--image-plugin {bad[0]!r} is not MODULE or MODULE:register_FUNCTION (only "
                              "registration hooks named register... are called), e.g. pillow_heif:register_heif_opener")
        if self.split not in SPLIT_MODES:
            raise ConfigError(f"split must be one of {', '.join(SPLIT_MODES)}, got {self.split!r}")
        if self.max_file_bytes is not None and self.max_file_bytes < 1:
            raise ConfigError(f"max_file_bytes must be >= 1 (or None for no limit), got {self.max_file_bytes}")


@dataclass(frozen=True)
class ProbeConfig:
    """A head on a store's features: the hyper-parameter is chosen on validation, the head refit on train+val, and
    tested once. `shots` switches to few-shot probes (that many training images per class, one run per seed)."""

    store: Path
    out: Path | None = None
    head: str = "logreg"  # see pipeline.heads.HEADS
    grid: tuple[float, ...] | None = None  # None: the head's default grid (C, or alpha for ridge/mlp)
    val_fraction: float = 0.2  # slice of train used for validation when the store has no `val` split
    seed: int = 0
    max_iter: int = 5000
    device: str = "auto"  # torch-logreg only
    shots: tuple[int, ...] = ()  # few-shot: images per class in the training set
    seeds: tuple[int, ...] = (0, 1, 2)  # few-shot: one draw per seed
    report: bool = True  # write the markdown and HTML report beside the JSON
    overwrite: bool = False  # replace output files this tool did not write

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.grid is not None and (not self.grid or any(not math.isfinite(v) or v <= 0 for v in self.grid)):
            raise ConfigError(f"the grid must be finite positive numbers, got {list(self.grid)}")
        if self.max_iter < 1:
            raise ConfigError(f"max_iter must be >= 1, got {self.max_iter}")
        if any(s < 1 for s in self.shots):
            raise ConfigError(f"shots must be positive integers, got {list(self.shots)}")
        if self.shots and not self.seeds:
            raise ConfigError("few-shot probes need at least one seed")


@dataclass(frozen=True)
class KnnConfig:
    """kNN classification and label-based retrieval on an exact FAISS inner-product index (cosine on unit-norm
    features). Queries are the test split searched against train+val; without a test split (or with `loo`), each
    row of `loo_split` is a query against the rest of that split (leave-one-out)."""

    store: Path
    out: Path | None = None
    ks: tuple[int, ...] = DEFAULT_KS
    temperature: float = 0.07
    loo: bool = False  # force leave-one-out even when there is a test split
    loo_split: str | None = None  # None: train (or the largest split)
    retrieval_ks: tuple[int, ...] = (1, 5, 10)
    report: bool = True
    overwrite: bool = False  # replace output files this tool did not write

    def __post_init__(self) -> None:
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError(f"k must be positive integers, got {list(self.ks)}")
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ConfigError(f"the temperature must be a finite positive number, got {self.temperature}")
