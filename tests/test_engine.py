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


def _decode_dataset(tmp_path, n: int = 12, bad: tuple[int, ...] = ()):
    from torchvision.transforms import v2

    from pipeline.engine.decode import ImageDataset
    from tests.helpers import write_image

    paths = []
    for i in range(n):
        path = tmp_path / f"im{i:02d}.png"
        if i in bad:
            path.write_bytes(b"not an image")
        else:
            write_image(path, seed=i)
        paths.append(path)
    transform = v2.Compose([v2.PILToTensor(), v2.Resize((16, 16)), v2.ToDtype(torch.float32, scale=True)])
    return ImageDataset(paths, transform)


def test_the_loader_adapter_sees_and_stops_the_dataloaders_workers(tmp_path):
    """engine/loader.py is the one place that touches DataLoader privates (checked against the pinned torch): if a
    new torch moves them, this fails instead of the supervision silently losing sight of its workers."""
    from pipeline.engine.loader import make_loader, shutdown, worker_processes

    iterator = iter(make_loader(_decode_dataset(tmp_path), batch_size=4, workers=2, pin_memory=False))
    first = next(iterator)
    processes = worker_processes(iterator)
    assert list(first.indices) == [0, 1, 2, 3]
    assert len(processes) == 2 and all(p.is_alive() for p in processes)
    shutdown(iterator)
    assert not any(p.is_alive() for p in processes)
    assert worker_processes(iter(make_loader(_decode_dataset(tmp_path), batch_size=4, workers=0,
                                             pin_memory=False))) == []


def test_supervised_batches_give_every_index_once_in_order_with_failures_recorded(tmp_path):
    from pipeline.engine.threads import prefetch
    from pipeline.engine.workers import supervised_batches

    dataset = _decode_dataset(tmp_path, n=10, bad=(3, 7))
    for workers in (0, 2):
        batches = list(prefetch(supervised_batches(dataset, batch_size=4, workers=workers, timeout=30.0), depth=2))
        decoded = [int(i) for b in batches for i in b.indices]
        failed = {i: reason for b in batches for i, reason in b.failures}
        assert sorted(decoded + list(failed)) == list(range(10)), workers
        assert decoded == sorted(decoded) and set(failed) == {3, 7}
        assert all("cannot identify image file" in r or "UnidentifiedImageError" in r for r in failed.values())
        assert all(b.images.shape[1:] == (3, 16, 16) for b in batches if b.images is not None)


def test_the_plan_resolved_once_is_what_the_store_records(tmp_path, small_digits_root):
    from pipeline.engine.resolve import resolve_plan
    from pipeline.store.read import read_attrs

    config = ExtractConfig.of(data=small_digits_root, out=tmp_path / "s.h5", backbone="timm:test_resnet",
                              random_init=True, workers=0, progress=False)
    plan = resolve_plan(config)
    extract_to_store(config, backbone=plan.backbone, source=plan.source)
    attrs = read_attrs(config.out)
    assert (attrs["cache_key"], attrs["data_fingerprint"]) == (plan.key, plan.fingerprint)
    assert resolve_plan(config.replace(feature_dtype="float16")).key != plan.key  # the bytes change: so does the key
    assert resolve_plan(config.replace(compression="lzf")).key == plan.key  # the layout does not change the bytes
