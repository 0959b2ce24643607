"""Does putting the tagging threads under SCHED_IDLE keep the tagged scan closer to untagged?

    python experiments/worker_sched_idle.py [--repeats 3] [--frames 500] [--size 1024]

``experiments/scan_beside_load.py`` finds that a tagging load in *another
process* costs the untagged scan about 3% under ``SCHED_IDLE`` against about
13% at normal priority. This experiment asks whether the same trick helps the
real :class:`~bluesky_xsml.TaggingCallback`, whose worker threads share the
RunEngine's process (and its GIL). It runs the benchmark's three-way scan
(``benchmarks/bench_callback.py``'s ``run_mode``) interleaved ``--repeats``
times:

- ``untagged``: the scan alone;
- ``xsml``: with ``TaggingCallback`` as shipped;
- ``xsml_idle``: the same, with every ``xsml-*`` thread switched to
  ``SCHED_IDLE`` once the worker is ready (Linux only).

The last line reads ``xsml_ratio <median xsml / median untagged> xsml_idle_ratio <..>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def run_one(mode: str, frames: int, size: int) -> dict:
    sys.path.insert(0, str(BENCH_DIR))
    import bench_callback

    from bluesky_xsml import TaggingCallback

    if mode == "xsml_idle":
        ready = TaggingCallback.wait_ready

        def wait_ready_then_idle(self, *args, **kwargs):
            out = ready(self, *args, **kwargs)
            for thread in threading.enumerate():
                if thread.name.startswith("xsml") and thread.native_id is not None:
                    os.sched_setscheduler(thread.native_id, os.SCHED_IDLE, os.sched_param(0))
            return out

        TaggingCallback.wait_ready = wait_ready_then_idle
    return bench_callback.run_mode("untagged" if mode == "untagged" else "xsml", frames, size)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--frames", type=int, default=500)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--mode", choices=["untagged", "xsml", "xsml_idle"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mode:
        print(json.dumps(run_one(args.mode, args.frames, args.size)))
        return 0
    runs: dict[str, list[dict]] = {"untagged": [], "xsml": [], "xsml_idle": []}
    for r in range(args.repeats):
        for mode in runs:
            out = subprocess.run([sys.executable, __file__, "--mode", mode, "--frames",
                                  str(args.frames), "--size", str(args.size)],
                                 capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"repeat {r + 1}/{args.repeats}: " + "  ".join(
            f"{m} scan {v[-1]['scan_s']:.2f} s" for m, v in runs.items()), flush=True)
    med = {m: statistics.median(r["scan_s"] for r in v) for m, v in runs.items()}
    for m, v in runs.items():
        last = statistics.median(r["last_tag_s"] for r in v)
        acc = min(r["accounted"] for r in v)
        print(f"{m:10s} scan s median {med[m]:.2f}  last tag s median {last:.2f}  "
              f"accounted (worst run) {acc}/{args.frames}")
    print(f"xsml_ratio {med['xsml'] / med['untagged']:.3f} "
          f"xsml_idle_ratio {med['xsml_idle'] / med['untagged']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
