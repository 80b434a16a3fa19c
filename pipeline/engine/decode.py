"""Decoding: one image (file bytes or an in-memory image from a dataset) → a consistent RGB image → a tensor.

The sources (folders, manifests, tar shards, torchvision sets) live in `pipeline.sources`; this module turns what a
source's reader returns into model input, and makes every failure a recorded reason instead of an exception.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import math
import os
import re
import stat
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    import torch

from pipeline.config import (
    ALPHA_NAMES,
    DEFAULT_ALPHA,
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_PIXELS,
    PLUGIN_SPEC,
    alpha_background,
    parse_alpha,
)
from pipeline.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
SPLITS = ("train", "val", "test")
# Transparency (`--alpha`, see `pipeline.config.parse_alpha`): composited over white by default, or dropped.
ALPHA_BACKGROUND = ALPHA_NAMES[DEFAULT_ALPHA]
# Long side / short side beyond which the long side is cropped (centrally) before a resize-shorter-side transform.
# Such a transform scales a 1x5000 strip to 256x1.28M pixels (1.3 GB, seconds) only for the centre crop to keep a
# 224x224 square from its middle; cropping first keeps that middle, at a fixed cost. 16:1 leaves real photos alone.
MAX_ASPECT = 16.0
# DEFAULT_MAX_FILE_BYTES: files (and tar members) larger than this are refused before they are read. An image file
# that size is not a photo (an uncompressed 16-bit RGB image at the default pixel limit is 511 MiB), and reading it
# whole costs its size in RAM, per decode worker.
_CHUNK_PIXELS = 1 << 20  # 16-bit and float images are converted to 8 bits this many pixels at a time


class ImageTooLarge(ValueError):
    """An image whose header declares more pixels than the limit: refused before decoding (decompression bomb)."""


@dataclass(frozen=True)
class Decoding:
    """How files become images, the same in every decode process: a pixel limit against decompression bombs
    (None: no limit), a byte limit per file or tar member (None: no limit), the aspect guard (None: off; only for
    resize-shorter-side + centre-crop transforms) and Pillow plugin modules to import first (`module` or
    `module:register_function`, e.g. `pillow_heif:register_heif_opener`)."""

    max_pixels: int | None = DEFAULT_MAX_PIXELS
    max_aspect: float | None = MAX_ASPECT
    plugins: tuple[str, ...] = ()
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES
    alpha: str = DEFAULT_ALPHA

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", parse_alpha(self.alpha))
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1 (or None for no limit), got {self.max_pixels}")
        if self.max_aspect is not None and self.max_aspect < 1:
            raise ValueError(f"max_aspect must be >= 1 (or None), got {self.max_aspect}")
        if self.max_file_bytes is not None and self.max_file_bytes < 1:
            raise ValueError(f"max_file_bytes must be >= 1 (or None for no limit), got {self.max_file_bytes}")

    def as_attrs(self) -> dict[str, Any]:
        """As recorded in a store (and hashed into its data fingerprint). The default alpha policy is recorded by its
        background alone, as before the policy could be chosen, so that existing stores stay up to date."""
        background = alpha_background(self.alpha)
        return {"max_pixels": self.max_pixels or 0, "max_aspect": self.max_aspect or 0.0,
                "alpha_background": list(background) if background else [], "plugins": list(self.plugins),
                "max_file_bytes": self.max_file_bytes or 0, **({} if self.alpha == DEFAULT_ALPHA else
                                                                 {"alpha": self.alpha})}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> Decoding:
        """The policy a store recorded (`as_attrs`); stores written before the byte limit existed had none, before the
        alpha policy existed composited over white."""
        return cls(max_pixels=attrs.get("max_pixels") or None, max_aspect=attrs.get("max_aspect") or None,
                   plugins=tuple(attrs.get("plugins", ())), max_file_bytes=attrs.get("max_file_bytes") or None,
                   alpha=attrs.get("alpha") or DEFAULT_ALPHA)


_loaded_plugins: set[str] = set()


def check_plugin_spec(spec: str) -> None:
    """A plugin is a module to import (`pillow_avif`) or a module and its registration hook
    (`pillow_heif:register_heif_opener`): only functions named `register...` are called, with no arguments."""
    if not PLUGIN_SPEC.fullmatch(spec):
        raise DataError(f"--image-plugin {spec!r} is not MODULE or MODULE:register_FUNCTION (only registration hooks "
                        "named register... are called), e.g. pillow_heif:register_heif_opener")


def load_plugins(plugins: tuple[str, ...] | list[str]) -> None:
    """Import Pillow plugin modules (once per process), calling `module:register...` registration hooks."""
    for spec in plugins:
        if spec in _loaded_plugins:
            continue
        check_plugin_spec(spec)
        module_name, _, func = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
            if func:
                getattr(module, func)()
        except Exception as exc:  # noqa: BLE001 - a plugin that fails to load is the user's to fix: one line
            raise DataError(f"image plugin {spec!r} cannot be loaded ({type(exc).__name__}: {exc}); install it or "
                            "drop --image-plugin") from None
        _loaded_plugins.add(spec)


def _to_uint8(array: np.ndarray, scale: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Map a 2-D array to uint8 a block of rows at a time, so that no full-size wide temporary is made."""
    out = np.empty(array.shape, dtype=np.uint8)
    step = max(1, _CHUNK_PIXELS // max(1, array.shape[1]))
    for start in range(0, array.shape[0], step):
        out[start:start + step] = scale(array[start:start + step])
    return out


def _finite_range(array: np.ndarray) -> tuple[float, float]:
    lo, hi = math.inf, -math.inf
    step = max(1, _CHUNK_PIXELS // max(1, array.shape[1]))
    for start in range(0, array.shape[0], step):
        block = array[start:start + step]
        finite = block[np.isfinite(block)] if block.dtype.kind == "f" else block.reshape(-1)
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    return (lo, hi) if lo <= hi else (0.0, 0.0)


def _wide_to_l(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float image as 8-bit grayscale: 16-bit scaled by 255/65535 (rounded), the others
    min-max scaled over their finite values. Done in blocks of rows: an 88-Mpx 16-bit image no longer needs GBs."""
    array = np.asarray(image)
    if image.mode.startswith("I;16"):
        pixels = _to_uint8(array, lambda b: ((b.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8))
    else:
        lo, hi = _finite_range(array)
        span = hi - lo

        def scale(block: np.ndarray) -> np.ndarray:
            if span <= 0:
                return np.zeros(block.shape, dtype=np.uint8)
            b = np.nan_to_num(block.astype(np.float64), nan=lo, posinf=hi, neginf=lo)
            return np.clip((b - lo) / span * 255.0 + 0.5, 0, 255).astype(np.uint8)

        pixels = _to_uint8(array, scale)
    return Image.fromarray(pixels, mode="L")


def to_rgb(image: Image.Image, alpha: str = DEFAULT_ALPHA) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB consistently: 16-bit/float rescaled, alpha composited over the `alpha`
    colour, or with `alpha="drop"` exactly as `image.convert("RGB")` (the timm/torchvision loaders' conversion)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _wide_to_l(image)
    background = alpha_background(alpha)
    if background is None:
        return image.convert("RGB") if image.mode != "RGB" else image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("La", "RGBa"):  # premultiplied alpha: unpremultiply through RGBA
        image = image.convert("RGBA") if image.mode == "RGBa" else image.convert("LA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def _check_pixels(size: tuple[int, int], max_pixels: int | None) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(f"{width}x{height} = {width * height:,} pixels is over the limit of {max_pixels:,} "
                            "(possible decompression bomb; raise --max-pixels to accept it)")


def load_image(source: str | Path | io.BytesIO, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               alpha: str = DEFAULT_ALPHA) -> Image.Image:
    """Decode one image (a path or in-memory bytes) into RGB: the pixel count is checked from the header before any
    decoding, EXIF orientation is applied, and an animated image gives its first frame."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides, below
        saved = Image.MAX_IMAGE_PIXELS
        # Pillow refuses at twice its own limit inside open(); lift it so that our limit (and message) is the one used
        Image.MAX_IMAGE_PIXELS = None
        try:
            with Image.open(source) as image:
                _check_pixels(image.size, max_pixels)
                image.seek(0)
                image = ImageOps.exif_transpose(image)
                image.load()
                return to_rgb(image, alpha)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def crop_extreme_aspect(image: Image.Image, max_aspect: float | None = MAX_ASPECT) -> Image.Image:
    """Crop the long side of an image more elongated than `max_aspect`:1 to that ratio, around its centre (see
    MAX_ASPECT: a no-op for a resize-shorter-side + centre-crop transform, which only sees the middle anyway)."""
    if max_aspect is None:
        return image
    width, height = image.size
    short = min(width, height)
    keep = math.ceil(short * max_aspect)
    if max(width, height) <= keep:
        return image
    if width > height:
        left = (width - keep) // 2
        return image.crop((left, 0, left + keep, height))
    top = (height - keep) // 2
    return image.crop((0, top, width, top + keep))


def content_hash(data: bytes) -> str:
    """The identity of a file's bytes (BLAKE2b-128, hex): tells a changed file from one that was only touched."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def raw_hash(raw: bytes | Image.Image) -> str:
    """The content hash of what a reader returned: a file's bytes, or an in-memory image's mode, size and pixels
    (for sources that hand over images, not files). The decode stage records it; incremental runs compare it."""
    if isinstance(raw, Image.Image):
        return content_hash(f"{raw.mode}:{raw.size}:".encode() + raw.tobytes())
    return content_hash(bytes(raw))


class FileTooLarge(ValueError):
    """A file or tar member over the byte limit: refused before it is read."""


def check_file_size(size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise FileTooLarge(f"{size:,} bytes is over the limit of {max_bytes:,} (raise --max-file-bytes to accept "
                           "it)")


def read_file(path: str | Path, max_bytes: int | None = None) -> bytes:
    """A file's bytes; refuses what is not a regular file (reading a FIFO would block, a device would never end),
    and a file over `max_bytes`, before reading it."""
    with open(path, "rb", opener=_nonblocking) as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            mode = st.st_mode
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
            raise OSError(f"not a regular file ({kind})")
        check_file_size(st.st_size, max_bytes)
        data = fh.read() if max_bytes is None else fh.read(max_bytes + 1)
        check_file_size(len(data), max_bytes)  # it grew while being read
        return data


def _nonblocking(path: str, flags: int) -> int:
    """Open without blocking: opening a FIFO for reading would otherwise wait for a writer."""
    return os.open(path, flags | os.O_NONBLOCK)


def file_stamp(path: str | Path) -> tuple[int, int]:
    """(size, mtime_ns) of a file, following links; (-1, -1) when it cannot be stat'ed (e.g. a broken link)."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


class Reader(Protocol):
    """What a source gives the decode processes: `read(locator, max_bytes)` returns a file's bytes (refusing more
    than `max_bytes`) or an in-memory image. Readers are pickled into worker processes, so they hold paths and small
    specs, not open handles or data."""

    def read(self, locator: Any, max_bytes: int | None = None) -> bytes | Image.Image: ...


class PerProcessReader:
    """A reader that opens what it reads (file handles, dataset objects) lazily in each process: only the `kept`
    attributes are pickled, and `fresh()` starts the per-process state, at construction and after unpickling."""

    kept: tuple[str, ...] = ()

    def fresh(self) -> None:
        raise NotImplementedError

    def __getstate__(self) -> dict:
        return {name: self.__dict__[name] for name in self.kept}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.fresh()


def failure_reason(exc: BaseException) -> str:
    """An exception as a stable, one-line failure reason: no object addresses (they differ run to run), bounded."""
    text = f"{type(exc).__name__}: {exc}".strip()
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", " ".join(text.split()))
    return text if len(text) <= 300 else text[:297] + "..."


def decode(raw: bytes | Image.Image, decoding: Decoding) -> tuple[Image.Image, str]:
    """What a reader returned → (RGB image, content hash)."""
    if isinstance(raw, bytes | bytearray | memoryview):
        data = bytes(raw)
        if not data:
            raise ValueError("empty file (0 bytes)")
        image = load_image(io.BytesIO(data), max_pixels=decoding.max_pixels, alpha=decoding.alpha)
    elif isinstance(raw, Image.Image):
        _check_pixels(raw.size, decoding.max_pixels)
        image = to_rgb(raw, decoding.alpha)
    else:
        raise TypeError(f"a reader returned {type(raw).__name__}, expected bytes or a PIL image")
    return crop_extreme_aspect(image, decoding.max_aspect), raw_hash(raw)


class ImageDataset:
    """Reader stage (a map-style dataset for torch's DataLoader): index → (index, tensor, error, content hash). A
    file that fails to decode yields its error, not an exception, so that one bad image never stops a run and is
    recorded instead of silently dropped. A file is read once: its bytes are hashed (for incremental runs) and
    decoded from memory."""

    def __init__(self, locators: Sequence, transform: Callable[[Image.Image], torch.Tensor], *,
                 reader: Reader | None = None, decoding: Decoding = Decoding()) -> None:
        # a sequence as given (a listing's column of millions of paths travels to each worker as one buffer)
        self.locators = locators if isinstance(locators, Sequence) else list(locators)
        self.transform = transform
        self.reader = reader if reader is not None else FileReader()
        self.decoding = decoding

    def __len__(self) -> int:
        return len(self.locators)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str, str]:
        load_plugins(self.decoding.plugins)
        try:
            raw = self.reader.read(self.locators[index], self.decoding.max_file_bytes)
            image, digest = decode(raw, self.decoding)
            return index, self.transform(image), "", digest
        except Exception as exc:  # noqa: BLE001 - any decode failure becomes a recorded failure for this file
            return index, None, failure_reason(exc), ""


@dataclass(frozen=True)
class Refused:
    """A locator for a listed file that must not be read (e.g. a link out of the data root): reading it fails with
    `reason`, so the file is a recorded failure rather than a silent omission."""

    path: Path
    reason: str


class FileReader:
    """Locators are file paths (or `Refused`)."""

    def read(self, locator: str | Path | Refused, max_bytes: int | None = None) -> bytes:
        if isinstance(locator, Refused):
            raise OSError(locator.reason)
        return read_file(locator, max_bytes)


@dataclass
class Batch:
    """A collated batch: `indices` of decoded images with their `images` and content `hashes`, plus failures as
    (index, reason)."""

    indices: np.ndarray
    images: torch.Tensor | None
    failures: list[tuple[int, str]]
    hashes: list[str]

    def pin_memory(self) -> Batch:
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def collate_batch(items: list[tuple[int, torch.Tensor | None, str, str]]) -> Batch:
    import torch

    ok = [(i, x, h) for i, x, _, h in items if x is not None]
    failures = [(i, err) for i, x, err, _ in items if x is None]
    indices = np.array([i for i, _, _ in ok], dtype=np.int64)
    images = torch.stack([x for _, x, _ in ok]) if ok else None
    return Batch(indices=indices, images=images, failures=failures, hashes=[h for _, _, h in ok])
