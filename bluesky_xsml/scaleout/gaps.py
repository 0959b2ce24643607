"""Detecting what a lossy document bus dropped, and reading it back from the catalog.

0MQ PUB/SUB drops messages silently: a subscriber that connects late misses
the first ones (slow joiner), and a subscriber that falls behind loses
messages at the high-water mark. A tagging worker on the bus therefore checks
what it received against what the documents themselves promise:

* a descriptor, event or stop whose run it never saw a ``start`` for:
  ``missing_start``;
* events of a descriptor it never received (they cannot even be placed in a
  run): ``orphan_events``; at the run's stop, a stream counted in
  ``num_events`` with no descriptor received: ``missing_descriptor``;
* ``seq_num`` jumps within a stream (reported at once) and, at the stop,
  every ``seq_num`` in ``1..num_events[stream]`` not received:
  ``missing_events``;
* a datum or stream_datum whose resource never arrived: ``missing_resource``;
* a run with no ``stop`` after a quiet period: ``missing_stop`` (reported by
  the worker once it has found the stop in the catalog).

:class:`GapDetector` keeps this bookkeeping per run and also tells which run
any document belongs to (:meth:`GapDetector.observe`), which is what the
worker's partition filter needs. :func:`read_stored_frames` reads the frames
a gap lost from the stored run in Tiled, so they can still be tagged.

Examples
--------
>>> from bluesky_xsml.scaleout.gaps import GapDetector
>>> gd = GapDetector()
>>> gd.observe("start", {"uid": "r1", "time": 0})
('r1', [])
>>> gd.observe("descriptor", {"uid": "d1", "run_start": "r1", "name": "primary"})
('r1', [])
>>> gd.observe("event", {"uid": "e1", "descriptor": "d1", "seq_num": 1})
('r1', [])
>>> run, gaps = gd.observe("event", {"uid": "e3", "descriptor": "d1", "seq_num": 3})
>>> [(g.kind, g.stream, g.seq_nums) for g in gaps]
[('missing_events', 'primary', (2,))]
>>> gaps = gd.finish("r1", {"run_start": "r1", "num_events": {"primary": 4}})
>>> [(g.kind, g.stream, g.seq_nums) for g in gaps]
[('missing_events', 'primary', (2, 4))]
>>> gd.missing("r1")
{'primary': [2, 4]}
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..documents.frames import find_image_keys, split_frames

__all__ = ["Gap", "GapDetector", "RunTrack", "read_stored_frames", "stored_image_keys"]

log = logging.getLogger(__name__)

_EVENT_NAMES = ("event", "event_page")


@dataclass(frozen=True)
class Gap:
    """One thing the bus lost.

    Attributes
    ----------
    run_uid : str or None
        The run (``None`` when it cannot be known, e.g. events of a lost descriptor).
    kind : str
        ``missing_start``, ``missing_descriptor``, ``missing_events``,
        ``orphan_events``, ``missing_resource`` or ``missing_stop``.
    stream : str or None
        The event stream concerned, when known.
    seq_nums : tuple of int
        The missing (or orphaned) ``seq_num`` values, when known.
    detail : str
        A human-readable explanation.
    """

    run_uid: str | None
    kind: str
    stream: str | None = None
    seq_nums: tuple[int, ...] = ()
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for reports)."""
        d = asdict(self)
        d["seq_nums"] = list(self.seq_nums)
        return d


@dataclass(eq=False)
class RunTrack:
    """What arrived of one run."""

    uid: str
    start: dict | None = None
    stop: dict | None = None
    descriptors: dict[str, str] = field(default_factory=dict)       # uid -> stream name
    seen: dict[str, set[int]] = field(default_factory=dict)         # stream -> seq_nums
    gaps: list[Gap] = field(default_factory=list)
    last_seen: float = field(default_factory=time.monotonic)
    first_seen: float = field(default_factory=time.monotonic)

    @property
    def start_missing(self) -> bool:
        return self.start is None


