"""Documents name files; they must not choose which files the tagger opens.

A real RunEngine writes frames to HDF5 files under a beamline directory. Its
``resource`` / ``stream_resource`` documents are altered on their way to the
callback, as a crafted document on the bus would be: ``..`` in the path, an
absolute path, a symlink out of the root, a FIFO, a missing file, ``/etc/passwd``.
Each frame must be recorded as skipped with a short reason that names no
directory, and the RunEngine must finish (a FIFO used to block h5py's open
while it held the GIL, stopping every thread of the process).
"""

from __future__ import annotations

import os
import re
import threading
import time

import h5py
import numpy as np
import pytest
from bluesky.plans import count
from ophyd_async.core import init_devices

from bluesky_xsml import TaggingCallback
from bluesky_xsml.documents.external import ALLOWED_ROOTS_ENV, ExternalFrames, FrameRef
from bluesky_xsml.errors import FrameSourceError
from bluesky_xsml.sim.detectors import HDF5ResourceDetector, StreamResourceDetector

from .conftest import validate_all

pytestmark = pytest.mark.security

SHAPE = (40, 48)


def frames():
    rng = np.random.default_rng(0)
    return lambda: rng.poisson(5, SHAPE).astype(np.uint32)


@pytest.fixture
def site(tmp_path):
    """A beamline directory, and a readable HDF5 file of frames outside it."""
    beamline, elsewhere = tmp_path / "beamline", tmp_path / "elsewhere"
    beamline.mkdir()
    elsewhere.mkdir()
    secret = elsewhere / "secret.h5"
    with h5py.File(secret, "w") as f:
        f.create_dataset("/entry/data/data", data=np.ones((8, *SHAPE), np.uint32))
    (beamline / "link.h5").symlink_to(secret)
    os.mkfifo(beamline / "pipe.h5")
    return beamline, secret


def tampered(callback, resource=None, stream_uri=None):
    """Pass documents on, with the resource path or stream_resource uri replaced."""

    def forward(name, doc):
        if name == "resource" and resource is not None:
            doc = {**doc, **resource(doc)}
        if name == "stream_resource" and stream_uri is not None:
            doc = {**doc, "uri": stream_uri}
        callback(name, doc)

    return forward


def run_and_collect(RE, recorder, xsml, det, n=3):
    t0 = time.monotonic()
    RE(count([det], n))
    elapsed = time.monotonic() - t0
    assert xsml.flush(60)
    validate_all([(name, d) for name, d in recorder.docs if name != "datum"])
    reasons = [t["data"]["skip_reason"] for t in recorder.tag_events()]
    assert len(reasons) == n
    return reasons, elapsed


def assert_no_paths(reasons, *paths):
    for reason in reasons:
        assert not re.search(r"(^|[\s'\"(])/\w", reason), reason  # no absolute path at all
        for p in paths:
            assert str(p) not in reason


CASES = {
    "dotdot": (lambda d, secret: {"resource_path": "../elsewhere/secret.h5"},
               "outside_allowed_roots"),
    "absolute": (lambda d, secret: {"resource_path": str(secret)}, "outside_allowed_roots"),
    "symlink": (lambda d, secret: {"resource_path": "link.h5"}, "outside_allowed_roots"),
    "fifo": (lambda d, secret: {"resource_path": "pipe.h5"}, "not_regular_file"),
    "missing": (lambda d, secret: {"resource_path": "gone.h5"}, "missing_file"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES)
def test_crafted_resource_paths_are_recorded_skips(RE, tagger, recorder, site, case):
    beamline, secret = site
    change, expected = CASES[case]
    xsml = TaggingCallback(tagger, downstream=[recorder], read_retries=1,
                           read_retry_delay=0.01)
    RE.subscribe(tampered(xsml, resource=lambda doc: change(doc, secret)))
    reasons, elapsed = run_and_collect(RE, recorder, xsml,
                                       HDF5ResourceDetector("ad", frames(), beamline))
    assert all(r.startswith(expected + ":") for r in reasons), reasons
    assert_no_paths(reasons, beamline, secret)
    assert recorder.of("stop")[0]["xsml_skipped"] == {expected: 3}
    assert elapsed < 30
    xsml.close()


@pytest.mark.timeout(120)
def test_etc_passwd_is_refused_by_the_allowed_roots(RE, tagger, recorder, site):
    beamline, _ = site
    xsml = TaggingCallback(tagger, downstream=[recorder], allowed_roots=[beamline])
    RE.subscribe(tampered(xsml, resource=lambda doc: {"root": "/",
                                                      "resource_path": "etc/passwd"}))
    reasons, _ = run_and_collect(RE, recorder, xsml,
                                 HDF5ResourceDetector("ad", frames(), beamline))
    assert reasons == ["outside_allowed_roots: file outside the allowed roots"] * 3
    assert_no_paths(reasons, "/etc", "passwd")
    xsml.close()


@pytest.mark.timeout(120)
def test_untouched_resources_inside_the_allowed_roots_are_tagged(RE, tagger, recorder, site,
                                                                 monkeypatch):
    beamline, _ = site
    monkeypatch.setenv(ALLOWED_ROOTS_ENV, f"/nonexistent{os.pathsep}{beamline}")
    xsml = TaggingCallback(tagger, downstream=[recorder])
    RE.subscribe(xsml)
    reasons, _ = run_and_collect(RE, recorder, xsml,
                                 HDF5ResourceDetector("ad", frames(), beamline))
    assert reasons == ["", "", ""]
    xsml.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["fifo", "outside"])
