"""A tagging worker on the document bus: ``xsml worker``.

::

    bluesky-0MQ-proxy --in-address 127.0.0.1:5577 --out-address 127.0.0.1:5578
    xsml worker --zmq 127.0.0.1:5578 --tiled http://tiled:8000?api_key=... --partition 0/2
    xsml worker --zmq 127.0.0.1:5578 --tiled http://tiled:8000?api_key=... --partition 1/2

Each worker reads every document from the bus (a :class:`DocumentSource`),
keeps the runs of its own partition (:class:`Partition`: a stable hash of the
start uid), and tags their frames with a :class:`TaggingCallback` as they
arrive; frames stored in files (resource/datum, stream_resource/stream_datum)
are read from those files, so the bus carries references rather than frames.

When a run is over, the worker waits until the run is stored in the catalog
(the beamline's own writer stores it), checks what the bus lost against the
stored stop (:class:`GapDetector`), reads the lost frames back from the
catalog and tags them too, and writes one tag stream into the stored run
(:func:`bluesky_xsml.catalog.append.append_tag_stream`). With ``--republish``
it also publishes the run's tag documents (start, tag descriptor, tag event
pages, stop with the summary) to a second 0MQ proxy.

Every frame is accounted for: tagged live, tagged from the catalog, or
recorded as skipped with a reason. Each finished run, each gap and each error
is reported as one JSON line (``--report``, default standard output).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from event_model import DocumentRouter

from ..catalog.append import TagStreamExistsError, append_tag_stream, tagged_checkpoints
from ..documents.callback import TaggingCallback
from ..documents.compose import FrameResult, TagStreamComposer
from ..documents.routing import RunRouter
from ..inference.results import FrameItem, frames_to_results
from ..readout import readout_option, run_readouts
from ..summary import RunSummary
from .gaps import Gap, GapDetector, read_stored_frames, stored_image_keys
from .partition import Partition
from .retries import is_server_error
from .transport import DocumentSource

__all__ = [
    "BusWorker",
    "add_arguments",
    "compose_tag_documents",
    "frame_results_from_page",
    "main",
    "plain",
    "summarize",
    "tag_frames",
]

log = logging.getLogger(__name__)

#: Live skip reasons that mean "the bus lost the reference", so the catalog may have the frame.
RECOVERABLE_SKIPS = ("unknown_datum", "no_datum_id", "no_data")
PAGE_SIZE = 500


# ------------------------------------------------------------------ helpers
def frame_results_from_page(page: Mapping[str, Any], tags: Sequence[str]) -> list:
    """FrameResults back from a tag-stream event page (as the callback emits them)."""
    data = page["data"]
    out = []
    for i in range(len(page["seq_num"])):
        reason = str(data["skip_reason"][i])
        probs = None if reason else [float(data[t][i]) for t in tags]
        out.append(FrameResult(
            stream=str(data["source_stream"][i]), seq_num=int(data["source_seq_num"][i]),
            event_uid=str(data["source_uid"][i]), key=str(data["source_key"][i]),
            frame_index=int(data["frame_index"][i]), probs=probs, skip_reason=reason,
            checkpoint=str(data["checkpoint"][i]),
            tags=tuple(t for t in str(data["tags"][i]).split(",") if t),
            latency=float(data["latency"][i]), time=float(page["time"][i])))
    return out


def tag_frames(tagger, items: Sequence[tuple], *, batch_size: int = 32,
               readouts: Mapping[str, Any] | None = None) -> list:
    """Tag frames read back from a catalog.

    Parameters
    ----------
    tagger : Tagger
    items : sequence of (stream, seq_num, event_uid, key, frame_index, frame, reason)
        ``frame`` is ``None`` (and ``reason`` says why) when it could not be read.
    batch_size : int
    readouts : dict, optional
        The run's :class:`~bluesky_xsml.readout.Readout` per image key (``"*"``:
        any), as live tagging uses them (:func:`~bluesky_xsml.readout.run_readouts`).

    Returns
    -------
    list of FrameResult
        One per item, in order (see
        :func:`~bluesky_xsml.inference.results.frames_to_results`); frames the
        model refuses are skipped with the reason it gives.
    """
    readouts = readouts or {}
    frames = [FrameItem(stream=stream, seq_num=int(seq), event_uid=uid or "", key=key,
                        frame_index=int(index), frame=frame,
                        skip_reason="" if frame is not None else (reason or "not_in_catalog"),
                        readout=readouts.get(key, readouts.get("*")))
              for stream, seq, uid, key, index, frame, reason in items]
    out: list = []
    for start in range(0, len(frames), batch_size):
        out.extend(frames_to_results(tagger, frames[start:start + batch_size]))
    return out


def summarize(results: Sequence, *, stream_name: str, checkpoint_id: str) -> dict[str, Any]:
    """The stop summary of a run's tag results (same keys as :class:`TaggingCallback`)."""
    summary = RunSummary()
    summary.add(results)
    return summary.as_dict(stream_name=stream_name, checkpoint_id=checkpoint_id)


