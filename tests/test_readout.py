"""A per-run detector readout (``xsml_readout``): ADU into counts before preprocessing.

The frames are those of a 16-bit integrating CCD: a pedestal of 120 ADU, 4 ADU
per photon, and a compact blob read as 65535, which on a CCD means saturated and
on an Eiger-style detector means masked. Without a readout preprocessing takes
65535 as masked (the unsigned-integer maximum); a readout says which it is. The
packaged model sees the difference: its ``saturation`` tag goes from about 1e-6
to above 0.99 when the readout says the blob is saturated.

Live tagging runs a real RunEngine with ophyd devices into a real
``TaggingCallback`` (thread and process isolation), re-tagging reads a run back
from a real embedded Tiled catalog, and the service's run summary is read
through its HTTP routes (ASGI transport).
"""

from __future__ import annotations

import itertools
import json
import math
import time

import numpy as np
import pytest

from bluesky_xsml.errors import ConfigurationError
from bluesky_xsml.preprocess import (
    CHANNELS,
    LOG_SCALE,
    PreprocessConfig,
    _valid_range,
    frame_layout,
    preprocess_batch,
    preprocess_frame,
)
from bluesky_xsml.readout import Readout, as_readouts, parse_readouts, run_readouts

from .conftest import make_image_detector, validate_all

INVALID, SATURATED = CHANNELS.index("invalid"), CHANNELS.index("saturated")
#: the CCD's readout, and the same detector if 65535 meant "masked"
CCD = {"gain": 4.0, "offset": 120.0, "read_noise": 3.0, "saturated_value": 65535,
       "kind": "integrating"}
MASKED = {"gain": 4.0, "offset": 120.0, "masked_values": [65535]}


def ccd_frame(seed: int = 0, shape=(128, 160)) -> np.ndarray:
    """Pedestal 120 ADU with read noise, 4 ADU per photon, a saturated blob at 65535."""
    rng = np.random.default_rng(seed)
    f = rng.normal(120, 3, shape) + 4 * rng.poisson(5 + seed, shape)
    f = f.clip(0, 65534).astype(np.uint16)
    f[40:56, 60:80] = 65535
    return f


# ------------------------------------------------------------------ the dataclass
@pytest.mark.parametrize("fields, key", [
    ({"gain": 0}, "gain"),
    ({"gain": -2}, "gain"),
    ({"gain": "fast"}, "gain"),
    ({"gain": float("nan")}, "gain"),
    ({"gain": True}, "gain"),
    ({"offset": math.inf}, "offset"),
    ({"read_noise": -1}, "read_noise"),
    ({"saturated_value": 100, "offset": 100}, "saturated_value"),
    ({"saturated_value": [65535]}, "saturated_value"),
    ({"masked_values": ["x"]}, "masked_values"),
    ({"masked_values": [65535], "saturated_value": 65535}, "saturated_value"),
    ({"kind": "photon"}, "kind"),
    ({"gian": 2}, "unknown key 'gian'"),
])
def test_a_bad_readout_is_refused_naming_the_key(fields, key):
    with pytest.raises(ConfigurationError, match=f"xsml_readout: {key}") as info:
        Readout.from_metadata(fields)
    assert isinstance(info.value, ValueError)
    if "unknown" not in key:  # the constructor checks the same way
        with pytest.raises(ConfigurationError, match=f"^readout: {key}"):
            Readout(**fields)


def test_readout_is_frozen_normalised_and_round_trips_through_json():
    r = Readout.from_metadata({**CCD, "masked_values": 4294967295})
    assert (r.gain, r.offset, r.saturated_value, r.masked_values) == (
        4.0, 120.0, 65535.0, (4294967295.0,))
    with pytest.raises(AttributeError):
        r.gain = 2.0
    back = Readout.from_metadata(json.loads(json.dumps(r.to_dict())))
    assert back == r and hash(back) == hash(r)
    with pytest.raises(ConfigurationError, match="must be a mapping"):
        Readout.from_metadata([4, 120])


