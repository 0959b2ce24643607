"""How much does an error in the beam centre cost the polar head?

Tags the test frames with the packaged model, giving each frame its beam centre
moved by a fixed distance in a random direction, and prints mAP and the AP of
the spot tags per distance. Distances are in pixels of the 128x128 model input;
one input pixel is 8 detector pixels on a 1024-pixel frame, 2 on a 256-pixel one.
About 30 s once the test frames are cached.

    python experiments/beam_center_error.py
"""

from __future__ import annotations

import argparse

import numpy as np

from bluesky_xsml.inference.tagger import Tagger
from bluesky_xsml.polar import input_centers
from bluesky_xsml.training.data import load_arrays
from bluesky_xsml.training.metrics import average_precision


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default="synth:seed=2,n=2000,sizes=256+512+768+1024,detectors=train")
    ap.add_argument("--offsets", default="0,0.5,1,2,4,8")
    args = ap.parse_args(argv)
    tagger = Tagger.load(args.model, precision="fp32")
    arrays = load_arrays(args.data, config=tagger.preprocess_config, workers=2, progress=False)
    S = tagger.preprocess_config.size
    exact = input_centers(arrays.shapes, arrays.centers, S)
    x = np.asarray(arrays.inputs, np.float32)
    y = np.asarray(arrays.labels)
    tags = list(tagger.tags)
    watch = ["peaks_on_ring", "peaks_isolated", "ring_oriented", "beamstop_circular"]
    angle = np.random.default_rng(0).uniform(0, 2 * np.pi, len(y))

    def scores(centers):
        return np.concatenate([tagger.predict_inputs(x[a:a + 64], None if centers is None
                                                     else centers[a:a + 64])
                               for a in range(0, len(x), 64)])

    print(f"model {tagger.checkpoint_id}, {len(y)} frames of {arrays.source}")
    print(f"{'centre error (input px)':>24} {'mAP':>7} " + " ".join(f"{t:>18}" for t in watch))
    rows = [("none (CNN alone)", None)] + [
        (f"{d:g}", exact + float(d) * np.stack([np.cos(angle), np.sin(angle)], 1))
        for d in (float(v) for v in args.offsets.split(","))]
    for label, centers in rows:
        p = scores(centers)
        aps = np.array([average_precision(y[:, j], p[:, j]) for j in range(len(tags))])
        print(f"{label:>24} {np.nanmean(aps):7.4f} "
              + " ".join(f"{aps[tags.index(t)]:18.3f}" for t in watch), flush=True)


if __name__ == "__main__":
    main()
