"""Tagging workers on bluesky's 0MQ document bus (``xsml worker``), end to end.

Every part is a real process on loopback ports (picked free at run time):

* a publisher process: a RunEngine with an ophyd ``HDF5ResourceDetector``
  (frames in HDF5 files, references on the bus), bluesky-tiled-plugins'
  ``TiledWriter`` storing each run in an embedded Tiled server (the beamline's
  own writer) and bluesky's ``Publisher`` sending every document to
* ``bluesky-0MQ-proxy`` (the command bluesky installs), read by
* worker processes (``python -m bluesky_xsml.cli worker``), each tagging the
  runs of its partition and writing the tag stream into the stored run; in
  the first test they also republish their tag documents to a second proxy,
  read back here with :class:`~bluesky_xsml.scaleout.transport.ZMQSource`.

PUB/SUB loss is not deterministic, so the gap test makes the publisher drop
chosen documents on purpose (a wrapper around bluesky's ``Publisher``); the
catalog still gets every document, as it would from a beamline writer that
does not go through the bus. The tagger is a tiny untrained network saved as
a real checkpoint, its head set so that the tags' probabilities are far apart
(``make_distinct_tagger``): a tag in another tag's column cannot pass.

Run this file as a script (``python tests/test_scaleout_bus.py publish ...``)
to get the publisher process.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.scaleout

FRAMES = 3
SHAPE = (48, 56)
HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent


# ------------------------------------------------------------ the publisher process
class DroppingPublisher:
    """bluesky's ``Publisher`` that leaves out chosen documents (simulated bus loss).

    ``drops`` maps a run index to what to drop in that run: ``"start"``,
    ``"stop"``, ``"descriptor"`` (the primary one) or ``"event:N"`` (seq_num N).
    """

    def __init__(self, publisher, drops: dict[int, str]):
        self.publisher = publisher
        self.drops = drops
        self.run_index = -1
        self.primary: set[str] = set()

    def __call__(self, name, doc):
        if name == "start":
            self.run_index += 1
        what = self.drops.get(self.run_index, "")
        if name == "descriptor" and doc.get("name") == "primary":
            self.primary.add(doc["uid"])
        drop = (name == what
                and (name != "descriptor" or doc.get("name") == "primary")) or (
            name == "event" and what == f"event:{doc['seq_num']}")
        if not drop:
            self.publisher(name, doc)


def publish_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--proxy", required=True)
    parser.add_argument("--tiled", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--max-runs", type=int, default=10)
    parser.add_argument("--drops", default="{}")
    parser.add_argument("--start-md", default="{}",
                        help="JSON {run index: extra start metadata}")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from bluesky import RunEngine
    from bluesky.plans import count

    from bluesky_xsml.catalog.embedded import connect, make_writer
    from bluesky_xsml.scaleout.partition import partition_of
    from bluesky_xsml.scaleout.serialization import publisher as bus_publisher
    from bluesky_xsml.sim.detectors import HDF5ResourceDetector

    rng = np.random.default_rng(0)

    def frame():
        return rng.poisson(rng.uniform(1, 30), SHAPE).astype(np.uint32)

    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(make_writer(connect(args.tiled)))  # stored first, then on the bus
    publisher = bus_publisher(args.proxy)  # msgpack: what xsml worker decodes
    drops = {int(k): v for k, v in json.loads(args.drops).items()}
    start_md = {int(k): v for k, v in json.loads(args.start_md).items()}
    RE.subscribe(DroppingPublisher(publisher, drops))
    det = HDF5ResourceDetector("ad", frame, args.data)
    uids: list[str] = []
    while len(uids) < args.max_runs:
        (uid,) = RE(count([det], FRAMES), sample=f"s{len(uids)}",
                    **start_md.get(len(uids), {}))
        uids.append(uid)
        per = [sum(partition_of(u, args.partitions) == p for u in uids)
               for p in range(args.partitions)]
        if len(uids) >= args.runs and min(per) >= 1:
            break
    time.sleep(0.5)  # let 0MQ flush before the socket closes
    publisher.close()
    Path(args.out).write_text(json.dumps(uids))
    return 0


# ------------------------------------------------------------ helpers for the tests
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_proxy():
    a, b = free_port(), free_port()
    proc = subprocess.Popen(["bluesky-0MQ-proxy", "--in-address", f"127.0.0.1:{a}",
                             "--out-address", f"127.0.0.1:{b}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"127.0.0.1:{a}", f"127.0.0.1:{b}"


def read_report(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip().endswith("}")]


def wait_for(predicate, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: process {p.args[:4]} exited with {p.returncode}:"
                                     f" {log_tail(p)}")
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}: "
                         + " | ".join(log_tail(p) for p in procs))


def log_tail(proc, n=3000) -> str:
    path = getattr(proc, "log_path", None)
    return path.read_text()[-n:] if path is not None and path.exists() else ""


def stop_processes(procs, timeout=30.0):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


@pytest.fixture
def bus(tmp_path):
    """Catalog, proxy, checkpoint and process bookkeeping; everything is torn down."""
    pytest.importorskip("zmq", reason="needs the scaleout extra (pyzmq)")
    pytest.importorskip("tiled.server", reason="needs the catalog extra")
    import shutil

    if shutil.which("bluesky-0MQ-proxy") is None:
        pytest.skip("bluesky-0MQ-proxy (installed with bluesky and pyzmq) is not on PATH")
    from bluesky_xsml.catalog.embedded import EmbeddedCatalog
    from bluesky_xsml.model import TaggerNetConfig

    from .conftest import make_distinct_tagger

    data = tmp_path / "detector_files"
    data.mkdir()
    cat = EmbeddedCatalog(tmp_path / "catalog", readable_storage=[data])
    # tags far apart, so a tag written into another tag's column cannot pass for it
    tagger = make_distinct_tagger(seed=7, config=TaggerNetConfig(stem_width=8, widths=(8, 16),
                                                                 depths=(1, 1)))
    ckpt = tagger.save(tmp_path / "tiny.pt")
    procs: list[subprocess.Popen] = []
    proxy, proxy_in, proxy_out = start_proxy()
    procs.append(proxy)

    class Bus:
        pass

    b = Bus()
    b.tmp, b.data, b.cat, b.tagger, b.ckpt = tmp_path, data, cat, tagger, ckpt
    b.proxy_in, b.proxy_out, b.procs = proxy_in, proxy_out, procs

    def worker(partition: str, *extra: str) -> Path:
        report = tmp_path / f"worker-{partition.replace('/', 'of')}.jsonl"
        cmd = [sys.executable, "-m", "bluesky_xsml.cli", "worker", "--zmq", proxy_out,
               "--tiled", cat.uri, "--partition", partition, "--model", str(ckpt),
               "--report", str(report), "--threads", "1", *extra]
        log = report.with_suffix(".log")
        with open(log, "w") as err:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        proc.log_path = log
        procs.append(proc)
        return report

    def publish(runs: int, *, partitions: int = 1, drops: dict | None = None,
                start_md: dict | None = None) -> list[str]:
        out = tmp_path / f"uids-{len(procs)}.json"
        cmd = [sys.executable, str(HERE), "publish", "--proxy", proxy_in, "--tiled", cat.uri,
               "--data", str(data), "--runs", str(runs), "--partitions", str(partitions),
               "--drops", json.dumps(drops or {}), "--start-md", json.dumps(start_md or {}),
               "--out", str(out)]
        proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(out.read_text())

    b.worker, b.publish = worker, publish
    try:
        yield b
    finally:
        stop_processes(procs[1:])
        stop_processes(procs[:1], timeout=5)
        cat.close()


def assert_stored_tags(cat, uid, tagger, stream="xsml_tags", readout=None):
    """The run's tag stream: one row per stored frame, equal to the model's output
    (with ``readout``, the frames converted with it)."""
    from bluesky_xsml.tags import TAG_NAMES

    run = cat.catalog[uid]
    ds = run[stream].read()
    seqs = [int(s) for s in ds["source_seq_num"].values]
    assert sorted(seqs) == list(range(1, FRAMES + 1)), (uid, seqs)  # each frame exactly once
    assert set(ds["skip_reason"].values) == {""}
    stop = run.metadata["stop"]
    assert stop["num_events"][stream] == FRAMES and stop["xsml_frames"] == FRAMES
    assert stop["xsml_model"] == tagger.checkpoint_id
    frames = np.asarray(run["primary"]["ad_image"].read())[:, 0]
    order = np.argsort(seqs)
    got = np.stack([ds[t].values for t in TAG_NAMES], axis=1)[order]
    from .conftest import assert_probs_match

    assert_probs_match(got, tagger.predict(list(frames), readout=readout))
    return ds


# ------------------------------------------------------------------ tests
def test_worker_in_process_partitions_runs_and_accounts_for_lost_frames(RE):
    """BusWorker on an IterableSource (no bus, no catalog): each run goes to exactly
    one of two partitions, and an event lost in transit is reported and recorded as
    skipped (``lost_on_bus``), since there is no catalog to read it back from."""
    from bluesky.plans import count

    from bluesky_xsml import Tagger
    from bluesky_xsml.model import TaggerNetConfig
    from bluesky_xsml.scaleout.partition import Partition, partition_of
    from bluesky_xsml.scaleout.transport import IterableSource
    from bluesky_xsml.scaleout.worker import BusWorker

    from .conftest import DocumentRecorder, make_image_detector, validate_all

    tagger = Tagger.untrained(seed=2, config=TaggerNetConfig(stem_width=8, widths=(8, 16),
                                                             depths=(1, 1)))
    rec = DocumentRecorder()
    uids = [RE(count([make_image_detector(shape=SHAPE, seed=i)], FRAMES), rec)[0]
            for i in range(4)]
    lost = next(d["uid"] for d in rec.of("event") if d["seq_num"] == 2)
    docs = [(n, d) for n, d in rec.docs if not (n == "event" and d["uid"] == lost)]
    lost_run = uids[0]  # the first event with seq_num 2 belongs to the first run

    published, reports = {}, []
    for i in range(2):
        out = DocumentRecorder()
        worker = BusWorker(tagger, IterableSource(docs), partition=Partition(i, 2),
                           republish=out, report=reports.append,
                           callback_options={"threads": 1})
        worker.run(poll=0.05)
        worker.close()
        validate_all(out.docs)
        published[i] = out
    for i, out in published.items():
        runs = {d["uid"] for d in out.of("start")}
        assert runs == {u for u in uids if partition_of(u, 2) == i}
        for uid in runs:
            desc = next(d["uid"] for d in out.of("descriptor") if d["run_start"] == uid)
            events = [e for e in out.tag_events() if e["descriptor"] == desc]
            assert sorted(e["data"]["source_seq_num"] for e in events) == [1, 2, 3]
            reasons = {e["data"]["source_seq_num"]: e["data"]["skip_reason"] for e in events}
            assert reasons == ({1: "", 2: "lost_on_bus", 3: ""} if uid == lost_run
                               else {1: "", 2: "", 3: ""})
    gaps = [r for r in reports if r["event"] == "gap"]
    assert [(g["run_uid"], g["kind"], g["seq_nums"]) for g in gaps][-1] == \
        (lost_run, "missing_events", [2])
    assert all(g["run_uid"] == lost_run for g in gaps)


def test_worker_needs_a_destination_and_partitions_parse_strictly():
    from bluesky_xsml.scaleout.partition import Partition
    from bluesky_xsml.scaleout.transport import IterableSource
    from bluesky_xsml.scaleout.worker import BusWorker

    with pytest.raises(ValueError, match="a worker needs somewhere to put tags"):
        BusWorker(object(), IterableSource([]))
    with pytest.raises(ValueError, match="a partition is written 'i/N'"):
        Partition.parse("first half")
    with pytest.raises(ValueError, match=r"partition index must be in 0\.\.2, got 3"):
        Partition.parse("3/3")


def test_two_workers_tag_every_frame_exactly_once(bus):
    from bluesky_xsml.scaleout.partition import partition_of
    from bluesky_xsml.scaleout.transport import ZMQSource

    tag_proxy, tag_in, tag_out = start_proxy()
    bus.procs.append(tag_proxy)
    collector = ZMQSource(tag_out).start()
    try:
        reports = [bus.worker(f"{i}/2", "--republish", tag_in) for i in range(2)]
        wait_for(lambda: all(any(r["event"] == "ready" for r in read_report(p))
                             for p in reports), 240, "workers ready", bus.procs[1:])
        assert collector.ready.wait(30)
        time.sleep(1.0)  # let the subscriptions reach the proxies (0MQ slow joiner)
        uids = bus.publish(4, partitions=2)
        # the publisher goes on (up to 10 runs) until each partition owns a run
        assert {partition_of(u, 2) for u in uids} == {0, 1}, uids

        def done():
            return {r["run"] for p in reports for r in read_report(p)
                    if r["event"] == "run_done"} >= set(uids)

        wait_for(done, 240, "every run tagged", bus.procs[1:])
        # each run finished once, by the worker whose partition owns it
        for i, path in enumerate(reports):
            finished = [r for r in read_report(path) if r["event"] == "run_done"]
            assert sorted(r["run"] for r in finished) == \
                sorted(u for u in uids if partition_of(u, 2) == i), (i, uids, read_report(path))
            assert finished, (f"worker {i}/2 tagged no run", uids, read_report(path))
            for r in finished:
                assert (r["frames"], r["live"], r["recovered"], r["written"]) == \
                    (FRAMES, FRAMES, 0, "xsml_tags"), r
        for uid in uids:
            assert_stored_tags(bus.cat, uid, bus.tagger)

        # the republished tag documents: each frame's tag event exactly once
        docs = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum(n == "stop" for n, _ in docs) < len(uids):
            item = collector.get(0.5)
            if item is not None:
                docs.append(item)
        from .conftest import validate_all

        validate_all(docs)
        seen = []
        runs_of = {d["uid"]: d["run_start"] for n, d in docs if n == "descriptor"}
        for name, doc in docs:
            if name == "event_page":
                run = runs_of[doc["descriptor"]]
                seen += [(run, k, s) for k, s in zip(doc["data"]["source_key"],
                                                     doc["data"]["source_seq_num"], strict=True)]
        assert sorted(seen) == sorted((u, "ad_image", s) for u in uids
                                      for s in range(1, FRAMES + 1))
        # and each republished (live) tag column is that tag's probability for its frame
        from bluesky_xsml.tags import TAG_NAMES

        from .conftest import assert_probs_match

        live = {}
        for name, doc in docs:
            if name == "event_page":
                run = runs_of[doc["descriptor"]]
                for i, s in enumerate(doc["data"]["source_seq_num"]):
                    live[(run, int(s))] = [doc["data"][t][i] for t in TAG_NAMES]
        for uid in uids:
            frames = np.asarray(bus.cat.catalog[uid]["primary"]["ad_image"].read())[:, 0]
            got = [live[(uid, s)] for s in range(1, FRAMES + 1)]
            assert_probs_match(got, bus.tagger.predict(list(frames)))
        assert {d["run_start"] for n, d in docs if n == "stop"} == set(uids)
    finally:
        collector.close()


def test_gaps_are_reported_and_recovered_from_the_catalog(bus):
    """The bus loses an event, a start, a stop and a descriptor (one per run); the
    worker reports each gap and still tags every frame once, reading the lost
    ones back from the catalog."""
    report = bus.worker("0/1", "--stop-quiet", "2")
    wait_for(lambda: any(r["event"] == "ready" for r in read_report(report)), 240,
             "worker ready", bus.procs[1:])
    time.sleep(1.0)
    drops = {0: "event:2", 1: "start", 2: "stop", 3: "descriptor"}
    uids = bus.publish(4, drops=drops)
    assert len(uids) == 4

    def done():
        return {r["run"] for r in read_report(report) if r["event"] == "run_done"} >= set(uids)

    wait_for(done, 240, "every run tagged", bus.procs[1:])
    lines = read_report(report)
    gaps = [r for r in lines if r["event"] == "gap"]
    kinds = {(g["run_uid"], g["kind"]) for g in gaps}
    assert (uids[0], "missing_events") in kinds
    assert any(g["kind"] == "missing_events" and g["run_uid"] == uids[0] and g["seq_nums"] == [2]
               for g in gaps)
    assert (uids[1], "missing_start") in kinds
    assert (uids[2], "missing_stop") in kinds
    assert (uids[3], "missing_descriptor") in kinds
    assert any(g["kind"] == "orphan_events" for g in gaps)  # run 3's events, before its stop
    done_lines = {r["run"]: r for r in lines if r["event"] == "run_done"}
    assert [done_lines[u]["recovered"] for u in uids] == [1, FRAMES, 0, FRAMES]
    assert [done_lines[u]["frames"] for u in uids] == [FRAMES] * 4
    for uid in uids:
        assert_stored_tags(bus.cat, uid, bus.tagger)


def test_worker_readout_is_the_default_for_runs_whose_start_gives_none(bus):
    """``xsml worker --readout JSON`` converts the frames of a run whose start has no
    ``xsml_readout``; a run's own ``xsml_readout`` wins over it (as in ``xsml serve``)."""
    flag, own = {"gain": 8.0}, {"ad_image": {"gain": 0.25}}
    report = bus.worker("0/1", "--readout", json.dumps(flag))
    wait_for(lambda: any(r["event"] == "ready" for r in read_report(report)), 240,
             "worker ready", bus.procs[1:])
    time.sleep(1.0)
    uids = bus.publish(2, start_md={1: {"xsml_readout": own}})

    def done():
        return {r["run"] for r in read_report(report) if r["event"] == "run_done"} >= set(uids)

    wait_for(done, 240, "every run tagged", bus.procs[1:])
    assert bus.cat.catalog[uids[0]].metadata["start"].get("xsml_readout") is None
    assert bus.cat.catalog[uids[1]].metadata["start"]["xsml_readout"] == own
    for uid, readout, others in ((uids[0], flag, (None, own["ad_image"])),
                                 (uids[1], own["ad_image"], (None, flag))):
        ds = assert_stored_tags(bus.cat, uid, bus.tagger, readout=readout)
        # the readouts give tags far enough apart that the check above tells them apart
        from bluesky_xsml.tags import TAG_NAMES

        got = np.stack([ds[t].values for t in TAG_NAMES], axis=1)[np.argsort(ds["source_seq_num"]
                                                                             .values)]
        frames = list(np.asarray(bus.cat.catalog[uid]["primary"]["ad_image"].read())[:, 0])
        for other in others:
            assert np.abs(got - bus.tagger.predict(frames, readout=other)).max() > 5e-3, other


if __name__ == "__main__":
    if sys.argv[1:2] == ["publish"]:
        sys.path.insert(0, str(ROOT))
        sys.exit(publish_main(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} publish ...")
