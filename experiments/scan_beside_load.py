"""How much does tagging on the spare core slow the untagged scan, with no GIL shared at all?

    python experiments/scan_beside_load.py [--repeats 5] [--frames 500] [--size 1024]

``benchmarks/bench_callback.py`` finds the scan with ``TaggingCallback`` about
1.3x slower than the untagged scan on a 2-core machine (target 1.10). The
callback tags on a worker thread of the RunEngine's process, so part of that
could be the GIL. This experiment removes the GIL from the question: it runs
the benchmark's *untagged* scan (same frames, same plan, its own process)

- ``alone``: nothing else running;
- ``beside``: while another process runs ``Tagger.predict`` on the same kind
  of frames in batches of 32 on one thread, as the callback's worker does
  (its rate alone, measured for 3 s before each scan, is printed too);
- ``beside_idle``: the same load process under ``SCHED_IDLE`` (it gets a core
  only when no normal thread wants it).

The three are interleaved ``--repeats`` times. Whatever ``beside`` costs the
scan is a floor for any design that tags these frames on this machine while
the scan runs, in-process or not, unless it does less work per frame. The last
line reads ``beside_ratio <median beside / median alone> beside_idle_ratio <..>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_callback.py"

LOAD = r"""
import sys, time
import numpy as np, torch
sys.path.insert(0, sys.argv[3])
import bench_callback
from bluesky_xsml import Tagger
torch.set_num_threads(1)
tagger = Tagger.load()
tagger.set_num_threads(1)
frames, _ = bench_callback.make_frames(16, int(sys.argv[2]))
batch = (frames * 2)[:32]
tagger.predict(batch)
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < 3.0:  # the load's own rate, alone, before the scan starts
    tagger.predict(batch)
    n += len(batch)
print(f"ready {n / (time.perf_counter() - t0):.1f}", flush=True)
t0 = time.perf_counter()
while time.perf_counter() - t0 < float(sys.argv[1]):  # a safety limit; normally terminated
    tagger.predict(batch)
"""


LOAD_RATES: list[float] = []  # frames/s of each load process on its own, before its scan


def untagged_scan(frames: int, size: int) -> float:
    out = subprocess.run([sys.executable, str(BENCH), "--mode", "untagged", "--frames",
                          str(frames), "--size", str(size)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["scan_s"]


def with_load(frames: int, size: int, idle: bool) -> float:
    cmd = [sys.executable, "-c", LOAD, "120", str(size), str(BENCH.parent)]
    load = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        if idle:
            os.sched_setscheduler(load.pid, os.SCHED_IDLE, os.sched_param(0))
        word, rate = load.stdout.readline().split()
        assert word == "ready"
        LOAD_RATES.append(float(rate))
        return untagged_scan(frames, size)
    finally:
        load.terminate()
        load.wait(30)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--frames", type=int, default=500)
    p.add_argument("--size", type=int, default=1024)
    args = p.parse_args(argv)
    times: dict[str, list[float]] = {"alone": [], "beside": [], "beside_idle": []}
    for r in range(args.repeats):
        times["alone"].append(untagged_scan(args.frames, args.size))
        times["beside"].append(with_load(args.frames, args.size, idle=False))
        times["beside_idle"].append(with_load(args.frames, args.size, idle=True))
        print(f"repeat {r + 1}/{args.repeats}: " + "  ".join(
            f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:12s} scan s: min {min(v):.2f}  median {med[k]:.2f}  max {max(v):.2f}")
    print(f"the load alone tags {statistics.median(LOAD_RATES):.1f} frames/s on one thread "
          f"(median of {len(LOAD_RATES)}); the scan emits {args.frames / med['alone']:.1f}")
    print(f"beside_ratio {med['beside'] / med['alone']:.3f} "
          f"beside_idle_ratio {med['beside_idle'] / med['alone']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
