"""Label frequencies per tag of the generator profiles (a Markdown table).

    python benchmarks/label_balance.py [--n 1000] [--size 256] [--seed 0]
                                       [--variety classic wide] [--detectors train]

Samples and labels ``--n`` scenes of each profile (frames ``0..n-1`` of
``SceneGenerator(seed, size, detectors, variety)``; labels come from the scene
parameters, so nothing is rendered) and prints, per tag, the fraction of frames
that carry it, then tags per frame, and for the wide profile the share of each
readout and of frames with n-fold azimuthal forms.
"""

from __future__ import annotations

import argparse
import collections

import numpy as np


def _labels(seed, size, detectors, variety, n):
    from bluesky_xsml.sim.generator import SceneGenerator

    gen = SceneGenerator(seed=seed, size=size, detectors=detectors, variety=variety)
    labels, readouts, forms = [], collections.Counter(), 0
    for i in range(n):
        scene, lab, _rng = gen.scene_at(i)
        labels.append(lab)
        ro = scene.get("readout") or {}
        key = ro.get("kind", "native")
        if ro.get("dtype"):
            key += f" {ro['dtype']}"
        if ro.get("gaps") == "interpolated":
            key += " (gaps interpolated)"
        readouts[key] += 1
        forms += any(f.get("azimuth") for f in scene.get("features", []))
    return np.asarray(labels), readouts, forms


def main(argv=None):
    from bluesky_xsml.tags import TAG_NAMES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--detectors", default="train")
    ap.add_argument("--variety", nargs="+", default=["classic", "wide"])
    a = ap.parse_args(argv)
    res = {v: _labels(a.seed, a.size, a.detectors, v, a.n) for v in a.variety}
    print(f"{a.n} frames per profile, size {a.size}, seed {a.seed}, detectors {a.detectors}\n")
    print("| tag | " + " | ".join(a.variety) + " |")
    print("|---|" + "---:|" * len(a.variety))
    for k, tag in enumerate(TAG_NAMES):
        print(f"| `{tag}` | " + " | ".join(f"{res[v][0][:, k].mean():.3f}" for v in a.variety)
              + " |")
    print("| tags per frame | " + " | ".join(f"{res[v][0].sum(1).mean():.2f}" for v in a.variety)
          + " |")
    for v in a.variety:
        _, readouts, forms = res[v]
        if v == "classic":
            continue
        print(f"\n{v}: frames with an n-fold azimuthal form {forms / a.n:.3f}; readouts:")
        for key, c in sorted(readouts.items(), key=lambda kv: -kv[1]):
            print(f"  {key:40s} {c / a.n:.3f}")


if __name__ == "__main__":
    main()
