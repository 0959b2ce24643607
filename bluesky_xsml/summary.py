"""The run summary a tag stream leaves in its run's stop document.

One place builds it, for live tagging (:class:`~bluesky_xsml.documents.callback.TaggingCallback`),
the bus workers (:mod:`bluesky_xsml.scaleout.worker`) and re-tagging of stored
runs (:mod:`bluesky_xsml.catalog.append`)::

    summary = RunSummary()
    summary.add(results)          # as often as results come
    stop.update(summary.as_dict(stream_name="xsml_tags", checkpoint_id=tagger.checkpoint_id))

The keys are what catalogs search on: ``xsml_stream``, ``xsml_tags`` (tags seen
at least once), ``xsml_tag_counts``, ``xsml_model`` (the checkpoint that
tagged last), ``xsml_models`` (every checkpoint that tagged, in order),
``xsml_frames`` (tagged and skipped), ``xsml_skipped`` (by reason: the part of
a skip reason before the first ``:``) and, for live tagging, ``xsml_novel``.

This module imports nothing of the package: results are read by attribute
(``skip_reason``, ``tags``, ``checkpoint``, ``novel``), as
:class:`~bluesky_xsml.documents.compose.FrameResult` has them.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Any

__all__ = ["SUMMARY_KEYS", "RunSummary", "skip_slug"]

#: Stop keys of a tagging, in the order they are written (``xsml_novel`` only when asked).
SUMMARY_KEYS = ("xsml_stream", "xsml_tags", "xsml_tag_counts", "xsml_model", "xsml_models",
                "xsml_frames", "xsml_skipped")


def skip_slug(reason: str) -> str:
    """The part of a skip reason that is counted: ``"read_error: ..."`` -> ``"read_error"``."""
    return reason.split(":")[0]


class RunSummary:
    """Counts of one run's tag results, turned into the stop summary by :meth:`as_dict`.

    Not thread-safe: its owner (the per-run state) guards it.

    Examples
    --------
    >>> from types import SimpleNamespace as R
    >>> s = RunSummary()
    >>> s.add([R(skip_reason="", tags=("ring",), checkpoint="c1"),
    ...        R(skip_reason="read_error: gone", tags=(), checkpoint="c1")])
    >>> s.as_dict(stream_name="xsml_tags", checkpoint_id="c0")["xsml_skipped"]
    {'read_error': 1}
    """

    def __init__(self) -> None:
        self.frames = 0
        self.tag_counts: collections.Counter = collections.Counter()
        self.skipped: collections.Counter = collections.Counter()
        self.novel = 0
        self.checkpoints: list[str] = []

    def add(self, results: Iterable[Any]) -> None:
        """Count ``results`` (FrameResults, tagged or skipped)."""
        for r in results:
            self.frames += 1
            if r.skip_reason:
                self.skipped[skip_slug(r.skip_reason)] += 1
                continue
            self.tag_counts.update(r.tags)
            self.novel += bool(getattr(r, "novel", False))
            if r.checkpoint and r.checkpoint not in self.checkpoints:
                self.checkpoints.append(r.checkpoint)

    @property
    def tagged(self) -> int:
        """Frames tagged (not skipped)."""
        return self.frames - sum(self.skipped.values())

    def as_dict(self, *, stream_name: str, checkpoint_id: str,
                novel: bool = False) -> dict[str, Any]:
        """The stop summary (JSON-able); ``checkpoint_id`` is the model if none tagged yet.

        ``novel`` adds ``xsml_novel`` (frames flagged novel), as live tagging writes it.
        """
        out: dict[str, Any] = {
            "xsml_stream": stream_name,
            "xsml_tags": sorted(self.tag_counts),
            "xsml_tag_counts": {t: int(n) for t, n in sorted(self.tag_counts.items())},
            "xsml_model": self.checkpoints[-1] if self.checkpoints else checkpoint_id,
            "xsml_models": list(self.checkpoints),
            "xsml_frames": int(self.frames),
            "xsml_skipped": {k: int(v) for k, v in sorted(self.skipped.items())},
        }
        if novel:
            out["xsml_novel"] = int(self.novel)
        return out
