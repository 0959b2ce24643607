"""Tagging in a process of its own: the RunEngine's process never runs the model.

:class:`ProcessInferenceWorker` has the interface of
:class:`~bluesky_xsml.inference.worker.InferenceWorker` (``submit``, ``flush``,
``close``, ``ensure_alive``, ``ready``, ``stats``), so
:class:`~bluesky_xsml.TaggingCallback` uses either; ``TaggingCallback(...,
isolation="process")`` picks this one. The model, the preprocessing, file
reads and (on a GPU) the CUDA context live in a *spawned* child process at low
CPU priority (``SCHED_IDLE`` by default); this module does not import torch.

How frames cross
    Inline arrays: by default (``frame_transport="ring"``) a feeder thread
    here copies each into a ring of shared-memory slots (numpy's copy
    releases the GIL) and the child copies it out and frees the slot at once;
    a frame larger than a slot crosses through the pipe. With
    ``frame_transport="peer"`` (or ``"auto"``, which falls back to the ring
    where the kernel refuses) the child reads each frame straight out of this
    process's memory (``process_vm_readv``) while this process holds the
    array, so this process makes no copy; it needs the child allowed to trace
    this process (``PR_SET_PTRACER``), and it measured slower in wall time
    than the ring on 2 cores (docs/benchmarks.md), so it is opt-in.
    Frames in files cross *by reference*
    (the :class:`~bluesky_xsml.documents.external.FrameRef` and the
    resource/datum documents it needs): the child opens the files, the
    RunEngine's process never does.

Faults
    If the child dies (SIGKILL, a segfault, the out-of-memory killer), stops
    sending heartbeats for ``heartbeat_timeout`` seconds, or holds frames
    without returning any result for ``progress_timeout`` seconds, it is killed
    if need be; the frames it held are recorded as skipped (reason
    ``tagger_process_died`` or ``tagger_process_hung``), a new child is
    started on the same checkpoint, and the frames still waiting are tagged
    by it. After ``max_restarts`` restarts within ``restart_window`` seconds
    it stops restarting and every later frame is skipped with reason
    ``tagger_process_unavailable``: every frame is still accounted for.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..readout import Readout, RunReadoutCache
from ..results import FrameResult
from .child_process import ChildProcess, SharedRing
from .remote import RemoteDevice, RemoteFineTuner, RemoteRegistry, RemoteTagger
from .worker import FrameJob, QueuedIntake, WorkerStats

# their names before they moved to .child_process and .remote
_ChildProcess, _SharedRing, _Device = ChildProcess, SharedRing, RemoteDevice

__all__ = ["ProcessInferenceWorker", "ProcessOptions", "RemoteFineTuner", "RemoteRegistry",
           "RemoteTagger", "TaggerProcessError"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessOptions:
    """How the tagging process is run.

    Attributes
    ----------
    priority : {"idle", "normal"} or int
        ``"idle"``: ``SCHED_IDLE`` (falls back to nice 19); an int: a nice
        increment.
    threads : int, optional
        Torch and preprocessing threads in the child (default: all cores; at
        idle priority they only use what the RunEngine leaves).
    slots, slot_bytes : int
        The shared-memory ring: ``slots`` buffers of ``slot_bytes`` each
        (default 16 x 8 MiB, a 2048 x 1024 uint32 frame per slot).
    heartbeat_timeout : float
        Seconds without a heartbeat before the child counts as hung.
    progress_timeout : float
        Seconds the child may hold frames without returning any result.
    start_timeout : float
        Seconds to wait for a new child to load its model.
    max_restarts, restart_window : int, float
        Crash-loop guard: restarts allowed within the window.
    device, precision : str, optional
        Passed to :meth:`Tagger.load` in the child.
    send_inputs : bool
        Allow each frame's preprocessed input (float16, 192 KiB) to be sent
        back; it is sent only while the callback has input listeners of its
        own (``TaggingCallback.add_input_listener``). The label cache and the
        service's thumbnails do not need it: the inputs stay in the tagging
        process's label cache.
    frame_transport : {"auto", "peer", "ring"}
        How inline frames cross. ``"peer"``: the tagging process copies each
        frame straight out of this process's memory (``process_vm_readv``),
        so this process makes no copy at all; the array is held (and counted
        against ``max_pending_bytes``) until the tagging process has it.
        ``"ring"`` (default): a feeder thread here copies it into the shared
        ring. ``"auto"`` uses ``"peer"`` where the kernel allows the read
        (same user; Yama ``ptrace_scope`` 0 or 1) and ``"ring"`` elsewhere;
        so does ``"peer"``, which also logs the fallback. ``"peer"`` lets the
        tagging process trace this one (``PR_SET_PTRACER``): choose it only
        where that is acceptable; on 2 CPU cores it cost less CPU here but
        measured slower than the ring (docs/benchmarks.md).
    """

    priority: str | int | None = "idle"
    threads: int | None = None
    slots: int = 16
    slot_bytes: int = 8 * 1024**2
    heartbeat_timeout: float = 10.0
    progress_timeout: float = 120.0
    start_timeout: float = 180.0
    max_restarts: int = 5
    restart_window: float = 300.0
    device: str | None = None
    precision: str | None = None
    send_inputs: bool = True
    frame_transport: str = "ring"

    def __post_init__(self) -> None:
        if self.frame_transport not in ("auto", "peer", "ring"):
            raise ValueError(f"frame_transport must be 'auto', 'peer' or 'ring', got "
                             f"{self.frame_transport!r}")
        if self.slots < 1 or self.slot_bytes < 1024:
            raise ValueError(f"need slots >= 1 and slot_bytes >= 1024; got {self.slots}, "
                             f"{self.slot_bytes}")
        for name in ("heartbeat_timeout", "progress_timeout", "start_timeout", "restart_window"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")


class TaggerProcessError(RuntimeError):
    """The tagging process could not be started."""


class ProcessInferenceWorker(QueuedIntake):
    """Tags frame jobs in a spawned process; the interface of ``InferenceWorker``.

    Parameters
    ----------
    checkpoint : str or path, optional
        The checkpoint the child loads (``None``: the packaged default).
    on_results : callable
        Called from a link thread with a list of ``(job, [FrameResult, ...])``.
    max_batch, max_wait : int, float
        Micro-batching in the child.
    max_pending_bytes, overflow, hand_off_timeout
        The memory budget of inline frames waiting on this side, as for
        :class:`InferenceWorker`.
    warmup : bool
        Compile the child's kernels before its first frame.
    on_inputs : callable, optional
        Called with ``[(job, frame_index, input)]`` (float16 inputs) while
        :meth:`want_inputs` is on.
    label_cache_size : int
        Frames whose inputs the tagging process keeps for labels after the
        fact (its :class:`~bluesky_xsml.frame_cache.FrameCache`); reached
        with :meth:`call` (``"child"``: ``label_frame``, ``label_declared``,
        ``suggest_labels``, ``cached_input``). A restart loses them.
    external_options : dict, optional
        Keyword arguments of the child's
        :class:`~bluesky_xsml.documents.external.ExternalFrames`.
    options : ProcessOptions, optional
    """

    def __init__(self, checkpoint, on_results: Callable[[list], None], *, max_batch: int = 32,
                 max_wait: float = 0.05, max_pending_bytes: int = 2 * 1024**3,
                 overflow: str = "skip", hand_off_timeout: float = 0.05, warmup: bool = True,
                 on_inputs: Callable[[list], None] | None = None,
                 label_cache_size: int = 0,
                 external_options: dict | None = None,
                 options: ProcessOptions | None = None):
        if overflow not in ("skip", "wait"):
            raise ValueError(f"overflow must be 'skip' or 'wait', got {overflow!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.options = options or ProcessOptions()
        self.checkpoint = None if checkpoint is None else os.fspath(checkpoint)
        self.on_results = on_results
        self.on_inputs = on_inputs
        self.label_cache_size = int(label_cache_size)
        self._want_inputs = False  # inputs cross only while someone here listens
        # each run's readout converted to its plain form once, not per frame
        self._readouts = RunReadoutCache(Readout.to_dict)
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait)
        self.max_pending_bytes = int(max_pending_bytes)
        self.overflow = overflow
        self.hand_off_timeout = float(hand_off_timeout)
        self.warmup = bool(warmup)
        self.external_options = dict(external_options or {})
        self.stats = WorkerStats()
        self.ready = threading.Event()
        self.process_starts = 0
        self.process_faults: collections.Counter = collections.Counter()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._budget = threading.Condition()
        self._idle = threading.Condition()
        self._outstanding = 0
        self._stop = threading.Event()
        self._ids = itertools.count()
        self._in_flight: dict[int, FrameJob] = {}
        self._lock = threading.RLock()  # guards the link, the slots and _in_flight
        self._slots_free = threading.Condition(self._lock)
        self._free: collections.deque[int] = collections.deque(range(self.options.slots))
        self._unsent: set[int] = set()  # slots written whose message is not sent yet
        self._send_lock = threading.Lock()
        self._control: queue.SimpleQueue = queue.SimpleQueue()  # messages the feeder sends
        self._control_lock = threading.RLock()
        self._restarts: collections.deque[float] = collections.deque()
        self._gave_up = False
        self._swap_reply: queue.SimpleQueue = queue.SimpleQueue()
        self._shm = SharedRing(self.options.slots * self.options.slot_bytes)
        # bytes the child reads back to check that it can read this process's memory
        self._probe = np.frombuffer(os.urandom(16), np.uint8).copy()
        self._peer = False  # the running child copies inline frames out of our memory
        self._proc = None
        self._conn = None
        self._last_beat = 0.0
        self._last_progress = 0.0
        self.tagger: RemoteTagger | None = None
        self._thresholds: list | None = None  # set through the RemoteTagger, kept for restarts
        self._finetune: dict | None = None  # fine-tuning settings, for restarts
        self._calls: dict[int, list] = {}  # call id -> [Event, ok, value]
        try:
            self._start_child()
        except BaseException:
            self._shm.close()
            raise
        self._feeder = threading.Thread(target=self._feed, name="xsml-tagger-feed", daemon=True)
        self._reader = threading.Thread(target=self._read, name="xsml-tagger-link", daemon=True)
        self._feeder.start()
        self._reader.start()

    # -------------------------------------------------------------- the child
    def _spec(self) -> dict:
        o = self.options
        return {"checkpoint": self.checkpoint, "priority": o.priority, "threads": o.threads,
                "device": o.device, "precision": o.precision, "shm_path": self._shm.path,
                "slots": o.slots, "slot_bytes": o.slot_bytes, "max_batch": self.max_batch,
                # the feeder already waited max_wait to fill the batch it sends
                "max_wait": min(self.max_wait, 0.002), "warmup": self.warmup,
                "send_inputs": self._sends_inputs(),
                "label_cache_size": self.label_cache_size,
                "external_options": self.external_options,
                "heartbeat": min(0.5, self.options.heartbeat_timeout / 4),
                "thresholds": self._thresholds, "finetune": self._finetune,
                "frame_transport": o.frame_transport, "peer_pid": os.getpid(),
                "probe": (int(self._probe.ctypes.data), self._probe.tobytes())}

    def _start_child(self) -> None:
        """Start a child, wait for its hello; raises TaggerProcessError if it fails."""
        proc, parent_conn = ChildProcess.start(self._spec())
        deadline = time.monotonic() + self.options.start_timeout
        try:
            while True:
                if parent_conn.poll(0.2):
                    what, payload = parent_conn.recv()
                    if what == "hello":
                        break
                    if what == "error":
                        raise TaggerProcessError(f"the tagging process could not start: "
                                                 f"{payload}")
                elif not proc.is_alive():
                    raise TaggerProcessError(f"the tagging process exited during start "
                                             f"(exit code {proc.exitcode})")
                if time.monotonic() > deadline:
                    raise TaggerProcessError(f"the tagging process did not load its model "
                                             f"within {self.options.start_timeout} s")
        except (EOFError, OSError) as err:
            proc.kill()
            proc.join(5)
            parent_conn.close()
            raise TaggerProcessError(f"the tagging process exited during start "
                                     f"(exit code {proc.exitcode})") from err
        except BaseException:
            proc.kill()
            proc.join(5)
            parent_conn.close()
            raise
        with self._lock:
            self._proc, self._conn = proc, parent_conn
            self._last_beat = self._last_progress = time.monotonic()
            # slots the dead child held are free again; those holding unsent frames are not
            self._free = collections.deque(s for s in range(self.options.slots)
                                           if s not in self._unsent)
            self._slots_free.notify_all()
            self._peer = payload.get("frame_transport") == "peer"
            self.process_starts += 1
        if self.tagger is None:
            self.tagger = RemoteTagger(payload, on_thresholds=self._send_thresholds)
        else:
            self.tagger.update(payload)
        log.info("xsml tagging process %d started (%s, checkpoint %s, %s)", payload["pid"],
                 payload["device"], payload["checkpoint_id"], payload.get("priority"))

    @property
    def pid(self) -> int | None:
        """The tagging process's pid (None when there is none)."""
        proc = self._proc
        return proc.pid if proc is not None else None

    # ----------------------------------------------------------------- intake
    def submit(self, job: FrameJob) -> None:
        """Queue ``job``; the RunEngine's thread waits at most ``hand_off_timeout``."""
        self._take(job)

    def _holds_bytes(self, job: FrameJob) -> bool:
        # frames in files cross by reference: nothing of theirs waits in this process
        return super()._holds_bytes(job) and getattr(job, "ref", None) is None

    def _feed(self) -> None:
        """Feeder thread: move queued jobs into the ring and over to the child."""
        while not self._stop.is_set():
            self._send_control()
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            # one wake-up per batch, not per frame, as the in-process worker does: GIL
            # hand-offs with the RunEngine thread stay rare
            jobs = [first]
            deadline = time.monotonic() + self.max_wait
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self._queue.get_nowait())
                    continue
                except queue.Empty:
                    pass
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(left, 0.01))
            try:
                self._send_jobs(jobs)
            except Exception as err:  # never lose the jobs: account for them
                log.exception("xsml could not hand frames to the tagging process")
                self._skip_jobs(jobs, f"internal_error: {type(err).__name__}")

    def _send_thresholds(self, values: list) -> None:
        self._thresholds = list(values)  # a restarted child gets them too
        self._control.put(("thresholds", list(values)))

    def _send_control(self) -> None:
        # under a lock: a call sent right after (``call``) cannot overtake what was queued
        with self._control_lock:
            while True:
                try:
                    msg = self._control.get_nowait()
                except queue.Empty:
                    return
                conn = self._conn
                if conn is not None:
                    self._send(conn, msg)

    def _message(self, job: FrameJob, jid: int, *, wait: bool) -> dict | None:
        """The job as a message; None if it needs a slot, none is free and ``wait`` is False."""
        msg = {"jid": jid, "run_uid": job.run_uid, "stream": job.stream,
               "seq_num": job.seq_num, "event_uid": job.event_uid, "key": job.key,
               "skip_reason": job.skip_reason, "t_in": job.t_in,
               "beam_center": job.beam_center, "kind": "none",
               "readout": None if job.readout is None else
               self._readouts.get(job.run_uid, job.key, job.readout)}
        ref = getattr(job, "ref", None)
        if job.source is None:
            return msg
        if ref is not None:
            msg.update(kind="ref", ref=ref, ref_docs=getattr(job, "ref_docs", ()))
            return msg
        value = job.source
        if callable(value):  # a loader without a ref: run it here, off the RunEngine thread
            value = job.source = value()
        arr = np.asarray(value)
        if arr.dtype.hasobject:
            msg.update(kind="array", array=arr)
            return msg
        if self._peer:  # the child copies it out of our memory; we keep it alive till then
            arr = np.ascontiguousarray(arr)
            job.source = arr
            msg.update(kind="peer", addr=int(arr.ctypes.data), shape=arr.shape,
                       dtype=arr.dtype.str)
            return msg
        if arr.nbytes > self.options.slot_bytes:
            msg.update(kind="array", array=arr)
            return msg
        slot = self._take_slot(wait)
        if slot is None:
            if wait:  # stopping, or restarting was given up: the pipe takes it
                msg.update(kind="array", array=arr)
                return msg
            return None
        view = np.ndarray(arr.shape, arr.dtype, buffer=self._shm.buf,
                          offset=slot * self.options.slot_bytes)
        np.copyto(view, arr)
        del view
        msg.update(kind="slot", slot=slot, shape=arr.shape, dtype=arr.dtype.str)
        return msg

    def _take_slot(self, wait: bool) -> int | None:
        """A free slot (kept in ``_unsent`` until its message is sent), or None."""
        with self._slots_free:
            while not self._free:
                if not wait or self._stop.is_set() or self._gave_up:
                    return None
                self._slots_free.wait(0.1)
            slot = self._free.popleft()
            self._unsent.add(slot)
            return slot

    def _send_jobs(self, jobs: list[FrameJob]) -> None:
        if self._gave_up:
            self._skip_jobs(jobs, "tagger_process_unavailable")
            return
        messages: list[tuple[int, FrameJob, dict]] = []
        for job in jobs:
            jid = next(self._ids)
            try:
                msg = self._message(job, jid, wait=False)
                if msg is None:  # the ring is full: send what is ready, then wait for a slot
                    self._transmit(messages)
                    messages = []
                    msg = self._message(job, jid, wait=True)
            except Exception as err:  # noqa: BLE001 - the frame is skipped with the reason
                self._skip_jobs([job], f"read_error: {type(err).__name__}: {err}")
                continue
            if msg["kind"] in ("slot", "array"):
                self._release((job,))  # the frame lives in the ring or the message now
            messages.append((jid, job, msg))
        self._transmit(messages)

    def _send(self, conn, msg) -> bool:
        """Send to the child; False if it is gone (the link thread then restarts it).

        Only the feeder thread and callers outside the link thread send, so a
        child blocked on writing to us is always read and cannot deadlock a send.
        """
        with self._send_lock:
            try:
                conn.send(msg)
                return True
            except (OSError, ValueError):
                return False

    def _transmit(self, messages: list[tuple[int, FrameJob, dict]]) -> None:
        """Send ``messages`` to the child, waiting out a restart."""
        if not messages:
            return
        slots = {m["slot"] for _, _, m in messages if m["kind"] == "slot"}
        while True:
            with self._lock:  # never held across a send: the link thread needs it to read
                conn = self._conn
                if conn is not None:
                    for jid, job, _ in messages:
                        self._in_flight[jid] = job
                    self._unsent -= slots
                    if len(self._in_flight) == len(messages):
                        self._last_progress = time.monotonic()
            if conn is not None:
                self._send(conn, ("jobs", [m for _, _, m in messages]))
                return
            if self._gave_up or self._stop.is_set():
                with self._lock:
                    self._unsent -= slots
                self._skip_jobs([j for _, j, _ in messages], "tagger_process_unavailable")
                return
            time.sleep(0.05)  # a restart is under way

    # ---------------------------------------------------------------- results
    def _read(self) -> None:
        """Link thread: results, heartbeats; notices a dead or hung child."""
        while not self._stop.is_set():
            conn = self._conn
            if conn is None:
                if self._gave_up:
                    return
                time.sleep(0.1)
                continue
            try:
                if conn.poll(0.1):
                    self._handle(*conn.recv())
                    continue
            except (EOFError, OSError):
                if self._stop.is_set():
                    return
                self._fault("tagger_process_died", self._exit_reason())
                continue
            except Exception:  # a message we cannot read: keep the link
                log.exception("xsml could not read a message from the tagging process")
                continue
            now = time.monotonic()
            proc = self._proc
            if proc is not None and not proc.is_alive():
                self._fault("tagger_process_died", self._exit_reason())
            elif now - self._last_beat > self.options.heartbeat_timeout:
                self._fault("tagger_process_hung",
                            f"no heartbeat for {now - self._last_beat:.1f} s")
            elif self._in_flight and now - self._last_progress > self.options.progress_timeout:
                self._fault("tagger_process_hung",
                            f"no result for {now - self._last_progress:.1f} s")

    def _exit_reason(self) -> str:
        proc = self._proc
        if proc is None:
            return "no process"
        proc.join(1.0)
        code = proc.exitcode
        if code is None:
            return "link lost"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def _handle(self, what: str, payload: Any) -> None:
        if what == "many":  # several messages the child queued while it sent the last
            results: list = []
            for w, p in payload:
                if w == "results":  # one delivery for all of them
                    results.extend(p)
                else:
                    self._handle(w, p)
            if results:
                self._handle("results", results)
        elif what == "hb":
            self._last_beat = time.monotonic()
        elif what == "free":
            with self._slots_free:
                self._free.extend(payload)
                self._slots_free.notify_all()
        elif what == "got":  # the child has copied these frames out of our memory
            with self._lock:
                jobs = [self._in_flight.get(jid) for jid in payload]
            for job in jobs:
                if job is not None:
                    self._release((job,))
        elif what == "results":
            self._last_progress = self._last_beat = time.monotonic()
            out = []
            with self._lock:
                for jid, results in payload:
                    job = self._in_flight.pop(jid, None)
                    if job is not None:
                        out.append((job, results))
            self._count(out)
            self._deliver(out)
        elif what == "inputs":
            if self.on_inputs is None:
                return
            with self._lock:
                items = [(self._in_flight[jid], idx, x) for jid, idx, x in payload
                         if jid in self._in_flight]
            try:
                self.on_inputs(items)
            except Exception:
                log.exception("xsml inputs handler failed")
        elif what == "ready":
            self.ready.set()
        elif what in ("swapped", "swap_failed"):
            self._swap_reply.put((what, payload))
        elif what == "model":  # the child's live model changed (fine-tuning, rollback)
            self.tagger.update(payload)
        elif what == "reply":
            cid, ok, value = payload
            slot = self._calls.get(cid)
            if slot is not None:
                slot[1], slot[2] = ok, value
                slot[0].set()

    def _count(self, out: list) -> None:
        for _, results in out:
            for r in results:
                if r.skip_reason:
                    self.stats.frames_skipped += 1
                    self.stats.skipped_by_reason[r.skip_reason.split(":")[0]] += 1
                else:
                    self.stats.frames_tagged += 1
                    self.stats.latencies.append(r.latency)
        self.stats.batches += 1

    def _deliver(self, out: list) -> None:
        if not out:
            return
        for job, _ in out:
            self._release((job,))
        try:
            self.on_results(out)
        except Exception:
            log.exception("xsml result handler failed")
        finally:
            with self._idle:
                self._outstanding -= len(out)
                self._idle.notify_all()

    def _skip(self, job: FrameJob, reason: str) -> FrameResult:
        return FrameResult(stream=job.stream, seq_num=job.seq_num, event_uid=job.event_uid,
                           key=job.key, frame_index=0, probs=None, skip_reason=reason,
                           checkpoint=self.tagger.checkpoint_id if self.tagger else "",
                           latency=time.monotonic() - job.t_in)

    def _skip_jobs(self, jobs: list[FrameJob], reason: str) -> None:
        out = [(job, [self._skip(job, reason)]) for job in jobs]
        self._count(out)
        self._deliver(out)

    # ----------------------------------------------------------------- faults
    def _fault(self, reason: str, detail: str) -> None:
        """Kill what is left of the child, skip its frames, start a new one."""
        with self._lock:
            proc, conn = self._proc, self._conn
            self._proc = self._conn = None
            lost = list(self._in_flight.values())
            self._in_flight.clear()
        self.process_faults[reason] += 1
        self.ready.clear()  # set again when the new child has warmed up
        log.error("xsml tagging process %s (%s); %d frames it held are skipped, restarting",
                  reason.replace("tagger_process_", ""), detail, len(lost))
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.kill()
                proc.join(5)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
        self._skip_jobs(lost, f"{reason}: {detail}")
        for slot in list(self._calls.values()):  # calls the dead child will never answer
            slot[1], slot[2] = False, RuntimeError(f"the tagging process {reason[16:]} "
                                                   f"({detail}) before it answered")
            slot[0].set()
        self._restart()

    def _restart(self) -> None:
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > self.options.restart_window:
            self._restarts.popleft()
        if len(self._restarts) >= self.options.max_restarts:
            log.critical("xsml tagging process: %d restarts in the last %.0f s reach "
                         "max_restarts=%d; not restarting it: later frames are skipped "
                         "(tagger_process_unavailable)", len(self._restarts),
                         self.options.restart_window, self.options.max_restarts)
            self._gave_up = True
            with self._slots_free:
                self._slots_free.notify_all()
            return
        self._restarts.append(now)
        self.stats.restarts += 1
        while not self._stop.is_set():
            try:
                self._start_child()
                return
            except TaggerProcessError as err:
                log.error("xsml could not restart the tagging process: %s", err)
                self._restarts.append(time.monotonic())
                if len(self._restarts) > self.options.max_restarts:
                    self._gave_up = True
                    return

    def describe_process(self) -> dict:
        """The tagging process for ``status()``: pid, starts, faults by kind, priority."""
        return {"pid": self.pid, "starts": self.process_starts,
                "faults": dict(self.process_faults),
                "priority": self.tagger.priority if self.tagger else "",
                "restarting_stopped": self._gave_up,
                "frame_transport": "peer" if self._peer else "ring"}

    def ensure_alive(self) -> bool:
        """True if the link is up (faults are handled by the link thread)."""
        return self._conn is not None and not self._gave_up

    # ------------------------------------------------------------- model swap
    def swap_checkpoint(self, checkpoint, timeout: float = 120.0) -> RemoteTagger:
        """Load ``checkpoint`` in the tagging process between batches.

        Later restarts use it too. Raises ``RuntimeError`` if the child
        refuses it (the running model stays).
        """
        path = os.fspath(checkpoint)
        conn = self._conn
        if conn is None or not self._send(conn, ("swap", path)):
            raise RuntimeError("the tagging process is not running")
        try:
            what, payload = self._swap_reply.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"the tagging process did not swap within {timeout} s") from None
        if what != "swapped":
            raise RuntimeError(f"the tagging process refused {path}: {payload}")
        self.checkpoint = path
        self._thresholds = None  # the new checkpoint's own thresholds apply
        self.tagger.update(payload)
        return self.tagger

    def call(self, target: str, method: str, args: tuple = (), kwargs: dict | None = None, *,
             timeout: float | None = 120.0, wait: bool = True):
        """Call ``method(*args, **kwargs)`` of ``target`` in the tagging process.

        ``target`` is ``"finetuner"``, ``"registry"`` or ``"child"``. Returns the
        value, or raises the exception it raised (``RuntimeError`` if the process
        died or did not answer within ``timeout``). With ``wait=False`` the call
        is queued (the feeder thread sends it) and nothing is returned: safe
        from any thread, the link thread included. A call that waits is sent after
        everything queued before it (queued labels, thresholds, inputs on/off).
        """
        kwargs = dict(kwargs or {})
        if not wait:
            self._control.put(("call", (None, target, method, args, kwargs)))
            return None
        cid = next(self._ids)
        slot = self._calls[cid] = [threading.Event(), False, None]
        try:
            with self._control_lock:  # what was queued before (labels, thresholds) goes first
                self._send_control()
                conn = self._conn
                sent = conn is not None and self._send(conn, ("call", (cid, target, method,
                                                                        args, kwargs)))
            if not sent:
                raise RuntimeError("the tagging process is not running")
            if not slot[0].wait(timeout):
                raise RuntimeError(f"the tagging process did not answer {target}.{method} "
                                   f"within {timeout} s")
        finally:
            self._calls.pop(cid, None)
        if not slot[1]:
            raise slot[2]
        return slot[2]

    def enable_finetuning(self, directory, options: dict) -> dict:
        """Start live fine-tuning in the tagging process (a restart resumes it)."""
        spec = {"directory": os.fspath(directory), "options": dict(options)}
        status = self.call("child", "enable_finetuning", (spec["directory"], spec["options"]),
                           timeout=max(600.0, self.options.start_timeout))
        self._finetune = spec
        return status

    def _sends_inputs(self) -> bool:
        return self.options.send_inputs and self.on_inputs is not None and self._want_inputs

    def want_inputs(self, on: bool = True) -> None:
        """Have the tagging process send each frame's input back (``on_inputs``), or stop.

        Off by default: 192 KiB a frame across the pipe, for listeners of this
        process only; the label cache does not need them.
        """
        self._want_inputs = bool(on)
        self._control.put(("inputs", self._sends_inputs()))

    def forget_run(self, run_uid: str) -> None:
        """Let the child forget a finished run: close its files, drop its parsed readouts
        (sent by the feeder thread); this side drops its converted ones."""
        self._readouts.forget(run_uid)
        self._control.put(("forget", run_uid))

    def _inject(self, what: str, arg: Any = None) -> None:
        """For tests: make the child crash (``"crash"``) or hang (``"hang"``, seconds)."""
        self._send(self._conn, (what, arg))

    # -------------------------------------------------------------- lifecycle
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job was handed back; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._outstanding == 0, timeout=timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Finish outstanding work, stop the child and the threads, free the ring."""
        if self._stop.is_set():
            return
        self.flush(timeout)
        self._stop.set()
        with self._lock:
            proc, conn = self._proc, self._conn
            self._conn = None
        if conn is not None:
            self._send(conn, ("stop", None))
        if proc is not None:
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for thread in (self._feeder, self._reader):
            thread.join(2.0)
        # anything still queued or in flight is accounted for, never silently lost
        left = list(self._in_flight.values())
        self._in_flight.clear()
        while True:
            try:
                left.append(self._queue.get_nowait())
            except queue.Empty:
                break
        self._skip_jobs(left, "closed")
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
        self._shm.close()
