"""Hand-offs between the extraction loop and helper threads: decoding ahead of the model (`prefetch`) and writing
behind it (`BackgroundWriter`), so that the model waits neither on decoding nor on disk. A helper's error is
re-raised in the loop."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any


class _Background:
    """A bounded hand-off between the loop and one helper thread, with the helper's errors re-raised in the loop.

    Used twice: to decode batches ahead of the model (when there are no worker processes), and to write batches to
    the store behind it, so that the model waits neither on decoding nor on disk.
    """

    _DONE = object()

    def __init__(self, depth: int) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.stopped = threading.Event()

    def put(self, item: object) -> bool:
        """Hand an item over unless the other side stopped; False when it did."""
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> object:
        while True:
            try:
                return self.queue.get(timeout=0.1)
            except queue.Empty:
                if self.stopped.is_set() and self.queue.empty():
                    return self._DONE


def prefetch(batches: Iterable[Any], *, depth: int = 2) -> Iterator[Any]:
    """Iterate `batches` in a background thread, `depth` batches ahead (decoding and resizing release the GIL)."""
    hand = _Background(depth)

    def produce() -> None:
        try:
            for batch in batches:
                if not hand.put(batch):
                    return
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread
            hand.error = exc
        finally:
            hand.stopped.set()

    thread = threading.Thread(target=produce, name="decode", daemon=True)
    thread.start()
    try:
        while (item := hand.get()) is not _Background._DONE:
            yield item
        if hand.error is not None:
            raise hand.error
    finally:
        hand.stopped.set()
        thread.join()


class BackgroundWriter:
    """Runs `write(batch, features)` calls in one thread, in order, at most `depth` batches behind the model."""

    def __init__(self, write: Callable[..., None], *, depth: int = 4) -> None:
        self._write = write
        self._hand = _Background(depth)
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while (item := self._hand.get()) is not _Background._DONE:
                self._write(*item)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the loop
            self._hand.error = exc
            self._hand.stopped.set()

    def submit(self, batch: Any, *outputs: Any) -> None:
        if not self._hand.put((batch, *outputs)) and self._hand.error is not None:
            raise self._hand.error

    def close(self) -> None:
        """Wait for every submitted batch to be written; re-raise the writer's error, if any."""
        self._hand.stopped.set()
        self._thread.join()
        if self._hand.error is not None:
            raise self._hand.error
