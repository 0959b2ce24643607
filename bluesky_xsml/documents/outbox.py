"""Ordered, non-blocking delivery of documents to downstream callbacks.

Documents from the RunEngine thread (pass-through) and from the inference
worker (tag pages, held stops) go into one FIFO; a single delivery thread
hands them to every downstream callback in that order. The RunEngine waits at
most ``max_block`` seconds for room when more than ``max_pending`` documents
are queued; after that the document is queued anyway (nothing is dropped) and
the overrun is counted.

Delivery policy per downstream callback (see :class:`RetryPolicy`):

* **Transient errors** (the callback raised ``ConnectionError``,
  ``TimeoutError``, an ``httpx`` transport error or an HTTP 5xx/429 status
  error, e.g. a Tiled server that is down or restarting): that callback is
  *parked*. The failed document and every later one for that callback go into
  its own bounded backlog, in order; the other callbacks keep receiving
  documents live. The head of the backlog is retried with exponential backoff
  (``initial_delay`` doubling up to ``max_delay``); once it goes through, the
  backlog is drained in order and live delivery resumes. A callback therefore
  sees every document exactly in the order the RunEngine emitted it.
* **Backlog full** (``max_backlog`` documents or ``max_backlog_bytes`` of
  arrays): further documents for the parked callback are dropped, counted per
  run (``"dropped"``) and logged once per run. The oldest documents stay, so a
  run stored later is a complete prefix.
* **Writers that cannot take a document twice** (``resend_failed=False``;
  RunRouter-based writers such as bluesky-tiled-plugins' ``TiledWriter``
  keep per-run state from a call that failed, so re-sending the document
  raises or stores a row twice): the run that was being written when the
  outage hit is *abandoned* for that callback: the failed document and the
  rest of that run are counted ``"abandoned"`` for the run and not sent;
  documents of later runs are buffered and sent whole when the callback is
  reachable again. Give such a policy a ``probe`` (e.g. a GET of the Tiled
  server's ``/healthz``): it is asked before each run's ``start`` (a run that
  begins during an outage is buffered whole instead of abandoned) and before
  buffered documents are sent again.
* **Other errors** (a bug in the callback, a bad document): logged and counted
  (``"failed"``); the document is skipped for that callback only, so one bad
  document cannot wedge the catalog.
* **Exceptions that are not** ``Exception`` (``SystemExit``,
  ``KeyboardInterrupt``, ``asyncio.CancelledError`` raised by a callback):
  treated like other errors, per call: counted ``"failed"`` for that callback
  and document, logged, and delivery goes on. None of them is a real request
  to stop this process: signals are delivered to the main thread, never to
  the delivery thread.
* **The delivery thread dies anyway** (an exception outside a callback call,
  e.g. one injected asynchronously): it is supervised like the inference
  worker's thread. The document being delivered is counted ``"failed"``, the
  rest of its batch goes back to the front of the queue and a new thread takes
  over (:attr:`Outbox.restarts`); :meth:`Outbox.ensure_alive`, called by
  ``put`` and ``flush``, restarts a thread that vanished without that clean-up.
* **At close**: documents still in a backlog after ``close(timeout)`` are
  counted as ``"undelivered"`` per run and logged.

The counts are in :meth:`Outbox.losses` (per run uid) and :meth:`Outbox.backlogs`.
A callback that keeps partial state when it fails may store the document that
hit the outage twice when it is retried; callbacks should be idempotent per
document for exactly-once storage (see docs/reliability.md).

Examples
--------
>>> got = []
>>> box = Outbox([lambda name, doc: got.append(name)])
>>> box.put("start", {"uid": "r1"})
>>> box.flush(5)
True
>>> box.close()
>>> got, box.losses()
(['start'], {})
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["Outbox", "RetryPolicy", "is_transient"]

log = logging.getLogger(__name__)

DocumentCallback = Callable[[str, dict], object]

_HTTPX_TRANSIENT = {"TransportError", "TimeoutException", "NetworkError", "ConnectError",
                    "RemoteProtocolError", "ReadError", "WriteError", "PoolTimeout"}


def is_transient(err: BaseException) -> bool:
    """True for errors that mean "the destination is unreachable for now".

    ``ConnectionError`` and ``TimeoutError`` (and their subclasses), ``httpx``
    transport errors, and HTTP status errors with a 5xx or 429 status. Checked
    by class name so that ``httpx`` need not be imported.

    >>> is_transient(ConnectionRefusedError()), is_transient(ValueError())
    (True, False)
    """
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    for cls in type(err).__mro__:
        if cls.__module__.split(".")[0] in ("httpx", "httpcore"):
            if cls.__name__ in _HTTPX_TRANSIENT:
                return True
            if cls.__name__ == "HTTPStatusError":
                status = getattr(getattr(err, "response", None), "status_code", 0)
                return status >= 500 or status == 429
    return False


@dataclass
class RetryPolicy:
    """How the outbox treats a downstream callback that cannot be reached.

    Parameters
    ----------
    transient : callable
        ``transient(err) -> bool``: which errors park the callback and are
        retried (default :func:`is_transient`); any other error skips the
        document for that callback.
    max_backlog : int
        Most documents kept for one parked callback.
    max_backlog_bytes : int
        Most bytes of array data (``nbytes`` of arrays in ``data``) kept for one
        parked callback.
    initial_delay, max_delay : float
        Backoff between retries of a parked callback, in seconds.
    resend_failed : bool
        True: the document that failed is sent again (idempotent callbacks).
        False: the run it belongs to is abandoned for that callback, later
        runs are buffered (see the module docstring).
    probe : callable, optional
        ``probe() -> bool``: is the destination reachable again? Tried before
        sending buffered documents; an exception counts as False.
    """

    transient: Callable[[BaseException], bool] = is_transient
    max_backlog: int = 100_000
    max_backlog_bytes: int = 1024**3
    initial_delay: float = 0.5
    max_delay: float = 10.0
    resend_failed: bool = True
    probe: Callable[[], bool] | None = None


class _Lane:
    """Delivery state of one downstream callback."""

    def __init__(self, cb: DocumentCallback, policy: RetryPolicy):
        self.cb = cb
        self.policy = policy
        self.name = getattr(cb, "__name__", None) or type(cb).__name__
        self.backlog: collections.deque = collections.deque()  # (name, doc, run, nbytes)
        self.backlog_bytes = 0
        self.delay = 0.0
        self.next_retry = 0.0
        self.parked_since: float | None = None
        self.dropped_runs: set = set()
        self.abandoned: set = set()  # runs given up for this callback (resend_failed=False)


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
        (used for held-stop timeouts and worker supervision).
    poll_interval : float
        The delivery thread wakes this often and delivers everything queued;
        ``put`` does not wake it, so bursts cost one hand-off of the GIL.
    retry : RetryPolicy, optional
        What to do when a callback is unreachable (module docstring): the
        default for every callback; :meth:`set_retry` sets one per callback.
    """

    def __init__(self, downstream: Iterable[DocumentCallback] = (), *, max_pending: int = 10_000,
                 max_block: float = 0.5, on_idle: Callable[[], None] | None = None,
                 idle_interval: float = 0.1, poll_interval: float = 0.01,
                 retry: RetryPolicy | None = None, name: str = "xsml-outbox"):
        self.downstream: list[DocumentCallback] = list(downstream)
        self.max_pending = int(max_pending)
        self.max_block = float(max_block)
        self.retry = retry if retry is not None else RetryPolicy()
        self._queue: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._on_idle = on_idle
        self._idle_interval = idle_interval
        self._poll_interval = poll_interval
        self._closed = False
        self._in_flight = 0
        self._lanes: dict[int, _Lane] = {}
        self._policies: dict[int, tuple] = {}  # id(cb) -> (cb, RetryPolicy)
        self._doc_run: dict[str, str] = {}      # descriptor/resource uid -> run uid
        self._run_keys: dict[str, list] = {}    # run uid -> keys of _doc_run to forget at stop
        self._losses: collections.OrderedDict = collections.OrderedDict()  # run -> Counter
        self.delivered = 0
        self.downstream_errors = 0
        self.overruns = 0
        self.retries = 0
        self.restarts = 0
        self.last_error: str | None = None
        self._name = name
        self._batch: collections.deque = collections.deque()  # taken, not yet delivered
        self._restart_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._start_thread()

    # ----------------------------------------------------------- supervision
    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._supervised, name=self._name, daemon=True)
        self._thread.start()

    def _supervised(self) -> None:
        """Thread body: deliver; if the loop dies, account for its document and hand over."""
        try:
            self._run()
        except BaseException as err:
            log.critical("xsml outbox delivery thread died (%s: %s); a new thread takes over",
                         type(err).__name__, err, exc_info=True)
            with self._restart_lock:
                if self._thread is threading.current_thread():
                    self._recover(f"{type(err).__name__}")
                    self.restarts += 1
                    self._start_thread()

    def _recover(self, why: str) -> None:
        """Count the document in delivery as failed; requeue the rest of its batch."""
        with self._cond:
            batch, self._batch = self._batch, collections.deque()
            lost = batch.popleft() if batch else None
            self._queue.extendleft(reversed(batch))
            self._in_flight = 0
            self._cond.notify_all()
        if lost is not None:
            name, doc = lost
            self.downstream_errors += 1
            self.last_error = f"delivery thread died on a {name} document: {why}"
            self._lose(self._run_of(name, doc), "failed")

    def ensure_alive(self) -> bool:
        """Restart the delivery thread if it is gone; True if it had to be restarted."""
        with self._restart_lock:
            thread = self._thread
            if thread is not None and thread.is_alive():
                return False
            with self._cond:
                if self._closed and not self._queue:
                    return False
            log.error("xsml outbox delivery thread had died; restarting it")
            self._recover("vanished")
            self.restarts += 1
            self._start_thread()
            return True

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, name: str, doc: dict) -> None:
        """Queue one document; waits at most ``max_block`` s when full."""
        thread = self._thread
        if thread is not None and not thread.is_alive():
            self.ensure_alive()
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

    def set_retry(self, callback: DocumentCallback, retry: RetryPolicy) -> None:
        """Use ``retry`` instead of the outbox's default policy for ``callback``."""
        with self._cond:
            self._policies[id(callback)] = (callback, retry)
            lane = self._lanes.get(id(callback))
            if lane is not None and lane.cb is callback:
                lane.policy = retry

    # ------------------------------------------------------------- reporting
    def losses(self) -> dict[str, dict[str, int]]:
        """Documents not delivered to some callback, per run uid and kind.

        Kinds: ``"dropped"`` (backlog full), ``"failed"`` (non-transient error),
        ``"undelivered"`` (still in a backlog at close). Only runs with losses
        appear (the most recent 1000).
        """
        with self._cond:
            return {run: dict(c) for run, c in self._losses.items()}

    def backlogs(self) -> dict[str, int]:
        """Documents waiting per parked downstream callback (by name)."""
        with self._cond:
            return {lane.name: len(lane.backlog) for lane in self._lanes.values() if lane.backlog}

    def _lose(self, run: str | None, kind: str, n: int = 1) -> None:
        with self._cond:
            key = run or "<no run>"
            counter = self._losses.setdefault(key, collections.Counter())
            counter[kind] += n
            self._losses.move_to_end(key)
            while len(self._losses) > 1000:
                self._losses.popitem(last=False)

    # -------------------------------------------------------------- delivery
    def _run(self) -> None:
        last_idle = time.monotonic()
        while True:
            with self._cond:
                if not self._queue and not self._closed:
                    self._cond.wait(self._poll_interval)
                if self._closed and not self._queue:
                    return
                self._batch.extend(self._queue)
                self._queue.clear()
                self._in_flight = len(self._batch)
                self._cond.notify_all()  # room for a blocked put
                delivering = bool(self._batch)
            while self._batch:
                self._deliver(*self._batch[0])
                self._batch.popleft()
            self._retry_parked()
            if delivering:
                with self._cond:
                    self._in_flight = 0
                    self._cond.notify_all()
            now = time.monotonic()
            if self._on_idle is not None and now - last_idle >= self._idle_interval:
                last_idle = now
                try:
                    self._on_idle()
                except BaseException:
                    log.exception("xsml outbox idle hook failed")

    def _lanes_now(self) -> list[_Lane]:
        lanes = []
        for cb in list(self.downstream):
            lane = self._lanes.get(id(cb))
            if lane is None or lane.cb is not cb:
                policy = self._policies.get(id(cb), (None, self.retry))
                lane = self._lanes[id(cb)] = _Lane(
                    cb, policy[1] if policy[0] is cb else self.retry)
            lanes.append(lane)
        return lanes

    def _run_of(self, name: str, doc: dict) -> str | None:
        """The run uid a document belongs to (tracked from start/descriptor/resource)."""
        try:
            if name == "start":
                return doc.get("uid")
            if name in ("descriptor", "resource", "stream_resource"):
                run = doc.get("run_start")
                if run and doc.get("uid"):
                    self._doc_run[doc["uid"]] = run
                    self._run_keys.setdefault(run, []).append(doc["uid"])
                return run
            if name == "stop":
                run = doc.get("run_start")
                for key in self._run_keys.pop(run, []):
                    self._doc_run.pop(key, None)
                return run
            ref = (doc.get("descriptor") if name in ("event", "event_page")
                   else doc.get("resource") if name in ("datum", "datum_page")
                   else doc.get("stream_resource") if name == "stream_datum" else None)
            return self._doc_run.get(ref) if isinstance(ref, str) else None
        except Exception:  # noqa: BLE001 - malformed documents are still delivered
            return None

    def _deliver(self, name: str, doc: dict) -> None:
        run = self._run_of(name, doc)
        for lane in self._lanes_now():
            if run is not None and run in lane.abandoned:
                self._lose(run, "abandoned")
                if name == "stop":
                    lane.abandoned.discard(run)
                continue
            if lane.parked_since is None and name == "start" and not self._reachable(lane):
                self._park_lane(lane, f"its probe failed before run {run}")
            if lane.backlog or lane.parked_since is not None:  # parked: keep the order
                self._park(lane, name, doc, run)
                continue
            try:
                lane.cb(name, doc)
            except BaseException as err:  # noqa: BLE001 - SystemExit from a writer included
                self._failed(lane, name, doc, run, err)
        self.delivered += 1

    def _failed(self, lane: _Lane, name: str, doc: dict, run: str | None,
                err: BaseException) -> None:
        self.downstream_errors += 1
        self.last_error = f"{lane.name!r} on {name}: {err!r}"
        if isinstance(err, Exception) and self._is_transient(lane, err):
            self._park_lane(lane, f"{err!r} on a {name} document")
            if lane.policy.resend_failed:
                self._park(lane, name, doc, run)
            else:
                self._abandon(lane, run, 1, name)
        else:
            self._lose(run, "failed")
            log.error("downstream %s raised on a %s document of run %s; document skipped for "
                      "it", lane.name, name, run, exc_info=err)

    def _park_lane(self, lane: _Lane, why: str) -> None:
        policy = lane.policy
        lane.delay = policy.initial_delay
        lane.next_retry = time.monotonic() + lane.delay
        lane.parked_since = time.monotonic()
        log.warning("downstream %s is unreachable (%s); buffering its documents and retrying "
                    "(backoff %.1f-%.1f s, at most %d documents)", lane.name, why,
                    policy.initial_delay, policy.max_delay, policy.max_backlog)

    def _is_transient(self, lane: _Lane, err: Exception) -> bool:
        try:
            return bool(lane.policy.transient(err))
        except Exception:  # noqa: BLE001  # pragma: no cover - a broken classifier must not stop delivery
            return False

    def _park(self, lane: _Lane, name: str, doc: dict, run: str | None) -> None:
        nbytes = _array_bytes(doc)
        if (len(lane.backlog) >= lane.policy.max_backlog
                or lane.backlog_bytes + nbytes > lane.policy.max_backlog_bytes):
            self._lose(run, "dropped")
            if run not in lane.dropped_runs:
                lane.dropped_runs.add(run)
                log.error("downstream %s: backlog full (%d documents, %d bytes); dropping "
                          "documents of run %s for it (counted in losses())", lane.name,
                          len(lane.backlog), lane.backlog_bytes, run)
            return
        lane.backlog.append((name, doc, run, nbytes))
        lane.backlog_bytes += nbytes

    def _abandon(self, lane: _Lane, run: str | None, n: int, name: str) -> None:
        """Give up ``run`` for this callback (it cannot resume a run after a failure)."""
        if n:
            self._lose(run, "abandoned", n)
        if run is None:
            return
        lane.abandoned.add(run)
        kept = collections.deque()
        for item in lane.backlog:
            if item[2] == run:
                self._lose(run, "abandoned")
                lane.backlog_bytes -= item[3]
            else:
                kept.append(item)
        lane.backlog = kept
        log.error("downstream %s failed on a %s document of run %s and cannot resume that run; "
                  "the rest of the run is not sent to it (counted as 'abandoned')",
                  lane.name, name, run)

    def _reachable(self, lane: _Lane) -> bool:
        if lane.policy.probe is None:
            return True
        try:
            return bool(lane.policy.probe())
        except BaseException:  # noqa: BLE001 - a probe that raises means "not reachable"
            return False

    def _backoff(self, lane: _Lane) -> None:
        self.retries += 1
        lane.delay = min(max(lane.delay * 2, lane.policy.initial_delay), lane.policy.max_delay)
        lane.next_retry = time.monotonic() + lane.delay

    def _retry_parked(self) -> None:
        now = time.monotonic()
        for lane in list(self._lanes.values()):
            if lane.parked_since is None or now < lane.next_retry:
                continue
            if not self._reachable(lane):
                self._backoff(lane)
                continue
            delivered = 0
            while lane.backlog:
                name, doc, run, nbytes = lane.backlog[0]
                try:
                    lane.cb(name, doc)
                except BaseException as err:
                    if isinstance(err, Exception) and self._is_transient(lane, err):
                        self._backoff(lane)
                        if not lane.policy.resend_failed:
                            self._abandon(lane, run, 0, name)
                        break
                    self.downstream_errors += 1
                    self._lose(run, "failed")
                    log.error("downstream %s raised on a buffered %s document of run %s; "
                              "skipped for it", lane.name, name, run, exc_info=err)
                lane.backlog.popleft()
                lane.backlog_bytes -= nbytes
                delivered += 1
            if not lane.backlog and lane.parked_since is not None \
                    and time.monotonic() >= lane.next_retry:
                lane.backlog_bytes = 0
                lane.dropped_runs.clear()
                log.warning("downstream %s is back after %.1f s; delivered %d buffered documents",
                            lane.name, time.monotonic() - (lane.parked_since or now), delivered)
                lane.parked_since = None

    def _parked(self) -> int:
        return sum(len(lane.backlog) for lane in self._lanes.values())

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued document was delivered to every callback.

        Documents buffered for a parked callback count as not delivered yet.
        Returns False on timeout.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.ensure_alive()  # outside the condition: the supervisor takes both locks
            with self._cond:
                if not (self._queue or self._in_flight or self._parked()):
                    return True
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.05 if left is None else min(left, 0.05))

    def close(self, timeout: float | None = 10.0) -> None:
        """Deliver what is queued (retrying parked callbacks until ``timeout``), then stop.

        Documents still buffered then are counted as ``"undelivered"`` and logged.
        """
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        for lane in list(self._lanes.values()):
            if not lane.backlog:
                continue
            per_run = collections.Counter(run for _, _, run, _ in lane.backlog)
            for run, n in per_run.items():
                self._lose(run, "undelivered", n)
            log.error("downstream %s was still unreachable at close: %d documents not delivered "
                      "(per run: %s)", lane.name, len(lane.backlog), dict(per_run))
            lane.backlog.clear()
            lane.backlog_bytes = 0


def _array_bytes(doc: Any) -> int:
    """Bytes of array data a document holds in ``data`` (events and event pages)."""
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, dict):
        return 0
    total = 0
    for value in data.values():
        values = value if isinstance(value, list) else [value]
        for v in values:
            total += int(getattr(v, "nbytes", 0) or 0)
    return total
