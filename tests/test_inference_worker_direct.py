"""The inference worker (``bluesky_xsml.inference.worker``) driven directly, without a RunEngine.

The callback tests see the worker through the documents it leads to. Here jobs are handed
to :class:`InferenceWorker` itself, with a real tagger whose tags' probabilities are far apart
(``distinct_tagger``), so that each frame's result can be held to the model's output and
decision column by column, each skip to its exact reason, and the counters and the memory
budget to exact numbers. Written against the mutants the callback tests let through
(``tools/mutation.sh inference``).
"""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest

from bluesky_xsml.errors import FrameSourceError
from bluesky_xsml.inference.worker import FrameJob, InferenceWorker, WorkerStats, admit

from .conftest import assert_probs_match


def frame(seed: int, shape=(48, 56)) -> np.ndarray:
    return np.random.default_rng(seed).poisson(5 + seed, shape).astype(np.uint16)


def job(name: str, source=None, **kw) -> FrameJob:
    return FrameJob(run_uid="run", stream="primary", seq_num=kw.pop("seq_num", 1),
                    event_uid=f"uid-{name}", key=name, source=source, **kw)


def run_jobs(tagger, jobs, **options):
    """Submit ``jobs`` to a fresh worker; returns ({key: [FrameResult]}, worker.stats)."""
    got = {}
    worker = InferenceWorker(tagger, lambda out: got.update(
        {j.key: results for j, results in out}), warmup=False, **options)
    try:
        for j in jobs:
            worker.submit(j)
        assert worker.flush(60)
    finally:
        worker.close()
    return got, worker.stats


def test_each_frame_is_tagged_or_skipped_with_its_reason(distinct_tagger):
    tagger = distinct_tagger
    a, b0, b1 = frame(1), frame(2), frame(3)

    def missing():
        raise FrameSourceError("no such file", reason="missing_file")

    def broken():
        raise KeyError("dataset")

    jobs = [
        job("one", a, nbytes=a.nbytes),
        job("stack", lambda: np.stack([b0, b1])),
        job("over", None, skip_reason="overflow"),
        job("none", None),
        job("missing", missing),
        job("broken", broken),
        job("ragged", lambda: [[1, 2], [3]]),
        job("tiny", np.ones((4, 4), np.uint16)),
    ]
    got, stats = run_jobs(tagger, jobs, max_batch=16, max_wait=0.2)
    assert set(got) == {j.key for j in jobs}

    tagged = [got["one"][0], *got["stack"]]
    assert [r.frame_index for r in got["stack"]] == [0, 1]
    probs = np.array([r.probs for r in tagged])
    assert_probs_match(probs, tagger.predict([a, b0, b1]))
    decided = tagger.decide(probs)
    for r, tags in zip(tagged, decided, strict=True):
        assert list(r.tags) == tags and r.skip_reason == ""
        assert r.checkpoint == tagger.checkpoint_id and r.latency >= 0
        assert (r.stream, r.seq_num, r.key) == ("primary", 1, r.event_uid[4:])
    assert any(decided) and not all(len(d) == len(tagger.tags) for d in decided)

    def skip(key):
        (r,) = got[key]
        assert r.probs is None and r.frame_index == 0 and r.event_uid == f"uid-{key}"
        return r.skip_reason

    assert skip("over") == "overflow"
    assert skip("none") == "no_data"
    assert skip("missing") == "missing_file: no such file"
    assert skip("broken") == "read_error: KeyError: 'dataset'"
    assert skip("ragged").startswith("bad_frame: ")
    reason = skip("tiny")
    assert reason.split(":")[0] == "bad_shape" and reason.count(": ") >= 1, reason

    assert stats.submitted == len(jobs)
    assert (stats.frames_tagged, stats.frames_skipped) == (3, 6)
    assert dict(stats.skipped_by_reason) == {"overflow": 1, "no_data": 1, "missing_file": 1,
                                             "read_error": 1, "bad_frame": 1, "bad_shape": 1}
    assert stats.batches >= 1 and len(stats.latencies) == 3
    assert stats.pending_bytes == 0  # every admitted byte released
    lat = sorted(stats.latencies)
    pct = stats.latency_percentiles()
    assert set(pct) == {"p50", "p99"} and lat[0] <= pct["p50"] <= pct["p99"] <= lat[-1]
    assert pct["p50"] == pytest.approx(lat[1])


def test_max_batch_bounds_each_model_call(distinct_tagger):
    sizes = []

    class Counting:
        def __getattr__(self, name):
            return getattr(distinct_tagger, name)

        def predict_inputs(self, inputs, centers=None):
            sizes.append(len(inputs))
            return distinct_tagger.predict_inputs(inputs, centers)

    frames = [frame(s) for s in range(7)]
    got, stats = run_jobs(Counting(), [job(str(i), f, seq_num=i + 1)
                                       for i, f in enumerate(frames)],
                          max_batch=3, max_wait=0.5)
    assert max(sizes) <= 3 and sum(sizes) == 7
    assert stats.batches == len(sizes)
    probs = np.array([got[str(i)][0].probs for i in range(7)])
    assert_probs_match(probs, distinct_tagger.predict(frames))


