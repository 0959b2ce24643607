"""The live tagging callback: subscribe it to a RunEngine, put the writer behind it.

::

    from bluesky_xsml import Tagger, TaggingCallback
    xsml = TaggingCallback(Tagger.load(), downstream=[writer])
    RE.subscribe(xsml)

Every document is forwarded to ``downstream`` unchanged and in order, through
a delivery thread (so a slow or failing writer never stalls the RunEngine).
For each run with detector frames the callback adds a tag stream (default
``xsml_tags``): a descriptor bound to the run's start document, then one event
per frame (as event pages), tagged off the RunEngine thread in micro-batches.
The run's ``stop`` is held until every frame of that run is tagged or recorded
as skipped, then emitted with the tag stream counted in ``num_events`` and a
run summary (``xsml_tags``, ``xsml_tag_counts``, ``xsml_model``,
``xsml_frames``, ``xsml_skipped``) that catalogs can search, and a bounded
index of the tagged frames (``xsml_index``) that frame-level queries read.

The callback never raises into the RunEngine: problems are logged, counted in
:meth:`TaggingCallback.status`, and recorded as skipped frames.

How it is built: documents go to a
:class:`~bluesky_xsml.documents.routing.RunRouter` whose factory makes one
:class:`~bluesky_xsml.documents.run_tagging.RunTagRouter` per run (that run's
state, its frames, its held stop and its summary); a
:class:`~bluesky_xsml.documents.labelling.Labeller` listens to the results for
labelling; this class wires them to the inference worker and the delivery
outbox. The steering service is started from :mod:`bluesky_xsml.api.serve`.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import importlib
import logging
import os
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from ..inference.worker import FrameJob, InferenceWorker
from ..readout import parse_readouts
from .beam_center import parse_beam_center
from .compose import FrameResult
from .labelling import Labeller, document_labels
from .options import CallbackOptions
from .outbox import Outbox, RetryPolicy
from .routing import ROUTED_NAMES, RunRouter
from .run_tagging import RunTagRouter, RunTagState, by_run

__all__ = ["RunTagState", "TaggingCallback", "document_labels", "parse_beam_center",
           "set_service_starter"]

log = logging.getLogger(__name__)

# The steering service lives above this module (bluesky_xsml.api); it registers how to start
# itself here when it is imported, so the deprecated TaggingCallback.serve needs no import of it.
_service_starter: Callable[..., Any] | None = None
_SERVICE_MODULE = "bluesky_xsml.api.serve"


def set_service_starter(starter: Callable[..., Any] | None) -> None:
    """Register ``starter(callback, **options)``, what :meth:`TaggingCallback.serve` calls.

    :mod:`bluesky_xsml.api.serve` registers :func:`~bluesky_xsml.api.serve.serve`
    when it is imported.
    """
    global _service_starter
    _service_starter = starter


class TaggingCallback:
    """Tag every detector frame of every run into the run's own tag stream.

    Parameters
    ----------
    tagger : Tagger
        The model that tags frames (``Tagger.load()`` for the packaged default).
    downstream : iterable of callables, optional
        Writers/serializers that receive every document, in order, including
        the tag stream. More can be added with :meth:`subscribe`.
    options : CallbackOptions, optional
        All the settings below as one validated object
        (:class:`~bluesky_xsml.documents.options.CallbackOptions`); any of
        them may also be given as a keyword, which overrides ``options``. An
        unknown keyword raises ``TypeError``, a value that cannot work
        :class:`~bluesky_xsml.errors.ConfigurationError` (a ``ValueError``).
    **keywords
        Any field of :class:`~bluesky_xsml.documents.options.CallbackOptions`
        (``stream_name``, ``max_batch``, ``overflow``, ``allowed_roots``,
        ``isolation``, ...), documented there.
    """

    def __init__(self, tagger, downstream: Iterable[Callable[[str, dict], Any]] = (), *,
                 options: CallbackOptions | None = None, **keywords: Any):
        o = self.options = CallbackOptions.resolve(options, keywords)
        isolation = self.isolation = o.isolation
        self.tagger = tagger
        self.stream_name = o.stream_name
        self.image_keys = list(o.image_keys) if o.image_keys is not None else None
        self.streams = set(o.streams) if o.streams is not None else None
        self.stop_timeout = o.stop_timeout
        self.handler_registry = dict(o.handler_registry) if o.handler_registry else None
        self.root_map = dict(o.root_map) if o.root_map else None
        self.read_retries = o.read_retries
        self.read_retry_delay = o.read_retry_delay
        self.allowed_roots = o.allowed_roots
        self.read_timeout = o.read_timeout
        self.validate_pages = o.validate_pages
        self.beam_centers = parse_beam_center(o.beam_center, "beam_center")
        self.readouts = parse_readouts(o.readout, "readout")  # checked by CallbackOptions
        self._told_no_beam_center = False
        self.index_min_prob = o.index_min_prob
        self.index_limit = o.index_limit
        self._closed = False
        if isolation == "thread":
            self._set_threads(o.threads)
        self._lock = threading.RLock()
        # runs started and not finished (their stop may be held): where results go
        self._active: dict[str, RunTagRouter] = {}
        self.router = RunRouter([self._run_factory], on_unrouted=self._unrouted)
        self._errors: collections.Counter = collections.Counter()
        self._finished_runs: collections.deque = collections.deque(maxlen=100)
        # The worker first: it checks its settings before it starts a thread, so a bad setting
        # raises before any thread of this callback runs (the outbox's thread would be left).
        if isolation == "process":
            self.worker = self._process_worker(
                tagger, o.process_options, o.threads, max_batch=o.max_batch,
                max_wait=o.max_wait, max_pending_bytes=o.max_pending_bytes,
                overflow=o.overflow, hand_off_timeout=o.hand_off_timeout)
            self.tagger = self.worker.tagger  # a RemoteTagger: what the child's model is
        else:
            self.worker = InferenceWorker(tagger, self._on_results, max_batch=o.max_batch,
                                          max_wait=o.max_wait,
                                          max_pending_bytes=o.max_pending_bytes,
                                          overflow=o.overflow,
                                          hand_off_timeout=o.hand_off_timeout,
                                          on_inputs=self._on_inputs)
        self.outbox = Outbox(downstream, max_pending=o.max_pending_documents,
                             max_block=o.max_block, on_idle=self._check_held_stops,
                             retry=o.delivery_retry)
        self._listeners: list[Callable[[str, list[FrameResult]], None]] = []
        self._input_listeners: list[Callable[[list], None]] = []
        self._document_listeners: list[Callable[[str, dict], None]] = []
        #: Labelling: the label cache, labels after the fact and declared in documents.
        self.labeller = Labeller(self, o.label_cache_size)
        if not self.labeller.remote:  # in process mode the inputs stay in the tagging process
            self.add_input_listener(self.labeller.on_inputs)
        self.add_result_listener(self.labeller.on_results)
        # Finish and stop the threads before the interpreter tears down torch/numba under them.
        atexit.register(_close_at_exit, weakref.ref(self))

    def _process_worker(self, tagger, options, threads, **worker_options):
        from ..inference.process import ProcessInferenceWorker, ProcessOptions

        options = options or ProcessOptions()
        if threads is not None and options.threads is None:
            options = dataclasses.replace(options, threads=threads)
        checkpoint = tagger
        if tagger is not None and not isinstance(tagger, (str, os.PathLike)):
            # a Tagger built here: the child loads the same weights from a private file
            fd, path = tempfile.mkstemp(prefix="xsml-tagger-", suffix=".pt")
            os.close(fd)
            tagger.save(path)
            self._tagger_file = checkpoint = path
            device = getattr(tagger, "device", None)
            options = dataclasses.replace(
                options, device=options.device or (str(device) if device is not None else None),
                precision=options.precision or getattr(tagger, "precision", None))
        external = self.external_options()
        return ProcessInferenceWorker(checkpoint, self._on_results, on_inputs=self._on_inputs,
                                      label_cache_size=self.options.label_cache_size,
                                      external_options=external, options=options,
                                      **worker_options)

    def _set_threads(self, threads: int | None) -> None:
        n = threads if threads is not None else max(1, (os.cpu_count() or 2) - 1)
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if hasattr(self.tagger, "set_num_threads"):
            self.tagger.set_num_threads(n)
        if getattr(self.tagger, "device", None) is None or self.tagger.device.type == "cpu":
            import torch

            torch.set_num_threads(n)

    # ----------------------------------------------------------------- public
    def subscribe(self, callback: Callable[[str, dict], Any], *,
                  retry: RetryPolicy | None = None) -> None:
        """Add a downstream callback (it receives documents from now on).

        ``retry`` overrides ``delivery_retry`` for this callback, e.g.
        ``RetryPolicy(resend_failed=False, probe=...)`` for a ``TiledWriter``.
        """
        if retry is not None:
            self.outbox.set_retry(callback, retry)
        self.outbox.downstream.append(callback)

    def add_result_listener(self, listener: Callable[[str, list[FrameResult]], None]) -> None:
        """Call ``listener(run_uid, results)`` from the worker after each batch."""
        self._listeners.append(listener)

    def remove_result_listener(self, listener: Callable[[str, list[FrameResult]], None]) -> None:
        """Stop calling ``listener`` (no error if it was not added)."""
        try:
            self._listeners.remove(listener)
        except ValueError:
            pass

    def add_input_listener(self, listener: Callable[[list], None]) -> None:
        """Call ``listener([(job, frame_index, input), ...])`` from the worker after each batch.

        ``input`` is the frame's preprocessed ``(C, S, S)`` array; the listener
        must be quick and not keep it. With ``isolation="process"`` the inputs
        then cross from the tagging process (192 KiB a frame, which the
        RunEngine's process pays for): where a recent frame's input is enough,
        ask :meth:`frame_input` instead, as the service's thumbnails do.
        """
        self._input_listeners.append(listener)
        if self.isolation == "process":
            self.worker.want_inputs(True)

    def remove_input_listener(self, listener: Callable[[list], None]) -> None:
        """Stop calling ``listener`` (no error if it was not added)."""
        try:
            self._input_listeners.remove(listener)
        except ValueError:
            return
        if self.isolation == "process" and not self._input_listeners:
            self.worker.want_inputs(False)

    def frame_input(self, run_uid: str, seq_num: int, *, stream: str = "primary",
                    key: str | None = None, frame_index: int = 0):
        """The preprocessed float16 ``(C, S, S)`` input of a frame in the label cache.

        None when it is not there (too old, never tagged, or, with
        ``isolation="process"``, tagged by a tagging process that has since
        restarted). With ``isolation="process"`` it is fetched from the
        tagging process, which keeps the cache.
        """
        return self.labeller.frame_input(run_uid, seq_num, stream=stream, key=key,
                                         frame_index=frame_index)

    def add_document_listener(self, listener: Callable[[str, dict], None]) -> None:
        """Call ``listener(name, doc)`` for each document received, before it is handled.

        It runs on the caller's thread (the RunEngine's), before the event's
        frames are queued for tagging, so what it records about an event is
        there when that event's results arrive. It must be quick; its
        exceptions are logged, never raised.
        """
        self._document_listeners.append(listener)

    def serve(self, *, port: int | None = None, **options):
        """Start the steering service for this callback (deprecated).

        Use ``bluesky_xsml.api.serve.serve(callback, port=...)``: the service is
        started from :mod:`bluesky_xsml.api`, above the callback. This method
        warns and delegates to it.
        """
        warnings.warn("TaggingCallback.serve() is deprecated; use "
                      "bluesky_xsml.api.serve.serve(callback, port=...)",
                      DeprecationWarning, stacklevel=2)
        if _service_starter is None:
            importlib.import_module(_SERVICE_MODULE)  # it registers its starter
        if _service_starter is None:  # pragma: no cover - the module always registers
            raise RuntimeError(f"{_SERVICE_MODULE} did not register a service starter")
        return _service_starter(self, port=port, **options)

    def __call__(self, name: str, doc: dict) -> None:
        """Receive one document from the RunEngine (or a document bus)."""
        try:
            self.outbox.put(name, doc) if name != "stop" else None
        except Exception:  # pragma: no cover - the outbox put does not raise
            log.exception("xsml could not queue a %s document", name)
        for listener in self._document_listeners:
            try:
                listener(name, doc)
            except Exception:
                log.exception("xsml document listener failed on a %r document", name)
        if name not in ROUTED_NAMES:
            return
        try:
            if name == "start" and doc["uid"] in self._active:
                log.warning("xsml saw start %s twice; keeping the first", doc["uid"])
                return
            self.router(name, doc)
        except Exception as err:
            self._errors[f"{name}: {type(err).__name__}"] += 1
            log.exception("xsml failed to handle a %r document; it was passed through", name)
            if name == "stop":  # never lose a stop
                self._emit_stop_unchanged(doc)

    def wait_ready(self, timeout: float | None = 60.0) -> bool:
        """Wait until the worker compiled its kernels (it tags frames either way)."""
        return self.worker.ready.wait(timeout)

    def flush(self, timeout: float | None = 60.0) -> bool:
        """Wait until every frame received so far is tagged and every document delivered."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left():
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        ok = self.worker.flush(left())
        for run in self._held():  # runs whose last frames were just reported
            run.maybe_finalize()
        return ok and self.outbox.flush(left())

    def close(self, timeout: float = 30.0) -> None:
        """Finish outstanding work, emit held stops, stop the threads (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.flush(timeout)
        for run in self._held():
            run.finalize(reason="stop_timeout")
        self.worker.close(timeout)
        self.outbox.close(timeout)
        self.labeller.close(timeout)
        path = getattr(self, "_tagger_file", None)
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def status(self) -> dict[str, Any]:
        """Counters and latency figures (JSON-able)."""
        s = self.worker.stats
        with self._lock:
            open_runs = len(self._active)
        return {
            "checkpoint_id": self.tagger.checkpoint_id,
            "device": str(self.tagger.device),
            "frames_submitted": s.submitted,
            "frames_tagged": s.frames_tagged,
            "frames_skipped": s.frames_skipped,
            "skipped_by_reason": dict(s.skipped_by_reason),
            "overflow": s.overflow,
            "queue_jobs": self.worker.outstanding,
            "pending_bytes": s.pending_bytes,
            "latency_s": s.latency_percentiles(),
            "worker_restarts": s.restarts,
            "open_runs": open_runs,
            "documents_delivered": self.outbox.delivered,
            "documents_queued": len(self.outbox),
            "downstream_errors": self.outbox.downstream_errors,
            "delivery_restarts": self.outbox.restarts,
            "delivery_overruns": self.outbox.overruns,
            "delivery_losses": self.outbox.losses(),
            "delivery_backlog": self.outbox.backlogs(),
            "document_errors": dict(self._errors),
            "label_cache_frames": len(self.labeller.frame_cache),
            "labels_ignored": self.labeller.ignored,
            "labels_refused": getattr(self.labeller.frame_cache, "refused", 0),
            **({"tagger_process": self.worker.describe_process()}
               if self.isolation == "process" else {}),
        }

    # ------------------------------------------------------ labelling (Labeller)
    @property
    def frame_cache(self):
        """The label cache of the labeller: a :class:`~bluesky_xsml.frame_cache.FrameCache`,
        or with ``isolation="process"`` the keys of the one in the tagging process
        (:class:`~bluesky_xsml.frame_cache.FrameKeys`)."""
        return self.labeller.frame_cache

    @property
    def finetuner(self):
        """The :class:`~bluesky_xsml.training.live.LiveFineTuner`; None until
        :meth:`enable_finetuning`."""
        return self.labeller.finetuner

    @finetuner.setter
    def finetuner(self, value) -> None:
        self.labeller.finetuner = value

    def enable_finetuning(self, directory, **options):
        """Start live fine-tuning into ``directory``; returns the :class:`LiveFineTuner`.

        ``options`` go to :class:`~bluesky_xsml.training.live.LiveFineTuner`
        (``min_labels``, ``steps``, ``synthetic``, ``nice``, ...). Calling it
        again returns the running fine-tuner.
        """
        return self.labeller.enable_finetuning(directory, **options)

    def label(self, run_uid: str, seq_num: int, *, stream: str = "primary",
              key: str | None = None, frame_index: int = 0, **tags) -> dict:
        """Label a recently tagged frame, e.g. ``label(uid, 12, ring_oriented=True)``.

        Tags not given stay unknown (masked out of the loss); ``None`` marks a
        tag unknown explicitly; a tag name the model lacks is taught as a new
        tag. The label is on disk when this returns.

        Returns
        -------
        dict
            A JSON-able receipt: the frame, ``labels``, ``new_tags``, the
            replay ``rows``, ``holdout`` and ``pending`` counts.

        Raises
        ------
        ConfigurationError
            Fine-tuning is not enabled (:meth:`enable_finetuning`).
        KeyError
            The frame is not in the label cache (the message says why).
        ValueError
            No tags, or a value other than True/False/1/0/None.
        """
        return self.labeller.label(run_uid, seq_num, stream=stream, key=key,
                                   frame_index=frame_index, **tags)

    def suggest_labels(self, k: int = 10) -> list[dict]:
        """The ``k`` recent unlabeled frames the model is least sure about.

        Each is a dict with ``run_uid, stream, seq_num, key, frame_index, score``
        (1 = every one of its three most uncertain tags sits at its threshold).
        """
        return self.labeller.suggest_labels(k)

    # ---------------------------------------------------------- per-run routing
    def _run_factory(self, name: str, start_doc: dict):
        """The :class:`RunRouter` factory: one :class:`RunTagRouter` per run."""
        router = RunTagRouter(self, start_doc)
        with self._lock:
            self._active[start_doc["uid"]] = router
        return [router], []

    def _unrouted(self, name: str, doc: dict, reason: str, run_uid: str | None) -> None:
        """A document of no open run: counted and logged; a stop is passed on unchanged."""
        if reason == "datum for unknown resource":
            return  # as before the routing was per run: no count
        if reason == "start seen twice":
            log.warning("xsml saw start %s twice; keeping the first", run_uid)
            return
        if reason == "event after stop":
            self.count_error(reason)
            log.warning("xsml got events after the stop of run %s; passed through untagged",
                        run_uid)
            return
        self.count_error(reason)
        if name == "stop":
            log.warning("xsml got a stop for a run it has no start for; passed through")
            self.outbox.put("stop", doc)
        elif name == "event_page":
            log.warning("xsml got events for unknown descriptor %s; passed through",
                        doc.get("descriptor"))
        elif name == "descriptor":
            log.warning("xsml got a descriptor for a run it has no start for (%s); "
                        "passed through", run_uid)

    def _held(self) -> list[RunTagRouter]:
        with self._lock:
            return [r for r in self._active.values() if r.holds_stop]

    def _emit_stop_unchanged(self, doc: dict) -> None:
        with self._lock:
            run = self._active.pop(doc.get("run_start"), None)
        if run is not None:
            run.mark_finalized()
        self.outbox.put("stop", doc)

    # what a RunTagRouter uses of its host (RunHost)
    def emit(self, name: str, doc: dict) -> None:
        """Queue a document (of the tag stream) for delivery downstream."""
        self.outbox.put(name, doc)

    def submit(self, jobs: list[FrameJob]) -> None:
        """Hand frames to the inference worker (called outside the lock)."""
        for job in jobs:
            self.worker.submit(job)

    def count_error(self, what: str, n: int = 1) -> None:
        """Count a document problem in ``status()["document_errors"]``."""
        self._errors[what] += n

    def external_options(self) -> dict:
        """How frame files are read: here, or in the tagging process (the same rules)."""
        return {"handler_registry": self.handler_registry, "root_map": self.root_map,
                "retries": self.read_retries, "retry_delay": self.read_retry_delay,
                "allowed_roots": self.allowed_roots, "read_timeout": self.read_timeout}

    def note_run_without_beam_center(self, run_uid: str) -> None:
        if not self._told_no_beam_center:
            self._told_no_beam_center = True  # once per callback
            log.info("xsml: the model reads the beam centre but run %s has none "
                     "(TaggingCallback(beam_center=...) or md['xsml_beam_center']); "
                     "its frames are tagged from the image alone", run_uid)

    def run_finished(self, router: RunTagRouter) -> None:
        """A run's stop went out: forget the run, keep its summary, close its files."""
        with self._lock:
            if self._active.get(router.uid) is router:
                del self._active[router.uid]
            self._finished_runs.append({"uid": router.uid, **router.summary()})
        forget_run = getattr(self.worker, "forget_run", None)
        if forget_run is not None:  # the tagging process closes the run's files and drops
            forget_run(router.uid)  # its parsed readouts
        if router.state.external is not None:
            router.release_files()

    def declared_labels(self, run_uid: str, stream: str, seq_num: int) -> dict:
        """Labels an open run's documents declared for one event ({} if none)."""
        with self._lock:
            run = self._active.get(run_uid)
        return run.declared_labels(stream, seq_num) if run is not None else {}

    # ------------------------------------------------------------ worker side
    def _on_inputs(self, items: list) -> None:
        """Worker thread: the preprocessed inputs of a batch, to the input listeners."""
        for listener in list(self._input_listeners):
            try:
                listener(items)
            except Exception:
                log.exception("xsml input listener failed")

    def _on_results(self, batch: list) -> None:
        """Worker thread: each run's results to its router, then finish runs that are done."""
        for run_uid, (results, jobs) in by_run(batch).items():
            with self._lock:
                run = self._active.get(run_uid)
            if run is None:
                self.count_error("late results", len(results))
                continue
            if not run.take_results(results, jobs):
                continue
            for listener in list(self._listeners):
                try:
                    listener(run_uid, results)
                except Exception:
                    log.exception("xsml result listener failed")
            run.maybe_finalize()

    def _check_held_stops(self) -> None:
        """Outbox thread: release stops held longer than ``stop_timeout``."""
        self.worker.ensure_alive()  # supervise the inference thread about every 0.1 s
        now = time.monotonic()
        for run in [r for r in self._held() if r.overdue(now, self.stop_timeout)]:
            run.finalize(reason="stop_timeout")

    @property
    def finished_runs(self) -> list[dict]:
        """Summaries of the most recent finished runs (newest last)."""
        return list(self._finished_runs)


def _close_at_exit(ref: weakref.ref[TaggingCallback]) -> None:
    callback = ref()
    if callback is not None:
        try:
            callback.close(timeout=10.0)
        except Exception:  # pragma: no cover - best effort at interpreter exit
            log.exception("xsml could not close the tagging callback at exit")
