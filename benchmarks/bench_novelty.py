"""What novelty scores and embeddings add to ``Tagger.predict`` time at 1024x1024.

    python benchmarks/bench_novelty.py [--frames 16] [--batch 8] [--repeats 5] [--threads 2]

Three paths over the same generator frames, interleaved round by round (so a busy
machine slows them alike), on the packaged default model with its novelty statistics:

* ``baseline``: the network traced to return probabilities only, as before novelty
  existed (preprocessing, the traced network, nothing else);
* ``predict``: :meth:`Tagger.predict` now (the traced network also returns the pooled
  features, which ``predict`` drops);
* ``analyse``: :meth:`Tagger.analyse` (probabilities, Mahalanobis score, ``novel`` flag,
  64-d float16 embedding).

It prints the median seconds per frame of each and the ratios to the baseline; the last
line reads ``overhead_analyse <ratio - 1> overhead_predict <ratio - 1>``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch
    from torch import nn

    import bluesky_xsml.inference.tagger as tagger_module
    from bluesky_xsml import Tagger
    from bluesky_xsml.sim.generator import SceneGenerator

    torch.set_num_threads(args.threads)
    frames, _, _ = SceneGenerator(seed=4, size=args.size).batch(args.frames)
    tagger = Tagger.load(num_threads=args.threads)
    if tagger.novelty is None:
        raise SystemExit("the default model has no novelty statistics (xsml novelty-fit)")

    class ProbabilitiesOnly(nn.Module):  # the inference wrapper before novelty
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, centers=None):
            logits, _ = self.net(x, None, centers)
            return torch.sigmoid(logits.float()), logits[:, :0].float()

    saved = tagger_module.ProbabilitiesAndFeatures
    tagger_module.ProbabilitiesAndFeatures = ProbabilitiesOnly
    try:
        baseline = Tagger.load(num_threads=args.threads)
    finally:
        tagger_module.ProbabilitiesAndFeatures = saved
    baseline.set_novelty(None)
    np.testing.assert_allclose(baseline.predict(frames[:2]), tagger.predict(frames[:2]),
                               atol=2e-2)  # same network (bf16 traces may differ slightly)

    paths = {"baseline": lambda: baseline.predict(frames, batch_size=args.batch),
             "predict": lambda: tagger.predict(frames, batch_size=args.batch),
             "analyse": lambda: tagger.analyse(frames, batch_size=args.batch)}
    for fn in paths.values():  # warm: numba, TorchScript profiling runs
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(args.repeats):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / len(frames))
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"model {tagger.checkpoint_id} precision {tagger.precision} threads {args.threads} "
          f"frames {args.frames}x{args.size}x{args.size} batch {args.batch} "
          f"repeats {args.repeats}")
    for k, v in med.items():
        print(f"{k:9s} {v * 1e3:8.2f} ms/frame  (min {min(times[k]) * 1e3:.2f})  "
              f"x{v / med['baseline']:.3f}")
    print(f"overhead_analyse {med['analyse'] / med['baseline'] - 1:.4f} "
          f"overhead_predict {med['predict'] / med['baseline'] - 1:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
