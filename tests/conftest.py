"""Shared fixtures: a real RunEngine, image detectors and document recorders."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

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


def load_script(relative_path: str, name: str | None = None):
    """Import a script of the repository that is not in the package (a benchmark, a tool)."""
    path = Path(__file__).resolve().parents[1] / relative_path
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def make_distinct_tagger(*, spread: float = 0.15, seed: int = 0, config=None, **kwargs):
    """A real :class:`~bluesky_xsml.Tagger` whose tags' probabilities are far apart.

    An untrained network puts every tag near 0.5 (0.49-0.51), so a test that compares
    probabilities with any tolerance cannot tell two tags' columns apart. This one keeps
    the untrained network and preprocessing but sets its linear head: tag ``k`` gets the
    logit ``DISTINCT_LOGITS[k]`` (spread over -3.2..3.2 in a shuffled order, so tags next
    to each other are far apart) plus ``spread`` times one feature direction, standardised
    on a few Poisson frames, so that different frames still get different probabilities.
    The shift is the same for every tag, so the tags keep their order on every frame.
    ``seed`` and ``config`` choose the untrained network (as for ``Tagger.untrained``);
    other keywords go to the :class:`~bluesky_xsml.Tagger`.
    """
    import torch

    from bluesky_xsml import Tagger

    t = Tagger.untrained(seed=seed, config=config, **kwargs)
    rng = np.random.default_rng(1)
    frames = [rng.poisson(rng.uniform(0.5, 50), (96, 120)).astype(np.int32) for _ in range(16)]
    inputs, _, _ = t.preprocess(frames)
    pooled = {}
    hook = t.net.head.register_forward_hook(lambda m, i, o: pooled.setdefault("x", i[0]))
    with torch.no_grad():
        t.net(torch.as_tensor(inputs))
    hook.remove()
    f = pooled["x"].detach().float()
    mean = f.mean(0)
    _, sv, vh = torch.linalg.svd(f - mean, full_matrices=False)
    direction = vh[0] * (len(frames) ** 0.5 / sv[0])   # unit variance over those frames
    logits = torch.as_tensor(distinct_logits(len(t.tags)))
    with torch.no_grad():
        t.net.head.weight.copy_(spread * direction.expand_as(t.net.head.weight))
        t.net.head.bias.copy_(logits - spread * (direction @ mean))
    return Tagger(t.net, t.tags, metadata={"untrained": True, "distinct": True}, **kwargs)


def distinct_logits(n: int) -> np.ndarray:
    """The head biases of :func:`make_distinct_tagger`: -3.2..3.2, shuffled (fixed order)."""
    return np.linspace(-3.2, 3.2, n, dtype=np.float32)[np.random.default_rng(0).permutation(n)]


@pytest.fixture(scope="session")
def distinct_tagger():
    """A tagger whose tags' probabilities are far apart (see :func:`make_distinct_tagger`)."""
    t = make_distinct_tagger()
    t.warmup()
    return t


def assert_probs_match(got, want, *, atol=1e-3):
    """``got == want`` per tag within ``atol``, after checking that ``atol`` is well below
    the smallest gap between two tags of one frame, so two swapped columns cannot pass."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    gaps = np.diff(np.sort(want, axis=1), axis=1)
    assert gaps.size == 0 or gaps.min() > 3 * atol, \
        f"the model's tags are too close ({gaps.min():.2g}) for atol={atol}"
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)


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

    if _under_mutmut():  # mutmut's workers run their own timeout thread
        yield
        return
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


def _under_mutmut() -> bool:
    """Whether mutmut runs these tests (tools/mutation.sh): it forks one worker per mutant
    from the process that ran the tests once, and times the workers out itself."""
    import os

    return "MUTANT_UNDER_TEST" in os.environ or os.environ.get("XSML_UNDER_MUTMUT") == "1"


def pytest_sessionfinish(session, exitstatus):
    """If this process is still alive 5 minutes after its tests, print every thread's stack
    and exit, so that a hang at exit shows its cause instead of stalling CI."""
    import faulthandler
    import sys

    if _under_mutmut():  # an armed watchdog deadlocks the workers forked from this process
        return

    faulthandler.dump_traceback_later(300, exit=True, file=sys.__stderr__)
