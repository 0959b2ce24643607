"""Live tagging benchmark: what tagging costs a RunEngine scan, in-process and in a tagging process.

    python benchmarks/bench_callback.py [--frames 500] [--size 1024] [--repeats 3]

Four experiments, every mode of each run in its own subprocess and all of them
interleaved ``--repeats`` times (drifting machine load hits every mode alike);
medians are reported.

1. **stress**: ``scan([det], motor, 0, 10, N)`` as fast as the RunEngine goes, of
   1024x1024 uint32 frames: ``untagged``, ``thread`` (``TaggingCallback``
   in this process) and ``process`` (``isolation="process"``, frames through the
   shared ring); with ``--peer`` also ``process-peer`` (inline frames read by
   the tagging process out of this process's memory), with ``--lean`` also
   ``process-lean`` (no label cache; since issue 22 the default process mode
   sends no inputs back either: its label cache stays in the tagging process);
   with ``--bound`` also ``untagged-corunner``: the untagged scan while another
   process, at the tagging process's priority (``SCHED_IDLE``) and with its
   threads, runs ``Tagger.predict`` on the same frames in a loop and nothing
   crosses between them. Its ratio is what merely sharing the machine with the
   model costs the scan (caches, memory bandwidth, the scheduler): no design of
   the boundary can go below it.
2. **rates**: ``count([det], num, delay)`` at 20 and 50 frames/s: scan time
   ratio to the untagged count and frame-to-tag latency (p50, p99).
3. **files**: the stress scan with an ophyd area detector writing AD_HDF5
   (frames by resource/datum): untagged, thread and process.
4. **capacity**: a run's documents pushed into the callback as fast as it
   accepts them (no RunEngine), so frames wait ahead of the tagger: frames
   tagged per second, beside the naive per-frame ``Tagger.predict`` and the
   batched ``Tagger.predict`` end to end (bench_inference's figure) on the same
   frames in the same run.

Frames come from a pool of synthetic scattering frames of the project's
generator served by an ophyd ``SynSignal`` (the detector costs almost
nothing). The last line reads ``scan_ratio S rate20_ratio A rate50_ratio B
p99_20hz_ms P files_ratio F capacity_fps C accounted n/N``: S and F for the
tagging process against the untagged scan, A and B likewise at 20 and 50 Hz,
P the tagging process's p99 at 20 Hz, C its capacity, n/N the frames accounted
for (tagged or skipped with a reason) over all tagged runs.

Before it, a CPU table (medians, milliseconds per frame; CPU time, so it
stands a shared machine better than the wall-clock ratios): for each scan
and mode the RunEngine's thread (``bluesky-run-engine``; of it the callback's
``__call__``, and its wait for a core and its time off the CPU otherwise: blocked on a lock,
the GIL, a page fault or I/O),
the rest of the RunEngine's process during the scan and after it until the
last tag is out, the tagging process's feeder thread (the ring copy), and
``own``: what tagging costs the RunEngine's process, the callback plus the
rest of the process over the untagged scan's rest, scan and tail together.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def make_frames(n_distinct: int, size: int):
    import numpy as np

    try:
        from bluesky_xsml.sim.generator import SceneGenerator

        gen = SceneGenerator(seed=123, size=size)
        frames = []
        while len(frames) < n_distinct:
            f, _, _ = gen.one()
            if f.ndim != 2:
                continue
            out = np.zeros((size, size), np.uint32)
            h, w = min(size, f.shape[0]), min(size, f.shape[1])
            out[:h, :w] = np.clip(np.nan_to_num(f[:h, :w]), 0, 2**32 - 1).astype(np.uint32)
            frames.append(out)
        return frames, "generator"
    except Exception:  # noqa: BLE001 - the generator module is optional for this benchmark
        rng = np.random.default_rng(0)
        frames = [rng.poisson(5, (size, size)).astype(np.uint32) for _ in range(n_distinct)]
        return frames, "poisson"


def _callback(mode: str, sink, frames_shape):
    from bluesky_xsml import Tagger, TaggingCallback

    if mode == "thread":
        tagger = Tagger.load()
        tagger.warmup(shape=frames_shape, dtypes=("uint32",))
        xsml = TaggingCallback(tagger, downstream=[sink])
    elif mode == "process-lean":  # the boundary's floor: no label cache, nothing but tags back
        from bluesky_xsml.inference.process import ProcessOptions

        xsml = TaggingCallback(None, downstream=[sink], isolation="process", label_cache_size=0,
                               process_options=ProcessOptions(send_inputs=False))
    elif mode == "process-peer":  # frames read by the child out of this process's memory
        from bluesky_xsml.inference.process import ProcessOptions

        xsml = TaggingCallback(None, downstream=[sink], isolation="process",
                               process_options=ProcessOptions(frame_transport="peer"))
    else:
        xsml = TaggingCallback(None, downstream=[sink], isolation="process")
    xsml.wait_ready(300)
    return xsml


_CORUNNER = """
import sys, time
import numpy as np
from bluesky_xsml import Tagger
from bluesky_xsml.inference.child import set_priority
sys.path.insert(0, {here!r})
from bench_callback import make_frames
set_priority("idle")
frames, _ = make_frames(16, {size})
tagger = Tagger.load()
tagger.warmup(shape=({size}, {size}), dtypes=("uint32",))
print("ready", flush=True)
i = 0
while True:
    tagger.predict(frames[i % len(frames)])
    i += 1