def test_parse_readouts_takes_one_readout_or_one_per_image_key():
    assert parse_readouts(None) == {} and parse_readouts({}) == {}
    assert parse_readouts(CCD) == {"*": Readout(**CCD)}
    per_key = parse_readouts({"ccd": CCD, "eiger": {"masked_values": [2**32 - 1]}})
    assert per_key["ccd"] == Readout(**CCD) and per_key["eiger"].masked_values == (2**32 - 1,)
    with pytest.raises(ConfigurationError, match=r"xsml_readout\['eiger'\]: gain"):
        parse_readouts({"ccd": CCD, "eiger": {"gain": 0}})
    with pytest.raises(ConfigurationError, match="xsml_readout must be a mapping"):
        parse_readouts("ccd")
    assert run_readouts({"xsml_readout": {"gain": 0}}, {"*": Readout()})[0] == {}
    with pytest.raises(ConfigurationError, match=r"one per frame \(3\); got 2"):
        as_readouts([CCD, None], 3)
    assert as_readouts([None, None], 2) is None


# ------------------------------------------------------------------ the conversion
def test_adu_become_counts_and_sentinels_keep_their_meaning():
    raw = np.array([[120, 124, 100, 65535, 520, 0]], np.uint16)
    counts = Readout(**CCD).apply(raw)
    assert counts.dtype == np.float32 and counts.shape == raw.shape
    # (raw - 120) / 4; below the pedestal is 0 photons; 65535 at the saturation level
    np.testing.assert_array_equal(counts, [[0, 1, 0, (65535 - 120) / 4, 100, 0]])
    masked = Readout(**MASKED).apply(raw)
    assert np.isnan(masked[0, 3]) and np.isfinite(np.delete(masked, 3)).all()
    # no word on 65535: masked, as without a readout
    assert np.isnan(Readout(gain=4, offset=120).apply(raw)[0, 3])
    # integer negatives are gap/bad-pixel codes; float negatives are noise around 0
    pilatus = Readout().apply(np.array([[-1, -2, 5]], np.int32))
    assert np.isnan(pilatus[0, :2]).all() and pilatus[0, 2] == 5
    corrected = Readout(gain=2).apply(np.array([[-3.0, np.nan, np.inf, 8.0]], np.float32))
    assert corrected[0, 0] == 0 and np.isnan(corrected[0, 1:3]).all() and corrected[0, 3] == 4
    # a masked value wins over saturation, and extra sentinels are raw values too
    both = Readout(saturated_value=60000, masked_values=[65535]).apply(
        np.array([[60000, 65535, 7]], np.uint16), extra_masked=[7])
    assert both[0, 0] == 60000 and np.isnan(both[0, 1:]).all()
    assert raw[0, 3] == 65535  # the frame is read, never changed


