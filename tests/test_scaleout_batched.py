"""The batched re-tag path (``bluesky_xsml.scaleout.batched``): same results, fewer requests.

Real parts: runs recorded by a RunEngine (inline ophyd.sim frames, and an
ophyd area-detector-style HDF5 detector whose frames stay in HDF5 files),
stored by bluesky-tiled-plugins' ``TiledWriter`` into *two* embedded Tiled
servers at once (one RunEngine, two writers: the same runs, the same files).
One server's runs are re-tagged by the per-run path
(:func:`~bluesky_xsml.catalog.append.retag_run`), the other's by the batched
one, with the same tagger; the stored tag streams and stop summaries must be
the same. Every HTTP request is counted with an httpx event hook.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

pytest.importorskip("tiled.server", reason="needs the catalog extra")
pytest.importorskip("bluesky_tiled_plugins", reason="needs the catalog extra")
h5py = pytest.importorskip("h5py")

pytestmark = [pytest.mark.scaleout, pytest.mark.timeout(900)]

INLINE_RUNS = 2
H5_RUNS = 2
FRAMES = 2


def tiny_tagger(seed):
    from bluesky_xsml import Tagger
    from bluesky_xsml.model import TaggerNetConfig

    return Tagger.untrained(seed=seed, config=TaggerNetConfig(stem_width=8, widths=(8, 16),
                                                              depths=(1, 1)))


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """Two embedded catalogs holding the same runs: inline 2-D frames, a stack run, HDF5 runs."""
    from bluesky import RunEngine
    from bluesky.plans import count

    from bluesky_xsml.catalog.embedded import EmbeddedCatalog
    from bluesky_xsml.sim.detectors import HDF5ResourceDetector

    from .conftest import make_image_detector

    root = tmp_path_factory.mktemp("batched")
    files = root / "files"
    files.mkdir()
    cats = [EmbeddedCatalog(root / f"catalog{i}", readable_storage=[files]) for i in range(2)]
    RE = RunEngine({}, call_returns_result=False)
    for cat in cats:
        RE.subscribe(cat.writer())
    inline, stacks, h5 = [], [], []
    for i in range(INLINE_RUNS):
        det = make_image_detector(name="img", shape=(48, 56), seed=i)
        inline.extend(RE(count([det], FRAMES), sample=f"s{i}"))
    det = make_image_detector(name="img", shape=(40, 40), stack=2, seed=9)
    stacks.extend(RE(count([det], 2), sample="stack"))
    rng = np.random.default_rng(5)
    for i in range(H5_RUNS):
        det = HDF5ResourceDetector("ad", lambda: rng.poisson(6, (44, 52)).astype(np.uint32),
                                   files)
        h5.extend(RE(count([det], FRAMES), sample=f"h{i}"))
    yield cats, {"inline": inline, "stack": stacks, "h5": h5}, files
    for cat in cats:
        cat.close()


class Requests:
    def __init__(self, catalog):
        self.rows = []
        catalog.context.http_client.event_hooks["request"].append(
            lambda req: self.rows.append((req.method, req.url.path)))

    def count(self, fragment: str = "") -> int:
        return sum(fragment in path for _, path in self.rows)


def stored(catalog, uid, name):
    """A run's tag stream as comparable values, and its stop summary without timestamps."""
    from bluesky_xsml.tags import TAG_NAMES

    run = catalog[uid]
    ds = run[name].read()
    order = np.lexsort((ds["frame_index"].values, ds["source_seq_num"].values))
    cols = {k: np.asarray(ds[k].values)[order] for k in
            ("source_stream", "source_seq_num", "source_key", "frame_index", "skip_reason",
             *TAG_NAMES)}
    stop = dict(run.metadata["stop"])
    stop.pop("time", None)
    by_model = {k: {kk: vv for kk, vv in v.items() if kk != "appended"}
                for k, v in stop.pop("xsml_by_model", {}).items()}
    return cols, stop, by_model