"""


def _start_corunner(size: int) -> subprocess.Popen:
    """A process tagging frames in a loop at ``SCHED_IDLE``, ready before it returns."""
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.Popen([sys.executable, "-c", _CORUNNER.format(here=here, size=size)],
                            stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError("the co-runner did not start")
    time.sleep(1.0)  # into its loop
    return proc


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of each live Python thread of this process, by name."""
    import threading

    out: dict[str, float] = {}
    for t in threading.enumerate():
        try:
            s = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
        except (OSError, TypeError, ProcessLookupError):
            continue
        out[t.name] = out.get(t.name, 0.0) + s
    return out


def _schedstat(tid: int | None) -> tuple[float, float]:
    """(on-CPU, waiting for a CPU) seconds of thread ``tid`` (Linux schedstat), or NaNs."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            run, wait = f.read().split()[:2]
        return int(run) / 1e9, int(wait) / 1e9
    except (OSError, ValueError):
        return float("nan"), float("nan")


def timed_callback(callback, seconds: list):
    """``callback`` that adds the CPU time of the calling thread inside it to ``seconds[0]``."""

    def timed(name, doc):
        t = time.thread_time()
        try:
            return callback(name, doc)
        finally:
            seconds[0] += time.thread_time() - t

    return timed


class _CpuMarks:
    """CPU of the RunEngine's process at the scan's start, end and last tag."""

    def __init__(self, RE=None) -> None:
        import threading

        # bluesky runs the plan and calls the callbacks on its event loop's thread: this
        # RunEngine's (another RunEngine's loop thread may still be alive in this process)
        thread = getattr(RE, "_th", None)
        if thread is None:  # the newest thread of that name
            thread = next((t for t in reversed(threading.enumerate())
                           if t.name == "bluesky-run-engine"), None)
        self.tid = getattr(thread, "native_id", None)
        self.marks: list[tuple] = []

    def mark(self) -> None:
        self.marks.append((time.perf_counter(), time.process_time(), _schedstat(self.tid),
                           _thread_cpu()))

    def per_frame(self, n: int, callback_s: float) -> dict:
        """Milliseconds per frame (see the module docstring)."""
        (w0, p0, (r0, q0), t0), (w1, p1, (r1, q1), _), (_, p2, _, t2) = self.marks
        ms = 1e3 / n
        feed = "xsml-tagger-feed"
        return {"re_ms": (r1 - r0) * ms, "re_wait_ms": (q1 - q0) * ms,
                "re_blocked_ms": ((w1 - w0) - (r1 - r0) - (q1 - q0)) * ms,
                "callback_ms": callback_s * ms,
                "rest_ms": ((p1 - p0) - (r1 - r0)) * ms, "tail_ms": (p2 - p1) * ms,
                "feed_ms": (t2.get(feed, 0.0) - t0.get(feed, 0.0)) * ms}


def run_one(experiment: str, mode: str, n: int, size: int, rate: float = 0.0) -> dict:
    """One run in this process; returns its figures."""
    import numpy as np
    from bluesky import RunEngine
    from bluesky.plans import count, scan
    from ophyd.sim import SynAxis, SynSignal

    frames, source = make_frames(16, size)
    counter = iter(range(10**9))
    RE = RunEngine({}, call_returns_result=False)
    latencies: list[float] = []
    tagged = [0]

    def sink(name, doc):
        if name == "event_page" and "latency" in doc["data"]:
            latencies.extend(doc["data"]["latency"])
            tagged[0] += len(doc["seq_num"])

    xsml = corunner = None
    in_callback = [0.0]  # CPU seconds of the RunEngine's thread inside the callback
    if mode == "untagged-corunner":
        corunner = _start_corunner(size)
    elif mode != "untagged":
        xsml = _callback(mode, sink, (size, size))

        RE.subscribe(timed_callback(xsml, in_callback))
    tmp = tempfile.TemporaryDirectory()
    if experiment == "files":
        from bluesky_xsml.sim.detectors import HDF5ResourceDetector

        det = HDF5ResourceDetector("ad", lambda: frames[next(counter) % len(frames)], tmp.name)
    else:
        det = SynSignal(func=lambda: frames[next(counter) % len(frames)], name="saxs",
                        labels={"detectors"})
    motor = SynAxis(name="sample_x")
    cpu = _CpuMarks(RE)
    cpu.mark()
    t0 = time.perf_counter()
    if experiment == "rate":
        RE(count([det], num=n, delay=1.0 / rate))
    else:
        RE(scan([det], motor, 0, 10, n))
    scan_s = time.perf_counter() - t0
    cpu.mark()
    callback_s = in_callback[0]
    if corunner is not None:
        corunner.kill()
        corunner.wait()
    accounted = n
    if xsml is not None:
        xsml.flush(900)
    cpu.mark()
    if xsml is not None:
        st = xsml.status()
        accounted = st["frames_tagged"] + st["frames_skipped"]
        xsml.close()
    tmp.cleanup()
    lat = np.asarray(latencies, float)
    return {"experiment": experiment, "mode": mode, "rate": rate, "frames": n,
            "source": source, "scan_s": scan_s, "accounted": accounted,
            "cpu": cpu.per_frame(n, callback_s),
            "p50_ms": float(np.percentile(lat, 50) * 1e3) if lat.size else float("nan"),
            "p99_ms": float(np.percentile(lat, 99) * 1e3) if lat.size else float("nan")}


def run_capacity(mode: str, n: int, size: int) -> dict:
    """Documents pushed as fast as accepted; frames/s to the last tag."""
    from event_model import compose_run

    frames, source = make_frames(16, size)
    if mode in ("naive", "batched"):
        from bluesky_xsml import Tagger

        tagger = Tagger.load()
        tagger.warmup(shape=(size, size), dtypes=("uint32",))
        tagger.predict(frames[:8])
        t0 = time.perf_counter()
        if mode == "naive":
            for i in range(n):
                tagger.predict(frames[i % len(frames)])
        else:
            for i in range(0, n, 32):
                tagger.predict([frames[j % len(frames)] for j in range(i, min(n, i + 32))])
        dt = time.perf_counter() - t0
        return {"experiment": "capacity", "mode": mode, "frames": n, "fps": n / dt,
                "accounted": n}
    done = [0, 0.0]

    def sink(name, doc):
        if name == "event_page" and "latency" in doc["data"]:
            done[0] += len(doc["seq_num"])
            done[1] = time.perf_counter()

    xsml = _callback(mode, sink, (size, size))
    bundle = compose_run()
    desc = bundle.compose_descriptor(
        name="primary", data_keys={"saxs": {"source": "sim", "dtype": "array",
                                            "shape": [size, size]}})
    t0 = time.perf_counter()
    xsml("start", bundle.start_doc)
    xsml("descriptor", desc.descriptor_doc)
    for i in range(n):
        xsml("event", desc.compose_event(data={"saxs": frames[i % len(frames)]},
                                         timestamps={"saxs": time.time()}))
    xsml("stop", bundle.compose_stop())
    xsml.flush(900)
    st = xsml.status()
    xsml.close()
    dt = (done[1] or time.perf_counter()) - t0
    return {"experiment": "capacity", "mode": mode, "frames": n, "fps": done[0] / dt,
            "accounted": st["frames_tagged"] + st["frames_skipped"],
            "source": source, "tagged": done[0]}


def _sub(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         env=os.environ.copy())
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"benchmark run {args} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _print_cpu(results: dict, modes: tuple) -> None:
    """The CPU table: milliseconds per frame of the RunEngine's process, medians."""
    print("CPU ms per frame of the RunEngine's process (medians): RE thread [callback in it; "
          "waiting for a core; blocked], rest of the process during the scan | after it to the "
          "last tag, the feeder (ring copy); own = callback + rest + tail - untagged rest")
    for exp, rate in (("stress", 0.0), ("rate", 20.0), ("rate", 50.0), ("files", 0.0)):
        if (exp, "untagged", rate) not in results:
            continue

        def cpu(mode, field, exp=exp, rate=rate):
            rs = [r["cpu"][field] for r in results.get((exp, mode, rate), []) if "cpu" in r]
            return statistics.median(rs) if rs else float("nan")

        label = f"{exp} {int(rate)} Hz" if rate else exp
        base_rest = cpu("untagged", "rest_ms")
        for mode in ("untagged", *modes):
            if (exp, mode, rate) not in results:
                continue
            own = (cpu(mode, "callback_ms") + cpu(mode, "rest_ms") + cpu(mode, "tail_ms")
                   - base_rest)
            print(f"{label:12s} {mode:17s} RE thread {cpu(mode, 're_ms'):5.2f} "
                  f"[{cpu(mode, 'callback_ms'):4.2f}; {cpu(mode, 're_wait_ms'):4.2f}; "
                  f"{cpu(mode, 're_blocked_ms'):4.2f}]  rest {cpu(mode, 'rest_ms'):5.2f} | "
                  f"{cpu(mode, 'tail_ms'):5.2f}  feeder {cpu(mode, 'feed_ms'):4.2f}"
                  + (f"  own {own:5.2f}" if mode not in ("untagged", "untagged-corunner")
                     else ""))
            label = ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=500, help="frames of the stress and files "
                   "scans (default 500)")
    p.add_argument("--rate-frames", type=int, default=200,
                   help="frames of each detector-rate count (default 200)")
    p.add_argument("--capacity-frames", type=int, default=300,
                   help="frames pushed in the capacity runs (default 300)")
    p.add_argument("--size", type=int, default=1024, help="frame side in pixels (default 1024)")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved repeats of every run; medians are reported (default 3)")
    p.add_argument("--only", choices=["stress", "rate", "files", "capacity"], action="append",
                   help="run only these experiments (repeatable)")
    p.add_argument("--lean", action="store_true",
                   help="also run 'process-lean': the tagging process with no label cache "
                        "(the boundary's floor; no mode sends inputs back since issue 22)")
    p.add_argument("--peer", action="store_true",
                   help="also run 'process-peer': the tagging process reading inline frames "
                        "out of the RunEngine's process's memory (process_vm_readv) instead of "
                        "the shared ring")
    p.add_argument("--bound", action="store_true",
                   help="also run 'untagged-corunner' (stress and files): the untagged scan "
                        "beside a SCHED_IDLE process running the model in a loop, nothing "
                        "crossing; the floor that sharing the machine with the model sets")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        spec = json.loads(args.one)
        if spec["experiment"] == "capacity":
            print(json.dumps(run_capacity(spec["mode"], spec["n"], args.size)))
        else:
            print(json.dumps(run_one(spec["experiment"], spec["mode"], spec["n"], args.size,
                                     spec.get("rate", 0.0))))
        return 0
    wanted = set(args.only or ["stress", "rate", "files", "capacity"])
    plan = []
    tagged_modes = (("thread", "process") + (("process-peer",) if args.peer else ())
                    + (("process-lean",) if args.lean else ()))
    if args.bound:
        tagged_modes += ("untagged-corunner",)
    for mode in ("untagged", *tagged_modes):
        if "stress" in wanted:
            plan.append({"experiment": "stress", "mode": mode, "n": args.frames})
        if "rate" in wanted and mode != "untagged-corunner":
            for rate in (20.0, 50.0):
                plan.append({"experiment": "rate", "mode": mode, "n": args.rate_frames,
                             "rate": rate})
        if "files" in wanted:
            plan.append({"experiment": "files", "mode": mode, "n": args.frames})
    if "capacity" in wanted:
        for mode in ("naive", "batched", "thread", "process"):
            plan.append({"experiment": "capacity", "mode": mode, "n": args.capacity_frames})
    results: dict[tuple, list[dict]] = {}
    t_all = time.perf_counter()
    for rep in range(args.repeats):
        for spec in plan:
            key = (spec["experiment"], spec["mode"], spec.get("rate", 0.0))
            r = _sub(["--one", json.dumps(spec), "--size", str(args.size)])
            results.setdefault(key, []).append(r)
            print(f"[{rep + 1}/{args.repeats}] {key[0]:8s} {key[1]:12s} "
                  f"{(str(int(key[2])) + ' Hz') if key[2] else '':6s} "
                  + (f"scan {r['scan_s']:.2f} s p99 {r['p99_ms']:.0f} ms" if "scan_s" in r
                     else f"{r['fps']:.1f} frames/s"), flush=True)

    def med(key, field):
        return statistics.median(r[field] for r in results[key])

    print(f"\n{args.size}x{args.size} uint32 frames, {os.cpu_count()} CPU cores, medians of "
          f"{args.repeats} interleaved runs ({time.perf_counter() - t_all:.0f} s in all)")
    figures = {}
    accounted = total = 0
    for exp, rate in (("stress", 0.0), ("rate", 20.0), ("rate", 50.0), ("files", 0.0)):
        if (exp, "untagged", rate) not in results:
            continue
        base = med((exp, "untagged", rate), "scan_s")
        label = f"{exp} {int(rate)} Hz" if rate else exp
        print(f"{label:12s} untagged {base:7.2f} s")
        for mode in tagged_modes:
            key = (exp, mode, rate)
            if key not in results:
                continue
            ratio = med(key, "scan_s") / base
            figures[(exp, mode, rate)] = ratio
            print(f"{'':12s} {mode:12s} {med(key, 'scan_s'):7.2f} s  ratio {ratio:.3f}  "
                  f"latency p50 {med(key, 'p50_ms'):6.0f} ms  p99 {med(key, 'p99_ms'):6.0f} ms")
            if mode == "untagged-corunner":  # nothing tagged: nothing to account for
                continue
            for r in results[key]:
                accounted += r["accounted"]
                total += r["frames"]
    _print_cpu(results, tagged_modes)
    cap = {}
    if ("capacity", "process", 0.0) in results:
        for mode in ("naive", "batched", "thread", "process"):
            cap[mode] = med(("capacity", mode, 0.0), "fps")
        print(f"capacity     naive predict {cap['naive']:.1f}  batched predict "
              f"{cap['batched']:.1f}  thread {cap['thread']:.1f}  process {cap['process']:.1f} "
              f"frames/s (process = {cap['process'] / cap['batched']:.2f} of batched predict, "
              f"{cap['process'] / cap['naive']:.1f}x naive)")
        for mode in ("thread", "process"):
            for r in results[("capacity", mode, 0.0)]:
                accounted += r["accounted"]
                total += r["frames"]

    def fig(key, fmt="{:.3f}"):
        return fmt.format(figures[key]) if key in figures else "nan"

    p99 = (f"{med(('rate', 'process', 20.0), 'p99_ms'):.0f}"
           if ("rate", "process", 20.0) in results else "nan")
    print(f"scan_ratio {fig(('stress', 'process', 0.0))} "
          f"rate20_ratio {fig(('rate', 'process', 20.0))} "
          f"rate50_ratio {fig(('rate', 'process', 50.0))} p99_20hz_ms {p99} "
          f"files_ratio {fig(('files', 'process', 0.0))} "
          f"capacity_fps {cap.get('process', float('nan')):.1f} accounted {accounted}/{total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
