"""GapDetector on hand-made document sequences: fast, exact checks of what a lossy bus lost.

The bus tests (tests/test_scaleout_bus.py) run the detector inside real workers; these pin
its bookkeeping rule by rule, including the cases a worker meets rarely (out-of-order
delivery, the loss of a stream's last event, event pages, ignored streams).
"""

from __future__ import annotations

import logging

import pytest

from bluesky_xsml.scaleout.gaps import Gap, GapDetector


def _run(gd, uid="r1", desc="d1", stream="primary"):
    assert gd.observe("start", {"uid": uid, "time": 0}) == (uid, [])
    assert gd.observe("descriptor", {"uid": desc, "run_start": uid, "name": stream}) == (uid, [])


def _event(desc, seq):
    return {"uid": f"{desc}-e{seq}", "descriptor": desc, "seq_num": seq}


def _stop(uid, **counts):
    return {"uid": f"{uid}-stop", "run_start": uid, "num_events": counts}


def test_complete_run_has_no_gaps():
    gd = GapDetector()
    _run(gd)
    for s in (1, 2, 3):
        assert gd.observe("event", _event("d1", s)) == ("r1", [])
    assert gd.observe("stop", _stop("r1", primary=3)) == ("r1", [])
    assert gd.finish("r1") == []
    assert gd.missing("r1") == {}
    assert gd.runs["r1"].gaps == [] and gd.unplaced == []


def test_out_of_order_event_counts_as_received():
    """3 before 2: the jump is reported at once, but 2 arrives later and is not lost."""
    gd = GapDetector()
    _run(gd)
    gd.observe("event", _event("d1", 1))
    _, gaps = gd.observe("event", _event("d1", 3))
    assert [(g.kind, g.stream, g.seq_nums) for g in gaps] == [("missing_events", "primary", (2,))]
    assert gaps[0].run_uid == "r1" and "from 1 to 3" in gaps[0].detail
    assert gd.runs["r1"].gaps == gaps and gd.unplaced == []
    assert gd.runs["r1"].uid == "r1"
    assert gd.observe("event", _event("d1", 2)) == ("r1", [])   # late, not a new gap
    assert gd.runs["r1"].seen["primary"] == {1, 2, 3}
    assert gd.observe("event", _event("d1", 4)) == ("r1", [])   # the top is 3, not 2
    gd.observe("stop", _stop("r1", primary=4))
    assert gd.finish("r1") == []
    assert gd.missing("r1") == {}


def test_loss_of_the_last_event_is_found_at_stop():
    """Nothing after the lost event reveals it; only the stop's num_events does."""
    gd = GapDetector()
    _run(gd)
    for s in (1, 2):
        assert gd.observe("event", _event("d1", s))[1] == []
    gd.observe("stop", _stop("r1", primary=3))
    gaps = gd.finish("r1")
    assert [(g.run_uid, g.kind, g.stream, g.seq_nums) for g in gaps] == \
        [("r1", "missing_events", "primary", (3,))]
    assert gaps[0].detail == "run r1 stream 'primary': 1 of 3 events never arrived"
    assert gd.missing("r1") == {"primary": [3]}
    assert gd.runs["r1"].gaps == gaps


def test_jump_lists_only_numbers_not_seen_and_finish_supersedes():
    gd = GapDetector()
    _run(gd)
    _, gaps = gd.observe("event", _event("d1", 4))   # 1..3 lost so far
    assert [g.seq_nums for g in gaps] == [(1, 2, 3)]
    assert gd.observe("event", _event("d1", 2))[1] == []
    _, gaps = gd.observe("event", _event("d1", 7))   # 5, 6 lost; 2 and 4 were seen
    assert [g.seq_nums for g in gaps] == [(5, 6)]
    assert gd.observe("event", _event("d1", 5))[1] == []
    gd.observe("stop", _stop("r1", primary=8))
    assert [g.seq_nums for g in gd.finish("r1")] == [(1, 3, 6, 8)]
    assert gd.missing("r1") == {"primary": [1, 3, 6, 8]}


