"""Image view against a profile-coefficient view against both: same data, same budget.

The source work found that a coefficient view of a scattering frame (a physics-aware
transform around the beam centre) beat the image view, and that a joint two-view network
beat both. This experiment measures the same question on the project's synthetic data:

- ``image``: the default ``TaggerNet`` on the 6-channel 128x128 image inputs;
- ``profile``: a small MLP on the 192 radial/azimuthal profile coefficients that the
  traditional baseline uses (``bluesky_xsml/training/baseline.py``: q-ring band statistics,
  azimuthal variation per band, row/column profiles; computed around the known beam centre);
- ``two_view``: the same CNN trunk and a profile MLP branch, concatenated before one head.

All three see the same training frames in the same order, with the same optimiser, schedule,
epochs, loss (masked BCE with per-tag positive weights) and no augmentation (flips and count
scaling would change the two views inconsistently). Each is scored on the held-out test frames
and on the unseen detector shapes. The data are the cached synthetic sets that ``xsml train``
and ``xsml evaluate`` use (built on first use, see docs/training.md)::

    python experiments/two_view.py --n-train 8000 --epochs 6 --out runs/two-view

It prints one line per model and epoch, then a table, and writes ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bluesky_xsml.inference.device import cpu_supports_bf16
from bluesky_xsml.model import TaggerNet, TaggerNetConfig, masked_bce_loss
from bluesky_xsml.preprocess import CHANNELS, PreprocessConfig
from bluesky_xsml.tags import TAG_NAMES
from bluesky_xsml.training.data import load_arrays
from bluesky_xsml.training.metrics import evaluate_scores
from bluesky_xsml.training.recipe import lr_at, pos_weights

SIZES = "256+512+768+1024"
TRAIN = f"synth:seed=0,n=24000,sizes={SIZES},detectors=train"
TEST = f"synth:seed=2,n=2000,sizes={SIZES},detectors=train"
UNSEEN = "synth:seed=3,n=400,sizes=native,detectors=heldout"


class ProfileMLP(nn.Module):
    """Standardised profile coefficients -> hidden representation (and optionally logits)."""

    def __init__(self, n_in: int, hidden: int, n_tags: int | None, dropout: float = 0.1):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, hidden), nn.GELU())
        self.head = nn.Linear(hidden, n_tags) if n_tags else None
        self.register_buffer("pos_weight", torch.ones(n_tags or 1))

    def forward(self, f, targets=None):
        h = self.body(f)
        if self.head is None:
            return h
        logits = self.head(h)
        return logits, None if targets is None else masked_bce_loss(logits, targets,
                                                                     self.pos_weight)


class TwoView(nn.Module):
    """CNN trunk on the image view + MLP on the profile view, one linear head."""

    def __init__(self, config: TaggerNetConfig, n_features: int, hidden: int = 128):
        super().__init__()
        self.cnn = TaggerNet(config)
        self.mlp = ProfileMLP(n_features, hidden, None)
        self.head = nn.Linear(self.cnn.head.in_features + hidden, config.n_tags)
        self.dropout = nn.Dropout(config.dropout)
        self.cnn.head = nn.Identity()  # the trunk's pooled features
        self.register_buffer("pos_weight", torch.ones(config.n_tags))

    def forward(self, x, f, targets=None):
        h = self.cnn.stages(self.cnn.stem(x))
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        logits = self.head(self.dropout(torch.cat([pooled, self.mlp(f)], dim=1)))
        return logits, None if targets is None else masked_bce_loss(logits, targets,
                                                                     self.pos_weight)


def call(model, kind, x, f, y=None):
    if kind == "image":
        return model(x, y)
    if kind == "profile":
        return model(f, y)
    return model(x, f, y)


def scores(model, kind, data, feats, *, batch: int = 128) -> np.ndarray:
    model.eval()
    out = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                enabled=cpu_supports_bf16()):
        for a in range(0, len(data.labels), batch):
            x = torch.from_numpy(np.asarray(data.inputs[a:a + batch], np.float32))
            x = x.contiguous(memory_format=torch.channels_last)
            f = torch.from_numpy(feats[a:a + batch])
            logits, _ = call(model, kind, x, f)
            out.append(torch.sigmoid(logits.float()).numpy())
    return np.concatenate(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=8000)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--models", default="image,profile,two_view")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/two-view")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    use_bf16 = cpu_supports_bf16()  # emulated bf16 is several times slower than fp32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    pcfg = PreprocessConfig()
    # the first n_train frames of the training set (frame i depends on (seed, i) only)
    train_spec = TRAIN.replace("n=24000", f"n={args.n_train}")
    train = load_arrays(train_spec, config=pcfg, progress=True)
    test = load_arrays(TEST, config=pcfg, progress=False)
    unseen = load_arrays(UNSEEN, config=pcfg, progress=False)
    mu = train.features.mean(0)
    sd = train.features.std(0) + 1e-6

    def standardise(a):
        return np.clip((np.asarray(a, np.float32) - mu) / sd, -10, 10).astype(np.float32)

    f_train, f_test, f_unseen = (standardise(d.features) for d in (train, test, unseen))
    n_feat = f_train.shape[1]
    config = TaggerNetConfig(n_tags=len(TAG_NAMES), in_channels=len(CHANNELS))
    pw = torch.from_numpy(pos_weights(train.labels))
    steps_per_epoch = len(train.labels) // args.batch_size
    total = steps_per_epoch * args.epochs
    results: dict = {"n_train": len(train.labels), "epochs": args.epochs,
                     "train": train_spec, "bf16": use_bf16, "test": TEST, "unseen": UNSEEN,
                     "models": {}}
    print(f"{len(train.labels)} training frames, {n_feat} profile coefficients, "
          f"{args.epochs} epochs of {steps_per_epoch} steps, {torch.get_num_threads()} threads",
          flush=True)
    for kind in args.models.split(","):
        torch.manual_seed(args.seed)
        if kind == "image":
            model = TaggerNet(config)
        elif kind == "profile":
            model = ProfileMLP(n_feat, 512, len(TAG_NAMES))
        elif kind == "two_view":
            model = TwoView(config, n_feat)
        else:
            raise SystemExit(f"unknown model {kind!r}: choose image, profile, two_view")
        model.pos_weight.copy_(pw)
        model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
        step, t0 = 0, time.perf_counter()
        for epoch in range(args.epochs):
            model.train()
            order = np.random.default_rng([args.seed, epoch]).permutation(len(train.labels))
            run = 0.0
            for b in range(steps_per_epoch):
                idx = np.sort(order[b * args.batch_size:(b + 1) * args.batch_size])
                x = torch.from_numpy(np.asarray(train.inputs[idx], np.float32))
                x = x.contiguous(memory_format=torch.channels_last)
                f = torch.from_numpy(f_train[idx])
                y = torch.from_numpy(np.asarray(train.labels[idx], np.float32))
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, total=total, warmup=steps_per_epoch // 2,
                                    peak=args.lr)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                    _, loss = call(model, kind, x, f, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                run += loss.item()
                step += 1
            print(f"{kind:9s} epoch {epoch + 1}/{args.epochs} loss {run / steps_per_epoch:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        train_s = time.perf_counter() - t0
        m_test = evaluate_scores(test.labels, scores(model, kind, test, f_test), TAG_NAMES)
        m_unseen = evaluate_scores(unseen.labels, scores(model, kind, unseen, f_unseen),
                                   TAG_NAMES)
        results["models"][kind] = {
            "test_mAP": round(m_test.mean_ap, 4), "unseen_mAP": round(m_unseen.mean_ap, 4),
            "test_ap": {t: round(float(a), 4) for t, a in zip(TAG_NAMES, m_test.ap, strict=True)},
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(train_s, 1)}
        print(f"{kind:9s} test mAP {m_test.mean_ap:.4f}  unseen mAP {m_unseen.mean_ap:.4f}  "
              f"({train_s:.0f} s)", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))

    models = results["models"]
    print("\n| tag | " + " | ".join(models) + " |")
    print("|---|" + "---|" * len(models))
    for t in TAG_NAMES:
        print(f"| {t} | " + " | ".join(f"{models[k]['test_ap'][t]:.3f}" for k in models) + " |")
    print("| **test mAP** | " + " | ".join(f"**{models[k]['test_mAP']:.3f}**" for k in models)
          + " |")
    print("| unseen-shape mAP | " + " | ".join(f"{models[k]['unseen_mAP']:.3f}" for k in models)
          + " |")
    return 0 if all(math.isfinite(m["test_mAP"]) for m in models.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
