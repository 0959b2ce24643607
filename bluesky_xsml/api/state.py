"""What the service knows: recent results, per-run tags, thumbnails, rates, the feed.

:class:`ServiceState` listens to a live
:class:`~bluesky_xsml.documents.callback.TaggingCallback` (its result and input
listeners run on the inference thread, so they only copy small things and
return) and feeds a :class:`~bluesky_xsml.steering.policy.PolicyEngine`. HTTP
handlers read from it; live-feed clients get messages pushed into their own
bounded queues on their event loop (a slow client loses messages, counted,
instead of slowing tagging).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .runinfo import RunBook
from .schemas import finite

__all__ = ["ServiceState", "FeedClient", "Thumbnail"]

log = logging.getLogger(__name__)

_RATE_WINDOW_S = 10.0


@dataclass
class Thumbnail:
    """A frame's log-scaled preview: 8-bit intensities and a mask of invalid pixels."""

    image: np.ndarray          # (S, S) uint8, log_max channel scaled to 0..255 per frame
    invalid: np.ndarray        # (S, S) bool: masked or outside the detector


def _thumbnail(x) -> Thumbnail:
    """The preview of one preprocessed ``(C, S, S)`` input."""
    x = np.asarray(x)
    img = x[1].astype(np.float32)  # log_max: log1p of the block maximum
    invalid = (x[3] > 0.5) | (x[4] > 0.5)
    valid = img[~invalid]
    lo, hi = (float(valid.min()), float(valid.max())) if valid.size else (0.0, 1.0)
    scaled = (img - lo) * (255.0 / max(hi - lo, 1e-6))
    return Thumbnail(np.clip(scaled, 0, 255).astype(np.uint8), invalid)


@dataclass(eq=False)
class _Run:
    uid: str
    frames: list = field(default_factory=list)
    dropped: int = 0
    tagged: int = 0
    skipped: int = 0
    tag_counts: collections.Counter = field(default_factory=collections.Counter)
    first_time: float = 0.0
    last_time: float = 0.0


class FeedClient:
    """One live-feed connection: a bounded asyncio queue filled from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, maxsize: int):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue(maxsize)
        self.dropped = 0
        self.closed = False

    def push(self, message: tuple[str, int | None, str] | None) -> bool:
        """Queue ``(event, id, data)`` (None ends the feed); False if the loop is gone."""
        try:
            self.loop.call_soon_threadsafe(self._put, message)
            return True
        except RuntimeError:  # the event loop was closed
            self.closed = True
            return False

    def _put(self, message) -> None:
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            if message is None:  # make room for the end marker
                self.queue.get_nowait()
                self.queue.put_nowait(None)
            self.dropped += 1


def _finite(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if v == v and abs(v) != float("inf") else None


def frames_json(run_uid: str, records: list[dict]) -> str:
    """``{"run_uid": ..., "frames": [...]}`` from records' pre-serialised JSON."""
    frames = ",".join(r["_json"] for r in records)
    return f'{{"run_uid": {json.dumps(run_uid)}, "frames": [{frames}]}}'


