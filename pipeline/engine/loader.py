"""torch's DataLoader as the decode stage: workers from a forkserver that has the decoders imported (forking a
threaded process can deadlock), workers that exit with the main process, and the one place that touches the
DataLoader's private attributes.

`worker_processes` and `shutdown` below use `_workers` and `_shutdown_workers` of the multi-process iterator: torch
offers no public way to see or stop a loader's workers. Checked against torch 2.14.1; `tests/test_engine.py` and
`tests/test_bad_inputs.py` (a decoder that segfaults and one that hangs) fail if a new torch moves them.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from pipeline.engine.decode import ImageDataset, collate_batch


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # killed but not yet reaped: a zombie still answers kill(pid, 0)
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _init_worker(main_pid: int, ready: object, worker_id: int) -> None:
    """Worker init: exit with the main process (below), then count this worker as ready (`ready`: a shared counter,
    so that the decode watchdog does not count a worker's start-up as decoding time)."""
    _exit_with_main_process(main_pid, worker_id)
    if ready is not None:
        with ready.get_lock():
            ready.value += 1


def _exit_with_main_process(main_pid: int, _worker_id: int) -> None:
    """Worker init: exit when the main process is gone. A forkserver worker's parent is the forkserver, which lives
    as long as its workers do, so after a SIGKILL of the main process PyTorch's own parent check never fires and
    the worker and forkserver would linger forever."""

    def watch() -> None:
        while not _process_gone(main_pid):
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="main-process-watch", daemon=True).start()


_PRELOAD = ["torch", "PIL.Image", "pipeline.engine.decode", "pipeline.sources.base", "pipeline.sources.tar",
            "pipeline.sources.torchvision"]


def make_loader(dataset: Any, *, batch_size: int, workers: int, pin_memory: bool,
                prefetch_factor: int = 4, ready: object = None) -> torch.utils.data.DataLoader:
    """A DataLoader in dataset order. Workers come from a forkserver (forking a threaded process can deadlock) that
    has torch and the decoders imported already, so a worker starts in milliseconds, not seconds. `ready`: a shared
    counter (`forkserver_context().Value("i", 0)`) each worker increments once it has started."""
    context = None
    if workers > 0:
        context = forkserver_context()
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_batch,
        pin_memory=pin_memory,
        multiprocessing_context=context,
        prefetch_factor=prefetch_factor if workers > 0 else None,
        worker_init_fn=functools.partial(_init_worker, os.getpid(), ready) if workers > 0 else None,
    )


def forkserver_context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)  # no effect once the server runs, which is fine
    return context


class _View(torch.utils.data.Dataset):
    """Some indices of an ImageDataset, in a given order; items keep the dataset's own indices."""

    def __init__(self, dataset: ImageDataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple:
        return self.dataset[int(self.indices[j])]


def worker_processes(iterator: Any) -> list:
    """The worker processes of a DataLoader iterator (none for a single-process loader). torch-private."""
    return list(getattr(iterator, "_workers", []))


def shutdown(iterator: Any) -> None:
    """Stop a DataLoader iterator's workers now. torch-private."""
    stop = getattr(iterator, "_shutdown_workers", None)
    if stop is not None:
        stop()
