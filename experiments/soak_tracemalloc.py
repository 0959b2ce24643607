"""Where a soak's memory goes: ``tracemalloc`` snapshots one minute in and near the end.

    python experiments/soak_tracemalloc.py [--size 1024] [--rate 20] [--minutes 5]
                                           [--label-cache 16] [--no-checkpoint]

Runs the soak's plan (``benchmarks/soak.py``: back-to-back runs of a
``SynSignal`` through ``TaggingCallback`` and a counting sink) with
``tracemalloc`` tracing 8 frames deep. It prints RSS per frame between the two
snapshots and the allocation sites that grew most. ``--no-checkpoint``
replays the plan as it was before the fix: no ``checkpoint`` per point, so
the RunEngine's rewind cache holds every ``Msg`` of the plan, which then leads
the list. Memory that torch or other C code allocates is not traced; it shows
only as the gap between RSS growth and traced growth.
"""

from __future__ import annotations

import argparse
import gc
import sys
import threading
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--label-cache", type=int, default=16,
                   help="small, so that filling the label cache does not hide other growth")
    p.add_argument("--no-checkpoint", action="store_true",
                   help="the plan without a checkpoint per point (before the fix)")
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args(argv)

    import soak
    from bluesky import RunEngine
    from bluesky import plan_stubs as bps
    from bluesky.preprocessors import plan_mutator
    from ophyd.sim import SynSignal

    from bluesky_xsml import Tagger, TaggingCallback

    frames = soak.make_frames(16, args.size)
    counter = iter(range(10**12))
    det = SynSignal(func=lambda: frames[next(counter) % len(frames)], name="saxs",
                    labels={"detectors"})
    xsml = TaggingCallback(Tagger.load(), downstream=[soak.CountingSink()],
                           label_cache_size=args.label_cache)
    xsml.wait_ready(120)
    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(xsml)
    if args.no_checkpoint:
        def no_checkpoint(msg):  # drop the plan's checkpoints
            if msg.command == "checkpoint":
                return bps.null(), None
            return None, None
        RE.preprocessors.append(lambda plan: plan_mutator(plan, no_checkpoint))
    total = int(args.minutes * 60 * args.rate)
    produced = [0]
    snaps = []

    def snapper():
        time.sleep(60)
        for wait in (0.0, args.minutes * 60 - 90):
            time.sleep(wait)
            gc.collect()
            snaps.append((produced[0], soak.rss_mb(), tracemalloc.take_snapshot()))

    tracemalloc.start(8)
    threading.Thread(target=snapper, daemon=True).start()
    RE(soak.paced_runs(det, rate=args.rate, total=total, run_frames=600, produced=produced))
    xsml.flush(60)
    while len(snaps) < 2:
        time.sleep(1)
    xsml.close(10)
    (n1, r1, s1), (n2, r2, s2) = snaps
    frames_between = max(1, n2 - n1)
    stats = s2.compare_to(s1, "traceback")
    traced = sum(s.size_diff for s in stats)
    print(f"frames {n1} -> {n2}: RSS {r1:.1f} -> {r2:.1f} MB "
          f"({(r2 - r1) * 2**20 / frames_between:.0f} B/frame); traced "
          f"{traced / frames_between:.0f} B/frame")
    for s in stats[:args.top]:
        print(f"{s.size_diff / 1024:9.1f} KiB {s.count_diff:+8d} blocks "
              f"({s.size_diff / max(1, s.count_diff):.0f} B each)")
        for line in s.traceback.format()[-6:]:
            print("      ", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
