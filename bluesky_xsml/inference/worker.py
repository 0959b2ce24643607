"""The inference worker: micro-batches frames off the RunEngine thread.

``submit`` never blocks longer than ``hand_off_timeout`` (default: not at all).
Frames wait in a queue whose inline-array memory is bounded by
``max_pending_bytes``; a frame that does not fit is turned into a skip with
reason ``"overflow"`` (counted) rather than dropped, so every frame still gets
a tag event. The worker thread collects up to ``max_batch`` frames or waits
``max_wait`` seconds, reads external frames, preprocesses, runs the model and
hands the results back through ``on_results``.

A batch the model fails on is split in halves and retried down to single
frames (this also absorbs CUDA out-of-memory errors); a frame that still fails
is skipped with reason ``"model_error"``. An unexpected error in the loop skips
that batch with reason ``"internal_error"`` and the loop goes on. If the thread
dies anyway (an exception that is not an ``Exception``, such as ``SystemExit``
raised inside the model or injected asynchronously), the frames it held are
recorded as skipped with reason ``"worker_died"`` and a new thread takes over the
queue; :meth:`InferenceWorker.ensure_alive` (called on every ``submit``, while
flushing and periodically by the tagging callback) restarts a thread that
vanished without that clean-up.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import FrameSourceError
from ..results import FrameResult
from .results import FrameItem, frames_to_results, split_value

__all__ = ["FrameJob", "InferenceWorker", "WorkerStats", "admit"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class FrameJob:
    """One event's image value (one or more frames) waiting to be tagged."""

    run_uid: str
    stream: str
    seq_num: int
    event_uid: str
    key: str
    source: Any = None            # ndarray, a zero-argument loader, or None when skipped
    skip_reason: str = ""
    nbytes: int = 0
    t_in: float = field(default_factory=time.monotonic)
    beam_center: tuple[float, float] | None = None  # (x, y) detector pixels, when known
    readout: Any = None  # a Readout when the frames are in ADU of a calibrated detector
    #: For frames in files: the :class:`~bluesky_xsml.documents.external.FrameRef` and the
    #: ``(name, document)`` pairs needed to read it elsewhere (a tagging process); ``source``
    #: reads it here.
    ref: Any = None
    ref_docs: tuple = ()


def admit(job: FrameJob, stats: WorkerStats, budget: threading.Condition, *,
          max_pending_bytes: int, overflow: str, hand_off_timeout: float) -> None:
    """Count ``job``'s inline bytes against the budget, or turn it into an ``overflow`` skip.

    With ``overflow="wait"`` the caller (the RunEngine's thread) waits at most
    ``hand_off_timeout`` for room; the job is never dropped.
    """
    with budget:
        if stats.pending_bytes + job.nbytes > max_pending_bytes and overflow == "wait":
            budget.wait_for(lambda: stats.pending_bytes + job.nbytes <= max_pending_bytes,
                            timeout=hand_off_timeout)
        if stats.pending_bytes + job.nbytes > max_pending_bytes:
            job.source, job.skip_reason, job.nbytes = None, "overflow", 0
            stats.overflow += 1
        else:
            stats.pending_bytes += job.nbytes


@dataclass
class WorkerStats:
    """Counters of the worker; read them any time."""

    submitted: int = 0
    frames_tagged: int = 0
    frames_skipped: int = 0
    skipped_by_reason: dict = field(default_factory=collections.Counter)
    overflow: int = 0
    batches: int = 0
    restarts: int = 0
    pending_bytes: int = 0
    latencies: collections.deque = field(default_factory=lambda: collections.deque(maxlen=10_000))

    def latency_percentiles(self) -> dict[str, float]:
        lat = np.asarray(self.latencies, dtype=float)
        if lat.size == 0:
            return {"p50": math.nan, "p99": math.nan}
        return {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))}