def compose_tag_documents(start: Mapping, stop: Mapping, results: Sequence, tagger, *,
                          stream_name: str = "xsml_tags") -> list[tuple[str, dict]]:
    """A run's tag documents: descriptor, event pages (sorted by source), stop with summary.

    The descriptor is bound to ``start`` with event-model; every document is
    schema-validated.
    """
    composer = TagStreamComposer(start, tagger.tags, tagger.thresholds, tagger.describe(),
                                 stream_name, validate_pages=True)
    ordered = sorted(results, key=lambda r: (r.stream, r.key, r.seq_num, r.frame_index))
    docs: list[tuple[str, dict]] = [("descriptor", composer.descriptor)]
    for i in range(0, len(ordered), PAGE_SIZE):
        docs.append(("event_page", composer.page(ordered[i:i + PAGE_SIZE])))
    summary = summarize(ordered, stream_name=stream_name, checkpoint_id=tagger.checkpoint_id)
    docs.append(("stop", composer.stop(stop, summary)))
    return docs


@dataclass(eq=False)
class _Run:
    uid: str
    results: list = field(default_factory=list)
    queued: bool = False
    stale_checks: int = 0


class _TagCapture(DocumentRouter):
    """One run's documents as the callback emits them: keeps its tag pages' results."""

    def __init__(self, worker: BusWorker, run_uid: str) -> None:
        super().__init__()
        self.worker = worker
        self.run_uid = run_uid
        self.tag_descriptor: str | None = None

    def descriptor(self, doc: dict) -> None:
        if doc.get("name") == self.worker.stream_name:
            self.tag_descriptor = doc["uid"]

    def event_page(self, doc: dict) -> None:
        if self.tag_descriptor is None or doc["descriptor"] != self.tag_descriptor:
            return
        results = frame_results_from_page(doc, self.worker.tagger.tags)
        with self.worker._lock:
            run = self.worker._runs.get(self.run_uid)
            if run is not None:
                run.results.extend(results)

    def stop(self, doc: dict) -> None:
        self.worker._queue_finish(self.run_uid)


