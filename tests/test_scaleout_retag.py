"""Re-tagging stored runs on a Dask cluster (``xsml retag``).

Real parts throughout: runs recorded by a RunEngine and stored by
bluesky-tiled-plugins' ``TiledWriter`` in an embedded Tiled server, a
``dask.distributed`` ``LocalCluster`` of worker processes that read the frames
back over HTTP, and :func:`bluesky_xsml.catalog.append.retag_run` writing the
new streams. The tagger is a tiny untrained network with its tags' probabilities
set far apart (the model is not the point here, where its numbers go is), saved
as a real checkpoint file the workers load.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("distributed", reason="needs the scaleout extra (dask.distributed)")
pytest.importorskip("tiled.server", reason="needs the catalog extra")
pytest.importorskip("bluesky_tiled_plugins", reason="needs the catalog extra")

pytestmark = pytest.mark.scaleout

N_RUNS = 5
FRAMES = 3


def tiny_tagger(seed):
    """A tiny untrained network whose tags' probabilities are far apart, so a tag
    written into another tag's column cannot pass for it."""
    from bluesky_xsml.model import TaggerNetConfig

    from .conftest import make_distinct_tagger

    return make_distinct_tagger(seed=seed, config=TaggerNetConfig(stem_width=8, widths=(8, 16),
                                                                  depths=(1, 1)))


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """An embedded Tiled catalog holding N_RUNS runs of FRAMES 2-D inline frames each."""
    from bluesky import RunEngine
    from bluesky.plans import count

    from bluesky_xsml.catalog.embedded import EmbeddedCatalog

    from .conftest import make_image_detector

    cat = EmbeddedCatalog(tmp_path_factory.mktemp("retag_catalog"))
    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(cat.writer())
    uids = []
    for i in range(N_RUNS):
        det = make_image_detector(name="img", shape=(48, 56), seed=i)
        (uid,) = RE(count([det], FRAMES), sample=f"s{i}")
        uids.append(uid)
    yield cat, uids
    cat.close()


@pytest.fixture(scope="module")
def cluster():
    """One LocalCluster of 2 worker processes shared by the tests that pass it."""
    from distributed import Client, LocalCluster

    lc = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None)
    client = Client(lc)
    yield client
    client.close()
    lc.close()


def checkpoint(tmp_path, seed):
    tagger = tiny_tagger(seed)
    return tagger, tagger.save(tmp_path / f"tiny{seed}.pt")


def stored_stream(cat, uid, tagger):
    from bluesky_xsml.catalog.append import tag_stream_name

    run = cat.catalog[uid]
    name = tag_stream_name(tagger.checkpoint_id)
    return run, name


def test_retag_tags_every_stored_frame_once_then_skips(stored, cluster, tmp_path):
    from bluesky_xsml.scaleout.retag import retag_catalog
    from bluesky_xsml.tags import TAG_NAMES

    from .conftest import assert_probs_match

    cat, uids = stored
    tagger, path = checkpoint(tmp_path, seed=3)
    import io

    shown = io.StringIO()
    report = retag_catalog(cat.uri, model=path, scheduler=cluster, runs_per_task=2,
                           progress=True, progress_file=shown)
    assert (report.runs, report.tagged, report.skipped, report.errors) == (N_RUNS, N_RUNS, 0, 0)
    lines = shown.getvalue().splitlines()  # one line per finished task: runs, frames/s, ETA
    assert len(lines) == 3 and lines[-1].startswith(f"retag: {N_RUNS}/{N_RUNS} runs")
    assert all("frames/s" in line and "ETA" in line for line in lines)
    assert lines[-1].endswith("ETA 0 s")
    assert report.frames == N_RUNS * FRAMES
    assert len({row["worker_pid"] for row in report.rows}) >= 1
    for uid in uids:
        run, name = stored_stream(cat, uid, tagger)
        ds = run[name].read()
        assert sorted(int(s) for s in ds["source_seq_num"].values) == [1, 2, 3]
        assert set(ds["skip_reason"].values) == {""}
        stop = run.metadata["stop"]
        assert stop["num_events"][name] == FRAMES
        assert stop["xsml_by_model"][tagger.checkpoint_id]["frames"] == FRAMES
        # the stored values are the model's output on the stored frames
        frames = run["primary"]["img"].read()
        got = np.stack([ds[t].values for t in TAG_NAMES], axis=1)
        order = np.argsort(ds["source_seq_num"].values)
        assert_probs_match(got[order], tagger.predict(list(frames)))

    again = retag_catalog(cat.uri, model=path, scheduler=cluster)
    assert (again.tagged, again.skipped, again.errors, again.frames) == (0, N_RUNS, 0, 0)
    for uid in uids:  # still exactly one stream for this checkpoint
        run, name = stored_stream(cat, uid, tagger)
        assert sum(s.startswith(name) for s in run) == 1


