"""Weights: what a loader returns (`Loaded`), content hashes of weight files, seeded random initialisation, and
strict loading of a local checkpoint (`--weights`): state dicts only (no pickled code), every key and shape checked."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import PipelineError

RANDOM_INIT_SEED = 0


@dataclass(frozen=True)
class Loaded:
    """What a loader returns: the network, its library, the eval data config (timm keys), and the weights id."""

    net: torch.nn.Module
    library: str
    data_config: dict
    weights: str
    transform: Callable | None = None  # None: timm's create_transform(**data_config)


@functools.lru_cache(maxsize=32)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, cached per (path, mtime, size) for the life of the process."""
    stat = Path(path).stat()
    return _sha256(str(path), stat.st_mtime_ns, stat.st_size)


def map_state_dict_in_order(model: torch.nn.Module, source: dict[str, torch.Tensor], origin: str) -> dict:
    """Map a checkpoint onto a model whose keys differ only in names, in order, checking every shape."""
    target = model.state_dict()
    if len(source) != len(target):
        raise PipelineError(f"{origin} has {len(source)} tensors but the model expects {len(target)}; wrong file?")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise PipelineError(
                f"{origin}: tensor {src_key} has shape {tuple(tensor.shape)} but {dst_key} needs "
                f"{tuple(expected.shape)}; the checkpoint does not fit this architecture"
            )
        mapped[dst_key] = tensor
    return mapped


def seeded_model(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a randomly initialised model reproducibly without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return factory()


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PipelineError(f"--weights {path} does not exist; pass a .pth, .pt, .bin or .safetensors file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt or pickled-code files: same actionable message
        raise PipelineError(f"cannot read --weights {path} ({type(exc).__name__}); pass a state dict saved with "
                            "torch.save or safetensors") from exc
    for key in ("state_dict", "model", "model_state_dict"):  # common training-checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise PipelineError(f"--weights {path} holds a {type(state).__name__}, not a state dict")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (" ..." if len(keys) > n else "")


def load_weights_file(net: torch.nn.Module, path: str | Path) -> str:
    """Load a local checkpoint strictly; missing, unexpected or mis-shaped keys are listed in the error."""
    path = Path(path)
    state = _read_checkpoint(path)
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        raise PipelineError(f"--weights {path} does not fit this architecture: {len(missing)} missing keys "
                            f"({_few(missing)}); {len(unexpected)} unexpected keys ({_few(unexpected)}); "
                            f"{len(shapes)} mis-shaped ({_few(shapes, 2)})")
    net.load_state_dict(state, strict=True)
    return f"file:{path.name}:sha256:{file_sha256(path)}"
