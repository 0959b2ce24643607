"""Tag queries across runs and frames, on an embedded Tiled catalog (SQLite).

Runs are acquired by a real RunEngine (a motor scan of a small image detector)
and written by bluesky-tiled-plugins' ``TiledWriter``. Their tag streams are
then written with :func:`append_tag_stream` from composed documents whose
probabilities the test chooses, so every query has a known answer. The same
tests run against PostgreSQL in ``test_catalog_postgres.py`` (they take the
``scenario`` fixture, which that module overrides).
"""

from __future__ import annotations

import math
import re
import types

import pytest

pytest.importorskip("tiled.server", reason="needs tiled[server,client]")
pytest.importorskip("bluesky_tiled_plugins", reason="needs bluesky-tiled-plugins")

from bluesky_xsml.tags import TAG_NAMES

from .conftest import make_image_detector

NAN = math.nan

# per run: sample, checkpoint, {tag: probabilities of frames seq 1..4}; None: not tagged.
# A NaN row is a skipped frame (no probabilities).
PLAN = {
    "A": ("S1", "ckptA", {"ring_oriented": [0.9, 0.6, 0.2, NAN], "beam_off": [0.1, 0.1, 0.1, NAN]}),
    "B": ("S2", "ckptB", {"ring_oriented": [0.55, 0.1, 0.1, 0.1], "beam_off": [0.9] * 4}),
    "C": ("S1", "ckptA", {"ring_oriented": [0.3] * 4, "beam_off": [0.2, 0.7, 0.2, 0.2]}),
    "D": ("S3", None, None),
}


def expected_counts(probs: dict) -> dict:
    return {t: sum(1 for p in ps if p >= 0.5) for t, ps in probs.items()
            if any(p >= 0.5 for p in ps)}


def write_run(RE, writer, sample: str) -> str:
    """A 4-point motor scan of a 16x16 image detector, stored by the TiledWriter."""
    from bluesky.plans import scan
    from ophyd.sim import det, motor

    token = RE.subscribe(writer)
    try:
        (uid,) = RE(scan([make_image_detector(shape=(16, 16), seed=len(sample)), det],
                         motor, -1.0, 2.0, 4), sample=sample, operator="test")
    finally:
        RE.unsubscribe(token)
    return uid


def tag_run(run, checkpoint: str, probs: dict, *, stream: str | None = None):
    """Append a tag stream with the given per-frame probabilities (threshold 0.5)."""
    from bluesky_xsml.catalog.append import append_tag_stream, tag_stream_name
    from bluesky_xsml.documents.compose import FrameResult, TagStreamComposer

    start = run.metadata["start"]
    name = stream or tag_stream_name(checkpoint)
    composer = TagStreamComposer(start, TAG_NAMES, [0.5] * len(TAG_NAMES),
                                 {"checkpoint_id": checkpoint}, name)
    results = []
    n = len(next(iter(probs.values())))
    for i in range(n):
        row = [probs.get(t, [0.0] * n)[i] for t in TAG_NAMES]
        skipped = any(math.isnan(p) for p in row)
        results.append(FrameResult(
            stream="primary", seq_num=i + 1, event_uid="", key="img", frame_index=0,
            probs=None if skipped else row, skip_reason="bad_shape: test" if skipped else "",
            checkpoint=checkpoint,
            tags=() if skipped else tuple(t for t, p in zip(TAG_NAMES, row, strict=True)
                                          if p >= 0.5),
            latency=0.01))
    counts = expected_counts(probs)
    skipped = sum(r.probs is None for r in results)
    summary = {"xsml_tags": sorted(counts), "xsml_tag_counts": dict(sorted(counts.items())),
               "xsml_model": checkpoint, "xsml_models": [checkpoint], "xsml_frames": n,
               "xsml_skipped": {"bad_shape": skipped} if skipped else {}}
    return append_tag_stream(run, composer.descriptor, [composer.page(results)], summary)


