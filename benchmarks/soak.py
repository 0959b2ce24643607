"""Soak test: frames at a steady rate through a real RunEngine for minutes, nothing lost.

    python benchmarks/soak.py                 # 30 minutes at 20 Hz, 1024x1024 uint32
    python benchmarks/soak.py --minutes 2     # the CI version (tests/test_soak.py)

A real ``RunEngine`` runs back-to-back runs (``--run-frames`` frames each, so
per-run state is created and released many times; each point checkpoints, as
bluesky's plans do, so the RunEngine's rewind cache stays bounded) of an ophyd ``SynSignal``
serving a pool of synthetic scattering frames, paced at ``--rate`` frames per
second, into :class:`bluesky_xsml.TaggingCallback` with the packaged default
model (``Tagger.load()``). The downstream is a counting sink that keeps no
documents (so the process's own memory is what is measured).

Every ``--sample`` seconds it records the resident memory (VmRSS) and the
queue depths (frames waiting for the model, documents waiting for delivery).
It prints one line per ``--window`` (default: a minute) with frames, latency
p50/p99 (frame arrival to its tag, from the tag events' ``latency``), RSS and
queue maxima, then one ``PASS``/``FAIL`` line per criterion:

* ``rss``: resident memory growth after warm-up (median of the first three
  samples after ``--warmup`` seconds vs the median of the last three) < 5%.
  The warm-up lasts at least until the callback's bounded label cache
  (``label_cache_size`` frames of preprocessed input, about 192 KiB each) is
  full, since filling it is expected growth, not a leak;
* ``queues``: the inference queue never held more than ``--max-queue-s``
  seconds of frames, and the delivery queue stayed below 1000 documents;
* ``latency``: p99 does not drift: the median p99 of the last third of the
  windows after warm-up is at most twice that of the first third, plus 50 ms
  (single slow windows, e.g. another process taking the CPU, are reported
  but do not fail it);
* ``accounted``: every frame the detector produced has exactly one tag event
  (tagged or skipped with a reason) and the stops' ``xsml_frames`` add up;
* ``rate``: the RunEngine kept at least 95% of the requested rate (the tagger
  never held it back).

The exit status is 0 only if every criterion passes; ``--json PATH`` writes
the figures for programs (tests/test_soak.py reads it).
"""

from __future__ import annotations

import argparse
import array
import collections
import json
import os
import statistics
import sys
import threading
import time


