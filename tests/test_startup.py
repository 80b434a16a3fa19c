"""Start-up and environment: the light commands import none of the heavy libraries (timings are measured by
benchmarks/startup.py), and the environment is the lock the suite was run against."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "timm", "sklearn", "faiss", "prefect", "matplotlib")
PROBE = """
import sys
from pipeline.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("HEAVY", sorted(m for m in {heavy!r} if m in sys.modules))
"""


def _imported(argv: list[str], env: dict) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT)
    line = [x for x in proc.stdout.splitlines() if x.startswith("HEAVY")]
    assert line, proc.stderr
    return ast.literal_eval(line[0][len("HEAVY "):])


@pytest.fixture(scope="module")
def catalogue_env(tmp_path_factory):
    env = {**os.environ, "FEATPIPE_CACHE": str(tmp_path_factory.mktemp("cache"))}
    subprocess.run([sys.executable, "-m", "pipeline", "backbones"], env=env, check=True, capture_output=True,
                   timeout=300)  # builds the catalogue once (this call may import torch)
    return env


def test_help_store_info_and_backbones_import_no_heavy_library(catalogue_env, small_digits_root, tmp_path):
    from pipeline.engine.runner import extract_to_store
    from pipeline.plan import ExtractConfig

    store = tmp_path / "s.h5"
    extract_to_store(ExtractConfig.of(data=small_digits_root, out=store, backbone="timm:test_resnet", random_init=True,
                                   workers=0, progress=False))
    for argv in (["--help"], ["extract", "--help"], ["store", "info", str(store)], ["store", "verify", str(store)],
                 ["backbones"], ["backbones", "timm:resnet18*"]):
        assert _imported(argv, catalogue_env) == [], argv


def test_the_environment_is_the_lock():
    pins = re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", (ROOT / "constraints.txt").read_text(), flags=re.M)
    assert len(pins) > 100  # every transitive package, not only the direct ones
    wrong = []
    for name, pinned in pins:
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "missing"
        if installed != pinned:
            wrong.append(f"{name} {installed} != {pinned}")
    assert wrong == [], "the environment drifted from constraints.txt (run `make clean test`, or `make lock`): " \
                        + "; ".join(wrong[:10])
