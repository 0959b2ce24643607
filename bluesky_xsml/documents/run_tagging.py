"""One run's tagging: the per-run router the tagging callback builds for each run.

:class:`~bluesky_xsml.documents.callback.TaggingCallback` hands documents to a
:class:`~bluesky_xsml.documents.routing.RunRouter` whose factory builds one
:class:`RunTagRouter` per run. That object holds everything the callback knows
about its run (:class:`RunTagState`): the descriptors and which of their data
keys hold frames, the run's tag stream (composer and frame index), the frames
still being tagged, the held stop and the run summary. It turns the run's
events (inline arrays, datum ids, stream datums) into
:class:`~bluesky_xsml.inference.worker.FrameJob`\\ s, takes their results,
and emits the tag stream and, once every frame is accounted for, the stop
with the summary.

What it shares with the other runs (the model, the worker, the delivery
outbox, the options, the error counts, one lock) it reaches through its host,
the callback; see :class:`RunHost`.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from event_model import DocumentRouter

from ..inference.worker import FrameJob
from ..readout import run_readouts
from ..summary import RunSummary
from .beam_center import parse_beam_center
from .compose import FrameResult, TagStreamComposer
from .external import ExternalFrames
from .frame_index import INDEX_KEY, FrameIndex, motor_keys
from .frames import find_image_keys, is_image_value
from .labelling import document_labels

__all__ = ["RunHost", "RunTagRouter", "RunTagState"]

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
    summary: RunSummary = field(default_factory=RunSummary)
    event_labels: dict = field(default_factory=dict)     # (stream, seq_num) -> {tag: value}
    start_labels: dict = field(default_factory=dict)     # validated start xsml_labels
    motor_keys: dict = field(default_factory=dict)       # descriptor uid -> motor data keys
    positions: dict = field(default_factory=dict)        # (stream, seq) -> [jobs left, {key: v}]
    index: Any = None                                     # FrameIndex, with the tag stream
    beam_centers: dict = field(default_factory=dict)     # image key (or "*") -> (x, y)
    readouts: dict = field(default_factory=dict)         # image key (or "*") -> Readout

    @property
    def uid(self) -> str:
        return self.start["uid"]

    @property
    def frames(self) -> int:
        """Frames accounted for so far (tagged or skipped)."""
        return self.summary.frames

    def beam_center_for(self, key: str):
        """The beam centre ``(x, y)`` of frames under data key ``key``, or None."""
        return self.beam_centers.get(key, self.beam_centers.get("*"))

    def readout_for(self, key: str):
        """The :class:`~bluesky_xsml.readout.Readout` of frames under ``key``, or None."""
        return self.readouts.get(key, self.readouts.get("*"))


class RunHost(Protocol):
    """What a :class:`RunTagRouter` uses of the callback that built it."""

    tagger: Any
    stream_name: str
    image_keys: list[str] | None
    streams: set[str] | None
    validate_pages: bool
    index_min_prob: float
    index_limit: int
    beam_centers: dict
    readouts: dict
    _lock: Any

    def emit(self, name: str, doc: dict) -> None: ...
    def submit(self, jobs: list[FrameJob]) -> None: ...
    def count_error(self, what: str, n: int = 1) -> None: ...
    def external_options(self) -> dict: ...
    def note_run_without_beam_center(self, run_uid: str) -> None: ...
    def run_finished(self, router: RunTagRouter) -> None: ...


class RunTagRouter(DocumentRouter):
    """The documents and results of one run (built per run by the callback's factory).

    Document methods run on the caller's thread (the RunEngine's);
    :meth:`take_results` and :meth:`finalize` on the worker's or the delivery
    thread. State changes happen under the host's lock; jobs are submitted
    outside it (a submit may wait for memory budget the worker frees).
    """

    def __init__(self, host: RunHost, start_doc: dict) -> None:
        super().__init__()
        self.host = host
        self.state = RunTagState(start=start_doc)

    @property
    def uid(self) -> str:
        return self.state.uid

    # ------------------------------------------------------------ documents
    def start(self, doc: dict) -> None:
        try:
            self._setup(doc)
        except Exception as err:  # the run is tagged with the defaults
            # never raise here: event-model's RunRouter would then route none of the run's
            # documents to this object, and its stop would be lost
            self.host.count_error(f"start: {type(err).__name__}")
            log.exception("xsml could not read the start of run %s; tagging it with defaults",
                          doc.get("uid"))

    def _setup(self, doc: dict) -> None:
        host, run = self.host, self.state
        with host._lock:
            run.beam_centers = dict(host.beam_centers)
            try:  # the run's own centre replaces the beamline's
                run.beam_centers = (parse_beam_center(doc.get("xsml_beam_center"))
                                    or run.beam_centers)
            except ValueError as err:  # recorded; the run is tagged without a centre
                run.beam_centers = {}
                host.count_error(f"bad xsml_beam_center: {err}")
                log.warning("xsml: %s (run %s)", err, doc["uid"])
            # the run's own readout replaces the beamline's; a bad one is recorded and the
            # run is tagged without a readout
            run.readouts, err = run_readouts(doc, host.readouts)
            if err:
                host.count_error(f"bad xsml_readout: {err}")
                log.warning("xsml: %s (run %s); its frames are tagged as counts", err,
                            doc["uid"])
            if doc.get("xsml_labels"):
                try:
                    run.start_labels = document_labels(doc["xsml_labels"], run_uid=doc["uid"],
                                                       stream="primary", seq_num=0)
                except (ValueError, TypeError) as err:  # the frames are tagged anyway
                    host.count_error(f"bad xsml_labels: {type(err).__name__}")
                    log.warning("xsml: refused xsml_labels of run %s: %s", doc["uid"],
                                str(err)[:300])
            if not run.beam_centers and getattr(host.tagger, "uses_beam_center", False):
                host.note_run_without_beam_center(doc["uid"])

    def descriptor(self, doc: dict) -> None:
        host, run = self.host, self.state
        with host._lock:
            name = doc.get("name", "primary")
            keys = {}
            if name != host.stream_name and (host.streams is None or name in host.streams):
                keys = find_image_keys(doc, host.image_keys)
            run.descriptors[doc["uid"]] = (name, keys)
            if keys:
                run.motor_keys[doc["uid"]] = motor_keys(doc, run.start)
            if any(kind in ("datum", "stream") for kind in keys.values()):
                self._external().register("descriptor", doc)
            if keys:
                self._ensure_tag_stream()

    def event_page(self, doc: dict) -> None:
        self._take_events(doc["descriptor"], list(doc["seq_num"]), list(doc["uid"]),
                          doc.get("data", {}))

    def resource(self, doc: dict) -> None:
        with self.host._lock:
            self._external().register("resource", doc)

    def datum_page(self, doc: dict) -> None:
        with self.host._lock:
            self._external().register("datum_page", doc)

    def stream_resource(self, doc: dict) -> None:
        with self.host._lock:
            self._external().register("stream_resource", doc)

    def stream_datum(self, doc: dict) -> None:
        host, run = self.host, self.state
        with host._lock:
            desc = run.descriptors.get(doc.get("descriptor"))
            ext = self._external()
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
        self._submit(jobs)

    def stop(self, doc: dict) -> None:
        with self.host._lock:
            self.state.held_stop = doc
            self.state.stop_received_at = time.monotonic()
        self.maybe_finalize()

    # --------------------------------------------------------------- frames
    def _take_events(self, descriptor_uid, seq_nums, uids, data) -> None:
        host, run = self.host, self.state
        with host._lock:
            if run.finalized or run.held_stop is not None:
                host.count_error("event after stop")
                log.warning("xsml got events after the stop of run %s; passed through untagged",
                            run.uid)
                return
            stream, keys = run.descriptors[descriptor_uid]
            for key in list(keys):
                if keys[key] == "probe":  # dtype "array" with no shape: decide now
                    values = data.get(key) or []
                    keys[key] = "inline" if values and is_image_value(values[0]) else "none"
                    if keys[key] == "inline":
                        self._ensure_tag_stream()
            jobs = []
            motors = run.motor_keys.get(descriptor_uid) or []
            declared = data.get("xsml_labels")  # per-event labels (dicts or JSON strings)
            for i, (seq, uid) in enumerate(zip(seq_nums, uids, strict=False)):
                run.event_uids[(descriptor_uid, seq)] = uid
                if declared is not None and i < len(declared) and declared[i]:
                    try:
                        run.event_labels[(stream, seq)] = document_labels(
                            declared[i], run_uid=run.uid, stream=stream, seq_num=seq)
                    except (ValueError, TypeError) as err:  # the frames are tagged anyway
                        host.count_error(f"bad xsml_labels in event: {type(err).__name__}")
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
                        job = self._datum_job(stream, seq, uid, key, datum_id)
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
        self._submit(jobs)

    def _datum_job(self, stream, seq, uid, key, datum_id) -> FrameJob:
        run_uid = self.state.uid
        if not isinstance(datum_id, str):
            return FrameJob(run_uid, stream, seq, uid, key, skip_reason="no_datum_id")
        ext = self._external()
        try:
            ref = ext.datum_ref(datum_id)
        except Exception as err:  # noqa: BLE001 - any failure is the frame's recorded skip
            reason = getattr(err, "reason", "unknown_datum")
            return FrameJob(run_uid, stream, seq, uid, key, skip_reason=f"{reason}: {err}")
        return FrameJob(run_uid, stream, seq, uid, key, source=lambda: ext.read(ref), ref=ref,
                        ref_docs=ext.documents_for(ref))

    def _submit(self, jobs: list[FrameJob]) -> None:
        for job in jobs:
            job.beam_center = self.state.beam_center_for(job.key)
            job.readout = self.state.readout_for(job.key)
        if jobs:
            self.host.submit(jobs)

    def _ensure_tag_stream(self) -> None:
        host, run = self.host, self.state
        if run.composer is None:
            tagger = host.tagger
            run.composer = TagStreamComposer(run.start, tagger.tags, tagger.thresholds,
                                             tagger.describe(), host.stream_name,
                                             validate_pages=host.validate_pages)
            run.index = FrameIndex(run.composer.tags, host.stream_name,
                                   min_prob=host.index_min_prob, limit=host.index_limit)
            host.emit("descriptor", run.composer.descriptor)

    def _external(self) -> ExternalFrames:
        if self.state.external is None:
            self.state.external = ExternalFrames(**self.host.external_options())
        return self.state.external

    # -------------------------------------------------------------- results
    def take_results(self, results: list[FrameResult], jobs: list[FrameJob]) -> bool:
        """Worker thread: emit ``results`` (of ``jobs``) as a tag page; False if too late."""
        host, run = self.host, self.state
        with host._lock:
            if run.finalized:
                host.count_error("late results", len(results))
                return False
            for r in results:
                if not r.event_uid:
                    r.event_uid = run.event_uids.get(self._descriptor_key(r), "")
            run.summary.add(results)
            self._index(results)
            n_tags = len(run.composer.tags)  # tags may have grown/shrunk by a hot swap
            for r in results:
                if r.probs is not None and len(r.probs) != n_tags:
                    r.probs = (list(r.probs) + [float("nan")] * n_tags)[:n_tags]
            host.emit("event_page", run.composer.page(results))
            for job in jobs:
                run.pending.pop(id(job), None)
                entry = run.positions.get((job.stream, job.seq_num))
                if entry is not None:
                    entry[0] -= 1
                    if entry[0] <= 0:
                        del run.positions[(job.stream, job.seq_num)]
        return True

    def _descriptor_key(self, r: FrameResult):
        for uid, (stream, keys) in self.state.descriptors.items():
            if stream == r.stream and r.key in keys:
                return (uid, r.seq_num)
        return None

    def _index(self, results: list[FrameResult]) -> None:
        run = self.state
        if run.index is None or not run.index.complete:
            return
        for r in results:
            entry = run.positions.get((r.stream, r.seq_num))
            run.index.add(r, entry[1] if entry is not None else None)

    def declared_labels(self, stream: str, seq_num: int) -> dict:
        """Labels the run's documents declared for one event (start's, then the event's)."""
        with self.host._lock:
            declared = dict(self.state.start_labels)
            declared.update(self.state.event_labels.get((stream, seq_num), {}))
        return declared

    # ------------------------------------------------------------- the stop
    @property
    def holds_stop(self) -> bool:
        """Whether the run's stop came and is held (not emitted yet)."""
        return self.state.held_stop is not None and not self.state.finalized

    def overdue(self, now: float, stop_timeout: float) -> bool:
        """Whether the stop has been held longer than ``stop_timeout`` seconds."""
        run = self.state
        return self.holds_stop and now - run.stop_received_at > stop_timeout

    def maybe_finalize(self) -> None:
        """Emit the stop if it came and every frame of the run is accounted for."""
        run = self.state
        with self.host._lock:
            if run.finalized or run.held_stop is None or run.pending:
                return
        self.finalize()

    def finalize(self, reason: str | None = None) -> None:
        """Emit the held stop with the summary; frames still pending are skipped with ``reason``."""
        host, run = self.host, self.state
        with host._lock:
            if run.finalized or run.held_stop is None:
                return
            if run.pending and reason:
                leftovers = list(run.pending.values())
                run.pending.clear()
                results = [FrameResult(stream=j.stream, seq_num=j.seq_num, event_uid=j.event_uid,
                                       key=j.key, frame_index=0, probs=None, skip_reason=reason,
                                       checkpoint=host.tagger.checkpoint_id,
                                       latency=time.monotonic() - j.t_in) for j in leftovers]
                run.summary.add(results)
                host.emit("event_page", run.composer.page(results))
                log.warning("xsml: %d frames of run %s still pending at stop timeout; recorded "
                            "as skipped", len(results), run.uid)
            run.finalized = True
            stop = run.held_stop
            if run.composer is not None:
                stop = run.composer.stop(stop, self.summary(with_index=True))
            host.emit("stop", stop)
        host.run_finished(self)

    def mark_finalized(self) -> None:
        """The stop went out unchanged (handling it failed): take no more results."""
        with self.host._lock:
            self.state.finalized = True

    def summary(self, *, with_index: bool = False) -> dict[str, Any]:
        """The run summary as the stop carries it (``with_index``: with ``xsml_index``)."""
        run = self.state
        out = run.summary.as_dict(stream_name=self.host.stream_name,
                                  checkpoint_id=self.host.tagger.checkpoint_id, novel=True)
        if with_index and run.index is not None:
            out[INDEX_KEY] = run.index.summary()
        return out

    def release_files(self) -> None:
        """Close the files the run's frames were read from."""
        if self.state.external is not None:
            try:
                self.state.external.forget()
            except Exception:
                log.exception("xsml could not release file handles of run %s", self.uid)


def by_run(batch: list) -> collections.OrderedDict:
    """``[(job, results), ...]`` grouped per run: ``{run_uid: (results, jobs)}``, in order."""
    out: collections.OrderedDict = collections.OrderedDict()
    for job, results in batch:
        entry = out.setdefault(job.run_uid, ([], []))
        entry[0].extend(results)
        entry[1].append(job)
    return out
