"""The extraction engine: faster forward passes equal eager fp32 within tolerance, out-of-memory back-off, the
background decode and writer threads. Real models and tensors; the GPU checks run only where there is a GPU."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from pipeline.backbones.factory import create_backbone, resolve_precision
from pipeline.engine.forward import default_workers, features_with_backoff
from pipeline.engine.runner import extract_to_store
from pipeline.engine.threads import BackgroundWriter, prefetch
from pipeline.errors import PipelineError, StoreError
from pipeline.plan import ExtractConfig
from pipeline.store.read import load_store


def _photos(backbone) -> torch.Tensor:
    images = [Image.fromarray(load_sample_image(n)) for n in ("china.jpg", "flower.jpg")]
    return torch.stack([backbone.transform(im) for im in images] * 3)


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float().cpu(), b.float().cpu(), dim=-1).min().item()


def test_frozen_trace_matches_eager_on_real_photos(lite0):
    fast = lite0.optimized()
    assert fast.optimization == "jit-freeze" and lite0.optimization == "eager"
    x = _photos(lite0)
    assert _min_cosine(lite0.features(x[:5]), fast.features(x[:5])) >= 0.9999  # 5: a batch size never traced
    assert fast.dim == lite0.dim


class _Quirky(torch.nn.Module):
    """Features that depend on the batch size through a Python int: a trace would bake the size in."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 8)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.mean(dim=(2, 3))) + float(int(x.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def test_a_trace_that_does_not_reproduce_eager_is_dropped(tiny):
    quirky = dataclasses.replace(tiny, model=_Quirky().eval(), dim=8)
    assert quirky.optimized() is quirky  # checked on two batch sizes, found different, stays eager
    layered = create_backbone("timm:test_resnet", random_init=True, layer="layer2")
    assert layered.optimized() is layered  # hooks cannot be traced: not attempted


def test_bf16_autocast_on_cpu_is_within_tolerance(lite0):
    bf16 = create_backbone("efficientnet_lite0", precision="bf16")
    x = _photos(lite0)
    assert bf16.precision == "bf16"
    assert _min_cosine(lite0.features(x), bf16.features(x)) >= 0.999
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(PipelineError, match="unknown precision"):
        resolve_precision("fp8", torch.device("cpu"))


@pytest.mark.slow
def test_torch_compile_matches_eager(tiny, small_digits_root):
    compiled = create_backbone("timm:test_resnet", random_init=True, compile=True)
    x = torch.randn(4, *tiny.data_config["input_size"])
    assert compiled.optimization == "torch.compile"
    assert _min_cosine(tiny.features(x), compiled.features(x)) >= 0.999
    with pytest.raises(PipelineError, match="--compile cannot be combined with --layer"):
        create_backbone("timm:test_resnet", random_init=True, compile=True, layer="layer2")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_gpu_precisions_match_cpu_fp32(lite0, precision):
    gpu = create_backbone("efficientnet_lite0", device="cuda", precision=precision)
    x = _photos(lite0)
    assert _min_cosine(lite0.features(x), gpu.features(x)) >= 0.999


class _OutOfMemoryAbove(torch.nn.Module):
    """Raises PyTorch's real out-of-memory error for batches larger than `limit`."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.batches: list[int] = []

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) > self.limit:
            raise torch.OutOfMemoryError(f"tried a batch of {len(x)}")
        self.batches.append(len(x))
        return x.flatten(1)[:, :4] * 2


def test_out_of_memory_splits_the_batch_and_keeps_row_order(tiny):
    model = _OutOfMemoryAbove(limit=3)
    backbone = dataclasses.replace(tiny, model=model, dim=4)
    x = torch.arange(10 * 3 * 2 * 2, dtype=torch.float32).reshape(10, 3, 2, 2)
    out = features_with_backoff(backbone, x)
    torch.testing.assert_close(out, x.flatten(1)[:, :4] * 2)
    assert max(model.batches) <= 3 and sum(model.batches) == 10
    with pytest.raises(torch.OutOfMemoryError):
        features_with_backoff(dataclasses.replace(tiny, model=_OutOfMemoryAbove(limit=0), dim=4), x[:1])


def test_prefetch_yields_everything_in_order_and_reraises_errors():
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def broken():
        yield 1
        raise OSError("disk went away")

    got = []
    with pytest.raises(OSError, match="disk went away"):
        for item in prefetch(broken()):
            got.append(item)
    assert got == [1]


def test_background_writer_writes_in_order_and_surfaces_its_error():
    written = []
    writer = BackgroundWriter(lambda batch, feats: written.append(batch), depth=2)
    for i in range(20):
        writer.submit(i, torch.zeros(1))
    writer.close()
    assert written == list(range(20))

    def fail_on_three(batch, feats):
        if batch == 3:
            raise StoreError("no space left")

    writer = BackgroundWriter(fail_on_three, depth=1)
    with pytest.raises(StoreError, match="no space left"):
        for i in range(100):
            writer.submit(i, torch.zeros(1))
        writer.close()


def test_extraction_defaults_use_the_fast_path_and_record_it(tmp_path, small_digits_root, tiny):
    out = tmp_path / "s.h5"
    extract_to_store(ExtractConfig.of(data=small_digits_root, out=out, backbone="timm:test_resnet", random_init=True,
                                   workers=0, progress=False))
    fast = load_store(out)
    assert fast.attrs["optimization"] == "jit-freeze" and fast.attrs["precision"] == "fp32"
    eager = tmp_path / "e.h5"
    extract_to_store(ExtractConfig.of(data=small_digits_root, out=eager, workers=0, progress=False), backbone=tiny)
    ref = load_store(eager)
    assert list(ref.ids) == list(fast.ids) and ref.attrs["cache_key"] == fast.attrs["cache_key"]
    cos = (ref.features * fast.features).sum(axis=1)
    assert cos.min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(fast.features, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("cores, workers", [(None, 1), (1, 1), (2, 1), (3, 2), (8, 7), (17, 16), (128, 16)])
def test_default_workers_fit_the_machine_and_always_isolate_decoding(monkeypatch, cores, workers):
    # one core is left to the model; never 0 (decoder crashes stay out of this process); at most 16
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    assert default_workers() == workers
