"""Round trip through a real catalog: RunEngine -> TaggingCallback -> Tiled -> client.

The writer is bluesky-tiled-plugins' ``TiledWriter`` on an embedded
``SimpleTiledServer`` (SQLite catalog + DuckDB tables + zarr arrays in a temp
directory). Everything is read back through the Tiled HTTP client, the way a
user would, and compared with the documents the callback emitted (captured by
a second downstream recorder). The last test uses ``databroker.v2.temp()``
(mongomock) instead.

Needs the ``catalog`` extra (tiled[server,client], bluesky-tiled-plugins,
databroker[server]); skipped cleanly when it is not installed.
"""

from __future__ import annotations

import contextlib
import types

import numpy as np
import pytest

pytest.importorskip("tiled.server", reason="needs tiled[server,client]")
pytest.importorskip("tiled.client", reason="needs tiled[server,client]")
pytest.importorskip("bluesky_tiled_plugins", reason="needs bluesky-tiled-plugins")

from bluesky.plans import count, scan
from ophyd.sim import det, motor

from bluesky_xsml import TaggingCallback
from bluesky_xsml.tags import TAG_NAMES

from .conftest import DocumentRecorder, assert_probs_match, make_image_detector

STRING_KEYS = ("source_stream", "source_uid", "source_key", "tags", "skip_reason", "checkpoint")


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tagger(distinct_tagger):
    """Tags whose probabilities are far apart, so a column mix-up cannot round-trip unseen."""
    return distinct_tagger


@pytest.fixture(scope="module")
def tiled_catalog(tmp_path_factory):
    """An embedded Tiled server with one CatalogOfBlueskyRuns container.

    The server object must stay referenced: it stops when garbage-collected.
    ``data`` is a directory the server may read external (HDF5) files from.
    """
    from tiled.client import from_uri
    from tiled.server import SimpleTiledServer

    data = tmp_path_factory.mktemp("detector_files")
    server = SimpleTiledServer(tmp_path_factory.mktemp("tiled"), readable_storage=[data])
    try:
        client = from_uri(server.uri)
        catalog = client.create_container("raw", specs=["CatalogOfBlueskyRuns"])
        yield types.SimpleNamespace(server=server, client=client, catalog=catalog, data=data)
    finally:
        server.close()


def run_into_tiled(RE, tagger, catalog, plan, **callback_kwargs):
    """Run ``plan`` through TaggingCallback -> [TiledWriter, recorder]; return (run, recorder)."""
    from bluesky_tiled_plugins import TiledWriter

    rec = DocumentRecorder()
    writer = TiledWriter(catalog, batch_size=1, max_array_size=0)
    xsml = TaggingCallback(tagger, downstream=[writer, rec], **callback_kwargs)
    token = RE.subscribe(xsml)
    try:
        (uid,) = RE(plan)
        # the writer runs on the callback's delivery thread: wait for it
        assert xsml.flush(60), "tagging/delivery did not finish"
        status = xsml.status()
    finally:
        RE.unsubscribe(token)
        xsml.close(10)
    # a writer failure is logged and counted, never raised: make it loud here
    assert status["downstream_errors"] == 0, status
    assert status["document_errors"] == {}, status
    return catalog[uid], rec


def emitted_by_frame(rec):
    """Emitted tag events keyed by (source_key, source_seq_num, frame_index)."""
    return {(e["data"]["source_key"], e["data"]["source_seq_num"], e["data"]["frame_index"]):
            e["data"] for e in rec.tag_events()}


def read_back_by_frame(ds):
    """Rows of the read-back tag stream keyed like :func:`emitted_by_frame`."""
    keys = zip(ds["source_key"].values, ds["source_seq_num"].values, ds["frame_index"].values,
               strict=True)
    return {(str(k), int(s), int(i)): row for row, (k, s, i) in enumerate(keys)}


def assert_stream_matches_emitted(ds, rec):
    """Every emitted tag event is stored once, with the same values."""
    emitted = emitted_by_frame(rec)
    stored = read_back_by_frame(ds)
    assert ds.sizes["time"] == len(emitted) == len(stored)
    assert set(stored) == set(emitted)
    for tag in TAG_NAMES:
        values = ds[tag].values
        assert values.dtype.kind == "f", (tag, values.dtype)  # numbers, not strings
        got = np.array([values[stored[k]] for k in emitted], dtype=np.float64)
        want = np.array([emitted[k][tag] for k in emitted], dtype=np.float64)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
        np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))
    for key in STRING_KEYS:
        values = ds[key].values
        assert [str(values[stored[k]]) for k in emitted] == [emitted[k][key] for k in emitted], key
    for key in ("source_seq_num", "frame_index"):
        assert ds[key].values.dtype.kind in "iu", (key, ds[key].values.dtype)
    assert ds["latency"].values.dtype.kind == "f"
    np.testing.assert_allclose([ds["latency"].values[stored[k]] for k in emitted],
                               [emitted[k]["latency"] for k in emitted], rtol=1e-9)


