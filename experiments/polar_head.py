"""Does telling the tagger where the beam is lift the spot tags?

Freezes a trained tagger (default: the packaged one), computes its pooled
features and logits once per frame, and trains a :class:`bluesky_xsml.polar.PolarHead`
on the polar view around the known beam centre (from the scene parameters, as
a calibrated beamline knows it) to correct those logits. The head trains on
frames the CNN never saw. Prints per-tag AP of the CNN alone and of the CNN
with the head on the validation, test and unseen-shape frames, and writes the
head's weights and the results to ``--out``.

    python experiments/polar_head.py --out runs/polar-head
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from bluesky_xsml.inference.tagger import Tagger
from bluesky_xsml.model import masked_bce_loss
from bluesky_xsml.polar import PolarConfig, PolarHead, input_centers, polar_features
from bluesky_xsml.training.data import load_arrays
from bluesky_xsml.training.metrics import average_precision

SIZES = "sizes=256+512+768+1024,detectors=train"


def shifted(centers: torch.Tensor, distance: float, seed: int) -> torch.Tensor:
    """``centers`` moved by ``distance`` input pixels, each in a random direction."""
    angle = torch.as_tensor(np.random.default_rng(seed).uniform(0, 2 * np.pi, len(centers)))
    return centers + distance * torch.stack([torch.cos(angle), torch.sin(angle)], 1)


def polar_only(arrays, centers, config: PolarConfig, batch: int = 256) -> torch.Tensor:
    """Polar features of every frame around ``centers``."""
    with torch.inference_mode():
        return torch.cat([polar_features(torch.as_tensor(np.asarray(arrays.inputs[a:a + batch],
                                                                       np.float32)),
                                         centers[a:a + batch], config)
                          for a in range(0, len(arrays), batch)])


def cnn_and_polar(net, arrays, config: PolarConfig, cache: Path, batch: int = 256,
                  jitter: float = 0.0):
    """Pooled CNN features, CNN logits and polar features of every frame.

    The CNN's outputs are cached in ``cache`` (they do not depend on the polar
    settings). ``jitter``: the centres are moved by a Gaussian error of that
    standard deviation (input pixels, per axis; one draw per frame).
    """
    S = arrays.inputs.shape[-1]
    centers = torch.as_tensor(input_centers(arrays.shapes, arrays.centers, S))
    if jitter:
        noise = np.random.default_rng(1).normal(0, jitter, tuple(centers.shape))
        centers = centers + torch.as_tensor(noise)
    have = cache.exists()
    pooled, logits, feats = [], [], []
    with torch.inference_mode():
        for a in range(0, len(arrays), batch):
            x = torch.as_tensor(np.asarray(arrays.inputs[a:a + batch], np.float32))
            if not have:
                h = net.stages(net.stem(x.contiguous(memory_format=torch.channels_last)))
                p = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], 1)
                pooled.append(p)
                logits.append(net.head(p))
            feats.append(polar_features(x, centers[a:a + batch], config))
    if have:
        saved = torch.load(cache)
        pooled, logits = saved["pooled"], saved["logits"]
    else:
        pooled, logits = torch.cat(pooled), torch.cat(logits)
        torch.save({"pooled": pooled, "logits": logits}, cache)
    return pooled, logits, torch.cat(feats), torch.isfinite(centers).all(1)


def per_tag_ap(labels, scores):
    return np.array([average_precision(labels[:, j], scores[:, j])
                     for j in range(labels.shape[1])])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="tagger checkpoint (default: packaged)")
    ap.add_argument("--train", default=f"synth:seed=4,n=24000,{SIZES}")
    ap.add_argument("--val", default=f"synth:seed=1,n=2000,{SIZES}")
    ap.add_argument("--test", default=f"synth:seed=2,n=2000,{SIZES}")
    ap.add_argument("--unseen", default="synth:seed=3,n=400,sizes=native,detectors=heldout")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="runs/polar-head")
    ap.add_argument("--views", default="peaks,relative")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--radial-bins", type=int, default=96)
    ap.add_argument("--harmonics", type=int, default=16)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--jitter", type=float, default=0.0,
                    help="train with each frame's centre moved by a Gaussian error of this "
                         "standard deviation (input pixels per axis)")
    ap.add_argument("--offsets", default="",
                    help="also score the test frames with centres this many input pixels off, "
                         "e.g. 1,2,4")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tagger = Tagger.load(args.model)
    net = tagger.net.eval()
    tags = list(tagger.tags)
    config = PolarConfig(views=tuple(args.views.split(",")), width=args.width,
                         radial_bins=args.radial_bins, harmonics=args.harmonics)
    cache_dir = Path("runs/cnn-features")
    cache_dir.mkdir(parents=True, exist_ok=True)
    sets = {}
    for name in ("train", "val", "test", "unseen"):
        t0 = time.perf_counter()
        arrays = load_arrays(getattr(args, name), config=tagger.preprocess_config,
                             workers=args.workers, progress=False)
        key = hashlib.sha1(f"{tagger.checkpoint_id}{arrays.source}".encode()).hexdigest()[:16]
        sets[name] = (*cnn_and_polar(net, arrays, config, cache_dir / f"{key}.pt",
                                     jitter=args.jitter if name == "train" else 0.0),
                      np.asarray(arrays.labels))
        if name == "test":
            test_arrays = arrays
        print(f"{name}: {len(arrays)} frames, features in {time.perf_counter() - t0:.0f} s",
              flush=True)

    head = PolarHead(config, sets["train"][0].shape[1], len(tags))
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    pooled, logits, feats, known, labels = sets["train"]
    y = torch.as_tensor(labels)
    n = len(y)
    steps = args.epochs * ((n + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps, pct_start=0.1)

    def scores(name):
        p, lg, f, k, lab = sets[name]
        head.eval()
        with torch.inference_mode():
            z = lg + head(f, p, k)
        head.train()
        return torch.sigmoid(lg).numpy(), torch.sigmoid(z).numpy(), lab

    iot, iop = tags.index("peaks_on_ring"), tags.index("peaks_isolated")
    history = []
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        order = torch.randperm(n)
        total = 0.0
        for a in range(0, n, args.batch):
            i = order[a:a + args.batch]
            z = logits[i] + head(feats[i], pooled[i], known[i])
            loss = masked_bce_loss(z, y[i], net.pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss) * len(i)
        _, s, lab = scores("val")
        aps = per_tag_ap(lab, s)
        history.append({"epoch": epoch + 1, "loss": total / n, "val_map": float(np.nanmean(aps)),
                        "peaks_on_ring": float(aps[iot]), "peaks_isolated": float(aps[iop])})
        print(f"epoch {epoch + 1}: loss {total / n:.4f}, val mAP {np.nanmean(aps):.4f}, "
              f"peaks_on_ring {aps[iot]:.3f}, peaks_isolated {aps[iop]:.3f} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)

    results = {"history": history, "model": tagger.checkpoint_id, "sets": {},
               "config": config.to_dict(), "args": vars(args)}
    for name in ("val", "test", "unseen"):
        cnn, both, lab = scores(name)
        a0, a1 = per_tag_ap(lab, cnn), per_tag_ap(lab, both)
        results["sets"][name] = {"cnn": dict(zip(tags, a0.tolist(), strict=True)),
                                 "cnn+polar": dict(zip(tags, a1.tolist(), strict=True)),
                                 "map": [float(np.nanmean(a0)), float(np.nanmean(a1))]}
        print(f"\n{name}: mAP {np.nanmean(a0):.4f} -> {np.nanmean(a1):.4f}")
        print(f"  {'tag':18s} {'CNN':>6s} {'+polar':>7s}")
        for t, u, v in zip(tags, a0, a1, strict=True):
            print(f"  {t:18s} {u:6.3f} {v:7.3f}")
    if args.offsets:
        p, lg, _, k, lab = sets["test"]
        exact = torch.as_tensor(input_centers(test_arrays.shapes, test_arrays.centers,
                                              test_arrays.inputs.shape[-1]))
        print("\ntest, centre off by (input px): mAP, peaks_on_ring, peaks_isolated")
        results["offsets"] = {}
        for d in (float(v) for v in args.offsets.split(",")):
            f = polar_only(test_arrays, shifted(exact, d, seed=0), config)
            head.eval()
            with torch.inference_mode():
                s_ = torch.sigmoid(lg + head(f, p, k)).numpy()
            a = per_tag_ap(lab, s_)
            results["offsets"][str(d)] = [float(np.nanmean(a)), float(a[iot]), float(a[iop])]
            print(f"  {d:g}: {np.nanmean(a):.4f}, {a[iot]:.3f}, {a[iop]:.3f}", flush=True)
    torch.save(head.state_dict(), out / "polar_head.pt")
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
