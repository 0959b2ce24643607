"""Ordered, non-blocking delivery of documents to downstream callbacks.

Documents from the RunEngine thread (pass-through) and from the inference
worker (tag pages, held stops) go into one FIFO; a single delivery thread
hands them to every downstream callback in that order. A downstream callback
that raises is logged and counted, and the document still reaches the others;
a slow one delays only this thread. The RunEngine waits at most
``max_block`` seconds for room when more than ``max_pending`` documents are
queued; after that the document is queued anyway (nothing is dropped) and the
overrun is counted.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable, Iterable

__all__ = ["Outbox"]

log = logging.getLogger(__name__)

DocumentCallback = Callable[[str, dict], object]


class Outbox:
    """A delivery thread in front of downstream callbacks.

    Parameters
    ----------
    downstream : iterable of callables
        ``cb(name, doc)`` callables, called in order for each document.
    max_pending : int
        Soft bound on queued documents.
    max_block : float
        Longest time ``put`` waits for room, in seconds.
    on_idle : callable, optional
        Called about every ``idle_interval`` seconds from the delivery thread
        (used for held-stop timeouts).
    poll_interval : float
        The delivery thread wakes this often and delivers everything queued;
        ``put`` does not wake it, so bursts cost one hand-off of the GIL.
    """

    def __init__(self, downstream: Iterable[DocumentCallback] = (), *, max_pending: int = 10_000,
                 max_block: float = 0.5, on_idle: Callable[[], None] | None = None,
                 idle_interval: float = 0.1, poll_interval: float = 0.01,
                 name: str = "xsml-outbox"):
        self.downstream: list[DocumentCallback] = list(downstream)
        self.max_pending = int(max_pending)
        self.max_block = float(max_block)
        self._queue: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._on_idle = on_idle
        self._idle_interval = idle_interval
        self._poll_interval = poll_interval
        self._closed = False
        self._in_flight = 0
        self.delivered = 0
        self.downstream_errors = 0
        self.overruns = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, name: str, doc: dict) -> None:
        """Queue one document; waits at most ``max_block`` s when full."""
        with self._cond:
            if len(self._queue) >= self.max_pending:
                deadline = time.monotonic() + self.max_block
                while len(self._queue) >= self.max_pending and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.overruns += 1
                        break
                    self._cond.wait(left)
            self._queue.append((name, doc))
            # no notify: the delivery thread polls, so a burst of documents
            # costs one wake-up instead of one per document

    def _run(self) -> None:
        last_idle = time.monotonic()
        while True:
            with self._cond:
                if not self._queue and not self._closed:
                    self._cond.wait(self._poll_interval)
                if self._closed and not self._queue:
                    return
                items = list(self._queue)
                self._queue.clear()
                self._in_flight = len(items)
                self._cond.notify_all()  # room for a blocked put
            for item in items:
                self._deliver(*item)
            if items:
                with self._cond:
                    self._in_flight = 0
                    self._cond.notify_all()
            now = time.monotonic()
            if self._on_idle is not None and now - last_idle >= self._idle_interval:
                last_idle = now
                try:
                    self._on_idle()
                except Exception:  # never let a housekeeping error stop delivery
                    log.exception("xsml outbox idle hook failed")

    def _deliver(self, name: str, doc: dict) -> None:
        for cb in list(self.downstream):
            try:
                cb(name, doc)
            except Exception as err:
                self.downstream_errors += 1
                self.last_error = f"{getattr(cb, '__name__', cb)!r} on {name}: {err!r}"
                log.exception("downstream callback %r raised on %r document", cb, name)
        self.delivered += 1

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued document was delivered; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._in_flight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.05 if left is None else min(left, 0.05))
        return True

    def close(self, timeout: float | None = 10.0) -> None:
        """Deliver what is queued, then stop the thread."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
