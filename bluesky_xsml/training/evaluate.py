"""``xsml evaluate``: per-tag AP and ROC-AUC, mAP, thresholds, PR curves.

Scores a checkpoint (its deployed, TorchScript form) on a data source (a
``synth:...`` or ``renderb:...`` spec or an ``xsml synth`` zarr store; see
:mod:`bluesky_xsml.training.data`) and prints a per-tag table. Suggested
per-tag thresholds maximise F1 on a validation split: ``--threshold-data``
when given, otherwise a random half of the frames (the F1 column is then
measured on the other half). With ``--baseline`` the traditional
radial/azimuthal-profile baseline (:mod:`bluesky_xsml.training.baseline`) is
fitted on the model's training data and scored on the same frames.

The last line of the output is always ``mAP <value> over <n> tags`` (the
model's mAP over the tags that have at least one positive).

Examples
--------
>>> import argparse
>>> from bluesky_xsml.training import evaluate
>>> p = argparse.ArgumentParser(); evaluate.add_arguments(p)
>>> p.parse_args(["--data", "synth:n=10"]).threshold_split
0.5
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np

from ..inference.tagger import Tagger
from ..polar import input_centers
from .baseline import ProfileBaseline
from .data import describe, load_arrays
from .metrics import (
    ECE_BINS,
    average_precision,
    calibration_errors,
    evaluate_scores,
    f1_at,
    precision_recall_curve,
    reliability_bins,
)

__all__ = ["add_arguments", "arrays_centers", "calibration_summary", "last_line", "main",
           "plot_pr_curves", "plot_reliability", "predict_arrays", "size_groups",
           "table_with_ece"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``xsml evaluate``."""
    parser.add_argument("--model", default=None,
                        help="checkpoint (or a training output directory holding model.pt); "
                             "default: the packaged model")
    parser.add_argument("--data", required=True,
                        help="test frames: a 'synth:...' or 'renderb:...' spec or an 'xsml synth' "
                             "zarr store")
    parser.add_argument("--out", default=None,
                        help="directory for metrics.json, the per-tag table and pr_curves.png")
    parser.add_argument("--threshold-data", default=None,
                        help="validation frames on which thresholds are chosen (default: a "
                             "random half of --data)")
    parser.add_argument("--threshold-split", type=float, default=0.5,
                        help="fraction of --data used to choose thresholds when no "
                             "--threshold-data is given (default 0.5)")
    parser.add_argument("--baseline", action="store_true",
                        help="also fit and score the traditional profile baseline")
    parser.add_argument("--baseline-train", default=None,
                        help="baseline training frames (default: the model's training data)")
    parser.add_argument("--by-detector", action="store_true", help="mAP per detector too")
    parser.add_argument("--by-size", action="store_true",
                        help="mAP and per-tag AP per longest frame side too")
    parser.add_argument("--summary", default=None,
                        help="merge a compact summary into this JSON file ...")
    parser.add_argument("--summary-key", default="test", help="... under this key")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="frames per inference batch (default 64)")
    parser.add_argument("--cache-dir", default=None,
                        help="where preprocessed inputs are cached (default $XSML_CACHE, else "
                             "$XDG_CACHE_HOME/bluesky-xsml or ~/.cache/bluesky-xsml)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="processes rendering frames of synth: and renderb: specs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the threshold split")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    parser.add_argument("--no-beam-center", action="store_true",
                        help="do not give a model with a polar head the frames' beam centres "
                        "(it then tags as its CNN alone)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="inference precision (auto: bf16 on CPUs with native bf16)")


def last_line(mean_ap: float, n_tags: int) -> str:
    """The closing line of ``xsml evaluate``.

    >>> last_line(0.95123, 23)
    'mAP 0.9512 over 23 tags'
    """
    return f"mAP {mean_ap:.4f} over {n_tags} tags"


def plot_pr_curves(path, labels, curves: dict, tags) -> Path:
    """One precision-recall panel per tag; ``curves`` maps a name to ``(N, T)`` scores."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(tags)
    cols = 5
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.6 * rows), squeeze=False)
    for j, tag in enumerate(tags):
        ax = axes[j // cols][j % cols]
        for (name, scores), style in zip(curves.items(), ("-", "--", ":"), strict=False):
            p, r, _ = precision_recall_curve(labels[:, j], scores[:, j])
            if p.size:
                ap = average_precision(labels[:, j], scores[:, j])
                ax.step(np.r_[0, r], np.r_[p[0], p], where="pre", ls=style,
                        label=f"{name} {ap:.3f}")
        ax.set_title(tag, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower left")
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.supxlabel("recall")
    fig.supylabel("precision")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def calibration_summary(labels, scores, tags, n_bins: int = ECE_BINS) -> dict:
    """Per-tag and pooled expected calibration error, and the pooled reliability bins.

    Unknown (``NaN``) labels are left out, as in the masked training loss.
    ``ece_pooled`` is the ECE of all known (frame, tag) pairs together;
    ``mean_ece`` the mean of the per-tag values.
    """
    per_tag, pooled = calibration_errors(labels, scores, n_bins)
    count, mean_prob, frac_pos = reliability_bins(labels, scores, n_bins)

    def r(v):
        return None if not np.isfinite(v) else round(float(v), 4)

    return {"ece_bins": n_bins, "ece_pooled": r(pooled),
            "mean_ece": r(np.nanmean(per_tag)) if np.isfinite(per_tag).any() else None,
            "ece": {t: r(v) for t, v in zip(tags, per_tag, strict=True)},
            "reliability_pooled": {"count": [int(c) for c in count],
                                   "mean_prob": [r(v) for v in mean_prob],
                                   "frac_pos": [r(v) for v in frac_pos]}}


def table_with_ece(table: str, ece: dict) -> str:
    """``TagMetrics.table()`` with an ``ECE`` column (rows are matched by tag name).

    >>> print(table_with_ece(chr(10).join(["tag  AP", "a  0.9"]), {"a": 0.0123}))
    tag  AP     ECE
    a  0.9  0.0123
    """
    lines = table.split("\n")
    out = [lines[0] + f" {'ECE':>7}"]
    for line in lines[1:]:
        v = ece.get(line.split(" ", 1)[0])
        out.append(line + (f" {v:>7.4f}" if v is not None else f" {'-':>7}"))
    return "\n".join(out)


def plot_reliability(path, labels, curves: dict, tags, *, n_bins: int = ECE_BINS,
                     title: str = "") -> Path:
    """Reliability diagram: all tags pooled (large) and one small panel per tag.

    ``curves`` maps a name to ``(N, T)`` probabilities (one line each, e.g. a
    model before and after calibration). Each panel plots the fraction of
    positives against the mean predicted probability per equal-width bin
    (marker area ~ frames in the bin), with the diagonal of perfect
    calibration and each curve's ECE.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    labels = np.asarray(labels)
    errors = {name: calibration_errors(labels, s, n_bins) for name, s in curves.items()}
    n = len(tags)
    cols = 6
    rows = (n + cols - 1) // cols
    fig = plt.figure(figsize=(2.3 * cols + 5.0, max(2.3 * rows, 5.0)))
    grid = fig.add_gridspec(rows, cols + 3)
    big = fig.add_subplot(grid[:, :3])

    def panel(ax, column, name, small):
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--")
        eces = []
        for k, (label, s) in enumerate(curves.items()):
            s = np.asarray(s)
            y_k, s_k = (labels, s) if column is None else (labels[:, column], s[:, column])
            count, mean_prob, frac_pos = reliability_bins(y_k, s_k, n_bins)
            ok = count > 0
            ece = errors[label][1] if column is None else errors[label][0][column]
            text = "-" if not np.isfinite(ece) else f"{ece:.3f}"
            eces.append(text)
            if ok.any():
                size = 4 + 120 * count[ok] / count[ok].max()
                ax.plot(mean_prob[ok], frac_pos[ok], "-", color=f"C{k}", lw=1,
                        label=f"{label} (ECE {text})")
                ax.scatter(mean_prob[ok], frac_pos[ok], s=size / (3 if small else 1),
                           color=f"C{k}", zorder=3)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_title(f"{name}\nECE {' / '.join(eces)}", fontsize=8 if small else 11)
        ax.tick_params(labelsize=6 if small else 9)

    panel(big, None, "all tags pooled", False)
    big.set_xlabel("mean predicted probability")
    big.set_ylabel("fraction positive")
    if big.get_legend_handles_labels()[0]:
        big.legend(loc="upper left", fontsize=9)
    for j, tag in enumerate(tags):
        panel(fig.add_subplot(grid[j // cols, 3 + j % cols]), j, tag, True)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def arrays_centers(tagger, arrays, use: bool = True):
    """Beam centres on the input for a tagger that reads them, from the data; else None."""
    if not (use and tagger.uses_beam_center and arrays.centers is not None):
        return None
    return input_centers(arrays.shapes, arrays.centers, tagger.preprocess_config.size)


def predict_arrays(tagger, inputs, batch_size: int, progress: bool = False,
                   centers=None) -> np.ndarray:
    """Probabilities ``(N, T)`` of preprocessed ``inputs``, in batches (``centers``: per row)."""
    from tqdm.auto import tqdm

    out = []
    with tqdm(total=len(inputs), desc="xsml evaluate: tagging", unit="frame",
              disable=not progress, mininterval=1.0) as bar:
        for a in range(0, len(inputs), batch_size):
            x = np.asarray(inputs[a:a + batch_size], np.float32)
            if centers is None:
                out.append(tagger.predict_inputs(x))
            else:
                out.append(tagger.predict_inputs(x, centers[a:a + batch_size]))
            bar.update(len(out[-1]))
    return np.concatenate(out) if out else np.zeros((0, len(tagger.tags)), np.float32)


# their names before they were public (experiments/render_b_breakdown.py used them)
_centers, _predict = arrays_centers, predict_arrays


def size_groups(shapes, max_groups: int = 8):
    """Frames grouped by their longest side: ``[(label, mask), ...]``, smallest first.

    Each distinct longest side is a group when there are at most ``max_groups`` of
    them (the ``sizes=`` of a synthetic spec); otherwise four ranges of equal count.

    >>> [(label, mask.tolist()) for label, mask in size_groups([[64, 32], [16, 32], [64, 64]])]
    [('32', [False, True, False]), ('64', [True, False, True])]
    >>> [label for label, _ in size_groups([[s, 50] for s in range(100, 1000, 100)])]
    ['100-299', '300-499', '500-699', '700-900']
    """
    side = np.asarray(shapes, dtype=np.int64).reshape(len(shapes), -1).max(axis=1)
    values = np.unique(side)
    if len(values) <= max_groups:
        return [(str(int(v)), side == v) for v in values]
    edges = np.unique(np.quantile(side, [0, 0.25, 0.5, 0.75, 1.0]).astype(np.int64))
    groups = []
    for i, (lo, hi) in enumerate(itertools.pairwise(edges)):
        last = i == len(edges) - 2
        sel = (side >= lo) & ((side <= hi) if last else (side < hi))
        groups.append((f"{lo}-{hi}" if last else f"{lo}-{hi - 1}", sel))
    return groups


def main(args: argparse.Namespace) -> int:
    """Run ``xsml evaluate``; returns the process exit code."""
    model_path = args.model
    if model_path is not None and Path(model_path).is_dir():
        model_path = str(Path(model_path) / "model.pt")
    tagger = Tagger.load(model_path, precision=args.precision)
    tags = list(tagger.tags)
    pcfg = tagger.preprocess_config
    progress = not args.no_progress
    use_centers = not args.no_beam_center
    test = load_arrays(args.data, config=pcfg, cache_dir=args.cache_dir, workers=args.workers,
                       progress=progress)
    t0 = time.perf_counter()
    scores = predict_arrays(tagger, test.inputs, args.batch_size, progress,
                            arrays_centers(tagger, test, use_centers))
    infer_s = time.perf_counter() - t0
    y = test.labels

    # thresholds: max F1 on a validation split, F1 measured on the rest
    if args.threshold_data:
        val = load_arrays(args.threshold_data, config=pcfg, cache_dir=args.cache_dir,
                          workers=args.workers, progress=progress)
        vy, vs = val.labels, predict_arrays(tagger, val.inputs, args.batch_size,
                                            centers=arrays_centers(tagger, val, use_centers))
        f1_rows = np.arange(len(y))
        thr_source = args.threshold_data
    else:
        perm = np.random.default_rng(args.seed).permutation(len(y))
        k = int(round(args.threshold_split * len(y)))
        vy, vs = y[perm[:k]], scores[perm[:k]]
        f1_rows = perm[k:]
        thr_source = f"random {args.threshold_split:.0%} of --data (F1 on the other frames)"
    m = evaluate_scores(y, scores, tags)
    mt = evaluate_scores(y[f1_rows], scores[f1_rows], tags, thresholds_from=(vy, vs))
    m.threshold, m.f1 = mt.threshold, mt.f1

    ckpt_f1 = np.array([f1_at(y[f1_rows, j], scores[f1_rows, j], tagger.thresholds[j])
                        for j in range(len(tags))])
    calib = calibration_summary(y, scores, tags)
    calib["calibrated"] = tagger.calibration is not None
    reliability_curves = {"model": scores}
    if tagger.calibration is not None:
        # the parent's probabilities are the map undone (exact up to float32 rounding)
        raw_scores = tagger.calibration.invert(scores)
        before = calibration_summary(y, raw_scores, tags)
        calib["uncalibrated"] = {k: before[k] for k in ("ece_pooled", "mean_ece", "ece")}
        reliability_curves = {"uncalibrated": raw_scores, "calibrated": scores}
    table = table_with_ece(m.table(), calib["ece"])

    print(f"model {tagger.checkpoint_id} ({model_path or 'packaged default'}) on {test.source}: "
          f"{len(test)} frames")
    print(f"thresholds chosen on: {thr_source}")
    print(f"precision {tagger.precision}; beam centres: " + (
        ("given to the polar head" if arrays_centers(tagger, test, use_centers) is not None
         else "not given (the polar head is unused)") if tagger.uses_beam_center
        else "not read by this model"))
    print(table)
    state = ("uncalibrated" if tagger.calibration is None
             else f"calibrated on {tagger.calibration.info.get('fitted_on')}")
    print(f"calibration ({state}): "
          f"ECE {calib['ece_pooled']} (all tags pooled), mean per-tag ECE {calib['mean_ece']} "
          f"({calib['ece_bins']} equal-width bins; unknown labels left out)")
    if "uncalibrated" in calib:
        print(f"  without the calibration: ECE {calib['uncalibrated']['ece_pooled']} (pooled), "
              f"mean per-tag ECE {calib['uncalibrated']['mean_ece']}")
    print(f"mean ROC-AUC {m.mean_auc:.4f}; F1 at the suggested thresholds (mean) "
          f"{np.nanmean(m.f1):.4f}, at the checkpoint's thresholds {np.nanmean(ckpt_f1):.4f}")
    print(f"worst tags: {', '.join(f'{t} {a:.4f}' for t, a in m.worst(5))}")
    print(f"inference: {len(test) / max(infer_s, 1e-9):.0f} frames/s (network only, "
          f"{tagger.precision}, preprocessed inputs)")
    result = m.to_dict()
    result.update({"model": str(model_path or "packaged default"),
                   "checkpoint_id": tagger.checkpoint_id, "data": test.source,
                   "n_frames": len(test), "thresholds_from": thr_source,
                   "f1_at_checkpoint_thresholds": [None if not np.isfinite(v) else
                                                   round(float(v), 4) for v in ckpt_f1],
                   "data_summary": describe(test), "calibration": calib})

    if args.by_detector:
        per = {}
        print("per detector (shape): mAP over tags with positives")
        for det in np.unique(test.detectors):
            sel = test.detectors == det
            md = evaluate_scores(y[sel], scores[sel], tags)
            shape = "x".join(str(v) for v in test.shapes[sel][0])
            per[str(det)] = {"n": int(sel.sum()), "shape_example": shape,
                             "mAP": round(md.mean_ap, 4), "n_tags": md.n_scored,
                             "worst": md.worst(3)}
            print(f"  {det:<16} {shape:>10} n={int(sel.sum()):<5} mAP {md.mean_ap:.4f} over "
                  f"{md.n_scored} tags; worst {', '.join(f'{t} {a:.3f}' for t, a in md.worst(2))}")
        result["per_detector"] = per

    if args.by_size:
        per = {}
        print("per longest frame side (pixels): mAP over tags with positives")
        for label, sel in size_groups(test.shapes):
            ms = evaluate_scores(y[sel], scores[sel], tags)
            per[label] = {"n": int(sel.sum()), "mAP": round(ms.mean_ap, 4),
                          "ap": {t: (None if not np.isfinite(a) else round(float(a), 4))
                                 for t, a in zip(tags, ms.ap, strict=True)}}
            print(f"  {label:>10} n={int(sel.sum()):<5} mAP {ms.mean_ap:.4f}; worst "
                  f"{', '.join(f'{t} {a:.3f}' for t, a in ms.worst(3))}")
        result["per_size"] = per

    curves = {"CNN": scores}
    if args.baseline:
        src = args.baseline_train or tagger.metadata.get("train_data")
        if not src:
            raise SystemExit("--baseline needs --baseline-train (the checkpoint does not name "
                             "its training data)")
        bt = load_arrays(src, config=pcfg, cache_dir=args.cache_dir, workers=args.workers,
                         progress=progress)
        t1 = time.perf_counter()
        base = ProfileBaseline().fit(bt.features, bt.labels)
        bscores = base.predict_proba(test.features)
        bm = evaluate_scores(y, bscores, tags)
        curves["baseline"] = bscores
        print(f"traditional baseline (profile features + logistic regression, fitted on "
              f"{len(bt)} frames of {bt.source} in {time.perf_counter() - t1:.0f} s)")
        print(f"{'tag':<20} {'CNN AP':>8} {'base AP':>8}")
        for j, t in enumerate(tags):
            print(f"{t:<20} {m.ap[j]:>8.4f} {bm.ap[j]:>8.4f}")
        print(f"{'mAP':<20} {m.mean_ap:>8.4f} {bm.mean_ap:>8.4f}")
        result["baseline"] = {"train_data": bt.source, "n_train": len(bt), **bm.to_dict()}

    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=1))
        (out / "per_tag.txt").write_text(table + "\n")
        png = plot_pr_curves(out / "pr_curves.png", y, curves, tags)
        rel = plot_reliability(out / "reliability.png", y, reliability_curves, tags, title=(
            f"{tagger.checkpoint_id} on {test.source} ({len(test)} frames, "
            f"{'calibrated' if calib['calibrated'] else 'uncalibrated'})"))
        print(f"wrote {out / 'metrics.json'}, {out / 'per_tag.txt'}, {png} and {rel}")
    if args.summary:
        path = Path(args.summary)
        summary = json.loads(path.read_text()) if path.exists() else {}
        entry = {"data": test.source, "n_frames": len(test), "mAP": round(m.mean_ap, 4),
                 "n_tags": m.n_scored, "mean_roc_auc": round(m.mean_auc, 4),
                 "worst": [[t, round(a, 4)] for t, a in m.worst(3)],
                 "precision": tagger.precision,
                 "beam_centers": arrays_centers(tagger, test, use_centers) is not None,
                 "calibrated": calib["calibrated"], "ece_pooled": calib["ece_pooled"],
                 "mean_ece": calib["mean_ece"], "ece": calib["ece"],
                 "ap": {t: (None if not np.isfinite(a) else round(float(a), 4))
                        for t, a in zip(tags, m.ap, strict=True)}}
        if "baseline" in result:
            entry["baseline_mAP"] = result["baseline"]["mAP"]
            entry["baseline_ap"] = {t: v["ap"] for t, v in result["baseline"]["per_tag"].items()}
        if "per_size" in result:
            entry["per_size"] = result["per_size"]
        if "per_detector" in result:
            entry["per_detector"] = {k: {"mAP": v["mAP"], "n": v["n"], "shape": v["shape_example"]}
                                     for k, v in result["per_detector"].items()}
        summary["checkpoint_id"] = tagger.checkpoint_id
        summary["training"] = {k: tagger.metadata[k] for k in (
            "train_data", "val_data", "n_train", "epochs", "val_mAP", "train_seconds")
            if k in tagger.metadata}
        summary["thresholds"] = {t: round(float(v), 4)
                                 for t, v in zip(tags, tagger.thresholds, strict=True)}
        summary[args.summary_key] = entry
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=1) + "\n")
    print(last_line(m.mean_ap, m.n_scored))
    return 0
