"""``Outbox`` (bluesky_xsml.documents.outbox): delivery to writers that are slow, buggy or away.

Writers that block, raise (``Exception`` and ``BaseException`` alike), or are
unreachable for a while; the delivery thread killed from outside. The
callback-level tests run real plans on a real ``RunEngine`` through
:class:`~bluesky_xsml.TaggingCallback` and check that nothing is lost or
reordered without being counted. The failing writers are small callables
because the failure (a raise, a sleep, ``ConnectionError`` for a while) is the
point; the same outage against a real Tiled server is in
tests/test_reliability_catalog.py.
(Moved from tests/test_reliability_faults.py and tests/test_outbox_base_exceptions.py;
still marked ``reliability``.)
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
import time

import numpy as np
import pytest
from bluesky.plans import count

from bluesky_xsml import TaggingCallback
from bluesky_xsml.documents.outbox import Outbox, RetryPolicy

from .conftest import DocumentRecorder, make_image_detector, validate_all

pytestmark = pytest.mark.reliability


# -------------------------------------------------------------- the writers
def test_slow_writer_blocks_the_runengine_at_most_max_block(RE, tagger):
    """Delivery queue bound 5 documents, max_block 0.05 s, writer 30 ms per document."""
    received = DocumentRecorder()

    def slow(name, doc):
        time.sleep(0.03)
        received(name, doc)

    xsml = TaggingCallback(tagger, downstream=[slow], max_pending_documents=5, max_block=0.05)
    waits = []

    def timed(name, doc):
        t0 = time.perf_counter()
        xsml(name, doc)
        waits.append(time.perf_counter() - t0)

    seen = DocumentRecorder()
    RE.subscribe(seen)
    RE.subscribe(timed)
    RE(count([make_image_detector(shape=(64, 64))], 30))
    assert xsml.flush(60)
    assert xsml.status()["delivery_overruns"] >= 1  # the bound was reached ...
    assert max(waits) < 0.05 + 0.25  # ... and the RunEngine waited at most max_block (+ slack)
    # nothing lost or reordered: the RunEngine's documents, in its order, then tags, stop last
    theirs = [id(d) for n, d in seen.docs if n != "stop"]
    ours = [id(d) for _, d in received.docs if id(d) in set(theirs)]
    assert ours == theirs
    assert len(received.tag_events()) == 30 and received.names()[-1] == "stop"


def test_writer_bug_skips_one_document_and_reports_it(RE, tagger, recorder, caplog):
    """A non-transient error: that document is skipped for that writer only, counted per run."""
    got = DocumentRecorder()

    def buggy(name, doc):
        if name == "event" and doc["seq_num"] == 3:
            raise ValueError("cannot serialize")
        got(name, doc)

    xsml = TaggingCallback(tagger, downstream=[buggy, recorder])
    RE.subscribe(xsml)
    with caplog.at_level(logging.ERROR, logger="bluesky_xsml"):
        RE(count([make_image_detector()], 5))
        assert xsml.flush(30)
    run = recorder.of("start")[0]["uid"]
    assert [d["seq_num"] for d in got.of("event")] == [1, 2, 4, 5]
    assert len(recorder.of("event")) == 5
    assert [n for n, _ in got.docs] == [n for n, d in recorder.docs
                                        if not (n == "event" and d["seq_num"] == 3)]
    assert xsml.status()["delivery_losses"] == {run: {"failed": 1}}
    assert f"raised on a event document of run {run}" in caplog.text


class Outage:
    """A writer that raises ConnectionRefusedError while ``down`` is set, else records."""

    def __init__(self):
        self.down = threading.Event()
        self.docs = DocumentRecorder()
        self.refused = 0

    def __call__(self, name, doc):
        if self.down.is_set():
            self.refused += 1
            raise ConnectionRefusedError(111, "Connection refused")
        self.docs(name, doc)


FAST_RETRY = RetryPolicy(initial_delay=0.02, max_delay=0.1)


def test_unreachable_writer_is_buffered_and_caught_up_in_order(RE, tagger, recorder, caplog):
    outage = Outage()
    xsml = TaggingCallback(tagger, downstream=[outage, recorder], delivery_retry=FAST_RETRY)
    calls = iter(range(100))

    def frame():  # the writer goes away at the 3rd frame and comes back at the 9th
        i = next(calls)
        if i == 2:
            outage.down.set()
        if i == 8:
            assert xsml.outbox.flush(0.3) is False  # documents are waiting for the writer
            assert xsml.status()["delivery_backlog"]
            outage.down.clear()
        return np.random.default_rng(i).poisson(4, (64, 64)).astype(np.uint32)

    RE.subscribe(xsml)
    with caplog.at_level(logging.WARNING, logger="bluesky_xsml"):
        RE(count([make_image_detector(func=frame)], 12))
        assert xsml.flush(60)
    assert outage.refused >= 2  # the first try and at least one retry failed
    key = [(n, d.get("uid")) for n, d in recorder.docs]
    assert [(n, d.get("uid")) for n, d in outage.docs.docs] == key  # same documents, same order
    assert len(outage.docs.tag_events()) == 12
    status = xsml.status()
    assert status["delivery_losses"] == {} and status["delivery_backlog"] == {}
    assert "is unreachable (ConnectionRefusedError" in caplog.text
    assert "is back after" in caplog.text


def test_outage_longer_than_the_backlog_reports_losses_per_run(RE, tagger, recorder, caplog):
    outage = Outage()
    retry = RetryPolicy(initial_delay=0.02, max_delay=0.05, max_backlog=4)
    xsml = TaggingCallback(tagger, downstream=[outage, recorder], delivery_retry=retry)
    RE.subscribe(xsml)
    outage.down.set()
    with caplog.at_level(logging.ERROR, logger="bluesky_xsml"):
        RE(count([make_image_detector(shape=(64, 64))], 6))
        assert xsml.outbox.flush(0.5) is False
        first = recorder.of("start")[0]["uid"]
        n_first = len(recorder.docs)
        outage.down.clear()
        assert xsml.outbox.flush(10)  # the kept documents go out once it is back
        RE(count([make_image_detector(shape=(64, 64))], 3))
        assert xsml.flush(60)
    second = recorder.of("start")[1]["uid"]
    names = [n for n, _ in outage.docs.docs]
    # the oldest 4 documents of the first run were kept and delivered; the rest were dropped
    assert [(n, d["uid"]) for n, d in outage.docs.docs[:4]] == \
        [(n, d["uid"]) for n, d in recorder.docs[:4]]
    assert names[4] == "start" and outage.docs.docs[4][1]["uid"] == second
    assert len(outage.docs.docs) == 4 + len(recorder.docs) - n_first
    losses = xsml.status()["delivery_losses"]
    assert losses == {first: {"dropped": n_first - 4}}
    assert f"dropping documents of run {first}" in caplog.text


def test_writer_still_down_at_close_is_counted_undelivered(RE, tagger, recorder, caplog):
    outage = Outage()
    xsml = TaggingCallback(tagger, downstream=[outage, recorder], delivery_retry=FAST_RETRY)
    RE.subscribe(xsml)
    outage.down.set()
    RE(count([make_image_detector(shape=(64, 64))], 3))
    assert xsml.flush(0.5) is False
    with caplog.at_level(logging.ERROR, logger="bluesky_xsml"):
        xsml.close(timeout=0.5)
    run = recorder.of("start")[0]["uid"]
    assert xsml.status()["delivery_losses"] == {run: {"undelivered": len(recorder.docs)}}
    assert "still unreachable at close" in caplog.text


# ------------------------------------------- writers raising BaseException
BASE_EXCEPTIONS = [SystemExit, KeyboardInterrupt, asyncio.CancelledError]


@pytest.mark.parametrize("exc", BASE_EXCEPTIONS, ids=lambda e: e.__name__)
def test_writer_raising_a_base_exception_costs_only_that_document(RE, tagger, recorder, caplog,
                                                                  exc):
    got = DocumentRecorder()

    def dying(name, doc):
        if name == "event" and doc["seq_num"] == 2:
            raise exc("the writer gave up")
        got(name, doc)

    xsml = TaggingCallback(tagger, downstream=[dying, recorder])
    RE.subscribe(xsml)
    with caplog.at_level(logging.ERROR, logger="bluesky_xsml"):
        RE(count([make_image_detector()], 4))
        assert xsml.flush(30) is True
    run = recorder.of("start")[0]["uid"]
    # the other writer received every document, tag stream and stop included
    names = recorder.names()
    assert names[0] == "start" and names[-1] == "stop"
    assert len(recorder.of("event")) == 4
    assert len(recorder.tag_events()) == 4
    validate_all(recorder.docs)
    # the dying writer lost exactly one document and kept receiving the rest
    assert [d["seq_num"] for d in got.of("event")] == [1, 3, 4]
    assert got.names()[-1] == "stop"
    assert xsml.status()["delivery_losses"] == {run: {"failed": 1}}
    assert exc.__name__ in xsml.outbox.last_error
    xsml.close()


@pytest.mark.parametrize("exc", BASE_EXCEPTIONS, ids=lambda e: e.__name__)
def test_outbox_alone_counts_base_exceptions_and_keeps_its_thread(exc):
    first, second = DocumentRecorder(), DocumentRecorder()

    def dying(name, doc):
        if doc.get("n") == 1:
            raise exc()
        first(name, doc)

    box = Outbox([dying, second], poll_interval=0.005)
    thread = box._thread
    box.put("start", {"uid": "r1"})
    for n in range(3):
        box.put("event", {"descriptor": "d", "n": n})
    assert box.flush(5) is True
    assert box._thread is thread and thread.is_alive()
    assert len(second.docs) == 4
    assert [d.get("n") for _, d in first.docs] == [None, 0, 2]
    assert box.losses() == {"<no run>": {"failed": 1}}
    assert box.restarts == 0
    box.close()


def _raise_in(thread, exc) -> None:
    ret = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                                     ctypes.py_object(exc))
    assert ret == 1


def test_delivery_thread_killed_from_outside_is_replaced():
    """An exception injected into the thread outside any writer call: a new thread takes over."""
    got = DocumentRecorder()
    box = Outbox([got], poll_interval=0.005)
    old = box._thread
    box.put("start", {"uid": "r1"})
    assert box.flush(5)
    _raise_in(old, SystemExit)
    old.join(5)
    assert not old.is_alive()
    deadline = time.monotonic() + 5
    while box.restarts == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert box.restarts == 1 and box._thread is not old and box._thread.is_alive()
    box.put("stop", {"run_start": "r1", "uid": "s1"})
    assert box.flush(5) is True
    assert got.names() == ["start", "stop"]
    box.close()
