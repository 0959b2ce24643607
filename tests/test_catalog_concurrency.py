"""Several clients writing into one embedded catalog at once lose nothing and crash nothing.

Real parts: an :class:`~bluesky_xsml.catalog.embedded.EmbeddedCatalog` (tiled's
``SimpleTiledServer``), and one RunEngine per thread, each writing its runs
through its own HTTP client with bluesky-tiled-plugins' ``TiledWriter``, as
re-tag workers and a live session do side by side.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

WRITERS, READERS, RUNS, EVENTS = 3, 2, 5, 8


def test_concurrent_writers_store_every_event_once(tmp_path, caplog):
    from bluesky import RunEngine
    from bluesky.plans import count
    from ophyd.sim import SynSignal

    from bluesky_xsml.catalog.embedded import EmbeddedCatalog, connect, make_writer

    caplog.set_level(logging.WARNING)
    errors: list[str] = []
    uids: dict[int, list[str]] = {k: [] for k in range(WRITERS)}
    writing = threading.Event()

    def write(k: int) -> None:
        try:
            node = connect(cat.uri)
            # context_managers=[]: a RunEngine off the main thread installs no signal handlers
            RE = RunEngine({}, call_returns_result=False, context_managers=[])
            RE.subscribe(make_writer(node))
            rng = np.random.default_rng(k)
            det = SynSignal(func=lambda: rng.random(3), name=f"det{k}", labels={"detectors"})
            for _ in range(RUNS):
                uids[k].append(RE(count([det], EVENTS), writer=k)[0])
        except Exception as exc:  # noqa: BLE001 - reported below with the thread it came from
            errors.append(f"writer {k}: {exc!r}")

    def read(k: int) -> None:
        # reads whole finished runs while the writers go on
        node = connect(cat.uri)
        while writing.is_set():
            done = [(w, uid) for w in uids for uid in list(uids[w])]
            for w, uid in done[k::READERS]:
                try:
                    shape = node[uid]["primary"].read()[f"det{w}"].shape
                except Exception as exc:  # noqa: BLE001 - reported below with the reader
                    errors.append(f"reader {k}, run {uid[:8]}: {exc!r}"[:300])
                    return
                if shape != (EVENTS, 3):
                    errors.append(f"reader {k}, run {uid[:8]}: shape {shape}")
            if not done:
                time.sleep(0.05)  # no run finished yet

    with EmbeddedCatalog(tmp_path / "cat") as cat:
        writing.set()
        readers = [threading.Thread(target=read, args=(k,)) for k in range(READERS)]
        threads = [threading.Thread(target=write, args=(k,)) for k in range(WRITERS)]
        for t in readers + threads:
            t.start()
        for t in threads:
            t.join(240)
        writing.clear()
        for t in readers:
            t.join(60)
        assert not any(t.is_alive() for t in readers + threads)
        assert not errors, errors
        failed_writes = [r.getMessage()[:300] for r in caplog.records if "failed" in r.getMessage()]
        assert not failed_writes, failed_writes

        assert len(cat.catalog) == WRITERS * RUNS
        for k, run_uids in uids.items():
            for uid in run_uids:
                run = cat.catalog[uid]
                assert run.metadata["start"]["writer"] == k
                assert run.metadata["stop"]["num_events"] == {"primary": EVENTS}
                data = run["primary"].read()
                times = data["time"].values
                assert len(times) == EVENTS and (np.diff(times) > 0).all()  # no duplicate rows
                assert data[f"det{k}"].shape == (EVENTS, 3)
