"""Server CPU per polled request: the short path against FastAPI's routing.

    python experiments/request_cost.py [--seconds 5]

Starts the service in this process around an idle ``TaggingCallback`` (the
untrained model; nothing is tagged), then a client in another process sends
``GET /api/status`` and ``GET /api/frames/latest?n=50`` in turn over one
keep-alive connection, as fast as it can, for ``--seconds``. This process's
CPU time divided by the requests is the server's cost per request.

Two ways, alternated twice after a warm-up run: the plain requests, which
:class:`~bluesky_xsml.api.hot_reads.HotReads` answers, and the same requests
with an extra query parameter (``via=route``), which the short path passes on
to the FastAPI routes (they ignore it). Prints the lower of each way's two
figures last: ``short_path_ms <..> routed_ms <..>``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

CLIENT = """
import sys, time
sys.path.insert(0, {benchmarks!r})
from bench_service import _RawClient
c = _RawClient({url!r})
paths = ["/api/status" + {suffix!r}, "/api/frames/latest?n=50" + {suffix2!r}]
n, t0 = 0, time.time()
while time.time() - t0 < {seconds}:
    assert c.get(paths[n % 2]) == 200
    n += 1
print(n)
"""


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0, help="length of each client run")
    args = p.parse_args(argv)

    from bluesky_xsml import Tagger, TaggingCallback

    xsml = TaggingCallback(Tagger.untrained(seed=0))
    service = xsml.serve(port=0, announce=False)
    costs: dict[str, list[float]] = {"short_path": [], "routed": []}
    try:
        for i, way in enumerate(["short_path"] + ["short_path", "routed"] * 2):
            code = CLIENT.format(benchmarks=str(BENCHMARKS), url=service.url,
                                 suffix="" if way == "short_path" else "?via=route",
                                 suffix2="" if way == "short_path" else "&via=route",
                                 seconds=args.seconds)
            before = cpu_seconds()
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True).stdout
            n = int(out.strip())
            ms = 1e3 * (cpu_seconds() - before) / n
            print(f"{way}: {n} requests in {args.seconds:g} s, server CPU {ms:.3f} ms/request"
                  + ("  (warm-up, not counted)" if i == 0 else ""), flush=True)
            if i:
                costs[way].append(ms)
    finally:
        service.stop()
        xsml.close()
    print(f"short_path_ms {min(costs['short_path']):.3f} routed_ms {min(costs['routed']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
