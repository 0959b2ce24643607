"""Does averaging a frame with its mirror image raise the default model's AP?

Horizontal flips are the one augmentation training uses that respects the physics (a
grazing-incidence horizon stays below the beam), so the network should score a frame and its
left-right mirror alike. Averaging the two probabilities (test-time augmentation) costs a second
forward pass. This script scores the packaged default model both ways on the model card's two
test sets (the cached inputs ``xsml evaluate`` uses; built on first use, see docs/training.md)::

    python experiments/flip_average.py

It prints, per test set, the mAP and the lowest per-tag AP with and without the flip average.
"""

from __future__ import annotations

import argparse

import numpy as np

TEST_SETS = ("synth:seed=2,n=2000,sizes=256+512+768+1024,detectors=train",
             "synth:seed=3,n=400,sizes=native,detectors=heldout")


def scores(tagger, inputs, *, flip: bool, batch: int = 128) -> np.ndarray:
    """``tagger``'s probabilities for preprocessed ``inputs``, optionally of their mirror."""
    out = []
    for i in range(0, len(inputs), batch):
        x = np.asarray(inputs[i:i + batch], np.float32)
        out.append(tagger.predict_inputs(np.ascontiguousarray(x[..., ::-1]) if flip else x))
    return np.concatenate(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the packaged model)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from bluesky_xsml import Tagger
    from bluesky_xsml.training.data import load_arrays
    from bluesky_xsml.training.metrics import evaluate_scores

    torch.set_num_threads(args.threads)
    tagger = Tagger.load(args.model)
    print(f"model {tagger.checkpoint_id}")
    for spec in TEST_SETS:
        data = load_arrays(spec, config=tagger.preprocess_config, progress=False)
        labels = np.asarray(data.labels)
        plain = scores(tagger, data.inputs, flip=False)
        mirror = scores(tagger, data.inputs, flip=True)
        for name, probs in (("plain", plain), ("flip average", (plain + mirror) / 2)):
            metrics = evaluate_scores(labels, probs, tagger.tags)
            (worst, ap), = metrics.worst(1)
            print(f"{spec}  {name:12s}  mAP {metrics.mean_ap:.4f}  lowest {worst} {ap:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
