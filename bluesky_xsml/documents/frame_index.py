"""A small per-run index of the frames that carry tags, stored in the stop document.

Reading a run's tag stream from Tiled costs one HTTP request per stream, and
each request costs tens of milliseconds of server work whatever its size
(``benchmarks/bench_query.py``). A frame-level query over a hundred runs then
takes seconds even when a handful of frames match. The index avoids that: the
stop document of each run carries, under ``xsml_index``, the frames whose
probability for some tag is at least ``min_prob``, with their probability per
tag, their source (stream, seq_num, key, frame index), the tag event's time,
tags and checkpoint, and the positions of the run's motors at that frame. A
search over the catalog returns the stop documents of many runs per request,
so :func:`bluesky_xsml.query.find_frames` answers from them without reading
any stream.

The index is bounded: past ``limit`` frames it is dropped and marked
``complete: false``, and queries read that run's streams as before. It
describes one tag stream (``stream``); a re-tag that writes another stream
makes queries read the streams again.

Layout (columns are lists of equal length, one entry per indexed frame)::

    {"version": 1, "stream": "xsml_tags", "min_prob": 0.5, "complete": true,
     "limit": 1000, "positions_known": true,
     "frames": {"stream": [...], "seq_num": [...], "key": [...],
                "frame_index": [...], "time": [...], "tags": [...],
                "checkpoint": [...], "novelty": [...],  # novelty: None if unavailable
                "novel": [...]},
     "positions": {"<motor data key>": [...]},   # None where a frame lacks it
     "hits": {"<tag>": {"row": [...], "prob": [...]}}}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["FrameIndex", "INDEX_KEY", "INDEX_VERSION", "motor_keys"]

#: The stop document key that holds the index.
INDEX_KEY = "xsml_index"
INDEX_VERSION = 1

_FRAME_FIELDS = ("stream", "seq_num", "key", "frame_index", "time", "tags", "checkpoint",
                 "novelty", "novel")


def motor_keys(descriptor: Mapping, start: Mapping) -> list[str]:
    """Scalar data keys of a descriptor that hold positions of the start document's motors."""
    motors = set(start.get("motors") or [])
    if not motors:
        return []
    return [k for k, dk in (descriptor.get("data_keys") or {}).items()
            if (dk.get("object_name") in motors or k in motors) and not dk.get("shape")
            and "external" not in dk]


def _number(value: Any) -> Any:
    """A JSON-safe scalar: numbers as float/int, NaN/inf as None, anything else as str."""
    if hasattr(value, "item"):
        try:
            value = value.item()
        except (TypeError, ValueError):
            return None
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


class FrameIndex:
    """Collects the tagged frames of one run worth indexing; see the module docstring.

    Parameters
    ----------
    tags : sequence of str
        The tag stream's tag names, in the order of each result's ``probs``.
    stream : str
        Name of the tag stream this index describes.
    min_prob : float
        A frame is indexed when its probability for some tag reaches this; each
        indexed frame lists the tags at or above it under ``hits``.
    limit : int
        Most frames indexed; past it the index is dropped (``complete: false``).
    """

    def __init__(self, tags: Sequence[str], stream: str, *, min_prob: float = 0.5,
                 limit: int = 1000):
        if not 0.0 <= float(min_prob) <= 1.0:
            raise ValueError(f"min_prob must be in [0, 1], got {min_prob!r}")
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit!r}")
        self.tags = tuple(tags)
        self.stream = stream
        self.min_prob = float(min_prob)
        self.limit = int(limit)
        self.complete = True
        self.positions_known = True
        self._frames: dict[str, list] = {f: [] for f in _FRAME_FIELDS}
        self._positions: dict[str, list] = {}
        self._hits: dict[str, dict[str, list]] = {}

    def __len__(self) -> int:
        return len(self._frames["seq_num"])

    def add(self, result, positions: Mapping[str, Any] | None = None) -> bool:
        """Index one :class:`~bluesky_xsml.results.FrameResult` if it reaches ``min_prob``.

        ``positions`` maps the run's motor data keys to their values at this
        frame (``{}`` when the run has no motors); ``None`` means they are not
        known, and queries that want positions then read the streams instead.
        Returns whether the frame was indexed. Skipped frames never are.
        """
        if not self.complete or result.skip_reason or result.probs is None:
            return False
        hits = [(t, float(p)) for t, p in zip(self.tags, result.probs, strict=False)
                if p is not None and math.isfinite(p) and p >= self.min_prob]
        if not hits:
            return False
        row = len(self)
        if row >= self.limit:
            self._drop()
            return False
        for name, value in (("stream", result.stream), ("seq_num", int(result.seq_num)),
                            ("key", result.key), ("frame_index", int(result.frame_index)),
                            ("time", float(result.time)), ("tags", ",".join(result.tags)),
                            ("checkpoint", result.checkpoint),
                            ("novelty", _number(float(getattr(result, "novelty", math.nan)))),
                            ("novel", bool(getattr(result, "novel", False)))):
            self._frames[name].append(value)
        if positions is None:
            self.positions_known = False
        for key, value in (positions or {}).items():
            self._positions.setdefault(key, [None] * row).append(_number(value))
        for column in self._positions.values():
            if len(column) == row:  # this frame lacks a motor another frame had
                column.append(None)
        for tag, p in hits:
            entry = self._hits.setdefault(tag, {"row": [], "prob": []})
            entry["row"].append(row)
            entry["prob"].append(p)
        return True

    def _drop(self) -> None:
        self.complete = False
        self._frames = {f: [] for f in _FRAME_FIELDS}
        self._positions.clear()
        self._hits.clear()

    def summary(self) -> dict[str, Any]:
        """The ``xsml_index`` value for the stop document (JSON-serializable)."""
        out: dict[str, Any] = {"version": INDEX_VERSION, "stream": self.stream,
                               "min_prob": self.min_prob, "complete": self.complete,
                               "limit": self.limit, "positions_known": self.positions_known}
        if self.complete:
            out["frames"] = {k: list(v) for k, v in self._frames.items()}
            out["positions"] = {k: list(v) for k, v in self._positions.items()}
            out["hits"] = {t: {"row": list(h["row"]), "prob": list(h["prob"])}
                           for t, h in sorted(self._hits.items())}
        return out
