"""TaggingCallback(isolation="process"): the model in its own process, faults contained.

Every test runs a real RunEngine with ophyd devices and a real spawned tagging
process; faults are real signals (SIGKILL) or a real stop of the child's
heartbeat.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from bluesky.plans import count, scan
from ophyd.sim import motor

from bluesky_xsml import TaggingCallback
from bluesky_xsml.inference.process import ProcessOptions, TaggerProcessError
from bluesky_xsml.sim.detectors import HDF5ResourceDetector

from .conftest import make_image_detector, validate_all

# normal priority: the tests share two cores with other test processes
FAST = ProcessOptions(priority="normal", threads=1)


@pytest.fixture(scope="module")
def fp32_tagger():
    from bluesky_xsml import Tagger

    return Tagger.load(precision="fp32", num_threads=1)


def _probs(events, tags):
    return np.array([[e["data"][t] for t in tags] for e in events])


@pytest.mark.parametrize("transport", ["auto", "ring"])
def test_process_mode_tags_frames_as_the_model_does(RE, recorder, fp32_tagger, transport):
    import dataclasses

    rng = np.random.default_rng(7)
    frames = [rng.poisson(3 + i, (256, 300)).astype(np.uint32) for i in range(6)]
    frames += [rng.poisson(5, (200, 200)).astype(np.uint16) for _ in range(3)]
    nan_frame = rng.gamma(2.0, 10.0, (240, 240)).astype(np.float32)
    nan_frame[100:120] = np.nan
    frames.append(nan_frame)
    it = itertools.cycle(frames)  # ophyd reads the signal beyond the events too
    det = make_image_detector("saxs", func=lambda: next(it))
    xsml = TaggingCallback(fp32_tagger, downstream=[recorder], isolation="process",
                           process_options=dataclasses.replace(FAST, frame_transport=transport))
    try:
        assert xsml.worker.pid not in (None, os.getpid())
        # same user, no Yama restriction here: "auto" reads frames out of our memory
        assert xsml.worker.describe_process()["frame_transport"] == (
            "peer" if transport == "auto" else "ring")
        assert xsml.tagger.checkpoint_id == fp32_tagger.checkpoint_id
        RE.subscribe(xsml)
        RE(count([det], num=len(frames)))
        assert xsml.flush(120)
        # every frame handed over: none is still held (or counted) on this side
        assert xsml.worker.stats.pending_bytes == 0
    finally:
        xsml.close()
    validate_all(recorder.docs)
    tags = sorted(recorder.tag_events(), key=lambda e: e["data"]["source_seq_num"])
    assert [t["data"]["skip_reason"] for t in tags] == [""] * len(frames)
    got = _probs(tags, fp32_tagger.tags)
    events = sorted(recorder.of("event"), key=lambda e: e["seq_num"])
    assert len({(*e["data"]["saxs"].shape, str(e["data"]["saxs"].dtype)) for e in events}) >= 3
    expected = fp32_tagger.predict([e["data"]["saxs"] for e in events])
    # the tags' probabilities are far apart, so a swapped or shifted column cannot pass
    assert np.ptp(expected, axis=1).min() > 0.2
    np.testing.assert_allclose(got, expected, atol=1e-4)
    stop = recorder.of("stop")[0]
    assert stop["xsml_frames"] == len(frames) and stop["num_events"]["xsml_tags"] == len(frames)
    assert all(t["data"]["checkpoint"] == fp32_tagger.checkpoint_id for t in tags)


def test_external_frames_are_read_by_the_tagging_process_only(RE, recorder, tmp_path,
                                                              fp32_tagger, monkeypatch):
    from bluesky_xsml.documents import external

    def refuse(self, ref):  # this process must never read a frame file
        raise AssertionError("the RunEngine's process read a frame file")

    monkeypatch.setattr(external.ExternalFrames, "read", refuse)
    rng = np.random.default_rng(3)
    drawn = []

    def draw():
        drawn.append(rng.poisson(6, (96, 120)).astype(np.uint32))
        return drawn[-1]

    ad = HDF5ResourceDetector("ad", draw, tmp_path)
    xsml = TaggingCallback(fp32_tagger, downstream=[recorder], isolation="process",
                           process_options=FAST)
    try:
        RE.subscribe(xsml)
        RE(scan([ad], motor, 0, 1, 5))
        assert xsml.flush(120)
    finally:
        xsml.close()
    tags = sorted(recorder.tag_events(), key=lambda e: e["data"]["source_seq_num"])
    assert [t["data"]["skip_reason"] for t in tags] == [""] * 5
    np.testing.assert_allclose(_probs(tags, fp32_tagger.tags), fp32_tagger.predict(drawn[:5]),
                               atol=1e-4)


def test_the_runengine_process_does_not_import_torch(tmp_path):
    script = textwrap.dedent("""
        import sys
        from bluesky import RunEngine
        from bluesky.plans import count
        import numpy as np
        from ophyd.sim import SynSignal
        from bluesky_xsml import TaggingCallback
        from bluesky_xsml.inference.process import ProcessOptions

        det = SynSignal(func=lambda: np.ones((64, 64), np.uint16), name="d",
                        labels={"detectors"})
        docs = []
        xsml = TaggingCallback(None, downstream=[lambda n, d: docs.append(n)],
                               isolation="process",
                               process_options=ProcessOptions(priority="normal", threads=1))
        RE = RunEngine({})
        RE.subscribe(xsml)
        RE(count([det], num=3))
        assert xsml.flush(120)
        st = xsml.status()
        xsml.close()
        print("tagged", st["frames_tagged"], "torch", "torch" in sys.modules)
    """)
    path = tmp_path / "scan.py"  # no __main__ guard: the child must not re-run it
    path.write_text(script)
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "tagged 3 torch False"


def _run_with_fault(RE, recorder, tagger, inject, *, n=40, delay=0.05, after=8, **options):
    """A count of ``n`` frames; ``inject(xsml)`` once ``after`` frames are tagged."""
    det = make_image_detector("saxs", shape=(128, 128))
    xsml = TaggingCallback(tagger, downstream=[recorder], isolation="process",
                           process_options=ProcessOptions(priority="normal", threads=1,
                                                          **options))
    fired = threading.Event()

    def watch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if xsml.status()["frames_tagged"] >= after:
                inject(xsml)
                fired.set()
                return
            time.sleep(0.01)

    try:
        xsml.wait_ready(120)
        RE.subscribe(xsml)
        threading.Thread(target=watch, daemon=True).start()
        t0 = time.monotonic()
        RE(count([det], num=n, delay=delay))
        scan_s = time.monotonic() - t0
        assert xsml.flush(180)
        status = xsml.status()
    finally:
        xsml.close()
    assert fired.is_set()
    return status, scan_s


def _check_accounting(recorder, n):
    validate_all(recorder.docs)
    tags = sorted(recorder.tag_events(), key=lambda e: e["data"]["source_seq_num"])
    assert [t["data"]["source_seq_num"] for t in tags] == list(range(1, n + 1))
    stop = recorder.of("stop")[0]
    assert stop["xsml_frames"] == n and stop["num_events"]["xsml_tags"] == n
    return tags, stop


@pytest.mark.reliability
def test_kill_9_of_the_tagging_process_mid_scan_costs_no_run(RE, recorder, fp32_tagger):
    pids = []

    def kill(xsml):
        pids.append(xsml.worker.pid)
        os.kill(xsml.worker.pid, signal.SIGKILL)

    # 60 frames: on a loaded machine the tagging process runs far behind the scan, so the
    # kill (after 8 tags) can find 20-30 frames in flight; the last 10 still come after
    status, _ = _run_with_fault(RE, recorder, fp32_tagger, kill, n=60)
    tags, stop = _check_accounting(recorder, 60)
    reasons = [t["data"]["skip_reason"].split(":")[0] for t in tags]
    assert set(reasons) <= {"", "tagger_process_died"}
    assert status["worker_restarts"] == 1 and status["tagger_process"]["starts"] == 2
    assert status["tagger_process"]["pid"] != pids[0]
    assert status["tagger_process"]["faults"] == {"tagger_process_died": 1}
    # the restarted process tags the frames that came after
    assert reasons[-10:] == [""] * 10
    assert stop["xsml_skipped"].get("tagger_process_died", 0) == reasons.count(
        "tagger_process_died")


@pytest.mark.reliability
def test_a_hung_tagging_process_is_replaced(RE, recorder, fp32_tagger):
    status, _ = _run_with_fault(RE, recorder, fp32_tagger,
                                lambda xsml: xsml.worker._inject("hang", 600.0),
                                n=60, heartbeat_timeout=1.5)
    tags, _ = _check_accounting(recorder, 60)
    reasons = [t["data"]["skip_reason"].split(":")[0] for t in tags]
    assert set(reasons) <= {"", "tagger_process_hung"}
    assert status["tagger_process"]["faults"] == {"tagger_process_hung": 1}
    assert reasons[-5:] == [""] * 5


@pytest.mark.reliability
def test_a_crash_loop_stops_restarting_and_still_accounts_for_every_frame(RE, recorder,
                                                                           fp32_tagger):
    status, _ = _run_with_fault(RE, recorder, fp32_tagger,
                                lambda xsml: xsml.worker._inject("crash"),
                                n=50, delay=0.1, after=2, max_restarts=0)
    tags, stop = _check_accounting(recorder, 50)
    reasons = [t["data"]["skip_reason"].split(":")[0] for t in tags]
    assert set(reasons) <= {"", "tagger_process_died", "tagger_process_unavailable"}
    assert reasons[-1] == "tagger_process_unavailable"
    assert status["worker_restarts"] == 0
    assert stop["xsml_skipped"]["tagger_process_unavailable"] >= 1


def test_a_checkpoint_the_process_cannot_load_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(TaggerProcessError, match=r"nope\.pt.*does not exist"):
        TaggingCallback(str(missing), isolation="process", process_options=FAST)


def test_checkpoint_swap_reaches_the_tagging_process(RE, recorder, tmp_path, fp32_tagger):
    import torch

    from bluesky_xsml import Tagger

    other = Tagger.load(precision="fp32")  # the same network with other weights
    with torch.no_grad():
        next(other.net.parameters()).mul_(0.5)
    path = other.save(tmp_path / "other.pt")
    assert other.checkpoint_id != fp32_tagger.checkpoint_id
    det = make_image_detector("saxs", shape=(64, 64))
    xsml = TaggingCallback(fp32_tagger, downstream=[recorder], isolation="process",
                           process_options=FAST)
    try:
        RE.subscribe(xsml)
        RE(count([det], num=2))
        assert xsml.flush(120)
        xsml.worker.swap_checkpoint(path)
        assert xsml.tagger.checkpoint_id == other.checkpoint_id
        RE(count([det], num=2))
        assert xsml.flush(120)
    finally:
        xsml.close()
    checkpoints = [t["data"]["checkpoint"] for t in recorder.tag_events()]
    assert checkpoints == [fp32_tagger.checkpoint_id] * 2 + [other.checkpoint_id] * 2


def test_live_fine_tuning_runs_in_the_tagging_process(RE, recorder, tmp_path):
    from bluesky_xsml import Tagger
    from bluesky_xsml.model import TaggerNetConfig

    tiny = Tagger.untrained(seed=0, config=TaggerNetConfig(widths=(8,), depths=(1,),
                                                           stem_width=8), precision="fp32")
    base = tiny.checkpoint_id
    det = make_image_detector("saxs", shape=(64, 80))
    xsml = TaggingCallback(tiny, downstream=[recorder], isolation="process",
                           process_options=FAST, max_wait=0.01)
    try:
        ft = xsml.enable_finetuning(tmp_path / "ft", auto=False, synthetic=None,
                                    synthetic_val=None, steps=2, batch_size=4)
        assert xsml.enable_finetuning(tmp_path / "ft") is ft
        RE.subscribe(xsml)
        RE(count([det], num=4))
        uid = recorder.of("start")[-1]["uid"]
        assert xsml.flush(120)
        # labels go from this process's label cache to the tagging process's replay store
        receipt = xsml.label(uid, 1, beam_off=True, ring_isotropic=False)
        assert receipt["rows"] == [0] and receipt["labels"]["beam_off"] is True
        assert ft.status()["labels"] == 1 and ft.registry.active_id == base
        report = ft.retrain_now(wait=True, timeout=300)
        assert "error" not in report or report["error"] is None, report
        assert ft.status()["rounds"] == 1
        ids = [c["checkpoint_id"] for c in ft.registry.list()]
        assert ids[0] == base and len(ids) == 2
        other = ids[1]
        # activating a checkpoint there changes the model the tag events name here
        ft.registry.activate(other)
        assert xsml.tagger.checkpoint_id == other
        RE(count([det], num=2))
        assert xsml.flush(120)
        assert {e["data"]["checkpoint"] for e in recorder.tag_events()[-2:]} == {other}
        back = ft.registry.rollback()
        assert back["checkpoint_id"] == base and xsml.tagger.checkpoint_id == base
        # a restarted tagging process resumes fine-tuning from its directory
        first = xsml.worker.pid
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while xsml.worker.pid in (first, None) and time.monotonic() < deadline:
            time.sleep(0.1)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                status = ft.status()
                break
            except Exception:  # noqa: BLE001 - the fine-tuner comes back right after the restart
                time.sleep(0.5)
        assert status["labels"] == 1 and status["active_id"] == base
    finally:
        xsml.close()


def test_peer_memory_reads_an_array_and_refuses_bad_addresses():
    from bluesky_xsml.inference.child import PeerMemory

    src = np.random.default_rng(3).integers(0, 2**32, (64, 48), dtype=np.uint32)
    peer = PeerMemory(os.getpid())
    out = np.empty_like(src)
    peer.read_into(src.ctypes.data, out)
    np.testing.assert_array_equal(out, src)
    with pytest.raises(OSError):  # memory not mapped: an error, never a crash
        peer.read_into(8, np.empty(16, np.uint8))
    probe = np.arange(16, dtype=np.uint8)
    spec = {"peer_pid": os.getpid(), "probe": (probe.ctypes.data, probe.tobytes())}
    assert isinstance(PeerMemory.probe(spec), PeerMemory)
    assert PeerMemory.probe({**spec, "probe": (probe.ctypes.data, bytes(16))}) is None
    assert PeerMemory.probe({**spec, "frame_transport": "ring"}) is None
    with pytest.raises(ValueError, match="frame_transport"):
        ProcessOptions(frame_transport="pipe")


def test_bad_isolation_value():
    with pytest.raises(ValueError, match="'thread' or 'process'"):
        TaggingCallback(None, isolation="fork")


def test_thresholds_set_live_reach_the_tagging_process_and_survive_a_restart(RE, recorder,
                                                                             fp32_tagger):
    det = make_image_detector("saxs", shape=(64, 64))
    xsml = TaggingCallback(fp32_tagger, downstream=[recorder], isolation="process",
                           process_options=FAST)
    try:
        RE.subscribe(xsml)
        tags = list(xsml.tagger.tags)
        with xsml.tagger.hold():  # as the service's PUT /api/thresholds does
            xsml.tagger.thresholds = np.where(np.arange(len(tags)) == 0, 0.0, 1.01)
        RE(count([det], num=2))
        assert xsml.flush(120)
        first = xsml.worker.pid
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while xsml.worker.pid in (first, None) and time.monotonic() < deadline:
            time.sleep(0.1)
        xsml.wait_ready(120)
        RE(count([det], num=2))
        assert xsml.flush(120)
    finally:
        xsml.close()
    events = recorder.tag_events()
    assert len(events) == 4
    # only the first tag, whose threshold is 0, is decided: before and after the restart
    assert [e["data"]["tags"] for e in events] == [tags[0]] * 4


# ------------------------------------------------ the label cache in the tagging process
def _tiny_tagger():
    from bluesky_xsml import Tagger
    from bluesky_xsml.model import TaggerNetConfig

    return Tagger.untrained(seed=0, config=TaggerNetConfig(widths=(8,), depths=(1,),
                                                           stem_width=8), precision="fp32")


def _record_messages(xsml) -> list:
    """Every message kind the RunEngine's side receives from the tagging process."""
    kinds: list = []
    handle = xsml.worker._handle

    def spy(what, payload):
        kinds.append(what)
        if what == "many":
            kinds.extend(w for w, _ in payload)
        return handle(what, payload)

    xsml.worker._handle = spy
    return kinds


