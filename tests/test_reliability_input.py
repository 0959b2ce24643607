"""Bad input: any frame, any malformed document, any tampered checkpoint.

Property-based (hypothesis) checks of ``Tagger.predict`` and of the live
callback over shapes (0-size, 1x1, ragged, stacks), dtypes (bool, int8..int64,
uint8..uint32, float16/32/64), NaN/inf, detector sentinels and constant frames,
plus one huge frame: the answer is always a finite probability vector or a
``FrameError`` with a reason (``predict``) / a recorded skip (the callback),
never an unhandled exception. Then malformed and out-of-order documents (the
log says what was wrong and every document is passed through unchanged) and
checkpoints that are not what they claim.
"""

from __future__ import annotations

import logging
import time

import event_model
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bluesky_xsml import Tagger, TaggingCallback
from bluesky_xsml.errors import CheckpointError, FrameError
from bluesky_xsml.tags import TAG_NAMES

from .conftest import DocumentRecorder, validate_all

pytestmark = pytest.mark.reliability

DTYPES = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
          np.float16, np.float32, np.float64]
REASONS = {"bad_shape", "bad_dtype", "bad_frame"}
SENTINELS = {np.dtype(np.uint16): [2**16 - 1], np.dtype(np.uint32): [2**32 - 1, 2**31 - 1],
             np.dtype(np.int32): [-1, -2, 2**31 - 1], np.dtype(np.int16): [-1, 2**15 - 1]}


@st.composite
def frames(draw, max_side=48):
    """2-D frames (sometimes a stack of 2): any dtype, any values, often sentinels or constant."""
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(st.tuples(st.integers(0, max_side), st.integers(0, max_side)))
    if draw(st.integers(0, 5)) == 0:
        shape = (2, *shape)
    kind = draw(st.sampled_from(["any", "constant", "sentinel"]))
    if dtype.kind == "f":
        elements = st.floats(allow_nan=True, allow_infinity=True, width=dtype.itemsize * 8)
    else:
        elements = None
    if kind == "constant":
        value = draw(hnp.from_dtype(dtype) if elements is None else elements)
        return np.full(shape, value, dtype)
    frame = draw(hnp.arrays(dtype, shape, elements=elements))
    if kind == "sentinel" and frame.size and dtype in SENTINELS:
        frame.flat[:: max(1, frame.size // 7)] = draw(st.sampled_from(SENTINELS[dtype]))
    return frame


def assert_probabilities(probs, n):
    assert probs.shape == (n, len(TAG_NAMES)) and probs.dtype == np.float32
    assert np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frame=frames())
def test_predict_gives_probabilities_or_a_frame_error(tagger, frame):
    try:
        probs = tagger.predict(frame)
    except FrameError as err:
        assert err.reason in REASONS
        assert str(err).startswith("frame 0: ") and len(str(err)) > len("frame 0: ") + 10
        assert err.reason != "bad_dtype" or frame.dtype == np.bool_ or "dtype" in str(err)
        if err.reason == "bad_shape":  # only small or empty frames are refused for their shape
            assert min(frame.shape[-2:]) < 8
        return
    assert_probabilities(probs, frame.shape[0] if frame.ndim == 3 else 1)


def test_tiny_empty_and_odd_frames_are_named(tagger):
    cases = {"1x1": np.ones((1, 1), np.uint32), "0-size": np.zeros((0, 0), np.float32),
             "0 rows": np.zeros((0, 300), np.uint16), "1-D": np.ones(4096, np.uint32),
             "4-D": np.ones((2, 2, 64, 64), np.uint32), "complex": np.ones((64, 64), complex),
             "strings": np.full((64, 64), "x"), "object": np.full((64, 64), None, object)}
    for what, frame in cases.items():
        with pytest.raises(FrameError) as info:
            tagger.predict(frame)
        assert info.value.reason in REASONS, what
        message = str(info.value)  # names the frame, or the shape when it is no frame at all
        assert message.startswith("frame 0: ") or f"got shape {frame.shape}" in message, what


def test_a_huge_frame_is_tagged(tagger):
    frame = np.random.default_rng(0).poisson(2, (4000, 4000)).astype(np.uint32)
    frame[:, 1000:1010] = 2**32 - 1
    assert_probabilities(tagger.predict(frame), 1)


@pytest.fixture(scope="module")
def live(tagger):
    """One callback for all examples (each example is a new run); documents go to ``rec``."""
    rec = DocumentRecorder()
    xsml = TaggingCallback(tagger, downstream=[rec], image_keys=["cam"],
                           max_wait=0.0)
    yield xsml, rec
    xsml.close()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(frames(max_side=40), min_size=1, max_size=6))
