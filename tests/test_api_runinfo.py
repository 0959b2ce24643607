"""The service tells where each frame was taken: scan id, plan, run state, motor positions.

A real RunEngine runs ``scan`` plans over ``ophyd.sim.SynAxis`` motors (one
scanned, one only read, one in the baseline) with a tagging callback; the
service's frames, runs, status, decision feed and thresholds are read through
its HTTP routes (ASGI transport) and its live-feed queue.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from bluesky import RunEngine
from bluesky.plans import count, scan
from bluesky.preprocessors import SupplementalData
from ophyd.sim import SynAxis

from bluesky_xsml import Tagger, TaggingCallback
from bluesky_xsml.api.app import create_app
from bluesky_xsml.api.runinfo import RunBook, position_keys
from bluesky_xsml.api.settings import ServiceSettings
from bluesky_xsml.model import TaggerNetConfig

from .conftest import DocumentRecorder, make_image_detector, validate_all
from .test_api import KEY, ASGIClient

TINY = TaggerNetConfig(widths=(8,), depths=(1,), stem_width=8)


@pytest.fixture(scope="module")
def beamline():
    tagger = Tagger.untrained(seed=0, config=TINY)
    recorder = DocumentRecorder()
    xsml = TaggingCallback(tagger, downstream=[recorder], threads=1, max_wait=0.01)
    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(xsml)
    sx, sy, sz = SynAxis(name="sample_x"), SynAxis(name="sample_y"), SynAxis(name="stage_z")
    describe = sx.readback.describe  # SynAxis declares no units; an EpicsMotor does
    sx.readback.describe = lambda: {k: {**v, "units": "mm"} for k, v in describe().items()}
    sy.set(2.5).wait(5)
    sz.set(-1.25).wait(5)
    RE.preprocessors.append(SupplementalData(baseline=[sz]))
    app = create_app(xsml, settings=ServiceSettings(api_key=KEY, port=0))
    state = app.state.service
    loop = asyncio.new_event_loop()
    feed = state.subscribe(loop)
    det = make_image_detector(shape=(48, 48))
    RE(scan([det, sy], sx, 0.0, 1.0, 3), sample_name="film A")
    assert xsml.flush(60)
    loop.run_until_complete(asyncio.sleep(0.05))  # deliver what was pushed to the feed
    messages = []
    while not feed.queue.empty():
        messages.append(feed.queue.get_nowait())
    yield {"start": recorder.of("start")[-1], "xsml": xsml, "RE": RE, "client": ASGIClient(app),
           "state": state, "det": det, "recorder": recorder, "messages": messages}
    state.unsubscribe(feed)
    loop.close()
    xsml.close()


def test_frames_carry_scan_id_plan_and_the_motor_positions_of_their_event(beamline):
    start = beamline["start"]
    frames = beamline["client"].get(f"/api/runs/{start['uid']}/frames").json()["frames"]
    assert [f["seq_num"] for f in frames] == [1, 2, 3]
    assert {f["scan_id"] for f in frames} == {start["scan_id"]}
    assert {f["plan_name"] for f in frames} == {"scan"}
    # the scanned motor's readback per event; the motor read as a detector too; no setpoints
    assert [f["positions"] for f in frames] == [
        {"sample_x": 0.0, "sample_y": 2.5}, {"sample_x": 0.5, "sample_y": 2.5},
        {"sample_x": 1.0, "sample_y": 2.5}]
    events = [e for e in beamline["recorder"].of("event") if "img" in e["data"]]
    assert [e["data"]["sample_x"] for e in events[:3]] == [0.0, 0.5, 1.0]


def test_run_summary_has_state_sample_baseline_positions_and_units(beamline):
    start = beamline["start"]
    run = beamline["client"].get(f"/api/runs/{start['uid']}").json()
    assert run["scan_id"] == start["scan_id"] and run["plan_name"] == "scan"
    assert run["sample"] == "film A" and run["motors"] == ["sample_x"]
    assert run["state"] == "closed" and run["exit_status"] == "success"
    assert run["fixed_positions"] == {"stage_z": -1.25}  # read in the baseline stream
    assert run["units"] == {"sample_x": "mm"}
    assert run["precision"] == {"sample_x": 3, "sample_y": 3, "stage_z": 3}
    assert run["start_time"] == start["time"] and run["stop_time"] is not None
    assert run["frames"] == 3 and run["tagged"] + run["skipped"] == 3


def test_feed_announces_run_start_and_stop_and_decisions_say_where(beamline):
    start = beamline["start"]
    runs = [json.loads(m[2]) for m in beamline["messages"] if m and m[0] == "run"]
    assert [(r["run_uid"], r["state"]) for r in runs] == [(start["uid"], "open"),
                                                         (start["uid"], "closed")]
    assert runs[0]["scan_id"] == start["scan_id"] and runs[0]["plan_name"] == "scan"
    decisions = [json.loads(m[2]) for m in beamline["messages"] if m and m[0] == "decision"]
    assert decisions
    last = decisions[-1]
    assert last["policy"] == "default"
    assert len(last["where"]) == len(last["decision"]["evidence"]) >= 1
    ev, where = last["decision"]["evidence"][-1], last["where"][-1]
    assert ev["seq_num"] == 3 and where["positions"]["sample_x"] == 1.0
    assert where["scan_id"] == start["scan_id"]


def test_status_names_the_policy(beamline):
    status = beamline["client"].get("/api/status").json()
    assert status["policy"] == "default"


def test_a_run_is_open_between_its_start_and_stop(beamline):
    """The run shows as open before its stop, before any frame is tagged."""
    state = beamline["state"]
    seen = {}

    def plan():
        from bluesky import plan_stubs as bps
        from bluesky import preprocessors as bpp

        @bpp.run_decorator(md={"plan_name": "watch"})
        def inner():
            uid = state.runbook.uids()[-1]
            seen["run"] = state.run(uid)  # the plan runs in the RunEngine's event loop
            yield from bps.null()

        return (yield from inner())

    beamline["RE"](plan())
    assert seen["run"]["state"] == "open" and seen["run"]["plan_name"] == "watch"
    assert seen["run"]["frames"] == 0


def test_thresholds_report_the_checkpoint_defaults(beamline):
    client, tagger = beamline["client"], beamline["xsml"].tagger
    before = client.get("/api/thresholds").json()
    assert before["defaults"] == before["thresholds"]
    r = client.put("/api/thresholds", json={"thresholds": {"streaks": 0.93}},
                   headers={"X-API-Key": KEY})
    assert r.status_code == 200
    body = r.json()
    assert body["thresholds"]["streaks"] == pytest.approx(0.93)
    assert body["defaults"] == before["defaults"]  # the reset target does not move
    client.put("/api/thresholds", json={"thresholds": before["defaults"]},
               headers={"X-API-Key": KEY})
    assert float(tagger.thresholds[tagger.tags.index("streaks")]) == pytest.approx(
        before["defaults"]["streaks"], abs=1e-6)


def test_documents_stay_valid(beamline):
    validate_all(beamline["recorder"].docs)


def test_position_keys_reads_motors_and_positioners_but_not_other_scalars():
    def dk(dtype="number", shape=(), **kw):
        return {"dtype": dtype, "shape": list(shape), "source": "sim", **kw}

    desc = {"data_keys": {
        "m1": dk(object_name="m1"), "m1_user_setpoint": dk(object_name="m1"),  # EpicsMotor
        "th": dk(object_name="th"), "th_setpoint": dk(object_name="th"),      # SynAxis, read
        "det_total": dk(object_name="det"),                                   # a detector sum
        "img": dk("array", (8, 8), object_name="det"),
        "ext": dk(object_name="m2", external="FILESTORE:"),
        "m3": dk("string", object_name="m3")}}
    assert position_keys(desc, {"motors": ["m1", "m2", "m3"]}) == ["m1", "th"]
    assert position_keys(desc, {}) == ["m1", "th"]
    assert position_keys(desc, {"motors": ["th"]}) == ["th", "m1"]  # scanned motors first


def test_runbook_is_bounded_and_ignores_unknown_documents():
    book = RunBook(max_runs=2, max_events=2)
    desc = {"data_keys": {"x": {"dtype": "number", "shape": [], "source": "s",
                                "object_name": "x"}}}
    for r in range(3):
        book.document("start", {"uid": f"r{r}", "time": r, "motors": ["x"]})
        book.document("descriptor", {"uid": f"d{r}", "run_start": f"r{r}", **desc})
        book.document("event_page", {"descriptor": f"d{r}", "seq_num": [1, 2, 3],
                                     "data": {"x": [0.1, 0.2, float("nan")]}})
    assert book.uids() == ["r1", "r2"]
    assert book.where("r2", "primary", 1)["positions"] == {}  # forgotten (max_events)
    assert book.where("r2", "primary", 3)["positions"] == {"x": None}  # NaN: JSON-safe
    assert book.where("r0", "primary", 2) == {"scan_id": None, "plan_name": "",
                                              "positions": {}}
    assert book.document("event", {"descriptor": "nope", "seq_num": 1, "data": {}}) is None
    assert book.document("stop", {"run_start": "nope"}) is None
    assert book.document("stop", {"run_start": "r2", "exit_status": "abort",
                                  "reason": "beam lost", "time": 9.0}) == "r2"
    assert (book.info("r2")["state"], book.info("r2")["exit_status"]) == ("closed", "abort")


def test_count_without_motors_has_no_positions(beamline):
    beamline["RE"](count([beamline["det"]], 2))
    assert beamline["xsml"].flush(60)
    frames = beamline["client"].get("/api/frames/latest", params={"n": 2}).json()["frames"]
    assert [f["plan_name"] for f in frames] == ["count", "count"]
    assert all(f["positions"] == {} for f in frames)


def test_a_failing_document_listener_never_reaches_the_run_engine(caplog):
    tagger = Tagger.untrained(seed=1, config=TINY)
    xsml = TaggingCallback(tagger, threads=1, max_wait=0.01)
    seen = []

    def bad(name, doc):
        seen.append(name)
        raise RuntimeError("listener bug")

    xsml.add_document_listener(bad)
    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(xsml)
    try:
        RE(count([make_image_detector(shape=(32, 32))], 2))
        assert xsml.flush(60)
        assert seen[:3] == ["start", "descriptor", "event"] and seen[-1] == "stop"
        assert xsml.status()["frames_tagged"] == 2  # tagging went on
        assert "document listener failed" in caplog.text
    finally:
        xsml.close()
