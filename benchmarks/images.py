"""Benchmark image folders: real images written as ROOT/<class>/<file>, shared by the benchmark scripts."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def write_digit_images(root: Path, n: int, *, start: int = 0) -> None:
    """n digit images as 10 classes of PNGs, named from `start` on (digits reused under new names past 1,797)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for k in range(start, start + n):
        i = k % len(digits.target)
        path = root / str(int(digits.target[i])) / f"img_{k:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(digits.images[i] * (255 / 16)).astype(np.uint8)).save(path)


def write_photo_images(root: Path, n: int) -> None:
    """n JPEG crops (60-100% of each side) of the scikit-learn and scikit-image photos, one class per photo."""
    from skimage import data as skdata
    from sklearn.datasets import load_sample_image

    photos = [load_sample_image("china.jpg"), load_sample_image("flower.jpg"), skdata.astronaut(), skdata.coffee(),
              skdata.chelsea(), skdata.rocket()]
    rng = np.random.default_rng(0)
    for k in range(n):
        photo = photos[k % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        path = root / f"photo{k % len(photos)}" / f"img_{k:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(photo[y:y + ch, x:x + cw])).save(path, quality=90)


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina", "hubble_deep_field",
          "camera", "moon", "page", "text", "brick", "grass", "gravel", "coins", "clock", "cell")
COPY_KINDS = ("exact", "png_resave", "jpeg95", "jpeg75", "up2_bilinear", "up4_nearest", "down_half", "crop90")


def copy_variant(path: Path, kind: str) -> bytes:
    """A copy of an image file: the same bytes, the same pixels re-encoded (PNG with other settings and a text
    chunk), JPEG at quality 95 or 75, resized (x2 bilinear, x4 nearest, x0.5 bicubic), or cropped to 90%."""
    from PIL import PngImagePlugin

    if kind == "exact":
        return path.read_bytes()
    image = Image.open(path)
    image.load()
    buffer = io.BytesIO()
    w, h = image.size
    if kind == "png_resave":
        info = PngImagePlugin.PngInfo()
        info.add_text("Comment", "copied")
        image.save(buffer, format="PNG", optimize=True, pnginfo=info)
    elif kind.startswith("jpeg"):
        image.convert("RGB").save(buffer, format="JPEG", quality=int(kind[4:]))
    else:
        resized = {"up2_bilinear": lambda: image.resize((2 * w, 2 * h), Image.Resampling.BILINEAR),
                   "up4_nearest": lambda: image.resize((4 * w, 4 * h), Image.Resampling.NEAREST),
                   "down_half": lambda: image.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BICUBIC),
                   "crop90": lambda: image.crop((w // 20, h // 20, w - w // 20, h - h // 20))}[kind]()
        resized.save(buffer, format="PNG")
    return buffer.getvalue()


def write_photo_quadrants(root: Path, photos: tuple[str, ...] = PHOTOS) -> None:
    """scikit-image's example photos (all bundled, none downloaded), each cut into 4 crops: 2 in train, 2 in test,
    one class per photo (not "cat": it is "chelsea" again)."""
    import skimage.data as data
    from skimage.util import img_as_ubyte

    for n, name in enumerate(photos):
        pixels = img_as_ubyte(getattr(data, name)())
        image = Image.fromarray(pixels[..., :3] if pixels.ndim == 3 else pixels).convert("RGB")
        w, h = image.size
        for i, box in enumerate([(0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2), (0, h // 2, w // 2, h),
                                 (w // 2, h // 2, w, h)]):
            split = "train" if (n + i) % 2 else "test"
            out = root / split / f"photo_{name}" / f"{name}_{i}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            image.crop(box).save(out)
