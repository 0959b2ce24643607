"""Rendering speed of renderer B, in one process.

    python benchmarks/bench_render_b.py --detector b_ccd_512 --n 200

Renders frames ``0..n-1`` of seed 0 on one detector (the scene mix is the
default sampler's) and prints frames per second, after one warm-up frame, by
wall clock and by this process's CPU time (the better figure on a shared
machine, where the wall clock includes waiting for a core).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--detector", default="b_ccd_512")
    p.add_argument("--n", type=int, default=200)
    a = p.parse_args()
    from bluesky_xsml.render_b import SceneSampler, render_scene

    smp = replace(SceneSampler(), detectors=(a.detector,))
    render_scene(0, 10_000, smp)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(a.n):
        render_scene(0, i, smp)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    print(f"{a.detector}: {a.n} frames; wall {dt:.2f} s = {a.n / dt:.1f} frames/s; "
          f"CPU {dc:.2f} s = {a.n / dc:.1f} frames/s ({1000 * dc / a.n:.1f} ms/frame)")


if __name__ == "__main__":
    main()