def build_scenario(catalog, RE=None) -> types.SimpleNamespace:
    """Write the runs of :data:`PLAN` into ``catalog`` and tag them."""
    from bluesky import RunEngine

    from bluesky_xsml.catalog.embedded import make_writer

    RE = RE or RunEngine({}, call_returns_result=False)
    writer = make_writer(catalog, batch_size=50)  # one write per run: fast; same layout
    uids, starts = {}, {}
    for label, (sample, ckpt, probs) in PLAN.items():
        uid = write_run(RE, writer, sample)
        uids[label] = uid
        run = catalog[uid]
        starts[label] = run.metadata["start"]["time"]
        if ckpt is not None:
            tag_run(run, ckpt, probs)
    return types.SimpleNamespace(catalog=catalog, uids=uids, starts=starts)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    """The :data:`PLAN` runs in an embedded Tiled catalog (SQLite)."""
    from bluesky_xsml.catalog.embedded import EmbeddedCatalog

    with EmbeddedCatalog(tmp_path_factory.mktemp("query_catalog")) as cat:
        ns = build_scenario(cat.catalog)
        ns.uri = cat.uri
        ns.directory = cat.directory
        yield ns


def found(node) -> set:
    return set(node)


# ------------------------------------------------------------------ runs
def test_find_runs_by_tag_and_count(scenario):
    from bluesky_xsml.query import find_runs

    u, cat = scenario.uids, scenario.catalog
    assert found(find_runs(cat, "ring_oriented")) == {u["A"], u["B"]}
    assert found(find_runs(cat, "ring_oriented", min_frames=2)) == {u["A"]}
    assert found(find_runs(cat, "ring_oriented", min_frames=3)) == set()
    assert found(find_runs(cat, "beam_off")) == {u["B"], u["C"]}
    assert found(find_runs(cat, "beam_off", min_frames=4)) == {u["B"]}
    assert found(find_runs(cat, "streaks")) == set()   # no run has it; untagged D never shows


def test_find_runs_time_window_and_start_metadata(scenario):
    from bluesky_xsml.query import find_runs

    u, cat, t = scenario.uids, scenario.catalog, scenario.starts
    assert found(find_runs(cat, "beam_off", since=t["C"])) == {u["C"]}
    assert found(find_runs(cat, "beam_off", until=t["C"])) == {u["B"]}
    assert found(find_runs(cat, "ring_oriented", since=t["A"], until=t["B"])) == {u["A"]}
    assert found(find_runs(cat, "ring_oriented", sample="S2")) == {u["B"]}
    assert found(find_runs(cat, "beam_off", sample="S1", operator="test")) == {u["C"]}
    assert found(find_runs(cat, "beam_off", sample="nope")) == set()
    assert found(find_runs(cat, "beam_off", model="ckptA")) == {u["C"]}
    assert found(find_runs(cat, "ring_oriented", model="ckptB")) == {u["B"]}
    # runs of a result can be searched further like any Tiled node
    assert len(find_runs(cat, "beam_off").search(
        __import__("tiled.queries", fromlist=["Key"]).Key("start.sample") == "S2")) == 1


def test_find_runs_rejects_bad_input_with_clear_messages(scenario):
    from bluesky_xsml.query import find_runs

    cat = scenario.catalog
    with pytest.raises(ValueError, match="unknown tag 'ring_orientd'; did you mean ring_oriented"):
        find_runs(cat, "ring_orientd")
    with pytest.raises(ValueError, match="min_frames must be an integer >= 1, got 0"):
        find_runs(cat, "beam_off", min_frames=0)
    with pytest.raises(ValueError, match="is not an ISO 8601 date"):
        find_runs(cat, "beam_off", since="last tuesday")
    with pytest.raises(ValueError, match="must be before until"):
        find_runs(cat, "beam_off", since="2026-11-02", until="2026-11-01")
    with pytest.raises(ValueError, match=re.escape("without '.' or '/'")):
        find_runs(cat, "stop.xsml_frames", strict=False)
    # a custom vocabulary works with strict=False
    assert found(find_runs(cat, "my_custom_tag", strict=False)) == set()


