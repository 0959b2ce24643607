"""Inference benchmark: 1024x1024 frames to probabilities on this machine.

    python benchmarks/bench_inference.py [--batch 32] [--size 1024] [--batches 8]

Measures, in one run: a dense fp32 matmul (the machine's practical peak), the
network alone (fp32 and the tagger's precision), preprocessing alone, and the
whole ``Tagger.predict`` path at the given batch size; prints GFLOP/s achieved
by the network against the matmul peak. The last line reads
``frames_per_s <end-to-end> batch <B> size <S> gflops <network GFLOP/s> peak_fraction <f>``,
the fraction being of a matmul peak in the network's own precision.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch


def _rate(fn, n_items: int, repeats: int) -> float:
    for _ in range(3):  # warm: kernels, TorchScript profiling runs
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return n_items * repeats / (time.perf_counter() - t0)


def matmul_peak_gflops(n: int = 2048, repeats: int = 10, dtype=torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    rate = _rate(lambda: a @ b, 1, repeats)
    return rate * 2 * n**3 / 1e9


def network_flops(tagger) -> float:
    """FLOPs of one forward pass per frame (eager fp32 model).

    With a polar head, the head's convolutions and linear layers are counted
    (with a beam centre given); its resampling and FFT are not.
    """
    from torch.utils.flop_counter import FlopCounterMode

    S = tagger.preprocess_config.size
    x = torch.zeros(1, tagger.net.config.in_channels, S, S)
    centers = torch.full((1, 2), S / 2) if tagger.uses_beam_center else None
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        tagger.net.eval()(x, None, centers)
    return float(counter.get_total_flops())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--model", default=None, help="checkpoint (default: the packaged model)")
    args = p.parse_args(argv)

    from bluesky_xsml import Tagger

    tagger = Tagger.load(args.model)
    rng = np.random.default_rng(0)
    try:
        from bluesky_xsml.sim.generator import SceneGenerator

        gen = SceneGenerator(seed=7, size=args.size)
        scenes = [gen.one() for _ in range(args.batch)]
        frames = [f for f, _, _ in scenes]
        beam = np.array([params["geometry"]["beam_center"] for _, _, params in scenes])
        source = "generator"
    except (ImportError, ValueError):  # no sim extra, or a size the generator refuses
        frames = [rng.poisson(5, (args.size, args.size)).astype(np.uint32)
                  for _ in range(args.batch)]
        beam = np.array([[args.size / 2, args.size / 2]] * args.batch)
        source = "poisson"
    # a model with a polar head gets each frame's beam centre, as the live callback gives it
    if not tagger.uses_beam_center:
        beam = None
    tagger.warmup(shape=(args.size, args.size), dtypes=sorted({f.dtype.str for f in frames}))

    from bluesky_xsml.inference.device import cpu_supports_bf16

    peak = matmul_peak_gflops()
    # Without native bf16 (AVX512-BF16/AMX) a bf16 matmul is emulated, minutes for this size,
    # and the tagger runs fp32 anyway ("auto" precision).
    native_bf16 = cpu_supports_bf16()
    peak_bf16 = matmul_peak_gflops(dtype=torch.bfloat16) if native_bf16 else float("nan")
    same_peak = peak_bf16 if tagger.precision == "bf16" else peak
    flops = network_flops(tagger)
    inputs, _ok, _ = tagger.preprocess(frames)
    centers = tagger.input_centers([f.shape for f in frames], beam)
    net_rate = _rate(lambda: tagger.predict_inputs(inputs, centers), len(inputs), args.batches)
    fp32 = Tagger(tagger.net, tagger.tags, preprocess=tagger.preprocess_config,
                  precision="fp32", metadata=dict(tagger.metadata))
    fp32_rate = _rate(lambda: fp32.predict_inputs(inputs, centers), len(inputs), args.batches)
    prep_rate = _rate(lambda: tagger.preprocess(frames), len(frames), args.batches)
    e2e_rate = _rate(lambda: tagger.predict(frames, batch_size=args.batch, beam_center=beam),
                     len(frames), args.batches)
    gflops = net_rate * flops / 1e9
    p_fast, p_fp32 = tagger.predict_inputs(inputs, centers), fp32.predict_inputs(inputs, centers)
    diff = float(np.abs(p_fast - p_fp32).max())
    mean_diff = float(np.abs(p_fast - p_fp32).mean())
    flips = float(((p_fast >= tagger.thresholds) != (p_fp32 >= tagger.thresholds)).mean())
    print(f"{len(frames)} frames ({source}), longest side {args.size}, batch {args.batch}, "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__} threads "
          f"{torch.get_num_threads()}, device {tagger.device}, precision {tagger.precision}, "
          f"beam centres {'given (polar head)' if beam is not None else 'not read by this model'}")
    print(f"matmul fp32 peak        {peak:8.1f} GFLOP/s")
    print(f"matmul bf16 peak        {peak_bf16:8.1f} GFLOP/s" if native_bf16 else
          "matmul bf16 peak        skipped: this CPU has no native bf16")
    print(f"network                 {flops / 1e6:8.1f} MFLOP per frame")
    print(f"network {tagger.precision:5s}           {net_rate:8.1f} frames/s  "
          f"{gflops:6.1f} GFLOP/s  ({gflops / same_peak:.2f} of {tagger.precision} matmul peak)")
    print(f"network fp32            {fp32_rate:8.1f} frames/s  "
          f"{fp32_rate * flops / 1e9:6.1f} GFLOP/s  ({fp32_rate * flops / 1e9 / peak:.2f} of fp32 "
          "matmul peak)")
    if tagger.precision == "fp32":
        print("|p(bf16) - p(fp32)|      not measured: the tagger runs fp32 here")
    else:
        print(f"|p({tagger.precision}) - p(fp32)|  max {diff:.3f}  mean {mean_diff:.4f}  "
              f"tag decisions changed {flips:.2%}")
    print(f"preprocessing           {prep_rate:8.1f} frames/s")
    print(f"predict (end to end)    {e2e_rate:8.1f} frames/s")
    print(f"frames_per_s {e2e_rate:.1f} batch {args.batch} size {args.size} "
          f"gflops {gflops:.1f} peak_fraction {gflops / same_peak:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
