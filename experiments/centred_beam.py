"""Why do the demo's plain powder rings get ``peaks_on_ring``, and only with the beam centre?

Two probes, both with and without each frame's beam centre, for one or more models:

1. **The demo's sample**: tags every point of a 19 x 19 grid over the simulated
   combinatorial film (``bluesky_xsml.sim.sample``, the sample ``xsml demo`` scans) and
   prints how often the structure tags agree with the sample's true region (the demo's
   ``agreement``), per region, and the disagreements found.
2. **Centred beams**: takes generator frames that show rings and no spots, moves the
   beam to the centre of the frame (and, as a control, 6 pixels off it), renders them
   again and prints the false-positive rate of ``peaks_on_ring`` per detector.

About 2 min per model on 2 cores::

    python experiments/centred_beam.py --models default,runs/polar-fill/model.pt
"""

from __future__ import annotations

import argparse
import copy
from collections import Counter, defaultdict

import numpy as np

from bluesky_xsml.inference.tagger import Tagger
from bluesky_xsml.plots import phase_label
from bluesky_xsml.sim.generator import SceneGenerator, complete_scene, render_scene, scene_labels
from bluesky_xsml.sim.sample import CombinatorialSample
from bluesky_xsml.tags import TAG_NAMES

SPOTS_OFF = {"ring_isotropic": True, "peaks_on_ring": False, "peaks_isolated": False,
             "peaks_lattice": False, "grazing": False}


def demo_agreement(tagger: Tagger, seed: int, *, use_center: bool, points: int = 19):
    """Agreement of the structure tags with the sample's truth, overall and per region."""
    sample = CombinatorialSample(seed=seed, size=256)
    grid = np.linspace(0.5, 9.5, points)
    positions = [(x, y) for y in grid for x in grid]
    frames = np.stack([sample.frame_at(x, y) for x, y in positions])
    probs = tagger.predict(frames, beam_center=sample.beam_center if use_center else None)
    decided = probs >= np.asarray(tagger.thresholds)
    per_region: dict[str, list[bool]] = defaultdict(list)
    wrong: Counter = Counter()
    for (x, y), row in zip(positions, decided, strict=True):
        truth = phase_label(sample.tags_at(x, y))
        seen = phase_label([TAG_NAMES[i] for i in np.flatnonzero(row)])
        region = sample.region_at(x, y)
        per_region[region].append(truth == seen)
        if truth != seen:
            wrong[(region, truth, seen)] += 1
    overall = float(np.mean([v for rows in per_region.values() for v in rows]))
    return overall, {r: float(np.mean(v)) for r, v in per_region.items()}, wrong


def centred_false_positives(tagger: Tagger, detector: str, *, offset: float, n: int = 30,
                            seed: int = 5) -> tuple[int, float]:
    """``peaks_on_ring`` false-positive rate on ring frames whose beam is moved to the centre."""
    gen = SceneGenerator(seed=seed, size=256, detectors=[detector], tags=SPOTS_OFF)
    j = TAG_NAMES.index("peaks_on_ring")
    threshold = float(np.asarray(tagger.thresholds)[j])
    hits = []
    for i in range(n):
        scene, _labels, _rng = gen.scene_at(i)
        h, w = scene["detector"]["shape"]
        moved = copy.deepcopy(scene)
        moved["geometry"]["beam_center"] = [(w - 1) / 2 + offset, (h - 1) / 2]
        moved = complete_scene(moved)
        labels = scene_labels(moved)
        if labels[TAG_NAMES.index("ring_isotropic")] != 1 or labels[j] != 0:
            continue
        frame = render_scene(moved, i)
        p = tagger.predict(frame[None], beam_center=moved["geometry"]["beam_center"])[0, j]
        hits.append(p >= threshold)
    return len(hits), float(np.mean(hits)) if hits else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="default",
                    help="comma-separated checkpoints ('default': the packaged model)")
    ap.add_argument("--seeds", default="0,1,2", help="demo sample seeds")
    ap.add_argument("--detectors", default="pilatus_1m,pilatus_6m,eiger_1m,ccd_1k")
    ap.add_argument("--n", type=int, default=30, help="generator frames per detector")
    args = ap.parse_args(argv)
    for name in args.models.split(","):
        tagger = Tagger.load(None if name == "default" else name, precision="fp32")
        print(f"== {name} ({tagger.checkpoint_id})")
        for seed in (int(s) for s in args.seeds.split(",")):
            for use_center in (True, False):
                overall, regions, wrong = demo_agreement(tagger, seed, use_center=use_center)
                label = "with centre" if use_center else "no centre"
                print(f"demo seed {seed} {label:<11} agreement {overall:.3f}  " + "  ".join(
                    f"{r} {v:.2f}" for r, v in sorted(regions.items())))
                for (region, truth, seen), count in wrong.most_common(3):
                    print(f"    {count:>3} x {region}: true {truth!r}, tagged {seen!r}")
        for det in args.detectors.split(","):
            for offset in (0.0, 6.0):
                n, rate = centred_false_positives(tagger, det, offset=offset, n=args.n)
                print(f"centred beam {det:<12} offset {offset:>3.0f} px: peaks_on_ring "
                      f"false positives {rate:.2f} of {n} ring frames")


if __name__ == "__main__":
    main()
