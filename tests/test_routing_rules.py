"""Each routing rule of ``documents.routing.RunRouter`` with exactly what it reports.

``tests/test_routing.py`` checks that runs are kept apart and that nothing unroutable
raises; here every ``on_unrouted`` call is compared whole (document name, the document
itself, reason, run uid), and the rules around old-style resources, documents passed
through unfilled, what a stop forgets and the memory of stopped runs are each pinned.
"""

from __future__ import annotations

import logging

import event_model
import pytest

from bluesky_xsml.documents.routing import RunRouter

from .test_routing import Keeper, _two_runs


def _router(**kwargs):
    runs: dict[str, Keeper] = {}
    unrouted: list[tuple] = []

    def factory(name, start):
        runs[start["uid"]] = Keeper(start)
        return [runs[start["uid"]]], []

    router = RunRouter([factory], on_unrouted=lambda *args: unrouted.append(args), **kwargs)
    return router, runs, unrouted


def _event(desc, seq=1):
    return desc.compose_event(data={"cam": 1}, timestamps={"cam": 0}, seq_num=seq)


def test_each_unroutable_document_is_reported_whole():
    router, _, unrouted = _router()
    a, b, da, _ = _two_runs()
    ua, ub = a.start_doc["uid"], b.start_doc["uid"]
    stop = a.compose_stop()
    res = a.compose_resource(spec="AD_HDF5", root="/", resource_path="a.h5", resource_kwargs={})
    datum = res.compose_datum(datum_kwargs={"point_number": 0})
    sres = a.compose_stream_resource(mimetype="application/x-hdf5", uri="file://localhost/a.h5",
                                     data_key="cam", parameters={})
    sdatum = sres.compose_stream_datum(indices={"start": 0, "stop": 1},
                                       seq_nums={"start": 1, "stop": 2},
                                       descriptor=da.descriptor_doc)
    event = _event(da)
    router("descriptor", da.descriptor_doc)
    router("event", event)
    router("stop", stop)
    router("resource", res.resource_doc)
    router("datum", datum)
    router("stream_resource", sres.stream_resource_doc)
    router("stream_datum", sdatum)
    router("start", b.start_doc)
    router("start", b.start_doc)
    assert unrouted == [
        ("descriptor", da.descriptor_doc, "descriptor for unknown run", ua),
        ("event_page", event_model.pack_event_page(event), "event for unknown descriptor",
         None),
        ("stop", stop, "stop for unknown run", ua),
        ("resource", res.resource_doc, "resource for unknown run", ua),
        ("datum_page", event_model.pack_datum_page(datum), "datum for unknown resource", None),
        ("stream_resource", sres.stream_resource_doc, "stream_resource for unknown run", ua),
        ("stream_datum", sdatum, "stream_datum for unknown stream_resource", None),
        ("start", b.start_doc, "start seen twice", ub),
    ]


def test_an_old_resource_with_no_run_open_is_reported():
    router, runs, unrouted = _router()
    old = {"uid": "r-old", "spec": "AD_HDF5", "root": "/", "resource_path": "x.h5",
           "resource_kwargs": {}, "path_semantics": "posix"}
    router("resource", old)
    assert unrouted == [("resource", old, "resource for unknown run", None)]
    assert runs == {}


def test_a_resource_whose_run_start_is_none_goes_to_every_open_run_without_the_key():
    router, runs, unrouted = _router()
    a, b, _, _ = _two_runs()
    router("start", a.start_doc)
    router("start", b.start_doc)
    old = {"uid": "r-old", "spec": "AD_HDF5", "root": "/", "resource_path": "x.h5",
           "resource_kwargs": {}, "path_semantics": "posix", "run_start": None}
    router("resource", old)
    want = {k: v for k, v in old.items() if k != "run_start"}
    for keeper in runs.values():
        assert keeper.got[1] == ("resource", want)
    assert unrouted == [] and old["run_start"] is None     # the caller's document untouched


