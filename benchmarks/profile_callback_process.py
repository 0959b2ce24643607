"""Where the RunEngine's process spends its CPU while tagging: per frame, by thread and stage.

    python benchmarks/profile_callback_process.py [--frames 500] [--repeats 2] [--modes ...]

Runs ``bench_callback``'s stress scan (``scan([det], motor, 0, 10, N)`` of
1024x1024 uint32 frames as fast as the RunEngine goes) once per mode, each in
its own subprocess, modes interleaved ``--repeats`` times, and prints CPU
milliseconds per frame *of the RunEngine's process* rather than wall time
(wall-clock ratios are noisy on a shared machine; CPU time is what the scan
competes for):

- ``RE thread``: the RunEngine's thread, ``bluesky-run-engine``, where
  bluesky runs the plan and calls the callbacks (``time.pthread_getcpuclockid``),
  split into ``callback`` (inside ``TaggingCallback.__call__``, timed with
  ``time.thread_time`` around each document) and the rest (the RunEngine, the
  plan, ophyd);
- one line per other Python thread of the process, by name (the feeder
  ``xsml-tagger-feed``, the link ``xsml-tagger-link``, the callback's outbox,
  the in-process worker ``xsml-inference``...);
- ``other threads``: threads Python does not know (torch's intra-op pool);
- ``process``: ``time.process_time()`` of the whole process;
- ``child``: the tagging process's CPU (it runs at ``SCHED_IDLE``, outside
  the RunEngine's process; shown for scale).

Each figure is over the scan only (``RE(...)`` start to end), and, after ``|``,
the tail after it until the last tag is out (``flush``). Medians over repeats.
Modes: ``untagged``, ``thread`` (in-process), ``process`` (the default: frames
copied into the shared ring by a feeder thread here), ``process-peer`` (frames
read by the tagging process out of this process's memory) and
``process-lean`` (no label cache in the tagging process; since issue 22 no mode
sends inputs back unless the callback has input listeners).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of each live Python thread, by name (same names summed)."""
    out: dict[str, float] = {}
    for t in threading.enumerate():
        try:
            clk = time.pthread_getcpuclockid(t.ident)
            s = time.clock_gettime(clk)
        except (OSError, TypeError, ProcessLookupError):
            continue
        # bluesky runs the plan and calls the callbacks on its event loop's thread
        name = "RE thread" if t.name == "bluesky-run-engine" else t.name.split(" ")[0]
        out[name] = out.get(name, 0.0) + s
    return out


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


def _diff(a: dict, b: dict) -> dict:
    return {k: b.get(k, 0.0) - a.get(k, 0.0) for k in set(a) | set(b)}


def run_one(mode: str, n: int, size: int) -> dict:
    from bench_callback import _callback, make_frames, timed_callback
    from bluesky import RunEngine
    from bluesky.plans import scan
    from ophyd.sim import SynAxis, SynSignal

    frames, _ = make_frames(16, size)
    counter = iter(range(10**9))
    RE = RunEngine({}, call_returns_result=False)
    inside = [0.0]
    xsml = None
    if mode != "untagged":
        xsml = _callback(mode, lambda name, doc: None, (size, size))
        RE.subscribe(timed_callback(xsml, inside))
    det = SynSignal(func=lambda: frames[next(counter) % len(frames)], name="saxs",
                    labels={"detectors"})
    motor = SynAxis(name="sample_x")
    worker = getattr(xsml, "worker", None)
    child = getattr(worker, "pid", None)
    # threads named now and at the end (the outbox may start on the first run)
    t0, p0 = _thread_cpu(), time.process_time()
    c0 = _proc_cpu(child) if child else 0.0
    w0 = time.perf_counter()
    RE(scan([det], motor, 0, 10, n))
    wall = time.perf_counter() - w0
    t1, p1 = _thread_cpu(), time.process_time()
    c1 = _proc_cpu(child) if child else 0.0
    in_scan = inside[0]
    if xsml is not None:
        xsml.flush(900)
    t2, p2 = _thread_cpu(), time.process_time()
    c2 = _proc_cpu(child) if child else 0.0
    accounted = n
    if xsml is not None:
        st = xsml.status()
        accounted = st["frames_tagged"] + st["frames_skipped"]
        xsml.close()

    def stage(ta, tb, pa, pb, ca, cb, cb_s):
        d = _diff(ta, tb)
        d["callback"] = cb_s
        d["RE thread"] = d.get("RE thread", 0.0)
        d["RE rest"] = d["RE thread"] - cb_s
        d["process"] = pb - pa
        d["other threads"] = d["process"] - sum(v for k, v in _diff(ta, tb).items())
        d["child"] = cb - ca
        return {k: v * 1e3 / n for k, v in d.items()}

    transport = (worker.describe_process().get("frame_transport", "ring")
                 if hasattr(worker, "describe_process") else "")
    return {"mode": mode, "frames": n, "wall_s": wall, "accounted": accounted,
            "transport": transport,
            "scan": stage(t0, t1, p0, p1, c0, c1, in_scan),
            "tail": stage(t1, t2, p1, p2, c1, c2, inside[0] - in_scan)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=500)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["untagged", "thread", "process",
                                                  "process-peer"])
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.frames, args.size)))
        return 0
    runs: dict[str, list[dict]] = {m: [] for m in args.modes}
    for rep in range(args.repeats):
        for mode in args.modes:
            out = subprocess.run([sys.executable, __file__, "--one", mode, "--frames",
                                  str(args.frames), "--size", str(args.size)],
                                 capture_output=True, text=True, check=False)
            if out.returncode:
                sys.stderr.write(out.stderr[-4000:])
                raise SystemExit(f"run {mode} failed")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs[mode].append(r)
            print(f"[{rep + 1}/{args.repeats}] {mode:12s} scan {r['wall_s']:.2f} s "
                  f"{r['transport']:4s} RE process "
                  f"{r['scan']['process']:.2f} ms/frame  accounted {r['accounted']}/{r['frames']}",
                  flush=True)
    print(f"\nCPU ms per frame of the RunEngine's process, {args.frames} frames of "
          f"{args.size}x{args.size} uint32, medians of {args.repeats} (scan | tail to last tag); "
          f"load {os.getloadavg()[0]:.1f}")
    first = ["RE thread", "callback", "RE rest"]
    last = ["other threads", "process", "child"]
    for mode, rs in runs.items():
        names = sorted({k for r in rs for k in r["scan"]} - set(first) - set(last))
        print(f"{mode}: scan wall {statistics.median(r['wall_s'] for r in rs):.2f} s")
        for name in first + names + last:
            if mode == "untagged" and name in ("callback", "child"):
                continue
            s = statistics.median(r["scan"].get(name, 0.0) for r in rs)
            t = statistics.median(r["tail"].get(name, 0.0) for r in rs)
            if abs(s) < 0.005 and abs(t) < 0.005:
                continue
            print(f"  {name:22s} {s:7.2f} | {t:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
