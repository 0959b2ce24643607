"""Where a re-tagged run's time goes: requests (count, latency, bytes, server time), tagging.

    python benchmarks/profile_retag.py [--runs 20] [--frames 4] [--size 256] [--path both]

Writes ``--runs`` runs into an embedded Tiled catalog (as ``bench_retag.py``
does), then re-tags them in this process, once per path:

* ``per-run``: :func:`bluesky_xsml.catalog.append.retag_run` on ``catalog[uid]``,
  one run after the other (the path ``xsml retag`` took before the batched one);
* ``batched``: :func:`bluesky_xsml.scaleout.batched.retag_items`, the batched and
  pipelined path (one paged listing, one deep search per run, frames in one slice,
  one append), with its own stage timers.

Every HTTP request the client makes is recorded with an httpx event hook:
method and endpoint (``/metadata``, ``/search``, ``/array/full``, ...), wall
latency seen by the client, response bytes, and the server's own time from
the ``Server-Timing`` header tiled sends (``app;dur=``, milliseconds). The
table per path gives requests per run and where the time goes. The embedded
server runs in this process, as in ``bench_retag.py``'s embedded setup.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_SERVER_TIMING = re.compile(r"app;dur=([0-9.]+)")


class RequestLog:
    """httpx event hooks that record every request of one client."""

    def __init__(self):
        self.rows: list[dict] = []
        self._start: dict[int, float] = {}

    def install(self, http_client) -> None:
        http_client.event_hooks["request"].append(self._on_request)
        http_client.event_hooks["response"].append(self._on_response)

    def _on_request(self, request) -> None:
        self._start[id(request)] = time.perf_counter()

    def _on_response(self, response) -> None:
        response.read()
        t0 = self._start.pop(id(response.request), None)
        path = response.request.url.path
        m = re.search(r"/api/v1/([a-z_-]+(?:/(?:full|partition|block))?)", path)
        endpoint = m.group(1) if m else path
        timing = _SERVER_TIMING.search(response.headers.get("server-timing", ""))
        self.rows.append({"method": response.request.method, "endpoint": endpoint,
                          "seconds": time.perf_counter() - t0 if t0 else float("nan"),
                          "bytes": len(response.content),
                          "server_ms": float(timing.group(1)) if timing else float("nan")})

    def table(self, n_runs: int) -> str:
        groups: dict = collections.defaultdict(list)
        for r in self.rows:
            groups[(r["method"], r["endpoint"])].append(r)
        lines = [f"{'request':<28}{'per run':>8}{'ms each':>9}{'server ms':>10}{'kB each':>9}"]
        for (method, endpoint), rs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            n = len(rs)
            lines.append(f"{method + ' ' + endpoint:<28}{n / n_runs:>8.2f}"
                         f"{1e3 * sum(r['seconds'] for r in rs) / n:>9.1f}"
                         f"{sum(r['server_ms'] for r in rs) / n:>10.1f}"
                         f"{sum(r['bytes'] for r in rs) / n / 1e3:>9.1f}")
        total = sum(r["seconds"] for r in self.rows)
        lines.append(f"{'all':<28}{len(self.rows) / n_runs:>8.2f}"
                     f"{1e3 * total / max(1, len(self.rows)):>9.1f}"
                     f"{sum(r['server_ms'] for r in self.rows) / max(1, len(self.rows)):>10.1f}"
                     f"{sum(r['bytes'] for r in self.rows) / max(1, len(self.rows)) / 1e3:>9.1f}")
        return "\n".join(lines)


def profile_per_run(uri: str, tagger, uids) -> tuple[RequestLog, float]:
    from bluesky_xsml.catalog.append import retag_run
    from bluesky_xsml.catalog.embedded import connect

    catalog = connect(uri)
    log = RequestLog()
    log.install(catalog.context.http_client)
    t0, c0 = time.perf_counter(), time.process_time()
    for uid in uids:
        retag_run(catalog[uid], tagger)
    log.cpu = time.process_time() - c0
    return log, time.perf_counter() - t0


def profile_batched(uri: str, tagger, n_runs: int) -> tuple[RequestLog, float, dict]:
    from bluesky_xsml.catalog.embedded import connect
    from bluesky_xsml.scaleout.batched import list_run_items, retag_items

    catalog = connect(uri)
    log = RequestLog()
    log.install(catalog.context.http_client)
    t0, c0 = time.perf_counter(), time.process_time()
    items = list_run_items(catalog, checkpoint=tagger.checkpoint_id)
    rows, stats = retag_items(catalog, items, tagger, threads_io=1)
    log.cpu = time.process_time() - c0
    assert sum(r["status"] == "tagged" for r in rows) == n_runs, rows[:3]
    return log, time.perf_counter() - t0, stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--path", choices=["per-run", "batched", "both"], default="both")
    args = parser.parse_args()

    from bench_retag import make_frames, write_runs

    from bluesky_xsml import Tagger
    from bluesky_xsml.catalog.embedded import EmbeddedCatalog

    reference = Tagger.load()
    frames = make_frames(args.frames * 8, args.size)
    with tempfile.TemporaryDirectory(prefix="profile_retag_") as workdir, \
            EmbeddedCatalog(os.path.join(workdir, "catalog")) as cat:
        uids = write_runs(cat, args.runs, args.frames, args.size)[1]
        model = Tagger.untrained(seed=7, config=reference.net.config)
        model.set_num_threads(1)
        model.predict(frames[:8])
        t0 = time.perf_counter()
        for _ in range(3):
            model.predict(frames)
        model_s = (time.perf_counter() - t0) / (3 * len(frames))
        print(f"{args.runs} runs x {args.frames} frames of {args.size}x{args.size}; "
              f"Tagger.predict alone (1 thread): {1e3 * model_s:.2f} ms/frame, "
              f"{1e3 * model_s * args.frames:.1f} ms/run")
        if args.path in ("per-run", "both"):
            log, seconds = profile_per_run(cat.uri, model, uids)
            print(f"\nper-run path: {seconds:.2f} s = {1e3 * seconds / args.runs:.0f} ms/run, "
                  f"{args.runs * args.frames / seconds:.2f} frames/s; "
                  f"waiting on requests {sum(r['seconds'] for r in log.rows):.2f} s; CPU "
                  f"(client + in-process server) {1e3 * log.cpu / args.runs:.0f} ms/run")
            print(log.table(args.runs))
        if args.path in ("batched", "both"):
            model2 = Tagger.untrained(seed=8, config=reference.net.config)
            model2.set_num_threads(1)
            model2.predict(frames[:8])
            log, seconds, stats = profile_batched(cat.uri, model2, args.runs)
            print(f"\nbatched path: {seconds:.2f} s = {1e3 * seconds / args.runs:.0f} ms/run, "
                  f"{args.runs * args.frames / seconds:.2f} frames/s; CPU (client + in-process "
                  f"server) {1e3 * log.cpu / args.runs:.0f} ms/run; stage seconds "
                  + ", ".join(f"{k} {v:.2f}" for k, v in stats.items() if k.endswith("_s")))
            print(log.table(args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
