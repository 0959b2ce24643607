"""The stop document's frame index (``xsml_index``): what it keeps, its bound, its input checks."""

from __future__ import annotations

import json
import math

import pytest

from bluesky_xsml.documents.compose import FrameResult
from bluesky_xsml.documents.frame_index import FrameIndex, motor_keys

TAGS = ("ring_oriented", "beam_off", "saturation")


def result(seq, probs, *, skip="", key="img"):
    tags = () if skip else tuple(t for t, p in zip(TAGS, probs, strict=True) if p >= 0.5)
    return FrameResult(stream="primary", seq_num=seq, event_uid=f"e{seq}", key=key,
                       frame_index=0, probs=None if skip else list(probs), skip_reason=skip,
                       checkpoint="ck1", tags=tags, latency=0.01, time=1000.0 + seq)


def test_keeps_frames_at_or_above_min_prob_with_their_positions():
    idx = FrameIndex(TAGS, "xsml_tags", min_prob=0.5)
    assert idx.add(result(1, [0.9, 0.1, 0.5]), {"x": 1.5})
    assert not idx.add(result(2, [0.49, 0.2, 0.0]), {"x": 2.5})     # nothing reaches 0.5
    assert not idx.add(result(3, [0.9, 0.9, 0.9], skip="bad_shape: x"), {"x": 3.5})
    assert idx.add(result(4, [0.2, 0.7, math.nan]), {"x": 4.5})
    s = json.loads(json.dumps(idx.summary(), allow_nan=False))  # plain JSON, no NaN
    assert s["complete"] and s["positions_known"] and s["stream"] == "xsml_tags"
    assert s["frames"]["seq_num"] == [1, 4]
    assert s["frames"]["tags"] == ["ring_oriented,saturation", "beam_off"]
    assert s["frames"]["time"] == [1001.0, 1004.0]
    assert s["positions"] == {"x": [1.5, 4.5]}
    assert s["hits"] == {"ring_oriented": {"row": [0], "prob": [0.9]},
                         "saturation": {"row": [0], "prob": [0.5]},
                         "beam_off": {"row": [1], "prob": [0.7]}}


def test_past_its_limit_the_index_is_dropped_and_says_so():
    idx = FrameIndex(TAGS, "xsml_tags", limit=2)
    for seq in (1, 2):
        assert idx.add(result(seq, [0.9, 0.0, 0.0]), {})
    assert not idx.add(result(3, [0.9, 0.0, 0.0]), {})
    s = idx.summary()
    assert s["complete"] is False and "frames" not in s and "hits" not in s
    assert not idx.add(result(4, [0.9, 0.0, 0.0]), {})  # stays dropped


def test_unknown_positions_and_missing_motors_are_recorded():
    idx = FrameIndex(TAGS, "xsml_tags")
    idx.add(result(1, [0.9, 0, 0]), {"x": 1.0})
    idx.add(result(2, [0.9, 0, 0]), {"y": 2.0})     # this frame lacks x, the first lacks y
    assert idx.summary()["positions"] == {"x": [1.0, None], "y": [None, 2.0]}
    assert idx.summary()["positions_known"]
    idx.add(result(3, [0.9, 0, 0]), None)           # positions not known for this frame
    assert not idx.summary()["positions_known"]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="min_prob"):
        FrameIndex(TAGS, "xsml_tags", min_prob=1.5)
    with pytest.raises(ValueError, match="limit"):
        FrameIndex(TAGS, "xsml_tags", limit=-1)


def test_motor_keys_are_the_scalar_readings_of_the_start_motors():
    descriptor = {"data_keys": {
        "motor": {"dtype": "number", "shape": [], "object_name": "motor"},
        "motor_setpoint": {"dtype": "number", "shape": [], "object_name": "motor"},
        "img": {"dtype": "array", "shape": [4, 4], "object_name": "img"},
        "det": {"dtype": "number", "shape": [], "object_name": "det"}}}
    assert motor_keys(descriptor, {"motors": ["motor"]}) == ["motor", "motor_setpoint"]
    assert motor_keys(descriptor, {}) == []
