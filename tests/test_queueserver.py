"""Decisions reaching a real bluesky queue server (RE Manager + Redis).

The module fixture starts Debian's ``redis-server`` on a free loopback port
(no persistence) and ``start-re-manager`` with a startup directory written
here (ophyd.sim devices, a RunEngine that appends every start document to a
JSON-lines file so the tests can read the metadata that reached the run).
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

pytest.importorskip("bluesky_queueserver_api")

from bluesky_xsml.documents.compose import FrameResult
from bluesky_xsml.errors import ConfigurationError
from bluesky_xsml.steering.local_server import LocalQueueServer, free_port
from bluesky_xsml.steering.policy import Decision, FrameRef, PolicyEngine
from bluesky_xsml.steering.queue import (
    PlanTemplate,
    QueueSteering,
    QueueSteeringError,
)

STARTUP = """\
import json
import time as ttime

from bluesky import RunEngine
from bluesky.plans import count, scan
from ophyd.sim import det, det1, motor

RE = RunEngine({{}})


def _write_start(name, doc):
    if name == "start":
        with open({path!r}, "a") as f:
            f.write(json.dumps(doc, default=str) + "\\n")


RE.subscribe(_write_start)
"""


class QueueServer:
    def __init__(self, api, starts_path):
        self.api = api
        self.starts_path = starts_path

    def starts(self) -> list[dict]:
        if not os.path.exists(self.starts_path):
            return []
        with open(self.starts_path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def wait_state(self, predicate, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.api.status(reload=True)
            if predicate(status):
                return status
            time.sleep(0.05)
        raise AssertionError(f"queue server never reached the state; last {status}")

    def reset(self):
        api = self.api
        status = api.status(reload=True)
        if status["manager_state"] == "paused":
            api.re_stop()
        api.wait_for_idle(timeout=60)
        api.queue_clear()
        api.history_clear()


@pytest.fixture(scope="module")
def qserver(tmp_path_factory):
    for exe in ("redis-server", "start-re-manager"):
        if shutil.which(exe) is None:
            pytest.skip(f"{exe} is not installed (Debian package redis-server; pip "
                        "bluesky-queueserver); the queue-server tests need it")
    tmp = tmp_path_factory.mktemp("qserver")
    startup = tmp / "startup"
    startup.mkdir()
    starts_path = str(tmp / "starts.jsonl")
    (startup / "00-beamline.py").write_text(STARTUP.format(path=starts_path))
    with LocalQueueServer(startup, tmp, name_prefix="xsml_test", start_timeout=60,
                          timeout_recv=5.0) as server:
        yield QueueServer(server.api, starts_path)


@pytest.fixture
def qs(qserver):
    qserver.reset()
    yield qserver
    qserver.reset()


def saturated(seq):
    return FrameResult("primary", seq, f"ev{seq}", "img", 0, [0.0], tags=("saturation",))


def test_decision_adds_a_plan_that_runs_with_the_decision_in_its_metadata(qs):
    steering = QueueSteering(qs.api, require_approval=False, plans={
        "remeasure": PlanTemplate(name="count", args=[["det"]], kwargs={"num": 2},
                                  params={"exposure_factor": "delay"})})
    decision = Decision(action="remeasure", reason="saturation: saturation at primary seq_num 7",
                        rule="saturation", run_uid="run-a", params={"exposure_factor": 0.01},
                        evidence=[FrameRef(run_uid="run-a", seq_num=7, tags=["saturation"])])
    action = steering.submit(decision)
    assert action.status == "done", action.detail
    assert action.detail.startswith("added count as ")
    queued = qs.api.queue_get()["items"]
    assert [i["name"] for i in queued] == ["count"]
    assert queued[0]["kwargs"]["delay"] == 0.01
    assert queued[0]["kwargs"]["md"]["xsml_decision"]["uid"] == decision.uid
    qs.api.queue_start()
    qs.api.wait_for_idle(timeout=60)
    result = qs.api.history_get()["items"][-1]["result"]
    assert result["exit_status"] == "completed"
    start = next(s for s in qs.starts() if s["uid"] == result["run_uids"][0])
    md = start["xsml_decision"]
    assert (md["action"], md["rule"], md["run_uid"]) == ("remeasure", "saturation", "run-a")
    assert md["evidence"][0]["seq_num"] == 7
    steering.close()


def test_start_queue_runs_the_added_plan(qs):
    steering = QueueSteering(qs.api, start_queue=True, require_approval=False, plans={
        "count_longer": PlanTemplate(name="count", args=[["det1"]], kwargs={"num": 3})})
    action = steering.submit(Decision(action="count_longer", reason="weak_only", rule="weak_only"))
    assert action.status == "done" and action.detail.endswith("; queue started")
    qs.api.wait_for_idle(timeout=60)
    item, = qs.api.history_get()["items"]
    assert item["result"]["exit_status"] == "completed"
    assert item["kwargs"]["md"]["xsml_decision"]["action"] == "count_longer"
    steering.close()


def test_approval_holds_actions_until_a_person_decides(qs):
    engine = PolicyEngine()
    steering = QueueSteering(qs.api, require_approval=True, plans={
        "remeasure": {"name": "count", "args": [["det1"]], "kwargs": {"num": 1}}})
    steering.attach(engine)
    for seq in range(1, 4):         # saturation on three frames: one action, not three
        engine.update("run-b", [saturated(seq)])
    assert steering.flush(10)
    assert len(steering.pending) == 1
    assert steering.stats()["suppressed"] == 2
    assert qs.api.queue_get()["items"] == []       # nothing reaches the queue unapproved
    first = steering.pending[0]
    assert first.decision.action == "remeasure" and first.kind == "add_plan"

    engine.update("run-b", [FrameResult("primary", 4, "", "img", 0, [0.0], tags=())])
    engine.update("run-b", [saturated(5)])          # the condition returns: a new action
    assert steering.flush(10)
    assert len(steering.pending) == 2
    second = steering.pending[1]

    done = steering.approve(first.uid)
    assert done.status == "done"
    queued = qs.api.queue_get()["items"]
    assert len(queued) == 1
    assert queued[0]["kwargs"]["md"]["xsml_decision"]["uid"] == first.uid
    rejected = steering.reject(second.uid, reason="already re-measured")
    assert (rejected.status, rejected.detail) == ("rejected", "already re-measured")
    assert steering.pending == []
    assert len(qs.api.queue_get()["items"]) == 1
    with pytest.raises(QueueSteeringError, match=f"no pending queue action for decision "
                                                 f"'{second.uid}'; pending: none"):
        steering.approve(second.uid)
    assert [a.status for a in steering.actions] == ["done", "rejected"]
    # switch approval off: the next decision goes straight to the queue
    steering.require_approval = False
    engine.update("run-b", [FrameResult("primary", 6, "", "img", 0, [0.0], tags=())])
    engine.update("run-b", [saturated(7)])
    assert steering.flush(10)
    assert len(qs.api.queue_get()["items"]) == 2
    steering.close()


def test_pause_decision_pauses_the_running_plan(qs):
    steering = QueueSteering(qs.api, require_approval=False)
    idle = steering.submit(Decision(action="pause", reason="beam_off", rule="beam_off"))
    assert (idle.status, idle.detail) == ("done", "nothing to pause (manager idle)")

    qs.api.item_add({"item_type": "plan", "name": "count", "args": [["det"]],
                     "kwargs": {"num": 100, "delay": 0.1}})
    qs.api.queue_start()
    # at once: the plan may not be running yet, and the client must wait for it to be
    action = steering.submit(Decision(action="pause", reason="beam_off: 3 frames", rule="beam_off"))
    assert action.status == "done", action.detail
    assert action.detail == "paused the running plan (deferred)"
    status = qs.wait_state(lambda s: s["manager_state"] == "paused")
    assert status["re_state"] == "paused"
    steering.close()


def test_stop_decision_stops_the_queue_after_the_running_plan(qs):
    steering = QueueSteering(qs.api, require_approval=False)
    for _ in range(2):
        qs.api.item_add({"item_type": "plan", "name": "count", "args": [["det"]],
                         "kwargs": {"num": 10, "delay": 0.1}})
    qs.api.queue_start()
    qs.wait_state(lambda s: s["manager_state"] == "executing_queue")
    action = steering.submit(Decision(action="stop", reason="sample finished", rule="done"))
    assert (action.status, action.detail) == ("done", "the queue stops after the running plan")
    qs.api.wait_for_idle(timeout=60)
    assert len(qs.api.history_get()["items"]) == 1
    assert len(qs.api.queue_get()["items"]) == 1
    steering.close()


def test_unreachable_manager_fails_the_action_without_blocking_tagging():
    """The RE Manager address has nothing listening: requests time out in the steering thread."""
    from bluesky_queueserver_api.zmq import REManagerAPI

    api = REManagerAPI(zmq_control_addr=f"tcp://127.0.0.1:{free_port()}", timeout_recv=0.3,
                       timeout_send=0.3)
    engine = PolicyEngine()
    steering = QueueSteering(api, require_approval=False)
    steering.attach(engine)
    frames = [FrameResult("primary", i, "", "img", 0, [0.0], tags=("beam_off",))
              for i in range(1, 4)]
    t0 = time.monotonic()
    assert engine.update("run-c", frames).action == "pause"
    assert time.monotonic() - t0 < 0.25
    assert steering.flush(20)
    failed, = steering.actions
    assert failed.status == "failed"
    assert "Timeout" in failed.detail
    steering.close()
    api.close()


def test_ignored_and_invalid_configuration():
    steering = QueueSteering(api=object())
    ignored = steering.submit(Decision(action="refine", reason="ring_oriented appeared"))
    assert (ignored.status, ignored.detail) == ("ignored", "no plan configured for 'refine'")
    steering.close()
    with pytest.raises(ConfigurationError, match="plans can be given for remeasure, refine, "
                                                 "count_longer; not for 'pause'"):
        QueueSteering(api=object(), plans={"pause": {"name": "count"}})
    with pytest.raises(ConfigurationError, match="needs an api or a zmq_control_addr"):
        QueueSteering()
    with pytest.raises(ConfigurationError, match="pause_option must be 'deferred' or 'immediate'"):
        QueueSteering(api=object(), pause_option="later")


def test_callable_plan_factory_and_pending_bound():
    def factory(decision):
        from bluesky_queueserver_api import BPlan

        return BPlan("scan", ["det"], "motor", -1, 1, 5, md={"note": "refine"})

    steering = QueueSteering(api=object(), plans={"refine": factory}, require_approval=True,
                             max_pending=2)
    actions = [steering.submit(Decision(action="refine", reason=f"r{i}")) for i in range(3)]
    item = actions[0].item
    assert item["name"] == "scan" and item["args"] == [["det"], "motor", -1, 1, 5]
    assert item["kwargs"]["md"]["note"] == "refine"
    assert item["kwargs"]["md"]["xsml_decision"]["reason"] == "r0"
    assert [a.uid for a in steering.pending] == [actions[1].uid, actions[2].uid]
    dropped, = steering.actions
    assert dropped.status == "rejected" and "max_pending=2" in dropped.detail
    steering.close()
