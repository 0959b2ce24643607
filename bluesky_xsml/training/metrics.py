"""Multi-label ranking metrics: per-tag AP and ROC-AUC, mAP, threshold choice.

Everything works on ``(N, T)`` arrays of scores and labels in which a ``NaN``
label means *unknown*: that (frame, tag) pair is left out of that tag's metric.
A tag with no known positive (or no known negative) has no AP (or AUC); it is
reported as ``NaN`` and left out of the mean, and the number of tags that
entered the mean is reported beside it.

Average precision is the step-wise area under the precision-recall curve,
``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds, the same
definition as :func:`sklearn.metrics.average_precision_score` (tied scores are
one threshold).

Examples
--------
>>> import numpy as np
>>> from bluesky_xsml.training.metrics import average_precision, roc_auc
>>> y = np.array([1, 0, 1, 0, 0.])
>>> s = np.array([0.9, 0.8, 0.7, 0.2, 0.1])
>>> round(average_precision(y, s), 4)        # (1/2)*1 + (1/2)*(2/3)
0.8333
>>> roc_auc(y, s)                            # 5 of the 6 (pos, neg) pairs are ordered
0.8333333333333334
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "TagMetrics",
    "average_precision",
    "roc_auc",
    "precision_recall_curve",
    "best_f1_threshold",
    "evaluate_scores",
    "ECE_BINS",
    "reliability_bins",
    "expected_calibration_error",
    "calibration_errors",
]


def _clean(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Known (finite-label) pairs as float64 arrays; labels are 0/1."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in size: {y.shape} vs {s.shape}")
    known = np.isfinite(y)
    return (y[known] >= 0.5).astype(np.float64), s[known]


def precision_recall_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall at every distinct score threshold, highest first.

    Returns
    -------
    precision, recall, thresholds : numpy.ndarray
        ``precision[i]``/``recall[i]`` of the rule ``score >= thresholds[i]``;
        thresholds decrease. Empty arrays when no label is known.

    Examples
    --------
    >>> p, r, t = precision_recall_curve([1, 0, 1], [0.9, 0.5, 0.5])
    >>> p.tolist(), r.tolist(), t.tolist()
    ([1.0, 0.6666666666666666], [0.5, 1.0], [0.9, 0.5])
    """
    y, s = _clean(labels, scores)
    if y.size == 0:
        e = np.zeros(0)
        return e, e, e
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    n_pos = y.sum()
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / n_pos if n_pos > 0 else np.full(tp.shape, np.nan)
    return precision, recall, s[last]


