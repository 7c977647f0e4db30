"""Items made ahead on a background thread: the next batch is read and decoded while the caller works on this one."""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

_DONE = object()


def prefetched(items: Iterator, depth: int, name: str = "prefetch") -> Iterator:
    """Iterate `items`, advanced on a thread of its own up to `depth` items ahead of the caller (a generator's body
    runs on that thread). An exception in it is raised here, at the item where it happened. Closing this iterator,
    or leaving a loop over it, stops the thread and closes `items` before returning."""
    ready: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(item) -> bool:
        """Queue an item unless the consumer has stopped; False when it has."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as exc:        # handed to the consumer, raised there
            put(exc)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=produce, name=name, daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()
