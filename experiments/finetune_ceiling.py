"""How far can fine-tuning on labels take the default model on a shifted domain?

``benchmarks/bench_finetune.py`` asks what 32, 128 and 512 labeled frames of a shifted domain
buy. This script asks where that curve ends: it fine-tunes the default model on up to 4,096
labeled frames of the same shift, with the benchmark's settings (lr 5e-4, the stem frozen,
distillation weight 2 on 2,000 replayed original-domain frames, batch 32) and more steps for
more labels, and scores every run on the benchmark's 400 held-out shifted test frames
(frames 512-911 of its pool, so the figures line up with the benchmark's). For reference it
also scores the default model on the same 400 scenes rendered without the shift, and on
the 400 test frames converted back to photons with each frame's true gain and offset.

Unlike the benchmark, every labeled frame is trained on: the gate validates on a separate
set of 128 labeled shifted frames. A self-training arm adds unlabeled frames: the 128-label
model labels them where it is confident (probability >= 0.9 becomes 1, <= 0.1 becomes 0,
anything between stays unknown) and the default model is fine-tuned again on the 128 true
labels with those pseudo-labels replayed beside them.

Run from the repository root (about 12 minutes on 2 cores once the benchmark's synthetic
caches exist; the 5,136 shifted frames render in about 30 s)::

    nice python experiments/finetune_ceiling.py
    nice python experiments/finetune_ceiling.py --runs 4096:2500 --freeze 0   # one variation
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

#: the benchmark's pool (labels 0-511, test 512-911), then 4,096 more frames, then 128 for the gate
POOL = 912 + 4096 + 128


def unshifted(shift: dict, indices, config):
    """Inputs and labels of the shift's scenes rendered as generated, without the shift."""
    from bluesky_xsml.preprocess import preprocess_batch
    from bluesky_xsml.sim.generator import SceneGenerator, render_scene, scene_labels

    gen = SceneGenerator(seed=shift["seed"], size=shift["size"], detectors=shift["detectors"])
    frames, labels = [], []
    for i in indices:
        scene, _, _ = gen.scene_at(i)
        frames.append(render_scene(scene, np.random.default_rng([shift["seed"], 7, i])))
        labels.append(scene_labels(scene))
    inputs, _ok, errors = preprocess_batch(frames, config)
    assert not errors, errors
    return inputs, np.stack(labels).astype(np.float32)


