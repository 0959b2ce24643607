"""``InferenceWorker`` (bluesky_xsml.inference.worker) under faults, on a real RunEngine.

The model fails (a batch, one poison frame, out of memory), and the inference
thread dies (``SystemExit`` from inside the model, an exception injected from
outside, a thread that simply vanished). Each test runs real plans on a real
``RunEngine`` with ophyd ``SynSignal`` detectors through
:class:`~bluesky_xsml.TaggingCallback` and checks that the run completes, the
RunEngine never sees an exception and every frame is accounted for (tagged, or
skipped with a reason).

Stand-in: the failing model wraps the real (untrained) ``Tagger`` and raises
the error a GPU would (``torch.cuda.OutOfMemoryError`` or the ``RuntimeError``
message of older torch) because there is no GPU here.
(Moved from tests/test_reliability_faults.py; still marked ``reliability``.)
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time

import numpy as np
import pytest
import torch
from bluesky.plans import count

from bluesky_xsml import TaggingCallback
from bluesky_xsml.tags import TAG_NAMES

from .conftest import make_image_detector, validate_all

pytestmark = pytest.mark.reliability


class WrappedTagger:
    """The real tagger, with ``predict_inputs`` replaced by ``fault(inputs, real)``."""

    def __init__(self, tagger, fault):
        self._t, self._fault = tagger, fault
        self.calls: list[int] = []

    def __getattr__(self, name):
        return getattr(self._t, name)

    def predict_inputs(self, inputs):
        self.calls.append(len(inputs))
        return self._fault(inputs, self._t.predict_inputs)


def by_seq(recorder):
    return {e["data"]["source_seq_num"]: e["data"] for e in recorder.tag_events()}


def assert_run_complete(recorder, n_frames):
    """One stop, last, success; one tag event per frame; schema-valid documents."""
    names = recorder.names()
    assert names.count("stop") == 1 and names[-1] == "stop"
    stop = recorder.of("stop")[0]
    assert stop["exit_status"] == "success"
    assert stop["xsml_frames"] == n_frames
    tags = by_seq(recorder)
    assert sorted(tags) == list(range(1, n_frames + 1))
    for d in tags.values():  # tagged: finite probabilities; skipped: NaN and a reason
        probs = np.array([d[t] for t in TAG_NAMES])
        assert np.isfinite(probs).all() != bool(d["skip_reason"])
    validate_all(recorder.docs)
    return stop, tags


# ----------------------------------------------------------------- the model
def test_cuda_oom_runtime_error_message_is_retried_in_smaller_batches(RE, tagger, recorder):
    """Older torch raises a plain RuntimeError("CUDA out of memory..."): split, then tag."""
    def fault(inputs, real):
        if len(inputs) > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.50 GiB (GPU 0; "
                               "7.79 GiB total capacity)")
        return real(inputs)

    model = WrappedTagger(tagger, fault)
    xsml = TaggingCallback(model, downstream=[recorder], max_batch=8, max_wait=0.5)
    RE.subscribe(xsml)
    RE(count([make_image_detector()], 8))
    assert xsml.flush(60)
    stop, tags = assert_run_complete(recorder, 8)
    assert all(d["skip_reason"] == "" for d in tags.values())
    assert stop["xsml_skipped"] == {}
    assert max(model.calls) > 1 and model.calls.count(1) == 8


def test_out_of_memory_even_for_one_frame_is_a_recorded_skip(RE, tagger, recorder, caplog):
    def fault(inputs, real):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    xsml = TaggingCallback(WrappedTagger(tagger, fault), downstream=[recorder], max_batch=4)
    RE.subscribe(xsml)
    with caplog.at_level(logging.WARNING, logger="bluesky_xsml"):
        RE(count([make_image_detector()], 5))  # raises nothing
        assert xsml.flush(60)
    stop, tags = assert_run_complete(recorder, 5)
    assert all(d["skip_reason"].startswith("model_error: OutOfMemoryError: CUDA out of memory")
               for d in tags.values())
    assert stop["xsml_skipped"] == {"model_error": 5}
    assert xsml.status()["skipped_by_reason"] == {"model_error": 5}
    assert "retrying in halves" in caplog.text


def test_a_poison_frame_costs_only_itself(RE, tagger, recorder):
    """The model fails on one input only: the batch is bisected down to that frame."""
    poison = np.full((128, 160), 7, np.uint32)
    poison_input = tagger.preprocess([poison])[0][0]

    def fault(inputs, real):
        if any(np.array_equal(np.asarray(x), poison_input) for x in inputs):
            raise ValueError("the model cannot digest this frame")
        return real(inputs)

    rng = np.random.default_rng(5)
    pool = [rng.poisson(4, (128, 160)).astype(np.uint32) for _ in range(3)] + [poison]
    calls = iter(range(10**6))
    xsml = TaggingCallback(WrappedTagger(tagger, fault), downstream=[recorder], max_batch=8,
                           max_wait=0.5)
    RE.subscribe(xsml)
    RE(count([make_image_detector(func=lambda: pool[next(calls) % 4])], 8))
    assert xsml.flush(60)
    stop, tags = assert_run_complete(recorder, 8)
    poisoned = {e["seq_num"] for e in recorder.of("event") if e["data"]["img"] is poison}
    assert len(poisoned) == 2
    assert {s for s, d in tags.items() if d["skip_reason"]} == poisoned
    assert {tags[s]["skip_reason"] for s in poisoned} == {
        "model_error: ValueError: the model cannot digest this frame"}
    assert stop["xsml_skipped"] == {"model_error": 2}


# ------------------------------------------------------- the inference thread
def test_worker_thread_killed_by_the_model_is_restarted(RE, tagger, recorder, caplog):
    """SystemExit is not an Exception: it ends the thread. Its batch is skipped, the rest tagged."""
    crashed = []

    def fault(inputs, real):
        if not crashed:
            crashed.append(len(inputs))
            raise SystemExit("simulated crash inside the model")
        return real(inputs)

    xsml = TaggingCallback(WrappedTagger(tagger, fault), downstream=[recorder], max_batch=2,
                           stop_timeout=300)
    first_thread = xsml.worker._thread
    RE.subscribe(xsml)
    with caplog.at_level(logging.ERROR, logger="bluesky_xsml"):
        t0 = time.monotonic()
        RE(count([make_image_detector()], 10))
        assert xsml.flush(60)
        elapsed = time.monotonic() - t0
    assert elapsed < 60  # finished by the restart, not by the 300 s stop timeout
    stop, tags = assert_run_complete(recorder, 10)
    died = {s for s, d in tags.items() if d["skip_reason"]}
    assert len(died) == crashed[0]
    assert all(tags[s]["skip_reason"] == "worker_died: SystemExit" for s in died)
    assert stop["xsml_skipped"] == {"worker_died": crashed[0]}
    status = xsml.status()
    assert status["worker_restarts"] == 1 and status["queue_jobs"] == 0
    assert xsml.worker._thread is not first_thread and xsml.worker._thread.is_alive()
    assert "inference thread died (SystemExit: simulated crash inside the model)" in caplog.text


def _raise_in_thread(thread: threading.Thread, exc_type) -> None:
    """Inject ``exc_type`` asynchronously into ``thread`` (what a kill looks like from inside)."""
    n = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                                   ctypes.py_object(exc_type))
    assert n == 1


def test_worker_thread_killed_from_outside_mid_batch(RE, tagger, recorder):
    """An exception injected into the thread while it runs the model: pending frames survive."""
    in_model = threading.Event()
    release = threading.Event()

    def fault(inputs, real):
        if not in_model.is_set():
            in_model.set()
            while not release.is_set():  # Python-level wait, so the injection lands here
                time.sleep(0.001)
        return real(inputs)

    xsml = TaggingCallback(WrappedTagger(tagger, fault), downstream=[recorder], max_batch=3)
    RE.subscribe(xsml)
    killer_done = threading.Event()

    def killer():
        assert in_model.wait(60)
        _raise_in_thread(xsml.worker._thread, KeyboardInterrupt)
        release.set()
        killer_done.set()

    threading.Thread(target=killer, daemon=True).start()
    RE(count([make_image_detector()], 9))
    assert killer_done.wait(60)
    assert xsml.flush(60)
    stop, tags = assert_run_complete(recorder, 9)
    skipped = {s: d["skip_reason"] for s, d in tags.items() if d["skip_reason"]}
    assert 1 <= len(skipped) <= 3
    assert set(skipped.values()) == {"worker_died: KeyboardInterrupt"}
    assert sum(stop["xsml_skipped"].values()) == len(skipped)
    assert xsml.status()["worker_restarts"] == 1


def test_dead_worker_is_noticed_without_new_frames(tagger):
    """The supervisor (the callback's housekeeping tick) restarts a thread that vanished."""
    xsml = TaggingCallback(tagger, downstream=[])
    worker = xsml.worker
    worker._stop.set()  # let the thread end as if it had been killed ...
    worker._thread.join(5)
    worker._stop.clear()  # ... while the worker is still supposed to run
    assert not worker._thread.is_alive()
    deadline = time.monotonic() + 5
    while not worker._thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert worker._thread.is_alive() and xsml.status()["worker_restarts"] == 1
    xsml.close()


# ------------------------------------------- frames to results (one path for all)
def test_frames_to_results_gives_one_result_per_item_in_order(tagger):
    """Read failures, bad values, model failures and good frames each get their own result."""
    from bluesky_xsml.inference.results import FrameItem, frames_to_results, split_value

    def same(inputs, real):
        return real(inputs)

    def nan(inputs, real):
        return np.full_like(real(inputs), np.nan)

    rng = np.random.default_rng(1)
    good = rng.poisson(4, (64, 64)).astype(np.uint32)
    ident = dict(stream="primary", event_uid="e", key="cam", t_in=0.0)
    items = [FrameItem(seq_num=1, skip_reason="read_error: gone", **ident),
             *split_value(np.stack([good, good]), seq_num=2, **ident),
             *split_value("not an image", seq_num=3, **ident),
             FrameItem(seq_num=4, frame=np.ones(5, np.uint32), **ident),   # 1-D: refused
             FrameItem(seq_num=5, frame=good, **ident)]
    seen = []
    results = frames_to_results(WrappedTagger(tagger, same), items, clock=lambda: 2.0,
                                on_inputs=lambda rows: seen.extend(i.seq_num for i, _ in rows))
    assert [(r.seq_num, r.frame_index) for r in results] == [
        (1, 0), (2, 0), (2, 1), (3, 0), (4, 0), (5, 0)]
    reasons = [r.skip_reason.split(":")[0] for r in results]
    # refused by the preprocessing, each with its reason (a string, a 1-D array)
    assert reasons[0] == "read_error" and reasons[3] == "bad_dtype" and reasons[4] != ""
    assert reasons[1] == reasons[2] == reasons[5] == ""
    tagged = [r for r in results if not r.skip_reason]
    assert all(len(r.probs) == len(tagger.tags) and np.isfinite(r.probs).all() for r in tagged)
    assert all(r.latency == 2.0 and r.checkpoint == tagger.checkpoint_id for r in results)
    assert sorted(seen) == [2, 2, 5]                     # inputs of the tagged frames only
    broken = frames_to_results(WrappedTagger(tagger, nan),
                               [FrameItem(seq_num=9, frame=good, **ident)])[0]
    assert broken.skip_reason == "model_error: non-finite output" and broken.probs is None
