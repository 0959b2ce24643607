"""``xsml novelty-fit``: fit a tagger's novelty statistics on in-distribution frames.

The statistics (:class:`bluesky_xsml.novelty.NoveltyModel`) are fitted on the
pooled features of synthetic frames from the training distribution (or of a
``xsml synth`` dataset), and the ``novel`` threshold is set on other,
held-out frames at a chosen false-positive rate. They are written into a
checkpoint (``--out``) or, for a checkpoint that must stay byte-identical
such as the packaged default, into a sidecar file next to it (``--sidecar``:
``<name>.novelty.npz``, tied to the checkpoint's content id).

Examples
--------
::

    xsml novelty-fit --sidecar                                    # the packaged default
    xsml novelty-fit --checkpoint ft/abc.pt --out ft/abc-nov.pt --n-fit 4000
    xsml novelty-fit --dataset data/train.zarr --val-dataset data/val.zarr --sidecar
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterable, Sequence

import numpy as np

from ..errors import CheckpointError
from ..inference.tagger import Tagger, default_checkpoint_path
from ..novelty import NoveltyModel, sidecar_path
from ..sim.dataset import open_dataset
from ..sim.generator import SceneGenerator

__all__ = ["fit_novelty", "synthetic_frames", "features_of", "add_arguments", "main"]

log = logging.getLogger(__name__)


def synthetic_frames(n: int, *, seed: int, sizes: Sequence[int] = (256, 512),
                     detectors="train", tags=None) -> tuple[list[np.ndarray], np.ndarray]:
    """``n`` generator frames (sizes taken in turn) and their ``(n, 23)`` labels."""
    gens = [SceneGenerator(seed=seed + 1000 * k, size=int(s), detectors=detectors, tags=tags)
            for k, s in enumerate(sizes)]
    frames, labels = [], []
    for i in range(int(n)):
        f, lab, _ = gens[i % len(gens)].one()
        frames.append(f)
        labels.append(lab)
    lab = np.stack(labels).astype(np.float32) if labels else np.zeros((0, 23), np.float32)
    return frames, lab


def features_of(tagger, frames: Iterable[np.ndarray], *, batch_size: int = 32,
                ) -> tuple[np.ndarray, np.ndarray]:
    """``(pooled features, probabilities)`` of raw frames (skipping none: a bad frame raises)."""
    feats, probs = [], []
    frames = list(frames)
    for a in range(0, len(frames), batch_size):
        out = tagger.analyse(frames[a:a + batch_size], keep_features=True)
        feats.append(out.features)
        probs.append(out.probs)
    if not feats:
        return (np.zeros((0, tagger.feature_dim), np.float32),
                np.zeros((0, len(tagger.tags)), np.float32))
    return np.concatenate(feats), np.concatenate(probs)


def fit_novelty(tagger, fit_frames, val_frames, *, embedding_dim: int = 64, fpr: float = 0.01,
                shrinkage: float = 0.05, data: str = ""):
    """Fit and attach novelty statistics to ``tagger``; returns the model.

    Parameters
    ----------
    tagger : Tagger
    fit_frames, val_frames : sequence of 2-D arrays
        In-distribution frames: the statistics are fitted on the first, the
        threshold set on the second (disjoint) set.
    embedding_dim, fpr, shrinkage
        See :meth:`bluesky_xsml.novelty.NoveltyModel.fit`.
    data : str
        Where the frames came from (recorded in ``info``).
    """
    f_fit, _ = features_of(tagger, fit_frames)
    f_val, _ = features_of(tagger, val_frames)
    model = NoveltyModel.fit(f_fit, f_val, embedding_dim=embedding_dim, fpr=fpr,
                             shrinkage=shrinkage,
                             info={"checkpoint_id": tagger.checkpoint_id, "data": data})
    tagger.set_novelty(model)
    return model


def refit_novelty(parent, new, fit_inputs: Sequence, val_inputs, *, max_frames: int = 4000,
                  seed: int = 0):
    """Refit ``parent`` statistics' kind (dimension, false-positive rate) for a new tagger.

    Fine-tuning changes the features, so the parent's statistics no longer
    describe them. ``fit_inputs`` are arrays of preprocessed inputs the new
    tagger was trained on (its new frames, replayed and synthetic ones; at most
    ``max_frames`` are drawn), ``val_inputs`` held-out ones for the threshold.
    On too few frames (fewer than 2 of either) ``new`` is left without
    statistics and a warning is logged. Returns the new model or ``None``.
    """
    rng = np.random.default_rng(seed)
    sizes = [len(x) for x in fit_inputs]
    total = sum(sizes)
    if total < 2 or val_inputs is None or len(val_inputs) < 2:
        log.warning("novelty statistics not refitted for %s: %d fit and %d held-out frames; "
                    "run xsml novelty-fit", new.checkpoint_id, total,
                    0 if val_inputs is None else len(val_inputs))
        new.set_novelty(None)
        return None
    picks = np.sort(rng.choice(total, min(total, max_frames), replace=False))
    starts = np.cumsum([0, *sizes])

    def feats(arrays_and_rows):
        out = []
        for arr, rows in arrays_and_rows:
            for a in range(0, len(rows), 64):
                x = np.asarray(arr[rows[a:a + 64]], np.float32)  # rows sorted (zarr too)
                out.append(new.analyse_inputs(x, keep_features=True).features)
        return np.concatenate(out)

    parts = []
    for k, arr in enumerate(fit_inputs):
        rows = picks[(picks >= starts[k]) & (picks < starts[k + 1])] - starts[k]
        if len(rows):
            parts.append((arr, rows))
    f_fit = feats(parts)
    f_val = feats([(val_inputs, np.arange(len(val_inputs)))])
    model = NoveltyModel.fit(f_fit, f_val, embedding_dim=parent.embedding_dim, fpr=parent.fpr,
                             shrinkage=float(parent.info.get("shrinkage", 0.05)),
                             info={"checkpoint_id": new.checkpoint_id,
                                   "data": "fine-tuning inputs", "refit_from": parent.digest()})
    new.set_novelty(model)
    return model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``xsml novelty-fit``."""
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint to fit for (default: the packaged default model)")
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", default=None, help="write a checkpoint with the statistics inside")
    out.add_argument("--sidecar", action="store_true",
                     help="write <checkpoint>.novelty.npz next to the checkpoint instead")
    parser.add_argument("--dataset", default=None, help="fit on this xsml synth dataset (zarr)")
    parser.add_argument("--val-dataset", default=None,
                        help="set the threshold on this dataset (default: generated frames)")
    parser.add_argument("--n-fit", type=int, default=2000, help="frames to fit on (default 2000)")
    parser.add_argument("--n-val", type=int, default=1000,
                        help="held-out frames for the threshold (default 1000)")
    parser.add_argument("--seed", type=int, default=10,
                        help="generator seed of the fit frames; seed+1 gives the held-out ones")
    parser.add_argument("--sizes", default="256,512", help="frame sizes, in turn (default 256,512)")
    parser.add_argument("--embedding-dim", type=int, default=64,
                        help="values of the stored embedding per frame (default 64)")
    parser.add_argument("--fpr", type=float, default=0.01,
                        help="in-distribution frames flagged novel (default 0.01)")
    parser.add_argument("--shrinkage", type=float, default=0.05,
                        help="covariance shrinkage towards the diagonal (default 0.05)")


