"""The live tagging callback on a real RunEngine with ophyd devices."""

from __future__ import annotations

import threading
import time

import event_model
import numpy as np
import pytest
from bluesky.plans import count, scan
from ophyd.sim import det, motor

from bluesky_xsml import TaggingCallback
from bluesky_xsml.tags import TAG_NAMES

from .conftest import DocumentRecorder, assert_probs_match, make_image_detector, validate_all


def run_and_flush(RE, xsml, plan):
    RE(plan)
    assert xsml.flush(60), "tagging did not finish"


def test_scan_tags_every_frame_and_forwards_everything(RE, tagger, recorder):
    img = make_image_detector()
    xsml = TaggingCallback(tagger, downstream=[recorder])
    seen_by_re = DocumentRecorder()
    RE.subscribe(seen_by_re)
    RE.subscribe(xsml)
    run_and_flush(RE, xsml, scan([img, det], motor, 0, 1, 12))

    validate_all(recorder.docs)
    # every received document is forwarded, unchanged (same object) and in order, except stop
    forwarded = [d for n, d in recorder.docs if n != "stop"]
    received = [d for n, d in seen_by_re.docs if n != "stop"]
    assert [id(d) for d in forwarded if d in received] == [id(d) for d in received]
    names = recorder.names()
    assert names[0] == "start" and names[-1] == "stop" and names.count("stop") == 1

    tag_desc = [d for d in recorder.of("descriptor") if d["name"] == "xsml_tags"]
    assert len(tag_desc) == 1
    desc = tag_desc[0]
    assert desc["run_start"] == recorder.of("start")[0]["uid"]
    conf = desc["configuration"]["xsml"]["data"]
    assert conf["checkpoint_id"] == tagger.checkpoint_id
    assert conf["tags"] == list(TAG_NAMES)
    assert all(desc["data_keys"][t]["threshold"] == pytest.approx(0.5) for t in TAG_NAMES)
    assert not any("." in k or "/" in k for k in desc["data_keys"])

    events = recorder.of("event")
    primary_uid = {e["seq_num"]: e["uid"] for e in events}
    tags = recorder.tag_events()
    assert len(tags) == 12
    for ev in tags:
        d = ev["data"]
        assert d["source_stream"] == "primary"
        assert d["source_uid"] == primary_uid[d["source_seq_num"]]
        assert d["source_key"] == "img" and d["skip_reason"] == ""
        assert d["checkpoint"] == tagger.checkpoint_id
        probs = np.array([d[t] for t in TAG_NAMES])
        assert probs.dtype.kind == "f" and np.all((probs >= 0) & (probs <= 1))
        above = {t for t in TAG_NAMES if d[t] >= 0.5}
        assert set(filter(None, d["tags"].split(","))) == above
    assert sorted(ev["data"]["source_seq_num"] for ev in tags) == list(range(1, 13))

    stop = recorder.of("stop")[0]
    assert stop["num_events"]["xsml_tags"] == 12 and stop["num_events"]["primary"] == 12
    assert stop["xsml_frames"] == 12 and stop["xsml_skipped"] == {}
    assert stop["xsml_model"] == tagger.checkpoint_id
    counts = {t: sum(t in ev["data"]["tags"].split(",") for ev in tags) for t in TAG_NAMES}
    assert stop["xsml_tag_counts"] == {t: n for t, n in counts.items() if n}
    assert stop["xsml_tags"] == sorted(t for t, n in counts.items() if n)
    # the stop comes after every tag page
    assert names.index("stop") > max(i for i, n in enumerate(names) if n == "event_page")


def test_tags_match_tagger_predict(RE, distinct_tagger, recorder):
    """Each tag's probability, per frame, is what Tagger.predict gives for that frame.

    The tagger's tags sit far apart (at least 3x the tolerance), so two columns swapped,
    or a frame's row given to another frame, fail."""
    tagger = distinct_tagger
    frames = []
    rng = np.random.default_rng(3)

    def frame():
        f = rng.poisson(rng.uniform(0.5, 50), (96, 120)).astype(np.int32)
        frames.append(f)
        return f

    img = make_image_detector(func=frame)
    xsml = TaggingCallback(tagger, downstream=[recorder], max_batch=4)
    RE.subscribe(xsml)
    run_and_flush(RE, xsml, count([img], 7))
    events = sorted(recorder.of("event"), key=lambda e: e["seq_num"])
    assert all(any(e["data"]["img"] is f for f in frames) for e in events)
    expected = tagger.predict([e["data"]["img"] for e in events])
    got = sorted(recorder.tag_events(), key=lambda e: e["data"]["source_seq_num"])
    probs = np.array([[e["data"][t] for t in TAG_NAMES] for e in got])
    assert_probs_match(probs, expected)


