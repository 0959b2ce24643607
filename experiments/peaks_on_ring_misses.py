"""Which ``peaks_on_ring`` frames does the default model miss, and why?

``peaks_on_ring`` (a few spots sharing one radius with 4- or 6-fold symmetry) is the
default model's weakest tag. This script scores the model card's test frames
(``synth:seed=2,n=2000,...``, the cached inputs ``xsml evaluate`` uses), regenerates the
scenes of the frames that carry the tag, and reports the model's recall at probability 0.5:

- by spot brightness: the median ratio of a spot's peak to the generator's visibility
  threshold for spots (``threshold("spot", ...)``, about 6 sigma of the local counts), in quartiles;
- by symmetry (4- or 6-fold) and by frame size;
- for the bright spots it misses: the mean probability it gives to the other spot tags
  and how many other tags those frames carry.

With ``--figure PATH`` it also draws eight of the bright misses with their tags and the
model's four highest probabilities. Run (under a minute)::

    python experiments/peaks_on_ring_misses.py --figure runs/peaks_on_ring_misses.png
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np

TEST = "synth:seed=2,n=2000,sizes=256+512+768+1024,detectors=train"
TAG = "peaks_on_ring"


def spot_rows(spec, labels):
    """``(frame, longest side, n_fold, median spot/threshold ratio)`` of each tagged frame."""
    from bluesky_xsml.sim import generator as G
    from bluesky_xsml.sim import physics as ph
    from bluesky_xsml.tags import TAG_NAMES

    j = TAG_NAMES.index(TAG)
    gens: dict = {}
    rows = []
    for i in np.flatnonzero(labels[:, j] == 1):
        size = spec.size_of(int(i))
        if size not in gens:
            gens[size] = G.SceneGenerator(seed=spec.seed, size=size,
                                          detectors=list(spec.detectors))
        scene, _, _ = gens[size].scene_at(int(i))
        scene = G.complete_scene(scene)
        ctx = G.SceneGeometry(scene)
        for f in scene["features"]:
            if f["type"] != "on_ring":
                continue
            x, y, a, _ = ph.feature_spots(f, ctx)
            level = G.smooth_level(scene, ctx, np.hypot(x - ctx.cx, y - ctx.cy))
            ratio = a * ph.grazing_factor(ctx, y) / G.threshold("spot", level, ctx.read)
            seen = ctx.fp.seen(x, y)
            rows.append((int(i), int(size), int(f["n_fold"]),
                         float(np.median(ratio[seen])) if seen.any() else 0.0))
    return np.array(rows, dtype=float)


def draw(path, spec, frames, probs, tags):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bluesky_xsml.sim import generator as G

    fig, axes = plt.subplots(2, 4, figsize=(20, 10))
    for ax, i in zip(axes.flat, frames, strict=False):
        gen = G.SceneGenerator(seed=spec.seed, size=spec.size_of(int(i)),
                               detectors=list(spec.detectors))
        frame, lab, _ = gen.frame_at(int(i))
        f = np.asarray(frame, float)
        f[~np.isfinite(f) | (f < 0)] = 0
        ax.imshow(np.log1p(np.minimum(f, np.percentile(f, 99.99))), cmap="magma")
        top = sorted(zip(probs[i], tags, strict=True))[::-1][:4]
        ax.set_title(f"frame {i} {frame.shape}\ntags: "
                     + ", ".join(t for t, v in zip(tags, lab, strict=True) if v == 1)[:90]
                     + "\nmodel: " + ", ".join(f"{t} {p:.2f}" for p, t in top)[:90], fontsize=7)
        ax.set_axis_off()
    for ax in axes.flat[len(frames):]:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=70)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the packaged model)")
    p.add_argument("--figure", default=None, help="also draw eight bright misses to this PNG")
    args = p.parse_args(argv)

    from bluesky_xsml import Tagger
    from bluesky_xsml.training.data import SynthSpec, load_arrays

    tagger = Tagger.load(args.model)
    tags = list(tagger.tags)
    data = load_arrays(TEST, config=tagger.preprocess_config, progress=False)
    labels = np.asarray(data.labels)
    probs = np.concatenate([tagger.predict_inputs(np.asarray(data.inputs[a:a + 128], np.float32))
                            for a in range(0, len(labels), 128)])
    spec = SynthSpec.parse(TEST)
    rows = spot_rows(spec, labels)
    j = tags.index(TAG)
    found = probs[rows[:, 0].astype(int), j] >= 0.5
    print(f"model {tagger.checkpoint_id}: {len(rows)} test frames carry {TAG}; "
          f"recall at 0.5: {found.mean():.2f}")
    edges = np.quantile(rows[:, 3], [0, 0.25, 0.5, 0.75, 1.0])
    print("median spot peak / visibility threshold (quartiles):")
    for q, (lo, hi) in enumerate(itertools.pairwise(edges)):
        sel = (rows[:, 3] >= lo) & ((rows[:, 3] <= hi) if q == 3 else (rows[:, 3] < hi))
        print(f"  {lo:9.2f} - {hi:<9.3g} n={int(sel.sum()):<4} recall {found[sel].mean():.2f}")
    for name, col in (("n-fold", 2), ("longest side", 1)):
        print(f"by {name}: " + ", ".join(
            f"{int(v)}: recall {found[rows[:, col] == v].mean():.2f} "
            f"(n={int((rows[:, col] == v).sum())})" for v in np.unique(rows[:, col])))
    bright_miss = rows[(rows[:, 3] >= edges[2]) & ~found, 0].astype(int)
    if len(bright_miss):
        others = np.nansum(labels[bright_miss], axis=1) - 1
        print(f"bright misses (spots above the median ratio, probability < 0.5): "
              f"{len(bright_miss)}; they carry {others.mean():.1f} other tags on average "
              f"(all tagged frames: "
              f"{(np.nansum(labels[rows[:, 0].astype(int)], 1) - 1).mean():.1f})")
        for other in ("peaks_lattice", "peaks_isolated", "ring_textured"):
            k = tags.index(other)
            print(f"  mean probability of {other}: {probs[bright_miss, k].mean():.2f} "
                  f"(labeled in {np.nanmean(labels[bright_miss, k]):.0%} of them)")
        if args.figure:
            draw(args.figure, spec, bright_miss[:8], probs, tags)
            print(f"wrote {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