def to_photons(inputs: np.ndarray, bench, indices) -> np.ndarray:
    """Integrating-shift inputs with every frame's true readout undone (an oracle).

    The block mean and maximum channels go back to counts, lose the frame's offset (and dark
    level) and are divided by its gain; the relative channel is recomputed.
    """
    from bluesky_xsml.preprocess import LOG_SCALE
    from bluesky_xsml.sim.generator import SceneGenerator

    shift = bench.SHIFTS["integrating"]
    gen = SceneGenerator(seed=shift["seed"], size=shift["size"], detectors=shift["detectors"])
    gain, offset = [], []
    for i in indices:  # the benchmark's draws, repeated
        scene, _, _ = gen.scene_at(i)
        noise = bench.apply_shift(scene, np.random.default_rng([shift["seed"], 7, i]),
                                  shift)["noise"]
        gain.append(noise["gain"])
        offset.append(noise["offset"] + noise["dark"] * noise["gain"])
    g = np.asarray(gain)[:, None, None, None]
    o = np.asarray(offset)[:, None, None, None]
    out = inputs.copy()
    counts = np.maximum(np.expm1(out[:, 0:2] * LOG_SCALE) - o, 0) / g
    out[:, 0:2] = np.log1p(counts) / LOG_SCALE
    peak = out[:, 0].max(axis=(1, 2), keepdims=True)
    out[:, 2] = np.where(peak > 0, out[:, 0] / np.maximum(peak, 1e-12), 0)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the packaged model)")
    p.add_argument("--shift", choices=("integrating", "exposure"), default="integrating")
    p.add_argument("--runs", default="128:300,512:600,1024:1200,4096:2500",
                   help="labeled frames:steps, comma separated")
    p.add_argument("--self-train", type=int, default=4096,
                   help="unlabeled frames for the self-training arm (0 turns it off)")
    p.add_argument("--self-train-steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--freeze", type=int, default=1)
    p.add_argument("--distill", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_finetune as bench

    from bluesky_xsml.training.finetune import finetune

    tagger, x, y, settings = bench.experiment_setup(args.model, args.shift, POOL,
                                                    threads=args.threads)
    cfg = tagger.preprocess_config
    x_test, y_test = x[512:912], y[512:912]
    extra_x, extra_y = x[912:912 + 4096], y[912:912 + 4096]
    # every labeled frame is trained on; the gate checks the last 128 frames of the pool
    settings.update(val_inputs=x[-128:], val_labels=y[-128:], lr=args.lr, freeze=args.freeze,
                    distill=args.distill)
    del settings["steps"]
    before = bench.mean_ap(tagger, x_test, y_test)
    print(f"model {tagger.checkpoint_id}, {args.shift} shift: held-out shifted mAP {before:.4f} "
          f"before (400 frames); lr {args.lr}, freeze {args.freeze}, distill {args.distill}")
    ux, uy = unshifted(bench.SHIFTS[args.shift], range(512, 912), cfg)
    print(f"the same 400 test scenes rendered without the shift: mAP "
          f"{bench.mean_ap(tagger, ux, uy):.4f} (what the shift costs)")
    if args.shift == "integrating":
        calibrated = to_photons(np.asarray(x_test, np.float32), bench, range(512, 912))
        print(f"the 400 test frames converted back to photons with each frame's true gain and "
              f"offset: mAP {bench.mean_ap(tagger, calibrated, y_test):.4f} (no fine-tuning)")
    print(f"{'labels':>6} {'steps':>5} {'shifted mAP':>11} {'gain':>6} {'original mAP':>19} "
          f"{'seconds':>7}", flush=True)

    def row(name, steps, new, report):
        after = bench.mean_ap(new, x_test, y_test)
        print(f"{name:>6} {steps:>5} {after:>11.4f} {100 * (after - before):>+6.1f} "
              f"{report.original_before:.4f} -> {report.original_after:.4f} "
              f"{report.seconds:>7.0f}", flush=True)

    first = None
    for spec in args.runs.split(","):
        n, steps = (int(v) for v in spec.split(":"))
        # the benchmark's 512 pool frames first, then the extra ones
        lx = x[:n] if n <= 512 else np.concatenate([x[:512], extra_x[:n - 512]])
        ly = y[:n] if n <= 512 else np.concatenate([y[:512], extra_y[:n - 512]])
        new, report = finetune(tagger, lx, ly, steps=steps, **settings)
        row(str(n), steps, new, report)
        if n == 128:
            first = new
    if args.self_train:
        if first is None:
            first, _ = finetune(tagger, x[:128], y[:128], steps=300, **settings)
        t0 = time.perf_counter()
        unlabeled = np.asarray(extra_x[:args.self_train], np.float32)
        pseudo = bench.pseudo_labels(first, unlabeled)[:, :y.shape[1]]
        known = ~np.isnan(pseudo)
        truth = extra_y[:args.self_train]
        print(f"self-training: pseudo-labels for {known.mean():.0%} of the "
              f"{len(unlabeled)} x {y.shape[1]} entries, "
              f"{(pseudo[known] == truth[known]).mean():.1%}"
              f" of them right ({time.perf_counter() - t0:.0f} s to label)")
        new, report = finetune(tagger, x[:128], y[:128], replay_inputs=unlabeled,
                               replay_labels=pseudo, steps=args.self_train_steps, **settings)
        row("128+U", args.self_train_steps, new, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
