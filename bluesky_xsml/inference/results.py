"""Frames to results: the one path from detector frames to :class:`FrameResult`\\ s.

Live tagging (:class:`~bluesky_xsml.inference.worker.InferenceWorker`), the
bus workers (:func:`bluesky_xsml.scaleout.worker.tag_frames`) and re-tagging of
stored runs (:func:`bluesky_xsml.catalog.append.tag_run`) all tag frames with
:func:`frames_to_results`::

    items = split_value(value, stream="primary", seq_num=3, event_uid=uid, key="cam")
    results = frames_to_results(tagger, items)

Every item gets exactly one result, in order: tagged (probabilities, the tags
at or above their thresholds, the checkpoint that tagged it) or skipped with a
reason. A frame the preprocessing refuses is skipped with its reason
(``bad_shape: ...``); a batch the model fails on is split in halves down to
single frames (this also absorbs out-of-memory errors), and a frame that still
fails, or whose output is not finite, is skipped (``model_error: ...``). The
model call and the reading of which checkpoint made it are one step under the
tagger's ``hold()`` (no weight swap in between).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..frames import split_frames
from ..readout import Readout
from ..results import FrameResult

__all__ = ["FrameItem", "frames_to_results", "predict_resilient", "split_value"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class FrameItem:
    """One frame to tag, or one that could not be read (``frame`` None and a ``skip_reason``).

    ``t_in`` is when the frame arrived, on the clock given to
    :func:`frames_to_results` (NaN: no latency); ``owner`` is the caller's (a job).
    """

    stream: str
    seq_num: int
    event_uid: str
    key: str
    frame_index: int = 0
    frame: Any = None
    skip_reason: str = ""
    beam_center: tuple[float, float] | None = None
    readout: Readout | None = None  # the detector's calibration: the frame is in ADU
    t_in: float = math.nan
    owner: Any = None


def split_value(value: Any, **fields: Any) -> list[FrameItem]:
    """An event's image value (a frame or a stack) as one :class:`FrameItem` per frame.

    ``fields`` are the items' other fields (``stream``, ``seq_num``,
    ``event_uid``, ``key``, ...). A value that is no image is one skipped item
    (``bad_frame: ...``).
    """
    try:
        parts = split_frames(value)
    except Exception as err:  # noqa: BLE001 - a bad value is the frame's recorded skip
        return [FrameItem(frame_index=0, skip_reason=f"bad_frame: {err}", **fields)]
    return [FrameItem(frame_index=i, frame=frame, **fields) for i, frame in enumerate(parts)]


def frames_to_results(tagger, items: Sequence[FrameItem], *, analyse: bool = False,
                      on_inputs: Callable[[list], None] | None = None,
                      clock: Callable[[], float] = time.monotonic) -> list[FrameResult]:
    """Tag ``items``: one :class:`FrameResult` per item, in order.

    Parameters
    ----------
    tagger : Tagger
        Or anything with ``preprocess``, ``predict_inputs``, ``tags``,
        ``thresholds`` and ``checkpoint_id`` (``hold``, ``input_centers`` and
        ``analyse_inputs`` are used where present).
    items : sequence of FrameItem
        Items with a ``readout`` are in ADU: ``tagger.preprocess(frames,
        readouts)`` turns them into counts (it is called with the frames alone
        when no item has one).
    analyse : bool
        Also compute novelty scores, flags and embeddings, where the tagger
        can in the same model call (``analyse_inputs``).
    on_inputs : callable, optional
        ``on_inputs([(item, input), ...])`` with the preprocessed input of each
        tagged frame, before the results are returned; its errors are logged.
    clock : callable
        The clock of the items' ``t_in`` (latency = ``clock() - t_in``).
    """
    frames, rows_of = [], []  # usable frames; their item positions
    for pos, item in enumerate(items):
        if item.frame is not None and not item.skip_reason:
            frames.append(item.frame)
            rows_of.append(pos)
    probs_by: dict[int, np.ndarray] = {}   # item position -> probabilities
    errors_by: dict[int, str] = {}         # item position -> skip reason
    input_row: dict[int, int] = {}         # item position -> row of ``inputs``
    extras: dict = {}
    # no weight swap between the model call and reading which checkpoint made it
    with getattr(tagger, "hold", contextlib.nullcontext)():
        if frames:
            readouts = [items[pos].readout for pos in rows_of]
            if any(r is not None for r in readouts):  # frames in ADU: counts first
                inputs, ok, errors = tagger.preprocess(frames, readouts)
            else:
                inputs, ok, errors = tagger.preprocess(frames)
            for i, err in errors.items():
                errors_by[rows_of[i]] = f"{getattr(err, 'reason', 'bad_frame')}: {err}"
            centers = _input_centers(tagger, [items[rows_of[i]] for i in ok],
                                     [np.shape(frames[i]) for i in ok])
            probs, failed = predict_resilient(tagger, inputs, centers,
                                              extras if analyse else None)
            for row, i in enumerate(ok):
                pos = rows_of[i]
                if row in failed:
                    errors_by[pos] = failed[row]
                else:
                    probs_by[pos] = probs[row]
                    input_row[pos] = row
        checkpoint = tagger.checkpoint_id
        tags = tagger.tags
        thresholds = tagger.thresholds
    if input_row and on_inputs is not None:
        try:  # e.g. the callback's label cache; never fails the batch
            on_inputs([(items[pos], inputs[row]) for pos, row in input_row.items()])
        except Exception:
            log.exception("xsml inputs handler failed")
    above: dict[int, tuple[str, ...]] = {}  # tags at or above threshold, decided once
    if probs_by:
        order = sorted(probs_by)
        hits = np.stack([probs_by[p] for p in order]) >= thresholds
        above = {p: tuple(tags[j] for j in np.flatnonzero(h))
                 for p, h in zip(order, hits, strict=True)}
    now = clock()
    out = []
    for pos, item in enumerate(items):
        common = dict(stream=item.stream, seq_num=item.seq_num, event_uid=item.event_uid,
                      key=item.key, frame_index=item.frame_index, checkpoint=checkpoint,
                      latency=now - item.t_in)
        if pos in probs_by:
            out.append(FrameResult(probs=probs_by[pos].tolist(), tags=above[pos], **common,
                                   **_novelty_of(extras, input_row[pos])))
        else:
            reason = item.skip_reason or errors_by.get(pos) or (
                "no_data" if item.frame is None else "bad_frame")
            out.append(FrameResult(probs=None, skip_reason=reason, **common))
    return out


def _input_centers(tagger, items: Sequence[FrameItem], shapes) -> np.ndarray | None:
    """Beam centres on the model input of the usable frames, when the model reads them."""
    if not getattr(tagger, "uses_beam_center", False):
        return None
    raw = [item.beam_center for item in items]
    if all(c is None for c in raw):
        return None
    pairs = [(np.nan, np.nan) if c is None else c for c in raw]
    try:
        return tagger.input_centers(shapes, pairs)
    except ValueError:  # validated where items are made; never fail a batch over it
        log.exception("xsml: unusable beam centres; tagging without them")
        return None


def predict_resilient(tagger, inputs: np.ndarray, centers: np.ndarray | None = None,
                      extras: dict | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """Predict, splitting the batch on failure; returns probs and failed rows.

    With ``extras`` (a dict) and a tagger that has ``analyse_inputs``, the
    novelty scores, flags and embeddings of the rows are put in it.
    """
    n = len(inputs)
    probs = np.full((n, len(tagger.tags)), np.nan, np.float32)
    analyse = _analyser(tagger) if extras is not None else None
    failed: dict[int, str] = {}
    stack = [(0, n)]
    while stack:
        lo, hi = stack.pop()
        if hi <= lo:
            continue
        try:
            if analyse is not None:
                _keep_analysis(extras, n, lo, hi, analyse(
                    inputs[lo:hi], None if centers is None else centers[lo:hi]))
                probs[lo:hi] = extras["probs"][lo:hi]
            elif centers is None:
                probs[lo:hi] = tagger.predict_inputs(inputs[lo:hi])
            else:
                probs[lo:hi] = tagger.predict_inputs(inputs[lo:hi], centers[lo:hi])
        except Exception as err:  # noqa: BLE001 - retried in halves, then the frame's skip
            _free_accelerator_memory()
            if hi - lo > 1:
                mid = (lo + hi) // 2
                log.warning("model failed on a batch of %d (%s); retrying in halves",
                            hi - lo, type(err).__name__)
                stack.extend([(mid, hi), (lo, mid)])
            else:
                failed[lo] = f"model_error: {type(err).__name__}: {err}"
    bad = ~np.isfinite(probs).all(axis=1)
    for row in np.flatnonzero(bad):
        failed.setdefault(int(row), "model_error: non-finite output")
    return probs, failed


def _analyser(tagger):
    """``tagger.analyse_inputs`` when it runs the same model call as ``predict_inputs``.

    A wrapper that replaces ``predict_inputs`` (fault injection, a remote model)
    and passes other attributes through must keep being called, so the
    analysis is used only where the class defining ``analyse_inputs`` also
    defines the ``predict_inputs`` in use.
    """
    cls = type(tagger)

    def owner(name):
        return next((c for c in cls.__mro__ if name in vars(c)), None)

    where = owner("analyse_inputs")
    if where is None or where is not owner("predict_inputs"):
        return None
    return tagger.analyse_inputs


def _keep_analysis(extras: dict, n: int, lo: int, hi: int, analysis) -> None:
    """Put rows ``lo:hi`` of a :class:`~bluesky_xsml.novelty.FrameAnalysis` into ``extras``."""
    if "novelty" not in extras:
        extras["probs"] = np.full((n, analysis.probs.shape[1]), np.nan, np.float32)
        extras["novelty"] = np.full(n, np.nan, np.float32)
        extras["novel"] = np.zeros(n, bool)
        extras["embedding"] = [None] * n
    extras["probs"][lo:hi] = analysis.probs
    extras["novelty"][lo:hi] = analysis.novelty
    extras["novel"][lo:hi] = analysis.novel
    if analysis.embedding is not None:
        extras["embedding"][lo:hi] = list(analysis.embedding)


def _novelty_of(extras: dict, row: int) -> dict:
    """FrameResult keywords (novelty, novel, embedding) of one input row."""
    if "novelty" not in extras:
        return {}
    return {"novelty": float(extras["novelty"][row]), "novel": bool(extras["novel"][row]),
            "embedding": extras["embedding"][row]}


def _free_accelerator_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - pragma: no cover - best effort
        pass
