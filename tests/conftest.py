"""Shared fixtures: a real RunEngine, image detectors and document recorders."""

from __future__ import annotations

import threading
import time

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


# ------------------------------------------------------------ leak guard
# A child process or a non-daemon thread that outlives its test module can hold
# the pytest worker open at exit (multiprocessing and dask join their children),
# which hangs the whole run. Each module must leave none behind; what it leaves
# is stopped and reported as an error on that module.
_LONG_LIVED = ("resource_tracker", "forkserver")


def _child_processes() -> dict:
    import psutil

    out = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(proc.cmdline())[:200]
        except psutil.Error:
            continue
        if not any(s in cmd for s in _LONG_LIVED):
            out[proc.pid] = (proc, cmd)
    return out


def _blocking_threads() -> set:
    from concurrent.futures.thread import _worker

    # idle executor workers are released at exit; other non-daemon threads are joined
    return {t for t in threading.enumerate() if not t.daemon
            and t is not threading.main_thread() and getattr(t, "_target", None) is not _worker}


@pytest.fixture(scope="module", autouse=True)
def _module_leaves_no_processes_or_threads():
    import psutil

    procs_before, threads_before = set(_child_processes()), _blocking_threads()
    yield
    deadline = time.monotonic() + 20
    while True:
        procs = {pid: v for pid, v in _child_processes().items() if pid not in procs_before}
        threads = _blocking_threads() - threads_before
        if (not procs and not threads) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for proc, _ in procs.values():
        try:
            proc.kill()
        except psutil.Error:
            pass
    assert not procs and not threads, (
        "the module left running: "
        + "; ".join([f"process {pid}: {cmd}" for pid, (_, cmd) in procs.items()]
                    + [f"thread {t.name}" for t in threads]))


def pytest_sessionfinish(session, exitstatus):
    """If this process is still alive 5 minutes after its tests, print every thread's stack
    and exit, so that a hang at exit shows its cause instead of stalling CI."""
    import faulthandler
    import sys

    faulthandler.dump_traceback_later(300, exit=True, file=sys.__stderr__)
