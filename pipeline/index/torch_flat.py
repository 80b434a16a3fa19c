"""Exact inner-product top-k in torch, for kNN on a GPU: FAISS's flat search (`IndexFlatIP`) computed as matrix
products on the device, in float32 (TF32 off, so the similarities are FAISS's to rounding), a bounded block of
queries x bank rows at a time. The results have FAISS's form: similarities best first, bank row numbers; exact ties
go to the lower row (FAISS orders them its own way). faiss-cpu has no GPU search; this one needs nothing but torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

SIMILARITY_BYTES = 1 << 30  # one block of query x bank similarities on the device (float32)
BANK_STEP = 1 << 16  # bank rows per matrix product


@contextlib.contextmanager
def _full_fp32() -> Iterator[None]:
    """float32 products as FAISS computes them: no TF32 (it rounds inputs to 10 bits), whatever the process set."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _on_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Rows on the device as float32 (a float16 store's rows travel as float16, half the copy)."""
    return torch.as_tensor(np.ascontiguousarray(array)).to(device, non_blocking=False).float()


def _ties_to_lower_row(sims: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """torch.topk orders equal similarities arbitrarily: the lower row first, so that a run repeats itself."""
    order = np.lexsort((idx, -sims), axis=1)
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(idx, order, axis=1)


def _bank_on_device(bank: np.ndarray, device: torch.device, step: int) -> list[torch.Tensor] | None:
    """The bank's slices kept on the device when they fit half its free memory (None: copied per query block)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if 4 * bank.size > free // 2:
            return None
    return [_on_device(bank[b:b + step], device) for b in range(0, len(bank), step)]


def torch_top_k(bank: np.ndarray, queries: np.ndarray, k: int, device: torch.device | str,
                *, similarity_bytes: int = SIMILARITY_BYTES, bank_step: int = BANK_STEP
                ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (similarities float32 [Q, k], bank rows int64 [Q, k]) of each query's inner products with the
    bank's rows, on `device`; k is cut to the bank's size."""
    device = torch.device(device)
    k = min(k, len(bank))
    sims = np.empty((len(queries), k), np.float32)
    idx = np.empty((len(queries), k), np.int64)
    if k == 0 or len(queries) == 0:
        return sims, idx
    step = min(bank_step, len(bank))
    per_block = max(1, similarity_bytes // (4 * step))
    with _full_fp32(), torch.no_grad():
        resident = _bank_on_device(bank, device, step)
        for q0 in range(0, len(queries), per_block):
            q = _on_device(queries[q0:q0 + per_block], device)
            best_s = best_i = None
            for n, b0 in enumerate(range(0, len(bank), step)):
                chunk = resident[n] if resident is not None else _on_device(bank[b0:b0 + step], device)
                s, i = torch.topk(q @ chunk.T, min(k, len(chunk)), dim=1)
                i = i + b0
                if best_s is not None:
                    s, j = torch.topk(torch.cat([best_s, s], dim=1), k, dim=1)
                    i = torch.gather(torch.cat([best_i, i], dim=1), 1, j)
                best_s, best_i = s, i
            sims[q0:q0 + len(q)], idx[q0:q0 + len(q)] = _ties_to_lower_row(best_s.cpu().numpy(), best_i.cpu().numpy())
    return sims, idx