def test_a_ccd_blob_at_65535_is_saturated_or_masked_as_the_readout_says():
    frame = ccd_frame()
    config = PreprocessConfig(size=64)
    plain = preprocess_frame(frame, config)
    sat = preprocess_frame(frame, config, readout=Readout(**CCD))
    masked = preprocess_frame(frame, config, readout=Readout.from_metadata(MASKED))
    k, oy, ox = frame_layout(frame.shape, 64)
    # the blocks wholly inside the blob (rows 40:56, columns 60:80 of the frame)
    blob = (slice(-(-(40 + oy) // k), (56 + oy) // k), slice(-(-(60 + ox) // k), (80 + ox) // k))
    # saturated: in the saturated channel, not invalid
    assert sat[SATURATED][blob].min() == 1.0
    assert sat[SATURATED].sum() == pytest.approx(16 * 20 / k**2, rel=1e-5)
    assert sat[INVALID].max() == 0.0
    # masked: invalid, not saturated (as without a readout, where 65535 is masked too)
    assert masked[INVALID][blob].min() == 1.0 and masked[SATURATED].max() == 0.0
    assert plain[INVALID][blob].min() == 1.0 and plain[SATURATED].max() == 0.0
    # the background is counts now: ~5 photons, not ~140 ADU
    quiet = (slice(oy // k + 2, oy // k + 10), slice(ox // k + 2, ox // k + 10))
    assert masked[CHANNELS.index("outside")][quiet].max() == 0.0
    mean_counts = np.expm1(masked[0][quiet].mean() * LOG_SCALE)
    assert 3 < mean_counts < 8, mean_counts
    # a saturation level of few counts (a high gain) still counts as saturation
    few = preprocess_frame(frame, config, readout=Readout(gain=2000, saturated_value=65535))
    assert few[SATURATED][blob].min() == 1.0


def _today(frames, config):
    """What preprocessing gave before readouts: one kernel call per frame, straight."""
    from bluesky_xsml._kernels import prep_many
    from bluesky_xsml.preprocess import _prepared

    out = []
    for f in frames:
        arr = _prepared(f, config)
        dtype = arr.dtype
        lo, hi = _valid_range(dtype)
        k, oy, ox = frame_layout(arr.shape, config.size)
        one = np.empty((1, len(CHANNELS), config.size, config.size), np.float32)
        level = dtype.type(0) if dtype.kind in "iu" else 0.0
        from numba.typed import List

        prep_many(List([arr]), np.array([k]), np.array([oy]), np.array([ox]), lo, hi, level,
                  False, config.min_plateau, config.min_saturation_counts, LOG_SCALE, one)
        out.append(one[0])
    return np.stack(out)


def test_without_a_readout_preprocessing_is_bit_identical():
    frames = [ccd_frame(0), ccd_frame(1).astype(np.uint32), ccd_frame(2).astype(np.float32)]
    config = PreprocessConfig(size=32)
    want = _today(frames, config)
    for readouts in (None, [None, None, None]):
        got, ok, errors = preprocess_batch(frames, config, readouts=readouts)
        assert ok == [0, 1, 2] and not errors
        assert np.array_equal(got, want)
    # a readout for one frame changes that frame only
    got, _, _ = preprocess_batch(frames, config, readouts=[None, Readout(**CCD), None])
    assert np.array_equal(got[[0, 2]], want[[0, 2]]) and not np.array_equal(got[1], want[1])
    assert np.array_equal(got[1], preprocess_frame(frames[1], config, readout=Readout(**CCD)))


# ------------------------------------------------------------------ Tagger.predict
@pytest.fixture(scope="module")
def model():
    """The packaged model: it tags saturation from the saturated channel."""
    from bluesky_xsml import Tagger

    return Tagger.load(precision="fp32", num_threads=1)


def test_predict_with_and_without_a_readout(model):
    frames = [ccd_frame(i) for i in range(3)]
    s = model.tags.index("saturation")
    plain = model.predict(frames)
    assert np.array_equal(plain, model.predict(frames, readout=None))
    sat = model.predict(frames, readout=CCD)
    masked = model.predict(frames, readout=Readout(**MASKED))
    assert plain[:, s].max() < 0.01 and masked[:, s].max() < 0.01
    assert sat[:, s].min() > 0.99
    # per frame: the same as each frame alone
    mixed = model.predict(frames, readout=[None, CCD, MASKED])
    np.testing.assert_allclose(mixed, np.stack([plain[0], sat[1], masked[2]]), atol=1e-5)
    with pytest.raises(ConfigurationError, match="readout: gain"):
        model.predict(frames, readout={"gain": -4})


# ------------------------------------------------------------------ live tagging
def _runs(RE, xsml, recorder, mds, frames):
    from bluesky.plans import count

    it = itertools.cycle(frames)  # ophyd reads the signal beyond the events too
    det = make_image_detector("ccd", func=lambda: next(it))
    RE.subscribe(xsml)
    for md in mds:
        RE(count([det], num=len(frames), md=md))
    assert xsml.flush(120)
    validate_all(recorder.docs)
    run_of = {d["uid"]: d["run_start"] for d in recorder.of("descriptor")}
    out, shown = [], []
    for start in recorder.of("start"):
        tags = sorted((e for e in recorder.tag_events() if run_of[e["descriptor"]]
                       == start["uid"]), key=lambda e: e["data"]["source_seq_num"])
        assert [t["data"]["skip_reason"] for t in tags] == [""] * len(frames)
        out.append(np.array([[e["data"][t] for t in xsml.tagger.tags] for e in tags]))
        # the frames the run's events carried, in order
        events = sorted((e for e in recorder.of("event") if run_of[e["descriptor"]]
                         == start["uid"] and "ccd" in e["data"]), key=lambda e: e["seq_num"])
        shown.append([np.asarray(e["data"]["ccd"]) for e in events])
    assert [s["xsml_frames"] for s in recorder.of("stop")] == [len(frames)] * len(mds)
    return out, shown


def test_the_callback_converts_each_run_with_its_readout(RE, recorder, model):
    """The start's xsml_readout wins, the callback's readout is the default, a bad one
    is counted and its run tagged as counts; the RunEngine never sees an error."""
    from bluesky_xsml import TaggingCallback

    frames = [ccd_frame(i) for i in range(3)]
    xsml = TaggingCallback(model, downstream=[recorder], readout=MASKED, max_batch=4)
    try:
        got, shown = _runs(RE, xsml, recorder, [{"xsml_readout": {"ccd": CCD}}, {},
                                                {"xsml_readout": {"gain": 0}}], frames)
        errors = xsml.status()["document_errors"]
    finally:
        xsml.close()
    expected = [model.predict(shown[0], readout=CCD), model.predict(shown[1], readout=MASKED),
                model.predict(shown[2])]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-5)
    s = model.tags.index("saturation")
    assert got[0][:, s].min() > 0.99 and got[1][:, s].max() < 0.01
    assert any(k.startswith("bad xsml_readout: xsml_readout: gain") for k in errors), errors
    with pytest.raises(ConfigurationError, match="callback option readout: gain"):
        TaggingCallback(model, readout={"gain": 0})


def test_the_readout_crosses_into_the_tagging_process(RE, recorder, model):
    from bluesky_xsml import TaggingCallback
    from bluesky_xsml.inference.process import ProcessOptions

    frames = [ccd_frame(i) for i in range(2)]
    xsml = TaggingCallback(model, downstream=[recorder], isolation="process",
                           process_options=ProcessOptions(priority="normal", threads=1))
    forgotten = []  # each run is forgotten in the tagging process at its stop (its readouts
    forget_run = xsml.worker.forget_run  # dropped), with or without files

    def spy(run_uid):
        forgotten.append(run_uid)
        forget_run(run_uid)

    xsml.worker.forget_run = spy
    try:
        got, shown = _runs(RE, xsml, recorder, [{"xsml_readout": CCD}, {}], frames)
    finally:
        xsml.close()
    np.testing.assert_allclose(got[0], model.predict(shown[0], readout=CCD), atol=1e-4)
    np.testing.assert_allclose(got[1], model.predict(shown[1]), atol=1e-4)
    s = model.tags.index("saturation")
    assert got[0][:, s].min() > 0.99 and got[1][:, s].max() < 0.01
    assert forgotten == [d["uid"] for d in recorder.of("start")]


def test_the_runengine_side_converts_a_runs_readout_once_not_per_frame(RE, recorder, model,
                                                                        monkeypatch):
    """In process isolation each frame's readout crosses the pipe as plain types; this
    process makes them once per run and image key (a spy on ``Readout.to_dict`` here; the
    spawned child imports its own), and drops them at the run's stop."""
    from bluesky_xsml import TaggingCallback
    from bluesky_xsml.inference.process import ProcessOptions

    calls = []
    to_dict = Readout.to_dict

    def counting(self):
        calls.append(self)
        return to_dict(self)

    monkeypatch.setattr(Readout, "to_dict", counting)
    frames = [ccd_frame(i) for i in range(5)]
    xsml = TaggingCallback(model, downstream=[recorder], readout=MASKED, isolation="process",
                           process_options=ProcessOptions(priority="normal", threads=1))
    try:
        got, shown = _runs(RE, xsml, recorder, [{"xsml_readout": {"ccd": CCD}}, {}], frames)
        cache = getattr(xsml.worker, "_readouts", None)  # the converted readouts
    finally:
        xsml.close()
    np.testing.assert_allclose(got[0], model.predict(shown[0], readout=CCD), atol=1e-4)
    np.testing.assert_allclose(got[1], model.predict(shown[1], readout=MASKED), atol=1e-4)
    assert calls == [Readout(**CCD), Readout.from_metadata(MASKED)]  # one per run, not 10
    assert cache is not None and not cache.runs  # both dropped at their stops


def test_the_tagging_process_checks_a_runs_readout_once_not_per_frame(model, monkeypatch):
    """The tagging process's loop (``inference.child._Child``, run here in a thread on a
    real pipe, as the spawned process runs it) parses a run's readout, which crosses with
    every frame as plain numbers, once per run and image key, and parses it again only
    after the run was forgotten (its stop went out)."""
    import mmap
    import threading
    from multiprocessing import Pipe

    from bluesky_xsml.inference import child

    calls = []
    parse = Readout.from_metadata

    def counting(value, what="xsml_readout"):
        if not isinstance(value, Readout):  # a Readout is handed back unchecked
            calls.append(what)
        return parse(value, what)

    monkeypatch.setattr(Readout, "from_metadata", staticmethod(counting))
    frames = [ccd_frame(i, shape=(64, 80)) for i in range(4)]
    ccd, masked = Readout(**CCD).to_dict(), Readout.from_metadata(MASKED).to_dict()
    calls.clear()

    def jobs(run_uid, readout, first_jid):
        return ("jobs", [{"jid": first_jid + i, "run_uid": run_uid, "stream": "primary",
                          "seq_num": i + 1, "event_uid": f"{run_uid}-{i}", "key": "ccd",
                          "skip_reason": "", "t_in": 0.0, "beam_center": None,
                          "kind": "array", "array": f, "readout": readout}
                         for i, f in enumerate(frames)])

    parent, conn = Pipe()
    spec = {"slot_bytes": 1 << 12, "max_batch": 8, "max_wait": 0.01, "warmup": False,
            "heartbeat": 60.0}
    kid = child._Child(child._Link(conn), model, mmap.mmap(-1, 1 << 12), spec,
                       make_reader=None, make_finetuner=None)
    loop = threading.Thread(target=kid.run, daemon=True)
    loop.start()
    results: dict[int, list] = {}

    def collect(n):
        deadline = time.monotonic() + 60
        while len(results) < n and parent.poll(max(0.0, deadline - time.monotonic())):
            msg = parent.recv()
            for what, payload in (msg[1] if msg[0] == "many" else [msg]):
                if what == "results":
                    results.update((jid, r) for jid, r in payload)
        assert len(results) == n, sorted(results)

    try:
        parent.send(jobs("run-a", ccd, 0))
        parent.send(jobs("run-b", masked, 100))
        parent.send(jobs("run-c", None, 200))
        collect(3 * len(frames))
        assert calls == ["readout", "readout"]  # run-a's and run-b's, once each
        parent.send(("forget", "run-a"))
        parent.send(jobs("run-a", ccd, 300))
        collect(4 * len(frames))
        assert calls == ["readout"] * 3  # dropped at run-a's stop: parsed again
        parent.send(("stop", None))
        loop.join(60)
        assert not loop.is_alive()
    finally:
        parent.close()
    got = {first: np.array([results[first + i][0].probs for i in range(len(frames))])
           for first in (0, 100, 200, 300)}
    np.testing.assert_allclose(got[0], model.predict(frames, readout=CCD), atol=1e-5)
    np.testing.assert_allclose(got[100], model.predict(frames, readout=MASKED), atol=1e-5)
    np.testing.assert_allclose(got[200], model.predict(frames), atol=1e-5)
    np.testing.assert_allclose(got[300], got[0], atol=1e-5)  # batched differently


# ------------------------------------------------------------------ stored runs
def test_retag_converts_a_stored_run_with_its_readout(tmp_path, model):
    pytest.importorskip("tiled.server", reason="needs tiled[server,client]")
    pytest.importorskip("bluesky_tiled_plugins", reason="needs bluesky-tiled-plugins")
    from bluesky import RunEngine
    from bluesky.plans import count

    from bluesky_xsml.catalog.append import retag_run
    from bluesky_xsml.catalog.embedded import EmbeddedCatalog
    from bluesky_xsml.tags import TAG_NAMES

    frames = [ccd_frame(i, shape=(64, 80)) for i in range(2)]
    it = itertools.cycle(frames)
    RE = RunEngine({}, call_returns_result=False)
    with EmbeddedCatalog(tmp_path / "catalog") as cat:
        RE.subscribe(cat.writer(batch_size=50))
        det = make_image_detector("ccd", func=lambda: next(it))
        (with_md,) = RE(count([det], 2), xsml_readout={"ccd": CCD})
        (bad_md,) = RE(count([det], 2), xsml_readout={"gain": "high"})

        def retagged(uid, **kw):
            run = cat.catalog[uid]
            result = retag_run(run, model, make_current=False, **kw)
            assert (result.status, result.frames, result.skipped) == ("tagged", 2, {})
            ds = cat.catalog[uid][result.stream].read()
            probs = np.stack([ds[t].values for t in TAG_NAMES], axis=1)
            stored = list(np.asarray(run["primary"]["ccd"].read()))
            return probs[np.argsort(ds["source_seq_num"].values)], stored

        probs, stored = retagged(with_md)
        np.testing.assert_allclose(probs, model.predict(stored, readout=CCD), atol=1e-5)
        assert probs[:, TAG_NAMES.index("saturation")].min() > 0.99
        # a bad stored readout: logged, the frames tagged as counts (nothing raised)
        probs, stored = retagged(bad_md)
        np.testing.assert_allclose(probs, model.predict(stored), atol=1e-5)
        # the caller's readout replaces the run's; a bad one is the caller's error
        with pytest.raises(ConfigurationError, match="readout: gain"):
            retag_run(cat.catalog[bad_md], model, stream_name="x", readout={"gain": 0})


def test_frames_recovered_from_the_catalog_get_the_runs_readout(model):
    """The bus worker tags frames it lost on the bus from the catalog, with the readout the
    live ones had (scaleout.worker.tag_frames)."""
    from bluesky_xsml.scaleout.worker import tag_frames

    frames = [ccd_frame(i) for i in range(2)]
    items = [("primary", i + 1, "", "ccd", 0, f, "") for i, f in enumerate(frames)]
    readouts, _ = run_readouts({"xsml_readout": {"ccd": CCD}})
    got = np.array([r.probs for r in tag_frames(model, items, readouts=readouts)])
    np.testing.assert_allclose(got, model.predict(frames, readout=CCD), atol=1e-5)
    plain = np.array([r.probs for r in tag_frames(model, items)])
    np.testing.assert_allclose(plain, model.predict(frames), atol=1e-5)
    assert got[:, model.tags.index("saturation")].min() > 0.99


@pytest.mark.parametrize("text, message", [
    ('{"gain": 4, "ofset": 1}', "--readout: unknown key 'ofset'"),
    ("gain=4", "--readout must be JSON, e.g. '{\"gain\": 3.6}': Expecting value"),
])
def test_xsml_retag_serve_and_worker_refuse_a_bad_readout_before_connecting(capsys, text,
                                                                          message):
    """The three commands read ``--readout`` with one parser (readout.readout_option); the
    addresses below have nothing listening, so reaching them would fail differently."""
    import argparse

    from bluesky_xsml.api import serve
    from bluesky_xsml.scaleout import retag, worker

    for module, extra in ((retag, ["--catalog", "http://127.0.0.1:1"]), (serve, []),
                          (worker, ["--zmq", "127.0.0.1:1", "--republish", "127.0.0.1:2",
                                    "--model", "/nonexistent.pt"])):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        args = parser.parse_args([*extra, "--readout", text])
        assert module.main(args) == 2
        err = capsys.readouterr().err
        assert f"xsml {module.__name__.rsplit('.', 1)[-1]}: {message}" in err, err


# ------------------------------------------------------------------ the service
def test_the_service_reports_the_readout_each_run_is_tagged_with(RE):
    from bluesky.plans import count

    from bluesky_xsml import Tagger, TaggingCallback
    from bluesky_xsml.api.app import create_app
    from bluesky_xsml.api.settings import ServiceSettings
    from bluesky_xsml.model import TaggerNetConfig

    from .test_api import KEY, ASGIClient

    tiny = Tagger.untrained(seed=0, config=TaggerNetConfig(widths=(8,), depths=(1,),
                                                           stem_width=8))
    xsml = TaggingCallback(tiny, threads=1, max_wait=0.01, readout=MASKED)
    app = create_app(xsml, settings=ServiceSettings(api_key=KEY, port=0))
    client = ASGIClient(app)
    RE.subscribe(xsml)
    det = make_image_detector("ccd", shape=(32, 32))
    try:
        uids = [RE(count([det], 1, md=md))[0] for md in (
            {"xsml_readout": {"ccd": CCD}}, {}, {"xsml_readout": {"gain": 0}})]
        assert xsml.flush(60)
        runs = [client.get(f"/api/runs/{uid}").json() for uid in uids]
    finally:
        xsml.close()
    assert runs[0]["readout"] == {"ccd": Readout(**CCD).to_dict()}
    assert runs[0]["readout_error"] == ""
    assert runs[1]["readout"] == {"*": Readout(**MASKED).to_dict()}
    assert runs[2]["readout"] == {} and "gain must be > 0" in runs[2]["readout_error"]
    assert all(r["tagged"] == 1 for r in runs)


def test_run_readout_cache_converts_once_per_run_and_key_and_stays_bounded():
    from bluesky_xsml.readout import RunReadoutCache

    calls = []

    def convert(value):
        calls.append(value)
        if value == "bad":
            raise ConfigurationError("bad readout")
        return {"v": value}

    cache = RunReadoutCache(convert, max_runs=2)
    first = cache.get("run-a", "img", "x")
    assert cache.get("run-a", "img", "x") is first and calls == ["x"]
    assert cache.get("run-a", "img", "y") == {"v": "y"} and calls == ["x", "y"]  # changed value
    cache.get("run-a", "other", "y")
    assert len(calls) == 3                                   # another image key
    for _ in range(2):                                       # a failure is never cached
        with pytest.raises(ConfigurationError):
            cache.get("run-a", "img", "bad")
    assert calls.count("bad") == 2
    cache.get("run-b", "img", "x")
    cache.get("run-c", "img", "x")                           # run-a, least recently used, goes
    assert list(cache.runs) == ["run-b", "run-c"]
    cache.forget("run-b")
    cache.forget("never-seen")
    assert list(cache.runs) == ["run-c"]