class QueuedIntake:
    """The intake both workers share: budget admission, the queue, the outstanding count.

    A subclass sets ``stats``, ``_budget`` (a ``Condition``), ``_idle`` (a
    ``Condition``), ``_queue``, ``_outstanding``, ``max_pending_bytes``,
    ``overflow`` and ``hand_off_timeout``.
    """

    def _holds_bytes(self, job: FrameJob) -> bool:
        """Whether ``job``'s frames count against the memory budget while it waits."""
        return job.source is not None and bool(job.nbytes)

    def _take(self, job: FrameJob) -> None:
        """Admit ``job`` (bounded wait), count it outstanding and queue it."""
        if self._holds_bytes(job):
            admit(job, self.stats, self._budget, max_pending_bytes=self.max_pending_bytes,
                  overflow=self.overflow, hand_off_timeout=self.hand_off_timeout)
        with self._idle:
            self._outstanding += 1
        self.stats.submitted += 1
        self._queue.put(job)

    @property
    def outstanding(self) -> int:
        """Jobs submitted whose results were not yet handed back."""
        return self._outstanding

    def _release(self, jobs: Sequence[FrameJob]) -> None:
        """Let the jobs' frames go and give their bytes back to the budget, once."""
        freed = sum(job.nbytes for job in jobs)
        for job in jobs:
            job.source = None  # let the arrays go
            job.nbytes = 0  # released once, even if a crash makes us come back here
        if freed:
            with self._budget:
                self.stats.pending_bytes -= freed
                self._budget.notify_all()


