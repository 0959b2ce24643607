"""Steering benchmark: decision latency while tagging, and a steered scan vs a uniform one.

    python benchmarks/bench_steering.py [--frames 200] [--rate 20] [--size 256]

1. ``latency``: a ``count`` of the simulated beamline detector at ``--rate``
   frames/s, tagged live by ``TaggingCallback`` (packaged model) with a
   ``PolicyEngine`` fed by its result listener. For each frame: tag latency
   (the callback's ``latency``: frame arrival to tag, the baseline) and decision
   latency (the event document's ``time`` to the moment the engine's decision
   reflects the frame). Prints p50/p99 of both and their ratio.
2. ``scan``: ``tag_steered_scan`` over the combinatorial sample at y = 2 mm,
   5 coarse points, ``refine=3``, against a uniform scan at the refined step
   (17 points, the baseline). Prints the points each took, the wall times, and
   the bracket (distance between the measured points on either side) of each
   region boundary the scan crosses.

The last line reads ``decision_p50_ms <..> decision_p99_ms <..> points_ratio
<steered/uniform> worst_bracket_mm <steered> <uniform>``.
"""

from __future__ import annotations

import argparse
import itertools
import time


def _quantile(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def bench_latency(tagger, frames: int, rate: float, size: int) -> dict:
    from bluesky import RunEngine
    from bluesky.plans import count

    from bluesky_xsml.documents.callback import TaggingCallback
    from bluesky_xsml.sim.sample import make_beamline
    from bluesky_xsml.steering.policy import PolicyEngine

    bl = make_beamline(size=size)
    bl.sample_x.set(5.0).wait()
    bl.sample_y.set(2.0).wait()
    engine = PolicyEngine()
    event_time: dict[int, float] = {}
    decided: dict[int, float] = {}
    tag_latency: list[float] = []

    def on_event(name, doc):
        if name == "event" and "saxs_image" in doc["data"]:
            event_time[doc["seq_num"]] = doc["time"]

    def after_decision(run_uid, results):  # runs right after engine.update, same thread
        now = time.time()
        for r in results:
            decided[r.seq_num] = now
            tag_latency.append(r.latency)

    xsml = TaggingCallback(tagger, max_wait=0.01)
    xsml.add_result_listener(engine.update)
    xsml.add_result_listener(after_decision)
    xsml.wait_ready(120)
    tagger.predict([bl.sample.frame_at(5.0, 2.0)])   # warm the model outside the timing
    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(on_event)
    RE.subscribe(xsml)
    t0 = time.perf_counter()
    RE(count([bl.det], frames, delay=1.0 / rate))
    scan_s = time.perf_counter() - t0
    xsml.flush(60)
    xsml.close()
    lat = [decided[s] - event_time[s] for s in event_time if s in decided]
    return {"frames": len(event_time), "decided": len(lat), "scan_s": scan_s,
            "rate": len(event_time) / scan_s,
            "tag_p50": _quantile(tag_latency, 0.5), "tag_p99": _quantile(tag_latency, 0.99),
            "dec_p50": _quantile(lat, 0.5), "dec_p99": _quantile(lat, 0.99),
            "decision": engine.current.action}


def _brackets(sample, positions, y=2.0):
    ordered = sorted(positions)
    out = []
    for a, b in itertools.pairwise(ordered):
        ra, rb = sample.region_at(a, y), sample.region_at(b, y)
        if ra != rb and not {ra, rb} <= {"amorphous", "mixed"}:
            out.append((ra, rb, b - a))
    return out


def bench_scan(tagger, size: int) -> dict:
    from bluesky import RunEngine
    from bluesky.plans import scan

    from bluesky_xsml.documents.callback import TaggingCallback
    from bluesky_xsml.sim.sample import make_beamline
    from bluesky_xsml.steering.plans import tag_steered_scan
    from bluesky_xsml.steering.policy import PolicyEngine

    out = {}
    for mode in ("uniform", "steered"):
        bl = make_beamline(size=size)
        bl.sample_y.set(2.0).wait()
        xsml = TaggingCallback(tagger, max_wait=0.01)
        positions = []

        def keep(name, doc, positions=positions):  # this mode's list
            if name == "event" and "sample_x" in doc["data"]:
                positions.append(doc["data"]["sample_x"])

        xsml.wait_ready(120)
        RE = RunEngine({}, call_returns_result=False)
        RE.subscribe(xsml)
        RE.subscribe(keep)
        t0 = time.perf_counter()
        if mode == "uniform":
            RE(scan([bl.det], bl.sample_x, 0.4, 9.0, 17))
        else:
            RE(tag_steered_scan([bl.det], bl.sample_x, 0.4, 9.0, 5, callback=xsml,
                                engine=PolicyEngine(), refine=3))
        xsml.flush(60)
        wall = time.perf_counter() - t0
        xsml.close()
        out[mode] = {"points": len(positions), "wall_s": wall,
                     "brackets": _brackets(bl.sample, positions)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)

    from bluesky_xsml.inference.tagger import Tagger

    tagger = Tagger.load()
    lat = bench_latency(tagger, args.frames, args.rate, args.size)
    print(f"latency: {lat['frames']} frames at {lat['rate']:.1f} frames/s "
          f"(asked {args.rate:g}); decided {lat['decided']}/{lat['frames']}")
    print(f"  tag latency (arrival -> tag, baseline)     p50 {1e3 * lat['tag_p50']:.1f} ms  "
          f"p99 {1e3 * lat['tag_p99']:.1f} ms")
    print(f"  decision latency (event -> decision)       p50 {1e3 * lat['dec_p50']:.1f} ms  "
          f"p99 {1e3 * lat['dec_p99']:.1f} ms  ratio p50 {lat['dec_p50'] / lat['tag_p50']:.2f}")
    sc = bench_scan(tagger, args.size)
    for mode in ("uniform", "steered"):
        m = sc[mode]
        br = ", ".join(f"{a}->{b} {w:.3f} mm" for a, b, w in m["brackets"])
        print(f"scan {mode:8s}: {m['points']:3d} points  {m['wall_s']:.2f} s  brackets: {br}")
    worst = {k: max((w for *_, w in sc[k]["brackets"]), default=float("nan")) for k in sc}
    print(f"decision_p50_ms {1e3 * lat['dec_p50']:.1f} decision_p99_ms {1e3 * lat['dec_p99']:.1f} "
          f"points_ratio {sc['steered']['points'] / sc['uniform']['points']:.2f} "
          f"worst_bracket_mm {worst['steered']:.3f} {worst['uniform']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
