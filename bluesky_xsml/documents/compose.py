"""Composing the tag stream of one run with event-model.

The tag stream is a new event stream (default ``xsml_tags``) bound to the
run's received start document. Each source frame becomes one event whose data
holds the probability of every tag, the link to its source (stream, seq_num,
event uid, data key, frame index), the tags above threshold, a skip reason
(empty when tagged), the checkpoint that produced it and the latency.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import event_model

from ..novelty import encode_embedding
from ..results import FrameResult
from ..tags import TAGS

__all__ = ["FrameResult", "TagStreamComposer", "LINK_KEYS"]

_MEANING = {t.name: t.meaning for t in TAGS}

#: Data keys that are not tag probabilities, with their data-key descriptions.
LINK_KEYS: dict[str, dict[str, Any]] = {
    "source_stream": {"dtype": "string", "shape": [], "source": "xsml",
                      "description": "stream of the tagged event"},
    "source_seq_num": {"dtype": "integer", "shape": [], "source": "xsml",
                       "description": "seq_num of the tagged event"},
    "source_uid": {"dtype": "string", "shape": [], "source": "xsml",
                   "description": "uid of the tagged event ('' if not yet known)"},
    "source_key": {"dtype": "string", "shape": [], "source": "xsml",
                   "description": "data key of the tagged image"},
    "frame_index": {"dtype": "integer", "shape": [], "source": "xsml",
                    "description": "index of the frame within the event's value (stacks)"},
    "tags": {"dtype": "string", "shape": [], "source": "xsml",
             "description": "comma-separated tags at or above their threshold"},
    "skip_reason": {"dtype": "string", "shape": [], "source": "xsml",
                    "description": "why the frame was not tagged; '' when tagged"},
    "checkpoint": {"dtype": "string", "shape": [], "source": "xsml",
                   "description": "checkpoint id of the model that tagged the frame"},
    "latency": {"dtype": "number", "shape": [], "source": "xsml", "units": "s",
                "description": "seconds from the frame's arrival to its tag"},
    "novelty": {"dtype": "number", "dtype_numpy": "<f8", "shape": [], "source": "xsml",
                "description": "distance of the frame's features from the training frames' "
                               "(Mahalanobis; NaN when unavailable or skipped)"},
    "novel": {"dtype": "boolean", "shape": [], "source": "xsml",
              "description": "novelty above the model's novelty threshold"},
    "embedding": {"dtype": "string", "shape": [], "source": "xsml",
                  "description": "base64 of the frame's L2-normalised float16 embedding "
                                 "('' when unavailable); see bluesky_xsml.novelty"},
}


def _novelty(model_info: Mapping) -> Mapping:
    info = model_info.get("novelty")
    return info if isinstance(info, Mapping) else {}


class TagStreamComposer:
    """Composes the tag stream's descriptor, event pages and the final stop.

    Parameters
    ----------
    start : dict
        The run's start document, as received.
    tags : sequence of str
        Tag names (data keys of the probabilities).
    thresholds : sequence of float
    model_info : dict
        ``Tagger.describe()``: checkpoint id, preprocessing, model config.
    stream_name : str
    validate_pages : bool
        Schema-validate each composed event page (the descriptor and the
        stop are always validated).
    """

    def __init__(self, start: Mapping, tags: Sequence[str], thresholds: Sequence[float],
                 model_info: Mapping, stream_name: str = "xsml_tags", *,
                 validate_pages: bool = True):
        self.tags = tuple(tags)
        self.validate_pages = validate_pages
        self.stream_name = stream_name
        self._streams: dict = {}
        self._counters: dict = {}
        data_keys: dict[str, dict] = {}
        for tag, th in zip(self.tags, thresholds, strict=False):
            data_keys[tag] = {
                "dtype": "number", "dtype_numpy": "<f8", "shape": [], "source": "xsml",
                "units": "probability", "threshold": float(th),
                "description": _MEANING.get(tag, tag),
            }
        data_keys.update({k: dict(v) for k, v in LINK_KEYS.items()})
        now = time.time()
        conf_data = {
            "checkpoint_id": str(model_info.get("checkpoint_id", "")),
            "parent_id": str(model_info.get("parent_id") or ""),
            "tags": list(self.tags),
            "thresholds": [float(t) for t in thresholds],
            "preprocess": json.dumps(model_info.get("preprocess", {}), sort_keys=True),
            "model": json.dumps(model_info.get("model_config", {}), sort_keys=True),
            "device": str(model_info.get("device", "")),
            "precision": str(model_info.get("precision", "")),
            "novelty_threshold": float(_novelty(model_info).get("threshold") or math.nan),
            "embedding_dim": int(_novelty(model_info).get("embedding_dim") or 0),
        }
        conf_keys = {
            "checkpoint_id": {"dtype": "string", "shape": [], "source": "xsml"},
            "parent_id": {"dtype": "string", "shape": [], "source": "xsml"},
            "tags": {"dtype": "array", "shape": [len(self.tags)], "source": "xsml"},
            "thresholds": {"dtype": "array", "dtype_numpy": "<f8", "shape": [len(self.tags)],
                           "source": "xsml"},
            "preprocess": {"dtype": "string", "shape": [], "source": "xsml"},
            "model": {"dtype": "string", "shape": [], "source": "xsml"},
            "device": {"dtype": "string", "shape": [], "source": "xsml"},
            "precision": {"dtype": "string", "shape": [], "source": "xsml"},
            "novelty_threshold": {"dtype": "number", "shape": [], "source": "xsml"},
            "embedding_dim": {"dtype": "integer", "shape": [], "source": "xsml"},
        }
        configuration = {"xsml": {"data": conf_data,
                                  "timestamps": {k: now for k in conf_data},
                                  "data_keys": conf_keys}}
        bundle = event_model.compose_descriptor(
            start=dict(start), streams=self._streams, event_counters=self._counters,
            name=stream_name, data_keys=data_keys, configuration=configuration,
            object_keys={"xsml": list(data_keys)},
            hints={"xsml": {"fields": list(self.tags)}},
        )
        self.descriptor = bundle.descriptor_doc
        self._compose_page = bundle.compose_event_page
        self.data_keys = tuple(data_keys)

    @property
    def num_events(self) -> int:
        """Events composed so far in the tag stream."""
        return self._counters.get(self.stream_name, 1) - 1

    def page(self, results: Sequence[FrameResult]) -> dict:
        """One validated event page for ``results`` (in order)."""
        if not results:
            raise ValueError("cannot compose an empty tag event page")
        data: dict[str, list] = {k: [] for k in self.data_keys}
        for r in results:
            probs = r.probs if r.probs is not None else [math.nan] * len(self.tags)
            for tag, p in zip(self.tags, probs, strict=False):
                data[tag].append(float(p))
            data["source_stream"].append(r.stream)
            data["source_seq_num"].append(int(r.seq_num))
            data["source_uid"].append(r.event_uid or "")
            data["source_key"].append(r.key)
            data["frame_index"].append(int(r.frame_index))
            data["tags"].append(",".join(r.tags))
            data["skip_reason"].append(r.skip_reason)
            data["checkpoint"].append(r.checkpoint)
            data["latency"].append(float(r.latency))
            data["novelty"].append(float(r.novelty) if r.probs is not None else math.nan)
            data["novel"].append(bool(r.novel) and r.probs is not None)
            data["embedding"].append(encode_embedding(r.embedding) if r.probs is not None
                                     else "")
        times = [r.time for r in results]
        timestamps = {k: list(times) for k in self.data_keys}
        return self._compose_page(data=data, timestamps=timestamps, time=list(times),
                                  validate=self.validate_pages)

    def stop(self, stop: Mapping, summary: Mapping[str, Any]) -> dict:
        """The run's stop with the tag stream counted and ``summary`` merged in."""
        doc = dict(stop)
        num_events = dict(doc.get("num_events") or {})
        num_events[self.stream_name] = self.num_events
        doc["num_events"] = num_events
        doc.update(summary)
        event_model.schema_validators[event_model.DocumentNames.stop].validate(doc)
        return doc
