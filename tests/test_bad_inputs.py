"""Bad and odd input: every file ends as a row or a recorded failure (id and reason), and the run finishes.

Odd files are built in tmp_path: every colour mode users meet, EXIF rotation, animation, tiny and extremely
elongated images, and the broken kinds (empty, truncated, not an image, broken or looping links, a FIFO, a
decompression bomb, a file that crashes its decoder and one that hangs it).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.engine.decode import (
    ALPHA_BACKGROUND,
    Decoding,
    ImageDataset,
    crop_extreme_aspect,
    decode,
    load_image,
)
from pipeline.engine.runner import extract_to_store
from pipeline.errors import DataError
from pipeline.plan import ExtractConfig
from pipeline.store.read import load_store
from pipeline.store.verify import verify_store
from tests.bad_decoder import CRASH, HANG
from tests.sources_data import png_header_only

RNG = np.random.default_rng(0)


def _noise(h: int, w: int, c: int | None = 3) -> np.ndarray:
    shape = (h, w) if c is None else (h, w, c)
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def _odd_but_good(root: Path) -> list[str]:
    """Files that must become rows; returns their ids (paths relative to root)."""
    d = root / "odd"
    d.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_noise(20, 40)).save(d / "exif_rotated.jpg", exif=exif)
    Image.fromarray(_noise(30, 30, 4), mode="CMYK").save(d / "cmyk.jpg")
    Image.fromarray(_noise(30, 30, None)).save(d / "gray.png")
    Image.fromarray(RNG.integers(0, 65536, (30, 30), dtype=np.uint16)).save(d / "sixteen_bit.png")
    Image.fromarray(RNG.normal(size=(30, 30)).astype(np.float32), mode="F").save(d / "float.tif")
    Image.fromarray(RNG.integers(-(2**31), 2**31 - 1, (30, 30), dtype=np.int32), mode="I").save(d / "int32.tiff")
    palette = Image.fromarray(_noise(30, 30, None)).convert("P")
    palette.save(d / "palette_transparent.gif", transparency=0)
    Image.fromarray(_noise(30, 30, 4), mode="RGBA").save(d / "rgba.png")
    Image.fromarray(_noise(30, 30, 2), mode="LA").save(d / "la.png")
    Image.fromarray(_noise(30, 30, None)).convert("1").save(d / "bilevel.bmp")
    frames = [Image.fromarray(_noise(30, 30)) for _ in range(3)]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=50)
    frames[0].save(d / "animated.webp", save_all=True, append_images=frames[1:], duration=50)
    Image.fromarray(_noise(1, 1)).save(d / "tiny_1x1.png")
    Image.fromarray(_noise(1, 6000)).save(d / "strip_6000x1.png")
    Image.fromarray(_noise(5000, 2)).save(d / "tall_2x5000.png")
    Image.fromarray(_noise(30, 30)).save(d / "UPPER.TIF")
    Image.fromarray(_noise(30, 30)).save(d / "lossless.webp", lossless=True)
    return sorted(p.relative_to(root).as_posix() for p in d.iterdir())


def _broken(root: Path) -> dict[str, str]:
    """Files that must become failures: id → a word their reason must contain."""
    d = root / "broken"
    d.mkdir(parents=True)
    (d / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(_noise(64, 64)).save(buf, format="JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "not_an_image.png").write_text("hello, I am a text file")
    (d / "broken_link.png").symlink_to(root / "nowhere.png")
    (d / "loop_a.png").symlink_to(d / "loop_b.png")
    (d / "loop_b.png").symlink_to(d / "loop_a.png")
    os.mkfifo(d / "fifo.jpg")
    png_header_only(d / "bomb.png", 100_000, 100_000)
    return {
        "broken/empty.jpg": "empty file",
        "broken/truncated.jpg": "truncated",
        "broken/not_an_image.png": "cannot identify",
        "broken/broken_link.png": "No such file",
        "broken/loop_a.png": "Too many levels of symbolic links",
        "broken/loop_b.png": "Too many levels of symbolic links",
        "broken/fifo.jpg": "not a regular file (a FIFO)",
        "broken/bomb.png": "over the limit of 89,478,485",
    }


def test_every_file_is_a_row_or_a_recorded_failure_and_the_run_finishes(tmp_path, capsys):
    root = tmp_path / "data"
    good = _odd_but_good(root)
    bad = _broken(root)
    out = tmp_path / "odd.h5"
    code = main(["extract", "--data", str(root), "--out", str(out), "--backbone", "timm:test_resnet",
                 "--random-init", "--batch-size", "4", "--workers", "1", "--test-fraction", "0.2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"{len(good)} extracted, {len(bad)} failed" in printed
    fs = load_store(out)
    assert sorted(fs.ids) == good
    failed = dict(fs.failed)
    assert sorted(failed) == sorted(bad)
    for file_id, word in bad.items():
        assert word in failed[file_id], (file_id, failed[file_id])
    assert not set(fs.ids) & set(failed)
    assert verify_store(out) == []
    norms = np.linalg.norm(fs.features, axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-4)


def test_nothing_readable_is_an_error_not_an_empty_store(tmp_path, capsys):
    _broken(tmp_path / "data")
    out = tmp_path / "none.h5"
    code = main(["extract", "--data", str(tmp_path / "data"), "--out", str(out), "--backbone", "timm:test_resnet",
                 "--random-init", "--workers", "0"])
    assert code == 2
    assert "none of the 8 images" in capsys.readouterr().err
    assert not out.exists()


def test_colour_modes_convert_consistently():
    rgb = _noise(8, 8)
    alpha = np.full((8, 8, 1), 255, dtype=np.uint8)
    alpha[:4] = 0
    rgba = Image.fromarray(np.concatenate([rgb, alpha], axis=2), mode="RGBA")
    got = np.asarray(decode(_png(rgba), Decoding())[0])
    np.testing.assert_array_equal(got[4:], rgb[4:])  # opaque pixels unchanged
    assert (got[:4] == ALPHA_BACKGROUND).all()  # transparent ones on the fixed background
    gray = _noise(8, 8, None)
    np.testing.assert_array_equal(np.asarray(decode(_png(Image.fromarray(gray)), Decoding())[0]),
                                  np.repeat(gray[:, :, None], 3, axis=2))
    sixteen = np.array([[0, 65535], [32768, 256]], dtype=np.uint16)
    got16 = np.asarray(decode(_png(Image.fromarray(sixteen)), Decoding())[0])[:, :, 0]
    np.testing.assert_array_equal(got16, np.round(sixteen / 65535 * 255).astype(np.uint8))
    # an animated image gives its first frame
    frames = [Image.fromarray(_noise(8, 8)) for _ in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    first = io.BytesIO()
    frames[0].save(first, format="GIF")
    np.testing.assert_array_equal(np.asarray(decode(buf.getvalue(), Decoding())[0]),
                                  np.asarray(decode(first.getvalue(), Decoding())[0]))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_pixel_limit_is_configurable(tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(_noise(100, 100)).save(path)
    with pytest.raises(ValueError, match="10,000 pixels is over the limit of 5,000"):
        load_image(path, max_pixels=5000)
    assert load_image(path, max_pixels=10_000).size == (100, 100)
    bomb = png_header_only(tmp_path / "bomb.png", 30_000, 30_000)  # 900 Mpx: past Pillow's own 2x refusal
    with pytest.raises(ValueError, match="over the limit"):
        load_image(bomb)
    with pytest.raises(OSError):  # with no limit it is decoded, and its data runs out
        load_image(bomb, max_pixels=None)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # the global is left as it was


def test_extreme_aspect_crop_keeps_what_the_centre_crop_sees(lite0):
    strip = Image.fromarray(_noise(3, 400))
    cropped = crop_extreme_aspect(strip, 16.0)
    assert cropped.size == (48, 3)
    full, guarded = lite0.transform(strip), lite0.transform(cropped)
    # the same middle of the image reaches the model (up to the resampling of a 1-pixel shift)
    assert float((full - guarded).abs().mean()) < 0.05
    assert crop_extreme_aspect(Image.new("RGB", (300, 20)), 16.0).size == (300, 20)  # 15:1 is left alone


def test_a_decoder_that_crashes_or_hangs_does_not_take_the_run_down(tmp_path):
    from tests.helpers import make_folder

    root = make_folder(tmp_path / "data", {"a": 6, "b": 6})
    (root / "a" / "img_crash.png").write_bytes(CRASH + b"\0" * 64)
    (root / "b" / "img_hang.png").write_bytes(HANG + b"\0" * 64)
    out = tmp_path / "s.h5"
    result = extract_to_store(ExtractConfig.of(data=root, out=out, backbone="timm:test_resnet", random_init=True,
                                            workers=2, batch_size=3, decode_timeout=3.0, progress=False,
                                            image_plugins=("tests.bad_decoder",)))
    assert (result.rows, result.failed) == (12, 2)
    failed = dict(load_store(out).failed)
    assert "crashed" in failed["a/img_crash.png"] and "SIGSEGV" in failed["a/img_crash.png"]
    assert "longer than 3 s" in failed["b/img_hang.png"]
    assert verify_store(out) == []


def test_a_missing_plugin_is_an_error_before_any_compute(tmp_path):
    from tests.helpers import make_folder

    root = make_folder(tmp_path / "data", {"a": 2})
    with pytest.raises(DataError, match="image plugin 'no_such_plugin' cannot be loaded"):
        extract_to_store(ExtractConfig.of(data=root, out=tmp_path / "s.h5", image_plugins=("no_such_plugin",)))


def test_dataset_reports_failures_without_raising(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(_noise(8, 8)).save(good)
    missing = tmp_path / "missing.png"
    dataset = ImageDataset([good, missing], transform=lambda im: __import__("torch").zeros(3, 2, 2))
    assert dataset[0][2] == "" and len(dataset[0][3]) == 32
    assert dataset[1][1] is None and "No such file" in dataset[1][2]
