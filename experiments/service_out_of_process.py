"""Would serving the API from its own process keep unpaced tagging within 10% under load?

    python experiments/service_out_of_process.py [--load 200] [--burst 600] [--pairs 3]

``benchmarks/bench_service.py`` measures unpaced ("burst") tagging while a
client requests ``/api/status`` and ``/api/frames/latest?n=50`` at 200
requests/s, with the service in the tagging process (``xsml.serve``), and
finds the tagging rate about 17% lower. Part of that is CPU the requests
take, part is the server thread competing for the GIL with the RunEngine and
the callback. Moving the service into a process of its own removes the second
part only. This experiment measures how much that could win before anyone
builds it:

- ``none``: bursts with no HTTP load;
- ``in_process``: the load against the real service, as in the benchmark;
- ``own_process``: the same load against a stand-in in another process, a
  FastAPI app under uvicorn answering the same two routes with the same bytes
  (captured from the live service after warm-up). A real split would also
  spend some main-process time handing state over, so this is the best case.

Bursts are interleaved (none, in_process, own_process) ``--pairs`` times after
one warm-up burst; medians of tagging frames/s are compared. The last line
reads ``in_process_ratio <..> own_process_ratio <..>`` (target 0.90).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_service  # the benchmark's load generator and frames

STAND_IN = """
import sys
import uvicorn
from fastapi import FastAPI, Response

status, latest = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read()
app = FastAPI()


@app.get("/api/status")
async def read_status():
    return Response(status, media_type="application/json")


@app.get("/api/frames/latest")
async def latest_frames(n: int = 50):
    return Response(latest, media_type="application/json")


uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[3]), log_level="warning", access_log=False)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/api/status", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", type=float, default=200.0, help="HTTP requests/s of the load")
    p.add_argument("--burst", type=int, default=600, help="frames of each unpaced scan")
    p.add_argument("--pairs", type=int, default=3, help="interleaved rounds of the three cases")
    p.add_argument("--size", type=int, default=512, help="frame side (pixels)")
    args = p.parse_args(argv)

    import httpx
    from bluesky import RunEngine
    from bluesky.plans import count

    from bluesky_xsml import Tagger, TaggingCallback

    det = bench_service.frame_detector(args.size)
    xsml = TaggingCallback(Tagger.load(), max_wait=0.02)
    xsml.wait_ready(120)
    counter = bench_service.result_counter(xsml)
    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(xsml)
    service = xsml.serve(port=0, announce=False)
    RE(count([det], 60))  # warm up, and fill the latest-frames buffer
    xsml.flush(60)

    tmp = Path(tempfile.mkdtemp(prefix="xsml-split-"))
    (tmp / "status.json").write_bytes(httpx.get(service.url + "/api/status").content)
    (tmp / "latest.json").write_bytes(
        httpx.get(service.url + "/api/frames/latest", params={"n": 50}).content)
    port = free_port()
    stand_in = subprocess.Popen([sys.executable, "-c", STAND_IN, str(tmp / "status.json"),
                                 str(tmp / "latest.json"), str(port)])
    own_url = f"http://127.0.0.1:{port}"
    try:
        wait_up(own_url)
        print(f"bytes per response: status {(tmp / 'status.json').stat().st_size}, latest "
              f"{(tmp / 'latest.json').stat().st_size}", flush=True)

        def burst(label: str, url: str | None) -> float:
            return bench_service.run_burst(RE, det, counter, args.burst, label, load_url=url,
                                           load_rate=args.load, out_dir=str(tmp))

        burst("warmup", None)
        fps: dict[str, list[float]] = {"none": [], "in_process": [], "own_process": []}
        for i in range(args.pairs):
            fps["none"].append(burst(f"none_{i}", None))
            fps["in_process"].append(burst(f"in_process_{i}", service.url))
            fps["own_process"].append(burst(f"own_process_{i}", own_url))
    finally:
        stand_in.terminate()
        stand_in.wait(10)
        service.stop()
        xsml.close()
    med = {name: float(np.median(v)) for name, v in fps.items()}
    for name, v in fps.items():
        print(f"{name}: frames/s {[round(x, 1) for x in v]} median {med[name]:.1f}")
    print(f"in_process_ratio {med['in_process'] / med['none']:.3f} own_process_ratio "
          f"{med['own_process'] / med['none']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
