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
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigurationError
from ..frame_cache import FrameCache

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
        from ..training.live import parse_tag_labels  # torch, with fine-tuning only

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
        """Worker thread: attach the probabilities to the cached frames."""
        self.frame_cache.put_probs(run_uid, results, self.callback.tagger.thresholds)

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
        from ..training.live import parse_tag_labels

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
                "labels": {t: (None if math.isnan(v) else bool(v))
                           for t, v in zip(names, row, strict=True)},
                "new_tags": [t for t in names if t not in self.callback.tagger.tags], **receipt}

    def suggest_labels(self, k: int = 10) -> list[dict]:
        """The ``k`` recent unlabeled frames the model is least sure about."""
        return self.frame_cache.suggest(k)

    def close(self, timeout: float = 30.0) -> None:
        if self.finetuner is not None:
            self.finetuner.close(timeout)
