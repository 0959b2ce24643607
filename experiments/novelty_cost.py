"""What the novelty score and embedding cost, measured apart from the network.

``benchmarks/bench_novelty.py`` times whole paths (``predict`` against ``analyse``); on a
shared machine their difference is below the noise. This script times the two parts
separately, on the packaged default model and its statistics, over the same 1024x1024
generator frames:

* ``predict``: :meth:`Tagger.predict` per frame (preprocessing and the traced network);
* ``novelty``: what :meth:`Tagger.analyse_inputs` adds to it for a batch, from the pooled
  features and probabilities: the score, the ``novel`` flag and the embedding.

It prints the median of each per frame and their ratio (the overhead of ``analyse``
over ``predict``, the 10% budget of issue 26)::

    OMP_NUM_THREADS=2 python experiments/novelty_cost.py --frames 16 --batch 8 --repeats 5
"""

from __future__ import annotations

import argparse
import json
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

    from bluesky_xsml import Tagger
    from bluesky_xsml.sim.generator import SceneGenerator

    torch.set_num_threads(args.threads)
    frames, _, _ = SceneGenerator(seed=4, size=args.size).batch(args.frames)
    tagger = Tagger.load(num_threads=args.threads)
    nov = tagger.novelty
    if nov is None:
        raise SystemExit("the default model has no novelty statistics (xsml novelty-fit)")
    out = tagger.analyse(frames, batch_size=args.batch, keep_features=True)
    feats, probs = out.features, out.probs
    tagger.predict(frames, batch_size=args.batch)  # warm

    def novelty_part():
        for a in range(0, len(frames), args.batch):
            f, q = feats[a:a + args.batch], probs[a:a + args.batch]
            s = nov.score(f)
            nov.is_novel(s)
            nov.embed(f, q)

    t_pred, t_nov = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        tagger.predict(frames, batch_size=args.batch)
        t_pred.append((time.perf_counter() - t0) / len(frames))
        t0 = time.perf_counter()
        for _ in range(10):
            novelty_part()
        t_nov.append((time.perf_counter() - t0) / (10 * len(frames)))
    pred, extra = float(np.median(t_pred)), float(np.median(t_nov))
    print(json.dumps({"model": tagger.checkpoint_id, "precision": tagger.precision,
                      "threads": args.threads, "frames": args.frames, "size": args.size,
                      "batch": args.batch, "score": nov.kind,
                      "bank": None if nov.bank is None else list(nov.bank.shape),
                      "predict_ms_per_frame": round(pred * 1e3, 3),
                      "novelty_ms_per_frame": round(extra * 1e3, 4),
                      "overhead": round(extra / pred, 5)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
