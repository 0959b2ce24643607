"""Per-run routing (``documents.routing.RunRouter``) and the callback's per-run state."""

from __future__ import annotations

import time

import event_model
import numpy as np
from event_model import DocumentRouter

from bluesky_xsml.documents.routing import RunRouter

from .conftest import DocumentRecorder, validate_all


class Keeper(DocumentRouter):
    """A per-run object that keeps what it was given."""

    def __init__(self, start):
        super().__init__()
        self.uid = start["uid"]
        self.got: list[tuple[str, dict]] = []

    def __call__(self, name, doc, validate=False):
        self.got.append((name, doc))
        return super().__call__(name, doc, validate)

    def names(self):
        return [n for n, _ in self.got]


def _router():
    runs: dict[str, Keeper] = {}
    unrouted: list[tuple[str, str, str | None]] = []

    def factory(name, start):
        runs[start["uid"]] = Keeper(start)
        return [runs[start["uid"]]], []

    router = RunRouter([factory], on_unrouted=lambda n, d, why, run: unrouted.append(
        (n, why, run)))
    return router, runs, unrouted


def _two_runs():
    a, b = event_model.compose_run(), event_model.compose_run()
    keys = {"cam": {"dtype": "array", "shape": [4, 4], "source": "sim", "external": "STREAM:"}}
    da = a.compose_descriptor(name="primary", data_keys=keys)
    db = b.compose_descriptor(name="primary", data_keys=keys)
    return a, b, da, db


def test_interleaved_runs_reach_only_their_own_router():
    router, runs, unrouted = _router()
    a, b, da, db = _two_runs()
    router("start", a.start_doc)
    router("start", b.start_doc)
    router("descriptor", db.descriptor_doc)
    router("descriptor", da.descriptor_doc)
    ev_a = [da.compose_event(data={"cam": 1}, timestamps={"cam": 0}, seq_num=i) for i in (1, 2)]
    ev_b = [db.compose_event(data={"cam": 2}, timestamps={"cam": 0}, seq_num=i) for i in (1, 2)]
    for ea, eb in zip(ev_a, ev_b, strict=True):   # same stream, same seq_nums, interleaved
        router("event", eb)
        router("event", ea)
    res_a = a.compose_resource(spec="AD_HDF5", root="/", resource_path="a.h5",
                               resource_kwargs={})
    res_b = b.compose_resource(spec="AD_HDF5", root="/", resource_path="b.h5",
                               resource_kwargs={})
    router("resource", res_b.resource_doc)
    router("resource", res_a.resource_doc)
    router("datum", res_a.compose_datum(datum_kwargs={"point_number": 0}))
    router("datum", res_b.compose_datum(datum_kwargs={"point_number": 0}))
    sres_a = a.compose_stream_resource(mimetype="application/x-hdf5", uri="file://localhost/a.h5",
                                       data_key="cam", parameters={})
    router("stream_resource", sres_a.stream_resource_doc)
    router("stream_datum", sres_a.compose_stream_datum(
        indices={"start": 0, "stop": 2}, seq_nums={"start": 1, "stop": 3},
        descriptor=da.descriptor_doc))
    router("stop", b.compose_stop())
    router("stop", a.compose_stop())
    assert unrouted == []
    ra, rb = runs[a.start_doc["uid"]], runs[b.start_doc["uid"]]
    for keeper, run, desc, events, res in ((ra, a, da, ev_a, res_a), (rb, b, db, ev_b, res_b)):
        assert keeper.got[0] == ("start", run.start_doc)
        assert keeper.names()[-1] == "stop"
        assert all(d.get("run_start", run.start_doc["uid"]) == run.start_doc["uid"]
                   for n, d in keeper.got if n in ("descriptor", "stop", "resource"))
        pages = [d for n, d in keeper.got if n == "event_page"]
        assert [p["uid"][0] for p in pages] == [e["uid"] for e in events]
        assert {p["descriptor"] for p in pages} == {desc.descriptor_doc["uid"]}
        datums = [d for n, d in keeper.got if n == "datum_page"]
        assert [d["resource"] for d in datums] == [res.resource_doc["uid"]]
    assert "stream_resource" in ra.names() and "stream_datum" in ra.names()
    assert "stream_resource" not in rb.names() and "stream_datum" not in rb.names()


def test_unroutable_documents_are_reported_not_raised():
    router, runs, unrouted = _router()
    a, b, da, _ = _two_runs()
    router("descriptor", da.descriptor_doc)                       # before its start
    router("event", da.compose_event(data={"cam": 1}, timestamps={"cam": 0}, seq_num=1))
    router("stop", a.compose_stop())                              # never started
    res = a.compose_resource(spec="AD_HDF5", root="/", resource_path="a.h5", resource_kwargs={})
    router("resource", res.resource_doc)
    router("datum", res.compose_datum(datum_kwargs={"point_number": 0}))
    sres = a.compose_stream_resource(mimetype="application/x-hdf5", uri="file://localhost/a.h5",
                                     data_key="cam", parameters={})
    router("stream_resource", sres.stream_resource_doc)
    router("stream_datum", sres.compose_stream_datum(
        indices={"start": 0, "stop": 1}, seq_nums={"start": 1, "stop": 2},
        descriptor=da.descriptor_doc))
    router("start", b.start_doc)
    router("start", b.start_doc)                                   # twice
    assert runs.keys() == {b.start_doc["uid"]}
    assert runs[b.start_doc["uid"]].names() == ["start"]
    assert [why for _, why, _ in unrouted] == [
        "descriptor for unknown run", "event for unknown descriptor", "stop for unknown run",
        "resource for unknown run", "datum for unknown resource",
        "stream_resource for unknown run", "stream_datum for unknown stream_resource",
        "start seen twice"]