def test_a_frame_the_model_fails_on_is_skipped_and_the_others_tagged(distinct_tagger):
    """The batch is split in halves down to the failing frame; a non-finite output is a
    model error too."""
    poison, nan = 60001, 60002  # the first pixel marks the frames to fail

    class Faulty:
        def __init__(self):
            self.calls = []

        def __getattr__(self, name):
            return getattr(distinct_tagger, name)

        def predict_inputs(self, inputs, centers=None):
            self.calls.append(len(inputs))
            marks = [float(x[0, 0, 0]) for x in inputs]
            if poison in marks:
                raise RuntimeError("kernel failed")
            out = distinct_tagger.predict_inputs(inputs, centers)
            out[[m == nan for m in marks]] = np.nan
            return out

        def preprocess(self, frames):
            inputs, ok, errors = distinct_tagger.preprocess(frames)
            for row, i in enumerate(ok):
                inputs[row, 0, 0, 0] = frames[i][0, 0]
            return inputs, ok, errors

    frames = []
    for s, mark in enumerate([0, poison, 0, nan, 0]):
        f = frame(s)
        f[0, 0] = mark
        frames.append(f)
    faulty = Faulty()
    got, stats = run_jobs(faulty, [job(str(i), f) for i, f in enumerate(frames)],
                          max_batch=8, max_wait=0.5)
    reasons = [got[str(i)][0].skip_reason for i in range(5)]
    assert reasons == ["", "model_error: RuntimeError: kernel failed", "",
                       "model_error: non-finite output", ""]
    assert faulty.calls[0] == 5 and 1 in faulty.calls  # whole batch first, one frame last
    assert (stats.frames_tagged, stats.frames_skipped) == (3, 2)
    assert dict(stats.skipped_by_reason) == {"model_error": 2}


def test_latency_percentiles():
    stats = WorkerStats()
    stats.latencies.extend(float(x) for x in range(101))
    assert stats.latency_percentiles() == {"p50": 50.0, "p99": 99.0}
    assert all(type(v) is float for v in stats.latency_percentiles().values())
    empty = WorkerStats().latency_percentiles()
    assert set(empty) == {"p50", "p99"} and np.isnan(list(empty.values())).all()


# ------------------------------------------------------------------ the memory budget
def test_admit_counts_bytes_up_to_the_budget_inclusive():
    stats, budget = WorkerStats(), threading.Condition()
    first, exact, over = job("a", b"x", nbytes=60), job("b", b"x", nbytes=40), job("c", b"x",
                                                                                   nbytes=1)
    for j in (first, exact):
        admit(j, stats, budget, max_pending_bytes=100, overflow="skip", hand_off_timeout=0)
        assert j.skip_reason == "" and j.source == b"x"
    assert stats.pending_bytes == 100 and stats.overflow == 0
    admit(over, stats, budget, max_pending_bytes=100, overflow="skip", hand_off_timeout=0)
    assert (over.source, over.skip_reason, over.nbytes) == (None, "overflow", 0)
    assert stats.pending_bytes == 100 and stats.overflow == 1


def test_admit_waits_for_room_with_overflow_wait():
    stats, budget = WorkerStats(pending_bytes=90), threading.Condition()

    def free():
        with budget:
            stats.pending_bytes = 0
            budget.notify_all()

    timer = threading.Timer(0.2, free)
    timer.start()
    j = job("a", b"x", nbytes=20)
    admit(j, stats, budget, max_pending_bytes=100, overflow="wait", hand_off_timeout=10)
    timer.join()
    assert j.skip_reason == "" and stats.pending_bytes == 20 and stats.overflow == 0
    # without room in time it is an overflow skip, never a drop
    late = job("b", b"x", nbytes=200)
    admit(late, stats, budget, max_pending_bytes=100, overflow="wait", hand_off_timeout=0.05)
    assert late.skip_reason == "overflow" and stats.overflow == 1 and stats.pending_bytes == 20
    # "skip" does not wait
    stats.pending_bytes = 90
    threading.Timer(0.2, free).start()
    quick = job("c", b"x", nbytes=20)
    admit(quick, stats, budget, max_pending_bytes=100, overflow="skip", hand_off_timeout=10)
    assert quick.skip_reason == "overflow"


def test_an_over_budget_frame_is_skipped_as_overflow_and_its_bytes_never_counted(
        distinct_tagger):
    big, small = frame(1, (64, 64)), frame(2)
    got, stats = run_jobs(distinct_tagger, [job("big", big, nbytes=big.nbytes),
                                            job("small", small, nbytes=small.nbytes)],
                          max_pending_bytes=big.nbytes - 1)
    assert got["big"][0].skip_reason == "overflow" and got["small"][0].skip_reason == ""
    assert stats.overflow == 1 and stats.pending_bytes == 0


@pytest.mark.parametrize("bad, message", [
    ({"overflow": "drop"}, "overflow must be 'skip' or 'wait', got 'drop'"),
    ({"max_batch": 0}, "max_batch must be >= 1, got 0"),
])
def test_bad_settings_are_refused(distinct_tagger, bad, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        InferenceWorker(distinct_tagger, print, warmup=False, **bad)
