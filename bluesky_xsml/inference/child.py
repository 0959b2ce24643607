"""The tagging process's side of :mod:`bluesky_xsml.inference.process`.

Run by :class:`~bluesky_xsml.inference.process.ProcessInferenceWorker` in a
spawned process: it loads the checkpoint, lowers its own priority, attaches to
the parent's shared-memory frame ring and runs an ordinary in-process
:class:`~bluesky_xsml.inference.worker.InferenceWorker`, whose results go back
over the pipe. Three threads: the receiver (jobs in), the inference worker
(results out) and a heartbeat.

The process starts in :mod:`bluesky_xsml.tagging_process`, which hands this
loop the two things from higher layers it needs: the external-file reader of
a run (``make_reader``, :class:`~bluesky_xsml.documents.external.ExternalFrames`)
and the live fine-tuner (``make_finetuner``,
:class:`~bluesky_xsml.training.live.LiveFineTuner`). Inference imports neither
(``docs/decisions/0004-layers.md``).

Messages are exchanged over a :func:`multiprocessing.Pipe` that only this
process and its parent hold (no network), so they are plain pickles.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import mmap
import os
import pickle
import queue
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from ..errors import ConfigurationError
from ..frame_cache import FrameCache
from ..label_rows import parse_tag_labels
from ..readout import Readout, RunReadoutCache
from .worker import FrameJob, InferenceWorker

log = logging.getLogger(__name__)

#: Runs whose external-file readers the child keeps open at once.
MAX_OPEN_RUNS = 8


def _checked_readout(plain: Any) -> Readout:
    """The :class:`~bluesky_xsml.readout.Readout` of ``plain`` (a ``to_dict()``).

    Raises
    ------
    ConfigurationError
        If ``plain`` is not a valid readout.
    """
    return Readout.from_metadata(plain, "readout")


def set_priority(priority: str | int | None) -> str:
    """Lower this process's CPU priority; returns what was applied.

    ``"idle"`` asks for ``SCHED_IDLE`` (it only runs on a core nothing else
    wants) and falls back to ``nice 19``; an int is a nice increment; ``None``
    or ``"normal"`` leave it.
    """
    if priority in (None, "normal", 0):
        return "normal"
    if priority == "idle":
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return "SCHED_IDLE"
        except (AttributeError, OSError):
            priority = 19
    try:
        os.nice(int(priority))
        return f"nice {int(priority)}"
    except (OSError, ValueError):
        return "normal"


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class PeerMemory:
    """Reads arrays straight out of the RunEngine's process (``process_vm_readv``).

    The one copy of an inline frame is then made here, at the tagging process's
    low priority, instead of by a thread of the RunEngine's process. The kernel
    allows it for a process of the same user (under Yama ``ptrace_scope=1``
    because the parent named this process with ``PR_SET_PTRACER``); reads of
    memory the parent does not map fail with ``OSError`` and never touch it.
    """

    def __init__(self, pid: int) -> None:
        self.pid = int(pid)
        libc = ctypes.CDLL(None, use_errno=True)  # a CDLL call releases the GIL
        self._readv = libc.process_vm_readv
        self._readv.restype = ctypes.c_ssize_t
        self._readv.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
                                ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong]

    def read_into(self, addr: int, out: np.ndarray) -> None:
        """Fill the C-contiguous ``out`` from ``out.nbytes`` bytes at ``addr`` in the peer."""
        base, left, done = out.ctypes.data, out.nbytes, 0
        while left:
            local = _IoVec(base + done, left)
            remote = _IoVec(addr + done, left)
            got = self._readv(self.pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
            if got <= 0:
                err = ctypes.get_errno()
                raise OSError(err, f"process_vm_readv: {os.strerror(err) if err else 'no data'}")
            done += got
            left -= got

    @classmethod
    def probe(cls, spec: dict) -> PeerMemory | None:
        """A reader if ``spec["probe"]`` (address, expected bytes) reads back, else None."""
        if spec.get("frame_transport", "auto") == "ring" or not spec.get("probe"):
            return None
        try:
            addr, expected = spec["probe"]
            peer = cls(spec["peer_pid"])
            out = np.empty(len(expected), np.uint8)
            peer.read_into(int(addr), out)
            return peer if out.tobytes() == bytes(expected) else None
        except Exception as err:  # noqa: BLE001 - the ring is the fallback
            log.warning("xsml tagging process cannot read frames from the RunEngine's "
                        "process (%s); frames cross through the shared ring", err)
            return None


class _Link:
    """The child's end of the pipe: one sender at a time."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, msg: Any) -> None:
        with self.lock:
            self.conn.send(msg)