def test_event_pages_are_tagged_like_events(tagger):
    """Documents from a bus may carry event pages; each row is a frame."""
    rec = DocumentRecorder()
    xsml = TaggingCallback(tagger, downstream=[rec])
    run = event_model.compose_run()
    frames = np.random.default_rng(0).poisson(3, (5, 64, 64)).astype(np.uint16)
    desc = run.compose_descriptor(name="primary", data_keys={
        "cam": {"dtype": "array", "shape": [64, 64], "source": "sim"}})
    page = desc.compose_event_page(data={"cam": list(frames)},
                                   timestamps={"cam": [time.time()] * 5},
                                   seq_num=[1, 2, 3, 4, 5])
    for name, doc in [("start", run.start_doc), ("descriptor", desc.descriptor_doc),
                      ("event_page", page), ("stop", run.compose_stop())]:
        xsml(name, doc)
    assert xsml.flush(30)
    tags = rec.tag_events()
    assert [e["data"]["source_uid"] for e in tags] == page["uid"]
    assert rec.of("stop")[0]["xsml_frames"] == 5
    validate_all(rec.docs)


def test_stacks_and_several_detectors(RE, tagger, recorder):
    stack = make_image_detector("stack", shape=(64, 64), stack=3, seed=1)
    cam2 = make_image_detector("cam2", shape=(80, 40), dtype=np.float32, seed=2)
    xsml = TaggingCallback(tagger, downstream=[recorder])
    RE.subscribe(xsml)
    run_and_flush(RE, xsml, count([stack, cam2], 4))
    tags = recorder.tag_events()
    assert len(tags) == 4 * (3 + 1)
    per_key = {(e["data"]["source_key"], e["data"]["source_seq_num"], e["data"]["frame_index"])
               for e in tags}
    assert per_key == {("stack", s, i) for s in range(1, 5) for i in range(3)} | \
        {("cam2", s, 0) for s in range(1, 5)}
    assert recorder.of("stop")[0]["xsml_frames"] == 16


@pytest.mark.reliability
@pytest.mark.parametrize("dtype,sentinel", [
    (np.uint16, 2**16 - 1), (np.uint32, 2**32 - 1), (np.int32, -1), (np.int32, -2),
    (np.float32, np.nan), (np.float64, np.inf),
])
def test_detector_dtypes_and_sentinels_are_tagged(RE, distinct_tagger, recorder, dtype,
                                                  sentinel):
    """Each dtype's sentinel pixels are masked: the frame is tagged exactly like the same
    counts as float32 with NaN in the gap, and not like the gap read as counts."""
    tagger = distinct_tagger
    counts = np.random.default_rng(0).poisson(20, (100, 90))

    def frame():
        f = counts.astype(dtype)
        f[:, 40:45] = sentinel  # a module gap
        return f

    img = make_image_detector(func=frame)
    xsml = TaggingCallback(tagger, downstream=[recorder])
    RE.subscribe(xsml)
    run_and_flush(RE, xsml, count([img], 3))
    tags = recorder.tag_events()
    assert len(tags) == 3
    masked = counts.astype(np.float32)
    masked[:, 40:45] = np.nan
    as_counts = counts.astype(np.float64)
    as_counts[:, 40:45] = 0 if np.issubdtype(dtype, np.signedinteger) else 65535
    want, unmasked = tagger.predict([masked, as_counts])
    assert np.abs(want - unmasked).max() > 3e-3  # the test can tell a masked gap from counts
    for e in tags:
        assert e["data"]["skip_reason"] == ""
        got = np.array([e["data"][t] for t in tagger.tags])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)
        assert e["data"]["tags"] == ",".join(tagger.decide(want)[0])


@pytest.mark.reliability
def test_bad_frames_are_recorded_as_skipped(RE, tagger, recorder):
    kinds = {"tiny": np.zeros((4, 4)), "good": np.full((64, 64), 3, np.uint32),
             "strings": np.array(["a", "b"] * 512).reshape(32, 32),
             "nan": np.full((64, 64), np.nan)}
    order = ["tiny", "good", "strings", "nan"]
    calls = iter(range(100))
    img = make_image_detector(func=lambda: kinds[order[next(calls) % 4]])
    xsml = TaggingCallback(tagger, downstream=[recorder], image_keys=["img"])
    RE.subscribe(xsml)
    run_and_flush(RE, xsml, count([img], 8))
    kind_of = {e["seq_num"]: next(k for k, v in kinds.items() if v is e["data"]["img"])
               for e in recorder.of("event")}
    expected = {"tiny": "bad_shape", "good": "", "strings": "bad_dtype", "nan": ""}
    tags = recorder.tag_events()
    assert len(tags) == 8
    for e in tags:
        d = e["data"]
        assert d["skip_reason"].split(":")[0] == expected[kind_of[d["source_seq_num"]]]
        assert np.isnan(d[TAG_NAMES[0]]) == bool(d["skip_reason"])
    stop = recorder.of("stop")[0]
    assert stop["xsml_frames"] == 8
    n = {k: sum(1 for v in kind_of.values() if v == k) for k in kinds}
    assert stop["xsml_skipped"] == {"bad_dtype": n["strings"], "bad_shape": n["tiny"]}