def test_a_stopped_run_is_forgotten_and_a_late_event_named():
    router, _, unrouted = _router()
    a, _, da, _ = _two_runs()
    router("start", a.start_doc)
    router("descriptor", da.descriptor_doc)
    res = a.compose_resource(spec="AD_HDF5", root="/", resource_path="a.h5", resource_kwargs={})
    router("resource", res.resource_doc)
    sres = a.compose_stream_resource(mimetype="application/x-hdf5", uri="file://localhost/a.h5",
                                     data_key="cam", parameters={})
    router("stream_resource", sres.stream_resource_doc)
    router("stop", a.compose_stop())
    router("event", da.compose_event(data={"cam": 1}, timestamps={"cam": 0}, seq_num=9))
    assert unrouted == [("event_page", "event after stop", a.start_doc["uid"])]
    assert not router.is_open(a.start_doc["uid"]) and router.open_runs == []
    # nothing of the run is kept (event-model 1.24 keeps its resource uids)
    assert router._resources == {} and router._stream_resources == {}
    assert router._descriptor_to_start == {} and router._fillers == {}


def test_resource_without_run_start_goes_to_every_open_run():
    router, runs, unrouted = _router()
    a, b, _, _ = _two_runs()
    router("start", a.start_doc)
    router("start", b.start_doc)
    old = {"uid": "r-old", "spec": "AD_HDF5", "root": "/", "resource_path": "x.h5",
           "resource_kwargs": {}, "path_semantics": "posix"}
    router("resource", old)
    router("datum", {"datum_id": "r-old/0", "resource": "r-old", "datum_kwargs": {}})
    for keeper in runs.values():
        assert keeper.names() == ["start", "resource", "datum_page"]
    assert unrouted == []


# --------------------------------------------------- the callback's per-run state
def _run(n, value):
    run = event_model.compose_run(metadata={"motors": ["x"]})
    desc = run.compose_descriptor(name="primary", data_keys={
        "cam": {"dtype": "array", "shape": [32, 32], "source": "sim"},
        "x": {"dtype": "number", "shape": [], "source": "sim", "object_name": "x"}})
    events = [desc.compose_event(data={"cam": np.full((32, 32), value, np.uint32),
                                       "x": 10.0 * value + i},
                                 timestamps={"cam": time.time(), "x": time.time()}, seq_num=i + 1)
              for i in range(n)]
    return run, desc, events


def test_callback_keeps_interleaved_runs_apart(tagger):
    """Two runs at once, same stream and seq_nums: each run's tags, summary, index its own."""
    from bluesky_xsml import TaggingCallback

    rec = DocumentRecorder()
    xsml = TaggingCallback(tagger, downstream=[rec], validate_pages=True, index_min_prob=0.0)
    run_a, desc_a, ev_a = _run(3, 1)
    run_b, desc_b, ev_b = _run(5, 7)
    xsml("start", run_a.start_doc)
    xsml("start", run_b.start_doc)
    xsml("descriptor", desc_b.descriptor_doc)
    xsml("descriptor", desc_a.descriptor_doc)
    for i in range(5):
        xsml("event", ev_b[i])
        if i < 3:
            xsml("event", ev_a[i])
    xsml("stop", run_b.compose_stop())
    xsml("stop", run_a.compose_stop())
    assert xsml.flush(60)
    status = xsml.status()
    xsml.close()
    assert status["document_errors"] == {} and status["open_runs"] == 0
    validate_all(rec.docs)
    tag_desc = {d["run_start"]: d["uid"] for d in rec.of("descriptor") if d["name"] == "xsml_tags"}
    assert len(tag_desc) == 2
    for run, events in ((run_a, ev_a), (run_b, ev_b)):
        uid = run.start_doc["uid"]
        pages = [p for p in rec.of("event_page") if p["descriptor"] == tag_desc[uid]]
        sources = [s for p in pages for s in p["data"]["source_uid"]]
        assert sorted(sources) == sorted(e["uid"] for e in events)   # never the other run's
        stop = next(s for s in rec.of("stop") if s["run_start"] == uid)
        assert stop["xsml_frames"] == len(events)
        index = stop["xsml_index"]
        assert index["complete"] and sorted(index["frames"]["seq_num"]) == [
            e["seq_num"] for e in events]
        # the motor positions of each indexed frame are those of its own run's event
        where = {e["seq_num"]: e["data"]["x"] for e in events}
        assert [where[q] for q in index["frames"]["seq_num"]] == index["positions"]["x"]
