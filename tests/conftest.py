"""Shared fixtures: a real RunEngine, image detectors and document recorders."""

from __future__ import annotations

import threading

import event_model
import numpy as np
import pytest


@pytest.fixture
def RE():
    """A real bluesky RunEngine (no metadata persistence)."""
    from bluesky import RunEngine

    engine = RunEngine({}, call_returns_result=False)
    yield engine
    if engine.state != "idle":
        engine.halt()


class DocumentRecorder:
    """A downstream callback that keeps every (name, doc) it receives."""

    def __init__(self):
        self.docs: list[tuple[str, dict]] = []
        self._lock = threading.Lock()

    def __call__(self, name, doc):
        with self._lock:
            self.docs.append((name, doc))

    def names(self):
        return [n for n, _ in self.docs]

    def of(self, name):
        return [d for n, d in self.docs if n == name]

    def tag_events(self, stream="xsml_tags"):
        """All tag-stream events, unpacked from event pages, as a list of dicts."""
        uids = {d["uid"] for d in self.of("descriptor") if d["name"] == stream}
        out = []
        for page in self.of("event_page"):
            if page["descriptor"] in uids:
                out.extend(event_model.unpack_event_page(page))
        return out


@pytest.fixture
def recorder():
    return DocumentRecorder()


def validate_all(docs):
    """Schema-validate every document in ``docs``."""
    for name, doc in docs:
        event_model.schema_validators[event_model.DocumentNames[name]].validate(doc)


@pytest.fixture(scope="session")
def tagger():
    """An untrained tagger of the real API (fast to build, deterministic)."""
    from bluesky_xsml import Tagger

    t = Tagger.untrained(seed=0)
    t.warmup()
    return t


def make_image_detector(name="img", shape=(128, 160), dtype=np.uint32, stack=None, seed=0,
                        func=None):
    """An ophyd.sim SynSignal that returns a new frame each read."""
    from ophyd.sim import SynSignal

    rng = np.random.default_rng(seed)

    def frame():
        if func is not None:
            return func()
        full = (stack, *shape) if stack else shape
        return rng.poisson(4, full).astype(dtype)

    return SynSignal(func=frame, name=name, labels={"detectors"})