# ---------------------------------------------------------------- frames
def test_find_frames_rows_probabilities_and_positions(scenario):
    from bluesky_xsml.query import find_frames

    u, cat = scenario.uids, scenario.catalog
    df = find_frames(cat, "ring_oriented", min_prob=0.5)
    got = sorted(zip(df["uid"], df["seq_num"], df["probability"], strict=True))
    assert got == sorted([(u["A"], 1, 0.9), (u["A"], 2, 0.6), (u["B"], 1, 0.55)])
    assert list(df.columns[:12]) == ["uid", "scan_id", "stream", "seq_num", "key", "frame_index",
                                     "tag", "probability", "tags", "model", "tag_stream", "time"]
    assert set(df["stream"]) == {"primary"} and set(df["key"]) == {"img"}
    assert dict(zip(df["uid"], df["model"], strict=True)) == {u["A"]: "ckptA", u["B"]: "ckptB"}
    assert dict(zip(df["uid"], df["sample"], strict=True)) == {u["A"]: "S1", u["B"]: "S2"}
    # motor positions of the very events: scan -1..2 in 4 points
    for row in df.itertuples():
        assert row.motor == pytest.approx(-1.0 + (row.seq_num - 1) * 1.0)
        assert row.scan_id == cat[row.uid].metadata["start"]["scan_id"]
    assert all("ring_oriented" in t.split(",") for t in df["tags"])

    high = find_frames(cat, "ring_oriented", min_prob=0.8)
    assert list(zip(high["uid"], high["seq_num"], strict=True)) == [(u["A"], 1)]


def test_find_frames_below_threshold_reads_every_run(scenario):
    """min_prob under the tag threshold cannot use the run summary: all runs are read."""
    from bluesky_xsml.query import find_frames

    u, cat = scenario.uids, scenario.catalog
    df = find_frames(cat, "ring_oriented", min_prob=0.25)
    got = sorted(zip(df["uid"], df["seq_num"], strict=True))
    assert got == sorted([(u["A"], 1), (u["A"], 2)] + [(u["B"], 1)]
                         + [(u["C"], s) for s in (1, 2, 3, 4)])
    assert not df["probability"].isna().any()     # the skipped frame of A never matches


def test_find_frames_on_runs_and_by_model(scenario):
    from bluesky_xsml.query import find_frames

    u, cat = scenario.uids, scenario.catalog
    one = find_frames(cat[u["C"]], "beam_off", min_prob=0.5)
    assert list(zip(one["seq_num"], one["probability"], strict=True)) == [(2, 0.7)]
    listed = find_frames([cat[u["A"]], cat[u["D"]]], "beam_off", min_prob=0.0)
    assert sorted(listed["seq_num"]) == [1, 2, 3]   # A's three tagged frames; D has no stream
    assert find_frames(cat, "beam_off", model="ckptB", min_prob=0.5)["uid"].unique().tolist() \
        == [u["B"]]
    empty = find_frames(cat, "streaks", min_prob=0.5)
    assert empty.empty and "probability" in empty.columns
    with pytest.raises(ValueError, match=r"min_prob must be a number in \[0, 1\], got 1.5"):
        find_frames(cat, "beam_off", min_prob=1.5)


# ------------------------------------------------------------------- XML
def test_xml_export_matches_the_tag_stream(scenario, tmp_path):
    from bluesky_xsml.catalog.xml_export import export_run_xml, parse_frame_xml, run_to_xml

    run = scenario.catalog[scenario.uids["A"]]
    docs = run_to_xml(run)
    uid8 = scenario.uids["A"][:8]
    assert sorted(docs) == [f"{uid8}_primary_img_{s:05d}.xml" for s in (1, 2, 3, 4)]
    first = parse_frame_xml(docs[f"{uid8}_primary_img_00001.xml"])
    assert set(first) == set(TAG_NAMES)
    assert first["ring_oriented"] == 0.9 and first["beam_off"] == 0.1
    skipped = parse_frame_xml(docs[f"{uid8}_primary_img_00004.xml"])
    assert all(math.isnan(v) for v in skipped.values())

    import xml.etree.ElementTree as ET
    root = ET.fromstring(docs[f"{uid8}_primary_img_00004.xml"])
    assert root.tag == "DataFile"
    (protocol,) = root.findall("protocol")
    assert protocol.get("name") == "tag_generated"
    assert protocol.get("skip_reason") == "bad_shape: test" and protocol.get("model") == "ckptA"
    assert float(protocol.get("end_timestamp")) > 0
    assert {r.get("name") for r in protocol.findall("result")} == set(TAG_NAMES)

    paths = export_run_xml(run, tmp_path)
    assert sorted(p.name for p in paths) == sorted(docs)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        export_run_xml(run, tmp_path)
    with pytest.raises(KeyError, match="has no tag stream 'nope'"):
        run_to_xml(run, stream="nope")