def average_precision(labels, scores) -> float:
    """Average precision of one tag; ``NaN`` when it has no known positive."""
    y, _ = _clean(labels, scores)
    if y.sum() == 0:
        return float("nan")
    p, r, _ = precision_recall_curve(labels, scores)
    return float(np.sum(np.diff(np.r_[0.0, r]) * p))


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve (ties count one half); ``NaN`` without both classes."""
    y, s = _clean(labels, scores)
    n_pos = y.sum()
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Mann-Whitney U with mid-ranks for ties
    order = np.argsort(s, kind="mergesort")
    ss = s[order]
    ranks = np.empty(s.size, np.float64)
    idx = np.r_[0, np.flatnonzero(np.diff(ss)) + 1, ss.size]
    for a, b in itertools.pairwise(idx):
        ranks[order[a:b]] = 0.5 * (a + b - 1) + 1.0
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def best_f1_threshold(labels, scores, *, default: float = 0.5) -> tuple[float, float]:
    """Threshold that maximises F1 on these scores, and that F1.

    The threshold is placed halfway between the lowest accepted score and the
    next lower one, so it is not on a sample. Without known positives the
    ``default`` threshold and ``NaN`` are returned.

    Examples
    --------
    >>> thr, f1 = best_f1_threshold([0, 1, 1, 0], [0.1, 0.6, 0.8, 0.3])
    >>> round(thr, 3), f1
    (0.45, 1.0)
    """
    y, s = _clean(labels, scores)
    if y.sum() == 0:
        return float(default), float("nan")
    p, r, t = precision_recall_curve(y, s)
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)
    i = int(np.argmax(f1))
    below = t[i + 1] if i + 1 < t.size else t[i] - 1e-3
    thr = float(0.5 * (t[i] + below))
    return float(np.clip(thr, 1e-4, 1 - 1e-4)), float(f1[i])


@dataclass
class TagMetrics:
    """Per-tag metrics over one set of frames.

    Attributes
    ----------
    tags : list of str
    ap, auc, f1, threshold : numpy.ndarray
        Per tag; ``NaN`` where undefined. ``threshold`` is the max-F1 threshold.
    n_pos, n_known : numpy.ndarray
        Known positives and known labels per tag.
    """

    tags: list[str]
    ap: np.ndarray
    auc: np.ndarray
    f1: np.ndarray
    threshold: np.ndarray
    n_pos: np.ndarray
    n_known: np.ndarray
    extra: dict = field(default_factory=dict)

    @property
    def n_scored(self) -> int:
        """Tags with a defined AP (those entering :attr:`mean_ap`)."""
        return int(np.isfinite(self.ap).sum())

    @property
    def mean_ap(self) -> float:
        """Mean AP over the tags that have one."""
        return float(np.nanmean(self.ap)) if self.n_scored else float("nan")

    @property
    def mean_auc(self) -> float:
        ok = np.isfinite(self.auc)
        return float(self.auc[ok].mean()) if ok.any() else float("nan")

    def worst(self, k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` tags with the lowest AP."""
        order = [i for i in np.argsort(self.ap) if np.isfinite(self.ap[i])]
        return [(self.tags[i], float(self.ap[i])) for i in order[:k]]

    def to_dict(self) -> dict:
        """JSON-able: overall numbers and a per-tag table."""
        def f(v):
            return None if not np.isfinite(v) else round(float(v), 4)
        return {
            "mAP": f(self.mean_ap),
            "mean_roc_auc": f(self.mean_auc),
            "n_tags_scored": self.n_scored,
            "per_tag": {
                t: {"ap": f(self.ap[i]), "roc_auc": f(self.auc[i]), "f1": f(self.f1[i]),
                    "threshold": f(self.threshold[i]), "n_pos": int(self.n_pos[i]),
                    "n_known": int(self.n_known[i])}
                for i, t in enumerate(self.tags)
            },
            **self.extra,
        }

    def table(self) -> str:
        """A fixed-width text table, one row per tag."""
        lines = [f"{'tag':<20} {'AP':>7} {'ROC-AUC':>8} {'F1':>6} {'thr':>6} {'pos':>6} "
                 f"{'known':>6}"]
        for i, t in enumerate(self.tags):
            def g(v, w=7, p=4):
                return f"{v:>{w}.{p}f}" if np.isfinite(v) else f"{'-':>{w}}"
            lines.append(f"{t:<20} {g(self.ap[i])} {g(self.auc[i], 8)} {g(self.f1[i], 6, 3)} "
                         f"{g(self.threshold[i], 6, 3)} {int(self.n_pos[i]):>6} "
                         f"{int(self.n_known[i]):>6}")
        return "\n".join(lines)


def evaluate_scores(labels, scores, tags, *, thresholds_from=None) -> TagMetrics:
    """Per-tag AP, ROC-AUC and max-F1 thresholds.

    Parameters
    ----------
    labels : array_like, shape (N, T)
        1/0 labels, ``NaN`` for unknown.
    scores : array_like, shape (N, T)
        Probabilities (or any monotone score).
    tags : sequence of str
    thresholds_from : tuple of (labels, scores), optional
        Choose the thresholds (and F1) on this other split, e.g. validation,
        instead of on ``labels``/``scores``; F1 is then that of those
        thresholds applied to ``scores``.

    Examples
    --------
    >>> import numpy as np
    >>> y = np.array([[1, np.nan], [0, 1], [1, 0]])
    >>> s = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    >>> m = evaluate_scores(y, s, ["a", "b"])
    >>> m.ap.tolist(), m.n_known.tolist(), m.mean_ap
    ([1.0, 1.0], [3, 2], 1.0)
    """
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 2 or y.shape != s.shape or y.shape[1] != len(tags):
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be (N, {len(tags)})")
    T = len(tags)
    ap, auc, f1, thr = (np.full(T, np.nan) for _ in range(4))
    n_pos = np.zeros(T, int)
    n_known = np.zeros(T, int)
    for j in range(T):
        known = np.isfinite(y[:, j])
        n_known[j] = known.sum()
        n_pos[j] = int((y[known, j] >= 0.5).sum())
        ap[j] = average_precision(y[:, j], s[:, j])
        auc[j] = roc_auc(y[:, j], s[:, j])
        if thresholds_from is None:
            thr[j], f1[j] = best_f1_threshold(y[:, j], s[:, j])
        else:
            vy, vs = thresholds_from
            thr[j], _ = best_f1_threshold(np.asarray(vy)[:, j], np.asarray(vs)[:, j])
            f1[j] = f1_at(y[:, j], s[:, j], thr[j])
    return TagMetrics(list(tags), ap, auc, f1, thr, n_pos, n_known)


