"""What one frame's copy into the tagging process's shared ring costs the RunEngine's process.

    python benchmarks/bench_ring_copy.py [--copies 3000] [--size 1024]

With ``isolation="process"`` and the default ring transport, the feeder thread
of the RunEngine's process copies each inline frame into a slot of a
``/dev/shm`` ring (:class:`~bluesky_xsml.inference.child_process.SharedRing`);
``bench_callback.py``'s CPU table shows that copy as most of what tagging
costs that process. This measures the copy alone, in CPU time of the copying
thread (medians and quartiles over ``--copies`` copies of 16 distinct frames,
the variants in a shuffled order so machine load and cache state hit them
alike):

- ``copyto, 16 slots in turn``: what the feeder does (``np.copyto`` into a
  slot view, slots taken in turn, so the slot written is one not touched for
  16 frames);
- ``memmove, 16 slots in turn``: libc's ``memmove`` through ctypes instead
  (``rep movsb`` on CPUs with ERMS), the same slots;
- ``copyto, 1 slot``: always the same slot, so the destination is still in
  the cache from the last copy. In the tagging process's scan the slot freed
  last was last touched by the *tagging process* reading it, not by this
  process, so this is a lower bound, not what a different slot order gives
  (``bench_callback.py``'s feeder column is the measure of that).

Then whether the copy holds the GIL: a thread spinning in Python beside a
thread copying frames in a loop, its time split (``/proc`` schedstat) into on
a CPU, waiting for a CPU, and blocked (the GIL): blocked near 0 means the
copy releases the GIL, so it stalls the RunEngine's thread only by taking a
core or memory bandwidth. The last line reads ``copy_ms C memmove_ms M
hot_slot_ms H gil_blocked_s B``.
"""

from __future__ import annotations

import argparse
import ctypes
import random
import statistics
import sys
import threading
import time

import numpy as np


def _copies(n: int, size: int) -> dict[str, list[float]]:
    from multiprocessing import shared_memory

    rng = np.random.default_rng(0)
    frames = [rng.poisson(5, (size, size)).astype(np.uint32) for _ in range(16)]
    slot = 2 * frames[0].nbytes
    shm = shared_memory.SharedMemory(create=True, size=16 * slot)
    try:
        buf = shm.buf
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        for s in range(16):  # every page mapped before timing
            np.ndarray(frames[0].shape, np.uint32, buffer=buf, offset=s * slot)[...] = 0
        kinds = ("copyto", "memmove", "hot")
        out: dict[str, list[float]] = {k: [] for k in kinds}
        # the variants in a shuffled order: what one copy leaves in the cache would bias the
        # next one in a fixed rotation (it made memmove look 15% cheaper than copyto)
        order = [k for k in kinds for _ in range(n)]
        random.Random(0).shuffle(order)
        for j, kind in enumerate(order):
            arr = frames[j % 16]
            s = 0 if kind == "hot" else j % 16
            t = time.thread_time_ns()
            if kind == "memmove":
                ctypes.memmove(base + s * slot, arr.ctypes.data, arr.nbytes)
            else:
                view = np.ndarray(arr.shape, arr.dtype, buffer=buf, offset=s * slot)
                np.copyto(view, arr)
                del view
            out[kind].append((time.thread_time_ns() - t) / 1e6)
        del base, buf
        return out
    finally:
        shm.close()
        shm.unlink()


def _schedstat() -> tuple[float, float]:
    with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
        run, wait = f.read().split()[:2]
    return int(run) / 1e9, int(wait) / 1e9


def _gil(size: int, seconds: float = 1.0) -> dict[str, tuple[float, float, float]]:
    """Seconds on a CPU, waiting for one, and blocked, of a spinning thread, per second."""
    frames = [np.ones((size, size), np.uint32) * i for i in range(4)]
    dest = np.empty_like(frames[0])
    stop = threading.Event()

    def copier(kind: str) -> None:
        i = 0
        while not stop.is_set():
            if kind == "copy":
                np.copyto(dest, frames[i % 4])
            else:  # a Python loop: holds the GIL
                sum(range(20_000))
            i += 1

    out = {}
    for kind in ("none", "copy", "python"):
        stop.clear()
        th = threading.Thread(target=copier, args=(kind,)) if kind != "none" else None
        if th:
            th.start()
        r0, q0 = _schedstat()
        w0 = time.perf_counter()
        while time.perf_counter() - w0 < seconds:
            pass
        r1, q1 = _schedstat()
        wall = time.perf_counter() - w0
        stop.set()
        if th:
            th.join()
        out[kind] = (r1 - r0, q1 - q0, wall - (r1 - r0) - (q1 - q0))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--copies", type=int, default=3000, help="copies per variant (default 3000)")
    p.add_argument("--size", type=int, default=1024, help="frame side, uint32 (default 1024)")
    args = p.parse_args(argv)
    res = _copies(args.copies, args.size)
    labels = {"copyto": "copyto, 16 slots in turn", "memmove": "memmove, 16 slots in turn",
              "hot": "copyto, 1 slot"}
    mb = args.size * args.size * 4 / 2**20
    print(f"CPU ms per {mb:.0f} MiB copy into a shared-memory slot ({args.copies} each):")
    med = {}
    for kind, label in labels.items():
        q = statistics.quantiles(res[kind], n=4)
        med[kind] = q[1]
        print(f"  {label:26s} median {q[1]:.3f}  quartiles {q[0]:.3f}-{q[2]:.3f}")
    gil = _gil(args.size)
    print("a thread spinning in Python beside a thread that (per second: on CPU, waiting for a "
          "CPU, blocked):")
    for kind, label in (("none", "does nothing"), ("copy", "copies frames (np.copyto)"),
                        ("python", "runs Python")):
        run, wait, blocked = gil[kind]
        print(f"  {label:26s} {run:.3f} {wait:.3f} {blocked:.3f}")
    print(f"copy_ms {med['copyto']:.3f} memmove_ms {med['memmove']:.3f} "
          f"hot_slot_ms {med['hot']:.3f} gil_blocked_s {gil['copy'][2]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