def rss_mb() -> float:
    """Resident set size of this process, MB (from /proc; ru_maxrss is a peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")  # pragma: no cover - not Linux


def make_frames(n: int, size: int):
    """A pool of synthetic scattering frames, size x size uint32."""
    import numpy as np

    from bluesky_xsml.sim.generator import SceneGenerator

    gen = SceneGenerator(seed=7, size=size)
    frames = []
    while len(frames) < n:
        f, _, _ = gen.one()
        out = np.zeros((size, size), np.uint32)
        h, w = min(size, f.shape[0]), min(size, f.shape[1])
        out[:h, :w] = np.clip(np.nan_to_num(f[:h, :w]), 0, 2**32 - 1).astype(np.uint32)
        frames.append(out)
    return frames


class CountingSink:
    """Downstream callback that counts what it receives and keeps no documents."""

    def __init__(self):
        self.lock = threading.Lock()
        self.tag_desc: set = set()
        self.source_desc: set = set()
        self.events = 0
        # Tag events per open run, keyed (source seq_num, frame index); folded into the
        # totals at the run's stop so the sink's own memory stays flat over a long soak.
        self._run_keys: dict[str, collections.Counter] = {}
        self.tag_events = 0
        self.distinct = 0
        self.duplicates = 0
        self.skipped: collections.Counter = collections.Counter()
        self.stops = 0
        self.stop_frames = 0
        self.arrivals = array.array("d")  # monotonic arrival time of each tagged frame
        self.latencies = array.array("d")  # its latency, s (16 bytes a frame in all)
        self.order_errors = 0
        self._open: set = set()
        self._desc_run: dict = {}

    def __call__(self, name, doc):
        with self.lock:
            if name == "start":
                self._open.add(doc["uid"])
                self._run_keys[doc["uid"]] = collections.Counter()
            elif name == "descriptor":
                self._desc_run[doc["uid"]] = doc["run_start"]
                (self.tag_desc if doc["name"] == "xsml_tags" else self.source_desc).add(doc["uid"])
            elif name == "event":
                self.events += 1
                if self._desc_run.get(doc["descriptor"]) not in self._open:
                    self.order_errors += 1
            elif name == "event_page" and doc["descriptor"] in self.tag_desc:
                run = self._desc_run[doc["descriptor"]]
                if run not in self._open:
                    self.order_errors += 1
                now = time.monotonic()
                data = doc["data"]
                for i, seq in enumerate(data["source_seq_num"]):
                    keys = self._run_keys.get(run)
                    if keys is None:  # a tag page for a run already stopped: counted
                        self.tag_events += 1
                        continue
                    keys[(seq, data["frame_index"][i])] += 1
                    reason = data["skip_reason"][i]
                    if reason:
                        self.skipped[reason.split(":")[0]] += 1
                    else:
                        self.arrivals.append(now)
                        self.latencies.append(data["latency"][i])
            elif name == "stop":
                if doc["run_start"] not in self._open:
                    self.order_errors += 1
                self._open.discard(doc["run_start"])
                keys = self._run_keys.pop(doc["run_start"], collections.Counter())
                self.tag_events += sum(keys.values())
                self.distinct += len(keys)
                self.duplicates += sum(1 for n in keys.values() if n > 1)
                self.stops += 1
                self.stop_frames += int(doc.get("xsml_frames", 0))
                for d in [d for d, r in self._desc_run.items() if r == doc["run_start"]]:
                    del self._desc_run[d]
                    self.tag_desc.discard(d)
                    self.source_desc.discard(d)


def paced_runs(det, *, rate: float, total: int, run_frames: int, produced: list):
    """Back-to-back runs of ``run_frames`` reads, paced at ``rate`` per second overall."""
    from bluesky import plan_stubs as bps
    from bluesky import preprocessors as bpp

    period = 1.0 / rate
    t0 = time.monotonic()
    done = 0
    while done < total:
        n = min(run_frames, total - done)

        @bpp.run_decorator(md={"purpose": "xsml soak"})
        def one_run(first=done, n=n):
            for i in range(n):
                delay = t0 + (first + i) * period - time.monotonic()
                if delay > 0:
                    yield from bps.sleep(delay)
                yield from bps.checkpoint()  # as scan/count do per step; bounds the
                yield from bps.trigger_and_read([det])  # RunEngine's rewind cache
                produced[0] += 1

        yield from one_run()
        done += n


def percentile(values, q):
    import numpy as np

    return float(np.percentile(values, q)) if len(values) else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=20.0, help="frames per second")
    p.add_argument("--size", type=int, default=1024, help="frame side (pixels)")
    p.add_argument("--run-frames", type=int, default=600, help="frames per run")
    p.add_argument("--label-cache", type=int, default=None,
                   help="frames the callback keeps for labeling (label_cache_size; default: "
                        "the callback's default); the cache fills during warm-up")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds before memory is baseline (default: min(120, 25%% of the run), "
                        "and at least the time to fill the label cache + 10 s)")
    p.add_argument("--window", type=float, default=None,
                   help="latency window, s (default 60, or 20 for runs under 10 minutes)")
    p.add_argument("--sample", type=float, default=2.0, help="seconds between samples")
    p.add_argument("--max-queue-s", type=float, default=5.0,
                   help="most seconds of frames the inference queue may hold")
    p.add_argument("--json", default=None, help="write the figures to this file")
    args = p.parse_args(argv)

    import inspect

    import numpy as np
    from bluesky import RunEngine
    from ophyd.sim import SynSignal

    from bluesky_xsml import Tagger, TaggingCallback

    duration = args.minutes * 60
    options = {}
    try:  # the callback's options as one object (since the layers redesign)
        from bluesky_xsml.documents.options import CallbackOptions

        default_cache: int | None = CallbackOptions().label_cache_size
    except ImportError:  # an older tree: the option is a keyword of TaggingCallback
        cache = inspect.signature(TaggingCallback).parameters.get("label_cache_size")
        default_cache = cache.default if cache is not None else None
    if args.label_cache is not None and default_cache is not None:
        options["label_cache_size"] = args.label_cache
    cache_frames = options.get("label_cache_size", default_cache or 0)
    fill_s = cache_frames / args.rate + 10 if cache_frames else 0.0
    warmup = (args.warmup if args.warmup is not None
              else min(max(min(120.0, 0.25 * duration), fill_s), 0.6 * duration))
    window = args.window or (60.0 if args.minutes >= 10 else 20.0)
    total = int(round(duration * args.rate))

    frames = make_frames(16, args.size)
    counter = iter(range(10**12))
    det = SynSignal(func=lambda: frames[next(counter) % len(frames)], name="saxs",
                    labels={"detectors"})
    tagger = Tagger.load()
    sink = CountingSink()
    xsml = TaggingCallback(tagger, downstream=[sink], **options)
    xsml.wait_ready(120)
    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(xsml)

    samples = []  # (t, rss MB, inference queue jobs, documents queued, pending MB)
    produced = [0]
    stop_sampling = threading.Event()

    def sampler():
        while not stop_sampling.is_set():
            st = xsml.status()
            samples.append((time.monotonic() - t_start, rss_mb(), st["queue_jobs"],
                            st["documents_queued"], st["pending_bytes"] / 2**20))
            stop_sampling.wait(args.sample)

    print(f"soak: {args.minutes:g} min at {args.rate:g} Hz, {args.size}x{args.size} uint32, "
          f"{total} frames in runs of {args.run_frames}, model {tagger.checkpoint_id}, "
          f"label cache {cache_frames} frames, warm-up {warmup:.0f} s, pid {os.getpid()}",
          flush=True)
    t_start = time.monotonic()
    threading.Thread(target=sampler, daemon=True).start()
    RE(paced_runs(det, rate=args.rate, total=total, run_frames=args.run_frames,
                  produced=produced))
    scan_s = time.monotonic() - t_start
    flushed = xsml.flush(120)
    stop_sampling.set()
    status = xsml.status()
    xsml.close(30)

    # ------------------------------------------------------------ figures
    lat = list(zip(sink.arrivals, sink.latencies, strict=False))
    rows = []
    n_windows = max(1, int(np.ceil(scan_s / window)))
    for w in range(n_windows):
        lo, hi = t_start + w * window, t_start + (w + 1) * window
        vals = [v for t, v in lat if lo <= t < hi]
        win_samples = [s for s in samples if w * window <= s[0] < (w + 1) * window]
        rows.append({
            "window": w, "start_s": w * window, "frames": len(vals),
            "p50_ms": 1e3 * percentile(vals, 50), "p99_ms": 1e3 * percentile(vals, 99),
            "rss_mb": max((s[1] for s in win_samples), default=float("nan")),
            "max_queue_jobs": max((s[2] for s in win_samples), default=0),
            "max_documents_queued": max((s[3] for s in win_samples), default=0),
        })
    print(f"{'window':>6s} {'start s':>8s} {'frames':>7s} {'p50 ms':>8s} {'p99 ms':>8s} "
          f"{'RSS MB':>8s} {'queue':>6s} {'docs':>6s}")
    for r in rows:
        print(f"{r['window']:6d} {r['start_s']:8.0f} {r['frames']:7d} {r['p50_ms']:8.1f} "
              f"{r['p99_ms']:8.1f} {r['rss_mb']:8.1f} {r['max_queue_jobs']:6d} "
              f"{r['max_documents_queued']:6d}")

    after = [s for s in samples if s[0] >= warmup]
    if len(after) >= 6:
        base = statistics.median(s[1] for s in after[:3])
        end = statistics.median(s[1] for s in after[-3:])
    else:  # too short a run to have a warm-up: compare first and last samples
        base, end = samples[0][1], samples[-1][1]
    growth = (end - base) / base
    max_jobs = max(s[2] for s in samples)
    max_docs = max(s[3] for s in samples)
    queue_bound = args.max_queue_s * args.rate
    p99s = [r["p99_ms"] for r in rows if r["frames"] >= 0.5 * window * args.rate
            and r["start_s"] >= min(warmup, scan_s - window)]
    third = max(1, len(p99s) // 3)
    p99_first = statistics.median(p99s[:third]) if p99s else float("nan")
    p99_last = statistics.median(p99s[-third:]) if p99s else float("nan")
    p99_max = max(p99s) if p99s else float("nan")
    tag_events, duplicates = sink.tag_events, sink.duplicates
    achieved = produced[0] / scan_s

    criteria = {
        "rss": (growth < 0.05,
                f"RSS {base:.1f} MB after {warmup:.0f} s warm-up -> {end:.1f} MB at the end: "
                f"growth {100 * growth:+.2f}% (limit +5%)"),
        "queues": (max_jobs <= queue_bound and max_docs < 1000,
                   f"inference queue max {max_jobs} frames (limit {queue_bound:.0f} = "
                   f"{args.max_queue_s:g} s of frames), delivery queue max {max_docs} documents "
                   f"(limit 1000), inline frame memory max "
                   f"{max(s[4] for s in samples):.1f} MB"),
        "latency": (bool(p99s) and p99_last <= 2 * p99_first + 50,
                    f"p99 per {window:g} s window after warm-up ({len(p99s)} windows): median "
                    f"of the first {third} {p99_first:.1f} ms, of the last {third} "
                    f"{p99_last:.1f} ms (limit 2 x first + 50 ms), worst window "
                    f"{p99_max:.1f} ms; overall p50 "
                    f"{1e3 * percentile([v for _, v in lat], 50):.1f} ms, p99 "
                    f"{1e3 * percentile([v for _, v in lat], 99):.1f} ms"),
        "accounted": (flushed and produced[0] == total == sink.events == sink.distinct
                      == tag_events == sink.stop_frames and duplicates == 0
                      and sink.order_errors == 0,
                      f"produced {produced[0]}/{total}, events delivered {sink.events}, "
                      f"tag events {tag_events} (distinct {sink.distinct}, duplicates "
                      f"{duplicates}), stops {sink.stops} summing xsml_frames "
                      f"{sink.stop_frames}, skipped {dict(sink.skipped)}, out-of-order "
                      f"{sink.order_errors}, flushed {flushed}"),
        "rate": (achieved >= 0.95 * args.rate,
                 f"achieved {achieved:.2f} Hz of {args.rate:g} Hz over {scan_s:.1f} s"),
    }
    for name, (ok, text) in criteria.items():
        print(f"{'PASS' if ok else 'FAIL'} {name}: {text}")
    print(f"status: worker_restarts {status['worker_restarts']}, downstream_errors "
          f"{status['downstream_errors']}, overflow {status['overflow']}, "
          f"delivery_overruns {status['delivery_overruns']}")
    passed = all(ok for ok, _ in criteria.values())
    print("SOAK PASS" if passed else "SOAK FAIL", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "windows": rows, "samples": samples,
                       "criteria": {k: {"pass": ok, "detail": t}
                                    for k, (ok, t) in criteria.items()},
                       "rss_growth": growth, "max_queue_jobs": max_jobs,
                       "max_documents_queued": max_docs, "produced": produced[0],
                       "total": total, "tag_events": tag_events,
                       "skipped": dict(sink.skipped), "passed": passed}, f, indent=1)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