class FailingTagger:
    """Wraps a tagger; the model raises on every batch larger than ``ok_up_to``."""

    def __init__(self, tagger, ok_up_to=0, error=None):
        self._t, self.ok_up_to = tagger, ok_up_to
        self.error = RuntimeError("boom") if error is None else error
        self.calls = []

    def __getattr__(self, name):
        return getattr(self._t, name)

    def predict_inputs(self, inputs):
        self.calls.append(len(inputs))
        if len(inputs) > self.ok_up_to:
            raise self.error
        return self._t.predict_inputs(inputs)


@pytest.mark.reliability
def test_model_errors_never_reach_the_runengine(RE, tagger, recorder):
    failing = FailingTagger(tagger, ok_up_to=0)
    xsml = TaggingCallback(failing, downstream=[recorder], max_batch=8)
    RE.subscribe(xsml)
    run_and_flush(RE, xsml, count([make_image_detector()], 5))
    tags = recorder.tag_events()
    assert len(tags) == 5
    assert all(e["data"]["skip_reason"].startswith("model_error: RuntimeError") for e in tags)
    assert recorder.of("stop")[0]["xsml_skipped"] == {"model_error": 5}
    assert recorder.of("stop")[0]["exit_status"] == "success"


@pytest.mark.reliability
def test_out_of_memory_batches_are_retried_smaller(RE, tagger, recorder):
    oom = torch_oom_error()
    failing = FailingTagger(tagger, ok_up_to=2, error=oom)
    xsml = TaggingCallback(failing, downstream=[recorder], max_batch=8, max_wait=0.5)
    RE.subscribe(xsml)
    run_and_flush(RE, xsml, count([make_image_detector()], 8))
    tags = recorder.tag_events()
    assert len(tags) == 8 and all(e["data"]["skip_reason"] == "" for e in tags)
    assert max(failing.calls) > 2 and min(failing.calls) <= 2


def torch_oom_error():
    import torch

    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.reliability
def test_failing_writer_does_not_stop_other_writers(RE, tagger, recorder):
    def broken(name, doc):
        if name in ("event", "event_page"):
            raise OSError("disk full")

    xsml = TaggingCallback(tagger, downstream=[broken, recorder])
    RE.subscribe(xsml)
    run_and_flush(RE, xsml, count([make_image_detector()], 4))
    assert recorder.names().count("event") == 4
    assert len(recorder.tag_events()) == 4
    assert xsml.status()["downstream_errors"] >= 5


@pytest.mark.reliability
def test_slow_writer_does_not_stall_the_scan(RE, tagger, recorder):
    # a writer slow enough that waiting for it would take several times what the scan takes,
    # even when the other test worker shares the 2 cores
    def slow(name, doc):
        time.sleep(0.25)
        recorder(name, doc)

    xsml = TaggingCallback(tagger, downstream=[slow])
    RE.subscribe(xsml)
    t0 = time.monotonic()
    RE(count([make_image_detector()], 20))
    scan_time = time.monotonic() - t0
    assert xsml.flush(60)
    n_docs = len(recorder.docs)
    assert recorder.names().count("event") == 20 and len(recorder.tag_events()) == 20
    assert scan_time < 0.25 * n_docs / 2, "the RunEngine waited for the writer"
    assert recorder.names()[-1] == "stop"


@pytest.mark.reliability
def test_overflow_is_counted_and_every_frame_accounted(RE, tagger, recorder):
    xsml = TaggingCallback(tagger, downstream=[recorder], max_pending_bytes=64 * 64 * 4 * 2)
    gate = threading.Event()
    original = xsml.worker.on_results

    def held(batch):  # hold the worker so that the queue fills up
        gate.wait(10)
        original(batch)

    xsml.worker.on_results = held
    RE.subscribe(xsml)
    RE(count([make_image_detector(shape=(64, 64))], 10))
    gate.set()
    assert xsml.flush(60)
    stop = recorder.of("stop")[0]
    assert stop["xsml_frames"] == 10
    assert stop["xsml_skipped"].get("overflow", 0) >= 1
    assert xsml.status()["overflow"] == stop["xsml_skipped"]["overflow"]
    assert len(recorder.tag_events()) == 10