class _Outgoing:
    """Results (and inputs) to the parent, several batches in one message when they queue.

    The inference thread hands each batch here and goes on; a sender thread
    sends whatever has queued meanwhile as one ``("many", [...])`` message, so
    a batch waits for no timer (latency unchanged) while a parent that reads
    slower than the child tags gets fewer, larger messages (one wake-up and
    one unpickling per message on its side).
    """

    def __init__(self, link: _Link) -> None:
        self.link = link
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="xsml-send", daemon=True)
        self.thread.start()

    def put(self, what: str, payload: Any) -> None:
        self.queue.put((what, payload))

    def close(self, timeout: float = 10.0) -> None:
        self.queue.put(None)
        self.thread.join(timeout)

    def _run(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            msgs, done = [first], False
            while True:
                try:
                    more = self.queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    done = True
                    break
                msgs.append(more)
            try:
                self.link.send(msgs[0] if len(msgs) == 1 else ("many", msgs))
            except (OSError, ValueError):
                return  # the parent is gone
            if done:
                return


class _ExternalReaders:
    """Per-run external-file readers (``make_reader(**options)``), fed the documents each
    job carries."""

    def __init__(self, options: dict, make_reader: Callable[..., Any]) -> None:
        self.options = dict(options)
        self.make_reader = make_reader
        self.runs: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.lock = threading.Lock()

    def reader(self, run_uid: str, docs) -> Any:
        with self.lock:
            ext = self.runs.get(run_uid)
            if ext is None:
                ext = self.runs[run_uid] = self.make_reader(**self.options)
                while len(self.runs) > MAX_OPEN_RUNS:
                    _, old = self.runs.popitem(last=False)
                    _forget(old)
            self.runs.move_to_end(run_uid)
            for name, doc in docs:
                ext.register(name, doc)
            return ext

    def forget(self, run_uid: str) -> None:
        with self.lock:
            ext = self.runs.pop(run_uid, None)
        if ext is not None:
            _forget(ext)


def _forget(ext) -> None:
    try:
        ext.forget()
    except Exception:  # pragma: no cover - best effort
        log.exception("xsml tagging process could not close a run's files")


def _build_tagger(spec: dict):
    # torch loads here, after set_priority: at the lowered priority (a heavy third-party
    # import, the one reason this import is not at the top of the module)
    from .tagger import Tagger

    kwargs = {k: spec[k] for k in ("device", "precision", "num_threads") if spec.get(k) is not None}
    return Tagger.load(spec.get("checkpoint"), **kwargs)


def describe(tagger) -> dict:
    """What the RunEngine's side needs to know about the model (plain types)."""
    return {
        "tags": list(tagger.tags),
        "thresholds": [float(t) for t in tagger.thresholds],
        "default_thresholds": [float(t) for t in getattr(tagger, "default_thresholds",
                                                         tagger.thresholds)],
        "checkpoint_id": tagger.checkpoint_id,
        "describe": tagger.describe(),
        "device": str(tagger.device),
        "uses_beam_center": bool(tagger.uses_beam_center),
        "pid": os.getpid(),
    }


def main(conn, spec: dict, *, make_reader: Callable[..., Any],
         make_finetuner: Callable[..., Any]) -> None:
    """Run the tagging process's loop until the parent says stop or goes away.

    Parameters
    ----------
    conn : multiprocessing.connection.Connection
        This process's end of the pipe to the parent.
    spec : dict
        What the parent sent (:meth:`ProcessInferenceWorker._spec`).
    make_reader : callable
        ``make_reader(**spec["external_options"])``: an external-file reader for
        one run (``register(name, doc)``, ``read(ref)``, ``forget()``).
    make_finetuner : callable
        ``make_finetuner(tagger, directory, **options)``: the live fine-tuner
        (``status()``, ``registry``, ``close(timeout)``).
    """
    link = _Link(conn)
    try:
        applied = set_priority(spec.get("priority", "idle"))
        import torch  # after set_priority: loads at the lowered priority

        threads = int(spec.get("threads") or os.cpu_count() or 1)
        torch.set_num_threads(threads)
        tagger = _build_tagger(spec)
        tagger.set_num_threads(threads)
        fd = os.open(spec["shm_path"], os.O_RDWR)
        try:
            ring = mmap.mmap(fd, spec["slots"] * spec["slot_bytes"])
        finally:
            os.close(fd)
    except BaseException as err:  # noqa: BLE001 - reported, then the process ends
        with contextlib.suppress(BaseException):  # the parent may be gone already
            link.send(("error", f"{type(err).__name__}: {err}"))
        return
    info = describe(tagger)
    if spec.get("thresholds") is not None:  # set live before a restart: keep them
        tagger.thresholds = np.asarray(spec["thresholds"], np.float32)
        info["thresholds"] = [float(t) for t in tagger.thresholds]
    info["priority"] = applied
    peer = PeerMemory.probe(spec)
    info["frame_transport"] = "peer" if peer is not None else "ring"
    link.send(("hello", info))
    _Child(link, tagger, ring, spec, make_reader=make_reader,
           make_finetuner=make_finetuner, peer=peer).run()


class _Child:
    def __init__(self, link: _Link, tagger, ring: mmap.mmap, spec: dict, *,
                 make_reader: Callable[..., Any], make_finetuner: Callable[..., Any],
                 peer: PeerMemory | None = None) -> None:
        self.link = link
        self.peer = peer
        self.make_finetuner = make_finetuner
        self.tagger = tagger
        self.ring = ring
        self.slot_bytes = int(spec["slot_bytes"])
        # inputs go back only while the parent has input listeners (set by "inputs" messages)
        self.send_inputs = bool(spec.get("send_inputs", False))
        #: The label cache: each tagged frame's input stays here; the parent keeps its key.
        self.cache = FrameCache(int(spec.get("label_cache_size", 0)))
        self.readers = _ExternalReaders(spec.get("external_options") or {}, make_reader)
        # each run's readout checked once, not per frame
        self.readouts = RunReadoutCache(_checked_readout)
        self.heartbeat = float(spec.get("heartbeat", 0.5))
        self.stop = threading.Event()
        self.finetuner = None
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        self.finetune_spec = spec.get("finetune")
        self.silent = False  # set by the "hang" test message: heartbeats stop too
        self.out = _Outgoing(link)
        self.worker = InferenceWorker(
            tagger, self._on_results, max_batch=spec["max_batch"], max_wait=spec["max_wait"],
            max_pending_bytes=2**62, warmup=bool(spec.get("warmup", True)),
            on_inputs=self._on_inputs)

    # results back to the parent
    def _on_inputs(self, items: list) -> None:
        self.cache.put_inputs(items)  # before the results go: a label may follow them at once
        if self.send_inputs:
            self.out.put("inputs", [(job.jid, int(idx), np.asarray(x, np.float16))
                                    for job, idx, x in items])

    def _on_results(self, batch: list) -> None:
        by_run: dict[str, list] = {}
        for job, results in batch:
            by_run.setdefault(job.run_uid, []).extend(results)
        for run_uid, results in by_run.items():
            self.cache.put_probs(run_uid, results, self.tagger.thresholds)
        self.out.put("results", [(job.jid, results) for job, results in batch])

    def _beat(self) -> None:
        sent_ready = False
        while not self.stop.wait(self.heartbeat):
            if self.silent:
                continue
            if not sent_ready and self.worker.ready.is_set():
                sent_ready = True
                self.link.send(("ready", None))
            self.link.send(("hb", time.monotonic()))

    # jobs from the parent
    def _job(self, msg: dict) -> FrameJob:
        job = FrameJob(msg["run_uid"], msg["stream"], msg["seq_num"], msg["event_uid"],
                       msg["key"], skip_reason=msg.get("skip_reason", ""), t_in=msg["t_in"],
                       beam_center=msg.get("beam_center"))
        job.jid = msg["jid"]
        if msg.get("readout") is not None:  # crossed as plain types; checked once per run
            try:
                job.readout = self.readouts.get(msg["run_uid"], msg["key"], msg["readout"])
            except ValueError as err:  # never expected: the parent sent a checked one
                job.skip_reason = job.skip_reason or f"bad_readout: {err}"
                return job
        kind = msg["kind"]
        if kind == "slot":
            offset = msg["slot"] * self.slot_bytes
            view = np.ndarray(msg["shape"], np.dtype(msg["dtype"]), buffer=self.ring,
                              offset=offset)
            job.source = np.array(view)  # copied out: the slot is free again
            job.nbytes = 0
        elif kind == "peer":
            try:
                if self.peer is None:
                    raise OSError("this process cannot read the RunEngine's memory")
                out = np.empty(msg["shape"], np.dtype(msg["dtype"]))
                self.peer.read_into(msg["addr"], out)
                job.source = out
            except (OSError, ValueError, TypeError) as err:
                job.source, job.skip_reason = None, f"read_error: {err}"
        elif kind == "array":
            job.source = msg["array"]
        elif kind == "ref":
            ext = self.readers.reader(msg["run_uid"], msg["ref_docs"])
            ref = msg["ref"]
            job.source = lambda: ext.read(ref)
        return job

    # calls from the parent (fine-tuning, checkpoints), on a thread of their own so that a
    # long one (a training round, a label flush) never holds up the frames
    def enable_finetuning(self, directory: str, options: dict) -> dict:
        """Start (or return) the live fine-tuner of this process's tagger."""
        if self.finetuner is None:
            self.finetuner = self.make_finetuner(self.tagger, directory, **options)
            # every activation (promotion, rollback, activate) swaps the weights here: tell
            # the parent what the live model is now
            self.finetuner.registry.add_listener(
                lambda *a, **k: self.link.send(("model", describe(self.tagger))))
            self.link.send(("model", describe(self.tagger)))
        return self.finetuner.status()

    def label_frame(self, ident: tuple, tags: dict, provenance: dict) -> dict:
        """Store a label of the cached frame ``ident`` (on disk when this returns).

        Raises ``KeyError`` if the frame is not in this process's label cache,
        ``ConfigurationError`` without fine-tuning, ``ValueError`` for bad tags.
        """
        names, row = parse_tag_labels(tags)
        finetuner = self._target("finetuner")
        ident, entry = self.cache.find(ident[0], ident[2], stream=ident[1], key=ident[3],
                                       frame_index=ident[4])
        checkpoint = entry.get("checkpoint", "")
        prov = dict(provenance, checkpoint=checkpoint)
        receipt = finetuner.add_labels(entry["input"][None], row[None], [prov], tags=names)
        self.cache.mark_labeled(ident)
        return receipt

    def label_declared(self, items: list) -> int:
        """Labels the run's documents declared, ``[(ident, tags, provenance)]``, queued
        for the fine-tuner; returns how many frames were no longer cached."""
        finetuner = self._target("finetuner")
        missing = 0
        for ident, tags, prov in items:
            x = self.cache.get_input(tuple(ident))
            if x is None:
                missing += 1
                continue
            names, row = parse_tag_labels(tags)
            finetuner.add_labels_async(x[None], row[None], [prov], tags=names)
        if missing:
            log.warning("xsml tagging process: %d declared labels name frames no longer in "
                        "the label cache; not stored", missing)
        return missing

    def suggest_labels(self, k: int) -> list[dict]:
        """The ``k`` cached unlabeled frames the model is least sure about."""
        return self.cache.suggest(k)

    def cached_input(self, ident: tuple) -> np.ndarray | None:
        """The float16 input of a cached frame (the live view's thumbnail), or None."""
        return self.cache.get_input(tuple(ident))

    def registry_active_id(self) -> str | None:
        return self._target("registry").active_id

    def _target(self, name: str):
        if name == "child":
            return self
        if self.finetuner is None:
            raise ConfigurationError("fine-tuning is not enabled in the tagging process")
        return self.finetuner if name == "finetuner" else self.finetuner.registry

    def _serve_calls(self) -> None:
        while not self.stop.is_set():
            try:
                cid, target, method, args, kwargs = self.calls.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                value = getattr(self._target(target), method)(*args, **kwargs)
                reply = ("reply", (cid, True, value))
            except Exception as err:  # noqa: BLE001 - any error goes back to the caller
                reply = ("reply", (cid, False, err))
            if cid is None:  # fire and forget
                if not reply[1][1]:
                    log.error("xsml tagging process: %s.%s failed: %s", target, method,
                              reply[1][2])
                continue
            try:
                self.link.send(reply)
            except Exception:  # noqa: BLE001 - the value or the error does not pickle
                self.link.send(("reply", (cid, False, RuntimeError(repr(reply[1][2])[:2000]))))

    def run(self) -> None:
        beat = threading.Thread(target=self._beat, name="xsml-heartbeat", daemon=True)
        beat.start()
        threading.Thread(target=self._serve_calls, name="xsml-calls", daemon=True).start()
        if self.finetune_spec:  # a restarted child resumes the fine-tuner (its active checkpoint)
            self.calls.put((None, "child", "enable_finetuning",
                            (self.finetune_spec["directory"], self.finetune_spec["options"]), {}))
        conn = self.link.conn
        try:
            while True:
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    break  # the parent is gone
                what = msg[0]
                if what == "jobs":
                    freed, got = [], []
                    jobs = []
                    for item in msg[1]:
                        jobs.append(self._job(item))
                        if item["kind"] == "slot":
                            freed.append(item["slot"])
                        elif item["kind"] == "peer":
                            got.append(item["jid"])
                    if freed:
                        self.out.put("free", freed)
                    if got:  # copied: the RunEngine's process may let those arrays go
                        self.out.put("got", got)
                    for job in jobs:
                        self.worker.submit(job)
                elif what == "inputs":  # the parent has input listeners (or no more)
                    self.send_inputs = bool(msg[1])
                elif what == "thresholds":
                    with self.tagger.hold():  # between batches
                        self.tagger.thresholds = np.asarray(msg[1], np.float32)
                elif what == "call":
                    self.calls.put(msg[1])
                elif what == "forget":  # the run's stop went out
                    self.readers.forget(msg[1])
                    self.readouts.forget(msg[1])
                elif what == "swap":
                    self._swap(msg[1])
                elif what == "stop":
                    break
                elif what == "crash":  # for tests: die the way a segfault does
                    os.kill(os.getpid(), 9)
                elif what == "hang":  # for tests: stop answering, heartbeat included
                    self.silent = True
                    time.sleep(float(msg[1]))
                    self.silent = False
        finally:
            self.stop.set()
            if self.finetuner is not None:
                self.finetuner.close(30.0)
            self.worker.close(timeout=30.0)
            self.out.close()
            try:
                self.link.send(("bye", None))
            except (OSError, ValueError):
                pass

    def _swap(self, checkpoint: str) -> None:
        try:
            new = type(self.tagger).load(checkpoint, device=str(self.tagger.device),
                              precision=self.tagger.precision)
            self.worker.flush(60.0)
            self.tagger.swap_weights(new, allow_tag_change=True)
            self.link.send(("swapped", describe(self.tagger)))
        except Exception as err:  # noqa: BLE001 - a failed swap keeps the old model, reported
            self.link.send(("swap_failed", f"{type(err).__name__}: {err}"))


def run_from_fd(fd: int, *, make_reader: Callable[..., Any],
                make_finetuner: Callable[..., Any]) -> None:
    """Read the spec from the inherited pipe ``fd`` and run :func:`main`."""
    conn = Connection(fd)
    spec = pickle.loads(conn.recv_bytes())
    main(conn, spec, make_reader=make_reader, make_finetuner=make_finetuner)
