"""Why inference is frozen TorchScript: network batches per second next to a busy Python thread.

    python benchmarks/bench_gil.py [--seconds 3]

A RunEngine thread is busy in Python most of the time. Eager PyTorch re-acquires the GIL after
every operator, so each of its ~30 operators per forward pass can wait for the busy thread's
switch interval; a frozen TorchScript module runs the whole forward pass in one call without
the GIL. Prints batches/s of 32 frames for each form with and without the busy thread, and the
busy thread's own progress. The last line reads
``torchscript_vs_eager <ratio of batches/s next to the busy thread>``.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import torch


def _busy(stop: threading.Event, out: list) -> None:
    n = 0
    while not stop.is_set():
        for _ in range(1000):
            n += 1
    out.append(n)


def _rate(fn, seconds: float, busy: bool) -> tuple[float, float]:
    stop, out = threading.Event(), []
    th = threading.Thread(target=_busy, args=(stop, out)) if busy else None
    for _ in range(3):
        fn()
    if th:
        th.start()
    t0, k = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        fn()
        k += 1
    dt = time.perf_counter() - t0
    stop.set()
    if th:
        th.join()
    return k / dt, (out[0] / dt / 1e6 if out else float("nan"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args(argv)
    from bluesky_xsml import Tagger
    from bluesky_xsml.model import fuse_for_inference

    tagger = Tagger.load()
    S = tagger.preprocess_config.size
    x = torch.rand(32, tagger.net.config.in_channels, S, S).contiguous(
        memory_format=torch.channels_last)
    eager = fuse_for_inference(tagger.net).to(memory_format=torch.channels_last).eval()

    def run_eager():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                    enabled=tagger.precision == "bf16"):
            eager(x)

    def run_script():
        tagger.predict_inputs(x)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"precision {tagger.precision}; batches of 32 per second")
    rows = {}
    for name, fn in (("eager", run_eager), ("torchscript", run_script)):
        alone, _ = _rate(fn, args.seconds, busy=False)
        shared, busy_mops = _rate(fn, args.seconds, busy=True)
        rows[name] = shared
        print(f"{name:12s} alone {alone:7.1f}   next to a busy thread {shared:7.1f}   "
              f"(busy thread: {busy_mops:.1f} M loop steps/s)")
    print(f"torchscript_vs_eager {rows['torchscript'] / rows['eager']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