@pytest.mark.reliability
def test_held_stop_is_released_after_timeout(RE, tagger, recorder):
    class Stuck(FailingTagger):
        def predict_inputs(self, inputs):
            time.sleep(3)
            return self._t.predict_inputs(inputs)

    xsml = TaggingCallback(Stuck(tagger), downstream=[recorder], stop_timeout=0.5)
    RE.subscribe(xsml)
    RE(count([make_image_detector()], 2))
    deadline = time.monotonic() + 10
    while "stop" not in recorder.names() and time.monotonic() < deadline:
        time.sleep(0.05)
    stop = recorder.of("stop")[0]
    assert stop["xsml_frames"] == 2 and stop["xsml_skipped"] == {"stop_timeout": 2}
    assert xsml.flush(10)
    assert recorder.names().count("stop") == 1  # late results do not re-open the run


def test_interleaved_runs_keep_separate_state(RE, tagger):
    docs_a, docs_b = DocumentRecorder(), DocumentRecorder()
    RE.subscribe(docs_a)
    RE(count([make_image_detector(seed=1)], 3))
    RE.unsubscribe(0)
    RE.subscribe(docs_b)
    RE(count([make_image_detector(seed=2)], 5))
    out = DocumentRecorder()
    xsml = TaggingCallback(tagger, downstream=[out])
    a, b = list(docs_a.docs), list(docs_b.docs)
    while a or b:  # interleave as a document bus may
        for src in (a, b):
            if src:
                xsml(*src.pop(0))
    assert xsml.flush(30)
    stops = {s["run_start"]: s for s in out.of("stop")}
    start_a = docs_a.of("start")[0]["uid"]
    start_b = docs_b.of("start")[0]["uid"]
    assert stops[start_a]["xsml_frames"] == 3 and stops[start_b]["xsml_frames"] == 5
    validate_all(out.docs)


@pytest.mark.reliability
def test_malformed_documents_pass_through(tagger):
    rec = DocumentRecorder()
    xsml = TaggingCallback(tagger, downstream=[rec])
    orphan_stop = {"uid": "s1", "run_start": "nope", "time": 0.0, "exit_status": "success"}
    xsml("stop", orphan_stop)
    xsml("event", {"uid": "e", "descriptor": "unknown", "seq_num": 1, "time": 0.0,
                   "data": {}, "timestamps": {}})
    xsml("descriptor", {"uid": "d"})  # no run_start
    assert xsml.flush(5)
    assert [n for n, _ in rec.docs] == ["stop", "event", "descriptor"]
    assert rec.docs[0][1] is orphan_stop
    errors = xsml.status()["document_errors"]
    assert errors["stop for unknown run"] == 1 and errors["event for unknown descriptor"] == 1


def test_runs_without_images_get_no_tag_stream(RE, tagger, recorder):
    xsml = TaggingCallback(tagger, downstream=[recorder])
    RE.subscribe(xsml)
    run_and_flush(RE, xsml, scan([det], motor, 0, 1, 3))
    assert not [d for d in recorder.of("descriptor") if d["name"] == "xsml_tags"]
    assert "xsml_frames" not in recorder.of("stop")[0]


@pytest.mark.reliability
def test_exiting_without_close_delivers_everything(tmp_path):
    """A script that never calls close(): held work is finished at interpreter exit."""
    import subprocess
    import sys
    import textwrap

    out = tmp_path / "names.txt"
    script = textwrap.dedent(f"""
        import numpy as np
        from bluesky import RunEngine
        from bluesky.plans import count
        from ophyd.sim import SynSignal
        from bluesky_xsml import Tagger, TaggingCallback
        names = open({str(out)!r}, "w")
        det = SynSignal(func=lambda: np.ones((256, 256), np.uint32), name="img",
                        labels={{"detectors"}})
        xsml = TaggingCallback(Tagger.untrained(), downstream=[lambda n, d: names.write(n + "\\n")])
        RE = RunEngine({{}})
        RE.subscribe(xsml)
        RE(count([det], 20))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "terminate called" not in res.stderr
    names = out.read_text().split()
    assert names[-1] == "stop" and names.count("event") == 20


def test_bad_worker_settings_are_refused_before_any_thread_starts(tagger):
    before = set(threading.enumerate())
    with pytest.raises(ValueError, match="overflow must be 'skip' or 'wait'"):
        TaggingCallback(tagger, overflow="drop")
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1"):
        TaggingCallback(tagger, max_batch=0)
    assert not [t for t in threading.enumerate() if t not in before and t.name.startswith("xsml")]