def test_external_data_passes_through_unfilled():
    """Events keep their datum ids, even one whose datum never came (a filling router
    raises ``UnresolvableForeignKeyError`` there): the per-run objects read the files."""
    router, runs, unrouted = _router()
    run = event_model.compose_run()
    res = run.compose_resource(spec="NO_SUCH_SPEC", root="/", resource_path="a.h5",
                               resource_kwargs={})
    datum = res.compose_datum(datum_kwargs={"point_number": 0})
    desc = run.compose_descriptor(name="primary", data_keys={
        "cam": {"dtype": "array", "shape": [4, 4], "source": "sim", "external": "FILESTORE:"}})
    event = desc.compose_event(data={"cam": datum["datum_id"]}, timestamps={"cam": 0},
                               seq_num=1, filled={"cam": False})
    lost = desc.compose_event(data={"cam": "never-sent/0"}, timestamps={"cam": 0},
                              seq_num=2, filled={"cam": False})
    for name, doc in (("start", run.start_doc), ("resource", res.resource_doc),
                      ("datum", datum), ("descriptor", desc.descriptor_doc), ("event", event),
                      ("event", lost)):
        router(name, doc)
    router("stop", run.compose_stop())
    keeper = runs[run.start_doc["uid"]]
    pages = [d for n, d in keeper.got if n == "event_page"]
    assert [p["data"]["cam"] for p in pages] == [[datum["datum_id"]], ["never-sent/0"]]
    assert all(p["filled"]["cam"] == [False] for p in pages)
    assert unrouted == []


def test_a_run_without_descriptors_stops_and_is_forgotten():
    router, runs, unrouted = _router()
    a, _, _, _ = _two_runs()
    router("start", a.start_doc)
    router("stop", a.compose_stop())
    assert runs[a.start_doc["uid"]].names() == ["start", "stop"]
    assert router.open_runs == [] and unrouted == []


def test_a_stop_forgets_the_runs_descriptors_everywhere():
    router, _, _ = _router()
    a, _, da, _ = _two_runs()
    ua, du = a.start_doc["uid"], da.descriptor_doc["uid"]
    router("start", a.start_doc)
    router("descriptor", da.descriptor_doc)
    router("event", _event(da))
    assert router.run_of_descriptor(du) == ua and router.is_open(ua)
    router("stop", a.compose_stop())
    assert router.run_of_descriptor(du) is None and not router.is_open(ua)
    assert router.run_of_descriptor(None) is None and not router.is_open(None)
    assert router._factory_cbs_by_descriptor == {}
    assert router._subfactory_cbs_by_descriptor == {}
    assert router._start_to_descriptors == {} and router._factory_cbs_by_start == {}


def test_stopped_runs_are_remembered_up_to_the_bound_newest_kept():
    router, _, unrouted = _router(remember_stopped=2)
    runs = [event_model.compose_run() for _ in range(3)]
    descs = []
    for run in runs:
        desc = run.compose_descriptor(name="primary", data_keys={
            "cam": {"dtype": "number", "shape": [], "source": "sim"}})
        descs.append(desc)
        router("start", run.start_doc)
        router("descriptor", desc.descriptor_doc)
        router("stop", run.compose_stop())
    for desc in descs:
        router("event", _event(desc, 9))
    pages = [event_model.pack_event_page(_event(d, 9)) for d in descs]
    assert [(n, d["descriptor"], why, uid) for n, d, why, uid in unrouted] == [
        ("event_page", p["descriptor"], why, uid) for p, why, uid in zip(pages, [
            "event for unknown descriptor", "event after stop", "event after stop"],
            [None, runs[1].start_doc["uid"], runs[2].start_doc["uid"]], strict=True)]


def test_a_stop_whose_callback_raises_still_forgets_everything():
    """Beyond test_routing's check of the same case: after an event, every per-run table
    is emptied and the stopped descriptor remembered."""
    class Broken(Keeper):
        def stop(self, doc):
            raise RuntimeError("boom")

    router = RunRouter([lambda name, start: ([Broken(start)], [])])
    a, _, da, _ = _two_runs()
    router("start", a.start_doc)
    router("descriptor", da.descriptor_doc)
    router("event", _event(da))
    with pytest.raises(RuntimeError):
        router("stop", a.compose_stop())
    assert router.open_runs == [] and router._descriptor_to_start == {}
    assert router._factory_cbs_by_descriptor == {}
    assert router._subfactory_cbs_by_descriptor == {}
    assert router._stopped == {da.descriptor_doc["uid"]: a.start_doc["uid"]}


def test_without_on_unrouted_it_is_logged_at_debug(caplog):
    router = RunRouter([lambda name, start: ([Keeper(start)], [])])
    a, _, da, _ = _two_runs()
    with caplog.at_level(logging.DEBUG, logger="bluesky_xsml.documents.routing"):
        router("descriptor", da.descriptor_doc)
    assert [r.getMessage() for r in caplog.records] == [
        f"descriptor for unknown run (descriptor document, run {a.start_doc['uid']}) not routed"]
    assert all(r.levelno == logging.DEBUG for r in caplog.records)