def test_callback_accounts_for_every_frame_of_any_kind(live, batch):
    """Inline frames of any kind through the callback: one tag event each, finite or skipped."""
    xsml, rec = live
    rec.docs.clear()
    run = event_model.compose_run()
    desc = run.compose_descriptor(name="primary", data_keys={
        "cam": {"dtype": "array", "shape": [], "source": "sim"}})
    docs = [("start", run.start_doc), ("descriptor", desc.descriptor_doc)]
    for i, frame in enumerate(batch):
        docs.append(("event", desc.compose_event(data={"cam": frame},
                                                 timestamps={"cam": time.time()}, seq_num=i + 1)))
    docs.append(("stop", run.compose_stop()))
    for name, doc in docs:
        xsml(name, doc)
    assert xsml.flush(60)
    # a stack is one tag event per frame; an empty stack is one skipped value
    per_event = [f.shape[0] if f.ndim == 3 and f.size else 1 for f in batch]
    expected = sum(per_event)
    tags = rec.tag_events()
    assert sorted(e["data"]["source_seq_num"] for e in tags) == sorted(
        seq for seq, n in enumerate(per_event, start=1) for _ in range(n))
    for e in tags:
        d = e["data"]
        probs = np.array([d[t] for t in TAG_NAMES])
        if d["skip_reason"]:
            assert d["skip_reason"].split(":")[0] in REASONS, d["skip_reason"]
            assert np.isnan(probs).all()
        else:
            assert np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()
    (stop,) = rec.of("stop")
    assert stop["xsml_frames"] == expected
    assert sum(stop["xsml_skipped"].values()) == sum(bool(e["data"]["skip_reason"]) for e in tags)
    assert xsml.status()["document_errors"] == {}
    validate_all(rec.docs)


# ---------------------------------------------------------------- documents
def _run_docs(n=2, shape=(32, 32)):
    run = event_model.compose_run()
    desc = run.compose_descriptor(name="primary", data_keys={
        "cam": {"dtype": "array", "shape": list(shape), "source": "sim"}})
    events = [desc.compose_event(data={"cam": np.full(shape, 5, np.uint32)},
                                 timestamps={"cam": time.time()}, seq_num=i + 1)
              for i in range(n)]
    return run, desc, events


def _feed(docs, caplog, tagger, **kwargs):
    rec = DocumentRecorder()
    xsml = TaggingCallback(tagger, downstream=[rec], **kwargs)
    with caplog.at_level(logging.WARNING, logger="bluesky_xsml"):
        for name, doc in docs:
            xsml(name, doc)  # never raises
        assert xsml.flush(30)
    status = xsml.status()
    xsml.close()
    # pass-through preserved: every received document, the same object, in order; a stop is
    # held until its run's tags are out and re-emitted with the summary (same uid)
    sent = [id(d) for n, d in docs if n != "stop"]
    assert [id(d) for _, d in rec.docs if id(d) in set(sent)] == sent
    assert sorted(d["uid"] for d in rec.of("stop")) == sorted(d["uid"] for n, d in docs
                                                              if n == "stop")
    return rec, status


def test_documents_with_missing_keys_are_logged_and_passed_through(caplog, tagger):
    run, desc, (ev,) = _run_docs(1)
    no_descriptor = {k: v for k, v in ev.items() if k != "descriptor"}
    no_seq = {k: v for k, v in ev.items() if k != "seq_num"}
    docs = [("start", run.start_doc), ("descriptor", desc.descriptor_doc),
            ("event", no_descriptor), ("event", no_seq), ("stop", run.compose_stop())]
    rec, status = _feed(docs, caplog, tagger)
    assert "failed to handle a 'event' document; it was passed through" in caplog.text
    assert status["document_errors"] == {"event: KeyError": 2}
    assert rec.of("stop")[0]["xsml_frames"] == 0


def test_event_for_unknown_descriptor_and_stop_without_start(caplog, tagger):
    _run, desc, (ev,) = _run_docs(1)
    orphan_stop = {"uid": "s-1", "run_start": "never-started", "time": time.time(),
                   "exit_status": "success"}
    rec, status = _feed([("event", ev), ("stop", orphan_stop)], caplog, tagger)
    assert f"events for unknown descriptor {desc.descriptor_doc['uid']}" in caplog.text
    assert "stop for a run it has no start for" in caplog.text
    assert rec.of("stop") == [orphan_stop]
    assert status["document_errors"] == {"event for unknown descriptor": 1,
                                         "stop for unknown run": 1}


