"""The in-process steering plan on the simulated beamline.

Everything is real: a RunEngine, the ophyd stage motors and detector of
``bluesky_xsml.sim.sample`` (a combinatorial film), the packaged tagger inside a
TaggingCallback, and the policy engine. Every emitted document is schema-validated.
"""

from __future__ import annotations

import itertools
import time

import event_model
import numpy as np
import pytest
from bluesky.utils import RunEngineInterrupted
from ophyd import Signal

from bluesky_xsml.errors import ConfigurationError
from bluesky_xsml.steering.plans import tag_steered_scan
from bluesky_xsml.steering.policy import Policy, PolicyEngine, Rule

from .conftest import validate_all


@pytest.fixture(scope="module")
def shipped_tagger():
    from bluesky_xsml.inference.tagger import Tagger

    return Tagger.load()


@pytest.fixture
def beamline():
    from bluesky_xsml.sim.sample import make_beamline

    bl = make_beamline(size=256)
    bl.sample_y.set(2.0).wait()
    return bl


@pytest.fixture
def xsml(shipped_tagger, recorder, beamline):
    from bluesky_xsml.documents.callback import TaggingCallback

    # as a beamline would run it (and as `xsml demo` does): the frames at the demo's size and
    # the beam centre given, without which the shipped model's spot and orientation tags are
    # weaker (the model card); a powder frame at 128 px without the centre can get a
    # borderline `ring_oriented`, which hides the oriented region's appearance from the rule
    cb = TaggingCallback(shipped_tagger, downstream=[recorder], threads=1, max_wait=0.01,
                         beam_center=list(beamline.sample.beam_center))
    assert cb.wait_ready(120)
    yield cb
    cb.close()


def events(recorder, stream):
    uids = {d["uid"] for d in recorder.of("descriptor") if d["name"] == stream}
    out = [d for d in recorder.of("event") if d["descriptor"] in uids]
    for page in recorder.of("event_page"):
        if page["descriptor"] in uids:
            out.extend(event_model.unpack_event_page(page))
    return sorted(out, key=lambda e: e["seq_num"])


def test_scan_refines_where_the_structure_changes(RE, beamline, xsml, recorder):
    engine = PolicyEngine()
    RE.subscribe(xsml)
    x = beamline.sample_x
    coarse = np.linspace(0.4, 9.0, 5)          # 0.4, 2.55, 4.7, 6.85, 9.0
    step = coarse[1] - coarse[0]
    RE(tag_steered_scan([beamline.det], x, 0.4, 9.0, 5, callback=xsml, engine=engine,
                        refine=3))
    assert xsml.flush(30)
    validate_all(recorder.docs)

    points = events(recorder, "primary")
    positions = [e["data"]["sample_x"] for e in points]
    decisions = events(recorder, "xsml_decisions")
    tags = recorder.tag_events()
    # every frame tagged and every point decided
    assert len(tags) == len(points) == len(decisions)
    assert all(t["data"]["skip_reason"] == "" for t in tags)
    assert [d["data"]["xsml_point_seq_num"] for d in decisions] == [e["seq_num"] for e in points]

    for c in coarse:
        assert any(abs(p - c) < 1e-9 for p in positions)
    refined = [p for p in positions if not any(abs(p - c) < 1e-9 for c in coarse)]
    # nothing new inside the amorphous stretch, finer points at both structure changes
    assert not [p for p in refined if coarse[0] < p < coarse[1]]
    assert [p for p in refined if coarse[1] < p < coarse[2]]
    assert [p for p in refined if coarse[2] < p < coarse[3]]

    by_position = {d["data"]["xsml_position"]: d["data"] for d in decisions}
    at_rings, at_arcs = by_position[coarse[2]], by_position[coarse[3]]
    assert at_rings["xsml_action"] == "refine" and "ring_isotropic" in at_rings["xsml_reason"]
    assert at_arcs["xsml_action"] == "refine" and "ring_oriented" in at_arcs["xsml_reason"]

    # the amorphous/crystalline boundary is now bracketed by points a refined step apart
    sample = beamline.sample
    ordered = sorted(positions)
    crossings = [(a, b) for a, b in itertools.pairwise(ordered)
                 if sample.region_at(a, 2.0) == "amorphous" != sample.region_at(b, 2.0)]
    assert len(crossings) == 1
    a, b = crossings[0]
    assert b - a <= step / 4 + 1e-9

    start, = recorder.of("start")
    assert start["plan_name"] == "tag_steered_scan"
    rules = start["xsml_policy"]["rules"]
    assert [r["name"] for r in rules] == [r.name for r in engine.policy.rules]
    stop, = recorder.of("stop")
    assert stop["exit_status"] == "success"


def test_beam_off_pauses_and_resume_goes_on(RE, beamline, xsml, recorder):
    engine = PolicyEngine()
    # the engine also listens to the callback directly (as the service's does): each frame
    # must still count once, or the third beam_off would be seen one point early
    xsml.add_result_listener(engine.update)
    RE.subscribe(xsml)
    # 8.7, 8.9, 9.1 on the film; 9.3, 9.5, 9.7, 9.9 off it (beam_off)
    plan = tag_steered_scan([beamline.det], beamline.sample_x, 8.7, 9.9, 7, callback=xsml,
                            engine=engine)
    with pytest.raises(RunEngineInterrupted):
        RE(plan)
    assert RE.state == "paused"
    assert engine.current.action == "pause"
    assert [f.seq_num for f in engine.current.evidence] == [4, 5, 6]
    assert len(events(recorder, "primary")) == 6
    # the beam is still off at the next point: the policy pauses again
    with pytest.raises(RunEngineInterrupted):
        RE.resume()
    assert RE.state == "paused"
    assert [f.seq_num for f in engine.current.evidence] == [5, 6, 7]
    RE.resume()
    assert RE.state == "idle"
    assert xsml.flush(30)
    validate_all(recorder.docs)
    decisions = [d["data"]["xsml_action"] for d in events(recorder, "xsml_decisions")]
    assert decisions == ["continue"] * 5 + ["pause"] * 2
    assert len(events(recorder, "primary")) == 7
    assert recorder.of("stop")[0]["exit_status"] == "success"


