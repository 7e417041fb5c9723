"""Judging in a background thread, overlapped with generation.

The generator hands each finished batch to `JudgingWorker.submit` (it fits the engine's ``on_batch``
callback) and goes straight on sampling the next batch; a thread feeds the batch to every metric. On a GPU
the judges (onnxruntime, torch) release the GIL while they compute, so judging costs no extra wall time.
The queue is bounded: if the judges fall behind, ``submit`` blocks instead of piling up images in memory.

A failure inside the thread is not lost: the next ``submit`` or ``close`` re-raises it in the caller's
thread (same exception object, so a `DuobenchError` still reaches the CLI as one clean message). After a
failure the thread keeps draining the queue, so a producer blocked on a full queue can never deadlock.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from typing import Any

from PIL import Image

from duobench.metrics.base import StreamingMetric

DEFAULT_MAX_PENDING_BATCHES = 4
_STOP = object()


class JudgingWorker:
    """Feeds submitted batches to ``metrics`` in a background thread; ``close()`` returns the audit rows.

    ``in_background=False`` judges each batch in the caller's thread instead, behind the same interface: on a
    CPU the judge and the sampler would compete for the same cores and torch thread pool (on 2 cores the
    background thread made generate-and-judge 2x slower, `benchmarks/judged_generation.py`).
    """

    def __init__(
        self,
        metrics: Sequence[StreamingMetric],
        max_pending_batches: int = DEFAULT_MAX_PENDING_BATCHES,
        in_background: bool = True,
    ) -> None:
        self.metrics = list(metrics)
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending_batches)
        self._error: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        if in_background:
            self._thread = threading.Thread(target=self._run, name="duobench-judging", daemon=True)
            self._thread.start()

    def submit(self, items: Sequence[Any], images: Sequence[Image.Image], **update_kwargs: Any) -> None:
        """Queue one batch (blocks while the queue is full); raises the worker's error if it has failed."""
        self._raise_if_failed()
        if self._closed:
            raise RuntimeError("JudgingWorker.submit after close()")
        if self._thread is None:
            self._feed(list(items), list(images), update_kwargs)
        else:
            self._queue.put((list(items), list(images), update_kwargs))

    def close(self) -> list[dict[str, Any]]:
        """Wait for every queued batch, re-raise a worker failure, and return all metrics' audit rows."""
        if not self._closed:
            self._stop()
        self._raise_if_failed()
        return [row for metric in self.metrics for row in metric.audit_rows()]

    def __enter__(self) -> JudgingWorker:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
            return
        # The caller is already failing: stop the thread, but let the caller's exception win.
        self._stop()

    def _stop(self) -> None:
        self._closed = True
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            task = self._queue.get()
            if task is _STOP:
                return
            if self._error is not None:
                continue
            try:
                self._feed(*task)
            except BaseException as error:  # handed to the caller's thread by submit()/close()
                self._error = error

    def _feed(self, items: list[Any], images: list[Image.Image], update_kwargs: dict[str, Any]) -> None:
        for metric in self.metrics:
            metric.update(images, items, **update_kwargs)
