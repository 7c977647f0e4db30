"""Background threads' CUDA work kept out of a CUDA graph capture: one guard for training and prediction."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class CaptureGuard:
    """Keeps background threads' CUDA calls out of a CUDA graph being captured on another thread.

    Threads that use CUDA in the background (predict.py's decoding, drawing and encoding; train.py's
    evaluation) enter `using()`; any number of them at once. The thread about to capture enters `capturing()`:
    it waits until no one is using, and no one starts meanwhile (a plain lock would also make the background
    threads wait for each other).
    """

    def __init__(self):
        self._changed = threading.Condition()
        self._users = 0
        self._capturing = False

    @contextmanager
    def using(self) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: not self._capturing)
            self._users += 1
        try:
            yield
        finally:
            with self._changed:
                self._users -= 1
                self._changed.notify_all()

    @contextmanager
    def capturing(self) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: not self._capturing)
            self._capturing = True            # from here no new user starts
            self._changed.wait_for(lambda: self._users == 0)
        try:
            yield
        finally:
            with self._changed:
                self._capturing = False
                self._changed.notify_all()