def test_remeasure_shortens_exposure_and_restores_it(RE, beamline, xsml, recorder):
    policy = Policy(rules=[Rule(name="arcs", kind="latest", tags=["ring_oriented"],
                                action="remeasure", params={"exposure_factor": 0.5})])
    exposure = Signal(name="exposure_time", value=1.0)
    RE.subscribe(xsml)
    RE(tag_steered_scan([beamline.det], beamline.sample_x, 7.0, 8.0, 2, callback=xsml,
                        engine=PolicyEngine(policy), exposure=exposure, max_retakes=2))
    assert xsml.flush(30)
    validate_all(recorder.docs)
    points = events(recorder, "primary")
    assert [e["data"]["exposure_time"] for e in points] == [1.0, 0.5, 0.25] * 2
    assert [e["data"]["sample_x"] for e in points] == [7.0] * 3 + [8.0] * 3
    assert exposure.get() == 1.0
    reasons = [d["data"]["xsml_reason"] for d in events(recorder, "xsml_decisions")]
    assert all(r.startswith("arcs: ring_oriented at primary seq_num") for r in reasons)


def test_policy_stop_ends_the_run_with_the_reason(RE, beamline, xsml, recorder):
    policy = Policy(rules=[Rule(name="off_film", kind="latest", tags=["beam_off"],
                                action="stop")])
    RE.subscribe(xsml)
    RE(tag_steered_scan([beamline.det], beamline.sample_x, 8.7, 9.9, 7, callback=xsml,
                        engine=PolicyEngine(policy)))
    assert xsml.flush(30)
    validate_all(recorder.docs)
    assert [e["data"]["sample_x"] for e in events(recorder, "primary")] == \
        pytest.approx([8.7, 8.9, 9.1, 9.3])
    stop, = recorder.of("stop")
    assert stop["exit_status"] == "success"
    assert stop["reason"].startswith("stopped by policy: off_film: beam_off at primary seq_num 4")


def test_max_points_bounds_the_scan(RE, beamline, xsml, recorder):
    RE.subscribe(xsml)
    RE(tag_steered_scan([beamline.det], beamline.sample_x, 0.4, 9.0, 5, callback=xsml,
                        engine=PolicyEngine(), max_points=4))
    assert xsml.flush(30)
    assert len(events(recorder, "primary")) == 4
    stop, = recorder.of("stop")
    assert "max_points=4 reached" in stop["reason"]


def test_missing_tags_time_out_without_blocking(RE, beamline, xsml, recorder):
    """The callback is not subscribed, as if the tagger were down: no tags ever arrive."""
    engine = PolicyEngine()
    RE.subscribe(recorder)
    t0 = time.monotonic()
    RE(tag_steered_scan([beamline.det], beamline.sample_x, 1.0, 2.0, 3, callback=xsml,
                        engine=engine, tag_timeout=0.3))
    elapsed = time.monotonic() - t0
    assert elapsed < 0.3 * 3 + 5
    decisions = events(recorder, "xsml_decisions")
    assert [d["data"]["xsml_action"] for d in decisions] == ["continue"] * 3
    assert decisions[0]["data"]["xsml_reason"].startswith(
        "no tags for primary seq_num 1 within 0.3 s")
    assert engine.updates == 0
    validate_all(recorder.docs)


def test_listener_is_removed_after_the_run(RE, beamline, xsml):
    from bluesky.plans import count

    engine = PolicyEngine()
    RE.subscribe(xsml)
    RE(tag_steered_scan([beamline.det], beamline.sample_x, 1.0, 2.0, 2, callback=xsml,
                        engine=engine))
    assert xsml.flush(30)
    n = engine.updates
    assert n >= 1
    RE(count([beamline.det], 2))
    assert xsml.flush(30)
    assert engine.updates == n


@pytest.mark.parametrize("kwargs, message", [
    (dict(num=1), "num must be an integer >= 2 (coarse points), got 1"),
    (dict(start=1.0, stop=1.0), "start and stop must be finite and different"),
    (dict(refine=-1), "refine must be an integer >= 0, got -1"),
    (dict(tag_timeout=0), "tag_timeout must be > 0 seconds, got 0"),
    (dict(engine=Policy()), "engine must be a PolicyEngine, got Policy"),
    (dict(callback=object()), "callback must be a TaggingCallback"),
    (dict(max_points=0), "max_points must be >= 1, got 0"),
])
def test_bad_options_are_refused_before_running(beamline, kwargs, message):
    args = dict(start=0.0, stop=1.0, num=3, callback=_NoCallback(), engine=PolicyEngine())
    args.update(kwargs)
    with pytest.raises(ConfigurationError) as info:
        tag_steered_scan([beamline.det], beamline.sample_x, args.pop("start"), args.pop("stop"),
                         args.pop("num"), **args)
    assert message in str(info.value)


class _NoCallback:
    """Stands in for a TaggingCallback only where the plan is refused before it runs."""

    def add_result_listener(self, listener):  # pragma: no cover - never reached
        raise AssertionError("the plan must not start")
