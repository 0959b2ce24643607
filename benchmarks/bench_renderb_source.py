"""Build speed of a ``renderb:`` data source: render, preprocess and cache renderer B frames.

    python benchmarks/bench_renderb_source.py --n 200 --workers 2

Builds ``renderb:seed=S,n=N`` (renderer B's default detector mix, native frame sizes up to
1475 px) with :func:`bluesky_xsml.training.data.load_arrays` into a fresh temporary cache,
exactly as ``xsml train --data renderb:...`` does before training, and prints frames per
second by wall clock and by CPU time (this process and its rendering workers; the better
figure on a shared machine, where the wall clock includes waiting for a core), the load
average, and the cache's size on disk per frame.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    from bluesky_xsml.training.data import load_arrays

    source = f"renderb:seed={a.seed},n={a.n}"
    cache = tempfile.mkdtemp(prefix="bench-renderb-")
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    try:
        t0, c0 = time.perf_counter(), _cpu()
        arrays = load_arrays(source, cache_dir=cache, workers=a.workers, progress=False)
        dt, dc = time.perf_counter() - t0, _cpu() - c0
        size = sum(f.stat().st_size for f in os.scandir(next(os.scandir(cache)).path))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"{source}, {a.workers} workers: {len(arrays)} frames "
          f"({len(set(arrays.detectors.tolist()))} detectors); load average before {load}")
    print(f"wall {dt:.1f} s = {a.n / dt:.2f} frames/s; CPU {dc:.1f} s = "
          f"{1000 * dc / a.n:.0f} ms/frame ({a.n / dc:.2f} frames/s per core)")
    print(f"cache: {size / a.n / 1024:.1f} KiB per frame on disk "
          f"(inputs {arrays.inputs.nbytes / a.n / 1024:.1f} KiB); 24,000 frames: "
          f"{24000 * size / a.n / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