class InferenceWorker(QueuedIntake):
    """Batches frame jobs through a :class:`~bluesky_xsml.Tagger` on a thread.

    Parameters
    ----------
    tagger : Tagger
    on_results : callable
        Called from the worker thread with a list of ``(job, [FrameResult, ...])``.
    max_batch : int
        Most frames per model call.
    max_wait : float
        Seconds to wait for more frames once the first of a batch arrived.
    max_pending_bytes : int
        Memory budget for inline frames waiting in the queue.
    overflow : {"skip", "wait"}
        Over budget: skip at once, or wait up to ``hand_off_timeout`` then skip.
    hand_off_timeout : float
        Longest time ``submit`` may wait with ``overflow="wait"``.
    warmup : bool
        Compile kernels and run a first batch on the worker thread at start.
    on_inputs : callable, optional
        Called from the worker thread, before ``on_results``, with a list of
        ``(job, frame_index, input)``: the preprocessed input of each tagged frame.
    """

    def __init__(self, tagger, on_results: Callable[[list], None], *, max_batch: int = 32,
                 max_wait: float = 0.05, max_pending_bytes: int = 2 * 1024**3,
                 overflow: str = "skip", hand_off_timeout: float = 0.05, warmup: bool = True,
                 on_inputs: Callable[[list], None] | None = None):
        if overflow not in ("skip", "wait"):
            raise ValueError(f"overflow must be 'skip' or 'wait', got {overflow!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.tagger = tagger
        self.on_results = on_results
        self.on_inputs = on_inputs  # called with [(job, frame_index, preprocessed input), ...]
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait)
        self.max_pending_bytes = int(max_pending_bytes)
        self.overflow = overflow
        self.hand_off_timeout = float(hand_off_timeout)
        self.warmup = bool(warmup)
        self.stats = WorkerStats()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._budget = threading.Condition()
        self._outstanding = 0  # jobs submitted and not yet reported
        self._idle = threading.Condition()
        self._stop = threading.Event()
        self.ready = threading.Event()  # set once the warm-up is over
        self._thread: threading.Thread | None = None
        self._current: list[FrameJob] = []  # the batch the thread holds (for crash recovery)
        self._restart_lock = threading.Lock()
        self._start_thread()

    # ----------------------------------------------------------------- intake
    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._supervised, name="xsml-inference",
                                        daemon=True)
        self._thread.start()

    def _supervised(self) -> None:
        """Thread body: run the loop; if it dies, account for its batch and hand over."""
        try:
            self._loop()
        except BaseException as err:  # the thread is dying either way
            log.critical("xsml inference thread died (%s: %s); frames it held are skipped "
                         "and a new thread takes over", type(err).__name__, err, exc_info=True)
            self._account_lost_batch(f"worker_died: {type(err).__name__}")
            with self._restart_lock:
                if not self._stop.is_set() and self._thread is threading.current_thread():
                    self.stats.restarts += 1
                    self._start_thread()

    def ensure_alive(self) -> bool:
        """Restart the worker thread if it is gone; True if it had to be restarted."""
        with self._restart_lock:
            thread = self._thread
            if self._stop.is_set() or (thread is not None and thread.is_alive()):
                return False
            log.error("xsml inference thread had died; restarting it")
            self.stats.restarts += 1
            self._account_lost_batch("worker_died")
            self._start_thread()
            return True

    def _account_lost_batch(self, reason: str) -> None:
        """Report the jobs of a batch whose thread died as skipped with ``reason``."""
        with self._idle:
            batch, self._current = self._current, []
        if not batch:
            return
        self._deliver(batch, [(job, [self._skip(job, 0, reason)]) for job in batch])

    def _deliver(self, batch: Sequence[FrameJob], out: list) -> None:
        """Free ``batch``'s memory, hand ``out`` to ``on_results``, count the batch as done."""
        self._release(batch)
        try:
            self.on_results(out)
        except Exception:
            log.exception("xsml result handler failed")
        finally:
            with self._idle:
                if self._current is batch:
                    self._current = []
                self._outstanding -= len(batch)
                self._idle.notify_all()

    def submit(self, job: FrameJob) -> None:
        """Queue ``job``; bounded wait, never raises for a full queue."""
        self.ensure_alive()
        self._take(job)

    # ------------------------------------------------------------------- loop
    def _next_batch(self) -> list[FrameJob]:
        """Block for the first job, then sleep once for ``max_wait`` and drain.

        One wake-up per batch rather than per frame keeps GIL hand-offs with
        the RunEngine thread rare.
        """
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return []
        batch = self._current = [first]  # held here until reported (crash recovery)
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, 0.01))
        return batch

    def _loop(self) -> None:
        if self.warmup:
            self.warmup = False  # once: a restarted thread must not crash-loop in warm-up
            try:  # compile the preprocessing kernels before the first real frame
                self.tagger.warmup()
            except Exception:
                log.exception("xsml tagger warm-up failed (tagging goes on)")
        self.ready.set()
        while not self._stop.is_set():
            batch = self._next_batch()
            if not batch:
                continue
            try:
                out = self._process(batch)
            except Exception as err:  # keep the loop alive whatever happens
                log.exception("xsml inference batch failed")
                out = [(job, [self._skip(job, 0, f"internal_error: {type(err).__name__}")])
                       for job in batch]
            self._deliver(batch, out)

    def _skip(self, job: FrameJob, index: int, reason: str) -> FrameResult:
        self.stats.frames_skipped += 1
        self.stats.skipped_by_reason[reason.split(":")[0]] += 1
        return FrameResult(stream=job.stream, seq_num=job.seq_num, event_uid=job.event_uid,
                           key=job.key, frame_index=index, probs=None, skip_reason=reason,
                           checkpoint=self.tagger.checkpoint_id,
                           latency=time.monotonic() - job.t_in)

    def _process(self, batch: list[FrameJob]) -> list:
        """Read, split and tag the frames of ``batch``: ``[(job, [FrameResult, ...]), ...]``."""
        items: list[FrameItem] = []
        for job in batch:
            ident = dict(stream=job.stream, seq_num=job.seq_num, event_uid=job.event_uid,
                         key=job.key, beam_center=job.beam_center, readout=job.readout,
                         t_in=job.t_in, owner=job)
            if job.source is None:
                items.append(FrameItem(skip_reason=job.skip_reason or "no_data", **ident))
                continue
            try:
                value = job.source() if callable(job.source) else job.source
            except FrameSourceError as err:
                items.append(FrameItem(skip_reason=f"{err.reason}: {err}", **ident))
                continue
            except Exception as err:  # noqa: BLE001 - any read failure is the frame's skip
                items.append(FrameItem(skip_reason=f"read_error: {type(err).__name__}: {err}",
                                       **ident))
                continue
            items.extend(split_value(value, **ident))
        on_inputs = None
        if self.on_inputs is not None:
            def on_inputs(rows):
                self.on_inputs([(item.owner, item.frame_index, x) for item, x in rows])
        results = frames_to_results(self.tagger, items, analyse=True, on_inputs=on_inputs)
        per_job: dict[int, list] = {id(job): [] for job in batch}
        for item, r in zip(items, results, strict=True):
            per_job[id(item.owner)].append(r)
            if r.skip_reason:
                self.stats.frames_skipped += 1
                self.stats.skipped_by_reason[r.skip_reason.split(":")[0]] += 1
            else:
                self.stats.frames_tagged += 1
                self.stats.latencies.append(r.latency)
        self.stats.batches += 1
        return [(job, per_job[id(job)]) for job in batch]

    # ------------------------------------------------------------ lifecycle
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job was handed back; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.ensure_alive()  # a dead thread would never drain the queue
            left = None if deadline is None else deadline - time.monotonic()
            step = 0.5 if left is None else max(0.0, min(left, 0.5))
            with self._idle:
                if self._idle.wait_for(lambda: self._outstanding == 0, timeout=step):
                    return True
            if left is not None and left <= step:
                return False

    def close(self, timeout: float = 10.0) -> None:
        self.flush(timeout)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
