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