class ServiceState:
    """Shared state of the service, fed by a tagging callback.

    Parameters
    ----------
    callback : TaggingCallback, optional
        The live callback; without one the service only serves policy and
        decisions.
    settings : ServiceSettings
    policy_engine : PolicyEngine, optional
        The engine whose decisions are served (default: a new one with the
        default policy). The state feeds it every result unless it is already
        a result listener of ``callback``.
    """

    def __init__(self, callback=None, *, settings, policy_engine=None):
        from ..steering.policy import PolicyEngine

        self.callback = callback
        self.settings = settings
        self.engine = policy_engine if policy_engine is not None else PolicyEngine()
        self.started = time.time()
        self._lock = threading.Lock()
        self._next_id = 0
        self._latest: collections.deque = collections.deque(maxlen=settings.latest_frames)
        self._runs: collections.OrderedDict[str, _Run] = collections.OrderedDict()
        self._thumbs: collections.OrderedDict[tuple, Thumbnail] = collections.OrderedDict()
        self._rate: collections.deque = collections.deque()  # (monotonic time, n results)
        self._clients: list[FeedClient] = []
        self._feed_dropped = 0
        self._last_ref: dict[str, Any] | None = None
        self._closed = False
        self._feeds_engine = False
        self._attached = False
        self._thumbs_on_demand = False
        self._status_cache: tuple[float, dict] | None = None
        #: Scan ids, plans, run states and motor positions, from the documents.
        self.runbook = RunBook(max_runs=max(settings.max_runs, 1),
                               max_events=max(settings.max_frames_per_run, 1),
                               default_readouts=getattr(callback, "readouts", None))

    # -------------------------------------------------------------- wiring
    def attach(self) -> None:
        """Start listening to the callback and the policy engine (idempotent)."""
        if self._attached:
            return
        self._attached = True
        self.engine.add_listener(self._on_decision)
        cb = self.callback
        if cb is None:
            return
        listeners = getattr(cb, "_listeners", [])
        self._feeds_engine = not any(fn == self.engine.update for fn in listeners)
        cb.add_result_listener(self._on_results)
        if hasattr(cb, "add_document_listener"):
            cb.add_document_listener(self._on_document)
        if getattr(cb, "isolation", "thread") == "process" and hasattr(cb, "frame_input"):
            # the inputs stay in the tagging process: a thumbnail is made when it is asked for
            # (find_frame), not for every frame, which would bring 192 KiB a frame across
            self._thumbs_on_demand = True
        elif hasattr(cb, "add_input_listener"):
            cb.add_input_listener(self._on_inputs)

    def close(self) -> None:
        """Stop reacting to results and end every live feed."""
        self._closed = True
        self.engine.remove_listener(self._on_decision)
        self.end_feeds()

    # ------------------------------------------------------ RunEngine side
    def _on_document(self, name: str, doc: dict) -> None:
        """Note scan ids, run states and positions; announce run starts and stops."""
        if self._closed:
            return
        uid = self.runbook.document(name, doc)
        if uid is not None:
            run = self.run(uid)
            if run is not None:
                self._publish("run", None, json.dumps(finite(run)))

    # ------------------------------------------------- inference-thread side
    def _on_results(self, run_uid: str, results: list) -> None:
        if self._closed:
            return
        tags = tuple(self.callback.tagger.tags) if self.callback is not None else ()
        records = []
        now = time.monotonic()
        with self._lock:
            run = self._runs.get(run_uid)
            if run is None:
                run = self._runs[run_uid] = _Run(uid=run_uid, first_time=time.time())
                while len(self._runs) > self.settings.max_runs:
                    self._runs.popitem(last=False)
            for r in results:
                rec = self._record(run_uid, r, tags)
                rec["_json"] = json.dumps(rec)  # serialised once, served many times
                emb = getattr(r, "embedding", None)
                if emb is not None:
                    rec["_emb"] = emb  # for /similar; not part of the JSON
                records.append(rec)
                self._latest.append(rec)
                if len(run.frames) < self.settings.max_frames_per_run:
                    run.frames.append(rec)
                else:
                    run.dropped += 1
                if rec["skip_reason"]:
                    run.skipped += 1
                else:
                    run.tagged += 1
                    run.tag_counts.update(rec["tags"])
                run.last_time = rec["time"]
            self._rate.append((now, len(records)))
            while self._rate and now - self._rate[0][0] > _RATE_WINDOW_S:
                self._rate.popleft()
            if records:
                last = records[-1]
                self._last_ref = {"id": last["id"], "run_uid": run_uid,
                                  "stream": last["stream"], "seq_num": last["seq_num"]}
        if records:
            self._publish("frames", records[-1]["id"], frames_json(run_uid, records))
        if self._feeds_engine:
            try:
                self.engine.update(run_uid, results)
            except Exception:  # the policy must never break tagging
                log.exception("xsml policy engine failed on a batch")

    def _record(self, run_uid: str, r, tags: tuple) -> dict:
        rid = self._next_id
        self._next_id += 1
        probs = None
        if r.probs is not None:
            probs = {t: (round(float(p), 5) if p == p else None)
                     for t, p in zip(tags, r.probs, strict=False)}
        lat = float(r.latency)
        where = self.runbook.where(run_uid, r.stream, int(r.seq_num))
        return {"id": rid, "run_uid": run_uid, "stream": r.stream, "seq_num": int(r.seq_num),
                "key": r.key, "frame_index": int(r.frame_index), "event_uid": r.event_uid or "",
                "tags": list(r.tags), "probs": probs, "skip_reason": r.skip_reason or "",
                "checkpoint": r.checkpoint or "", "latency_s": lat if lat == lat else None,
                "time": float(r.time), "novelty": _finite(getattr(r, "novelty", None)),
                "novel": bool(getattr(r, "novel", False)), **where}

    def _on_inputs(self, items: list) -> None:
        """Keep a small log-scaled preview of each tagged frame."""
        if self._closed or not self.settings.thumbnails:
            return
        self._keep_thumbs([((job.run_uid, job.stream, int(job.seq_num), job.key, int(idx)),
                            _thumbnail(x)) for job, idx, x in items])

    def _keep_thumbs(self, thumbs: list) -> None:
        with self._lock:
            for ident, thumb in thumbs:
                self._thumbs[ident] = thumb
                self._thumbs.move_to_end(ident)
            while len(self._thumbs) > self.settings.thumbnails:
                self._thumbs.popitem(last=False)

    def _on_decision(self, decision) -> None:
        if self._closed:
            return
        with self._lock:
            after = dict(self._last_ref) if self._last_ref else None
        payload = {"decision": json.loads(decision.model_dump_json()), "after": after,
                   "policy": self.engine.policy.name, "where": self.where(decision)}
        self._publish("decision", None, json.dumps(payload))

    def where(self, decision) -> list[dict]:
        """Scan id, plan and motor positions of each evidence frame of ``decision``."""
        return [finite(self.runbook.where(f.run_uid or decision.run_uid, f.stream, f.seq_num))
                for f in decision.evidence]

    # --------------------------------------------------------------- feed
    def _publish(self, event: str, rid: int | None, data: str) -> None:
        with self._lock:
            clients = list(self._clients)
        gone = [c for c in clients if not c.push((event, rid, data))]
        if gone:
            with self._lock:
                for c in gone:
                    if c in self._clients:
                        self._clients.remove(c)

    def subscribe(self, loop: asyncio.AbstractEventLoop, *,
                  limit: int | None = None) -> FeedClient | None:
        """A new live-feed client whose queue lives on ``loop`` (None: ``limit`` reached)."""
        client = FeedClient(loop, self.settings.feed_queue)
        with self._lock:
            if limit is not None and len(self._clients) >= limit:
                return None
            self._clients.append(client)
        return client

    def unsubscribe(self, client: FeedClient) -> None:
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)
            self._feed_dropped += client.dropped

    def end_feeds(self) -> None:
        """Tell every live-feed client to finish (server shutdown)."""
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            c.push(None)

    @property
    def feed_clients(self) -> int:
        return len(self._clients)

    @property
    def feed_dropped(self) -> int:
        with self._lock:
            return self._feed_dropped + sum(c.dropped for c in self._clients)

    # -------------------------------------------------------------- reads
    def latest(self, n: int, *, after: int | None = None, tag: str | None = None) -> list[dict]:
        """The newest ``n`` results (oldest first), optionally after an id or with a tag."""
        with self._lock:
            items = list(self._latest)
        if after is not None:
            items = [r for r in items if r["id"] > after]
        if tag is not None:
            items = [r for r in items if tag in r["tags"]]
        return items[-n:] if n else []

    def latest_json(self, n: int, *, after: int | None = None, tag: str | None = None) -> str:
        """:meth:`latest` as the JSON of a ``FramesOut`` (records are serialised once)."""
        last = self.last_id
        items = self.latest(n, after=after, tag=tag)
        return f'{{"frames": [{",".join(r["_json"] for r in items)}], "last_id": {last}}}'

    @property
    def last_id(self) -> int:
        return self._next_id - 1

    def runs(self) -> list[dict]:
        """Every run with results or documents the service remembers, newest first."""
        with self._lock:
            uids = list(self._runs)
        seen = set(uids)
        uids += [u for u in self.runbook.uids() if u not in seen]
        out = [r for r in (self.run(u) for u in uids) if r is not None]
        return sorted(out, key=lambda r: r["first_time"], reverse=True)

    def run(self, run_uid: str) -> dict | None:
        """One run's counts and what its documents said (scan id, plan, state, positions)."""
        with self._lock:
            run = self._runs.get(run_uid)
        info = self.runbook.info(run_uid)
        if run is None and info is None:
            return None
        out = self._summary(run if run is not None else _Run(uid=run_uid))
        if info is not None:
            start = info.pop("start_time")
            out["first_time"] = out["first_time"] or start
            out.update(info, start_time=start)
        return out

    def run_frames(self, run_uid: str, offset: int, limit: int) -> tuple[int, list[dict]] | None:
        with self._lock:
            run = self._runs.get(run_uid)
            if run is None:
                return None
            return len(run.frames), run.frames[offset:offset + limit]

    @staticmethod
    def _summary(run: _Run) -> dict:
        return {"run_uid": run.uid, "frames": len(run.frames) + run.dropped,
                "tagged": run.tagged, "skipped": run.skipped, "dropped": run.dropped,
                "tag_counts": dict(run.tag_counts), "first_time": run.first_time,
                "last_time": run.last_time}

    def find_frame(self, run_uid: str, seq_num: int, *, stream: str, key: str | None,
                   frame_index: int, thumbnail: bool = True) -> tuple[dict | None,
                                                                    Thumbnail | None]:
        """The latest record and thumbnail of one frame (either may be None).

        With a tagging process (``isolation="process"``) a thumbnail not kept
        yet is made from the frame's input in its label cache (one call there);
        ``thumbnail=False`` skips that.
        """

        def match(rec: dict) -> bool:
            return (rec["run_uid"] == run_uid and rec["seq_num"] == seq_num
                    and rec["stream"] == stream and rec["frame_index"] == frame_index
                    and (key is None or rec["key"] == key))

        with self._lock:
            run = self._runs.get(run_uid)
            record = None
            for rec in reversed(self._latest):  # recent frames, also those over the run cap
                if match(rec):
                    record = rec
                    break
            if record is None and run is not None:
                record = next((rec for rec in reversed(run.frames) if match(rec)), None)
            thumb = None
            if key is not None:
                thumb = self._thumbs.get((run_uid, stream, seq_num, key, frame_index))
            else:
                for ident in reversed(self._thumbs):
                    if ident[:3] == (run_uid, stream, seq_num) and ident[4] == frame_index:
                        thumb = self._thumbs[ident]
                        break
        if (thumbnail and thumb is None and record is not None and self._thumbs_on_demand
                and self.settings.thumbnails and self._label_cache_size() != 0):
            thumb = self._fetch_thumb(record)
        return record, thumb

    def _label_cache_size(self) -> int | None:
        """The callback's ``label_cache_size`` (None when it has no such option)."""
        return getattr(getattr(self.callback, "options", None), "label_cache_size", None)

    def no_thumbnail_reason(self) -> str:
        """Why a frame may have no thumbnail here, in words for a 404's detail."""
        if not self.settings.thumbnails:
            return "thumbnails are off (the service's thumbnails setting is 0)"
        if self._thumbs_on_demand:
            size = self._label_cache_size()
            if size == 0:
                return ("the label cache is disabled (label_cache_size=0); with "
                        "isolation='process' thumbnails are made from the frames in the "
                        "tagging process's label cache")
            return ("with isolation='process' only frames still in the tagging process's "
                    f"label cache (the last {size} tagged) have one")
        return f"only the last {self.settings.thumbnails} tagged frames have one"

    def _fetch_thumb(self, record: dict) -> Thumbnail | None:
        """The thumbnail of ``record``'s frame from the input in the tagging process's cache."""
        ident = (record["run_uid"], record["stream"], record["seq_num"], record["key"],
                 record["frame_index"])
        try:
            x = self.callback.frame_input(ident[0], ident[2], stream=ident[1], key=ident[3],
                                          frame_index=ident[4])
        except Exception:  # no preview is no error
            log.exception("xsml could not fetch a frame's input for its thumbnail")
            return None
        if x is None:
            return None
        thumb = _thumbnail(x)
        self._keep_thumbs([(ident, thumb)])
        return thumb

    def similar(self, run_uid: str, seq_num: int, *, stream: str, key: str | None,
                frame_index: int, k: int) -> tuple[dict, list[dict]] | None:
        """The ``k`` remembered frames most like one frame (cosine of embeddings).

        ``None`` when the frame is not remembered; ``(record, [])`` when it has
        no embedding (the tagger has no novelty statistics).
        """
        import numpy as np

        record, _ = self.find_frame(run_uid, seq_num, stream=stream, key=key,
                                    frame_index=frame_index, thumbnail=False)
        if record is None:
            return None
        if "_emb" not in record:
            return record, []
        with self._lock:
            pool = {r["id"]: r for run in self._runs.values() for r in run.frames if "_emb" in r}
            pool.update((r["id"], r) for r in self._latest if "_emb" in r)
        pool.pop(record["id"], None)
        cands = [r for r in pool.values() if len(r["_emb"]) == len(record["_emb"])]
        if not cands:
            return record, []
        sims = np.stack([r["_emb"] for r in cands]).astype(np.float32) @ \
            np.asarray(record["_emb"], np.float32)
        top = np.argsort(-sims, kind="stable")[:k]
        return record, [{**cands[i], "similarity": float(sims[i])} for i in top]

    def frames_per_s(self) -> float:
        now = time.monotonic()
        with self._lock:
            recent = [(t, n) for t, n in self._rate if now - t <= _RATE_WINDOW_S]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1.0)
        return float(sum(n for _, n in recent) / span)

    def status(self, *, max_age: float = 0.0) -> dict:
        """The live status, JSON-able (NaN becomes None).

        ``max_age``: reuse a status computed less than this many seconds ago
        (pollers hitting the endpoint hundreds of times a second then cost
        the tagger almost nothing).
        """
        cached = self._status_cache
        if cached is not None and time.monotonic() - cached[0] < max_age:
            return cached[1]
        out = self._compute_status()
        self._status_cache = (time.monotonic(), out)
        return out

    def _compute_status(self) -> dict:
        cb = self.callback
        s = cb.status() if cb is not None else {}
        ft = getattr(cb, "finetuner", None) if cb is not None else None
        lat = s.get("latency_s", {})
        out = {
            "checkpoint_id": s.get("checkpoint_id", ""),
            "device": s.get("device", ""),
            "queue_jobs": int(s.get("queue_jobs", 0)),
            "frames_per_s": round(self.frames_per_s(), 3),
            "latency_p50_s": lat.get("p50"),
            "latency_p99_s": lat.get("p99"),
            "frames_submitted": int(s.get("frames_submitted", 0)),
            "frames_tagged": int(s.get("frames_tagged", 0)),
            "frames_skipped": int(s.get("frames_skipped", 0)),
            "skipped_by_reason": {str(k): int(v) for k, v in
                                  s.get("skipped_by_reason", {}).items()},
            "overflow": int(s.get("overflow", 0)),
            "open_runs": int(s.get("open_runs", 0)),
            "labels_ignored": int(s.get("labels_ignored", 0)),
            "labels_refused": int(s.get("labels_refused", 0)),
            "finetune": ft.status() if ft is not None else None,
            "decision": self.engine.current,
            "policy": self.engine.policy.name,
            "feed_clients": self.feed_clients,
            "feed_dropped": self.feed_dropped,
            "uptime_s": time.time() - self.started,
        }
        out = {k: finite(v) for k, v in out.items() if k != "decision"}
        out["decision"] = json.loads(self.engine.current.model_dump_json())
        return out
