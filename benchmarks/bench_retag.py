"""Re-tagging benchmark: frames/s of ``retag_catalog`` with 1 and 2 Dask worker processes.

    python benchmarks/bench_retag.py [--runs 100] [--frames 4] [--size 256] [--workers 1 2]

Writes ``--runs`` runs of ``--frames`` inline ``--size``x``--size`` uint32
frames (synthetic scattering frames from the project's generator) into an
embedded Tiled catalog through bluesky-tiled-plugins' ``TiledWriter``, then
re-tags all of them once per worker count on a ``LocalCluster`` of that many
single-threaded worker processes. Each pass uses its own untrained tagger of
the packaged model's architecture (same cost per frame, a different checkpoint
id, so that no pass skips runs another pass already tagged). The cluster is
started and every worker has loaded its model and tagged one frame before the
clock starts; the time covers listing the runs, reading frames over HTTP,
tagging and writing the streams. The first pass (1 worker) is the baseline;
the last line reads ``ratio <fps with N workers / fps with 1 worker> ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def make_frames(n: int, size: int):
    import numpy as np

    try:
        from bluesky_xsml.sim.generator import SceneGenerator

        gen = SceneGenerator(seed=321, size=size)
        frames = []
        for _ in range(n):  # one shape for all: pad or crop, masked pixels (NaN) -> 0
            f = np.nan_to_num(np.asarray(gen.one()[0], np.float64), nan=0.0)
            out = np.zeros((size, size), np.uint32)
            h, w = min(size, f.shape[0]), min(size, f.shape[1])
            out[:h, :w] = np.clip(f[:h, :w], 0, 2**32 - 1).astype(np.uint32)
            frames.append(out)
        return frames
    except Exception:  # noqa: BLE001 - the generator is optional for this benchmark
        rng = np.random.default_rng(0)
        return [rng.poisson(5, (size, size)).astype(np.uint32) for _ in range(n)]


def write_runs(catalog, n_runs: int, n_frames: int, size: int) -> float:
    import itertools

    from bluesky import RunEngine
    from bluesky.plans import count
    from ophyd.sim import SynSignal

    pool = make_frames(16, size)
    cycle = itertools.cycle(pool)
    det = SynSignal(func=lambda: next(cycle), name="img", labels={"detectors"})
    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(catalog.writer())
    t0 = time.perf_counter()
    for i in range(n_runs):
        RE(count([det], n_frames), sample=f"bench{i}")
    return time.perf_counter() - t0


def _warm(path: str) -> int:
    """On each Dask worker: load the model and tag one frame (compiles the kernels)."""
    import numpy as np

    from bluesky_xsml.scaleout.retag import _load_tagger

    _load_tagger(path, 1).predict(np.zeros((64, 64), np.uint32))
    return os.getpid()


def one_pass(uri: str, n_workers: int, model_path: str) -> dict:
    from distributed import Client, LocalCluster

    from bluesky_xsml.scaleout.retag import retag_catalog

    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(_warm, model_path)
        report = retag_catalog(uri, model=model_path, scheduler=client)
    d = report.to_dict()
    d["frames_per_second"] = report.frames / report.seconds if report.seconds else 0.0  # unrounded
    d["workers"] = n_workers
    d["worker_pids"] = len({row["worker_pid"] for row in report.rows})
    return d


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--frames", type=int, default=4, help="frames per run")
    parser.add_argument("--size", type=int, default=256, help="frame side in pixels")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from bluesky_xsml import Tagger
    from bluesky_xsml.catalog.embedded import EmbeddedCatalog

    workdir = tempfile.mkdtemp(prefix="bench_retag_")
    reference = Tagger.load()  # the packaged model: its architecture sets the cost
    results = []
    with EmbeddedCatalog(os.path.join(workdir, "catalog")) as cat:
        t_write = write_runs(cat, args.runs, args.frames, args.size)
        print(f"wrote {args.runs} runs x {args.frames} frames of {args.size}x{args.size} "
              f"in {t_write:.1f} s", flush=True)
        for i, n in enumerate(args.workers):
            tagger = Tagger.untrained(seed=100 + i, config=reference.net.config)
            path = str(tagger.save(os.path.join(workdir, f"model{i}.pt")))
            r = one_pass(cat.uri, n, path)
            results.append(r)
            print(f"workers {n}: {r['tagged']} runs, {r['frames']} frames in {r['seconds']:.1f} s"
                  f" = {r['frames_per_second']:.3g} frames/s (errors {r['errors']}, "
                  f"{r['worker_pids']} worker processes used)", flush=True)
    base = results[0]["frames_per_second"]
    ratios = {r["workers"]: r["frames_per_second"] / base for r in results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "ratios": ratios}, f, indent=1)
    print("ratio " + " ".join(f"{n}w/1w={v:.2f}" for n, v in ratios.items())
          + f" cpu_cores={os.cpu_count()}")
    return 0 if all(r["errors"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