def test_retag_resumes_after_a_limit_and_after_a_killed_writer(stored, cluster, tmp_path):
    """A re-tag stopped part way (here: ``limit``) continues where it stopped, and a
    process killed in the middle of writing a run's stream leaves a partial stream
    that the next re-tag replaces (the kill is real: ``os._exit`` mid-write)."""
    from bluesky_xsml.catalog.append import tagged_checkpoints
    from bluesky_xsml.scaleout.retag import retag_catalog

    cat, uids = stored
    tagger, path = checkpoint(tmp_path, seed=4)
    first = retag_catalog(cat.uri, model=path, scheduler=cluster, limit=2)
    assert (first.runs, first.tagged) == (2, 2)

    # kill a writer of run 3 after its first event page (a real process death mid-write)
    victim = uids[3]
    script = textwrap.dedent(f"""
        import os
        from bluesky_xsml.catalog.append import retag_run
        import bluesky_xsml.catalog.append as append
        from bluesky_xsml.catalog.embedded import connect
        from bluesky_xsml import Tagger
        original = append._table
        calls = []
        def dying_table(*a, **k):
            calls.append(1)
            if len(calls) > 1:
                os._exit(9)
            return original(*a, **k)
        append._table = dying_table
        tagger = Tagger.load({str(path)!r})
        retag_run(connect({cat.uri!r})[{victim!r}], tagger, batch_size=1)
    """)
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr[-2000:]
    run, name = stored_stream(cat, victim, tagger)
    assert name in run.base  # the partial stream is there...
    assert tagger.checkpoint_id not in tagged_checkpoints(run.metadata)  # ...unrecorded

    rest = retag_catalog(cat.uri, model=path, scheduler=cluster)
    assert (rest.tagged, rest.skipped, rest.errors) == (N_RUNS - 2, 2, 0)
    repaired = [row for row in rest.rows if row.get("repaired")]
    assert [row["run"] for row in repaired] == [victim]
    for uid in uids:
        run, name = stored_stream(cat, uid, tagger)
        assert run.metadata["stop"]["num_events"][name] == FRAMES
        assert len(run[name].read()["source_seq_num"]) == FRAMES


def test_retag_cli_on_its_own_local_cluster(stored, tmp_path, capsys):
    """``xsml retag`` with no scheduler starts (and stops) a LocalCluster itself."""
    from bluesky_xsml.cli import main

    cat, uids = stored
    tagger, path = checkpoint(tmp_path, seed=5)
    since = cat.catalog[uids[2]].metadata["start"]["time"]
    rc = main(["retag", "--catalog", cat.uri, "--since", repr(since), "--model", str(path),
               "--workers", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["runs"] == summary["tagged"] == N_RUNS - 2
    assert summary["frames"] == (N_RUNS - 2) * FRAMES
    for i, uid in enumerate(uids):
        run, name = stored_stream(cat, uid, tagger)
        assert (name in run) == (i >= 2)


def test_retag_refuses_a_bad_time():
    from bluesky_xsml.scaleout.retag import parse_time

    with pytest.raises(ValueError, match="cannot read 'last tuesday' as a time"):
        parse_time("last tuesday")
