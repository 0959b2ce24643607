"""How well does the shipped novelty score separate odd frames from ordinary ones?

Without retraining, the only out-of-distribution frames available are made ones: the
packaged default model (with its shipped novelty statistics, ``xsml novelty-fit``)
scores held-out generator frames from the training distribution ("in") and, per
condition, frames that differ from them:

* detector faults and beamline mistakes applied to copies of the "in" frames: half the
  detector dead, stripes of hot columns, the tiles of the frame shuffled, the frame
  turned by 90 degrees (a grazing-incidence horizon standing upright), a direct beam
  with no beamstop;
* an ice ring: a sharp isotropic ring added at high q. The model has a tag for rings,
  so this one is *expected* to look ordinary: the score measures "unlike the training
  frames", not "unlike what the sample should give";
* frames the model handles well but that were rendered differently: the two held-out
  detector geometries (``detectors=heldout``), on which the model's mAP is 0.93 in the
  model card. A high AUROC there would mean "novel" just means "a detector it has not seen".

For each condition it prints the AUROC against the "in" frames of the score the tagger
ships (``shipped``: with version 2 statistics the kNN score), of the version 1
Mahalanobis distance (from the same statistics), of the residual outside the embedding's
principal directions and of the negative joint energy of the logits, and the share
flagged ``novel`` at the shipped threshold::

    python experiments/novelty_ood.py --n 300
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def conditions(frames, rng):
    """name -> list of altered copies of ``frames``."""

    def dead_half(f):
        g = f.copy()
        g[:, : g.shape[1] // 2] = 0
        return g

    def hot_columns(f):
        g = f.astype(np.float64)
        g[:, ::8] += 0.5 * float(np.percentile(f, 99.9)) + 50
        return g.astype(f.dtype)

    def shuffled_tiles(f):
        h, w = (f.shape[0] // 4) * 4, (f.shape[1] // 4) * 4
        g = f[:h, :w].reshape(4, h // 4, 4, w // 4).swapaxes(1, 2).reshape(16, h // 4, w // 4)
        g = g[rng.permutation(16)].reshape(4, 4, h // 4, w // 4).swapaxes(1, 2)
        return np.ascontiguousarray(g.reshape(h, w))

    def rot90(f):
        return np.ascontiguousarray(np.rot90(f))

    def direct_beam(f):
        g = f.astype(np.float64)
        yy, xx = np.mgrid[: f.shape[0], : f.shape[1]]
        cy, cx = f.shape[0] * rng.uniform(0.35, 0.65), f.shape[1] * rng.uniform(0.35, 0.65)
        g += 1e6 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 3.0 ** 2))
        top = np.iinfo(f.dtype).max if f.dtype.kind in "ui" else g.max()
        return np.clip(g, 0, top).astype(f.dtype)

    def ice_ring(f):
        g = f.astype(np.float64)
        yy, xx = np.mgrid[: f.shape[0], : f.shape[1]]
        r = np.hypot(yy - f.shape[0] / 2, xx - f.shape[1] / 2)
        r0 = 0.4 * min(f.shape)
        g += (float(np.percentile(f, 99)) + 20) * np.exp(-((r - r0) ** 2) / (2 * 1.5 ** 2))
        return g.astype(f.dtype)

    ops = {"dead_half": dead_half, "hot_columns": hot_columns,
           "shuffled_tiles": shuffled_tiles, "rotated_90": rot90, "direct_beam": direct_beam,
           "ice_ring (has a tag: expected ordinary)": ice_ring}
    return {name: [op(f) for f in frames] for name, op in ops.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=300, help="frames per condition")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save", default=None, help="also keep features and probabilities (.npz)")
    args = p.parse_args(argv)

    import torch

    from bluesky_xsml import Tagger
    from bluesky_xsml.novelty import auroc, energy_novelty
    from bluesky_xsml.training.novelty_fit import synthetic_frames

    torch.set_num_threads(args.threads)
    tagger = Tagger.load(precision="fp32")
    nov = tagger.novelty
    if nov is None:
        raise SystemExit("the default model has no novelty statistics (xsml novelty-fit)")
    rng = np.random.default_rng(0)

    def scores(frames):
        out = tagger.analyse(frames, keep_features=True)
        return {"shipped": out.novelty, "mahalanobis": nov.mahalanobis(out.features),
                "pca_residual": nov.residual(out.features),
                "energy": energy_novelty(out.probs), "novel": out.novel,
                "features": out.features, "probs": out.probs}

    frames_in, _ = synthetic_frames(args.n, seed=2, sizes=(256, 512))
    s_in = scores(frames_in)
    report = {"model": tagger.checkpoint_id, "threshold": round(nov.threshold, 3),
              "n": args.n, "in": {"flagged": round(float(s_in["novel"].mean()), 4)}}
    sets = conditions(frames_in, rng)
    held, _ = synthetic_frames(args.n, seed=3, sizes=(512,), detectors="heldout")
    sets["heldout detectors (rendered differently; model handles them)"] = held
    kept = {"in_features": s_in["features"], "in_probs": s_in["probs"]}
    for k, (name, frames) in enumerate(sets.items()):
        s = scores(frames)
        kept[f"c{k}_features"], kept[f"c{k}_probs"] = s["features"], s["probs"]
        kept[f"c{k}_name"] = np.asarray(name)
        report[name] = {"flagged": round(float(s["novel"].mean()), 4),
                        **{f"auroc_{k}": round(auroc(s_in[k], s[k]), 4)
                           for k in ("shipped", "mahalanobis", "pca_residual", "energy")}}
        print(name, report[name], flush=True)
    print(json.dumps(report, indent=1))
    if args.save:
        np.savez(args.save, **kept)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
