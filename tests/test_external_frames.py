"""External frames: simulated detectors in a real RunEngine, read back from files.

Covers bluesky_xsml.sim.detectors (the three devices) and
bluesky_xsml.documents.external (ExternalFrames) end to end with real HDF5
files in tmp_path.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bluesky.plan_stubs as bps
import h5py
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.plans import count, scan
from event_model import Filler, pack_datum_page
from ophyd.sim import SynAxis
from ophyd_async.core import TriggerInfo, init_devices

from bluesky_xsml.documents.external import ExternalFrames, FrameRef, SWMRHDF5Handler
from bluesky_xsml.errors import FrameSourceError, XsmlError
from bluesky_xsml.sim.detectors import (
    DATA_PATH,
    HDF5ResourceDetector,
    InlineImageDetector,
    StreamResourceDetector,
)

SHAPE = (6, 7)


class RecordingSource:
    """frame_source that returns a distinct frame per call and remembers them."""

    def __init__(self, shape=SHAPE, dtype="<u2", seed=0):
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.rng = np.random.default_rng(seed)
        self.made: list[np.ndarray] = []

    def __call__(self) -> np.ndarray:
        frame = self.rng.integers(0, 1000, self.shape).astype(self.dtype)
        frame[0, 0] = len(self.made)  # distinct even if the rng repeated
        self.made.append(frame.copy())
        return frame


class Recorder:
    """Keeps each document and a deep copy taken when it was emitted."""

    def __init__(self):
        self.docs: list[tuple[str, dict]] = []
        self.snapshots: list[tuple[str, dict]] = []

    def __call__(self, name, doc):
        self.docs.append((name, doc))
        self.snapshots.append((name, copy.deepcopy(doc)))

    def names(self):
        return [n for n, _ in self.docs]

    def of(self, name):
        return [d for n, d in self.docs if n == name]

    def assert_unchanged(self):
        for (name, doc), (_, snap) in zip(self.docs, self.snapshots, strict=True):
            assert _equal(doc, snap), f"{name} document was modified"


def _equal(a, b):
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


@pytest.fixture(scope="module")
def RE():
    return RunEngine({})


def register_all(frames: ExternalFrames, recorder: Recorder, *, datum_pages=False):
    datums = []
    for name, doc in recorder.docs:
        if datum_pages and name == "datum":
            datums.append(doc)
            continue
        frames.register(name, doc)
    if datums:
        frames.register("datum_page", pack_datum_page(*datums))


# --------------------------------------------------------------------------- (a)


@pytest.mark.parametrize("plan_kind", ["count", "scan"])
@pytest.mark.parametrize("frames_per_point", [1, 2])
@pytest.mark.parametrize("datum_pages", [False, True])
def test_resource_detector_frames_resolve(RE, tmp_path, plan_kind, frames_per_point, datum_pages):
    source = RecordingSource()
    det = HDF5ResourceDetector("det", source, tmp_path, frames_per_point=frames_per_point)
    plan = (
        count([det], 4)
        if plan_kind == "count"
        else scan([det], SynAxis(name="motor"), 0, 1, 4)
    )
    rec = Recorder()
    RE(plan, rec)

    assert rec.names()[:3] == ["start", "descriptor", "resource"]
    assert rec.names().count("datum") == 4 and rec.names().count("event") == 4
    (descriptor,) = rec.of("descriptor")
    key = descriptor["data_keys"]["det_image"]
    assert key["external"] == "FILESTORE:"
    assert key["shape"] == [frames_per_point, *SHAPE]
    assert key["dtype"] == "array" and key["dtype_numpy"] == "<u2"
    (resource,) = rec.of("resource")
    assert resource["spec"] == "AD_HDF5"
    assert resource["root"] == str(tmp_path)
    assert not Path(resource["resource_path"]).is_absolute()
    assert resource["resource_kwargs"] == {"frame_per_point": frames_per_point}
    assert [d["datum_kwargs"] for d in rec.of("datum")] == [{"point_number": i} for i in range(4)]

    frames = ExternalFrames(retries=0)
    register_all(frames, rec, datum_pages=datum_pages)
    # one frame drawn at stage to learn the shape is the first frame written
    assert len(source.made) == 4 * frames_per_point
    for i, event in enumerate(rec.of("event")):
        datum_id = event["data"]["det_image"]
        assert isinstance(datum_id, str)  # unfilled
        ref = frames.datum_ref(datum_id)
        assert ref.kind == "datum" and ref.path == str(tmp_path / resource["resource_path"])
        got = frames.read(ref)
        expected = source.made[i * frames_per_point : (i + 1) * frames_per_point]
        if frames_per_point == 1:
            assert got.shape == SHAPE
            np.testing.assert_array_equal(got, expected[0])
        else:
            assert got.shape == (frames_per_point, *SHAPE)
            np.testing.assert_array_equal(got, np.stack(expected))
        assert got.dtype == np.dtype("<u2")
    assert len(frames._files) == 1  # one open file for the whole run
    rec.assert_unchanged()
    frames.forget()
    assert len(frames._files) == 0


def test_reads_from_worker_threads_are_consistent(RE, tmp_path):
    source = RecordingSource()
    det = HDF5ResourceDetector("det", source, tmp_path)
    rec = Recorder()
    RE(count([det], 12), rec)
    frames = ExternalFrames(retries=0)
    register_all(frames, rec)
    refs = [frames.datum_ref(e["data"]["det_image"]) for e in rec.of("event")]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(frames.read, refs * 2))
    for i, arr in enumerate(got):
        np.testing.assert_array_equal(arr, source.made[i % 12])
    assert len(frames._files) == 1
    frames.forget()


def test_swmr_handler_is_a_filler_handler(RE, tmp_path):
    source = RecordingSource()
    det = HDF5ResourceDetector("det", source, tmp_path)
    rec = Recorder()
    RE(count([det], 2), rec)
    filled = []
    with Filler({"AD_HDF5": SWMRHDF5Handler}, inplace=False) as filler:
        for name, doc in rec.docs:
            filled.append(filler(name, doc))
    events = [d for n, d in filled if n == "event"]
    for i, event in enumerate(events):
        np.testing.assert_array_equal(event["data"]["det_image"], source.made[i][None])
    rec.assert_unchanged()


# --------------------------------------------------------------------------- (b)


def test_stream_detector_count(RE, tmp_path):
    source = RecordingSource(dtype="<i4")
    with init_devices():
        det = StreamResourceDetector(source, tmp_path)
    assert det.name == "det"
    rec = Recorder()
    RE(count([det], 4), rec)

    assert rec.names() == (
        ["start", "descriptor", "stream_resource"] + ["stream_datum", "event"] * 4 + ["stop"]
    )
    (descriptor,) = rec.of("descriptor")
    key = descriptor["data_keys"]["det"]
    assert key["external"] == "STREAM:"
    assert key["shape"] == [1, *SHAPE]
    assert key["dtype"] == "array" and key["dtype_numpy"] == "<i4"
    assert all("det" not in e["data"] for e in rec.of("event"))
    (sres,) = rec.of("stream_resource")
    assert sres["mimetype"] == "application/x-hdf5"
    assert sres["uri"].startswith("file://localhost/")
    assert sres["parameters"]["dataset"] == DATA_PATH

    frames = ExternalFrames(retries=0)
    register_all(frames, rec)
    seq_of_event = [e["seq_num"] for e in rec.of("event")]
    seen = []
    for sdatum in rec.of("stream_datum"):
        for data_key, seq_num, ref in frames.stream_refs(sdatum):
            assert data_key == "det" and ref.kind == "stream" and ref.n_frames == 1
            got = frames.read(ref)
            assert got.shape == SHAPE
            np.testing.assert_array_equal(got, source.made[seq_num - 1])
            seen.append(seq_num)
    assert seen == seq_of_event == [1, 2, 3, 4]
    assert len(source.made) == 4
    rec.assert_unchanged()
    frames.forget()


def test_stream_detector_stacks(RE, tmp_path):
    source = RecordingSource()
    with init_devices():
        det = StreamResourceDetector(source, tmp_path)

    def plan():
        yield from bps.open_run()
        yield from bps.stage(det)
        yield from bps.prepare(det, TriggerInfo(collections_per_event=3), wait=True)
        for _ in range(2):
            yield from bps.trigger_and_read([det])
        yield from bps.unstage(det)
        yield from bps.close_run()

    rec = Recorder()
    RE(plan(), rec)
    (descriptor,) = rec.of("descriptor")
    assert descriptor["data_keys"]["det"]["shape"] == [3, *SHAPE]
    frames = ExternalFrames(retries=0)
    register_all(frames, rec)
    sdatums = rec.of("stream_datum")
    assert [d["indices"] for d in sdatums] == [{"start": 0, "stop": 1}, {"start": 1, "stop": 2}]
    for sdatum in sdatums:
        ((_, seq_num, ref),) = frames.stream_refs(sdatum)
        got = frames.read(ref)
        assert got.shape == (3, *SHAPE)
        np.testing.assert_array_equal(got, np.stack(source.made[3 * (seq_num - 1) : 3 * seq_num]))
    frames.forget()


# --------------------------------------------------------------------------- (c)


def _resource_docs(root, path, spec="AD_HDF5", n=1):
    resource = {
        "uid": "res-1",
        "spec": spec,
        "root": str(root),
        "resource_path": path,
        "resource_kwargs": {"frame_per_point": 1},
        "path_semantics": "posix",
    }
    datums = [
        {"datum_id": f"res-1/{i}", "resource": "res-1", "datum_kwargs": {"point_number": i}}
        for i in range(n)
    ]
    return resource, datums


def _frames_for(root, path, spec="AD_HDF5", n=1, **kwargs):
    frames = ExternalFrames(**kwargs)
    resource, datums = _resource_docs(root, path, spec, n)
    frames.register("resource", resource)
    for d in datums:
        frames.register("datum", d)
    return frames


def _write_frames(path, arrays):
    with h5py.File(path, "w") as f:
        f.create_dataset(DATA_PATH, data=np.stack(arrays), maxshape=(None, *arrays[0].shape))


@pytest.mark.reliability
def test_missing_file_gives_up_after_bounded_retries(tmp_path):
    frames = _frames_for(tmp_path, "nope.h5", retries=3, retry_delay=0.02)
    t0 = time.monotonic()
    with pytest.raises(FrameSourceError) as info:
        frames.read(frames.datum_ref("res-1/0"))
    elapsed = time.monotonic() - t0
    assert 0.06 <= elapsed < 1.0
    err = info.value
    assert err.reason == "missing_file"
    assert isinstance(err, XsmlError) and isinstance(err, OSError)
    assert "file nope.h5 " in str(err) and str(tmp_path) not in str(err)  # no paths in reasons
    assert "does not exist" in str(err) and "4 attempts" in str(err)


@pytest.mark.reliability
@pytest.mark.parametrize("damage", ["truncate", "junk"])
def test_corrupt_file_is_reported(tmp_path, damage):
    path = tmp_path / "bad.h5"
    _write_frames(path, [np.ones((64, 64))] * 4)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not hdf5" * 100)
    frames = _frames_for(tmp_path, "bad.h5", retries=1, retry_delay=0.01)
    with pytest.raises(FrameSourceError) as info:
        frames.read(frames.datum_ref("res-1/0"))
    assert info.value.reason == "truncated_file"
    assert path.name in str(info.value) and str(path.parent) not in str(info.value)
    assert ("truncated" if damage == "truncate" else "signature") in str(info.value)


@pytest.mark.reliability
def test_file_shorter_than_documents(tmp_path):
    _write_frames(tmp_path / "short.h5", [np.zeros(SHAPE), np.ones(SHAPE)])
    frames = _frames_for(tmp_path, "short.h5", n=4, retries=2, retry_delay=0.01)
    np.testing.assert_array_equal(frames.read(frames.datum_ref("res-1/1")), np.ones(SHAPE))
    with pytest.raises(FrameSourceError) as info:
        frames.read(frames.datum_ref("res-1/3"))
    assert info.value.reason == "truncated_file"
    assert "holds 2 frames" in str(info.value) and "short.h5" in str(info.value)


@pytest.mark.reliability
def test_unknown_spec_fails_at_once(tmp_path):
    _write_frames(tmp_path / "a.h5", [np.zeros(SHAPE)])
    frames = _frames_for(tmp_path, "a.h5", spec="MYSTERY", retries=5, retry_delay=1.0)
    t0 = time.monotonic()
    with pytest.raises(FrameSourceError) as info:
        frames.read(frames.datum_ref("res-1/0"))
    assert time.monotonic() - t0 < 0.5  # not retried
    assert info.value.reason == "unknown_spec"
    assert "'MYSTERY'" in str(info.value) and "AD_HDF5" in str(info.value)


@pytest.mark.reliability
def test_unknown_datum_and_stream_resource():
    frames = ExternalFrames()
    with pytest.raises(FrameSourceError) as info:
        frames.datum_ref("nobody/0")
    assert info.value.reason == "unknown_datum" and "'nobody/0'" in str(info.value)
    with pytest.raises(FrameSourceError) as info:
        frames.stream_refs(
            {"uid": "s/0", "stream_resource": "s", "descriptor": "d",
             "indices": {"start": 0, "stop": 1}, "seq_nums": {"start": 1, "stop": 2}}
        )
    assert info.value.reason == "unknown_datum" and "'s'" in str(info.value)


def test_unsupported_stream_mimetype(tmp_path):
    frames = ExternalFrames(retries=3, retry_delay=1.0)
    frames.register("stream_resource", {
        "uid": "s", "data_key": "det", "mimetype": "multipart/related;type=image/tiff",
        "uri": f"file://localhost{tmp_path}/", "parameters": {}, "run_start": "r"})
    ((_, _, ref),) = frames.stream_refs(
        {"uid": "s/0", "stream_resource": "s", "descriptor": "d",
         "indices": {"start": 0, "stop": 1}, "seq_nums": {"start": 1, "stop": 2}})
    with pytest.raises(FrameSourceError) as info:
        frames.read(ref)
    assert info.value.reason == "unknown_spec" and "image/tiff" in str(info.value)


def test_user_handler_registry_wins(tmp_path):
    calls = []

    class MyHandler:
        def __init__(self, path, frame_per_point):
            calls.append(path)

        def __call__(self, point_number):
            return np.full((1, *SHAPE), point_number)

    frames = _frames_for(tmp_path, "x.whatever", spec="AD_HDF5", n=2,
                         handler_registry={"AD_HDF5": MyHandler})
    np.testing.assert_array_equal(frames.read(frames.datum_ref("res-1/1")), np.ones(SHAPE))
    assert calls == [str(tmp_path / "x.whatever")]
    frames2 = _frames_for(tmp_path, "a.h5", handler_registry={"AD_HDF5": None}, retries=0)
    with pytest.raises(FrameSourceError, match="no handler") as info:
        frames2.read(frames2.datum_ref("res-1/0"))
    assert info.value.reason == "unknown_spec"


def test_default_registry_reads_ad_tiff(tmp_path):
    import tifffile

    made = [np.full(SHAPE, 10 * i, "<u2") for i in range(4)]
    for i, arr in enumerate(made):
        tifffile.imwrite(tmp_path / f"img_{i:06d}.tiff", arr)
    frames = ExternalFrames(retries=1, retry_delay=0.01)
    frames.register("resource", {
        "uid": "t", "spec": "AD_TIFF", "root": str(tmp_path), "resource_path": "",
        "resource_kwargs": {"template": "%s%s_%6.6d.tiff", "filename": "img",
                            "frame_per_point": 2},
        "path_semantics": "posix"})
    for i in range(3):
        frames.register("datum", {"datum_id": f"t/{i}", "resource": "t",
                                  "datum_kwargs": {"point_number": i}})
    got = frames.read(frames.datum_ref("t/1"))
    np.testing.assert_array_equal(got, np.stack(made[2:4]))
    with pytest.raises(FrameSourceError) as info:  # frames 4 and 5 were never written
        frames.read(frames.datum_ref("t/2"))
    assert info.value.reason == "missing_file" and "img_000004.tiff" in str(info.value)


# --------------------------------------------------------------------------- (d)

WRITER = textwrap.dedent(
    """
    import sys, h5py, numpy as np
    f = h5py.File(sys.argv[1], "w", libver="latest")
    d = f.create_dataset("/entry/data/data", (0, 6, 7), maxshape=(None, 6, 7),
                         chunks=(1, 6, 7), dtype="<u2")
    f.swmr_mode = True
    for line in sys.stdin:
        i = d.shape[0]
        d.resize(i + 1, axis=0)
        d[i] = np.full((6, 7), 100 + i)
        d.flush()
        print(i, flush=True)
    f.close()
    """
)


@pytest.mark.reliability
@pytest.mark.parametrize("kind", ["datum", "stream"])
def test_reader_sees_frames_appended_later_by_another_process(tmp_path, kind):
    path = tmp_path / "live.h5"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )

    def append():
        writer.stdin.write("\n")
        writer.stdin.flush()
        return int(writer.stdout.readline())

    try:
        assert append() == 0
        frames = ExternalFrames(retries=100, retry_delay=0.02)
        if kind == "datum":
            resource, datums = _resource_docs(tmp_path, "live.h5", n=3)
            frames.register("resource", resource)
            for d in datums:
                frames.register("datum", d)
            refs = [frames.datum_ref(d["datum_id"]) for d in datums]
        else:
            frames.register("stream_resource", {
                "uid": "s", "data_key": "det", "mimetype": "application/x-hdf5",
                "uri": f"file://localhost{path}", "run_start": "r",
                "parameters": {"dataset": DATA_PATH, "chunk_shape": [1, 6, 7]}})
            refs = [ref for _, _, ref in frames.stream_refs(
                {"uid": "s/0", "stream_resource": "s", "descriptor": "d",
                 "indices": {"start": 0, "stop": 3}, "seq_nums": {"start": 1, "stop": 4}})]
        np.testing.assert_array_equal(frames.read(refs[0]), np.full((6, 7), 100))
        handle = frames._files._files[str(path)].file

        assert append() == 1
        np.testing.assert_array_equal(frames.read(refs[1]), np.full((6, 7), 101))
        # a reader started before the frame exists waits for it (retries + refresh)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(frames.read, refs[2])
            time.sleep(0.1)
            assert not pending.done()
            assert append() == 2
            np.testing.assert_array_equal(pending.result(timeout=5), np.full((6, 7), 102))
        assert frames._files._files[str(path)].file is handle  # same handle, refreshed
        frames.forget()
        assert not handle.id.valid
    finally:
        writer.stdin.close()
        writer.wait(timeout=10)
        writer.stdout.close()


# --------------------------------------------------------------------------- (e)


def test_root_map_for_resources(RE, tmp_path):
    old, new = tmp_path / "acq", tmp_path / "moved"
    source = RecordingSource()
    rec = Recorder()
    RE(count([HDF5ResourceDetector("det", source, old)], 2), rec)
    shutil.move(old, new)
    datum_id = rec.of("event")[1]["data"]["det_image"]

    plain = ExternalFrames(retries=0)
    register_all(plain, rec)
    with pytest.raises(FrameSourceError) as info:
        plain.read(plain.datum_ref(datum_id))
    assert info.value.reason == "missing_file" and str(old) not in str(info.value)

    mapped = ExternalFrames(root_map={str(old): str(new)}, retries=0)
    register_all(mapped, rec)
    ref = mapped.datum_ref(datum_id)
    assert ref.path.startswith(str(new))
    np.testing.assert_array_equal(mapped.read(ref), source.made[1])
    mapped.forget()


def test_root_map_for_stream_resources(RE, tmp_path):
    old, new = tmp_path / "acq", tmp_path / "moved"
    source = RecordingSource()
    with init_devices():
        det = StreamResourceDetector(source, old)
    rec = Recorder()
    RE(count([det], 2), rec)
    shutil.move(old, new)
    frames = ExternalFrames(root_map={str(old) + "/": str(new)}, retries=0)
    register_all(frames, rec)
    ((_, seq_num, ref),) = frames.stream_refs(rec.of("stream_datum")[1])
    assert ref.path.startswith(str(new) + "/")
    np.testing.assert_array_equal(frames.read(ref), source.made[seq_num - 1])
    frames.forget()


# --------------------------------------------------------------------------- (f)


@pytest.mark.parametrize("frames_per_event", [None, 3])
def test_inline_detector_events_carry_arrays(RE, frames_per_event):
    source = RecordingSource(dtype="<f4")
    det = InlineImageDetector("det", source, frames_per_event=frames_per_event)
    rec = Recorder()
    RE(count([det], 3), rec)
    (descriptor,) = rec.of("descriptor")
    key = descriptor["data_keys"]["det_image"]
    n = frames_per_event or 1
    shape = list(SHAPE) if frames_per_event is None else [n, *SHAPE]
    assert key["shape"] == shape and key["dtype"] == "array"
    assert "external" not in key
    assert "resource" not in rec.names() and "stream_resource" not in rec.names()
    for i, event in enumerate(rec.of("event")):
        got = event["data"]["det_image"]
        assert isinstance(got, np.ndarray) and list(got.shape) == shape
        expected = source.made[i * n : (i + 1) * n]
        expected = expected[0] if frames_per_event is None else np.stack(expected)
        np.testing.assert_array_equal(got, expected)
    assert len(source.made) == 3 * n


def test_frame_ref_is_hashable_value():
    a = FrameRef(kind="stream", key="s/0", resource="s", spec="application/x-hdf5",
                 path="/x.h5", data_key="det", dataset=DATA_PATH, start=0, stop=1)
    b = FrameRef(kind="stream", key="s/0", resource="s", spec="application/x-hdf5",
                 path="/x.h5", data_key="det", dataset=DATA_PATH, start=0, stop=1)
    assert a == b and len({a, b}) == 1 and a.n_frames == 1
    with pytest.raises(AttributeError):
        a.start = 3
