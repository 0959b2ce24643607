"""What a detector readout costs in preprocessing: ADU frames into counts first.

    python benchmarks/bench_readout.py [--frames 16] [--size 1024] [--repeats 5]

Preprocesses the same 16-bit frames (``preprocess_batch``, one thread) without a
readout and with one (gain, offset and a saturated value: the conversion
to float32 counts, the saturated pixels set to their level), and prints the best
of ``--repeats`` in milliseconds per frame. The last line reads
``ms_per_frame plain <p> readout <r> size <S>``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bluesky_xsml.preprocess import PreprocessConfig, preprocess_batch
from bluesky_xsml.readout import Readout


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = (args.size, args.size)
    frames = [(100 + 4 * rng.poisson(20, shape)).astype(np.uint16) for _ in range(args.frames)]
    for f in frames:
        f[100:120, 200:240] = 65535
    config = PreprocessConfig()
    readout = Readout(gain=4, offset=100, saturated_value=65535)
    preprocess_batch(frames[:2], config)  # compile / load the kernels
    preprocess_batch(frames[:2], config, readouts=readout)
    n = len(frames)
    plain = 1e3 * _best(lambda: preprocess_batch(frames, config), args.repeats) / n
    with_readout = 1e3 * _best(lambda: preprocess_batch(frames, config, readouts=readout),
                               args.repeats) / n
    print(f"ms_per_frame plain {plain:.2f} readout {with_readout:.2f} size {args.size}")


if __name__ == "__main__":
    main()