def _inputs_in(obj, seen=None) -> list:
    """Model inputs (float16 ``(C, S, S)`` arrays) reachable from ``obj`` (dicts, lists,
    attributes)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return [obj] if obj.dtype == np.float16 and obj.ndim == 3 else []
    if isinstance(obj, dict):
        return [a for k, v in obj.items() for a in _inputs_in(k, seen) + _inputs_in(v, seen)]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [a for v in obj for a in _inputs_in(v, seen)]
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return _inputs_in(vars(obj), seen)
    return []


def test_labels_fine_tune_in_the_tagging_process_and_no_input_crosses(RE, recorder, tmp_path):
    """The label cache of model inputs lives in the tagging process: no input crosses
    the pipe, this process holds none, and labels (given or declared in documents),
    suggestions, fine-tuning and thumbnails work from there."""
    tiny = _tiny_tagger()
    det = make_image_detector("saxs", shape=(64, 80))
    xsml = TaggingCallback(tiny, downstream=[recorder], isolation="process",
                           process_options=FAST, max_wait=0.01)
    kinds = _record_messages(xsml)
    try:
        ft = xsml.enable_finetuning(tmp_path / "ft", auto=False, synthetic=None,
                                    synthetic_val=None, steps=2, batch_size=4)
        RE.subscribe(xsml)
        RE(count([det], num=4))
        uid = recorder.of("start")[-1]["uid"]
        assert xsml.flush(120)
        # the run's frames crossed as tags only: no model input came back
        assert "results" in kinds and "inputs" not in kinds
        assert xsml.status()["label_cache_frames"] == 4
        assert _inputs_in(xsml) == []  # the callback, its labeller, worker, routers...
        # suggestions are the tagging process's cache's, in its order of doubt
        suggested = xsml.suggest_labels(10)
        assert sorted(s["seq_num"] for s in suggested) == [1, 2, 3, 4]
        assert {s["run_uid"] for s in suggested} == {uid}
        receipt = xsml.label(uid, 2, beam_off=True, ring_isotropic=False)
        assert receipt["rows"] == [0] and receipt["labels"]["beam_off"] is True
        assert 2 not in [s["seq_num"] for s in xsml.suggest_labels(10)]
        with pytest.raises(ValueError, match="True/1"):
            xsml.label(uid, 3, beam_off="maybe")
        with pytest.raises(KeyError, match="not in the label cache"):
            xsml.label(uid, 99, beam_off=True)
        # a label declared in the documents reaches the fine-tuner there too
        RE(count([det], num=2), xsml_labels={"ring_isotropic": True})
        assert xsml.flush(120)
        assert ft.flush_labels(60)
        assert ft.status()["labels"] == 3
        # the label trains the model in the tagging process
        report = ft.retrain_now(wait=True, timeout=300)
        assert report.get("error") is None, report
        assert ft.status()["rounds"] == 1 and len(ft.registry.list()) == 2
        # a thumbnail's input is fetched from there, on demand
        x = xsml.frame_input(uid, 1)
        assert x is not None and x.dtype == np.float16 and x.ndim == 3
        assert xsml.frame_input(uid, 99) is None
        assert "inputs" not in kinds
        # the callback's own input listeners still get every input (it then crosses)
        got = []
        xsml.add_input_listener(got.extend)
        RE(count([det], num=3))
        assert xsml.flush(120)
        assert len(got) == 3 and got[0][2].shape == x.shape and "inputs" in kinds
    finally:
        xsml.close()


def test_a_restart_loses_the_label_cache_and_labels_of_its_frames_are_refused(
        RE, recorder, tmp_path):
    """The inputs died with the tagging process: labels of frames it tagged are refused
    with the reason and counted; frames tagged by the new process can be labeled."""
    det = make_image_detector("saxs", shape=(64, 80))
    xsml = TaggingCallback(_tiny_tagger(), downstream=[recorder], isolation="process",
                           process_options=FAST, max_wait=0.01)
    try:
        ft = xsml.enable_finetuning(tmp_path / "ft", auto=False, synthetic=None,
                                    synthetic_val=None)
        RE.subscribe(xsml)
        RE(count([det], num=3))
        before = recorder.of("start")[-1]["uid"]
        assert xsml.flush(120)
        xsml.label(before, 1, beam_off=True)
        first = xsml.worker.pid
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while (xsml.worker.pid in (first, None) or not xsml.worker.ensure_alive()) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert xsml.worker.process_starts == 2
        with pytest.raises(KeyError, match=r"restarted.*lost with it") as err:
            xsml.label(before, 2, beam_off=True)
        assert type(err.value).__name__ == "LabelCacheLost"
        status = xsml.status()
        assert status["labels_refused"] == 1 and status["label_cache_frames"] == 0
        assert xsml.frame_input(before, 2) is None  # no thumbnail either
        # the frames the new process tags are its cache
        RE(count([det], num=2))
        after = recorder.of("start")[-1]["uid"]
        assert xsml.flush(120)
        assert xsml.status()["label_cache_frames"] == 2
        assert {s["run_uid"] for s in xsml.suggest_labels(10)} == {after}
        xsml.label(after, 1, ring_isotropic=True)
        deadline = time.monotonic() + 60
        while ft.status()["labels"] != 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ft.status()["labels"] == 2  # the one from before the restart, on disk, and this
    finally:
        xsml.close()


def test_the_child_sends_what_queued_during_a_send_as_one_message():
    """Results that queue while a send is under way go in one ``many`` message, and a
    lone one goes at once (no timer)."""
    from bluesky_xsml.inference.child import _Outgoing

    sent, release = [], threading.Event()

    class SlowLink:
        def send(self, msg):
            if not sent:
                sent.append(msg)
                release.wait(10)  # the parent reads slowly: later batches queue meanwhile
                return
            sent.append(msg)

    out = _Outgoing(SlowLink())
    try:
        out.put("results", [(1, ["a"])])
        deadline = time.monotonic() + 10
        while not sent and time.monotonic() < deadline:
            time.sleep(0.005)
        assert sent == [("results", [(1, ["a"])])]  # the first went alone, straight away
        out.put("free", [3])
        out.put("results", [(2, ["b"])])
        out.put("results", [(3, ["c"])])
        release.set()
    finally:
        out.close()
    assert sent[1:] == [("many", [("free", [3]), ("results", [(2, ["b"])]),
                                  ("results", [(3, ["c"])])])]
