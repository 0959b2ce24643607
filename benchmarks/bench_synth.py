"""Synthetic-data throughput: frames per second of the scattering generator.

    python benchmarks/bench_synth.py [--workers 2] [--n256 3000] [--n1024 300]
                                     [--variety classic|wide|both] [--no-zarr]

Renders frames (scene sampling + rendering + labels, exactly what
``xsml synth`` does per frame) in ``--workers`` processes and prints frames/s

* at 256x256 and 1024x1024 on the square detectors (CCD-like, ``size`` = 256
  and 1024, so every frame is exactly N x N),
* at 256 on the default training mix of detectors (non-square frames have
  fewer pixels),
* end to end through ``write_dataset`` (zarr, compressed, 256).

for the generator profile(s) chosen with ``--variety`` (default ``classic``;
``both`` measures the two side by side), and the ratio to the source work's
speed (200 frames of 256x256 in 85 s; 200 of 1000x1000 in 435 s).  Timings
exclude process start-up and numba compilation (each worker renders two
warm-up frames first).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

SQUARE = ["ccd_1k", "ccd_2k", "ccd_3k", "flatpanel_2k", "adsc_q210"]
SOURCE_FPS = {256: 200 / 85.0, 1024: 200 / 435.0}


def _work(args):
    seed, size, detectors, start, stop, variety = args
    from bluesky_xsml.sim.generator import SceneGenerator

    gen = SceneGenerator(seed=seed, size=size, detectors=detectors, variety=variety)
    pixels = 0
    for i in range(start, stop):
        frame, _labels, _params = gen.frame_at(i)
        pixels += frame.size
    return stop - start, pixels


def _warm(args):
    size, detectors, variety = args
    _work((999, size, detectors, 0, 2, variety))
    return os.getpid()


def measure(pool, workers, size, detectors, n, chunk=20, variety="classic"):
    list(pool.map(_warm, [(size, detectors, variety)] * (2 * workers)))
    tasks = [(1, size, detectors, s, min(n, s + chunk), variety) for s in range(0, n, chunk)]
    t0 = time.perf_counter()
    done = list(pool.map(_work, tasks))
    dt = time.perf_counter() - t0
    frames = sum(d[0] for d in done)
    mpix = sum(d[1] for d in done) / frames / 1e6
    return frames / dt, mpix


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--n256", type=int, default=3000)
    ap.add_argument("--n1024", type=int, default=300)
    ap.add_argument("--nzarr", type=int, default=2000)
    ap.add_argument("--variety", choices=("classic", "wide", "both"), default="classic",
                    help="generator profile to measure (both: classic and wide)")
    ap.add_argument("--no-zarr", action="store_true", help="skip the end-to-end zarr figure")
    a = ap.parse_args()
    varieties = ("classic", "wide") if a.variety == "both" else (a.variety,)
    ctx = get_context("spawn")
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"workers: {a.workers}  (cpus available: {len(os.sched_getaffinity(0))}; "
          f"load average before: {load})")
    with ProcessPoolExecutor(a.workers, mp_context=ctx) as pool:
        for variety in varieties:
            for size, n, dets, label in ((256, a.n256, SQUARE, "256x256 (square detectors)"),
                                         (1024, a.n1024, SQUARE, "1024x1024 (square detectors)"),
                                         (256, a.n256, None, "size 256, training detector mix")):
                fps, mpix = measure(pool, a.workers, size, dets, n, variety=variety)
                ratio = fps / SOURCE_FPS[size]
                label = f"[{variety}] {label}" if a.variety == "both" else label
                print(f"{label:44s} {fps:8.1f} frames/s  ({mpix:.3f} Mpx/frame)  "
                      f"{ratio:6.0f}x the source work")
    if a.no_zarr:
        return
    tmp = tempfile.mkdtemp()
    try:
        from bluesky_xsml.sim.dataset import write_dataset

        path = os.path.join(tmp, "bench.zarr")
        t0 = time.perf_counter()
        write_dataset(path, a.nzarr, size=256, seed=1, workers=a.workers, block=100,
                      progress=False)
        dt = time.perf_counter() - t0
        mb = sum(os.path.getsize(os.path.join(d, f))
                 for d, _, fs in os.walk(path) for f in fs) / 2**20
        print(f"{'xsml synth --size 256 (zarr, end to end)':34s} {a.nzarr / dt:8.1f} frames/s  "
              f"({mb / a.nzarr * 1024:.0f} KiB/frame on disk, incl. worker start-up)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
