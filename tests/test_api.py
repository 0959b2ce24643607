"""The steering service over HTTP: a real RunEngine, a real TaggingCallback, real servers.

Requests go through httpx, both in-process (``httpx.ASGITransport``) and to a
real uvicorn server on the loopback interface. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.plans import count

from bluesky_xsml import Tagger, TaggingCallback
from bluesky_xsml.api.app import create_app
from bluesky_xsml.api.serve import serve
from bluesky_xsml.api.settings import ServiceSettings
from bluesky_xsml.model import TaggerNetConfig

from .conftest import DocumentRecorder, make_image_detector, validate_all

KEY = "test-key-0123456789abcdef"
TINY = TaggerNetConfig(widths=(8,), depths=(1,), stem_width=8)


class ASGIClient:
    """A synchronous facade over ``httpx.AsyncClient(transport=ASGITransport(app))``."""

    def __init__(self, app):
        self.app = app

    def request(self, method, url, **kw):
        async def go():
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
                return await c.request(method, url, **kw)

        return asyncio.run(go())

    def get(self, url, **kw):
        return self.request("GET", url, **kw)

    def post(self, url, **kw):
        return self.request("POST", url, **kw)

    def put(self, url, **kw):
        return self.request("PUT", url, **kw)


class Live:
    """A RunEngine, a tagging callback with fine-tuning, and the service around them."""

    def __init__(self, tmp, *, finetune=True, isolation="thread", callback_options=None,
                 **settings):
        self.tagger = Tagger.untrained(seed=0, config=TINY)
        self.recorder = DocumentRecorder()
        extra = {}
        if isolation == "process":
            from bluesky_xsml.inference.process import ProcessOptions

            extra = {"process_options": ProcessOptions(priority="normal", threads=1)}
        self.xsml = TaggingCallback(self.tagger, downstream=[self.recorder], threads=1,
                                    max_wait=0.01, isolation=isolation, **extra,
                                    **(callback_options or {}))
        if finetune:
            self.xsml.enable_finetuning(tmp / "ft", auto=False, synthetic=None,
                                        synthetic_val=None, steps=2, batch_size=4)
        self.RE = RunEngine({}, call_returns_result=False)
        self.RE.subscribe(self.xsml)
        self.settings = ServiceSettings(**{"api_key": KEY, "max_body_bytes": 4096, "port": 0,
                                           **settings})
        self.app = create_app(self.xsml, settings=self.settings)
        self.asgi = ASGIClient(self.app)
        self.det = make_image_detector(shape=(64, 80))

    def scan(self, n=6):
        self.RE(count([self.det], n))
        assert self.xsml.flush(60)
        return self.recorder.of("start")[-1]["uid"]

    def close(self):
        self.xsml.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    lv = Live(tmp_path_factory.mktemp("api"))
    lv.uid = lv.scan(6)
    yield lv
    lv.close()


@pytest.fixture(scope="module")
def server(live):
    from bluesky_xsml.api.serve import serve_app

    handle = serve_app(live.app, port=0, announce=False)
    yield handle
    handle.stop()


@pytest.fixture(params=["asgi", "uvicorn"])
def client(request, live):
    if request.param == "asgi":
        return live.asgi
    handle = request.getfixturevalue("server")
    c = httpx.Client(base_url=handle.url, timeout=30)
    request.addfinalizer(c.close)
    return c


def state_changing_operations(app):
    ops = []
    for path, item in app.openapi()["paths"].items():
        for method in item:
            if method.upper() in ("POST", "PUT", "PATCH", "DELETE"):
                ops.append((method.upper(), path.replace("{checkpoint_id}", "abc123")
                            .replace("{uid}", "d0")))
    return ops


# ------------------------------------------------------------------ basics
def test_healthz_openapi_and_loopback_default(client, live):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["callback"] is True
    schema = client.get("/openapi.json").json()
    assert "/api/status" in schema["paths"] and "/api/feed" in schema["paths"]
    assert ServiceSettings().host == "127.0.0.1"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "default-src 'self'" in r.headers["content-security-policy"]


def test_server_binds_loopback_and_announces_key(live, capsys):
    handle = serve(live.xsml, port=0)
    try:
        assert handle.url.startswith("http://127.0.0.1:")
        out = capsys.readouterr().out
        assert handle.api_key in out and handle.page_url in out
        assert len(handle.api_key) >= 32  # generated: none was configured
        assert httpx.get(handle.url + "/healthz").status_code == 200
    finally:
        handle.stop()
    assert not handle.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(handle.url + "/healthz", timeout=2)


def test_callback_serve_is_deprecated_and_delegates_to_api_serve(live, capsys):
    """``TaggingCallback.serve`` warns and starts the same service (the api registers it)."""
    with pytest.warns(DeprecationWarning, match=r"api\.serve\.serve\(callback"):
        handle = live.xsml.serve(port=0, announce=False)
    try:
        assert httpx.get(handle.url + "/healthz").json()["callback"] is True
        assert handle.app.state.service.callback is live.xsml
    finally:
        handle.stop()


@pytest.mark.parametrize("key", [None, "wrong-key-0123456789"])
def test_every_state_changing_endpoint_needs_the_key(client, live, key):
    ops = state_changing_operations(live.app)
    assert len(ops) == 9, ops  # POST /api/session included
    tagger_thresholds = live.tagger.thresholds.copy()
    labels_before = live.xsml.finetuner.status()["labels"]
    for method, path in ops:
        headers = {} if key is None else {"X-API-Key": key}
        r = client.request(method, path, headers=headers,
                           json={"thresholds": {"beam_off": 0.1}})
        expected = 401 if key is None else 403
        assert r.status_code == expected, (method, path, r.text)
        assert ("missing API key" if key is None else "wrong API key") in r.json()["detail"]
    np.testing.assert_array_equal(live.tagger.thresholds, tagger_thresholds)
    assert live.xsml.finetuner.status()["labels"] == labels_before


# ----------------------------------------------------------------- reading
def test_status_reports_the_live_tagger(client, live):
    s = client.get("/api/status").json()
    assert s["checkpoint_id"] == live.tagger.checkpoint_id
    assert s["device"] == "cpu"
    assert s["frames_tagged"] >= 6 and s["queue_jobs"] == 0
    assert s["latency_p50_s"] > 0 and s["latency_p99_s"] >= s["latency_p50_s"]
    assert s["finetune"]["state"] in ("idle", "training")
    assert s["decision"]["action"] in ("continue", "pause", "remeasure", "refine",
                                       "count_longer", "stop")


def test_latest_and_run_frames_match_the_tag_stream(client, live):
    events = [e for e in live.recorder.tag_events()
              if e["descriptor"] in {d["uid"] for d in live.recorder.of("descriptor")
                                     if d["run_start"] == live.uid}]
    by_seq = {e["data"]["source_seq_num"]: e["data"] for e in events}
    r = client.get(f"/api/runs/{live.uid}/frames").json()
    assert r["total"] == 6 and sorted(f["seq_num"] for f in r["frames"]) == list(range(1, 7))
    for f in r["frames"]:
        doc = by_seq[f["seq_num"]]
        assert ",".join(f["tags"]) == doc["tags"]
        assert f["checkpoint"] == doc["checkpoint"] and f["event_uid"] == doc["source_uid"]
        assert f["probs"]["beam_off"] == pytest.approx(doc["beam_off"], abs=1e-4)
    latest = client.get("/api/frames/latest", params={"n": 3}).json()
    assert len(latest["frames"]) == 3 and latest["frames"][-1]["id"] == latest["last_id"]
    after = client.get("/api/frames/latest", params={"n": 100,
                                                     "after": latest["last_id"] - 2}).json()
    assert [f["id"] for f in after["frames"]] == [latest["last_id"] - 1, latest["last_id"]]
    some_tag = r["frames"][0]["tags"][0] if r["frames"][0]["tags"] else "beam_off"
    tagged = client.get("/api/frames/latest", params={"n": 100, "tag": some_tag}).json()
    assert all(some_tag in f["tags"] for f in tagged["frames"])
    runs = client.get("/api/runs").json()["runs"]
    assert runs[0]["run_uid"] == live.uid and runs[0]["tagged"] == 6
    missing = client.get("/api/runs/no-such-run/frames")
    assert missing.status_code == 404 and "no results for run 'no-such-run'" in missing.text


def test_thumbnail_is_a_png_with_tags(client, live):
    from PIL import Image

    frame = client.get(f"/api/runs/{live.uid}/frames").json()["frames"][2]
    r = client.get(f"/api/runs/{live.uid}/frames/{frame['seq_num']}/thumbnail.png",
                   params={"scale": 2})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(r.content))
    size = live.tagger.preprocess_config.size * 2
    assert img.size == (size, size) and img.mode == "RGB"
    assert img.text["xsml:tags"] == ",".join(frame["tags"]) == r.headers["x-xsml-tags"]
    rgb = np.asarray(img)
    # pixel repetition: every 2x2 block is one thumbnail pixel
    small = rgb[::2, ::2]
    for dy in (0, 1):
        for dx in (0, 1):
            np.testing.assert_array_equal(rgb[dy::2, dx::2], small)
    # the picture is the colour map of this frame's log-scaled block maxima, full contrast
    from bluesky_xsml.api.routes.frames import _LUT, _MASKED

    event = next(e for e in live.recorder.of("event")
                 if e["descriptor"] in {d["uid"] for d in live.recorder.of("descriptor")
                                        if d["run_start"] == live.uid}
                 and e["seq_num"] == frame["seq_num"])
    x = live.tagger.preprocess([event["data"]["img"]])[0][0]
    invalid = (x[3] > 0.5) | (x[4] > 0.5)
    log_max = x[1][~invalid]
    level = np.searchsorted(_LUT[:, 0], small[..., 0][~invalid], side="left")  # R rises
    assert (small[invalid] == _MASKED).all()
    assert np.corrcoef(level, log_max)[0, 1] > 0.95
    assert small[~invalid].reshape(-1, 3).min(0).tolist() == _LUT[0].tolist()   # darkest
    assert small[~invalid].reshape(-1, 3).max(0).tolist() == _LUT[255].tolist()  # brightest
    gone = client.get(f"/api/runs/{live.uid}/frames/999/thumbnail.png")
    assert gone.status_code == 404 and "no thumbnail for frame 0 of event 999" in gone.text


# ----------------------------------------------------------------- writing
def test_thresholds_apply_to_the_next_frames(live):
    c, h = live.asgi, {"X-API-Key": KEY}
    before = c.get("/api/thresholds").json()
    assert before["tags"] == list(live.tagger.tags)
    r = c.put("/api/thresholds", headers=h,
              json={"thresholds": {"streaks": 0.0, "beam_off": 1.0}})
    assert r.status_code == 200, r.text
    assert r.json()["thresholds"]["streaks"] == 0.0
    assert float(live.tagger.thresholds[live.tagger.tags.index("streaks")]) == 0.0
    try:
        uid = live.scan(4)
        frames = c.get(f"/api/runs/{uid}/frames").json()["frames"]
        assert len(frames) == 4
        assert all("streaks" in f["tags"] and "beam_off" not in f["tags"] for f in frames)
    finally:
        old = {t: before["thresholds"][t] for t in ("streaks", "beam_off")}
        assert c.put("/api/thresholds", headers=h, json={"thresholds": old}).status_code == 200
    bad = c.put("/api/thresholds", headers=h, json={"thresholds": {"no_such_tag": 0.5}})
    assert bad.status_code == 422 and "unknown tags ['no_such_tag']" in bad.json()["detail"]
    out = c.put("/api/thresholds", headers=h, json={"thresholds": {"streaks": 1.5}})
    assert out.status_code == 422 and "less than or equal to 1" in out.json()["detail"]


def test_labels_one_and_many_reach_fine_tuning(client, live):
    h = {"X-API-Key": KEY}
    ft = live.xsml.finetuner
    n0 = ft.status()["labels"]
    one = client.post("/api/labels", headers=h,
                      json={"run_uid": live.uid, "seq_num": 2, "tags": {"ring_oriented": True,
                                                                         "beam_off": False}})
    assert one.status_code == 200, one.text
    rec = one.json()["receipts"][0]
    assert rec["seq_num"] == 2 and rec["labels"] == {"ring_oriented": True, "beam_off": False}
    many = client.post("/api/labels", headers=h, json=[
        {"run_uid": live.uid, "seq_num": 3, "key": "img", "tags": {"saturation": True}},
        {"run_uid": live.uid, "seq_num": 4, "tags": {"saturation": None, "streaks": False}}])
    assert many.status_code == 200 and len(many.json()["receipts"]) == 2
    assert ft.status()["labels"] == n0 + 3
    _, labels, prov = ft.replay.merged()
    last = {p["seq_num"]: row for p, row in zip(prov, labels, strict=True)
            if p.get("run_uid") == live.uid}
    tags = list(ft.replay.tags)
    assert last[2][tags.index("ring_oriented")] == 1 and last[2][tags.index("beam_off")] == 0
    assert last[3][tags.index("saturation")] == 1 and np.isnan(last[4][tags.index("saturation")])
    # one frame missing: nothing of the request is stored
    mixed = client.post("/api/labels", headers=h, json=[
        {"run_uid": live.uid, "seq_num": 5, "tags": {"streaks": True}},
        {"run_uid": live.uid, "seq_num": 77, "tags": {"streaks": True}}])
    assert mixed.status_code == 404 and "is not in the label cache" in mixed.json()["detail"]
    assert ft.status()["labels"] == n0 + 3
    suggestions = client.get("/api/labels/suggestions", params={"k": 3}).json()["suggestions"]
    assert len(suggestions) == 3 and all(s["seq_num"] not in (2, 3, 4) or s["run_uid"] != live.uid
                                         for s in suggestions)


def test_without_fine_tuning_model_endpoints_say_how_to_enable_it(tmp_path):
    lv = Live(tmp_path, finetune=False)
    try:
        uid = lv.scan(2)
        h = {"X-API-Key": KEY}
        for method, path, body in [("GET", "/api/checkpoints", None),
                                   ("GET", "/api/finetune", None),
                                   ("POST", "/api/retrain", None),
                                   ("POST", "/api/checkpoints/rollback", None),
                                   ("POST", "/api/checkpoints/abc/activate", None),
                                   ("POST", "/api/labels", {"run_uid": uid, "seq_num": 1,
                                                            "tags": {"beam_off": True}})]:
            r = lv.asgi.request(method, path, headers=h, json=body)
            assert r.status_code == 409, (path, r.text)
            assert "enable_finetuning(directory)" in r.json()["detail"]
        assert lv.asgi.get("/api/status").json()["finetune"] is None
    finally:
        lv.close()


def test_memory_bounds_hold_and_are_reported(tmp_path):
    lv = Live(tmp_path, finetune=False, thumbnails=2, max_frames_per_run=3, max_runs=1,
              latest_frames=4)
    try:
        first = lv.scan(2)
        uid = lv.scan(5)
        c = lv.asgi
        runs = c.get("/api/runs").json()["runs"]
        assert [r["run_uid"] for r in runs] == [uid]  # the older run was forgotten
        assert c.get(f"/api/runs/{first}").status_code == 404
        run = c.get(f"/api/runs/{uid}").json()
        assert (run["frames"], run["tagged"], run["dropped"]) == (5, 5, 2)
        assert c.get(f"/api/runs/{uid}/frames").json()["total"] == 3
        assert [f["seq_num"] for f in c.get("/api/frames/latest?n=100").json()["frames"]] \
            == [2, 3, 4, 5]
        assert c.get(f"/api/runs/{uid}/frames/5/thumbnail.png").status_code == 200
        old = c.get(f"/api/runs/{uid}/frames/3/thumbnail.png")
        assert old.status_code == 404 and "only the last 2 tagged frames" in old.json()["detail"]
    finally:
        lv.close()


def test_process_mode_thumbnails_and_labels_come_from_the_tagging_process(tmp_path):
    """With isolation="process" no frame's input crosses for the service: a thumbnail is
    made from the tagging process's label cache when it is asked for, labels go there, and
    after a restart labels of the frames it tagged are refused with the reason (404)."""
    import os
    import signal

    lv = Live(tmp_path, isolation="process")
    try:
        crossed = []
        handle = lv.xsml.worker._handle
        lv.xsml.worker._handle = lambda w, p: (crossed.append(w), handle(w, p))[1]
        uid = lv.scan(3)
        c, h = lv.asgi, {"X-API-Key": KEY}
        r = c.get(f"/api/runs/{uid}/frames/2/thumbnail.png")
        assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert "inputs" not in crossed and not lv.xsml._input_listeners
        ok = c.post("/api/labels", headers=h,
                    json={"run_uid": uid, "seq_num": 2, "tags": {"beam_off": True}})
        assert ok.status_code == 200, ok.text
        assert lv.xsml.status()["label_cache_frames"] == 3
        pid = lv.xsml.worker.pid
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while lv.xsml.worker.process_starts < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        lost = c.post("/api/labels", headers=h,
                      json={"run_uid": uid, "seq_num": 3, "tags": {"beam_off": True}})
        assert lost.status_code == 404 and "lost with it" in lost.json()["detail"]
        assert c.get("/api/status").json()["labels_refused"] == 1
        # a frame whose thumbnail was never asked for has none now
        assert c.get(f"/api/runs/{uid}/frames/1/thumbnail.png").status_code == 404
    finally:
        lv.close()


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_without_a_label_cache_process_mode_says_why_there_is_no_thumbnail(tmp_path, isolation):
    """``label_cache_size=0``: in process mode the thumbnails would come from the tagging
    process's label cache, so there are none, and the service says so at once (404 with the
    reason, no call to the tagging process); in thread mode each frame's input reaches the
    service as it is tagged, so thumbnails do not depend on the label cache."""
    lv = Live(tmp_path, isolation=isolation, finetune=False,
              callback_options={"label_cache_size": 0})
    try:
        uid = lv.scan(2)
        calls = []
        if isolation == "process":
            call = lv.xsml.worker.call
            lv.xsml.worker.call = lambda *a, **k: (calls.append(a), call(*a, **k))[1]
        t0 = time.monotonic()
        r = lv.asgi.get(f"/api/runs/{uid}/frames/2/thumbnail.png")
        took = time.monotonic() - t0
        if isolation == "thread":
            assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
            return
        assert r.status_code == 404, r.text
        assert r.json()["detail"] == (
            f"no thumbnail for frame 0 of event 2 (stream 'primary', key None) of run {uid!r}: "
            "the label cache is disabled (label_cache_size=0); with isolation='process' "
            "thumbnails are made from the frames in the tagging process's label cache")
        assert calls == [] and took < 5.0
        # the frame itself is known: its tags are served as usual
        frames = lv.asgi.get(f"/api/runs/{uid}/frames").json()["frames"]
        assert [f["seq_num"] for f in frames] == [1, 2]
    finally:
        lv.close()


@pytest.mark.parametrize("thumbnails, reason", [
    (0, "thumbnails are off (the service's thumbnails setting is 0)"),
    (7, "only the last 7 tagged frames have one"),
])
def test_the_reason_for_no_thumbnail_names_the_setting(thumbnails, reason):
    from bluesky_xsml.api.state import ServiceState

    state = ServiceState(settings=ServiceSettings(api_key=KEY, thumbnails=thumbnails))
    assert state.no_thumbnail_reason() == reason


@pytest.mark.parametrize("query", [{"n": 3}, {"n": 100, "tag": "beam_off"}, {"n": 0},
                                   {"after": 2}, {}])
def test_polled_reads_answer_as_the_routes_do(client, live, query):
    """The fast path for the polled reads (bluesky_xsml.api.hot_reads) sends what the FastAPI
    routes send. An extra query parameter that the route ignores takes the request past the
    fast path to the route, so each request below is answered once by each."""
    fast = client.get("/api/frames/latest", params=query)
    routed = client.get("/api/frames/latest", params={**query, "via": "route"})
    assert fast.status_code == routed.status_code == 200
    assert fast.content == routed.content
    assert fast.headers["content-type"] == routed.headers["content-type"] == "application/json"
    assert fast.headers["x-content-type-options"] == "nosniff"  # the guard still wraps it
    s_fast = client.get("/api/status").json()
    s_routed = client.get("/api/status", params={"via": "route"}).json()
    assert s_fast.keys() == s_routed.keys()
    assert s_fast["checkpoint_id"] == s_routed["checkpoint_id"] == live.tagger.checkpoint_id
    # what the fast path does not plainly accept, the route validates
    for bad in ({"n": 2001}, {"n": "x"}, {"after": -2}, {"tag": ""}, {"n": 1, "n2": 1}):
        r = client.get("/api/frames/latest", params=bad)
        if "n2" in bad:  # an unknown parameter: the route ignores it
            assert r.status_code == 200, (bad, r.status_code)
        else:
            assert r.status_code == 422 and "detail" in r.json(), bad


def test_no_callback_serves_policy_only():
    app = create_app(settings=ServiceSettings(api_key=KEY))
    c = ASGIClient(app)
    assert c.get("/healthz").json()["callback"] is False
    assert c.get("/api/decision").json()["action"] == "continue"
    r = c.get("/api/status")
    assert r.status_code == 503 and "no tagging callback" in r.json()["detail"]


def test_policy_replaced_while_running_drives_decisions(live):
    c, h = live.asgi, {"X-API-Key": KEY}
    original = c.get("/api/policy").json()
    assert [r["name"] for r in original["rules"]][:1] == ["beam_off"]
    policy = {"name": "test", "rules": [
        {"name": "streaky", "kind": "latest", "tags": ["streaks"], "action": "remeasure",
         "params": {"exposure_factor": 0.5}}]}
    r = c.put("/api/policy", headers=h, json=policy)
    assert r.status_code == 200 and r.json()["rules"][0]["name"] == "streaky"
    try:
        c.put("/api/thresholds", headers=h, json={"thresholds": {"streaks": 0.0}})
        uid = live.scan(3)
        d = c.get("/api/decision").json()
        assert d["action"] == "remeasure" and d["rule"] == "streaky" and d["run_uid"] == uid
        assert d["evidence"] and all("streaks" in f["tags"] for f in d["evidence"])
        assert {f["run_uid"] for f in d["evidence"]} == {uid}
        assert {f["seq_num"] for f in d["evidence"]} <= {1, 2, 3}
        hist = c.get("/api/decisions", params={"n": 5}).json()
        assert hist["current"]["uid"] == d["uid"]
    finally:
        c.put("/api/thresholds", headers=h, json={"thresholds": {"streaks": 0.5}})
        assert c.put("/api/policy", headers=h, json=original).status_code == 200
    bad = c.put("/api/policy", headers=h, json={"rules": [{"name": "x", "kind": "nope",
                                                          "action": "pause"}]})
    assert bad.status_code == 422 and "kind" in bad.json()["detail"]


def test_checkpoints_activate_and_roll_back_the_live_model(client, live):
    h = {"X-API-Key": KEY}
    reg = live.xsml.finetuner.registry
    base = live.tagger.checkpoint_id
    other = reg.add(Tagger.untrained(seed=7, config=TINY), parent_id=base, promote=False,
                    reason="for the test")["checkpoint_id"]
    listed = client.get("/api/checkpoints").json()
    assert listed["active_id"] == base and other in [c["checkpoint_id"]
                                                     for c in listed["checkpoints"]]
    r = client.post(f"/api/checkpoints/{other}/activate", headers=h)
    assert r.status_code == 200 and r.json()["checkpoint_id"] == other
    assert live.tagger.checkpoint_id == other
    uid = live.scan(2)
    assert {f["checkpoint"] for f in client.get(f"/api/runs/{uid}/frames").json()["frames"]} \
        == {other}
    back = client.post("/api/checkpoints/rollback", headers=h)
    assert back.status_code == 200 and back.json()["checkpoint_id"] == base
    assert live.tagger.checkpoint_id == base
    unknown = client.post("/api/checkpoints/ffff0000/activate", headers=h)
    assert unknown.status_code == 404 and "no checkpoint 'ffff0000'" in unknown.json()["detail"]


def test_retrain_runs_a_round(live):
    ft = live.xsml.finetuner
    rounds = ft.status()["rounds"]
    if ft.status()["labels"] == 0:
        ft.add_labels(np.zeros((2, 6, live.tagger.preprocess_config.size,
                                live.tagger.preprocess_config.size), np.float32),
                      np.ones((2, len(live.tagger.tags)), np.float32))
    r = live.asgi.post("/api/retrain", headers={"X-API-Key": KEY})
    assert r.status_code == 202 and r.json()["queued"] is True
    deadline = time.monotonic() + 120
    while ft.status()["rounds"] <= rounds and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ft.status()["rounds"] == rounds + 1
    assert live.asgi.get("/api/finetune").json()["rounds"] == rounds + 1


# ------------------------------------------------------------- bad requests
@pytest.mark.parametrize("method,path,kw,status,words", [
    ("POST", "/api/labels", {"content": b"{not json"}, 422, "JSON decode error"),
    ("POST", "/api/labels", {"json": {"run_uid": "x", "seq_num": "three", "tags": {"a": 1}}},
     422, "body.seq_num"),
    ("POST", "/api/labels", {"json": {"seq_num": 1, "tags": {"beam_off": True}}}, 422,
     "body.run_uid: Field required"),
    ("POST", "/api/labels", {"json": {"run_uid": "x", "seq_num": 1, "tags": {}}}, 422,
     "tags"),
    ("POST", "/api/labels", {"json": {"run_uid": "x", "seq_num": 1, "tags": {"key": True}}},
     422, "cannot be tag names"),
    ("POST", "/api/labels", {"json": {"run_uid": "x", "seq_num": 1, "tags": {"b": "maybe"}}},
     422, "valid boolean"),
    ("POST", "/api/labels", {"json": []}, 422, "no labels given"),
    ("POST", "/api/labels", {"json": {"run_uid": "x", "seq_num": 1, "tags": {"a": True},
                                      "surprise": 1}}, 422, "Extra inputs are not permitted"),
    ("PUT", "/api/thresholds", {"json": {"thresholds": "all"}}, 422, "valid dictionary"),
    ("PUT", "/api/thresholds", {"content": b'{"thresholds": {"beam_off": NaN}}'}, 422,
     "body.thresholds.beam_off"),
    ("PUT", "/api/policy", {"json": {"rules": "none"}}, 422, "rules"),
    ("PUT", "/api/policy", {"content": b"x" * 5000}, 413, "over the limit of 4096 bytes"),
    ("GET", "/api/frames/latest", {"params": {"n": -1}}, 422, "query.n"),
    ("GET", "/api/frames/latest", {"params": {"n": "lots"}}, 422, "valid integer"),
    ("GET", "/api/runs/x/frames/-3/thumbnail.png", {}, 422, "seq_num"),
    ("GET", "/api/runs/x/frames/1/thumbnail.png", {"params": {"scale": 99}}, 422, "scale"),
])
def test_bad_requests_get_4xx_with_a_message(client, method, path, kw, status, words):
    headers = {"X-API-Key": KEY}
    if "content" in kw:
        headers["Content-Type"] = "application/json"
    r = client.request(method, path, headers=headers, **kw)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"], r.json()


def test_chunked_oversized_body_is_refused(server):
    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    r = httpx.put(server.url + "/api/policy", content=chunks(),
                  headers={"X-API-Key": KEY, "Content-Type": "application/json"})
    assert r.status_code == 413 and "over the limit" in r.json()["detail"]


@pytest.mark.parametrize("path", [
    "/page/../../../../etc/passwd",
    "/page/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/page/..%2f..%2f..%2fapi%2fapp.py",
    "/page/%2e%2e%2fapp.py",
    "/page//etc/passwd",
    "/page/....//....//etc/passwd",
    "/api/runs/..%2f..%2fetc%2fpasswd/frames/1/thumbnail.png",
    "/api/checkpoints/..%2f..%2fregistry.json/activate",
])
def test_path_traversal_is_refused(server, path):
    # raw paths: httpx would normalise "..", so send them as they are
    with httpx.Client(base_url=server.url) as c:
        req = c.build_request("POST" if path.endswith("activate") else "GET", server.url)
        req.url = req.url.copy_with(raw_path=path.encode())
        req.headers["X-API-Key"] = KEY
        r = c.send(req)
    assert r.status_code in (400, 404, 405, 422), (path, r.status_code)
    assert b"root:" not in r.content and b"create_app" not in r.content
    assert b"checkpoint_id" not in r.content or r.status_code == 404


# ------------------------------------------------------------------- the feed
def test_live_feed_streams_frames_and_decisions(server, live):
    events: list[tuple[str, str, str]] = []
    connected = threading.Event()

    def listen():
        with httpx.stream("GET", server.url + "/api/feed", params={"max_s": 20},
                          timeout=30) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            connected.set()
            ev = {}
            saw_last_frame = decided_last_frame = False
            for line in r.iter_lines():
                if not line:
                    if ev.get("event"):
                        events.append((ev["event"], ev.get("id", ""), ev.get("data", "")))
                        data = json.loads(ev["data"])
                        if ev["event"] == "frames" and data["frames"][-1]["seq_num"] == 5:
                            saw_last_frame = True
                        if ev["event"] == "decision" and (data.get("after") or {}).get(
                                "seq_num") == 5:
                            decided_last_frame = True  # may come just after the frames
                        if saw_last_frame and decided_last_frame:
                            return
                    ev = {}
                    continue
                field, _, value = line.partition(": ")
                ev[field] = value

    t = threading.Thread(target=listen)
    t.start()
    assert connected.wait(10)
    time.sleep(0.2)
    uid = live.scan(5)
    t.join(30)
    assert not t.is_alive()
    frames = [f for e, _, d in events if e == "frames" for f in json.loads(d)["frames"]
              if f["run_uid"] == uid]
    assert [f["seq_num"] for f in frames] == [1, 2, 3, 4, 5]
    decisions = [json.loads(d) for e, _, d in events if e == "decision"]
    assert decisions and any(d["after"] and d["after"]["run_uid"] == uid for d in decisions)
    ids = [int(i) for e, i, _ in events if e == "frames"]
    # a client that reconnects with Last-Event-ID gets what it missed
    with httpx.stream("GET", server.url + "/api/feed", params={"max_s": 1},
                      headers={"Last-Event-ID": str(ids[0])}) as r:
        text = "".join(r.iter_text())
    replayed = [f["seq_num"] for block in text.split("\n\n") if "event: frames" in block
                for f in json.loads(block.split("data: ", 1)[1])["frames"] if f["run_uid"] == uid]
    assert replayed == [f["seq_num"] for f in frames if f["id"] > ids[0]]


def test_page_is_served_without_external_resources(client):
    r = client.get("/", follow_redirects=True)
    assert r.status_code == 200 and "xsml live tags" in r.text
    for name in ("app.js", "style.css", "index.html"):
        body = client.get(f"/page/{name}").text
        assert "http://" not in body and "https://" not in body and "//cdn" not in body


def test_documents_stay_valid_with_the_service_attached(live):
    validate_all(live.recorder.docs)


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_xsml_serve_command_starts_and_stops(tmp_path, signame):
    """``xsml serve`` in a subprocess: prints the URL and key, serves, stops cleanly on
    Ctrl-C (SIGINT) or SIGTERM."""
    import os
    import signal
    import subprocess
    import sys

    def as_from_a_terminal():
        # a test runner started in the background inherits SIGINT ignored; a terminal's
        # foreground command does not, and that is what Ctrl-C reaches
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    env = {**os.environ, "XSML_API_KEY": KEY, "XSML_NICE": "0"}
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "bluesky_xsml.cli",
                             "serve", "--port", "0",
                             "--finetune-dir", str(tmp_path / "ft"), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=as_from_a_terminal)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("xsml service: "):
                url = line.split(": ", 1)[1].split("/page/")[0]
        assert url and url.startswith("http://127.0.0.1:"), "no URL printed"
        assert httpx.get(url + "/healthz").json()["callback"] is True
        assert httpx.get(url + "/api/finetune").json()["state"] == "idle"
        r = httpx.post(url + "/api/retrain", headers={"X-API-Key": "not-the-key-000000"})
        assert r.status_code == 403
        proc.send_signal(getattr(signal, signame))
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # -X faulthandler: every thread's stack, then exit
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            pytest.fail(f"xsml serve did not stop within 60 s of {signame}; its output:\n"
                        + proc.communicate(timeout=30)[0][-20000:])
        out = proc.communicate(timeout=30)[0]
        assert code == 0, out
        assert f"stopping ({signame})" in out
        assert KEY not in out  # the operator's key (XSML_API_KEY) is never printed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
