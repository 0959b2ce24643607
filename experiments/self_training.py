"""Do pseudo-labels on unlabeled shifted frames add to a 128-label fine-tune?

In a live experiment most frames of the new data stream carry no labels. Self-training uses
them: fine-tune on the labeled frames, let the fine-tuned model label the unlabeled ones where
it is confident (probability >= 0.9 becomes 1, <= 0.1 becomes 0, anything between stays
unknown), then fine-tune the original model again on the true labels with the pseudo-labeled
frames mixed in as replay. This script runs that on a shifted domain of
``benchmarks/bench_finetune.py`` with its default settings at 128 labels: the labeled frames
are the first 128 of its pool, the unlabeled ones the other 384 (their labels are used only
to report the pseudo-labels' accuracy), and the score is mAP on the 400 held-out shifted
frames. Run from the repository root (about 2.5 min once the benchmark's caches exist)::

    python experiments/self_training.py --shift integrating
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the packaged model)")
    p.add_argument("--shift", choices=("integrating", "exposure"), default="integrating")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_finetune as bench

    from bluesky_xsml.training.finetune import finetune

    tagger, x, y, settings = bench.experiment_setup(args.model, args.shift, 912,
                                                    threads=args.threads)
    x_test, y_test = x[-400:], y[-400:]
    print(f"model {tagger.checkpoint_id}, {args.shift} shift: held-out shifted mAP "
          f"{bench.mean_ap(tagger, x_test, y_test):.4f} before")
    first, report = finetune(tagger, x[:128], y[:128], **settings)
    print(f"  128 labels:                          {bench.mean_ap(first, x_test, y_test):.4f} "
          f"(gate {'passed' if report.passed else 'refused'}, {report.seconds:.0f} s)")
    unlabeled = np.asarray(x[128:512], np.float32)
    pseudo = bench.pseudo_labels(first, unlabeled)[:, :y.shape[1]]
    known = ~np.isnan(pseudo)
    print(f"  pseudo-labels: {known.mean():.0%} of the 384 x {y.shape[1]} entries, "
          f"{(pseudo[known] == y[128:512][known]).mean():.1%} of them right")
    second, report = finetune(tagger, x[:128], y[:128], replay_inputs=unlabeled,
                              replay_labels=pseudo, **settings)
    print(f"  128 labels + 384 pseudo-labeled:     {bench.mean_ap(second, x_test, y_test):.4f} "
          f"(gate {'passed' if report.passed else 'refused'}, original domain "
          f"{report.original_before:.4f} -> {report.original_after:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