def test_out_of_order_documents(caplog, tagger):
    """A descriptor before its start, events after the stop: logged, passed, nothing tagged."""
    run, desc, events = _run_docs(2)
    stop = run.compose_stop()
    docs = [("descriptor", desc.descriptor_doc), ("start", run.start_doc),
            ("event", events[0]), ("stop", stop), ("event", events[1])]
    rec, status = _feed(docs, caplog, tagger)
    assert "got a descriptor for a run it has no start for" in caplog.text
    assert status["document_errors"] == {"descriptor for unknown run": 1,
                                         "event for unknown descriptor": 2}
    assert rec.of("stop") == [stop]
    # a stop re-ordered before its events: the late event is logged and passed through
    run2, desc2, events2 = _run_docs(2)
    stop2 = run2.compose_stop()
    docs2 = [("start", run2.start_doc), ("descriptor", desc2.descriptor_doc),
             ("event", events2[0]), ("stop", stop2), ("event", events2[1])]
    caplog.clear()
    rec2, status2 = _feed(docs2, caplog, tagger)
    assert f"got events after the stop of run {run2.start_doc['uid']}" in caplog.text
    assert status2["document_errors"] == {"event after stop": 1}
    assert rec2.of("stop")[0]["xsml_frames"] == 1  # the frame that came in time


def test_descriptor_without_shapes_is_probed_from_the_data(caplog, tagger):
    run = event_model.compose_run()
    desc = run.compose_descriptor(name="primary", data_keys={
        "cam": {"dtype": "array", "source": "sim", "shape": []},
        "note": {"dtype": "array", "source": "sim", "shape": []}})
    ev = desc.compose_event(data={"cam": np.ones((64, 64), np.uint16), "note": [1, 2, 3]},
                            timestamps={"cam": 0.0, "note": 0.0}, seq_num=1)
    rec, status = _feed([("start", run.start_doc), ("descriptor", desc.descriptor_doc),
                         ("event", ev), ("stop", run.compose_stop())], caplog, tagger)
    tags = rec.tag_events()
    assert [t["data"]["source_key"] for t in tags] == ["cam"]
    assert status["document_errors"] == {}


def test_unknown_resource_spec_is_a_recorded_skip(caplog, tmp_path, tagger):
    run = event_model.compose_run()
    res = run.compose_resource(spec="NO_SUCH_SPEC", root=str(tmp_path), resource_path="x.bin",
                               resource_kwargs={})
    datum = res.compose_datum(datum_kwargs={"point_number": 0})
    desc = run.compose_descriptor(name="primary", data_keys={
        "cam": {"dtype": "array", "shape": [64, 64], "source": "sim", "external": "FILESTORE:"}})
    ev = desc.compose_event(data={"cam": datum["datum_id"]}, timestamps={"cam": 0.0},
                            seq_num=1, filled={"cam": False})
    docs = [("start", run.start_doc), ("resource", res.resource_doc), ("datum", datum),
            ("descriptor", desc.descriptor_doc), ("event", ev), ("stop", run.compose_stop())]
    rec, _ = _feed(docs, caplog, tagger, read_retries=3, read_retry_delay=1.0)
    (tag,) = rec.tag_events()
    assert tag["data"]["skip_reason"].startswith("unknown_spec")
    assert "'NO_SUCH_SPEC'" in tag["data"]["skip_reason"]
    assert rec.of("stop")[0]["xsml_skipped"] == {"unknown_spec": 1}


# -------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("content", [b"", b"\x00" * 64, b'{"format": "bluesky-xsml"}',
                                     b"PK\x03\x04 not really a zip"])
def test_files_that_are_not_checkpoints_are_refused(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="cannot load") as info:
        Tagger.load(path)
    assert str(path) in str(info.value)


def test_checkpoint_dicts_that_lie_are_refused(tmp_path):
    good = Tagger.untrained(seed=2).checkpoint_dict()
    cases = {
        "wrong format": ({**good, "format": "something-else"}, "is not a bluesky-xsml"),
        "tags swapped": ({**good, "tags": [good["tags"][1], good["tags"][0], *good["tags"][2:]]},
                         "content id mismatch"),
        "from the future": ({**good, "format_version": 99}, "format version 99"),
        "missing weights": ({k: v for k, v in good.items() if k != "state_dict"},
                            "missing or has a malformed field"),
        "weights of another shape": (
            {**good, "state_dict": {k: torch.zeros(3) for k in good["state_dict"]}},
            "weights do not fit"),
    }
    for _what, (ckpt, message) in cases.items():
        torch.save(ckpt, tmp_path / "x.pt")
        with pytest.raises(CheckpointError, match=message):
            Tagger.load(tmp_path / "x.pt")


def test_flipped_bytes_in_a_checkpoint_are_refused(tmp_path):
    path = Tagger.untrained(seed=4).save(tmp_path / "m.pt")
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    refused = 0
    for _trial in range(5):
        damaged = bytearray(data)
        for i in rng.integers(len(data) // 4, len(data), 8):  # inside the weights
            damaged[i] ^= 0xFF
        (tmp_path / "bad.pt").write_bytes(bytes(damaged))
        with pytest.raises(CheckpointError):
            Tagger.load(tmp_path / "bad.pt")
        refused += 1
    assert refused == 5
