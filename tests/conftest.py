"""Shared fixtures: real tiny models, real files in tmp_path, one Prefect test harness per session."""

from __future__ import annotations

import os
import random
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one thread each, children too
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from pipeline.backbones.factory import create_backbone
from pipeline.demo import write_digits_folder
from pipeline.engine.runner import extract_to_store
from pipeline.plan import ExtractConfig

TINY_BACKBONE = "timm:test_resnet"
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # two threads per worker would spin against the other worker (a 10x slowdown seen)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _restore_rng_state():
    """Tests must not leak RNG state into each other."""
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    torch.set_rng_state(torch_state)
    np.random.set_state(np_state)
    random.setstate(py_state)


@pytest.fixture(scope="session")
def lite0():
    """The embedded default backbone with its real packaged ImageNet weights."""
    return create_backbone("efficientnet_lite0", device="cpu")


@pytest.fixture(scope="session")
def tiny():
    """A tiny random-init timm model: fast, real torch code."""
    return create_backbone(TINY_BACKBONE, device="cpu", random_init=True)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    return write_digits_folder(tmp_path_factory.mktemp("digits") / "digits")


@pytest.fixture(scope="session")
def small_digits_root(tmp_path_factory):
    """5 images per class and split: 100 images."""
    return write_digits_folder(tmp_path_factory.mktemp("digits5") / "digits", per_class=5)


@pytest.fixture(scope="session")
def digits_store(tmp_path_factory, digits_root, lite0):
    """All 1,797 digits through EfficientNet-Lite0 (the slowest fixture: ~1 min on 2 cores)."""
    out = tmp_path_factory.mktemp("stores") / "digits.h5"
    extract_to_store(ExtractConfig.of(data=digits_root, out=out, workers=0, progress=False), backbone=lite0)
    return out


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


@pytest.fixture(scope="session")
def tango_icons(tmp_path_factory) -> list[Path]:
    """Real RGBA images: the 32x32 PNGs of Debian's tango-icon-theme (downloaded with apt-get, unpacked with dpkg;
    never committed). Only icons with some transparent and some opaque pixels are kept."""
    import subprocess

    from PIL import Image

    where = tmp_path_factory.mktemp("tango")
    proc = subprocess.run(["apt-get", "download", "tango-icon-theme"], cwd=where, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"the RGBA icons need `apt-get download tango-icon-theme`: {proc.stderr[-500:]}"
    deb = next(where.glob("tango-icon-theme_*.deb"))
    subprocess.run(["dpkg", "-x", str(deb), str(where / "x")], check=True, timeout=300)
    icons = []
    for path in sorted((where / "x").rglob("32x32/**/*.png")):
        with Image.open(path) as image:
            if image.mode != "RGBA":
                continue
            alpha = np.asarray(image)[:, :, 3]
        if (alpha == 0).any() and (alpha == 255).any():
            icons.append(path)
    assert len(icons) >= 50, f"only {len(icons)} RGBA icons in tango-icon-theme"
    return icons
