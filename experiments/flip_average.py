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


def scores(net, inputs: np.ndarray, *, flip: bool, batch: int = 128) -> np.ndarray:
    """Sigmoid outputs of ``net`` for preprocessed ``inputs``, optionally of their mirror."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(inputs), batch):
            x = torch.from_numpy(np.asarray(inputs[i:i + batch], np.float32))
            if flip:
                x = torch.flip(x, dims=[3])
            out.append(torch.sigmoid(net(x)[0].float()).numpy())
    return np.concatenate(out)


def summary(labels: np.ndarray, probs: np.ndarray, tags) -> tuple[float, str, float]:
    """mAP over the tags with a positive, and the weakest tag with its AP."""
    from bluesky_xsml.training.metrics import average_precision

    aps = {t: average_precision(labels[:, j], probs[:, j]) for j, t in enumerate(tags)}
    aps = {t: v for t, v in aps.items() if np.isfinite(v)}
    worst = min(aps, key=aps.get)
    return float(np.mean(list(aps.values()))), worst, aps[worst]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the packaged model)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from bluesky_xsml import Tagger
    from bluesky_xsml.training.data import load_arrays

    torch.set_num_threads(args.threads)
    tagger = Tagger.load(args.model)
    net = tagger.net.float().eval()
    print(f"model {tagger.checkpoint_id}")
    for spec in TEST_SETS:
        data = load_arrays(spec, config=tagger.preprocess_config, progress=False)
        labels = np.asarray(data.labels)
        plain = scores(net, data.inputs, flip=False)
        mirror = scores(net, data.inputs, flip=True)
        for name, probs in (("plain", plain), ("flip average", (plain + mirror) / 2)):
            m, worst, ap = summary(labels, probs, tagger.tags)
            print(f"{spec}  {name:12s}  mAP {m:.4f}  lowest {worst} {ap:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
