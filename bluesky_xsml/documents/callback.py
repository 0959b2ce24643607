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
"""

from __future__ import annotations

import atexit
import collections
import logging
import math
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from ..frame_cache import FrameCache
from ..inference.worker import FrameJob, InferenceWorker
from .compose import FrameResult, TagStreamComposer
from .frame_index import INDEX_KEY, FrameIndex, motor_keys
from .frames import find_image_keys, is_image_value, split_frames
from .outbox import Outbox, RetryPolicy

__all__ = ["TaggingCallback", "RunTagState", "document_labels", "parse_beam_center"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class RunTagState:
    """What the callback knows about one run."""

    start: dict
    composer: TagStreamComposer | None = None
    descriptors: dict = field(default_factory=dict)      # uid -> (stream name, {key: kind})
    event_uids: dict = field(default_factory=dict)       # (descriptor uid, seq_num) -> uid
    external: Any = None                                  # ExternalFrames, created on demand
    pending: dict = field(default_factory=dict)          # id(job) -> job
    held_stop: dict | None = None
    stop_received_at: float | None = None
    finalized: bool = False
    frames: int = 0
    tag_counts: collections.Counter = field(default_factory=collections.Counter)
    skipped: collections.Counter = field(default_factory=collections.Counter)
    novel: int = 0  # tagged frames flagged novel (xsml_novel)
    checkpoints: list = field(default_factory=list)
    event_labels: dict = field(default_factory=dict)     # (stream, seq_num) -> {tag: value}
    start_labels: dict = field(default_factory=dict)     # validated start xsml_labels
    motor_keys: dict = field(default_factory=dict)       # descriptor uid -> motor data keys
    positions: dict = field(default_factory=dict)        # (stream, seq) -> [jobs left, {key: v}]
    index: Any = None                                     # FrameIndex, with the tag stream
    beam_centers: dict = field(default_factory=dict)     # image key (or "*") -> (x, y)

    @property
    def uid(self) -> str:
        return self.start["uid"]

    def beam_center_for(self, key: str):
        """The beam centre ``(x, y)`` of frames under data key ``key``, or None."""
        return self.beam_centers.get(key, self.beam_centers.get("*"))


def document_labels(value: Any, *, run_uid: str, stream: str, seq_num: int) -> dict:
    """Labels a document declares (``xsml_labels``), checked as the API checks a label.

    Documents may come from a network (the 0MQ bus), so their labels are
    validated with the API's :class:`~bluesky_xsml.api.schemas.LabelIn`: tag
    names are identifiers of at most 64 characters, not names that address a
    frame, at most 512 of them, values True/False/None.

    Parameters
    ----------
    value : dict or str
        ``{"ring_oriented": True, ...}``, or the same as a JSON string.

    Raises
    ------
    ValueError
        Anything else (pydantic's ``ValidationError`` is a ``ValueError``).
    """
    from ..api.schemas import LabelIn

    if isinstance(value, str):
        import json

        value = json.loads(value)
    if not isinstance(value, Mapping):
        raise ValueError(f"xsml_labels must map tag names to True/False/None, "
                         f"got {type(value).__name__}")
    label = LabelIn.model_validate({"run_uid": run_uid, "seq_num": seq_num, "stream": stream,
                                    "tags": dict(value)})
    return dict(label.tags)


def parse_beam_center(value, what: str = "xsml_beam_center") -> dict:
    """Read a beam centre setting: ``[x, y]`` for every image key, or ``{key: [x, y]}``.

    Returns a dict of image key (``"*"``: any) to an ``(x, y)`` pair of floats
    (detector pixels, column then row; off the detector is allowed). ``None``
    gives an empty dict.

    Raises
    ------
    ValueError
        If the value is neither form or holds non-finite numbers.

    Examples
    --------
    >>> parse_beam_center([512, 300.5])
    {'*': (512.0, 300.5)}
    >>> parse_beam_center({"pilatus_image": [10, -40]})
    {'pilatus_image': (10.0, -40.0)}
    """
    if value is None:
        return {}
    items = value.items() if isinstance(value, Mapping) else [("*", value)]
    out = {}
    for key, pair in items:
        try:
            x, y = (float(v) for v in pair)
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be [x, y] in detector pixels or {{image key: [x, y]}}; "
                             f"got {value!r}") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"{what} must hold finite numbers; got {value!r}")
        out[str(key)] = (x, y)
    return out


class TaggingCallback:
    """Tag every detector frame of every run into the run's own tag stream.

    Parameters
    ----------
    tagger : Tagger
        The model that tags frames (``Tagger.load()`` for the packaged default).
    downstream : iterable of callables, optional
        Writers/serializers that receive every document, in order, including
        the tag stream. More can be added with :meth:`subscribe`.
    stream_name : str
        Name of the tag stream.
    image_keys : iterable of str, optional
        Tag exactly these data keys instead of detecting images from descriptors.
    streams : iterable of str, optional
        Only tag frames from these streams (default: every stream with images).
    max_batch, max_wait : int, float
        Micro-batch size and the longest wait for a batch to fill (seconds).
    max_pending_bytes : int
        Memory budget of inline frames waiting for the model.
    overflow : {"skip", "wait"}
        What to do with a frame over budget (see :class:`InferenceWorker`).
    hand_off_timeout : float
        Longest wait of the RunEngine thread for budget with ``overflow="wait"``.
    stop_timeout : float
        Longest time a run's stop is held for its frames; frames still pending
        then are recorded as skipped (``"stop_timeout"``) and the stop goes out.
    max_pending_documents, max_block : int, float
        Soft bound of the delivery queue and the longest the RunEngine waits
        for room in it.
    handler_registry, root_map : dict, optional
        For frames stored in files (resource/datum): handlers by spec, and
        root remapping as in databroker.
    read_retries, read_retry_delay : int, float
        Bounded retries for external files that are missing, truncated or
        still being written, before the frame is recorded as skipped.
    allowed_roots : sequence of str, optional
        Directories every external file must lie under (symlinks resolved),
        on top of its resource's own ``root``, which it may never leave.
        Default: ``XSML_ALLOWED_ROOTS`` (``:``-separated), else none.
    read_timeout : float or None
        Seconds one read of an external file may take before the frame is
        skipped (``"read_timeout"``); see :mod:`bluesky_xsml.documents.external`.
    threads : int, optional
        CPU threads for tagging (preprocessing and, on CPU, torch's intra-op
        pool, which is process-wide). Default: one less than the machine's
        cores, so the RunEngine keeps a core of its own.
    validate_pages : bool
        Schema-validate every tag event page at run time (descriptors and stops
        are always validated). Off by default: jsonschema validation of each page
        holds the GIL the RunEngine needs; the tests validate every document.
    delivery_retry : RetryPolicy, optional
        How a downstream callback that is unreachable (e.g. a catalog server
        that is down) is buffered and retried; losses are counted per run in
        ``status()["delivery_losses"]`` (see :mod:`bluesky_xsml.documents.outbox`).
    label_cache_size : int
        Recent frames whose preprocessed inputs are kept so they can be
        labeled after the fact (:meth:`label`, :meth:`suggest_labels`); about
        192 KiB each. 0 keeps none.
    index_min_prob, index_limit : float, int
        The stop document carries an index (``xsml_index``, see
        :mod:`bluesky_xsml.documents.frame_index`) of up to ``index_limit``
        frames whose probability for some tag is at least ``index_min_prob``,
        with their motor positions; frame-level queries answer from it without
        reading the run's streams. A run with more such frames gets no index.
    beam_center : [x, y] or dict, optional
        Where the direct beam hits the detector, in pixels (column, row), for
        every image key or ``{image key: [x, y]}``: the beamline's calibration.
        A run's start document may set its own (``xsml_beam_center``, same
        forms), which wins; a malformed one is counted in ``status()["document_errors"]``
        and its run is tagged without a centre. A tagger with a polar head
        (:attr:`~bluesky_xsml.inference.tagger.Tagger.uses_beam_center`) reads
        it; frames without one are tagged by the CNN alone.
    """

    def __init__(self, tagger, downstream: Iterable[Callable[[str, dict], Any]] = (), *,
                 stream_name: str = "xsml_tags", image_keys: Iterable[str] | None = None,
                 streams: Iterable[str] | None = None, max_batch: int = 32,
                 max_wait: float = 0.05, max_pending_bytes: int = 2 * 1024**3,
                 overflow: str = "skip", hand_off_timeout: float = 0.05,
                 stop_timeout: float = 300.0, max_pending_documents: int = 10_000,
                 max_block: float = 0.5, handler_registry: Mapping | None = None,
                 root_map: Mapping | None = None, read_retries: int = 5,
                 read_retry_delay: float = 0.1, allowed_roots: Iterable[str] | None = None,
                 read_timeout: float | None = 30.0, threads: int | None = None,
                 validate_pages: bool = False, delivery_retry: RetryPolicy | None = None,
                 label_cache_size: int = 2000, index_min_prob: float = 0.5,
                 index_limit: int = 1000, beam_center=None, isolation: str = "thread",
                 process_options=None):
        if isolation not in ("thread", "process"):
            raise ValueError(f"isolation must be 'thread' or 'process', got {isolation!r}")
        self.isolation = isolation
        if "." in stream_name or "/" in stream_name or not stream_name:
            raise ValueError(f"stream_name may not be empty or contain '.' or '/': {stream_name!r}")
        self.tagger = tagger
        self.stream_name = stream_name
        self.image_keys = list(image_keys) if image_keys is not None else None
        self.streams = set(streams) if streams is not None else None
        self.stop_timeout = float(stop_timeout)
        self.handler_registry = dict(handler_registry) if handler_registry else None
        self.root_map = dict(root_map) if root_map else None
        self.read_retries = int(read_retries)
        self.read_retry_delay = float(read_retry_delay)
        self.allowed_roots = None if allowed_roots is None else tuple(map(str, allowed_roots))
        self.read_timeout = read_timeout
        self.validate_pages = bool(validate_pages)
        if not 0.0 <= float(index_min_prob) <= 1.0:
            raise ValueError(f"index_min_prob must be in [0, 1], got {index_min_prob!r}")
        if int(index_limit) < 0:
            raise ValueError(f"index_limit must be >= 0, got {index_limit!r}")
        self.beam_centers = parse_beam_center(beam_center, "beam_center")
        self._told_no_beam_center = False
        self.index_min_prob = float(index_min_prob)
        self.index_limit = int(index_limit)
        self._closed = False
        if isolation == "thread":
            self._set_threads(threads)
        self._lock = threading.RLock()
        self._runs: dict[str, RunTagState] = {}
        self._by_descriptor: dict[str, RunTagState] = {}
        self._by_resource: dict[str, RunTagState] = {}
        self._errors: collections.Counter = collections.Counter()
        self._finished_runs: collections.deque = collections.deque(maxlen=100)
        # The worker first: it checks its settings before it starts a thread, so a bad setting
        # raises before any thread of this callback runs (the outbox's thread would be left).
        if isolation == "process":
            self.worker = self._process_worker(
                tagger, process_options, threads, max_batch=max_batch, max_wait=max_wait,
                max_pending_bytes=max_pending_bytes, overflow=overflow,
                hand_off_timeout=hand_off_timeout)
            self.tagger = self.worker.tagger  # a RemoteTagger: what the child's model is
        else:
            self.worker = InferenceWorker(tagger, self._on_results, max_batch=max_batch,
                                          max_wait=max_wait, max_pending_bytes=max_pending_bytes,
                                          overflow=overflow, hand_off_timeout=hand_off_timeout,
                                          on_inputs=self._on_inputs)
        self.outbox = Outbox(downstream, max_pending=max_pending_documents, max_block=max_block,
                             on_idle=self._check_held_stops, retry=delivery_retry)
        self._listeners: list[Callable[[str, list[FrameResult]], None]] = []
        self._input_listeners: list[Callable[[list], None]] = []
        self._document_listeners: list[Callable[[str, dict], None]] = []
        self.frame_cache = FrameCache(label_cache_size)
        #: The :class:`~bluesky_xsml.training.live.LiveFineTuner`; None until
        #: :meth:`enable_finetuning`.
        self.finetuner = None
        self._labels_ignored = 0
        # Finish and stop the threads before the interpreter tears down torch/numba under them.
        atexit.register(_close_at_exit, weakref.ref(self))

    def _process_worker(self, tagger, options, threads, **worker_options):
        import dataclasses
        import os

        from ..inference.process import ProcessInferenceWorker, ProcessOptions

        options = options or ProcessOptions()
        if threads is not None and options.threads is None:
            options = dataclasses.replace(options, threads=threads)
        checkpoint = tagger
        if tagger is not None and not isinstance(tagger, (str, os.PathLike)):
            # a Tagger built here: the child loads the same weights from a private file
            import tempfile

            fd, path = tempfile.mkstemp(prefix="xsml-tagger-", suffix=".pt")
            os.close(fd)
            tagger.save(path)
            self._tagger_file = checkpoint = path
            device = getattr(tagger, "device", None)
            options = dataclasses.replace(
                options, device=options.device or (str(device) if device is not None else None),
                precision=options.precision or getattr(tagger, "precision", None))
        external = self._external_options()
        return ProcessInferenceWorker(checkpoint, self._on_results, on_inputs=self._on_inputs,
                                      external_options=external, options=options,
                                      **worker_options)

    def _set_threads(self, threads: int | None) -> None:
        import os

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

        ``input`` is the frame's preprocessed ``(C, S, S)`` array (the service
        keeps thumbnails from it); the listener must be quick and not keep it.
        """
        self._input_listeners.append(listener)

    def add_document_listener(self, listener: Callable[[str, dict], None]) -> None:
        """Call ``listener(name, doc)`` for each document received, before it is handled.

        It runs on the caller's thread (the RunEngine's), before the event's
        frames are queued for tagging, so what it records about an event is
        there when that event's results arrive. It must be quick; its
        exceptions are logged, never raised.
        """
        self._document_listeners.append(listener)

    def serve(self, *, port: int | None = None, **options):
        """Start the steering service for this callback in a background thread.

        ``xsml.serve(port=8765)`` returns a handle with ``.url``, ``.api_key``
        and ``.stop()``; ``options`` go to :func:`bluesky_xsml.api.serve.serve`.
        """
        from ..api.serve import serve

        return serve(self, port=port, **options)

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
        try:
            handler = getattr(self, "_on_" + name, None)
            if handler is not None:
                handler(doc)
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
        with self._lock:
            held = [r for r in self._runs.values() if r.held_stop is not None and not r.finalized]
        for run in held:  # runs whose last frames were just reported
            self._maybe_finalize(run)
        return ok and self.outbox.flush(left())

    def close(self, timeout: float = 30.0) -> None:
        """Finish outstanding work, emit held stops, stop the threads (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.flush(timeout)
        with self._lock:
            runs = [r for r in self._runs.values() if r.held_stop is not None and not r.finalized]
        for run in runs:
            self._finalize(run, reason="stop_timeout")
        self.worker.close(timeout)
        self.outbox.close(timeout)
        if self.finetuner is not None:
            self.finetuner.close(timeout)
        path = getattr(self, "_tagger_file", None)
        if path is not None:
            import contextlib
            import os

            with contextlib.suppress(OSError):
                os.unlink(path)

    def status(self) -> dict[str, Any]:
        """Counters and latency figures (JSON-able)."""
        s = self.worker.stats
        with self._lock:
            open_runs = len(self._runs)
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
            "label_cache_frames": len(self.frame_cache),
            "labels_ignored": self._labels_ignored,
            **({"tagger_process": self.worker.describe_process()}
               if self.isolation == "process" else {}),
        }

    # ------------------------------------------------------------ fine-tuning
    def enable_finetuning(self, directory, **options):
        """Start live fine-tuning into ``directory``; returns the :class:`LiveFineTuner`.

        ``options`` go to :class:`~bluesky_xsml.training.live.LiveFineTuner`
        (``min_labels``, ``steps``, ``synthetic``, ``nice``, ...). Calling it
        again returns the running fine-tuner.
        """
        if self.finetuner is None and self.isolation == "process":
            # trained in the tagging process; this process never imports torch
            from ..inference.process import RemoteFineTuner

            self.finetuner = RemoteFineTuner(self.worker, directory, options)
        if self.finetuner is None:
            from ..training.live import LiveFineTuner

            self.finetuner = LiveFineTuner(self.tagger, directory, **options)
        return self.finetuner

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
        import math

        from ..errors import ConfigurationError
        from ..training.live import parse_tag_labels

        if self.finetuner is None:
            raise ConfigurationError("fine-tuning is not enabled; call "
                                     "enable_finetuning(directory) first")
        names, row = parse_tag_labels(tags)
        ident, entry = self.frame_cache.find(run_uid, seq_num, stream=stream, key=key,
                                             frame_index=frame_index)
        prov = {"source": "label", "run_uid": ident[0], "stream": ident[1],
                "seq_num": ident[2], "key": ident[3], "frame_index": ident[4],
                "checkpoint": entry.get("checkpoint", "")}
        receipt = self.finetuner.add_labels(entry["input"][None], row[None], [prov], tags=names)
        self.frame_cache.mark_labeled(ident)
        return {"run_uid": ident[0], "stream": ident[1], "seq_num": ident[2], "key": ident[3],
                "frame_index": ident[4],
                "labels": {t: (None if math.isnan(v) else bool(v)) for t, v in zip(names, row)},
                "new_tags": [t for t in names if t not in self.tagger.tags], **receipt}

    def suggest_labels(self, k: int = 10) -> list[dict]:
        """The ``k`` recent unlabeled frames the model is least sure about.

        Each is a dict with ``run_uid, stream, seq_num, key, frame_index, score``
        (1 = every one of its three most uncertain tags sits at its threshold).
        """
        return self.frame_cache.suggest(k)

    def _on_inputs(self, items: list) -> None:
        """Worker thread: cache inputs; queue labels that documents declared."""
        self.frame_cache.put_inputs(items)
        for listener in self._input_listeners:
            try:
                listener(items)
            except Exception:
                log.exception("xsml input listener failed")
        todo = []
        with self._lock:
            for job, idx, x in items:
                run = self._runs.get(job.run_uid)
                if run is None:
                    continue
                declared = dict(run.start_labels)
                declared.update(run.event_labels.get((job.stream, job.seq_num), {}))
                if declared:
                    todo.append((job, idx, x, declared))
        if not todo:
            return
        if self.finetuner is None:
            self._labels_ignored += len(todo)
            return
        from ..training.live import parse_tag_labels

        for job, idx, x, declared in todo:
            try:
                names, row = parse_tag_labels(declared)
            except ValueError as err:
                self._errors[f"bad xsml_labels: {type(err).__name__}"] += 1
                continue
            prov = {"source": "document", "run_uid": job.run_uid, "stream": job.stream,
                    "seq_num": int(job.seq_num), "key": job.key, "frame_index": int(idx)}
            self.finetuner.add_labels_async(x[None], row[None], [prov], tags=names)

    # ----------------------------------------------------------- documents
    def _on_start(self, doc: dict) -> None:
        with self._lock:
            if doc["uid"] in self._runs:
                log.warning("xsml saw start %s twice; keeping the first", doc["uid"])
                return
            run = self._runs[doc["uid"]] = RunTagState(start=doc)
            run.beam_centers = dict(self.beam_centers)
            try:  # the run's own centre replaces the beamline's
                run.beam_centers = (parse_beam_center(doc.get("xsml_beam_center"))
                                    or run.beam_centers)
            except ValueError as err:  # recorded; the run is tagged without a centre
                run.beam_centers = {}
                self._errors[f"bad xsml_beam_center: {err}"] += 1
                log.warning("xsml: %s (run %s)", err, doc["uid"])
            if doc.get("xsml_labels"):
                try:
                    run.start_labels = document_labels(doc["xsml_labels"], run_uid=doc["uid"],
                                                       stream="primary", seq_num=0)
                except (ValueError, TypeError) as err:  # the frames are tagged anyway
                    self._errors[f"bad xsml_labels: {type(err).__name__}"] += 1
                    log.warning("xsml: refused xsml_labels of run %s: %s", doc["uid"],
                                str(err)[:300])
            if (not run.beam_centers and getattr(self.tagger, "uses_beam_center", False)
                    and not self._told_no_beam_center):
                self._told_no_beam_center = True  # once per callback
                log.info("xsml: the model reads the beam centre but run %s has none "
                         "(TaggingCallback(beam_center=...) or md['xsml_beam_center']); "
                         "its frames are tagged from the image alone", doc["uid"])

    def _run_for(self, uid: str | None, what: str) -> RunTagState | None:
        run = self._runs.get(uid) if uid else None
        if run is None:
            self._errors[f"{what} for unknown run"] += 1
            log.warning("xsml got a %s for a run it has no start for (%s); passed through", what, uid)
        return run

    def _on_descriptor(self, doc: dict) -> None:
        with self._lock:
            run = self._run_for(doc.get("run_start"), "descriptor")
            if run is None:
                return
            name = doc.get("name", "primary")
            keys = {}
            if name != self.stream_name and (self.streams is None or name in self.streams):
                keys = find_image_keys(doc, self.image_keys)
            run.descriptors[doc["uid"]] = (name, keys)
            if keys:
                run.motor_keys[doc["uid"]] = motor_keys(doc, run.start)
            self._by_descriptor[doc["uid"]] = run
            if any(kind in ("datum", "stream") for kind in keys.values()):
                self._external(run).register("descriptor", doc)
            if keys:
                self._ensure_tag_stream(run)

    def _ensure_tag_stream(self, run: RunTagState) -> None:
        if run.composer is None:
            run.composer = TagStreamComposer(run.start, self.tagger.tags, self.tagger.thresholds,
                                             self.tagger.describe(), self.stream_name,
                                             validate_pages=self.validate_pages)
            run.index = FrameIndex(run.composer.tags, self.stream_name,
                                   min_prob=self.index_min_prob, limit=self.index_limit)
            self.outbox.put("descriptor", run.composer.descriptor)

    def _external(self, run: RunTagState):
        if run.external is None:
            from .external import ExternalFrames

            run.external = ExternalFrames(**self._external_options())
        return run.external

    def _external_options(self) -> dict:
        """How frame files are read: here, or in the tagging process (the same rules)."""
        return {"handler_registry": self.handler_registry, "root_map": self.root_map,
                "retries": self.read_retries, "retry_delay": self.read_retry_delay,
                "allowed_roots": self.allowed_roots, "read_timeout": self.read_timeout}

    def _on_event(self, doc: dict) -> None:
        self._take_events(doc["descriptor"], [doc["seq_num"]], [doc["uid"]], [doc["time"]],
                          {k: [v] for k, v in doc.get("data", {}).items()})

    def _on_event_page(self, doc: dict) -> None:
        self._take_events(doc["descriptor"], list(doc["seq_num"]), list(doc["uid"]),
                          list(doc["time"]), doc.get("data", {}))

    def _take_events(self, descriptor_uid, seq_nums, uids, times, data) -> None:
        with self._lock:
            run = self._by_descriptor.get(descriptor_uid)
            if run is None:
                self._errors["event for unknown descriptor"] += 1
                log.warning("xsml got events for unknown descriptor %s; passed through",
                            descriptor_uid)
                return
            if run.finalized or run.held_stop is not None:
                self._errors["event after stop"] += 1
                log.warning("xsml got events after the stop of run %s; passed through untagged",
                            run.uid)
                return
            stream, keys = run.descriptors[descriptor_uid]
            for key in list(keys):
                if keys[key] == "probe":  # dtype "array" with no shape: decide now
                    values = data.get(key) or []
                    keys[key] = "inline" if values and is_image_value(values[0]) else "none"
                    if keys[key] == "inline":
                        self._ensure_tag_stream(run)
            jobs = []
            motors = run.motor_keys.get(descriptor_uid) or []
            declared = data.get("xsml_labels")  # per-event labels (dicts or JSON strings)
            for i, (seq, uid) in enumerate(zip(seq_nums, uids)):
                run.event_uids[(descriptor_uid, seq)] = uid
                if declared is not None and i < len(declared) and declared[i]:
                    try:
                        run.event_labels[(stream, seq)] = document_labels(
                            declared[i], run_uid=run.uid, stream=stream, seq_num=seq)
                    except (ValueError, TypeError) as err:  # the frames are tagged anyway
                        self._errors[f"bad xsml_labels in event: {type(err).__name__}"] += 1
                        log.warning("xsml: refused xsml_labels of event %s of run %s: %s",
                                    seq, run.uid, str(err)[:300])
                for key, kind in keys.items():
                    if kind == "inline":
                        values = data.get(key)
                        value = values[i] if values is not None and i < len(values) else None
                        if value is None:
                            job = FrameJob(run.uid, stream, seq, uid, key, skip_reason="no_data")
                        else:
                            nbytes = int(getattr(value, "nbytes", 0))
                            job = FrameJob(run.uid, stream, seq, uid, key, source=value,
                                           nbytes=nbytes)
                    elif kind == "datum":
                        values = data.get(key)
                        datum_id = values[i] if values is not None and i < len(values) else None
                        job = self._datum_job(run, stream, seq, uid, key, datum_id)
                    else:  # "stream": frames come with stream_datum; "none": not an image
                        continue
                    # the event's motor positions, kept until all its jobs come back
                    entry = run.positions.get((stream, seq))
                    if entry is None:
                        where = {}
                        for m in motors:
                            values = data.get(m)
                            if values is not None and i < len(values):
                                where[m] = values[i]
                        entry = run.positions[(stream, seq)] = [0, where]
                    entry[0] += 1
                    jobs.append(job)
                    run.pending[id(job)] = job
        for job in jobs:
            job.beam_center = run.beam_center_for(job.key)
            self.worker.submit(job)

    def _datum_job(self, run, stream, seq, uid, key, datum_id) -> FrameJob:
        if not isinstance(datum_id, str):
            return FrameJob(run.uid, stream, seq, uid, key, skip_reason="no_datum_id")
        ext = self._external(run)
        try:
            ref = ext.datum_ref(datum_id)
        except Exception as err:
            reason = getattr(err, "reason", "unknown_datum")
            return FrameJob(run.uid, stream, seq, uid, key, skip_reason=f"{reason}: {err}")
        return FrameJob(run.uid, stream, seq, uid, key, source=lambda: ext.read(ref), ref=ref,
                        ref_docs=ext.documents_for(ref))

    # external-data documents
    def _register_resource(self, name: str, doc: dict) -> None:
        with self._lock:
            run = self._runs.get(doc.get("run_start") or "") or self._latest_open_run()
            if run is None:
                self._errors[f"{name} for unknown run"] += 1
                return
            self._by_resource[doc["uid"]] = run
            self._external(run).register(name, doc)

    def _on_resource(self, doc: dict) -> None:
        self._register_resource("resource", doc)

    def _on_datum(self, doc: dict) -> None:
        with self._lock:
            run = self._by_resource.get(doc.get("resource"))
            if run is not None:
                self._external(run).register("datum", doc)

    def _on_datum_page(self, doc: dict) -> None:
        with self._lock:
            run = self._by_resource.get(doc.get("resource"))
            if run is not None:
                self._external(run).register("datum_page", doc)

    def _on_stream_resource(self, doc: dict) -> None:
        self._register_resource("stream_resource", doc)

    def _on_stream_datum(self, doc: dict) -> None:
        with self._lock:
            run = self._by_resource.get(doc.get("stream_resource"))
            if run is None:
                self._errors["stream_datum for unknown stream_resource"] += 1
                return
            desc = run.descriptors.get(doc.get("descriptor"))
            ext = self._external(run)
            ext.register("stream_datum", doc)
            if desc is None:
                return
            stream, keys = desc
            jobs = []
            for key, seq, ref in ext.stream_refs(doc):
                if keys.get(key) != "stream":
                    continue
                uid = run.event_uids.get((doc["descriptor"], seq), "")
                job = FrameJob(run.uid, stream, seq, uid, key,
                               source=(lambda r=ref: ext.read(r)), ref=ref,
                               ref_docs=ext.documents_for(ref))
                jobs.append(job)
                run.pending[id(job)] = job
        for job in jobs:
            job.beam_center = run.beam_center_for(job.key)
            self.worker.submit(job)

    def _latest_open_run(self) -> RunTagState | None:
        open_runs = [r for r in self._runs.values() if r.held_stop is None]
        return open_runs[-1] if len(open_runs) == 1 else None

    def _on_stop(self, doc: dict) -> None:
        with self._lock:
            run = self._runs.get(doc.get("run_start"))
            if run is None:
                self._errors["stop for unknown run"] += 1
                log.warning("xsml got a stop for a run it has no start for; passed through")
                self.outbox.put("stop", doc)
                return
            run.held_stop = doc
            run.stop_received_at = time.monotonic()
        self._maybe_finalize(run)

    # -------------------------------------------------------------- results
    def _on_results(self, batch: list) -> None:
        """Worker thread: compose tag pages per run, then finish runs that are done."""
        by_run: dict[str, list[FrameResult]] = collections.OrderedDict()
        done: dict[str, list] = collections.defaultdict(list)
        for job, results in batch:
            by_run.setdefault(job.run_uid, []).extend(results)
            done[job.run_uid].append(job)
        for run_uid, results in by_run.items():
            with self._lock:
                run = self._runs.get(run_uid)
                if run is None or run.finalized:
                    self._errors["late results"] += len(results)
                    continue
                for r in results:
                    if not r.event_uid:
                        r.event_uid = run.event_uids.get(self._desc_uid(run, r), "")
                self._record(run, results)
                self._index(run, results)
                n_tags = len(run.composer.tags)  # tags may have grown/shrunk by a hot swap
                for r in results:
                    if r.probs is not None and len(r.probs) != n_tags:
                        r.probs = (list(r.probs) + [float("nan")] * n_tags)[:n_tags]
                self.outbox.put("event_page", run.composer.page(results))
                for job in done[run_uid]:
                    run.pending.pop(id(job), None)
                    entry = run.positions.get((job.stream, job.seq_num))
                    if entry is not None:
                        entry[0] -= 1
                        if entry[0] <= 0:
                            del run.positions[(job.stream, job.seq_num)]
            self.frame_cache.put_probs(run_uid, results, self.tagger.thresholds)
            for listener in list(self._listeners):
                try:
                    listener(run_uid, results)
                except Exception:
                    log.exception("xsml result listener failed")
            self._maybe_finalize(run)

    @staticmethod
    def _desc_uid(run: RunTagState, r: FrameResult):
        for uid, (stream, keys) in run.descriptors.items():
            if stream == r.stream and r.key in keys:
                return (uid, r.seq_num)
        return None

    def _record(self, run: RunTagState, results: list[FrameResult]) -> None:
        for r in results:
            run.frames += 1
            if r.skip_reason:
                run.skipped[r.skip_reason.split(":")[0]] += 1
            else:
                run.tag_counts.update(r.tags)
                run.novel += bool(getattr(r, "novel", False))
                if r.checkpoint and r.checkpoint not in run.checkpoints:
                    run.checkpoints.append(r.checkpoint)

    @staticmethod
    def _index(run: RunTagState, results: list[FrameResult]) -> None:
        if run.index is None or not run.index.complete:
            return
        for r in results:
            entry = run.positions.get((r.stream, r.seq_num))
            run.index.add(r, entry[1] if entry is not None else None)

    def _maybe_finalize(self, run: RunTagState) -> None:
        with self._lock:
            if run.finalized or run.held_stop is None or run.pending:
                return
        self._finalize(run)

    def _finalize(self, run: RunTagState, reason: str | None = None) -> None:
        with self._lock:
            if run.finalized or run.held_stop is None:
                return
            if run.pending and reason:
                leftovers = list(run.pending.values())
                run.pending.clear()
                results = [FrameResult(stream=j.stream, seq_num=j.seq_num, event_uid=j.event_uid,
                                       key=j.key, frame_index=0, probs=None, skip_reason=reason,
                                       checkpoint=self.tagger.checkpoint_id,
                                       latency=time.monotonic() - j.t_in) for j in leftovers]
                self._record(run, results)
                self.outbox.put("event_page", run.composer.page(results))
                log.warning("xsml: %d frames of run %s still pending at stop timeout; recorded "
                            "as skipped", len(results), run.uid)
            run.finalized = True
            stop = run.held_stop
            if run.composer is not None:
                stop = run.composer.stop(stop, self._summary(run))
            self.outbox.put("stop", stop)
            del self._runs[run.uid]
            for uid in run.descriptors:
                self._by_descriptor.pop(uid, None)
            for uid in [u for u, r in self._by_resource.items() if r is run]:
                del self._by_resource[uid]
            self._finished_runs.append({"uid": run.uid, **self._search_summary(run)})
        forget_run = getattr(self.worker, "forget_run", None)
        if forget_run is not None and run.external is not None:
            forget_run(run.uid)  # the tagging process closes the run's files
        if run.external is not None:
            try:
                run.external.forget()
            except Exception:
                log.exception("xsml could not release file handles of run %s", run.uid)

    def _summary(self, run: RunTagState) -> dict[str, Any]:
        out = self._search_summary(run)
        if run.index is not None:
            out[INDEX_KEY] = run.index.summary()
        return out

    def _search_summary(self, run: RunTagState) -> dict[str, Any]:
        return {
            "xsml_stream": self.stream_name,
            "xsml_tags": sorted(run.tag_counts),
            "xsml_tag_counts": {t: int(n) for t, n in sorted(run.tag_counts.items())},
            "xsml_model": run.checkpoints[-1] if run.checkpoints else self.tagger.checkpoint_id,
            "xsml_models": list(run.checkpoints),
            "xsml_frames": int(run.frames),
            "xsml_skipped": {k: int(v) for k, v in sorted(run.skipped.items())},
            "xsml_novel": int(run.novel),
        }

    def _check_held_stops(self) -> None:
        """Outbox thread: release stops held longer than ``stop_timeout``."""
        self.worker.ensure_alive()  # supervise the inference thread about every 0.1 s
        now = time.monotonic()
        with self._lock:
            late = [r for r in self._runs.values() if r.held_stop is not None and not r.finalized
                    and now - r.stop_received_at > self.stop_timeout]
        for run in late:
            self._finalize(run, reason="stop_timeout")

    def _emit_stop_unchanged(self, doc: dict) -> None:
        with self._lock:
            run = self._runs.pop(doc.get("run_start"), None)
            if run is not None:
                run.finalized = True
        self.outbox.put("stop", doc)

    @property
    def finished_runs(self) -> list[dict]:
        """Summaries of the most recent finished runs (newest last)."""
        return list(self._finished_runs)


def _close_at_exit(ref: "weakref.ref[TaggingCallback]") -> None:
    callback = ref()
    if callback is not None:
        try:
            callback.close(timeout=10.0)
        except Exception:  # pragma: no cover - best effort at interpreter exit
            log.exception("xsml could not close the tagging callback at exit")