def test_event_pages_are_checked_row_by_row_in_seq_order():
    gd = GapDetector()
    _run(gd)
    page = {"uid": ["a", "b", "c"], "descriptor": "d1", "seq_num": [3, 1, 2]}
    assert gd.observe("event_page", page) == ("r1", [])   # sorted, so no jump
    _, gaps = gd.observe("event_page", {"uid": ["e"], "descriptor": "d1", "seq_num": [5]})
    assert [g.seq_nums for g in gaps] == [(4,)]
    assert gd.observe("event_page", {"descriptor": "d1"}) == ("r1", [])   # no rows
    gd.observe("stop", _stop("r1", primary=5))
    assert [g.seq_nums for g in gd.finish("r1")] == [(4,)]


def test_streams_are_tracked_separately_and_ignored_streams_not_at_all():
    gd = GapDetector(ignore_streams=["xsml_tags"])
    _run(gd)
    gd.observe("descriptor", {"uid": "d2", "run_start": "r1", "name": "baseline"})
    gd.observe("descriptor", {"uid": "d3", "run_start": "r1", "name": "xsml_tags"})
    gd.observe("event", _event("d1", 1))
    assert gd.observe("event", _event("d2", 2))[1][0].seq_nums == (1,)   # its own count
    assert gd.observe("event", _event("d3", 9)) == ("r1", [])              # ignored
    assert "xsml_tags" not in gd.runs["r1"].seen
    gd.observe("stop", _stop("r1", primary=2, baseline=2, xsml_tags=9, a_empty=0))
    # streams are checked in name order; an empty or ignored one does not end the check
    assert [(g.stream, g.seq_nums) for g in gd.finish("r1")] == \
        [("baseline", (1,)), ("primary", (2,))]
    assert gd.missing("r1") == {"baseline": [1], "primary": [2]}


def test_a_descriptor_without_start_is_a_missing_start_and_its_run_is_all_missing():
    gd = GapDetector()
    run, gaps = gd.observe("descriptor", {"uid": "d1", "run_start": "r9", "name": "primary"})
    assert run == "r9"
    assert [(g.run_uid, g.kind) for g in gaps] == [("r9", "missing_start")]
    assert "descriptor of run r9" in gaps[0].detail
    assert gd.runs["r9"].start_missing
    assert gd.runs["r9"].gaps == gaps and gd.unplaced == []   # filed under its run
    assert gd.observe("descriptor", {"uid": "d2", "run_start": "r9", "name": "b"})[1] == []
    gd.observe("event", _event("d1", 1))
    gd.observe("event", _event("d1", 2))
    assert gd.observe("stop", _stop("r9", primary=2))[1] == []
    assert gd.finish("r9") == []                      # every event arrived...
    assert gd.missing("r9") == {"primary": [1, 2]}    # ...but none could be tagged live


def test_a_stop_without_start_is_a_missing_start():
    gd = GapDetector()
    run, gaps = gd.observe("stop", _stop("r2", primary=2))
    assert run == "r2" and [g.kind for g in gaps] == ["missing_start"]
    assert "stop of run r2" in gaps[0].detail
    assert gd.runs["r2"].stop["num_events"] == {"primary": 2}
    gaps = gd.finish("r2")
    assert [(g.kind, g.stream, g.seq_nums) for g in gaps] == \
        [("missing_descriptor", "primary", (1, 2))]
    assert gaps[0].run_uid == "r2"
    assert gaps[0].detail == \
        "run r2: stream 'primary' has 2 events but its descriptor never arrived"
    assert gd.runs["r2"].gaps[-1] == gaps[0] and gd.unplaced == []
    assert gd.missing("r2") == {"primary": [1, 2]}


