"""Service benchmark: decision latency at 20 frames/s, and tagging under HTTP load.

    python benchmarks/bench_service.py [--rate 20] [--seconds 15] [--load 200] [--size 512]

One process holds a RunEngine, a :class:`~bluesky_xsml.TaggingCallback` with
the packaged model and the steering service (``xsml.serve``, uvicorn in a
background thread), as when started from IPython. Helper subprocesses play
the clients: an SSE listener on ``/api/feed`` (a browser's page) and a load
generator that requests ``/api/status`` and ``/api/frames/latest?n=50`` at a
fixed rate over keep-alive connections.

1. ``paced``: a scan at ``--rate`` frames/s for ``--seconds``, without and then
   with the HTTP load. Reported: tag latency (frame reached the callback ->
   tagged) and decision latency (the RunEngine emitted the event -> the
   listener received a decision that accounts for that frame) p50/p99.
2. ``burst``: unpaced scans of ``--burst`` frames (tagging as fast as it
   goes): one warm-up, then ``--pairs`` interleaved pairs without and with the
   load; the medians of tagging frames/s are compared.

The last line reads ``throughput_ratio <burst frames/s with load / without>
paced_tag_p50_ratio <with / without> decision_p50_ms <..> decision_p99_ms <..>
load_rps <achieved>``; the target is throughput_ratio >= 0.90.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

import numpy as np


# ----------------------------------------------------------------- clients
def role_sse(url: str, out: str, seconds: float) -> None:
    import httpx

    with open(out, "w") as fh, httpx.stream("GET", url + "/api/feed",
                                            params={"max_s": seconds}, timeout=None) as r:
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "decision":
                after = json.loads(line[6:]).get("after")
                if after:
                    fh.write(json.dumps({"t": time.time(), **after}) + "\n")
                    fh.flush()
            elif not line:
                event = None


class _RawClient:
    """A minimal keep-alive HTTP/1.1 GET client on a raw socket.

    The load generator shares the machine with the service; httpx would spend
    more CPU per request than the server does, so the client is kept lean.
    """

    def __init__(self, url: str):
        import socket
        from urllib.parse import urlparse

        u = urlparse(url)
        self.host = u.hostname
        self.sock = socket.create_connection((u.hostname, u.port), timeout=10)
        self.buf = b""

    def get(self, path: str) -> int:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            rest += chunk
        self.buf = rest[length:]
        return status

    def close(self) -> None:
        self.sock.close()


def role_load(url: str, out: str, seconds: float, rate: float, threads: int = 2) -> None:
    paths = ["/api/status", "/api/frames/latest?n=50"]
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    t0 = time.monotonic() + 0.2

    def worker(k: int) -> None:
        period = threads / rate
        c = _RawClient(url)
        i = 0
        while True:
            due = t0 + (k / rate) + i * period
            if due - t0 > seconds:
                break
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            s = time.monotonic()
            try:
                ok = c.get(paths[(i + k) % 2]) == 200
            except OSError:
                ok = False
                c = _RawClient(url)
            with lock:
                lat.append(time.monotonic() - s)
                errors[0] += not ok
            i += 1
        c.close()

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    elapsed = time.monotonic() - t0
    with open(out, "w") as fh:
        json.dump({"requests": len(lat), "errors": errors[0], "rps": len(lat) / elapsed,
                   "p50_ms": 1000 * float(np.percentile(lat, 50)),
                   "p99_ms": 1000 * float(np.percentile(lat, 99))}, fh)


def spawn(role: str, url: str, out: str, seconds: float, rate: float = 0.0):
    return subprocess.Popen([sys.executable, __file__, "--role", role, "--url", url, "--out", out,
                             "--seconds", str(seconds), "--load", str(rate)])


# -------------------------------------------------------------- the session
def make_frames(n: int, size: int) -> list:
    from bluesky_xsml.sim.generator import SceneGenerator

    gen = SceneGenerator(seed=7, size=size)
    frames = []
    while len(frames) < n:
        f = gen.one()[0]
        if f.ndim == 2:
            frames.append(np.ascontiguousarray(f))
    return frames


def paced_count(det, n: int, rate: float):
    from bluesky import plan_stubs as bps
    from bluesky import preprocessors as bpp

    @bpp.run_decorator(md={"purpose": "bench_service"})
    def inner():
        t0 = time.time()
        for i in range(n):
            yield from bps.trigger_and_read([det])
            left = t0 + (i + 1) / rate - time.time()
            if left > 0:
                yield from bps.sleep(left)

    return (yield from inner())


def frame_detector(size: int):
    """An ophyd ``SynSignal`` serving 64 synthetic scattering frames of ``size`` in turn."""
    from ophyd.sim import SynSignal

    frames = make_frames(64, size)
    k = [0]

    def next_frame():
        k[0] += 1
        return frames[k[0] % len(frames)]

    return SynSignal(func=next_frame, name="det", labels={"detectors"})


def result_counter(xsml) -> dict:
    """Counts ``xsml``'s results; ``done`` is set once ``n`` reaches a set ``target``."""
    counter = {"n": 0, "target": None, "done": threading.Event()}

    def count_results(uid, rs):
        counter["n"] += len(rs)
        if counter["target"] is not None and counter["n"] >= counter["target"]:
            counter["done"].set()

    xsml.add_result_listener(count_results)
    return counter


