"""Does re-estimating batch-norm statistics on unlabeled shifted frames help (AdaBN)?

A cheap, label-free adaptation to a new domain is to recompute every batch norm's running
mean and variance on frames of that domain. Fine-tuning (``bluesky_xsml.training.finetune``)
keeps them frozen instead. This script measures what re-estimation alone does to the default
model on the two shifted domains of ``benchmarks/bench_finetune.py``:

- statistics from the 512 frames of its labeled pool, used here without their labels (the
  400 shifted test frames are not touched);
- statistics from those 512 frames mixed 1:1 with 512 original-domain frames (the replay set).

For each it prints mAP on the 400 held-out shifted frames and on the first 1,000 frames of
the model card's test set. Run from the repository root (about 30 s once the benchmark's
caches exist)::

    python experiments/batchnorm_restat.py
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np

ORIG_TEST = "synth:seed=2,n=2000,sizes=256+512+768+1024,detectors=train"
REPLAY = "synth:seed=0,n=2000,sizes=256+512+768+1024,detectors=train"


def restat(tagger, inputs: np.ndarray, batch: int = 64):
    """A copy of ``tagger`` whose batch norms hold the statistics of ``inputs``."""
    import torch

    from bluesky_xsml import Tagger

    net = copy.deepcopy(tagger.net)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over every batch
    net.train()
    order = np.random.default_rng(0).permutation(len(inputs))
    with torch.no_grad():
        for a in range(0, len(inputs), batch):
            net(torch.from_numpy(np.asarray(inputs[order[a:a + batch]], np.float32)))
    return Tagger(net.eval(), tagger.tags, thresholds=tagger.thresholds,
                  preprocess=tagger.preprocess_config)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the packaged model)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_finetune as bench

    from bluesky_xsml import Tagger
    from bluesky_xsml.training.data import load_arrays

    torch.set_num_threads(args.threads)
    tagger = Tagger.load(args.model)
    orig = load_arrays(ORIG_TEST, config=tagger.preprocess_config, progress=False)
    x_orig, y_orig = np.asarray(orig.inputs[:1000]), orig.labels[:1000]
    replay = np.asarray(load_arrays(REPLAY, config=tagger.preprocess_config,
                                    progress=False).inputs[:512], np.float32)
    print(f"model {tagger.checkpoint_id}: mAP on held-out shifted frames / original domain")
    for name in ("integrating", "exposure"):
        x, y, _ = bench.shifted_data(912, 2, bench.SHIFTS[name])
        x_test, y_test = x[-400:], y[-400:]
        pool = np.asarray(x[:512], np.float32)
        for label, model in (
                ("frozen statistics (as shipped)", tagger),
                ("statistics of 512 shifted frames", restat(tagger, pool)),
                ("statistics of 512 shifted + 512 original", restat(
                    tagger, np.concatenate([pool, replay])))):
            print(f"  {name:<12} {label:<42} {bench.mean_ap(model, x_test, y_test):.4f} / "
                  f"{bench.mean_ap(model, x_orig, y_orig):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