class GapDetector:
    """Per-run bookkeeping of received documents, and the gaps in them.

    Unlike the per-run routing of :class:`~bluesky_xsml.documents.routing.RunRouter`
    (which drops documents of runs it has no start for), this index keeps them:
    a descriptor or stop whose start was lost opens a track of its own, since
    what was lost is exactly what it reports.

    Parameters
    ----------
    ignore_streams : iterable of str
        Streams not to check (e.g. tag streams other workers republish).
    """

    def __init__(self, *, ignore_streams: Iterable[str] = ()):
        self.ignore_streams = set(ignore_streams)
        self.runs: dict[str, RunTrack] = {}
        self._descriptor_run: dict[str, str] = {}
        self._resource_run: dict[str, str] = {}
        self.orphans: dict[str, list[int]] = {}       # unknown descriptor uid -> seq_nums
        self.unplaced: list[Gap] = []                  # gaps that belong to no known run

    # ---------------------------------------------------------------- routing
    def run_of(self, name: str, doc: Mapping[str, Any]) -> str | None:
        """The run uid ``doc`` belongs to, if it can be known from what arrived."""
        if name == "start":
            return doc.get("uid")
        if name in ("descriptor", "stop"):
            return doc.get("run_start")
        if name in _EVENT_NAMES:
            return self._descriptor_run.get(doc.get("descriptor"))
        if name in ("resource", "stream_resource"):
            return doc.get("run_start") or self._resource_run.get(doc.get("uid"))
        if name in ("datum", "datum_page"):
            return self._resource_run.get(doc.get("resource"))
        if name == "stream_datum":
            return (self._resource_run.get(doc.get("stream_resource"))
                    or self._descriptor_run.get(doc.get("descriptor")))
        return None

    def _track(self, uid: str) -> tuple[RunTrack, bool]:
        track = self.runs.get(uid)
        if track is None:
            track = self.runs[uid] = RunTrack(uid)
            return track, True
        return track, False

    def _add(self, track: RunTrack | None, gap: Gap) -> Gap:
        (track.gaps if track is not None else self.unplaced).append(gap)
        log.warning("document bus gap: %s", gap.detail)
        return gap

    # -------------------------------------------------------------- observing
    def observe(self, name: str, doc: Mapping[str, Any]) -> tuple[str | None, list[Gap]]:
        """Record one received document.

        Returns
        -------
        (run_uid, gaps)
            The run the document belongs to (``None`` if unknown) and the gaps
            that this document reveals right away.
        """
        gaps: list[Gap] = []
        run_uid = self.run_of(name, doc)
        if name == "start":
            track, new = self._track(doc["uid"])
            if track.start is not None:
                log.warning("start %s received twice; keeping the first", doc["uid"])
            else:
                track.start = dict(doc)
        elif name in ("descriptor", "stop") and run_uid:
            track, new = self._track(run_uid)
            if new:
                gaps.append(self._add(track, Gap(
                    run_uid, "missing_start",
                    detail=f"a {name} of run {run_uid} arrived but its start did not")))
            if name == "descriptor":
                track.descriptors[doc["uid"]] = doc.get("name", "primary")
                self._descriptor_run[doc["uid"]] = run_uid
            else:
                track.stop = dict(doc)
        elif name in _EVENT_NAMES:
            gaps.extend(self._observe_events(name, doc, run_uid))
        elif name in ("resource", "stream_resource") and run_uid:
            self._resource_run[doc["uid"]] = run_uid
        elif name in ("datum", "datum_page", "stream_datum") and run_uid is None:
            key = "stream_resource" if name == "stream_datum" else "resource"
            gaps.append(self._add(None, Gap(
                None, "missing_resource",
                detail=f"a {name} refers to {key} {doc.get(key)!r}, which never arrived")))
        if run_uid and run_uid in self.runs:
            self.runs[run_uid].last_seen = time.monotonic()
        return run_uid, gaps

    def _observe_events(self, name, doc, run_uid) -> list[Gap]:
        seqs = [doc["seq_num"]] if name == "event" else list(doc.get("seq_num") or [])
        if run_uid is None:
            desc = doc.get("descriptor")
            first = desc not in self.orphans
            self.orphans.setdefault(desc, []).extend(int(s) for s in seqs)
            if first:
                return [self._add(None, Gap(
                    None, "orphan_events", seq_nums=tuple(int(s) for s in seqs),
                    detail=f"events of descriptor {desc!r}, which never arrived: their run "
                           "cannot be known until its stop or the catalog tells"))]
            return []
        track = self.runs[run_uid]
        stream = track.descriptors[doc["descriptor"]]
        if stream in self.ignore_streams:
            return []
        seen = track.seen.setdefault(stream, set())
        top = max(seen) if seen else 0
        gaps = []
        for s in sorted(int(s) for s in seqs):
            if s > top + 1:
                skipped = tuple(x for x in range(top + 1, s) if x not in seen)
                if skipped:
                    gaps.append(self._add(track, Gap(
                        run_uid, "missing_events", stream, skipped,
                        detail=f"run {run_uid} stream {stream!r}: seq_num jumped from {top} to "
                               f"{s}")))
            seen.add(s)
            top = max(top, s)
        return gaps

    # -------------------------------------------------------------- finishing
    def finish(self, run_uid: str, stop: Mapping[str, Any] | None = None) -> list[Gap]:
        """Compare what arrived of a run with its stop's ``num_events``.

        Parameters
        ----------
        run_uid : str
        stop : dict, optional
            The run's stop document (default: the one received, if any). Pass
            the stored one when the bus lost it.

        Returns
        -------
        list of Gap
            ``missing_descriptor`` and ``missing_events`` gaps found now (the
            ``seq_num`` jumps reported earlier are superseded by these).
        """
        track, _ = self._track(run_uid)
        if stop is not None and track.stop is None:
            track.stop = dict(stop)
        if track.stop is None:
            raise ValueError(f"run {run_uid} has no stop yet; pass the stored one")
        counts = track.stop.get("num_events") or {}
        received = set(track.descriptors.values())
        gaps = []
        for stream, n in sorted(counts.items()):
            if stream in self.ignore_streams or not n:
                continue
            if stream not in received:
                gaps.append(self._add(track, Gap(
                    run_uid, "missing_descriptor", stream, tuple(range(1, int(n) + 1)),
                    detail=f"run {run_uid}: stream {stream!r} has {n} events but its "
                           "descriptor never arrived")))
                continue
            lost = tuple(sorted(set(range(1, int(n) + 1)) - track.seen.get(stream, set())))
            if lost:
                gaps.append(self._add(track, Gap(
                    run_uid, "missing_events", stream, lost,
                    detail=f"run {run_uid} stream {stream!r}: {len(lost)} of {n} events "
                           "never arrived")))
        return gaps

    def missing(self, run_uid: str) -> dict[str, list[int]]:
        """``{stream: [seq_num, ...]}`` not received, by the stop's ``num_events``.

        Every event of every stream counts as missing when the run's start was
        lost (the live tagger could not place any of them).
        """
        track = self.runs.get(run_uid)
        if track is None or track.stop is None:
            raise ValueError(f"run {run_uid} has no stop yet")
        out: dict[str, list[int]] = {}
        for stream, n in sorted((track.stop.get("num_events") or {}).items()):
            if stream in self.ignore_streams or not n:
                continue
            want = set(range(1, int(n) + 1))
            have = set() if track.start is None else track.seen.get(stream, set())
            if stream not in set(track.descriptors.values()):
                have = set()
            lost = sorted(want - have)
            if lost:
                out[stream] = lost
        return out

    def stale(self, quiet: float, *, now: float | None = None) -> list[str]:
        """Runs without a stop that have received nothing for ``quiet`` seconds."""
        now = time.monotonic() if now is None else now
        return [uid for uid, t in self.runs.items() if t.stop is None and now - t.last_seen > quiet]

    def forget(self, run_uid: str) -> None:
        """Drop a finished run's bookkeeping."""
        track = self.runs.pop(run_uid, None)
        if track is None:
            return
        for uid in track.descriptors:
            self._descriptor_run.pop(uid, None)
        for uid in [u for u, r in self._resource_run.items() if r == run_uid]:
            del self._resource_run[uid]