SUMMARY_KEYS = ("xsml_stream", "xsml_tags", "xsml_tag_counts", "xsml_model", "xsml_models",
                "xsml_frames", "xsml_skipped", "num_events")


def assert_stop_matches_emitted(run, rec):
    stored = run.metadata["stop"]
    emitted = rec.of("stop")[-1]
    for key in SUMMARY_KEYS:
        assert stored[key] == emitted[key], key
    return stored


@pytest.fixture(scope="module")
def inline_run(tiled_catalog, tagger):
    """One scan of a 2-D inline image detector (plus a scalar), stored in Tiled."""
    from bluesky import RunEngine

    RE = RunEngine({}, call_returns_result=False)
    rng = np.random.default_rng(11)

    def frame():
        return rng.poisson(rng.uniform(1, 30), (96, 120)).astype(np.uint32)

    img = make_image_detector(func=frame)
    run, rec = run_into_tiled(RE, tagger, tiled_catalog.catalog, scan([img, det], motor, 0, 1, 6))
    return types.SimpleNamespace(run=run, rec=rec, uid=rec.of("start")[0]["uid"])


# --------------------------------------------------------------------- tests
def test_tag_stream_round_trips_through_tiled(inline_run, tagger):
    run, rec = inline_run.run, inline_run.rec
    assert {"primary", "xsml_tags"} <= set(run)
    ds = run["xsml_tags"].read()
    assert_stream_matches_emitted(ds, rec)
    assert ds.sizes["time"] == 6  # one tag event per source frame
    assert set(ds["source_stream"].values) == {"primary"}
    assert set(ds["source_key"].values) == {"img"}
    assert set(ds["skip_reason"].values) == {""}
    assert set(ds["checkpoint"].values) == {tagger.checkpoint_id}

    # the stored descriptor keeps the per-tag thresholds and the model configuration
    meta = run["xsml_tags"].metadata
    assert meta["data_keys"][TAG_NAMES[0]]["threshold"] == pytest.approx(0.5)
    assert meta["configuration"]["xsml"]["data"]["checkpoint_id"] == tagger.checkpoint_id

    stop = assert_stop_matches_emitted(run, rec)
    assert stop["num_events"] == {"primary": 6, "xsml_tags": 6}
    assert stop["xsml_frames"] == 6 and stop["xsml_skipped"] == {}
    assert stop["xsml_model"] == tagger.checkpoint_id
    tags_per_frame = [set(filter(None, t.split(","))) for t in ds["tags"].values]
    assert stop["xsml_tag_counts"] == {
        t: n for t in TAG_NAMES if (n := sum(t in s for s in tags_per_frame))}
    assert stop["xsml_tags"] == sorted(stop["xsml_tag_counts"])


def test_tag_rows_link_to_the_stored_primary_frames(inline_run, tagger):
    run, rec = inline_run.run, inline_run.rec
    tags = run["xsml_tags"].read()
    primary = run["primary"]
    seq_nums = [int(s) for s in primary["seq_num"].read()]
    assert sorted(int(s) for s in tags["source_seq_num"].values) == sorted(seq_nums) \
        == list(range(1, 7))
    # Tiled stores no event uids; the recorder has them: source_uid is the event's uid
    uid_of = {e["seq_num"]: e["uid"] for e in rec.of("event")}
    assert [uid_of[int(s)] for s in tags["source_seq_num"].values] == \
        [str(u) for u in tags["source_uid"].values]

    # the 2-D inline frames are stored as arrays (max_array_size=0) and are the tagged ones
    images = primary["img"].read()
    assert images.shape == (6, 96, 120)
    order = np.argsort(seq_nums)
    frame_of = {e["seq_num"]: e["data"]["img"] for e in rec.of("event")}  # what the RE emitted
    for seq in tags["source_seq_num"].values:
        np.testing.assert_array_equal(images[order[int(seq) - 1]], frame_of[int(seq)])
    stored_frames = [images[order[int(s) - 1]] for s in tags["source_seq_num"].values]
    expected = tagger.predict(stored_frames)
    got = np.stack([tags[t].values for t in TAG_NAMES], axis=1)
    assert_probs_match(got, expected)


