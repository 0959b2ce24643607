"""Frames stored in files: resource/datum (ophyd v1) and stream_resource (ophyd-async)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from bluesky.plans import count, scan
from ophyd.sim import motor
from ophyd_async.core import init_devices

from bluesky_xsml import TaggingCallback
from bluesky_xsml.sim.detectors import HDF5ResourceDetector, StreamResourceDetector
from bluesky_xsml.tags import TAG_NAMES

from .conftest import assert_probs_match, validate_all


def frame_source(shape=(72, 90), dtype=np.uint32, seed=0):
    rng = np.random.default_rng(seed)
    drawn = []

    def draw():
        f = rng.poisson(6, shape).astype(dtype)
        drawn.append(f)
        return f

    draw.drawn = drawn
    return draw


@pytest.fixture(scope="module")
def tagger(distinct_tagger):
    """Tags whose probabilities are far apart: a column or frame mix-up cannot pass."""
    return distinct_tagger


def test_resource_datum_frames_are_tagged_and_writer_gets_unfilled_docs(RE, tagger, recorder,
                                                                          tmp_path):
    src = frame_source()
    ad = HDF5ResourceDetector("ad", src, tmp_path)
    xsml = TaggingCallback(tagger, downstream=[recorder])
    RE.subscribe(xsml)
    RE(scan([ad], motor, 0, 1, 6))
    assert xsml.flush(60)
    validate_all([(n, d) for n, d in recorder.docs if n != "datum"])
    events = sorted(recorder.of("event"), key=lambda e: e["seq_num"])
    assert all(isinstance(e["data"]["ad_image"], str) for e in events)  # still datum ids
    assert all(e["filled"] == {"ad_image": False} for e in events)
    tags = sorted(recorder.tag_events(), key=lambda e: e["data"]["source_seq_num"])
    assert len(tags) == 6 and all(t["data"]["skip_reason"] == "" for t in tags)
    assert [t["data"]["source_uid"] for t in tags] == [e["uid"] for e in events]
    # the probabilities are those of the frames in the file
    expected = tagger.predict(src.drawn[:6])
    got = np.array([[t["data"][k] for k in TAG_NAMES] for t in tags])
    assert_probs_match(got, expected)
    assert recorder.of("stop")[0]["xsml_frames"] == 6


def test_stream_resource_frames_are_tagged(RE, tagger, recorder, tmp_path):
    src = frame_source(dtype=np.int32, seed=4)
    with init_devices():
        sd = StreamResourceDetector(src, tmp_path)
    xsml = TaggingCallback(tagger, downstream=[recorder])
    RE.subscribe(xsml)
    RE(count([sd], 5))
    assert xsml.flush(60)
    validate_all(recorder.docs)
    events = {e["seq_num"]: e["uid"] for e in recorder.of("event")}
    tags = sorted(recorder.tag_events(), key=lambda e: e["data"]["source_seq_num"])
    assert [t["data"]["source_seq_num"] for t in tags] == [1, 2, 3, 4, 5]
    assert all(t["data"]["skip_reason"] == "" for t in tags)
    assert [t["data"]["source_uid"] for t in tags] == [events[s] for s in range(1, 6)]
    expected = tagger.predict(src.drawn[:5])
    got = np.array([[t["data"][k] for k in TAG_NAMES] for t in tags])
    assert_probs_match(got, expected)
    assert recorder.of("stop")[0]["num_events"]["xsml_tags"] == 5


@pytest.mark.reliability
def test_missing_file_is_a_recorded_skip(RE, tagger, recorder, tmp_path):
    ad = HDF5ResourceDetector("ad", frame_source(), tmp_path)
    xsml = TaggingCallback(tagger, downstream=[recorder], read_retries=2, read_retry_delay=0.01)
    gate = threading.Event()
    original = xsml.worker._process

    def held(batch):
        gate.wait(10)
        return original(batch)

    xsml.worker._process = held
    RE.subscribe(xsml)
    RE(count([ad], 3))
    assert xsml.outbox.flush(10)
    for res in recorder.of("resource"):
        os.remove(os.path.join(res["root"], res["resource_path"]))
    gate.set()
    assert xsml.flush(60)
    tags = recorder.tag_events()
    assert len(tags) == 3
    assert all(t["data"]["skip_reason"].startswith("missing_file") for t in tags)
    assert recorder.of("stop")[0]["xsml_skipped"] == {"missing_file": 3}
