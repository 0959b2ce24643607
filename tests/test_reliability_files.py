"""External frames through the live callback: files late, still being written, or short.

The reader-level behaviour (missing, truncated, corrupt files, unknown specs,
SWMR appends) is tested in tests/test_external_frames.py; here the same faults
go through :class:`~bluesky_xsml.TaggingCallback` with resource/datum
documents composed by event-model, and the file is written by another process
(HDF5 SWMR) or appears only after its event: frames that arrive within the
bounded retries are tagged, the others are recorded skips with the reason, and
the wait is bounded by ``read_retries * read_retry_delay``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import event_model
import h5py
import numpy as np
import pytest

from bluesky_xsml import TaggingCallback

from .conftest import DocumentRecorder, validate_all

pytestmark = pytest.mark.reliability

DATA_PATH = "/entry/data/data"
SHAPE = (64, 64)

WRITER = textwrap.dedent(f"""
    import sys, h5py, numpy as np
    f = h5py.File(sys.argv[1], "w", libver="latest")
    d = f.create_dataset({DATA_PATH!r}, (0, *{SHAPE!r}), maxshape=(None, *{SHAPE!r}),
                         chunks=(1, *{SHAPE!r}), dtype="<u4")
    f.swmr_mode = True
    for line in sys.stdin:
        i = d.shape[0]
        d.resize(i + 1, axis=0)
        d[i] = np.random.default_rng(i).poisson(5, {SHAPE!r})
        d.flush()
        print(i, flush=True)
    f.close()
""")


def external_run(root, path, n):
    """Documents of a run whose ``cam`` frames are points 0..n-1 of an AD_HDF5 file."""
    run = event_model.compose_run()
    res = run.compose_resource(spec="AD_HDF5", root=str(root), resource_path=path,
                               resource_kwargs={"frame_per_point": 1})
    datums = [res.compose_datum(datum_kwargs={"point_number": i}) for i in range(n)]
    desc = run.compose_descriptor(name="primary", data_keys={
        "cam": {"dtype": "array", "shape": list(SHAPE), "source": "sim",
                "external": "FILESTORE:"}})
    events = [desc.compose_event(data={"cam": d["datum_id"]}, timestamps={"cam": time.time()},
                                 seq_num=i + 1, filled={"cam": False})
              for i, d in enumerate(datums)]
    head = [("start", run.start_doc), ("resource", res.resource_doc),
            *[("datum", d) for d in datums], ("descriptor", desc.descriptor_doc)]
    return head, [("event", e) for e in events], ("stop", run.compose_stop())


def tags_by_seq(rec):
    return {e["data"]["source_seq_num"]: e["data"] for e in rec.tag_events()}


def test_frames_still_being_written_are_waited_for_then_skipped(tmp_path, tagger):
    path = tmp_path / "live.h5"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)

    def append():
        writer.stdin.write("\n")
        writer.stdin.flush()
        return int(writer.stdout.readline())

    rec = DocumentRecorder()
    xsml = TaggingCallback(tagger, downstream=[rec], read_retries=20,
                           read_retry_delay=0.05, max_batch=1)
    assert xsml.wait_ready(120)
    try:
        assert append() == 0  # the file exists with one frame
        head, events, stop = external_run(tmp_path, "live.h5", 4)
        for name, doc in head + events[:2]:
            xsml(name, doc)
        assert append() == 1  # frame 1 lands while its event is being read
        time.sleep(0.2)
        for name, doc in events[2:]:
            xsml(name, doc)
        time.sleep(0.2)
        assert append() == 2  # frame 2 arrives within the retry window; frame 3 never does
        t0 = time.monotonic()
        xsml(*stop)
        assert xsml.flush(30)
        waited = time.monotonic() - t0
    finally:
        writer.stdin.close()
        writer.wait(timeout=10)
        writer.stdout.close()
        xsml.close()
    tags = tags_by_seq(rec)
    assert sorted(tags) == [1, 2, 3, 4]
    assert [tags[s]["skip_reason"] for s in (1, 2, 3)] == ["", "", ""]
    assert tags[4]["skip_reason"].startswith("truncated_file")
    assert "live.h5" in tags[4]["skip_reason"] and "holds 3 frames" in tags[4]["skip_reason"]
    assert 20 * 0.05 * 0.9 <= waited < 10  # retried for the configured window, then gave up
    assert rec.of("stop")[0]["xsml_skipped"] == {"truncated_file": 1}
    validate_all([(n, d) for n, d in rec.docs if n != "datum"])


def test_a_file_that_appears_late_is_read_and_one_that_never_does_is_skipped(tmp_path, tagger):
    rec = DocumentRecorder()
    xsml = TaggingCallback(tagger, downstream=[rec], read_retries=30, read_retry_delay=0.05)
    assert xsml.wait_ready(120)
    late_head, late_events, late_stop = external_run(tmp_path, "late.h5", 2)
    never_head, never_events, never_stop = external_run(tmp_path, "never.h5", 1)

    def write_late():  # written elsewhere and moved in place, as detectors' file writers do
        time.sleep(0.4)
        with h5py.File(tmp_path / "late.tmp", "w") as f:
            f.create_dataset(DATA_PATH, data=np.full((2, *SHAPE), 9, np.uint32))
        os.replace(tmp_path / "late.tmp", tmp_path / "late.h5")

    writer = threading.Thread(target=write_late)
    writer.start()
    for name, doc in late_head + late_events + [late_stop] + never_head + never_events:
        xsml(name, doc)
    xsml(*never_stop)
    assert xsml.flush(30)
    writer.join()
    xsml.close()
    stops = {s["run_start"]: s for s in rec.of("stop")}
    late_run, never_run = late_head[0][1]["uid"], never_head[0][1]["uid"]
    assert stops[late_run]["xsml_frames"] == 2 and stops[late_run]["xsml_skipped"] == {}
    assert stops[never_run]["xsml_skipped"] == {"missing_file": 1}
    never = [e for e in rec.tag_events() if e["data"]["skip_reason"]]
    assert len(never) == 1 and "never.h5" in never[0]["data"]["skip_reason"]
    assert "31 attempts" in never[0]["data"]["skip_reason"]