def test_search_runs_by_tag(inline_run, tiled_catalog):
    from tiled.queries import Contains, Key

    catalog = tiled_catalog.catalog
    uid = inline_run.uid
    stop = inline_run.run.metadata["stop"]
    counts = stop["xsml_tag_counts"]
    assert counts, "the untrained tagger should put some tag above 0.5"
    present = stop["xsml_tags"][0]
    k = counts[present]
    lacking = [t for t in TAG_NAMES if t not in counts]
    assert lacking, "the untrained tagger should leave some tag below 0.5"

    def found(*queries):
        node = catalog
        for q in queries:
            node = node.search(q)
        return uid in set(node)

    assert found(Contains("stop.xsml_tags", present))
    assert found(Key(f"stop.xsml_tag_counts.{present}") >= k)
    assert found(Contains("stop.xsml_tags", present), Key(f"stop.xsml_tag_counts.{present}") >= 1)
    assert found(Key("stop.xsml_frames") == 6)
    assert not found(Key(f"stop.xsml_tag_counts.{present}") >= k + 1)
    for tag in lacking:
        assert not found(Contains("stop.xsml_tags", tag)), tag
        assert not found(Key(f"stop.xsml_tag_counts.{tag}") >= 1), tag


def test_skipped_frames_round_trip_as_nan(RE, tagger, tiled_catalog):
    """Frames the model cannot tag carry NaN probabilities and a reason; both survive."""
    kinds = [np.zeros((4, 4)), np.random.default_rng(2).poisson(5, (64, 64)).astype(np.uint16)]
    calls = iter(range(100))
    img = make_image_detector(func=lambda: kinds[next(calls) % 2])
    run, rec = run_into_tiled(RE, tagger, tiled_catalog.catalog, count([img], 4),
                              image_keys=["img"])
    ds = run["xsml_tags"].read()
    assert_stream_matches_emitted(ds, rec)  # NaN where NaN was emitted, values elsewhere
    skipped = np.array([bool(r) for r in ds["skip_reason"].values])
    assert skipped.sum() == 2
    probs = np.stack([ds[t].values for t in TAG_NAMES], axis=1)
    assert np.isnan(probs[skipped]).all() and np.isfinite(probs[~skipped]).all()
    assert all(str(r).startswith("bad_shape") for r in ds["skip_reason"].values[skipped])
    assert set(ds["tags"].values[skipped]) == {""}
    stop = assert_stop_matches_emitted(run, rec)
    assert stop["xsml_skipped"] == {"bad_shape": 2} and stop["xsml_frames"] == 4


def test_inline_and_external_hdf5_frames_in_one_run(RE, tagger, tiled_catalog):
    """2-D inline images, AD_HDF5 resource/datum and ophyd-async stream_resource frames."""
    from ophyd_async.core import init_devices

    from bluesky_xsml.sim.detectors import HDF5ResourceDetector, StreamResourceDetector

    rng = np.random.default_rng(5)

    def source():
        return rng.poisson(rng.uniform(1, 20), (72, 90)).astype(np.uint32)

    ad = HDF5ResourceDetector("ad", source, tiled_catalog.data)
    with init_devices():
        sd = StreamResourceDetector(source, tiled_catalog.data, name="sd")
    img = make_image_detector(shape=(64, 80), seed=3)
    run, rec = run_into_tiled(RE, tagger, tiled_catalog.catalog, count([img, ad, sd], 3))
    ds = run["xsml_tags"].read()
    assert_stream_matches_emitted(ds, rec)
    assert set(read_back_by_frame(ds)) == {(k, s, 0) for k in ("img", "ad_image", "sd")
                                           for s in (1, 2, 3)}
    assert set(ds["skip_reason"].values) == {""}
    uid_of = {e["seq_num"]: e["uid"] for e in rec.of("event")}
    assert [uid_of[int(s)] for s in ds["source_seq_num"].values] == \
        [str(u) for u in ds["source_uid"].values]
    stop = assert_stop_matches_emitted(run, rec)
    assert stop["num_events"] == {"primary": 3, "xsml_tags": 9} and stop["xsml_frames"] == 9

    # Tiled serves the external frames from the HDF5 files; they are the ones tagged
    primary = run["primary"]
    stored = {"img": primary["img"].read(), "ad_image": primary["ad_image"].read()[:, 0],
              "sd": primary["sd"].read()[:, 0]}
    assert stored["ad_image"].shape == stored["sd"].shape == (3, 72, 90)
    for key, frames in stored.items():
        rows = [row for (k, s, _), row in sorted(read_back_by_frame(ds).items()) if k == key]
        got = np.stack([[ds[t].values[r] for t in TAG_NAMES] for r in rows])
        assert_probs_match(got, tagger.predict(list(frames)))


