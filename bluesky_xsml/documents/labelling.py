"""Labelling tagged frames: the label cache, labels after the fact and declared in documents.

A :class:`Labeller` listens to a
:class:`~bluesky_xsml.documents.callback.TaggingCallback` (its input and
result listeners): it keeps the last frames' preprocessed inputs and
probabilities in a :class:`~bluesky_xsml.frame_cache.FrameCache`, hands labels
the run's documents declare (``xsml_labels`` in the start or in an event) to
the live fine-tuner, and answers :meth:`Labeller.label` and
:meth:`Labeller.suggest_labels`, which the callback exposes under the same
names. Fine-tuning (:meth:`Labeller.enable_finetuning`) is where the labels go;
without it, declared labels are counted as ignored and :meth:`Labeller.label`
refuses.

With ``isolation="process"`` the inputs never cross to the RunEngine's
process: the cache lives in the tagging process, next to the fine-tuner, and
this side keeps only the frames' keys (:class:`~bluesky_xsml.frame_cache.FrameKeys`)
and forwards each label there. A restart of the tagging process loses its
cache; a label of a frame tagged before the restart is refused here
(:class:`~bluesky_xsml.frame_cache.LabelCacheLost`, counted as
``labels_refused``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigurationError
from ..frame_cache import FrameCache, FrameKeys
from ..label_rows import parse_tag_labels

__all__ = ["Labeller", "document_labels"]

log = logging.getLogger(__name__)


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
    from ..label_schema import LabelIn  # pydantic: only when a document declares labels

    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, Mapping):
        raise ValueError(f"xsml_labels must map tag names to True/False/None, "
                         f"got {type(value).__name__}")
    label = LabelIn.model_validate({"run_uid": run_uid, "seq_num": seq_num, "stream": stream,
                                    "tags": dict(value)})
    return dict(label.tags)


class Labeller:
    """The label cache and the labels of one tagging callback.

    Parameters
    ----------
    callback : TaggingCallback
        Whose frames are labelled; the labeller subscribes to its inputs and
        results, reads its model (``tagger``, ``isolation``, ``worker``) and
        asks it for the labels documents declared (``declared_labels``).
    cache_size : int
        Frames whose inputs are kept for labelling after the fact (0: none).
    """

    def __init__(self, callback, cache_size: int = 2000) -> None:
        self.callback = callback
        #: True: the model and the cache of inputs are in the tagging process.
        self.remote = callback.isolation == "process"
        if self.remote:
            worker = callback.worker
            self.frame_cache = FrameKeys(cache_size, lambda: worker.process_starts)
        else:
            self.frame_cache = FrameCache(cache_size)
        #: The live fine-tuner; None until :meth:`enable_finetuning`.
        self.finetuner = None
        self.ignored = 0  # declared labels dropped: fine-tuning not enabled

    # --------------------------------------------------------- listeners
    def on_inputs(self, items: list) -> None:
        """Worker thread: cache inputs; queue labels that documents declared."""
        self.frame_cache.put_inputs(items)
        todo = []
        for job, idx, x in items:
            declared = self.callback.declared_labels(job.run_uid, job.stream, job.seq_num)
            if declared:
                todo.append((job, idx, x, declared))
        if not todo:
            return
        if self.finetuner is None:
            self.ignored += len(todo)
            return
        for job, idx, x, declared in todo:
            try:
                names, row = parse_tag_labels(declared)
            except ValueError as err:
                self.callback.count_error(f"bad xsml_labels: {type(err).__name__}")
                continue
            prov = {"source": "document", "run_uid": job.run_uid, "stream": job.stream,
                    "seq_num": int(job.seq_num), "key": job.key, "frame_index": int(idx)}
            self.finetuner.add_labels_async(x[None], row[None], [prov], tags=names)

    def on_results(self, run_uid: str, results: list) -> None:
        """Worker thread: attach the probabilities to the cached frames.

        With the cache in the tagging process: remember the tagged frames'
        keys, and send the labels their documents declared there.
        """
        if not self.remote:
            self.frame_cache.put_probs(run_uid, results, self.callback.tagger.thresholds)
            return
        self.frame_cache.put_results(run_uid, results)
        todo = []
        for r in results:
            if r.probs is None:
                continue
            declared = self.callback.declared_labels(run_uid, r.stream, r.seq_num)
            if not declared:
                continue
            if self.finetuner is None:
                self.ignored += 1
                continue
            try:
                parse_tag_labels(declared)  # checked here, counted here
            except ValueError as err:
                self.callback.count_error(f"bad xsml_labels: {type(err).__name__}")
                continue
            ident = (run_uid, r.stream, int(r.seq_num), r.key, int(r.frame_index))
            todo.append((ident, dict(declared), {
                "source": "document", "run_uid": run_uid, "stream": r.stream,
                "seq_num": int(r.seq_num), "key": r.key, "frame_index": int(r.frame_index)}))
        if todo:  # queued: this is the link thread, which must not wait for an answer
            self.callback.worker.call("child", "label_declared", (todo,), wait=False)

    # ------------------------------------------------------------ labels
    def enable_finetuning(self, directory, **options):
        """Start live fine-tuning into ``directory`` (see ``TaggingCallback.enable_finetuning``)."""
        callback = self.callback
        if self.finetuner is None and callback.isolation == "process":
            # trained in the tagging process; this process never imports torch
            from ..inference.process import RemoteFineTuner

            self.finetuner = RemoteFineTuner(callback.worker, directory, options)
        if self.finetuner is None:
            from ..training.live import LiveFineTuner

            self.finetuner = LiveFineTuner(callback.tagger, directory, **options)
        return self.finetuner

    def label(self, run_uid: str, seq_num: int, *, stream: str = "primary",
              key: str | None = None, frame_index: int = 0, **tags) -> dict:
        """Label a recently tagged frame (see ``TaggingCallback.label``)."""
        if self.finetuner is None:
            raise ConfigurationError("fine-tuning is not enabled; call "
                                     "enable_finetuning(directory) first")
        names, row = parse_tag_labels(tags)
        ident, entry = self.frame_cache.find(run_uid, seq_num, stream=stream, key=key,
                                             frame_index=frame_index)
        prov = {"source": "label", "run_uid": ident[0], "stream": ident[1],
                "seq_num": ident[2], "key": ident[3], "frame_index": ident[4]}
        if self.remote:  # the input is in the tagging process: the label goes there
            receipt = self.callback.worker.call("child", "label_frame", (ident, dict(tags),
                                                                         prov))
        else:
            prov["checkpoint"] = entry.get("checkpoint", "")
            receipt = self.finetuner.add_labels(entry["input"][None], row[None], [prov],
                                                tags=names)
        self.frame_cache.mark_labeled(ident)
        return {"run_uid": ident[0], "stream": ident[1], "seq_num": ident[2], "key": ident[3],
                "frame_index": ident[4],
                "labels": {t: (None if math.isnan(v) else bool(v))
                           for t, v in zip(names, row, strict=True)},
                "new_tags": [t for t in names if t not in self.callback.tagger.tags], **receipt}

    def suggest_labels(self, k: int = 10) -> list[dict]:
        """The ``k`` recent unlabeled frames the model is least sure about."""
        if self.remote:
            return self.callback.worker.call("child", "suggest_labels", (int(k),), timeout=30.0)
        return self.frame_cache.suggest(k)

    def frame_input(self, run_uid: str, seq_num: int, *, stream: str = "primary",
                    key: str | None = None, frame_index: int = 0):
        """The cached float16 ``(C, S, S)`` input of a recent frame, or None if not cached.

        With the cache in the tagging process, one call there (the service's
        thumbnails ask for the frames they show).
        """
        extra = {"record": False} if self.remote else {}
        try:
            ident, entry = self.frame_cache.find(run_uid, seq_num, stream=stream, key=key,
                                                 frame_index=frame_index, **extra)
        except KeyError:
            return None
        if self.remote:
            try:
                return self.callback.worker.call("child", "cached_input", (ident,),
                                                 timeout=10.0)
            except RuntimeError:  # the tagging process is restarting
                return None
        return entry["input"]

    def close(self, timeout: float = 30.0) -> None:
        if self.finetuner is not None:
            self.finetuner.close(timeout)
