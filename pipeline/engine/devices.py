"""Devices: `auto`, `cpu`, `cuda`, `cuda:N`, resolved and checked before any work (torch imported only here)."""

from __future__ import annotations

import torch

from pipeline.errors import PipelineError


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when available, else CPU; asking for CUDA without one is an error, not a fallback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise PipelineError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"--device {device} was asked for but no CUDA device is available; use --device cpu")
    if resolved.type not in ("cpu", "cuda"):
        raise PipelineError(f"--device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise PipelineError(f"--device {device} was asked for but there are only {torch.cuda.device_count()} CUDA "
                            "device(s); use cuda:0 .. cuda:N-1")
    return resolved