def test_databroker_temp_stores_the_tag_stream(RE, tagger):
    """databroker.v2.temp() (mongomock): the tag stream is stored and readable.

    Its Mongo adapter cannot search stop keys (queries on ``stop.*`` return
    nothing), so search runs by tag on a Tiled SQL catalog instead.
    """
    pytest.importorskip("mongomock", reason="needs databroker[server] (mongomock)")
    pytest.importorskip("databroker.mongo_normalized", reason="needs databroker[server]")
    import databroker.v2
    from tiled.queries import Key

    catalog = databroker.v2.temp()
    rec = DocumentRecorder()
    # post_document is what catalog.v1.insert wraps (v1 needs databroker[back-compat])
    xsml = TaggingCallback(tagger, downstream=[catalog.post_document, rec])
    token = RE.subscribe(xsml)
    try:
        (uid,) = RE(count([make_image_detector(shape=(64, 64), seed=7)], 3))
        assert xsml.flush(60)
        assert xsml.status()["downstream_errors"] == 0
    finally:
        RE.unsubscribe(token)
        xsml.close(10)
    run = catalog[uid]
    assert {"primary", "xsml_tags"} <= set(run)
    ds = run["xsml_tags"].read()
    # the adapter casts to the declared dtype_numpy ("<f4"), so compare at float32 precision
    emitted = emitted_by_frame(rec)
    stored = read_back_by_frame(ds)
    assert set(stored) == set(emitted) and ds.sizes["time"] == 3
    for tag in TAG_NAMES:
        assert ds[tag].values.dtype.kind == "f"
        np.testing.assert_array_equal(
            np.array([ds[tag].values[stored[k]] for k in emitted], dtype=np.float32),
            np.array([emitted[k][tag] for k in emitted], dtype=np.float32))
    assert [str(ds["source_uid"].values[stored[k]]) for k in emitted] == \
        [emitted[k]["source_uid"] for k in emitted]
    stop = run.metadata["stop"]
    assert stop["xsml_tag_counts"] == rec.of("stop")[0]["xsml_tag_counts"]
    assert stop["xsml_frames"] == 3 and stop["num_events"]["xsml_tags"] == 3
    assert uid in set(catalog.search(Key("start.uid") == uid))  # start keys are searchable


@contextlib.contextmanager
def _table_requests(run):
    """A list that fills with the URL of every table read through ``run``'s HTTP client."""
    seen: list[str] = []

    def hook(request):
        if "/table/" in str(request.url):
            seen.append(str(request.url))

    client = run.context.http_client
    client.event_hooks = {**client.event_hooks,
                          "request": [*client.event_hooks["request"], hook]}
    try:
        yield seen
    finally:
        client.event_hooks = {**client.event_hooks,
                              "request": [h for h in client.event_hooks["request"]
                                          if h is not hook]}


def test_frame_queries_answer_from_the_stop_index_with_the_same_rows(RE, tagger,
                                                                     tiled_catalog):
    """The live callback's ``xsml_index`` gives find_frames the rows the streams give."""
    import pandas as pd

    from bluesky_xsml.query import find_frames

    img = make_image_detector(seed=5)
    run, rec = run_into_tiled(RE, tagger, tiled_catalog.catalog,
                              scan([img, det], motor, -1, 1, 5), index_min_prob=0.0)
    stop = assert_stop_matches_emitted(run, rec)
    idx = stop["xsml_index"]
    assert idx == rec.of("stop")[-1]["xsml_index"]
    assert idx["complete"] and idx["positions_known"] and idx["min_prob"] == 0.0
    assert sorted(idx["frames"]["seq_num"]) == [1, 2, 3, 4, 5]  # min_prob 0: every frame
    assert idx["positions"]["motor"] == pytest.approx([-1.0, -0.5, 0.0, 0.5, 1.0])

    with _table_requests(run) as seen:
        for tag in TAG_NAMES[:6]:
            for min_prob in (0.0, 0.3, 0.5, 0.9):
                del seen[:]
                fast = find_frames([run], tag, min_prob=min_prob)
                assert seen == [], "the index should answer without reading a stream"
                slow = find_frames([run], tag, min_prob=min_prob, use_index=False)
                assert seen, "use_index=False reads the streams"
                pd.testing.assert_frame_equal(fast, slow)
    assert len(find_frames([run], TAG_NAMES[0], min_prob=0.0)) == 5
    assert sorted(find_frames([run], TAG_NAMES[0], min_prob=0.0)["motor"]) == \
        pytest.approx([-1.0, -0.5, 0.0, 0.5, 1.0])


def test_a_run_past_the_index_limit_is_read_from_its_streams(RE, tagger, tiled_catalog):
    from bluesky_xsml.query import find_frames

    img = make_image_detector(seed=6)
    run, rec = run_into_tiled(RE, tagger, tiled_catalog.catalog,
                              scan([img, det], motor, 0, 1, 4), index_min_prob=0.0,
                              index_limit=2)
    stop = assert_stop_matches_emitted(run, rec)
    assert stop["xsml_index"]["complete"] is False
    with _table_requests(run) as seen:
        df = find_frames([run], TAG_NAMES[0], min_prob=0.0)
    assert seen, "an incomplete index cannot answer; the streams are read"
    assert sorted(df["seq_num"]) == [1, 2, 3, 4]
    assert df["motor"].notna().all()