def assert_same_tagging(cat_a, cat_b, uids, name):
    for uid in uids:
        a_cols, a_stop, a_by = stored(cat_a.catalog, uid, name)
        b_cols, b_stop, b_by = stored(cat_b.catalog, uid, name)
        assert a_stop == b_stop and a_by == b_by
        assert a_cols.keys() == b_cols.keys()
        for key in a_cols:
            if a_cols[key].dtype.kind == "f":
                np.testing.assert_allclose(a_cols[key], b_cols[key], atol=1e-6, err_msg=key)
            else:
                assert list(a_cols[key]) == list(b_cols[key]), key


def test_batched_matches_per_run_path_in_a_third_of_the_requests(twins, tmp_path):
    """Inline frames (2-D and stacks) over HTTP: the batched path stores exactly what
    ``retag_run`` stores, with at most 7 requests per run (the per-run path: ~23)."""
    from bluesky_xsml.catalog.append import retag_run, tag_stream_name
    from bluesky_xsml.scaleout.batched import list_run_items, retag_items

    (cat_a, cat_b), uids, _ = twins
    runs = uids["inline"] + uids["stack"]
    tagger = tiny_tagger(21)
    name = tag_stream_name(tagger.checkpoint_id)
    per_run = Requests(cat_a.catalog)
    for uid in runs:
        assert retag_run(cat_a.catalog[uid], tagger).status == "tagged"
    batched = Requests(cat_b.catalog)
    items = list_run_items(cat_b.catalog, uids=runs)
    listing = len(batched.rows)
    rows, stats = retag_items(cat_b.catalog, items, tagger)
    n_per_run, n_batched = len(per_run.rows), len(batched.rows)
    frame_reads = batched.count("/array/full")
    assert [r["status"] for r in rows] == ["tagged"] * len(runs)
    assert [r["frames"] for r in rows] == [FRAMES] * INLINE_RUNS + [4]
    assert_same_tagging(cat_a, cat_b, runs, name)
    assert listing <= 2
    assert n_batched - listing <= 7 * len(runs), batched.rows
    assert frame_reads == len(runs)  # the whole stream in one read
    assert n_per_run >= 2 * n_batched
    assert stats["direct_blocks"] == 0 and stats["bytes_read"] > 0


def test_direct_hdf5_reads_give_the_http_results(twins):
    """Frames in HDF5 files: read from the files (no frame request to the server) on one
    catalog, over HTTP on the other; the stored tag streams are the same."""
    from bluesky_xsml.catalog.append import tag_stream_name
    from bluesky_xsml.scaleout.batched import list_run_items, retag_items

    (cat_a, cat_b), uids, files = twins
    tagger = tiny_tagger(22)
    name = tag_stream_name(tagger.checkpoint_id)
    over_http = Requests(cat_a.catalog)
    rows, stats = retag_items(cat_a.catalog, list_run_items(cat_a.catalog, uids=uids["h5"]),
                              tagger)
    assert [r["status"] for r in rows] == ["tagged"] * H5_RUNS
    assert stats["direct_blocks"] == 0 and over_http.count("/array/full") == H5_RUNS
    direct = Requests(cat_b.catalog)
    rows, stats = retag_items(cat_b.catalog, list_run_items(cat_b.catalog, uids=uids["h5"]),
                              tagger, read_files_under=[files])
    assert [(r["status"], r["frames"]) for r in rows] == [("tagged", FRAMES)] * H5_RUNS
    assert stats["direct_blocks"] == H5_RUNS
    assert direct.count("/array/") == 0  # the frames did not go through the server
    assert_same_tagging(cat_a, cat_b, uids["h5"], name)


def test_files_outside_the_allowed_roots_are_read_over_http(twins, tmp_path):
    """A worker allowed another directory reads nothing itself: same results, over HTTP."""
    from bluesky_xsml.catalog.append import tag_stream_name
    from bluesky_xsml.scaleout.batched import list_run_items, retag_items

    (cat_a, cat_b), uids, files = twins
    tagger = tiny_tagger(23)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(files, elsewhere / "link")  # a symlink under the root does not let it out
    requests = Requests(cat_a.catalog)
    rows, stats = retag_items(cat_a.catalog, list_run_items(cat_a.catalog, uids=uids["h5"]),
                              tagger, read_files_under=[elsewhere])
    assert [r["status"] for r in rows] == ["tagged"] * H5_RUNS
    assert stats["direct_blocks"] == 0 and requests.count("/array/full") == H5_RUNS
    rows, _ = retag_items(cat_b.catalog, list_run_items(cat_b.catalog, uids=uids["h5"]),
                          tagger, read_files_under=[files])
    assert_same_tagging(cat_a, cat_b, uids["h5"], tag_stream_name(tagger.checkpoint_id))


