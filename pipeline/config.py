"""Defaults and typed configuration of the evaluation commands (the extraction's spec is `pipeline.plan`). No I/O here:
the CLI and the flows build these and pass them on."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError

DEFAULT_BACKBONE = "efficientnet_lite0"
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb threshold (pipeline.engine.decode uses the same)
DEFAULT_MAX_FILE_BYTES = 1 << 30  # files and tar members larger than this are refused unread (pipeline.engine.decode)
SPLIT_MODES = ("auto", "stratified")  # auto: the source's own splits when it gives them; stratified: always ours
# An image plugin: a module to import, or a module and its registration hook (only register... functions are called).
PLUGIN_SPEC = re.compile(r"[A-Za-z_][\w.]*(:register\w*)?")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FEATURE_DTYPES = ("float32", "float16")  # feature storage types of a store
EXPORT_FORMATS = ("clip-retrieval", "parquet", "ann-benchmarks")  # `export --format` (pipeline.interchange.export)
DEFAULT_PART_ROWS = 100_000  # rows per exported file
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")  # resize interpolations a preprocessing override names
COMPRESSIONS = ("none", "lzf")  # HDF5 compression of the features
DEFAULT_KS: tuple[int, ...] = (1, 20)
# C grid for the logistic-regression probe: log-spaced, wide enough for unit-norm features (weak to almost no L2).
DEFAULT_CS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)
# Grid for heads regularised by a strength (ridge, MLP): log-spaced.
DEFAULT_ALPHAS: tuple[float, ...] = (0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
# DINOv2's kNN evaluation: cosine similarity, these k, temperature 0.07.
DINOV2_KS: tuple[int, ...] = (10, 20, 100, 200)
DINOV2_TEMPERATURE = 0.07
DEFAULT_RESAMPLES = 1000  # bootstrap resamples of the test images behind each reported interval (0: none)
MAX_RESAMPLES = 100_000


def check_resamples(resamples: int) -> None:
    if not 0 <= resamples <= MAX_RESAMPLES:
        raise ConfigError(f"resamples must be 0 (no intervals) to {MAX_RESAMPLES}, got {resamples}")


@dataclass(frozen=True)
class ProbeConfig:
    """A head on a store's features: the hyper-parameter is chosen on validation, the head refit on train+val, and
    tested once. `shots` switches to few-shot probes (that many training images per class, one run per seed)."""

    store: Path
    out: Path | None = None
    head: str = "logreg"  # see pipeline.evaluation.heads.HEADS
    grid: tuple[float, ...] | None = None  # None: the head's default grid (C, or alpha for ridge/mlp)
    val_fraction: float = 0.2  # slice of train used for validation when the store has no `val` split
    seed: int = 0
    max_iter: int = 5000
    device: str = "auto"  # torch-logreg only
    shots: tuple[int, ...] = ()  # few-shot: images per class in the training set
    seeds: tuple[int, ...] = (0, 1, 2)  # few-shot: one draw per seed
    report: bool = True  # write the markdown and HTML report beside the JSON
    overwrite: bool = False  # replace output files this tool did not write
    resamples: int = DEFAULT_RESAMPLES  # bootstrap resamples for the 95% intervals (0: no intervals)
    val_seeds: tuple[int, ...] = ()  # also choose on the validation slice drawn with each of these seeds: the spread
    views: bool = False  # also train on the store's augmented views of the training images (extract --views)
    max_memory: int | None = None  # bytes of feature data held at once (None: half the available memory)
    epochs: int = 30  # streamed probe: at most this many passes over the training rows per grid value

    def __post_init__(self) -> None:
        check_resamples(self.resamples)
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
        if self.views and (self.shots or self.val_seeds):
            raise ConfigError("--views trains the standard probe on augmented views; it does not combine with --shots "
                              "or --val-seeds")


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
    resamples: int = DEFAULT_RESAMPLES  # bootstrap resamples for the 95% intervals (0: no intervals)
    max_memory: int | None = None  # bytes of feature data held at once (None: half the available memory)
    index: Path | None = None  # search through this index folder (built with --splits of the searched rows)
    approx: bool = False  # build a tuned index over the searched rows and search through it
    memory_budget: int = 4 * 2**30  # the size of the index --approx builds
    queries: int = 0  # score a seeded sample of this many queries (0: all of them)
    device: str = "auto"  # the exact search: FAISS on CPU, torch on CUDA (auto: CUDA when there is one)

    def __post_init__(self) -> None:
        check_resamples(self.resamples)
        if self.index is not None and self.approx:
            raise ConfigError("give --index DIR or --approx, not both")
        if self.queries < 0:
            raise ConfigError(f"queries must be >= 0 (0: all), got {self.queries}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError(f"k must be positive integers, got {list(self.ks)}")
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ConfigError(f"the temperature must be a finite positive number, got {self.temperature}")


@dataclass(frozen=True)
class AuditConfig:
    """Duplicates, leakage and label-noise hints of a store; the probe and kNN test figures with and without the
    test images that have a copy in train/val; optionally a clean split assignment or manifest."""

    store: Path
    out: Path | None = None  # results JSON (default STORE.audit.json)
    threshold: float | None = None  # near duplicates: cosine at or above this (None: the store's auto threshold)
    k: int = 10  # neighbours searched per row (near duplicates, label-noise score)
    fit: bool = True  # the probe and kNN figures with leaked test rows removed
    head: str = "logreg"
    knn_k: int = 20
    temperature: float = DINOV2_TEMPERATURE
    resamples: int = DEFAULT_RESAMPLES
    write_splits: Path | None = None  # CSV id,split,audit: the clean split assignment
    write_manifest: Path | None = None  # a manifest (path,label,split,id) of the rows kept
    max_memory: int | None = None  # feature data held at once: loaded within it, streamed beyond (None: half)
    device: str = "auto"  # the exact searches: FAISS on CPU, torch on CUDA (auto: CUDA when there is one)
    report: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_resamples(self.resamples)
        if self.threshold is not None and (not math.isfinite(self.threshold) or not 0 < self.threshold <= 1):
            raise ConfigError(f"the near-duplicate threshold is a cosine in (0, 1], got {self.threshold}")
        if self.k < 1 or self.knn_k < 1:
            raise ConfigError(f"k must be positive, got {self.k} and {self.knn_k}")
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ConfigError(f"the temperature must be a finite positive number, got {self.temperature}")


# What happens to transparency (`--alpha`): composited over a colour (white, the default, so that the RGBA and RGB
# versions of an image agree and the colour a file keeps under its transparent pixels never reaches the model), or
# dropped as timm's, torchvision's, open_clip's and clip-retrieval's loaders do (`convert("RGB")`, which keeps that
# colour). `drop` reproduces features computed by those tools; the policy is in the cache key.
ALPHA_NAMES = {"white": (255, 255, 255), "black": (0, 0, 0)}
DEFAULT_ALPHA = "white"


def parse_alpha(text: str) -> str:
    """`drop`, `white`, `black` or `R,G,B` (0-255 each) in its canonical spelling; ValueError otherwise."""
    value = str(text).strip().lower().replace(" ", "")
    if value in ("drop", *ALPHA_NAMES):
        return value
    parts = value.split(",")
    if len(parts) == 3 and all(p.isdigit() and int(p) <= 255 for p in parts):
        rgb = tuple(int(p) for p in parts)
        named = [name for name, colour in ALPHA_NAMES.items() if colour == rgb]
        return named[0] if named else ",".join(str(c) for c in rgb)
    raise ValueError(f"--alpha {text!r} is not drop, white, black or R,G,B (three integers 0-255)")


def alpha_background(alpha: str) -> tuple[int, int, int] | None:
    """The colour transparent pixels are composited over (None: alpha dropped)."""
    if alpha == "drop":
        return None
    return ALPHA_NAMES.get(alpha) or tuple(int(p) for p in alpha.split(","))


@dataclass(frozen=True)
class FinetuneConfig:
    """The trailing `blocks` of the top and a new head, trained on a store's cached activations."""

    store: Path
    out: Path | None = None
    blocks: int = 1  # trailing blocks of the top to train (0: the head alone, on the frozen top)
    epochs: int = 30
    batch_size: int = 64
    lr_block: float = 1e-4
    lr_head: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    patience: int = 5  # epochs without a better validation loss before stopping
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    views: bool = False  # also train on the augmented views the store holds (extract --views)
    max_memory: int = 2 << 30  # bytes of activations held in memory (beyond it, read per batch)
    resamples: int = DEFAULT_RESAMPLES
    report: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        checks = [(self.blocks >= 0, f"blocks must be >= 0, got {self.blocks}"),
                  (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
                  (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
                  (self.patience >= 1, f"patience must be >= 1, got {self.patience}"),
                  (0 <= self.label_smoothing < 1, f"label smoothing must be in [0, 1), got {self.label_smoothing}"),
                  (0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}")]
        checks += [(math.isfinite(v) and v >= 0, f"{name} must be a finite number >= 0, got {v}")
                   for name, v in (("lr_block", self.lr_block), ("lr_head", self.lr_head),
                                   ("weight_decay", self.weight_decay))]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass(frozen=True)
class FullFinetuneConfig:
    """The reference loop (`finetune-images`): the whole backbone and a new head trained from the images."""

    store: Path  # its splits, labels and source; the features are not used
    out: Path
    epochs: int = 15
    patience: int = 3
    batch_size: int = 32
    lr_block: float = 1e-4
    lr_head: float = 1e-3
    weight_decay: float = 0.05
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    max_images: int = 5000  # refuse larger data sets: this loop is the slow reference
    resamples: int = DEFAULT_RESAMPLES

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.patience < 1 or self.batch_size < 1:
            raise ConfigError("epochs, patience and batch size must be >= 1")
