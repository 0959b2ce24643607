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


# ------------------------------------------------------ the path rules, one at a time
def test_within_is_by_whole_directory_names():
    from bluesky_xsml.documents.external import _within

    assert _within("/data/run", "/data/run") and _within("/data/run/a.h5", "/data/run")
    assert _within("/data/run/a.h5", "/data/run/") and _within("/data/run", "/data/run//")
    assert not _within("/data/run2/a.h5", "/data/run") and not _within("/data", "/data/run")
    assert _within("/etc/passwd", "/") and _within("/", "/") and _within("/x", "")


def test_remap_prefix_takes_the_longest_directory_prefix():
    from bluesky_xsml.documents.external import _remap_prefix

    root_map = {"/data": "/mnt/d", "/data/cam/": "/fast/cam", "/": "/all"}
    assert _remap_prefix("/data/cam/x/f.h5", root_map) == ("/fast/cam/x/f.h5", "/data/cam/")
    assert _remap_prefix("/data/cam", root_map) == ("/fast/cam", "/data/cam/")
    assert _remap_prefix("/data/camera/f.h5", root_map) == ("/mnt/d/camera/f.h5", "/data")
    assert _remap_prefix("/data", root_map) == ("/mnt/d", "/data")
    assert _remap_prefix("/other/f.h5", root_map) == ("/all/other/f.h5", "/")
    assert _remap_prefix("/other/f.h5", {"/data": "/mnt"}) == ("/other/f.h5", None)
    assert _remap_prefix("/datax/f.h5", {"/data": "/mnt"}) == ("/datax/f.h5", None)


def test_reasons_name_files_without_their_directories():
    from bluesky_xsml.documents.external import _scrub, _short

    assert _short("/beamline/2024/scan_7.h5") == "scan_7.h5"
    assert _short("/beamline/tiffs/") == "tiffs" and _short("/") == "/" and _short("") == "/"
    assert _scrub("Unable to open '/beamline/2024/scan_7.h5' (x)") == \
        "Unable to open 'scan_7.h5' (x)"
    assert _scrub("/a/b c.h5 and /etc/passwd, done") == "b c.h5 and passwd, done"
    assert _scrub("relative/path.h5 stays") == "relative/path.h5 stays"


def test_allowed_roots_come_from_the_environment(monkeypatch):
    from bluesky_xsml.documents.external import default_allowed_roots

    monkeypatch.setenv(ALLOWED_ROOTS_ENV, os.pathsep.join(["/data", "", " ", "/scratch"]))
    assert default_allowed_roots() == ("/data", "/scratch")
    assert ExternalFrames().allowed_roots == ("/data", "/scratch")
    assert ExternalFrames(allowed_roots=[]).allowed_roots == ()
    monkeypatch.delenv(ALLOWED_ROOTS_ENV)
    assert default_allowed_roots() == () and ExternalFrames().allowed_roots == ()


def test_allowed_roots_contain_by_real_path(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    (allowed / "sub" / "f.h5").write_bytes(b"")
    (outside / "g.h5").write_bytes(b"")
    (allowed / "link.h5").symlink_to(outside / "g.h5")
    ext = ExternalFrames(retries=0, allowed_roots=[str(tmp_path / "elsewhere"), str(allowed)])

    def ref(path, root=""):
        return FrameRef(kind="stream", key="k", resource="r", spec="application/x-hdf5",
                        path=str(path), root=root)

    good = ref(allowed / "sub" / ".." / "sub" / "f.h5")
    assert ext._contained(good, good.path) == str((allowed / "sub" / "f.h5").resolve())
    for bad in (outside / "g.h5", allowed / "link.h5", allowed / ".." / "outside" / "g.h5"):
        with pytest.raises(FrameSourceError, match=r"^file outside the allowed roots$") as info:
            ext._contained(ref(bad), str(bad))
        assert info.value.reason == "outside_allowed_roots"
    # the resource's root is checked first, and both must hold
    with pytest.raises(FrameSourceError, match=r"^file outside its resource's root$") as info:
        ext._contained(ref(allowed / "sub" / "f.h5", root=str(outside)), str(allowed / "sub"
                                                                           / "f.h5"))
    assert info.value.reason == "outside_allowed_roots"
    with pytest.raises(FrameSourceError, match=r"^file outside the allowed roots$"):
        ext._contained(ref(outside / "g.h5", root=str(outside)), str(outside / "g.h5"))
    # no root and no allowed roots: anywhere
    free = ExternalFrames(retries=0, allowed_roots=[])
    assert free._contained(ref(outside / "g.h5"), str(outside / "g.h5")) == str(
        (outside / "g.h5").resolve())


def test_a_fifo_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "frames.h5"
    os.mkfifo(fifo)
    ext = ExternalFrames(retries=0, allowed_roots=[])
    ref = FrameRef(kind="stream", key="k", resource="r", spec="application/x-hdf5",
                   path=str(fifo), root=str(tmp_path))
    with pytest.raises(FrameSourceError, match=r"^not a regular file$") as info:
        ext._check_file(ref, ref.path)
    assert info.value.reason == "not_regular_file"
    with pytest.raises(FileNotFoundError):  # missing: retried by the caller
        ext._check_file(ref, str(tmp_path / "later.h5"))


@pytest.mark.parametrize("kwargs, message", [
    ({"read_timeout": 0}, "read_timeout must be > 0 or None, got 0"),
    ({"read_timeout": -1.0}, "read_timeout must be > 0 or None, got -1.0"),
    ({"retries": -1}, "retries must be >= 0, got -1"),
    ({"retry_delay": -0.5}, "retry_delay must be >= 0, got -0.5"),
])
def test_bad_reader_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ExternalFrames(**kwargs)
    ok = ExternalFrames(read_timeout=None, retries=0, retry_delay=0)
    assert (ok.read_timeout, ok.retries, ok.retry_delay) == (None, 0, 0.0)
