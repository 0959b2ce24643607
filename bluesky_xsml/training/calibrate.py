"""``xsml calibrate``: fit per-tag probability calibration on validation frames.

Fits, per tag, a Platt map on the logit (``p' = sigmoid(a * logit(p) + b)``,
:class:`bluesky_xsml.calibration.Calibration`) to the tagger's outputs on
validation frames, and writes a copy of the checkpoint that carries it. The
map is increasing, so AP and ROC-AUC do not change, and the checkpoint's
thresholds are mapped with it, so every tag decision stays the same (the old
thresholds are pinned: see the module above). Fit it on frames that are not
the ones you will report (the thresholds' validation set), never on the test set.

The fit minimises the log loss against Platt's targets (``(n+ + 1)/(n+ + 2)``
for positives, ``1/(n- + 2)`` for negatives), which keeps the slope finite on
tags the validation frames separate perfectly, and unknown (``NaN``) labels
are left out as in the masked training loss. A tag without both a known
positive and a known negative keeps the identity map.

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> z = rng.normal(0, 2, 4000)
>>> y = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(float)  # calibrated at slope 1
>>> p = 1 / (1 + np.exp(-3 * z))                                   # overconfident x3
>>> a, b = fit_platt(y[:, None], p[:, None])
>>> round(float(a[0]), 1), abs(float(b[0])) < 0.1
(0.3, True)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from ..calibration import Calibration, logit, sigmoid
from ..inference.tagger import Tagger
from .data import load_arrays
from .evaluate import arrays_centers, predict_arrays
from .metrics import ECE_BINS, calibration_errors

__all__ = ["add_arguments", "calibrate_tagger", "fit_platt", "main"]


def _fit_one(z: np.ndarray, y: np.ndarray, iters: int = 100) -> tuple[float, float]:
    """Newton's method on the log loss of ``sigmoid(a z + b)`` against Platt targets."""
    n_pos = float(y.sum())
    n_neg = float(len(y) - n_pos)
    t = np.where(y >= 0.5, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    X = np.stack([z, np.ones_like(z)], axis=1)
    w = np.array([1.0, 0.0])

    def loss(w):
        m = X @ w
        # log(1 + exp(-m)) and log(1 + exp(m)) without overflow
        return float(np.sum(t * np.logaddexp(0, -m) + (1 - t) * np.logaddexp(0, m)))

    cur = loss(w)
    for _ in range(iters):
        p = sigmoid(X @ w)
        g = X.T @ (p - t)
        h = (X * (p * (1 - p))[:, None]).T @ X + 1e-9 * np.eye(2)
        step = np.linalg.solve(h, g)
        lr = 1.0
        while lr > 1e-6:
            new = w - lr * step
            val = loss(new)
            if val <= cur:
                break
            lr /= 2
        else:
            break
        done = abs(cur - val) < 1e-10 * max(1.0, abs(cur))
        w, cur = new, val
        if done:
            break
    return float(w[0]), float(w[1])


def fit_platt(labels, scores, *, min_slope: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
    """Per-tag Platt slope and offset on the logit of ``scores``.

    Parameters
    ----------
    labels : array_like, shape (N, T)
        1/0, ``NaN`` unknown (left out).
    scores : array_like, shape (N, T)
        The tagger's probabilities.
    min_slope : float
        Slopes are kept at or above this, so the map stays increasing.

    Returns
    -------
    a, b : numpy.ndarray, shape (T,)
        Identity (1, 0) for a tag without both a known positive and a known negative.
    """
    y = np.asarray(labels, np.float64)
    s = np.asarray(scores, np.float64)
    if y.ndim != 2 or y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be the same (N, T)")
    T = y.shape[1]
    a, b = np.ones(T), np.zeros(T)
    for j in range(T):
        known = np.isfinite(y[:, j])
        yj = (y[known, j] >= 0.5).astype(np.float64)
        if yj.size == 0 or yj.min() == yj.max():
            continue
        a[j], b[j] = _fit_one(logit(s[known, j]), yj)
        if a[j] < min_slope:
            a[j] = min_slope
    return a, b


def calibrate_tagger(tagger: Tagger, labels, scores, *, source: str = "") -> Calibration:
    """Fit a calibration to ``tagger``'s (uncalibrated) ``scores`` and set it on the tagger.

    The tagger's thresholds are mapped to the calibrated scale and pinned, so
    its decisions do not change. Returns the calibration (its ``info`` holds the
    fit's ECE before and after on these frames).

    Raises
    ------
    ValueError
        The tagger already carries a calibration (fit on the network's own
        outputs: load the uncalibrated parent), or the shapes do not fit.
    """
    if tagger.calibration is not None:
        raise ValueError("this tagger is already calibrated; calibrate its uncalibrated parent")
    a, b = fit_platt(labels, scores)
    thr = np.asarray(tagger.thresholds, np.float64)
    cal = Calibration(a, b, pinned=np.where((thr > 0) & (thr < 1), thr, np.nan))
    before, pooled_before = calibration_errors(labels, scores)
    after, pooled_after = calibration_errors(labels, cal.apply(scores))

    def r(v):
        return None if not np.isfinite(v) else round(float(v), 4)

    cal.info = {"method": "platt on the logit, per tag", "fitted_on": source,
                "n_frames": int(np.shape(labels)[0]), "ece_bins": ECE_BINS,
                "fit_ece_pooled_before": r(pooled_before), "fit_ece_pooled_after": r(pooled_after),
                "fit_mean_ece_before": r(np.nanmean(before)),
                "fit_mean_ece_after": r(np.nanmean(after)),
                "uncalibrated_id": tagger.checkpoint_id}
    tagger.set_calibration(cal)
    return cal


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``xsml calibrate``."""
    parser.add_argument("--model", default=None,
                        help="uncalibrated checkpoint (or a training output directory holding "
                             "model.pt); default: the packaged model")
    parser.add_argument("--data", required=True,
                        help="validation frames to fit on ('synth:...' or 'renderb:...' spec or an "
                             "'xsml synth' zarr store); not the frames you report")
    parser.add_argument("--out", required=True, help="where to write the calibrated checkpoint")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="frames per inference batch (default 64)")
    parser.add_argument("--cache-dir", default=None, help="cache of preprocessed inputs")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="processes rendering frames of synth: and renderb: specs")
    parser.add_argument("--no-beam-center", action="store_true",
                        help="fit on the CNN's outputs without the frames' beam centres")
    parser.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16", "fp16"],
                        help="inference precision of the fit (default fp32)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    """Run ``xsml calibrate``; returns the process exit code."""
    model_path = args.model
    if model_path is not None and Path(model_path).is_dir():
        model_path = str(Path(model_path) / "model.pt")
    tagger = Tagger.load(model_path, precision=args.precision)
    if tagger.calibration is not None:
        raise SystemExit(f"{model_path} is already calibrated (parent "
                         f"{tagger.calibration.info.get('uncalibrated_id')}); calibrate the "
                         "uncalibrated checkpoint instead")
    val = load_arrays(args.data, config=tagger.preprocess_config, cache_dir=args.cache_dir,
                      workers=args.workers, progress=not args.no_progress)
    scores = predict_arrays(tagger, val.inputs, args.batch_size, not args.no_progress,
                            arrays_centers(tagger, val, not args.no_beam_center))
    parent = tagger.checkpoint_id
    cal = calibrate_tagger(tagger, val.labels, scores, source=val.source)
    out = tagger.save(args.out)
    info = cal.info
    print(f"calibrated {parent} on {val.source} ({len(val)} frames): pooled ECE "
          f"{info['fit_ece_pooled_before']} -> {info['fit_ece_pooled_after']}, mean per-tag ECE "
          f"{info['fit_mean_ece_before']} -> {info['fit_mean_ece_after']} (on the fitting frames)")
    print(f"{'tag':<20} {'a':>7} {'b':>7} {'thr':>7} {'-> thr':>7}")
    for j, t in enumerate(tagger.tags):
        print(f"{t:<20} {cal.a[j]:>7.3f} {cal.b[j]:>7.3f} {cal.pinned[j]:>7.4f} "
              f"{tagger.thresholds[j]:>7.4f}")
    print(f"wrote {out} (checkpoint {tagger.checkpoint_id}, parent {parent})")
    print(json.dumps({"checkpoint_id": tagger.checkpoint_id, "parent_id": parent}))
    return 0