# ----------------------------------------------------------------- recovery
def stored_image_keys(run_node, stream: str) -> dict[str, str]:
    """Image data keys of a stored stream (from its descriptor in the catalog)."""
    meta = run_node[stream].metadata
    return find_image_keys({"name": stream, "data_keys": dict(meta.get("data_keys") or {})})


def read_stored_frames(run_node, stream: str, key: str,
                       seq_nums: Iterable[int]) -> list[tuple[int, int, np.ndarray | None, str]]:
    """Read the frames of events ``seq_nums`` of ``stream``/``key`` from a stored run.

    Only the rows asked for are transferred (Tiled array slicing).

    Parameters
    ----------
    run_node : BlueskyRun
        The run, from the Tiled client.
    stream, key : str
        Event stream and image data key.
    seq_nums : iterable of int

    Returns
    -------
    list of (seq_num, frame_index, frame, reason)
        One entry per frame (a stack value gives several); ``frame`` is
        ``None`` and ``reason`` says why when the catalog does not have it.
    """
    wanted = sorted({int(s) for s in seq_nums})
    out: list[tuple[int, int, np.ndarray | None, str]] = []
    try:
        node = run_node[stream]
        stored_seq = [int(s) for s in np.asarray(node["seq_num"].read()).ravel()]
        array = node[key]
    except Exception as err:  # noqa: BLE001 - recorded as the frames' skip reason
        reason = f"not_in_catalog: {stream}/{key}: {type(err).__name__}: {err}"
        return [(s, 0, None, reason) for s in wanted]
    row_of = {s: i for i, s in enumerate(stored_seq)}
    for s in wanted:
        row = row_of.get(s)
        if row is None:
            out.append((s, 0, None, f"not_in_catalog: {stream} seq_num {s} is not stored"))
            continue
        try:
            value = np.asarray(array[row])
        except Exception as err:  # noqa: BLE001 - recorded as the skip reason
            out.append((s, 0, None, f"catalog_read_error: {type(err).__name__}: {err}"))
            continue
        for i, frame in enumerate(split_frames(value)):
            out.append((s, i, frame, ""))
    return out