def _dataset_frames(path: str, n: int) -> list[np.ndarray]:
    ds = open_dataset(path)
    return [ds.frame(i) for i in range(min(n, len(ds)))]


def main(args: argparse.Namespace) -> int:
    """Run ``xsml novelty-fit``; 0 on success, 2 on bad input."""
    try:
        tagger = Tagger.load(args.checkpoint, precision="fp32")
        sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    except (CheckpointError, ValueError) as err:
        print(f"xsml novelty-fit: {err}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if args.dataset:
        fit = _dataset_frames(args.dataset, args.n_fit)
        data = f"dataset:{args.dataset}"
    else:
        fit, _ = synthetic_frames(args.n_fit, seed=args.seed, sizes=sizes)
        data = f"synth:seed={args.seed},n={args.n_fit},sizes={'+'.join(map(str, sizes))}"
    if args.val_dataset:
        val = _dataset_frames(args.val_dataset, args.n_val)
        data += f";val=dataset:{args.val_dataset}"
    else:
        val, _ = synthetic_frames(args.n_val, seed=args.seed + 1, sizes=sizes)
        data += f";val=synth:seed={args.seed + 1},n={args.n_val}"
    try:
        model = fit_novelty(tagger, fit, val, embedding_dim=args.embedding_dim, fpr=args.fpr,
                            shrinkage=args.shrinkage, data=data)
    except ValueError as err:
        print(f"xsml novelty-fit: {err}", file=sys.stderr)
        return 2
    if args.sidecar:
        ckpt = args.checkpoint or default_checkpoint_path()
        where = model.save(sidecar_path(ckpt), checkpoint_id=tagger.checkpoint_id)
    else:
        where = tagger.save(args.out)
    print(json.dumps({"written": str(where), "checkpoint_id": tagger.checkpoint_id,
                      "threshold": round(model.threshold, 4), "fpr": model.fpr,
                      "embedding_dim": model.embedding_dim, "data": data,
                      "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
    return 0