def test_crafted_stream_resource_uris_are_recorded_skips(RE, tagger, recorder, site, case):
    beamline, secret = site
    target = beamline / "pipe.h5" if case == "fifo" else secret
    expected = "not_regular_file" if case == "fifo" else "outside_allowed_roots"
    xsml = TaggingCallback(tagger, downstream=[recorder], allowed_roots=[beamline],
                           read_retries=1, read_retry_delay=0.01)
    RE.subscribe(tampered(xsml, stream_uri=f"file://localhost{target}"))
    with init_devices():
        det = StreamResourceDetector(frames(), beamline)
    reasons, elapsed = run_and_collect(RE, recorder, xsml, det)
    assert all(r.startswith(expected + ":") for r in reasons), reasons
    assert_no_paths(reasons, beamline, secret)
    assert elapsed < 30
    xsml.close()


@pytest.mark.timeout(60)
def test_a_stuck_read_is_abandoned_after_read_timeout(tmp_path):
    """A handler that never returns (a hung network mount) costs ``read_timeout``, not forever."""
    release = threading.Event()

    class Stuck:
        def __init__(self, path, **kwargs):
            pass

        def __call__(self, **kwargs):
            release.wait(30)
            return np.zeros((1, *SHAPE))

    ext = ExternalFrames(handler_registry={"STUCK": Stuck}, read_timeout=0.3, retries=3)
    ext.register("resource", {"uid": "r", "spec": "STUCK", "root": str(tmp_path),
                              "resource_path": "", "resource_kwargs": {}})
    ext.register("datum", {"datum_id": "r/0", "resource": "r", "datum_kwargs": {}})
    t0 = time.monotonic()
    with pytest.raises(FrameSourceError) as info:
        ext.read(ext.datum_ref("r/0"))
    assert info.value.reason == "read_timeout"
    assert time.monotonic() - t0 < 1.5  # not retried
    release.set()


def test_containment_is_by_real_path(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.h5").write_bytes(b"")
    (tmp_path / "rootx").mkdir()
    (tmp_path / "rootx" / "f.h5").write_bytes(b"")
    ext = ExternalFrames(retries=0)

    def check(path):
        ref = FrameRef(kind="stream", key="k", resource="r", spec="application/x-hdf5",
                       path=str(path), root=str(root))
        ext._check_file(ref, ref.path)

    check(root / "sub" / ".." / "sub" / "ok.h5")
    for bad in (root / ".." / "rootx" / "f.h5", tmp_path / "rootx" / "f.h5"):
        with pytest.raises(FrameSourceError, match="outside its resource's root"):
            check(bad)
    with pytest.raises(FrameSourceError, match="not a regular file"):
        check(root / "sub")


@pytest.mark.timeout(300)
def test_the_tagging_process_applies_the_same_rules(RE, recorder, site):
    """isolation="process": the child opens the files, under the callback's rules."""
    from bluesky_xsml.inference.process import ProcessOptions

    beamline, _secret = site
    xsml = TaggingCallback(None, downstream=[recorder], allowed_roots=[beamline],
                           read_retries=1, read_retry_delay=0.01, isolation="process",
                           process_options=ProcessOptions(priority="normal", threads=1))
    try:
        # only the allowed roots refuse this one (its own root is "/"): they reach the child
        RE.subscribe(tampered(xsml, resource=lambda doc: {"root": "/",
                                                          "resource_path": "etc/passwd"}))
        reasons, _ = run_and_collect(RE, recorder, xsml,
                                     HDF5ResourceDetector("ad", frames(), beamline))
    finally:
        xsml.close()
    assert reasons == ["outside_allowed_roots: file outside the allowed roots"] * 3
    assert_no_paths(reasons, "/etc", "passwd")