def run_burst(RE, det, counter: dict, n: int, label: str, *, load_url: str | None = None,
              load_rate: float = 0.0, out_dir: str = ".") -> float:
    """One unpaced scan of ``n`` frames, under the HTTP load on ``load_url`` if given.

    Returns the tagging rate: ``n`` over the time from the scan's start to its last result.
    """
    from bluesky.plans import count

    loader = None
    if load_url is not None:
        loader = spawn("load", load_url, f"{out_dir}/{label}.load", 600, load_rate)
        time.sleep(1.5)  # the load is running before the scan starts
    counter["n"], counter["target"] = 0, n
    counter["done"].clear()
    t0 = time.perf_counter()
    RE(count([det], n))
    counter["done"].wait(120)
    elapsed = time.perf_counter() - t0
    counter["target"] = None
    if loader is not None:
        loader.terminate()
        loader.wait(10)
    fps = n / elapsed
    print(f"{label} frames/s {fps:.1f} (scan+tag {elapsed:.2f} s)", flush=True)
    return fps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=20.0, help="paced scan frames/s")
    p.add_argument("--seconds", type=float, default=15.0, help="length of each paced scan")
    p.add_argument("--load", type=float, default=200.0, help="HTTP requests/s of the load")
    p.add_argument("--burst", type=int, default=600, help="frames of each unpaced scan")
    p.add_argument("--pairs", type=int, default=3,
                   help="burst pairs (no load, load), interleaved; medians are compared")
    p.add_argument("--size", type=int, default=512, help="frame side (pixels)")
    p.add_argument("--role", choices=["sse", "load"], help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "sse":
        role_sse(args.url, args.out, args.seconds)
        return 0
    if args.role == "load":
        role_load(args.url, args.out, args.seconds, args.load)
        return 0

    import tempfile

    from bluesky import RunEngine
    from bluesky.plans import count

    from bluesky_xsml import Tagger, TaggingCallback

    det = frame_detector(args.size)
    xsml = TaggingCallback(Tagger.load(), max_wait=0.02)
    xsml.wait_ready(120)
    tag_lat: list[float] = []
    xsml.add_result_listener(lambda uid, rs: tag_lat.extend(r.latency for r in rs
                                                            if not r.skip_reason))
    emitted: dict = {}
    counter = result_counter(xsml)

    def on_doc(name, doc):
        if name == "event":
            emitted[doc["seq_num"]] = doc["time"]

    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(xsml)
    RE.subscribe(on_doc)
    from bluesky_xsml.api.serve import serve

    service = serve(xsml, port=0, announce=False)
    tmp = tempfile.mkdtemp(prefix="xsml-bench-")
    n_paced = int(args.rate * args.seconds)
    results = {}
    RE(count([det], 20))  # warm everything up
    xsml.flush(60)

    def paced(label: str, load: bool) -> None:
        emitted.clear()
        tag_lat.clear()
        sse_out, load_out = f"{tmp}/{label}.sse", f"{tmp}/{label}.load"
        sse = spawn("sse", service.url, sse_out, args.seconds + 20)
        time.sleep(1.5)  # the listener connects
        loader = spawn("load", service.url, load_out, args.seconds, args.load) if load else None
        uid_box = []
        RE(paced_count(det, n_paced, args.rate), lambda n, d: uid_box.append(d["uid"])
           if n == "start" else None)
        xsml.flush(60)
        time.sleep(0.5)
        if loader is not None:
            loader.wait(60)
        sse.terminate()
        sse.wait(10)
        got: dict = {}
        with open(sse_out) as fh:
            for line in fh:
                d = json.loads(line)
                if d.get("run_uid") == uid_box[0]:
                    got.setdefault(d["seq_num"], d["t"])
        recv = sorted(got.items())
        dec = []
        j = 0
        for seq in sorted(emitted):
            while j < len(recv) and recv[j][0] < seq:
                j += 1
            if j < len(recv):
                dec.append(recv[j][1] - emitted[seq])
        res = {"tag_p50_ms": 1000 * np.percentile(tag_lat, 50),
               "tag_p99_ms": 1000 * np.percentile(tag_lat, 99),
               "decision_p50_ms": 1000 * np.percentile(dec, 50),
               "decision_p99_ms": 1000 * np.percentile(dec, 99),
               "decided_frames": f"{len(dec)}/{len(emitted)}"}
        if load:
            with open(load_out) as fh:
                res["load"] = json.load(fh)
        results[label] = res
        print(label, json.dumps(res, default=float), flush=True)

    def burst(label: str, load: bool) -> float:
        return run_burst(RE, det, counter, args.burst, label,
                         load_url=service.url if load else None, load_rate=args.load,
                         out_dir=tmp)

    paced("paced_no_load", False)
    paced("paced_load", True)
    # Interleaved pairs, so that drift (warm caches, another process) falls on both sides
    # alike; the medians are compared. A warm-up burst first, not counted.
    burst("burst_warmup", False)
    no_load, with_load = [], []
    for i in range(args.pairs):
        no_load.append(burst(f"burst_no_load_{i}", False))
        with_load.append(burst(f"burst_load_{i}", True))
    base, loaded = float(np.median(no_load)), float(np.median(with_load))
    print(f"burst frames/s without load {[round(v, 1) for v in no_load]} median {base:.1f}; "
          f"with load {[round(v, 1) for v in with_load]} median {loaded:.1f}", flush=True)
    service.stop()
    xsml.close()
    a, b = results["paced_no_load"], results["paced_load"]
    print(f"throughput_ratio {loaded / base:.3f} paced_tag_p50_ratio "
          f"{b['tag_p50_ms'] / a['tag_p50_ms']:.3f} decision_p50_ms {a['decision_p50_ms']:.1f} "
          f"decision_p99_ms {a['decision_p99_ms']:.1f} decision_p50_ms_under_load "
          f"{b['decision_p50_ms']:.1f} load_rps {b['load']['rps']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
