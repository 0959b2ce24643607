"""Tagging stored runs after the fact: ``append_tag_stream`` and ``retag_run``.

Runs are acquired by a real RunEngine and stored by bluesky-tiled-plugins'
``TiledWriter`` in an embedded Tiled server (SQLite); one of them is tagged
live by ``TaggingCallback`` on the way in. Re-tagging reads the frames back
through the Tiled HTTP client, and every check reads the catalog back the
same way. The taggers are small untrained models: what matters here is where
the numbers go, not their quality; the main one (``distinct_tagger``) has tags
whose probabilities are far apart, so a tag written into another tag's column
cannot pass for it.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

pytest.importorskip("tiled.server", reason="needs tiled[server,client]")
pytest.importorskip("bluesky_tiled_plugins", reason="needs bluesky-tiled-plugins")

from bluesky_xsml.tags import TAG_NAMES

from .conftest import assert_probs_match, make_image_detector


@pytest.fixture(scope="module")
def tagger(distinct_tagger):
    """Tags whose probabilities are far apart (an untrained model's sit in 0.49-0.51)."""
    return distinct_tagger


@pytest.fixture(scope="module")
def other_tagger():
    """A second checkpoint (different weights, so a different checkpoint id)."""
    from bluesky_xsml import Tagger

    return Tagger.untrained(seed=1)


@pytest.fixture(scope="module")
def stored(tmp_path_factory, tagger):
    """An embedded catalog with a run stored plainly and a run tagged live."""
    from bluesky import RunEngine
    from bluesky.plans import count, scan
    from ophyd.sim import motor

    from bluesky_xsml import TaggingCallback
    from bluesky_xsml.catalog.embedded import EmbeddedCatalog

    RE = RunEngine({}, call_returns_result=False)
    with EmbeddedCatalog(tmp_path_factory.mktemp("append_catalog")) as cat:
        writer = cat.writer(batch_size=50)
        img = make_image_detector(shape=(40, 48), seed=4)
        small = make_image_detector(name="small", shape=(4, 4), seed=5)  # too small to tag
        token = RE.subscribe(writer)
        try:
            (plain,) = RE(scan([img, small], motor, 0, 1, 3), sample="plain",
                          xsml_beam_center=[20.0, 12.0])
        finally:
            RE.unsubscribe(token)
        xsml = TaggingCallback(tagger, downstream=[cat.writer(batch_size=50)])
        token = RE.subscribe(xsml)
        try:
            (live,) = RE(count([make_image_detector(shape=(40, 48), seed=6)], 3), sample="live")
            assert xsml.flush(60)
            assert xsml.status()["downstream_errors"] == 0
        finally:
            RE.unsubscribe(token)
            xsml.close(10)
        yield types.SimpleNamespace(cat=cat, catalog=cat.catalog, plain=plain, live=live)


def stops_in_revisions(run) -> list[dict]:
    """The stop documents kept in the run's metadata revisions (oldest first)."""
    revisions = run.base.metadata_revisions[:]
    return [r["attributes"]["metadata"].get("stop") for r in revisions]


# ------------------------------------------------------------------ retag
def test_retag_writes_a_readable_tag_stream_and_updates_the_stop(stored, tagger):
    from bluesky_xsml.catalog.append import retag_run, tag_stream_name
    from bluesky_xsml.query import find_runs

    result = retag_run(stored.catalog[stored.plain], tagger, batch_size=2,
                       image_keys=["img", "small"])
    name = tag_stream_name(tagger.checkpoint_id)
    assert (result.status, result.stream, result.frames) == ("tagged", name, 6)
    assert result.skipped == {"bad_shape": 3}

    run = stored.catalog[stored.plain]
    assert name in list(run)
    ds = run[name].read()
    assert ds.sizes["time"] == 6
    keys = [str(k) for k in ds["source_key"].values]
    seqs = [int(s) for s in ds["source_seq_num"].values]
    assert sorted(zip(keys, seqs, strict=True)) == [(k, s) for k in ("img", "small")
                                                    for s in (1, 2, 3)]
    assert set(ds["source_uid"].values) == {""}        # Tiled keeps no event uids
    assert set(ds["checkpoint"].values) == {tagger.checkpoint_id}
    probs = np.stack([ds[t].values for t in TAG_NAMES], axis=1)
    assert probs.dtype.kind == "f"

    # the img rows are the model's probabilities for the stored frames, in seq order
    img_rows = [i for i, k in enumerate(keys) if k == "img"]
    frames = np.asarray(run["primary"]["img"].read())
    order = [seqs[i] - 1 for i in img_rows]
    assert_probs_match(probs[img_rows], tagger.predict(list(frames[order])))
    decided = tagger.decide(probs[img_rows])
    assert [str(ds["tags"].values[i]) for i in img_rows] == [",".join(d) for d in decided]
    # the small frames are accounted for: NaN and a reason
    small_rows = [i for i, k in enumerate(keys) if k == "small"]
    assert np.isnan(probs[small_rows]).all()
    assert all(str(ds["skip_reason"].values[i]).startswith("bad_shape") for i in small_rows)

    # the stream carries the same descriptor metadata as a live one
    meta = run[name].metadata
    assert meta["data_keys"][TAG_NAMES[0]]["threshold"] == pytest.approx(
        float(tagger.thresholds[0]))
    assert meta["configuration"]["xsml"]["data"]["checkpoint_id"] == tagger.checkpoint_id

    stop = run.metadata["stop"]
    counts = {t: sum(t in d for d in decided) for t in TAG_NAMES}
    counts = {t: n for t, n in counts.items() if n}
    assert stop["xsml_stream"] == name and stop["xsml_model"] == tagger.checkpoint_id
    assert stop["xsml_tag_counts"] == counts and stop["xsml_tags"] == sorted(counts)
    assert stop["xsml_frames"] == 6 and stop["xsml_skipped"] == {"bad_shape": 3}
    assert stop["num_events"] == {"primary": 3, name: 6}
    assert stop["xsml_by_model"][tagger.checkpoint_id]["stream"] == name
    assert stop["exit_status"] == "success"  # the rest of the stop is kept
    # and the run is now found by tag
    present = sorted(counts)[0]
    assert stored.plain in set(find_runs(stored.catalog, present))


def test_live_tag_stream_round_trips_column_by_column(stored, tagger):
    """The stream tagged live, read back from the catalog: each tag's column holds that
    tag's probability for the stored frame its row names."""
    run = stored.catalog[stored.live]
    ds = run["xsml_tags"].read()
    seqs = [int(s) for s in ds["source_seq_num"].values]
    assert sorted(seqs) == [1, 2, 3] and set(ds["skip_reason"].values) == {""}
    frames = np.asarray(run["primary"]["img"].read())
    row_of = {int(s): i for i, s in enumerate(run["primary"]["seq_num"].read())}
    got = np.stack([ds[t].values for t in TAG_NAMES], axis=1)
    assert_probs_match(got, tagger.predict([frames[row_of[s]] for s in seqs]))
    assert [str(x) for x in ds["tags"].values] == [",".join(d) for d in tagger.decide(got)]


def test_retag_gives_a_polar_head_the_runs_beam_centre(stored):
    """A tagger that reads the beam centre gets the one in the run's start metadata."""
    import torch

    from bluesky_xsml import Tagger
    from bluesky_xsml.catalog.append import retag_run
    from bluesky_xsml.model import TaggerNet, TaggerNetConfig
    from bluesky_xsml.polar import PolarConfig

    net = TaggerNet(TaggerNetConfig(widths=(8, 16), depths=(1, 1),
                                    polar=PolarConfig(width=8).to_dict()))
    torch.manual_seed(0)
    torch.nn.init.normal_(net.polar.out.weight, std=1.0)
    polar = Tagger(net, TAG_NAMES, precision="fp32")
    run = stored.catalog[stored.plain]
    result = retag_run(run, polar, image_keys=["img"], make_current=False)
    assert (result.status, result.frames) == ("tagged", 3)
    ds = stored.catalog[stored.plain][result.stream].read()
    probs = np.stack([ds[t].values for t in TAG_NAMES], axis=1)[np.argsort(ds["source_seq_num"])]
    frames = list(np.asarray(run["primary"]["img"].read()))
    np.testing.assert_allclose(probs, polar.predict(frames, beam_center=(20.0, 12.0)), atol=1e-5)
    assert np.abs(probs - polar.predict(frames)).max() > 1e-3  # not the CNN alone


def test_retag_is_idempotent_per_checkpoint(stored, tagger):
    from bluesky_xsml.catalog.append import retag_run

    # tagged here if this test runs alone, skipped if the test above ran first
    first = retag_run(stored.catalog[stored.plain], tagger, image_keys=["img", "small"])
    assert first.status in ("tagged", "skipped")
    run = stored.catalog[stored.plain]
    streams, stop, n_revisions = list(run), run.metadata["stop"], len(stops_in_revisions(run))
    again = retag_run(run, tagger, image_keys=["img", "small"])
    assert again.status == "skipped"
    assert tagger.checkpoint_id in again.reason and again.stream in again.reason
    run = stored.catalog[stored.plain]
    assert list(run) == streams and run.metadata["stop"] == stop
    assert len(stops_in_revisions(run)) == n_revisions


def test_new_model_adds_a_stream_and_never_overwrites(stored, tagger, other_tagger):
    from bluesky_xsml.catalog.append import retag_run, tag_stream_name

    run = stored.catalog[stored.live]
    live_before = run["xsml_tags"].read()
    stop_before = run.metadata["stop"]
    assert stop_before["xsml_model"] == tagger.checkpoint_id

    # the live stream already holds this checkpoint's tags: nothing to do
    same = retag_run(run, tagger)
    assert same.status == "skipped" and "'xsml_tags'" in same.reason

    result = retag_run(run, other_tagger)
    new = tag_stream_name(other_tagger.checkpoint_id)
    assert result.status == "tagged" and result.stream == new and result.frames == 3
    run = stored.catalog[stored.live]
    assert {"primary", "xsml_tags", new} <= set(run)
    live_after = run["xsml_tags"].read()
    for tag in TAG_NAMES:   # the live stream is untouched
        np.testing.assert_array_equal(live_after[tag].values, live_before[tag].values)

    stop = run.metadata["stop"]
    assert stop["xsml_model"] == other_tagger.checkpoint_id and stop["xsml_stream"] == new
    by_model = stop["xsml_by_model"]
    assert by_model[tagger.checkpoint_id]["stream"] == "xsml_tags"
    assert by_model[tagger.checkpoint_id]["tag_counts"] == stop_before["xsml_tag_counts"]
    assert by_model[other_tagger.checkpoint_id]["stream"] == new
    assert stop["num_events"] == {**stop_before["num_events"], new: 3}
    # the stop as it was before the re-tag is kept as a metadata revision
    assert stop_before in stops_in_revisions(run)


def test_retag_without_making_it_current(stored, tagger, other_tagger):
    from bluesky_xsml.catalog.append import retag_run, tag_stream_name

    retag_run(stored.catalog[stored.plain], tagger, image_keys=["img", "small"])  # may skip
    current = stored.catalog[stored.plain].metadata["stop"]["xsml_model"]
    result = retag_run(stored.catalog[stored.plain], other_tagger, image_keys=["img"],
                       make_current=False)
    assert result.status == "tagged" and result.frames == 3 and result.skipped == {}
    stop = stored.catalog[stored.plain].metadata["stop"]
    assert stop["xsml_model"] == current
    entry = stop["xsml_by_model"][other_tagger.checkpoint_id]
    assert entry["stream"] == tag_stream_name(other_tagger.checkpoint_id)
    assert entry["frames"] == 3 and entry["models"] == [other_tagger.checkpoint_id]


# ----------------------------------------------------------------- append
def _composed(run, checkpoint="ckpt-test", name=None, n=2):
    from bluesky_xsml.catalog.append import tag_stream_name
    from bluesky_xsml.documents.compose import FrameResult, TagStreamComposer

    composer = TagStreamComposer(run.metadata["start"], TAG_NAMES, [0.5] * len(TAG_NAMES),
                                 {"checkpoint_id": checkpoint},
                                 name or tag_stream_name(checkpoint))
    results = [FrameResult(stream="primary", seq_num=i + 1, event_uid="", key="img",
                           frame_index=0, probs=[0.25] * len(TAG_NAMES), checkpoint=checkpoint)
               for i in range(n)]
    summary = {"xsml_tags": [], "xsml_tag_counts": {}, "xsml_model": checkpoint,
               "xsml_models": [checkpoint], "xsml_frames": n, "xsml_skipped": {}}
    return composer, composer.page(results), summary


def test_append_refuses_to_overwrite_or_mix_runs(stored):
    from bluesky_xsml.catalog.append import TagStreamExistsError, append_tag_stream

    live = stored.catalog[stored.live]
    composer, page, summary = _composed(live, name="xsml_tags")
    with pytest.raises(TagStreamExistsError, match="already has a stream 'xsml_tags'; tag "
                                                   "streams are never overwritten"):
        append_tag_stream(live, composer.descriptor, [page], summary)

    plain = stored.catalog[stored.plain]
    composer, page, summary = _composed(plain)
    with pytest.raises(ValueError, match=f"belongs to run '{stored.plain}', not to run "
                                         f"'{stored.live}'"):
        append_tag_stream(live, composer.descriptor, [page], summary)
    with pytest.raises(ValueError, match="summary needs at least 'xsml_model'"):
        append_tag_stream(plain, composer.descriptor, [page], {"xsml_frames": 2})
    assert "xsml_tags_ckpt-test" not in list(stored.catalog[stored.plain])


def test_failed_append_leaves_no_partial_stream(stored):
    from bluesky_xsml.catalog.append import append_tag_stream

    run = stored.catalog[stored.plain]
    stop_before = run.metadata["stop"]
    composer, page, summary = _composed(run, checkpoint="ckpt-broken")
    good = dict(page)
    bad = dict(page, data={k: v for k, v in page["data"].items() if k != "beam_off"})
    with pytest.raises(ValueError, match="lacks a value per event for data key 'beam_off'"):
        append_tag_stream(run, composer.descriptor, [good, bad], summary)
    run = stored.catalog[stored.plain]
    assert "xsml_tags_ckpt-broken" not in list(run)
    assert run.metadata["stop"] == stop_before

    # a valid write of the same stream afterwards works: nothing was left behind
    written = append_tag_stream(run, composer.descriptor, [page], summary, make_current=False)
    assert written.rows == 2
    ds = stored.catalog[stored.plain]["xsml_tags_ckpt-broken"].read()
    np.testing.assert_array_equal(ds["beam_off"].values, [0.25, 0.25])


def test_run_without_stop_is_refused(stored, tagger):
    """A run whose stop never came (still running, or the process died)."""
    import event_model

    from bluesky_xsml.catalog.append import append_tag_stream, retag_run
    from bluesky_xsml.errors import XsmlError

    writer = stored.cat.writer()
    bundle = event_model.compose_run(metadata={"sample": "unfinished"})
    writer("start", bundle.start_doc)
    desc = bundle.compose_descriptor(name="primary", data_keys={
        "x": {"dtype": "number", "shape": [], "source": "test"}})
    writer("descriptor", desc.descriptor_doc)
    writer("event", desc.compose_event(data={"x": 1.0}, timestamps={"x": 0.0}))
    run = stored.catalog[bundle.start_doc["uid"]]
    with pytest.raises(XsmlError, match="has no stop document"):
        retag_run(run, tagger)
    composer, page, summary = _composed(run)
    with pytest.raises(XsmlError, match="has no stop document"):
        append_tag_stream(run, composer.descriptor, [page], summary)
    assert list(stored.catalog[bundle.start_doc["uid"]]) == ["primary"]


def test_a_script_that_never_closes_its_catalog_still_exits(tmp_path):
    """tiled serves from a non-daemon thread; the catalog closes itself before it is joined."""
    import subprocess
    import sys

    script = ("from bluesky_xsml.catalog.embedded import EmbeddedCatalog\n"
              f"cat = EmbeddedCatalog({str(tmp_path / 'cat')!r})\n"
              "print('runs', len(cat.catalog))\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "runs 0" in res.stdout
    assert (tmp_path / "cat").is_dir()