def test_checked_file_refuses_escapes_and_non_regular_files(tmp_path):
    from bluesky_xsml.scaleout.batched import DirectReadRefused, _checked_file

    root = (tmp_path / "root").resolve()
    (root / "sub").mkdir(parents=True)
    good = root / "sub" / "frames.h5"
    good.write_bytes(b"x")
    outside = tmp_path / "secret.h5"
    outside.write_bytes(b"x")
    os.symlink(outside, root / "sub" / "link.h5")
    os.mkfifo(root / "fifo.h5")
    sock_path = root / "s.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(sock_path))
    try:
        assert _checked_file(f"file://localhost{good}", [root]) == good
        assert _checked_file(f"file://{good}", [root]) == good
        refused = {
            f"file://localhost{outside}": "not under",
            f"file://localhost{root}/sub/../../secret.h5": "not under",
            f"file://localhost{root}/sub/link.h5": "not under",
            f"file://localhost{root}/fifo.h5": "not a regular file",
            f"file://localhost{sock_path}": "not a regular file",
            f"file://localhost{root}/sub": "not a regular file",
            f"file://localhost{root}/missing.h5": "cannot stat",
            f"file://otherhost{good}": "not a local file",
            f"http://example.org{good}": "not a local file",
        }
        for uri, why in refused.items():
            with pytest.raises(DirectReadRefused, match=why):
                _checked_file(uri, [root])
    finally:
        srv.close()


def test_a_run_tagged_after_listing_is_skipped_not_duplicated(twins):
    """Items listed before another process tagged a run (stale metadata): the write is
    refused by the server (409), the run re-read, reported as skipped; one stream stays."""
    from bluesky_xsml.catalog.append import retag_run, tag_stream_name, tagged_checkpoints
    from bluesky_xsml.scaleout.batched import list_run_items, retag_items

    (_, cat_b), uids, _ = twins
    tagger = tiny_tagger(24)
    name = tag_stream_name(tagger.checkpoint_id)
    runs = uids["inline"]
    items = list_run_items(cat_b.catalog, uids=runs)  # listed now...
    retag_run(cat_b.catalog[runs[1]], tagger)          # ...tagged by someone else meanwhile
    rows, _ = retag_items(cat_b.catalog, items, tagger)
    assert [r["status"] for r in rows] == ["tagged", "skipped"]
    for uid in runs:
        run = cat_b.catalog[uid]
        assert sum(s.startswith(name) for s in run) == 1
        assert tagger.checkpoint_id in tagged_checkpoints(run.metadata)
    # and again: everything is skipped from the listing alone, without reading a run
    again = Requests(cat_b.catalog)
    rows, _ = retag_items(cat_b.catalog, list_run_items(cat_b.catalog, uids=runs), tagger)
    assert [r["status"] for r in rows] == ["skipped"] * len(runs)
    assert again.count("/search-deep") == 0 and again.count("/array/") == 0


def test_a_partial_stream_is_replaced_by_the_batched_path(twins):
    """A stream of this checkpoint that the stop does not record (a killed re-tag) is
    removed and written again; the row says ``repaired``."""
    from bluesky_xsml.catalog.append import tag_stream_name
    from bluesky_xsml.scaleout.batched import list_run_items, retag_items

    (_, cat_b), uids, _ = twins
    tagger = tiny_tagger(25)
    name = tag_stream_name(tagger.checkpoint_id)
    victim = uids["inline"][0]
    cat_b.catalog[victim].base.create_container(name, metadata={"partial": True})
    rows, _ = retag_items(cat_b.catalog, list_run_items(cat_b.catalog, uids=[victim]), tagger)
    assert rows[0]["status"] == "tagged" and rows[0]["repaired"] == name
    run = cat_b.catalog[victim]
    assert "partial" not in run[name].metadata
    assert run.metadata["stop"]["num_events"][name] == FRAMES