def f1_at(labels, scores, threshold: float) -> float:
    """F1 of the rule ``score >= threshold``; ``NaN`` without known positives."""
    y, s = _clean(labels, scores)
    if y.sum() == 0:
        return float("nan")
    pred = s >= threshold
    tp = float((pred & (y == 1)).sum())
    fp = float((pred & (y == 0)).sum())
    fn = float((~pred & (y == 1)).sum())
    return 2 * tp / max(2 * tp + fp + fn, 1e-12)


#: Equal-width probability bins of the expected calibration error and the reliability diagram.
ECE_BINS = 15


def reliability_bins(labels, scores, n_bins: int = ECE_BINS):
    """Per equal-width probability bin: count, mean probability, fraction positive.

    Unknown (``NaN``) labels are left out, as in the masked training loss. Bin
    ``k`` holds ``k/n <= p < (k+1)/n``; ``p = 1`` falls in the last bin.

    Returns
    -------
    count, mean_prob, frac_pos : numpy.ndarray, shape (n_bins,)
        ``mean_prob`` and ``frac_pos`` are ``NaN`` in empty bins.

    Examples
    --------
    >>> c, p, f = reliability_bins([1, 0, 1, 1], [0.9, 0.9, 0.1, 1.0], n_bins=2)
    >>> c.tolist(), p.round(3).tolist(), f.round(3).tolist()
    ([1, 3], [0.1, 0.933], [1.0, 0.667])
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y, s = _clean(labels, scores)
    idx = np.clip((s * n_bins).astype(np.int64), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.bincount(idx, weights=s, minlength=n_bins) / count
        frac_pos = np.bincount(idx, weights=y, minlength=n_bins) / count
    return count, mean_prob, frac_pos


def expected_calibration_error(labels, scores, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error: ``sum_k (n_k / n) |frac_pos_k - mean_prob_k|``.

    Over ``n_bins`` equal-width bins of the predicted probability, weighted by
    the number of known labels in each; unknown (``NaN``) labels are left out.
    ``NaN`` when no label is known.

    Examples
    --------
    >>> round(expected_calibration_error([1, 0, 0, 0, 0], [0.2] * 5), 6)  # 1 in 5 at 0.2
    0.0
    >>> round(expected_calibration_error([1, 0, 1, 0], [0.9] * 4), 6)     # 0.9 said, 0.5 seen
    0.4
    """
    count, mean_prob, frac_pos = reliability_bins(labels, scores, n_bins)
    n = count.sum()
    if n == 0:
        return float("nan")
    full = count > 0
    return float(np.sum(count[full] * np.abs(frac_pos[full] - mean_prob[full])) / n)


def calibration_errors(labels, scores, n_bins: int = ECE_BINS) -> tuple[np.ndarray, float]:
    """Per-tag ECE ``(T,)`` and the ECE of all known (frame, tag) pairs pooled.

    ``labels`` and ``scores`` are ``(N, T)``; a tag with no known label has ``NaN``.
    """
    y = np.asarray(labels, np.float64)
    s = np.asarray(scores, np.float64)
    if y.ndim != 2 or y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be the same (N, T)")
    per_tag = np.array([expected_calibration_error(y[:, j], s[:, j], n_bins)
                        for j in range(y.shape[1])])
    return per_tag, expected_calibration_error(y, s, n_bins)