def test_lost_descriptor_makes_orphans_reported_once():
    gd = GapDetector()
    gd.observe("start", {"uid": "r1", "time": 0})
    run, gaps = gd.observe("event", _event("dX", 1))
    assert run is None
    assert [(g.run_uid, g.kind, g.seq_nums) for g in gaps] == [(None, "orphan_events", (1,))]
    assert gaps[0].detail == ("events of descriptor 'dX', which never arrived: their run "
                              "cannot be known until its stop or the catalog tells")
    assert gd.observe("event_page", {"descriptor": "dX", "seq_num": [2, 3]}) == (None, [])
    assert gd.orphans == {"dX": [1, 2, 3]}
    assert gd.unplaced == gaps
    gd.observe("descriptor", {"uid": "d2", "run_start": "r1", "name": "zz"})
    gd.observe("event", _event("d2", 2))
    gd.observe("stop", _stop("r1", primary=3, zz=2))
    # a stream without its descriptor does not end the check of the others
    assert [(g.kind, g.stream, g.seq_nums) for g in gd.finish("r1")] == \
        [("missing_descriptor", "primary", (1, 2, 3)), ("missing_events", "zz", (1,))]
    assert gd.missing("r1") == {"primary": [1, 2, 3], "zz": [1]}


def test_resources_place_datums_and_lost_ones_are_reported():
    gd = GapDetector()
    _run(gd)
    assert gd.observe("resource", {"uid": "res1", "run_start": "r1"}) == ("r1", [])
    assert gd.observe("datum", {"datum_id": "res1/0", "resource": "res1"}) == ("r1", [])
    assert gd.observe("datum_page", {"resource": "res1"}) == ("r1", [])
    assert gd.observe("stream_resource", {"uid": "sr1", "run_start": "r1"}) == ("r1", [])
    assert gd.observe("stream_datum", {"stream_resource": "sr1", "descriptor": "zz"}) == \
        ("r1", [])
    # a stream_datum whose resource is unknown is placed by its descriptor
    assert gd.observe("stream_datum", {"stream_resource": "??", "descriptor": "d1"}) == \
        ("r1", [])
    for name, key in (("datum", "resource"), ("datum_page", "resource"),
                      ("stream_datum", "stream_resource")):
        run, gaps = gd.observe(name, {key: "gone", "descriptor": "nope"})
        assert run is None
        assert [(g.run_uid, g.kind) for g in gaps] == [(None, "missing_resource")]
        assert f"a {name} refers to {key} 'gone'" in gaps[0].detail
    assert [g.kind for g in gd.unplaced] == ["missing_resource"] * 3
    assert gd.runs["r1"].gaps == []


def test_run_of_routes_every_document_kind():
    gd = GapDetector()
    _run(gd)
    gd.observe("resource", {"uid": "res1", "run_start": "r1"})
    assert gd.run_of("start", {"uid": "r1"}) == "r1"
    assert gd.run_of("descriptor", {"run_start": "r1"}) == "r1"
    assert gd.run_of("stop", {"run_start": "r1"}) == "r1"
    assert gd.run_of("event", {"descriptor": "d1"}) == "r1"
    assert gd.run_of("event_page", {"descriptor": "d1"}) == "r1"
    assert gd.run_of("event", {"descriptor": "d?"}) is None
    assert gd.run_of("resource", {"uid": "res1"}) == "r1"       # known from before
    assert gd.run_of("resource", {"uid": "new", "run_start": "r5"}) == "r5"
    assert gd.run_of("stream_resource", {"uid": "x"}) is None
    assert gd.run_of("datum", {"resource": "res1"}) == "r1"
    assert gd.run_of("datum_page", {"resource": "res1"}) == "r1"
    assert gd.run_of("bulk_events", {}) is None