# ------------------------------------------------------------------ the worker
class BusWorker:
    """Tags the runs of one partition from a document source.

    Parameters
    ----------
    tagger : Tagger
    source : DocumentSource
        Where documents come from (:class:`~bluesky_xsml.scaleout.transport.ZMQSource`).
    catalog : CatalogOfBlueskyRuns, optional
        The runs container where the runs are stored by the beamline's writer;
        the tag stream is appended there, and lost frames are read from there.
    partition : Partition
        Which runs this worker tags.
    republish : callable, optional
        ``republish(name, doc)`` for the tag documents of each finished run
        (e.g. a ``bluesky.callbacks.zmq.Publisher``).
    stream_name : str
        Name of the tag stream.
    stop_quiet : float
        Seconds without documents after which a run with no stop is looked up
        in the catalog (its stop may have been lost).
    give_up_after : int
        Lookups of a run with no stop (one per ``stop_quiet``) before it is
        reported ``incomplete`` and forgotten.
    store_timeout : float
        Longest wait, after a run's stop, for the run to appear stored.
    report : callable, optional
        ``report(dict)`` for each JSON-able report line.
    callback_options : dict, optional
        Keyword options for :class:`TaggingCallback` (``threads``, ``max_batch``...).
    """

    def __init__(self, tagger, source: DocumentSource, *, catalog=None,
                 partition: Partition | None = None, republish: Callable | None = None,
                 stream_name: str = "xsml_tags", stop_quiet: float = 30.0,
                 give_up_after: int = 10, store_timeout: float = 60.0,
                 report: Callable[[dict], None] | None = None,
                 callback_options: Mapping[str, Any] | None = None):
        if catalog is None and republish is None:
            raise ValueError("a worker needs somewhere to put tags: give a catalog (--tiled) "
                             "and/or a republish target (--republish)")
        self.tagger = tagger
        self.source = source
        self.catalog = catalog
        self.partition = partition if partition is not None else Partition()
        self.republish = republish
        self.stream_name = stream_name
        self.stop_quiet = float(stop_quiet)
        self.give_up_after = int(give_up_after)
        self.store_timeout = float(store_timeout)
        self._report = report or (lambda d: print(json.dumps(d), flush=True))
        self.gaps = GapDetector(ignore_streams=())
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self._glock = threading.RLock()             # guards self.gaps (main and finisher)
        self._other_stale: collections.Counter = collections.Counter()
        self._ignored_descriptors: dict[str, str] = {}  # tag streams on the bus: uid -> run
        self._finish_queue: queue.Queue = queue.Queue()
        self._inject: queue.Queue = queue.Queue()   # documents recovered from the catalog
        self._stopping = threading.Event()
        self.counts = collections.Counter()
        # the callback's output, routed per run: each run collects its own tag pages
        self._captured = RunRouter([self._capture_factory], on_unrouted=self._capture_unrouted)
        opts = {"stop_timeout": 120.0, **dict(callback_options or {})}
        self.callback = TaggingCallback(tagger, downstream=[self._capture],
                                        stream_name=stream_name, **opts)
        self._finisher = threading.Thread(target=self._finish_loop, name="xsml-finisher",
                                          daemon=True)
        self._finisher.start()

    # ------------------------------------------------------------ reporting
    def report(self, event: str, **fields: Any) -> None:
        line = {"event": event, "partition": str(self.partition), "time": time.time(), **fields}
        try:
            self._report(line)
        except Exception:  # a report sink must never stop tagging
            log.exception("could not write a report line")

    def _report_gaps(self, gaps: list[Gap]) -> None:
        for gap in gaps:
            if gap.run_uid is None or self.partition.owns(gap.run_uid):
                self.counts["gaps"] += 1
                self.report("gap", **gap.to_dict())

    # ------------------------------------------------------------ documents
    def _is_tag_stream(self, name: str, doc: Mapping) -> bool:
        return name == "descriptor" and str(doc.get("name", "")).startswith(self.stream_name)

    def handle(self, name: str, doc: dict) -> None:
        """Take one document from the bus."""
        self.counts["documents"] += 1
        if self._is_tag_stream(name, doc):
            self._ignored_descriptors[doc["uid"]] = doc.get("run_start", "")
            return  # tag streams other taggers put on the bus are not frames
        if name in ("event", "event_page") and doc.get("descriptor") in self._ignored_descriptors:
            return
        if name == "stop" and self._ignored_descriptors:
            run = doc.get("run_start")
            for uid in [u for u, r in self._ignored_descriptors.items() if r == run]:
                del self._ignored_descriptors[uid]
        with self._glock:
            run_uid, gaps = self.gaps.observe(name, doc)
            if run_uid is not None and not self.partition.owns(run_uid):
                if name == "stop":
                    self.gaps.forget(run_uid)
                return
            track = self.gaps.runs.get(run_uid) if run_uid is not None else None
            start_seen = track is not None and track.start is not None
        self._report_gaps(gaps)
        if run_uid is None:
            return
        with self._lock:
            self._runs.setdefault(run_uid, _Run(run_uid))
        if start_seen:
            self.callback(name, doc)          # tagged live; its stop comes back via _capture
        elif name == "stop":
            self._queue_finish(run_uid)       # start lost: nothing was tagged live
        if name == "start":
            self.counts["runs"] += 1
            self.report("run_start", run=run_uid)

    def _capture(self, name: str, doc: dict) -> None:
        """Downstream of the callback (its delivery thread): collect tag pages and stops."""
        self._captured(name, doc)

    def _capture_factory(self, name: str, start: dict):
        """Per run, downstream of the callback: the run's own tag pages, then its stop."""
        return [_TagCapture(self, start["uid"])], []

    def _capture_unrouted(self, name: str, doc: dict, reason: str, run_uid: str | None) -> None:
        if name == "stop":  # a stop the callback passed through: finish the run all the same
            self._queue_finish(doc.get("run_start"))

    def _queue_finish(self, run_uid: str) -> None:
        with self._lock:
            run = self._runs.get(run_uid)
            if run is None or run.queued:
                return
            run.queued = True
        self._finish_queue.put(run_uid)

    # ------------------------------------------------------------ main loop
    def run(self, *, poll: float = 0.2, idle_exit: float | None = None) -> None:
        """Read and handle documents until :meth:`stop` is called or the source closes.

        Parameters
        ----------
        poll : float
            Longest wait for a document before housekeeping.
        idle_exit : float, optional
            Also return after this many seconds with no document and no run open.
        """
        last_doc = time.monotonic()
        next_check = time.monotonic() + min(self.stop_quiet, 1.0)
        self.report("ready", source=repr(self.source))
        while not self._stopping.is_set():
            try:
                name, doc = self._inject.get_nowait()
            except queue.Empty:
                item = self.source.get(poll)
                if item is None:
                    if self.source.closed:
                        break
                else:
                    name, doc = item
                    last_doc = time.monotonic()
            else:
                item = (name, doc)
            if item is not None:
                try:
                    self.handle(name, doc)
                except Exception as err:  # never let one document stop the worker
                    self.counts["errors"] += 1
                    log.exception("could not handle a %s document", name)
                    self.report("error", where=f"handle {name}", error=repr(err))
            now = time.monotonic()
            if now >= next_check:
                next_check = now + min(self.stop_quiet, 1.0)
                self._check_stale()
            if idle_exit is not None and now - last_doc > idle_exit and not self.busy:
                break

    @property
    def busy(self) -> bool:
        """Whether any run of this partition is still open or being finished."""
        with self._lock:
            return bool(self._runs)

    def _check_stale(self) -> None:
        with self._glock:
            stale = self.gaps.stale(self.stop_quiet)
            for uid in stale:
                self.gaps.runs[uid].last_seen = time.monotonic()
        for uid in stale:
            if not self.partition.owns(uid):  # another worker's run that lost its stop
                self._other_stale[uid] += 1
                if self._other_stale[uid] >= self.give_up_after:
                    del self._other_stale[uid]
                    with self._glock:
                        self.gaps.forget(uid)
                continue
            with self._lock:
                run = self._runs.setdefault(uid, _Run(uid))
                if run.queued:
                    continue
                run.stale_checks += 1
                checks = run.stale_checks
            stop = self._stored_stop(uid)
            if stop is not None:
                gap = Gap(uid, "missing_stop", detail=f"run {uid}: the stop never arrived; "
                                                      "taking the stored one")
                with self._glock:
                    if uid in self.gaps.runs:
                        self.gaps.runs[uid].gaps.append(gap)
                self._report_gaps([gap])
                self._inject.put(("stop", stop))
            elif checks >= self.give_up_after:
                self.report("incomplete", run=uid,
                            detail="no stop on the bus or in the catalog; giving up")
                with self._glock:
                    self.gaps.forget(uid)
                with self._lock:
                    self._runs.pop(uid, None)

    def _stored_stop(self, uid: str) -> dict | None:
        if self.catalog is None:
            return None
        try:
            return plain(self.catalog[uid].metadata.get("stop")) or None
        except KeyError:
            return None
        except Exception:
            log.exception("could not look up run %s in the catalog", uid)
            return None

    # ------------------------------------------------------------ finishing
    def _finish_loop(self) -> None:
        while True:
            uid = self._finish_queue.get()
            if uid is None:
                return
            try:
                self.finish(uid)
            except Exception as err:
                self.counts["errors"] += 1
                log.exception("could not finish run %s", uid)
                self.report("error", run=uid, where="finish", error=f"{type(err).__name__}: {err}")
            finally:
                with self._glock:
                    self.gaps.forget(uid)
                with self._lock:
                    self._runs.pop(uid, None)

    def _wait_stored(self, uid: str):
        deadline = time.monotonic() + self.store_timeout
        delay = 0.05
        while True:
            try:
                node = self.catalog[uid]
                if node.metadata.get("stop"):
                    return node
            except KeyError:
                pass
            if time.monotonic() > deadline:
                return None
            time.sleep(delay)
            delay = min(1.0, delay * 2)

    def finish(self, uid: str) -> dict:
        """Reconcile, recover, compose and write one run's tag stream (finisher thread)."""
        with self._lock:
            run = self._runs.get(uid) or _Run(uid)
            results = list(run.results)
        with self._glock:
            track = self.gaps.runs.get(uid)
        node = None
        if self.catalog is not None:
            node = self._wait_stored(uid)
            if node is None:
                self.report("error", run=uid, where="store",
                            error=f"run not stored within {self.store_timeout} s; its "
                                  f"{len(results)} live tag results were not written")
                return {}
            start, stop = plain(node.metadata["start"]), plain(node.metadata["stop"])
        else:
            start = track.start if track is not None else None
            stop = track.stop if track is not None else None
            if start is None or stop is None:
                self.report("error", run=uid, where="finish",
                            error="start or stop lost on the bus and no catalog to recover from")
                return {}
        with self._glock:
            final_gaps = self.gaps.finish(uid, stop)
            lost = self.gaps.missing(uid)
            track = self.gaps.runs.get(uid)
            n_gaps = len(track.gaps) if track is not None else 0
        self._report_gaps(final_gaps)
        # frames the live tagger skipped because a reference was lost on the bus
        keep = []
        retry: dict[tuple[str, str], set[int]] = collections.defaultdict(set)
        for r in results:
            if r.skip_reason.split(":")[0] in RECOVERABLE_SKIPS and node is not None:
                retry[(r.stream, r.key)].add(r.seq_num)
            else:
                keep.append(r)
        # recovered frames are converted with the readout the live ones were
        readouts, _ = run_readouts(start, self.callback.readouts)
        recovered = self._recover(node, lost, retry, readouts)
        all_results = keep + recovered
        if not all_results:
            self.report("run_done", run=uid, frames=0, live=0, recovered=0, written=None,
                        gaps=n_gaps, detail="no detector frames")
            return {}
        docs = compose_tag_documents(start, stop, all_results, self.tagger,
                                     stream_name=self.stream_name)
        written = None
        if node is not None:
            done = tagged_checkpoints(plain(node.metadata))
            if self.tagger.checkpoint_id in done:  # e.g. this worker restarted mid-run
                self.report("run_done", run=uid, frames=len(all_results), live=len(keep),
                            recovered=len(recovered), written=None, gaps=n_gaps,
                            detail=f"already tagged by {self.tagger.checkpoint_id} in "
                                   f"{done[self.tagger.checkpoint_id]!r}; nothing written")
                return {}
            descriptor = docs[0][1]
            pages = [d for n, d in docs if n == "event_page"]
            summary = {k: v for k, v in docs[-1][1].items() if k.startswith("xsml_")}
            written = self._append(node, descriptor, pages, summary)
        if self.republish is not None:
            for name, doc in [("start", start), *docs]:
                self.republish(name, doc)
        summary = docs[-1][1]
        line = {"run": uid, "frames": len(all_results), "live": len(keep),
                "recovered": len(recovered), "skipped": summary["xsml_skipped"],
                "written": _stream_name_of(written), "gaps": n_gaps}
        self.counts["frames"] += len(all_results)
        self.counts["recovered"] += len(recovered)
        self.report("run_done", **line)
        return line

    def _append(self, node, descriptor, pages, summary):
        """``append_tag_stream``, retried after a server error (a partial stream removed)."""
        for attempt in range(3):
            try:
                return append_tag_stream(node, descriptor, pages, summary)
            except TagStreamExistsError:
                if attempt == 0:
                    raise  # someone else's stream: never overwritten
                # our previous attempt left its stream behind (its stop update never happened)
                node.base.delete_contents(descriptor["name"], recursive=True,
                                          external_only=False)
            except Exception as err:
                if attempt == 2 or not is_server_error(err):
                    raise
                log.warning("appending to run %s: server error (%s); retrying",
                            descriptor["run_start"], err)
                time.sleep(1.0 + attempt)
        return append_tag_stream(node, descriptor, pages, summary)

    def _recover(self, node, lost: Mapping[str, list[int]],
                 retry: Mapping[tuple[str, str], set[int]],
                 readouts: Mapping[str, Any] | None = None) -> list:
        """Tag, from the catalog, the frames of ``lost`` events and of ``retry`` frames."""
        wanted: dict[tuple[str, str], set[int]] = collections.defaultdict(set)
        for (stream, key), seqs in retry.items():
            wanted[(stream, key)] |= seqs
        for stream, seqs in lost.items():
            if node is None:
                continue
            try:
                keys = stored_image_keys(node, stream)
            except Exception:
                log.exception("cannot read the stored descriptor of stream %r", stream)
                keys = {}
            for key in keys:
                wanted[(stream, key)] |= set(seqs)
        if node is None:  # no catalog: account for what the bus lost
            return [FrameResult(stream=s, seq_num=q, event_uid="", key="", frame_index=0,
                                probs=None, skip_reason="lost_on_bus",
                                checkpoint=self.tagger.checkpoint_id)
                    for s, seqs in lost.items() for q in seqs]
        items = []
        for (stream, key), seqs in sorted(wanted.items()):
            for seq, index, frame, reason in read_stored_frames(node, stream, key, seqs):
                items.append((stream, seq, "", key, index, frame, reason))
        return tag_frames(self.tagger, items, readouts=readouts)

    # ------------------------------------------------------------ lifecycle
    def stop(self) -> None:
        """Ask :meth:`run` to return (safe from signal handlers and other threads)."""
        self._stopping.set()

    def close(self, timeout: float = 60.0) -> None:
        """Finish runs already over, then release the source and the tagger's threads."""
        self.source.close()
        self.callback.close(timeout=min(timeout, 30.0))   # emits held stops -> finish queue
        self._finish_queue.put(None)
        self._finisher.join(timeout)
        if self.republish is not None and hasattr(self.republish, "close"):
            self.republish.close()

    def status(self) -> dict[str, Any]:
        with self._lock:
            open_runs = len(self._runs)
        return {"partition": str(self.partition), "open_runs": open_runs, **self.counts,
                "callback": self.callback.status()}


