"""``xsml polar-head``: give a trained tagger a polar head that reads the beam centre.

The tagger's CNN stays frozen. Its pooled features and logits are computed once
per training frame, as are the polar features around each frame's beam centre
(:mod:`bluesky_xsml.polar`), so each epoch of the head costs seconds. The head
learns a correction to the CNN's logits with the same masked, positive-weighted
loss the CNN was trained with. It should train on frames the CNN never saw:
on the CNN's own training frames its logits are more confident than on new
frames, and the head would learn to trust them too much.

The result is a new checkpoint (the CNN's weights unchanged, the head added)
whose thresholds maximise F1 on the validation frames with their beam centres.
Frames without a centre get the CNN's outputs exactly.

Examples
--------
>>> import argparse
>>> from bluesky_xsml.training import polar_head
>>> p = argparse.ArgumentParser(); polar_head.add_arguments(p)
>>> p.parse_args(["--data", "synth:seed=4,n=100", "--val-data", "synth:seed=1,n=50"]).epochs
30
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..inference.tagger import Tagger
from ..model import TaggerNet, TaggerNetConfig, masked_bce_loss
from ..polar import PolarConfig, input_centers, polar_features
from .data import load_arrays
from .metrics import evaluate_scores

__all__ = ["add_arguments", "main", "fit_polar_head", "PolarHeadReport"]

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="tagger checkpoint whose CNN is kept (default: the packaged model)")
    parser.add_argument("--data", required=True,
                        help="training frames with beam centres: a synth: or renderb: spec (frames "
                             "the CNN was not trained on) or an xsml synth store")
    parser.add_argument("--val-data", required=True,
                        help="validation frames (per-epoch mAP and the thresholds)")
    parser.add_argument("--out", default="runs/polar-head",
                        help="directory for model.pt and history.jsonl")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (one-cycle)")
    parser.add_argument("--weight-decay", type=float, default=0.05,
                        help="AdamW weight decay (default 0.05)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="frames per training step (default 256)")
    parser.add_argument("--width", type=int, default=64, help="channels of the head")
    parser.add_argument("--radial-bins", type=int, default=96,
                        help="radii sampled in the polar view (default 96)")
    parser.add_argument("--harmonics", type=int, default=16,
                        help="azimuthal harmonics kept per radius (default 16)")
    parser.add_argument("--views", default="peaks,relative",
                        help="comma-separated: peaks, relative, sharpness")
    parser.add_argument("--fill-unseen", action="store_true",
                        help="fill what the detector did not see (edges, gaps, masks) with "
                             "each radius's mean before the harmonics "
                             "(PolarConfig.fill_unseen)")
    parser.add_argument("--replace-head", action="store_true",
                        help="the model already has a polar head: train a new one in its place "
                             "(e.g. after fine-tuning changed the CNN)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the head's initialisation and batch order (default 0)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="processes rendering frames of synth: and renderb: specs")
    parser.add_argument("--cache-dir", default=None,
                        help="where preprocessed inputs are cached (default $XSML_CACHE, else "
                             "$XDG_CACHE_HOME/bluesky-xsml or ~/.cache/bluesky-xsml)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


@dataclass
class PolarHeadReport:
    """What :func:`fit_polar_head` did: per-epoch history and validation results."""

    history: list = field(default_factory=list)
    val_map_cnn: float = float("nan")
    val_map: float = float("nan")
    val_ap_cnn: dict = field(default_factory=dict)
    val_ap: dict = field(default_factory=dict)
    seconds: float = 0.0


def _frame_features(net, arrays, config, *, batch: int = 256, progress: bool = False):
    """CNN pooled features and logits, polar features and known-centre mask, per frame."""
    import torch
    from tqdm.auto import tqdm

    if arrays.centers is None:
        raise ValueError(f"{arrays.source}: these frames carry no beam centres (data cached by "
                         "an older bluesky-xsml, or saved without them)")
    S = arrays.inputs.shape[-1]
    centers = torch.as_tensor(input_centers(arrays.shapes, arrays.centers, S))
    pooled, logits, feats = [], [], []
    net = net.eval()
    with torch.inference_mode(), tqdm(total=len(arrays), desc="xsml polar-head: features",
                                      unit="frame", disable=not progress,
                                      mininterval=2.0) as bar:
        for a in range(0, len(arrays), batch):
            x = torch.as_tensor(np.asarray(arrays.inputs[a:a + batch], np.float32))
            p = net.features(x.contiguous(memory_format=torch.channels_last))
            pooled.append(p)
            logits.append(net.head(p))
            feats.append(polar_features(x, centers[a:a + batch], config))
            bar.update(len(x))
    known = torch.isfinite(centers).all(1)
    return torch.cat(pooled), torch.cat(logits), torch.cat(feats), known


def fit_polar_head(tagger, train, val, *, config=None, epochs: int = 30, lr: float = 1e-3,
                   weight_decay: float = 0.05, batch_size: int = 256, seed: int = 0,
                   replace: bool = False, progress: bool = False):
    """A copy of ``tagger`` with a trained polar head (its CNN unchanged).

    Parameters
    ----------
    tagger : Tagger
        Its network must not have a polar head yet, unless ``replace``.
    train, val : CachedArrays
        Frames with beam centres (:func:`bluesky_xsml.training.data.load_arrays`).
    config : PolarConfig, optional
    epochs, lr, weight_decay, batch_size, seed
        One-cycle AdamW schedule over ``epochs`` passes of ``train``.
    replace : bool
        Train a new head in place of the one ``tagger`` has.
    progress : bool
        Progress bars.

    Returns
    -------
    (Tagger, PolarHeadReport)
        The new tagger has max-F1 thresholds from ``val`` (with centres).
    """
    import torch

    if tagger.uses_beam_center and not replace:
        raise ValueError(f"tagger {tagger.checkpoint_id} already has a polar head (pass "
                         "replace=True, or --replace-head, to train a new one in its place)")
    config = config or PolarConfig()
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    cnn_config = {k: v for k, v in tagger.net.config.to_dict().items() if k != "polar"}
    cnn = TaggerNet(TaggerNetConfig.from_dict(cnn_config))
    cnn.load_state_dict({k: v for k, v in tagger.net.state_dict().items()
                         if not k.startswith("polar.")})
    cnn = cnn.float().eval()
    tr = _frame_features(cnn, train, config, progress=progress)
    va = _frame_features(cnn, val, config, progress=progress)
    if not bool(tr[3].any()):
        raise ValueError(f"{train.source}: no frame has a beam centre")

    net_config = TaggerNetConfig.from_dict({**cnn.config.to_dict(), "polar": config.to_dict()})
    net = TaggerNet(net_config)
    missing = net.load_state_dict(cnn.state_dict(), strict=False).missing_keys
    assert all(k.startswith("polar.") for k in missing), missing
    head = net.polar.train()
    y = torch.as_tensor(np.asarray(train.labels, np.float32))
    n = len(y)
    steps_per_epoch = (n + batch_size - 1) // batch_size
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.1)
    pooled, logits, feats, known = tr
    report = PolarHeadReport()
    tags = list(tagger.tags)

    def val_scores():
        head.eval()
        with torch.inference_mode():
            z = va[1] + head(va[2], va[0], va[3])
        head.train()
        return torch.sigmoid(z).numpy()

    cnn_metrics = evaluate_scores(val.labels, torch.sigmoid(va[1]).numpy(), tags)
    report.val_map_cnn = round(cnn_metrics.mean_ap, 4)
    report.val_ap_cnn = {t: round(float(a), 4) for t, a in zip(tags, cnn_metrics.ap, strict=True)}
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for a in range(0, n, batch_size):
            i = order[a:a + batch_size]
            z = logits[i] + head(feats[i], pooled[i], known[i])
            loss = masked_bce_loss(z, y[i], cnn.pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(i)
        vm = evaluate_scores(val.labels, val_scores(), tags)
        row = {"epoch": epoch + 1, "loss": round(total / n, 5), "val_mAP": round(vm.mean_ap, 4),
               "seconds": round(time.perf_counter() - t0, 1)}
        for t in ("peaks_on_ring", "peaks_isolated"):
            if t in tags:
                row[t] = round(float(vm.ap[tags.index(t)]), 4)
        report.history.append(row)
        if progress:
            print(json.dumps(row), flush=True)
    vm = evaluate_scores(val.labels, val_scores(), tags)
    report.val_map = round(vm.mean_ap, 4)
    report.val_ap = {t: round(float(a), 4) for t, a in zip(tags, vm.ap, strict=True)}
    report.seconds = round(time.perf_counter() - t_start, 1)
    metadata = {k: v for k, v in tagger.metadata.items() if k != "checkpoint_id"}
    metadata.update({"parent_id": tagger.checkpoint_id, "polar_head": {
        "train_data": train.source, "n_train": n, "val_data": val.source, "epochs": epochs,
        "lr": lr, "val_mAP_cnn": report.val_map_cnn, "val_mAP": report.val_map,
        "seconds": report.seconds}})
    new = Tagger(net.eval(), tags, thresholds=vm.threshold.astype(np.float32),
                 preprocess=tagger.preprocess_config, metadata=metadata)
    return new, report


def main(args: argparse.Namespace) -> int:
    """Run ``xsml polar-head``; returns the process exit code."""
    progress = not args.no_progress
    try:
        config = PolarConfig(views=tuple(v.strip() for v in args.views.split(",") if v.strip()),
                             width=args.width, radial_bins=args.radial_bins,
                             harmonics=args.harmonics, fill_unseen=args.fill_unseen)
    except ValueError as err:
        raise SystemExit(f"xsml polar-head: {err}") from None
    tagger = Tagger.load(args.model, precision="fp32")
    if tagger.uses_beam_center and not args.replace_head:
        raise SystemExit(f"xsml polar-head: {args.model or 'the packaged model'} already has "
                         "a polar head (--replace-head trains a new one in its place)")
    arrays = {}
    for name, spec in (("training", args.data), ("validation", args.val_data)):
        t0 = time.perf_counter()
        arrays[name] = load_arrays(spec, config=tagger.preprocess_config,
                                   cache_dir=args.cache_dir, workers=args.workers,
                                   progress=progress)
        print(f"{name} data {arrays[name].source}: {len(arrays[name])} frames "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    try:
        new, report = fit_polar_head(tagger, arrays["training"], arrays["validation"],
                                     config=config, epochs=args.epochs, lr=args.lr,
                                     weight_decay=args.weight_decay,
                                     batch_size=args.batch_size, seed=args.seed,
                                     replace=args.replace_head, progress=progress)
    except ValueError as err:
        raise SystemExit(f"xsml polar-head: {err}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "history.jsonl", "w") as f:
        for row in report.history:
            f.write(json.dumps(row) + "\n")
    path = new.save(out / "model.pt")
    print(f"{'tag':<20} {'CNN':>8} {'+polar':>8}   (validation AP)")
    for t in new.tags:
        print(f"{t:<20} {report.val_ap_cnn[t]:>8.4f} {report.val_ap[t]:>8.4f}")
    print(f"{'mAP':<20} {report.val_map_cnn:>8.4f} {report.val_map:>8.4f}")
    print(f"wrote {path} (checkpoint {new.checkpoint_id}, parent {tagger.checkpoint_id}) "
          f"in {report.seconds:.0f} s")
    return 0
