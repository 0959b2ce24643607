"""Live tagging benchmark: a RunEngine scan of 1024x1024 uint32 frames, three ways.

    python benchmarks/bench_callback.py [--frames 500] [--size 1024]

1. ``untagged``: the scan alone (the baseline);
2. ``naive``: a callback that calls ``tagger.predict(frame)`` on each event, on
   the RunEngine thread, at batch size 1 (what a user writes first);
3. ``xsml``: :class:`bluesky_xsml.TaggingCallback`.

Each run is its own subprocess (so peak RSS is per mode); modes are interleaved
``--repeats`` times and each mode's best run reported (noise on a shared
machine only adds time), with the spread of scan times. All runs use the same
frames: a pool of synthetic scattering frames from the project's generator
(or Poisson noise if the generator is unavailable), served by an ophyd
``SynSignal`` so the detector itself costs almost nothing. The last line reads
``scan_ratio <xsml/untagged scan time> throughput_ratio <xsml/naive frames per s>
accounted <n>/<total>``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def make_frames(n_distinct: int, size: int):
    import numpy as np

    try:
        from bluesky_xsml.sim.generator import SceneGenerator

        gen = SceneGenerator(seed=123, size=size)
        frames = []
        while len(frames) < n_distinct:
            f, _, _ = gen.one()
            if f.shape == (size, size):
                frames.append(f.astype(np.uint32) if f.dtype != np.uint32 else f)
            elif len(frames) < n_distinct and f.ndim == 2:
                out = np.zeros((size, size), np.uint32)
                h, w = min(size, f.shape[0]), min(size, f.shape[1])
                out[:h, :w] = np.clip(f[:h, :w], 0, None).astype(np.uint32)
                frames.append(out)
        return frames, "generator"
    except Exception:  # the generator module is optional for this benchmark
        rng = np.random.default_rng(0)
        return [rng.poisson(5, (size, size)).astype(np.uint32) for _ in range(n_distinct)], "poisson"


def run_mode(mode: str, n: int, size: int) -> dict:
    import numpy as np
    from bluesky import RunEngine
    from bluesky.plans import scan
    from ophyd.sim import SynAxis, SynSignal

    from bluesky_xsml import Tagger, TaggingCallback

    frames, source = make_frames(16, size)
    counter = iter(range(10**9))
    det = SynSignal(func=lambda: frames[next(counter) % len(frames)], name="saxs",
                    labels={"detectors"})
    motor = SynAxis(name="sample_x")
    RE = RunEngine({}, call_returns_result=False)
    tagger = Tagger.load()
    tagger.warmup(shape=(size, size), dtypes=("uint32",))
    tagger.predict(frames[0])  # warm the batch-1 path too

    tag_times: list[float] = []
    latencies: list[float] = []
    xsml = None
    if mode == "naive":
        def naive(name, doc):
            if name == "event":
                t0 = time.perf_counter()
                tagger.predict(doc["data"]["saxs"])
                t1 = time.perf_counter()
                tag_times.append(t1)
                latencies.append(t1 - t0)

        RE.subscribe(naive)
    elif mode == "xsml":
        def sink(name, doc):
            if name == "event_page":
                now = time.perf_counter()
                tag_times.extend([now] * len(doc["seq_num"]))
                latencies.extend(doc["data"].get("latency", []))

        xsml = TaggingCallback(tagger, downstream=[sink])
        RE.subscribe(xsml)
        xsml.wait_ready(120)  # the worker compiles its kernels first

    t_start = time.perf_counter()
    RE(scan([det], motor, 0, 10, n))
    t_scan = time.perf_counter() - t_start
    accounted = n
    if xsml is not None:
        xsml.flush(600)
        st = xsml.status()
        accounted = st["frames_tagged"] + st["frames_skipped"]
        xsml.close()
    t_last = (tag_times[-1] - t_start) if tag_times else t_scan
    lat = np.asarray(latencies, float)
    return {
        "mode": mode, "frames": n, "size": size, "frame_source": source,
        "scan_s": t_scan, "last_tag_s": t_last,
        "frames_per_s": (len(tag_times) / t_last) if tag_times else float("nan"),
        "latency_p50_ms": float(np.percentile(lat, 50) * 1e3) if lat.size else float("nan"),
        "latency_p99_ms": float(np.percentile(lat, 99) * 1e3) if lat.size else float("nan"),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "accounted": accounted if mode != "untagged" else n,
        "tagged": len(tag_times),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=500)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5,
                   help="runs of each mode, interleaved; the best run of each is reported "
                        "(default 5)")
    p.add_argument("--mode", choices=["untagged", "naive", "xsml"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.frames, args.size)))
        return 0
    runs: dict[str, list[dict]] = {"untagged": [], "naive": [], "xsml": []}
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits all modes
        for mode in runs:
            out = subprocess.run([sys.executable, __file__, "--mode", mode, "--frames",
                                  str(args.frames), "--size", str(args.size)],
                                 capture_output=True, text=True, env=os.environ.copy())
            if out.returncode != 0:
                print(out.stderr, file=sys.stderr)
                return out.returncode
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    # Timing noise on a shared machine only ever adds time, so each mode's best run (shortest
    # time to its last tag) is its most faithful figure, as with timeit. The spread is printed.
    results = {}
    for mode, rs in runs.items():
        best = dict(min(rs, key=lambda r: r["last_tag_s"]))
        best["accounted"] = min(r["accounted"] for r in rs)
        best["spread"] = (min(r["scan_s"] for r in rs), statistics.median(r["scan_s"] for r in rs),
                          max(r["scan_s"] for r in rs))
        results[mode] = best
    print(f"{args.frames} frames of {args.size}x{args.size} uint32 "
          f"({results['xsml']['frame_source']} frames), {os.cpu_count()} CPU cores, "
          f"best of {args.repeats} interleaved runs per mode")
    print(f"{'mode':10s} {'scan s':>8s} {'last tag s':>10s} {'frames/s':>9s} "
          f"{'p50 ms':>8s} {'p99 ms':>8s} {'peak RSS MB':>11s} {'accounted':>10s}")
    for mode, r in results.items():
        print(f"{mode:10s} {r['scan_s']:8.2f} {r['last_tag_s']:10.2f} {r['frames_per_s']:9.1f} "
              f"{r['latency_p50_ms']:8.1f} {r['latency_p99_ms']:8.1f} {r['peak_rss_mb']:11.0f} "
              f"{r['accounted']:>6d}/{r['frames']}")
    for mode, r in results.items():
        lo, med, hi = r["spread"]
        print(f"  {mode:9s} scan s over the runs: min {lo:.2f}  median {med:.2f}  max {hi:.2f}")
    # A frame cannot be tagged before the RunEngine emits it, so TaggingCallback's frames/s is at
    # most the untagged scan's frames/s, and its ratio to the naive callback is at most this:
    bound = results["naive"]["last_tag_s"] / results["untagged"]["scan_s"]
    print(f"throughput_ratio can be at most naive scan / untagged scan = {bound:.2f} here")
    scan_ratio = results["xsml"]["scan_s"] / results["untagged"]["scan_s"]
    thr_ratio = results["xsml"]["frames_per_s"] / results["naive"]["frames_per_s"]
    print(f"scan_ratio {scan_ratio:.3f} throughput_ratio {thr_ratio:.2f} "
          f"accounted {results['xsml']['accounted']}/{args.frames}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