# ------------------------------------------------------------------- CLI
def test_cli_query_prints_runs_and_frames(scenario, capsys):
    from bluesky_xsml.cli import main

    u = scenario.uids
    assert main(["query", "ring_oriented", "--catalog", scenario.uri, "--container", "raw"]) == 0
    out = capsys.readouterr().out
    assert u["A"] in out and u["B"] in out and u["C"] not in out

    assert main(["query", "ring_oriented", "--catalog", scenario.uri, "--min-prob", "0.8"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if u["A"] in line]
    assert len(lines) == 1 and "0.9" in lines[0] and "S1" in lines[0]

    assert main(["query", "beam_off", "--catalog", scenario.uri, "--where", "sample=S2",
                 "--min-frames", "4"]) == 0
    out = capsys.readouterr().out
    assert u["B"] in out and u["C"] not in out

    assert main(["query", "streaks", "--catalog", scenario.uri]) == 1
    assert "no runs found" in capsys.readouterr().out
    assert main(["query", "ring_orientd", "--catalog", scenario.uri]) == 2
    assert "did you mean ring_oriented" in capsys.readouterr().err


def test_cli_on_a_catalog_directory_and_export_xml(tmp_path, capsys):
    """Write a run into a directory catalog, stop the server, then use the CLI on the directory."""
    from bluesky import RunEngine

    from bluesky_xsml.catalog.embedded import EmbeddedCatalog
    from bluesky_xsml.cli import main

    directory = tmp_path / "cat"
    with EmbeddedCatalog(directory) as cat:
        uid = write_run(RunEngine({}, call_returns_result=False), cat.writer(batch_size=50),
                        "S9")
        tag_run(cat.catalog[uid], "ckptZ", {"saturation": [0.95, 0.1, 0.1, 0.1]})
    # the call below reopens the directory with its own server
    out_dir = tmp_path / "xml"
    assert main(["export-xml", uid[:8], "--catalog", str(directory), "--out", str(out_dir)]) == 0
    assert "wrote 4 XML files" in capsys.readouterr().out
    assert sorted(p.name for p in out_dir.glob("*.xml")) == \
        [f"{uid[:8]}_primary_img_{s:05d}.xml" for s in (1, 2, 3, 4)]
    assert main(["query", "saturation", "--catalog", str(tmp_path / "missing")]) == 2
    assert "no catalog directory" in capsys.readouterr().err


def test_find_run_by_uid_prefix_scan_id_and_index(scenario):
    from bluesky_xsml.catalog.xml_cli import find_run

    cat, u = scenario.catalog, scenario.uids
    assert find_run(cat, u["B"][:8]).metadata["start"]["uid"] == u["B"]
    assert find_run(cat, u["B"]).metadata["start"]["uid"] == u["B"]
    scan_id = cat[u["C"]].metadata["start"]["scan_id"]
    assert find_run(cat, str(scan_id)).metadata["start"]["uid"] == u["C"]
    assert find_run(cat, "-1").metadata["start"]["uid"] == u["D"]
    with pytest.raises(KeyError, match="no run 'zzzzzzzz'"):
        find_run(cat, "zzzzzzzz")
    with pytest.raises(KeyError, match="run 0 does not exist"):
        find_run(cat, "0")


def test_an_all_digit_uid_prefix_that_is_no_scan_id_finds_its_run(scenario):
    """uids may begin with eight digits; such a prefix first reads as a scan_id."""
    import event_model

    from bluesky_xsml.catalog.embedded import make_writer
    from bluesky_xsml.catalog.xml_cli import find_run

    cat = scenario.catalog
    uid = "31415926-0000-4000-8000-000000000001"
    writer = make_writer(cat)
    bundle = event_model.compose_run(uid=uid, metadata={"scan_id": 7})
    writer("start", bundle.start_doc)
    writer("stop", bundle.compose_stop(exit_status="success"))
    assert find_run(cat, "31415926").metadata["start"]["uid"] == uid  # no scan_id 31415926
    assert find_run(cat, "7").metadata["start"]["scan_id"] == 7         # a scan_id still is one
    with pytest.raises(KeyError, match="no uid starts with it"):
        find_run(cat, "99999999")  # no such scan_id, no such uid prefix


# ------------------------------------------------- the stop document's frame index alone
# ``_frames_from_index`` answers find_frames from a run's stop document without reading a
# stream. These tests give it stop documents written by a real FrameIndex and hold each of
# its rules: when it must decline (and leave the streams to answer), the inclusive
# ``min_prob``, and every column of the rows it returns.
def _indexed_stop(*, min_prob=0.5, positions=True, stream="xsml_tags"):
    from bluesky_xsml.documents.compose import FrameResult
    from bluesky_xsml.documents.frame_index import FrameIndex

    idx = FrameIndex(["ring_oriented", "beam_off"], stream, min_prob=min_prob)
    rows = [("primary", 3, "img", 1, [0.7, 0.2], {"x": 3.0, "y": None}),
            ("primary", 1, "img", 0, [0.5, 0.9], {"x": 1.0, "y": 10.0}),
            ("baseline", 1, "cam", 0, [0.6999, 0.0], {"x": 5.0, "y": 50.0}),
            ("primary", 3, "img", 0, [0.95, 0.0], {"x": 3.0, "y": 30.0}),
            ("primary", 2, "cam", 0, [0.2, 0.2], {"x": 2.0, "y": 20.0})]  # not indexed
    for i, (src, seq, key, frame, probs, pos) in enumerate(rows):
        idx.add(FrameResult(stream=src, seq_num=seq, event_uid="", key=key, frame_index=frame,
                            probs=probs, checkpoint=f"ck{i}", time=100.0 + i,
                            tags=tuple(t for t, p in zip(idx.tags, probs, strict=True) if p >= 0.5),
                            novelty=float(i), novel=i % 2 == 1),
                positions=pos if positions else None)
    return {"xsml_index": idx.summary(), "xsml_stream": stream, "exit_status": "success"}


START = {"uid": "u1", "scan_id": 12, "motors": ["x"], "sample": "S1",
         "sample_info": {"name": "kapton", "layers": [1, 2]}, "operator": "o"}


def _from_index(stop, tag="ring_oriented", min_prob=0.5, stream=None, model=None,
                sample_keys=None, fields=(), novel=None, start=START):
    from bluesky_xsml.catalog.query import _frames_from_index

    return _frames_from_index(start, stop, tag, min_prob, stream, model, sample_keys, fields,
                              novel)


def test_frame_index_rows_hold_every_column():
    rows = _from_index(_indexed_stop())
    common = {"uid": "u1", "scan_id": 12, "tag": "ring_oriented", "tag_stream": "xsml_tags",
              "sample": "S1", "sample_info.name": "kapton", "sample_info.layers": "1,2"}
    assert rows == [  # sorted by stream, seq_num, key, frame index
        {**common, "stream": "baseline", "seq_num": 1, "key": "cam", "frame_index": 0,
         "probability": 0.6999, "tags": "ring_oriented", "model": "ck2", "time": 102.0,
         "x": 5.0},
        {**common, "stream": "primary", "seq_num": 1, "key": "img", "frame_index": 0,
         "probability": 0.5, "tags": "ring_oriented,beam_off", "model": "ck1", "time": 101.0,
         "x": 1.0},
        {**common, "stream": "primary", "seq_num": 3, "key": "img", "frame_index": 0,
         "probability": 0.95, "tags": "ring_oriented", "model": "ck3", "time": 103.0,
         "x": 3.0},
        {**common, "stream": "primary", "seq_num": 3, "key": "img", "frame_index": 1,
         "probability": 0.7, "tags": "ring_oriented", "model": "ck0", "time": 100.0,
         "x": 3.0},
    ]
    assert all(type(r["seq_num"]) is int and type(r["frame_index"]) is int for r in rows)
    # asked-for fields join the motors; a missing position is NaN; chosen sample keys only
    rows = _from_index(_indexed_stop(), fields=["y"], sample_keys=["operator"])
    assert [(r["x"], r["y"]) for r in rows][2:] == [(3.0, 30.0), (3.0, rows[3]["y"])]
    assert math.isnan(rows[3]["y"]) and rows[0]["operator"] == "o" and "sample" not in rows[0]
    # a run without motors in its start: every indexed position column
    rows = _from_index(_indexed_stop(), start={"uid": "u2"})
    assert list(rows[0])[-2:] == ["x", "y"] and rows[0]["scan_id"] is None
    # motors the index does not hold: every other indexed column, the asked fields last
    rows = _from_index(_indexed_stop(), start={**START, "motors": ["z"]}, fields=["x"])
    assert list(rows[0])[-2:] == ["y", "x"] and "z" not in rows[0]
    # the start's motors, in their order, when they are all the indexed columns; fields that
    # are all the indexed columns
    rows = _from_index(_indexed_stop(), start={**START, "motors": ["y", "x"]})
    assert list(rows[0])[-2:] == ["y", "x"]
    rows = _from_index(_indexed_stop(), start={"uid": "u3"}, fields=["y", "x"])
    assert list(rows[0])[-2:] == ["y", "x"] and len(rows) == 4


def test_frame_index_min_prob_is_inclusive_and_never_below_the_index():
    stop = _indexed_stop()
    probs = [r["probability"] for r in _from_index(stop, min_prob=0.7)]
    assert sorted(probs) == [0.7, 0.95]                       # 0.6999 is below
    assert [r["probability"] for r in _from_index(stop, tag="beam_off")] == [0.9]
    assert _from_index(stop, tag="saturation") == []          # no hits for that tag
    assert _from_index(stop, min_prob=0.4999) is None         # below the index: streams
    assert len(_from_index(_indexed_stop(min_prob=0.7), min_prob=0.7)) == 2


def test_frame_index_novel_filter():
    stop = _indexed_stop()
    novel = _from_index(stop, novel=True)
    assert [(r["model"], r["novel"], r["novelty"]) for r in novel] == [("ck1", True, 1.0),
                                                                      ("ck3", True, 3.0)]
    assert [r["model"] for r in _from_index(stop, novel=False)] == ["ck2", "ck0"]
    assert "novel" not in _from_index(stop)[0]
    stop["xsml_index"]["frames"]["novelty"][1] = None
    assert math.isnan(_from_index(stop, novel=True)[0]["novelty"])
    # an index written before novelty scores answers plain queries, not novelty ones
    for column in ("novel", "novelty"):
        del stop["xsml_index"]["frames"][column]
    assert len(_from_index(stop)) == 4
    assert _from_index(stop, novel=True) is None and _from_index(stop, novel=False) is None


@pytest.mark.parametrize("change", [
    "model", "no index", "index not a mapping", "version", "incomplete", "positions unknown",
    "other stream", "stream asked", "stream renamed", "field not indexed", "malformed"])
def test_frame_index_declines_when_it_cannot_answer(change, caplog):
    stop = _indexed_stop()
    idx = stop["xsml_index"]
    kw = {}
    if change == "model":
        kw["model"] = "ck1"
    elif change == "no index":
        del stop["xsml_index"]
    elif change == "index not a mapping":
        stop["xsml_index"] = [idx]
    elif change == "version":
        idx["version"] = 2
    elif change == "incomplete":
        idx["complete"] = False
    elif change == "positions unknown":
        stop = _indexed_stop(positions=False)
    elif change == "other stream":
        stop["xsml_stream"] = "xsml_tags_ck9"
    elif change == "stream asked":
        kw["stream"] = "xsml_tags_ck9"
    elif change == "stream renamed":
        stop = _indexed_stop(stream="xsml_tags_ck9")
        del stop["xsml_stream"]                   # the current stream is then xsml_tags
    elif change == "field not indexed":
        kw["fields"] = ["z"]
    elif change == "malformed":
        del idx["frames"]["seq_num"]
    assert _from_index(stop, **kw) is None
    assert ("is malformed" in caplog.text) == (change == "malformed")


def test_frame_index_answers_for_the_current_stream_asked_by_name():
    stop = _indexed_stop(stream="xsml_tags_ck9")
    assert len(_from_index(stop, stream="xsml_tags_ck9")) == 4
    del stop["xsml_stream"]
    stop["xsml_index"]["stream"] = "xsml_tags"
    rows = _from_index(stop, stream="xsml_tags")
    assert len(rows) == 4 and rows[0]["tag_stream"] == "xsml_tags"
