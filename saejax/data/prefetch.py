"""Reading upcoming steps' data on a background thread, with errors handed to the loop."""

from __future__ import annotations

import queue
import threading


class Prefetcher:
    """Builds the batches of upcoming steps (host rows or global arrays) in a background thread.

    An exception raised while building a batch is re-raised by `next` (instead of leaving the
    loop waiting forever); `close` stops the thread when the loop ends early."""

    def __init__(self, make_batch, start: int, stop: int, depth: int = 2):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make_batch, start, stop),
                                        daemon=True)
        self._thread.start()

    def _run(self, make_batch, start: int, stop: int) -> None:
        for s in range(start, stop):
            try:
                item = (make_batch(s), None)
            except BaseException as e:  # handed to the consumer
                item = (None, e)
            while not self._stop.is_set():
                try:
                    self._q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass
            if item[1] is not None or self._stop.is_set():
                return

    def next(self):
        batch, error = self._q.get()
        if error is not None:
            raise error
        return batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
