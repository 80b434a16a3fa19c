"""A Pillow plugin for tests: a file starting with b"CRASHIMG" kills the process decoding it with SIGSEGV (as a bug
in a C decoder would), and one starting with b"HANGIMG!" never finishes decoding. Loaded with --image-plugin."""

from __future__ import annotations

import os
import signal
import time

from PIL import Image, ImageFile

CRASH = b"CRASHIMG"
HANG = b"HANGIMG!"


class BadImageFile(ImageFile.ImageFile):
    format = "BADTEST"
    format_description = "test image whose decoder crashes or hangs"

    def _open(self) -> None:
        self.behaviour = "crash" if self.fp.read(8) == CRASH else "hang"
        self._size = (16, 16)
        self._mode = "RGB"
        self.tile = []

    def load(self):
        if self.behaviour == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(3600)


Image.register_open(BadImageFile.format, BadImageFile, lambda prefix: prefix[:8] in (CRASH, HANG))