def plain(obj: Any) -> Any:
    """Deep copy of ``obj`` with every mapping a ``dict`` and every sequence a ``list``.

    Tiled hands metadata back as read-only views; event-model's schema
    validation wants plain JSON types.

    >>> from types import MappingProxyType
    >>> plain(MappingProxyType({"a": (1, MappingProxyType({"b": 2}))}))
    {'a': [1, {'b': 2}]}
    """
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def _stream_name_of(written: Any) -> str | None:
    if written is None:
        return None
    if isinstance(written, str):
        return written
    for attr in ("stream", "stream_name", "name"):
        value = getattr(written, attr, None)
        if isinstance(value, str):
            return value
    if isinstance(written, Mapping):
        return str(written.get("stream_name") or written.get("name") or "")
    return str(written)


# ------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--zmq", required=True, metavar="HOST:PORT",
                        help="output port of a bluesky-0MQ-proxy, e.g. 127.0.0.1:5578")
    parser.add_argument("--tiled", metavar="URI",
                        help="Tiled server holding the runs (http(s)://...?api_key=...)")
    parser.add_argument("--container", default="raw",
                        help="CatalogOfBlueskyRuns container on the server (default: raw)")
    parser.add_argument("--partition", default="0/1", type=Partition.parse, metavar="i/N",
                        help="tag the runs of partition i of N (default 0/1: all runs)")
    parser.add_argument("--republish", metavar="HOST:PORT",
                        help="input port of a second 0MQ proxy to publish tag documents to")
    parser.add_argument("--model", metavar="CKPT", help="checkpoint (default: packaged model)")
    parser.add_argument("--stream-name", default="xsml_tags",
                        help="name of the tag stream (default xsml_tags)")
    parser.add_argument("--prefix", default="", help="0MQ publisher prefix to listen to")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="decode (and republish) pickled documents, bluesky's default "
                             "encoding: whoever can publish to the proxy can then run code "
                             "here. Default: msgpack, which cannot run code")
    parser.add_argument("--stop-quiet", type=float, default=30.0, metavar="S",
                        help="seconds of silence before a run without stop is looked up")
    parser.add_argument("--store-timeout", type=float, default=60.0, metavar="S",
                        help="longest wait, after a run's stop, for the run to appear stored "
                             "(default 60)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for tagging")
    parser.add_argument("--readout", default=None, metavar="JSON",
                        help="the detector readout for runs whose start metadata gives none "
                             "(xsml_readout), as JSON: one readout, e.g. '{\"gain\": 3.6, "
                             "\"offset\": 100, \"saturated_value\": 65535}', or "
                             "{image key: readout}")
    parser.add_argument("--report", metavar="FILE", help="JSON-lines report (default: stdout)")
    parser.add_argument("--idle-exit", type=float, default=None, metavar="S",
                        help="exit after S seconds with no documents and no open run")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from ..inference.tagger import Tagger
    from .transport import ZMQSource

    if not args.tiled and not args.republish:
        print("xsml worker: give --tiled URI (write tags into stored runs) and/or "
              "--republish HOST:PORT (publish tag documents)", file=sys.stderr)
        return 2
    options: dict[str, Any] = {} if args.threads is None else {"threads": args.threads}
    if getattr(args, "readout", None):  # the callback's default; a run's xsml_readout wins
        try:
            options["readout"] = readout_option(args.readout)
        except ValueError as err:  # ConfigurationError, before any connection
            print(f"xsml worker: {err}", file=sys.stderr)
            return 2
    serializer = "pickle" if args.trust_pickle else "msgpack"
    tagger = Tagger.load(args.model)
    catalog = None
    if args.tiled:
        from ..catalog.embedded import connect

        catalog = connect(args.tiled, container=args.container or None)
    republisher = None
    if args.republish:
        from .serialization import publisher

        republisher = publisher(args.republish, prefix=args.prefix.encode(),
                                serializer=serializer)
    report_file = open(args.report, "a", buffering=1) if args.report else None

    def report(line: dict) -> None:
        text = json.dumps(line, default=str)
        if report_file is not None:
            report_file.write(text + "\n")
        else:
            print(text, flush=True)

    source = ZMQSource(args.zmq, prefix=args.prefix.encode(), serializer=serializer).start()
    if not source.ready.wait(30) or source.error is not None:
        print(f"xsml worker: cannot subscribe to {args.zmq}: {source.error}", file=sys.stderr)
        return 1
    worker = BusWorker(tagger, source, catalog=catalog, partition=args.partition,
                       republish=republisher, stream_name=args.stream_name,
                       stop_quiet=args.stop_quiet, store_timeout=args.store_timeout,
                       report=report, callback_options=options)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: worker.stop())
    try:
        worker.run(idle_exit=args.idle_exit)
    finally:
        worker.close()
        worker.report("exit", **{k: v for k, v in worker.counts.items()})
        if report_file is not None:
            report_file.close()
    return 0
