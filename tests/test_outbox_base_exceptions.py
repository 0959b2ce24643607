"""Delivery survives writers that raise exceptions outside ``Exception``.

``SystemExit``, ``KeyboardInterrupt`` and ``asyncio.CancelledError`` derive from
``BaseException``; a writer raising one of them used to end the outbox's
delivery thread for good (the other writers got nothing more, ``flush()``
returned False and the loss was not counted).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import time

import pytest
from bluesky.plans import count

from bluesky_xsml import TaggingCallback
from bluesky_xsml.documents.outbox import Outbox

from .conftest import DocumentRecorder, make_image_detector, validate_all

pytestmark = pytest.mark.reliability

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
