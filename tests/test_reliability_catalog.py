"""The catalog goes away and comes back: a real Tiled server, stopped and restarted.

RunEngine -> TaggingCallback -> bluesky-tiled-plugins ``TiledWriter`` -> an
embedded ``SimpleTiledServer`` (SQLite + DuckDB + zarr in a temp directory) on
a fixed port and API key, so a server restarted on the same directory is the
same catalog at the same address.

``TiledWriter`` cannot take a document twice (its RunRouter keeps the run's
state from a call that failed), so the outbox runs it with
``RetryPolicy(resend_failed=False, probe=<GET /healthz>)``: a run that starts
while the server is down is buffered whole and written when it returns; a run
that was being written when the server went away is abandoned for the
catalog and its undelivered documents are counted per run.

The Tiled client's own retries (10 attempts over up to 45 s by default,
``TILED_RETRY_ATTEMPTS``/``TILED_RETRY_TIMEOUT``) are cut to one attempt here
so that the outage shows within the test's time; with the defaults, outages
shorter than that window are absorbed inside the writer call while documents
wait in the outbox.
"""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

pytest.importorskip("tiled.server", reason="needs tiled[server,client]")
pytest.importorskip("bluesky_tiled_plugins", reason="needs bluesky-tiled-plugins")

import httpx
from bluesky.plans import count

from bluesky_xsml import TaggingCallback
from bluesky_xsml.documents.outbox import RetryPolicy
from bluesky_xsml.tags import TAG_NAMES

from .conftest import DocumentRecorder, make_image_detector

pytestmark = pytest.mark.reliability


class Restartable:
    """A SimpleTiledServer that can be stopped and started again on the same port/directory."""

    def __init__(self, directory):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.directory = directory
        self.server = None
        self.start()

    def start(self):
        from tiled.server import SimpleTiledServer

        self.server = SimpleTiledServer(self.directory, api_key="xsmlsecret", port=self.port)

    def stop(self):
        self.server.close()
        self.server = None

    def healthy(self) -> bool:
        r = httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1.0, trust_env=False)
        return r.status_code == 200


class Accepted:
    """Wraps the real writer; counts the documents it accepted per run (for the loss check)."""

    def __init__(self, writer):
        self.writer, self.by_run, self.desc_run = writer, {}, {}
        self.__name__ = "TiledWriter"

    def __call__(self, name, doc):
        self.writer(name, doc)
        if name == "descriptor":
            self.desc_run[doc["uid"]] = doc["run_start"]
        run = (doc["uid"] if name == "start" else doc.get("run_start")
               or self.desc_run.get(doc.get("descriptor")))
        self.by_run[run] = self.by_run.get(run, 0) + 1


def test_catalog_outage_buffers_new_runs_and_reports_the_broken_one(RE, tagger, tmp_path,
                                                                     monkeypatch):
    import tiled.client.utils
    from bluesky_tiled_plugins import TiledWriter
    from tiled.client import from_uri

    monkeypatch.setattr(tiled.client.utils, "TILED_RETRY_ATTEMPTS", 1)
    monkeypatch.setattr(tiled.client.utils, "TILED_RETRY_TIMEOUT", 1.0)
    srv = Restartable(tmp_path / "tiled")
    try:
        catalog = from_uri(srv.server.uri).create_container("raw",
                                                            specs=["CatalogOfBlueskyRuns"])
        writer = Accepted(TiledWriter(catalog, batch_size=1, max_array_size=0))
        rec = DocumentRecorder()
        policy = RetryPolicy(resend_failed=False, probe=srv.healthy, initial_delay=0.1,
                             max_delay=0.5)
        xsml = TaggingCallback(tagger)
        xsml.subscribe(writer, retry=policy)  # this policy for the catalog only
        xsml.subscribe(rec)
        RE.subscribe(xsml)

        def det(n_stop=None):
            calls = iter(range(10**6))

            def frame():
                i = next(calls)
                if n_stop is not None and i == n_stop:
                    assert xsml.outbox.flush(30)  # what came before is in the catalog
                    srv.stop()  # the server goes away in the middle of the run
                return np.random.default_rng(i).poisson(4, (64, 64)).astype(np.uint32)

            return make_image_detector(func=frame)

        (run_a,) = RE(count([det()], 3))  # stored normally
        assert xsml.flush(60)
        (run_b,) = RE(count([det(n_stop=3)], 6))  # the server dies during this run
        t0 = time.monotonic()
        (run_c,) = RE(count([det()], 4))  # runs while the server is down
        assert time.monotonic() - t0 < 20, "the RunEngine waited for the catalog"
        assert xsml.flush(1.0) is False  # run C is waiting for the catalog
        sent_c = sum(1 for n, d in rec.docs if belongs(n, d, rec, run_c))
        assert xsml.status()["delivery_backlog"] == {"TiledWriter": sent_c}
        srv.start()  # back, same directory and port
        assert xsml.flush(60)
        status = xsml.status()
        xsml.close()

        client = from_uri(srv.server.uri)
        for uid, n in ((run_a, 3), (run_c, 4)):  # complete runs, tags and all
            run = client["raw"][uid]
            assert run.metadata["stop"]["xsml_frames"] == n
            ds = run["xsml_tags"].read()
            assert ds.sizes["time"] == n
            emitted = [e for e in rec.tag_events() if e["descriptor"] in tag_descs(rec, uid)]
            np.testing.assert_allclose(
                np.sort(ds[TAG_NAMES[0]].values),
                np.sort([e["data"][TAG_NAMES[0]] for e in emitted]), rtol=1e-6)
            assert run["primary"].read()["img"].shape == (n, 64, 64)
        # run B: what the catalog did not get is counted precisely
        sent_b = sum(1 for n, d in rec.docs if belongs(n, d, rec, run_b))
        assert status["delivery_losses"] == {run_b: {"abandoned": sent_b - writer.by_run[run_b]}}
        assert "stop" not in client["raw"][run_b].metadata or \
            client["raw"][run_b].metadata["stop"] is None
    finally:
        if srv.server is not None:
            srv.stop()


def tag_descs(rec, run_uid):
    return {d["uid"] for d in rec.of("descriptor")
            if d["name"] == "xsml_tags" and d["run_start"] == run_uid}


def run_of_descriptors(rec):
    return {d["uid"]: d["run_start"] for d in rec.of("descriptor")}


def belongs(name, doc, rec, run_uid):
    if name == "start":
        return doc["uid"] == run_uid
    if name in ("descriptor", "stop"):
        return doc["run_start"] == run_uid
    return run_of_descriptors(rec).get(doc.get("descriptor")) == run_uid