def test_duplicate_start_keeps_the_first(caplog):
    gd = GapDetector()
    gd.observe("start", {"uid": "r1", "time": 0, "plan_name": "first"})
    with caplog.at_level(logging.WARNING, logger="bluesky_xsml.scaleout.gaps"):
        assert gd.observe("start", {"uid": "r1", "time": 1, "plan_name": "again"}) == ("r1", [])
    assert caplog.messages == ["start r1 received twice; keeping the first"]
    assert gd.runs["r1"].start["plan_name"] == "first"


def test_gaps_are_logged(caplog):
    gd = GapDetector()
    _run(gd)
    with caplog.at_level(logging.WARNING, logger="bluesky_xsml.scaleout.gaps"):
        gd.observe("event", _event("d1", 3))
    assert caplog.messages == \
        ["document bus gap: run r1 stream 'primary': seq_num jumped from 0 to 3"]


def test_finish_takes_the_stored_stop_and_needs_one():
    gd = GapDetector()
    _run(gd)
    gd.observe("event", _event("d1", 1))
    with pytest.raises(ValueError, match="run r1 has no stop yet; pass the stored one"):
        gd.finish("r1")
    with pytest.raises(ValueError, match="run r1 has no stop yet"):
        gd.missing("r1")
    with pytest.raises(ValueError, match="run nope has no stop yet"):
        gd.missing("nope")
    assert [g.seq_nums for g in gd.finish("r1", _stop("r1", primary=2))] == [(2,)]
    # a stop received on the bus wins over one passed later
    assert [g.seq_nums for g in gd.finish("r1", _stop("r1", primary=5))] == [(2,)]


def test_stale_runs_and_forget():
    gd = GapDetector()
    _run(gd)
    _run(gd, "r2", "d2")
    gd.observe("resource", {"uid": "res2", "run_start": "r2"})
    gd.observe("stop", _stop("r2", primary=0))
    t1 = gd.runs["r1"].last_seen
    assert gd.stale(10.0, now=t1 + 5) == []
    assert gd.stale(10.0, now=t1 + 10.0) == []          # strictly more than quiet
    assert gd.stale(10.0, now=t1 + 10.5) == ["r1"]      # r2 has its stop
    assert gd.stale(0.0, now=t1 - 1) == []
    gd.runs["r1"].last_seen = -1.0
    gd.observe("event", _event("d1", 1))
    assert gd.runs["r1"].last_seen > 0                    # any document of the run renews it
    gd.observe("resource", {"uid": "res9", "run_start": "r-unknown"})   # no track: no error
    assert "r-unknown" not in gd.runs
    assert gd.stale(10.0, now=gd.runs["r1"].last_seen + 5) == []
    assert gd.stale(1e9) == []                           # default now: the monotonic clock
    gd.forget("r2")
    assert "r2" not in gd.runs
    assert gd.run_of("event", {"descriptor": "d2"}) is None
    assert gd.run_of("datum", {"resource": "res2"}) is None
    assert gd.run_of("event", {"descriptor": "d1"}) == "r1"   # others untouched
    gd.forget("never-seen")                                    # no error


def test_gap_to_dict():
    g = Gap("r1", "missing_events", "primary", (2, 4), "lost")
    assert g.to_dict() == {"run_uid": "r1", "kind": "missing_events", "stream": "primary",
                           "seq_nums": [2, 4], "detail": "lost"}
    assert Gap(None, "missing_stop").to_dict()["seq_nums"] == []


def test_a_stream_with_a_descriptor_but_no_events_lost_them_all():
    gd = GapDetector()
    _run(gd)
    gd.observe("descriptor", {"uid": "d2", "run_start": "r1"})   # no name: "primary"
    assert gd.runs["r1"].descriptors["d2"] == "primary"
    gd.observe("descriptor", {"uid": "d3", "run_start": "r1", "name": "baseline"})
    gd.observe("stop", _stop("r1", baseline=2))
    assert [(g.kind, g.stream, g.seq_nums) for g in gd.finish("r1")] == \
        [("missing_events", "baseline", (1, 2))]
    assert gd.missing("r1") == {"baseline": [1, 2]}
