"""``python -m bluesky_xsml.render_b --n N --out DIR --seed S``: write renderer B frames.

The store has the ``xsml synth`` layout, so ``xsml evaluate --data DIR`` and
``xsml train --data DIR`` read it.  Rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bluesky_xsml.render_b",
                                description="render labelled frames with renderer B")
    p.add_argument("--n", type=int, required=True, help="number of frames")
    p.add_argument("--out", required=True, help="output zarr directory")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--workers", type=int, default=1,
                   help="rendering processes (default 1: this process)")
    p.add_argument("--block", type=int, default=16, help="frames per shard (default 16)")
    p.add_argument("--detectors", nargs="+", default=None, metavar="NAME",
                   help="restrict to these detectors (default: all of renderer B's)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a store written with other settings")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.n < 1 or a.block < 1 or a.workers < 1:
        p.error("--n, --block and --workers must be positive")
    from dataclasses import replace

    from . import SceneSampler
    from .detectors import detector
    from .store import write

    sampler = SceneSampler()
    if a.detectors:
        try:
            for d in a.detectors:
                detector(d)
        except KeyError as err:
            p.error(str(err.args[0]))
        sampler = replace(sampler, detectors=tuple(a.detectors))
    t0 = time.perf_counter()
    try:
        done = write(a.out, a.n, seed=a.seed, workers=a.workers, block=a.block,
                     sampler=sampler, overwrite=a.overwrite, progress=not a.no_progress)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    print(f"wrote {done} frames to {a.out} in {dt:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
