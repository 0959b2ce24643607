"""The traditional baseline: radial/azimuthal profile features + logistic regression.

What a beamline scientist would script without deep learning: integrate the
frame in q-ring bands around the beam centre (or the image centre when the
centre is unknown) and describe each band by its mean, spread, maximum,
azimuthal variation and masked fraction; add row and column profiles (for
horizontal grazing-incidence features), the sharpness of the radial profile
and a few whole-frame statistics (masked and saturated fractions, count
percentiles). A one-vs-rest logistic regression per tag on standardised
features then gives probabilities.

Features are computed from the *raw* frame (not the CNN input), once, when a
dataset is built (:mod:`bluesky_xsml.training.data` caches them next to the
CNN inputs). ``xsml evaluate --baseline`` fits the baseline on the training
split and scores it on the same test frames as the CNN.

Examples
--------
>>> import numpy as np
>>> from bluesky_xsml.training.baseline import profile_features, N_FEATURES
>>> frame = np.random.default_rng(0).poisson(5, (64, 80)).astype(np.int32)
>>> frame[:, 40] = -1                       # a Pilatus gap
>>> f = profile_features(frame)
>>> f.shape == (N_FEATURES,), bool(np.isfinite(f).all())
(True, True)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

__all__ = ["N_FEATURES", "profile_features", "ProfileBaseline"]

N_RADIAL = 24      # radial bands over r / max(H, W) in [0, R_MAX)
R_MAX = 0.75
N_CHI = 12         # azimuthal sectors per band
N_ROWCOL = 16      # row and column profile bins
_MAX_SIDE = 320    # larger frames are block-averaged first (speed)
N_GLOBAL = 10
N_FEATURES = 6 * N_RADIAL + 2 * N_ROWCOL + 6 + N_GLOBAL


def _valid_range(dtype: np.dtype) -> tuple[float, float]:
    """Valid counts: >= 0, finite, below the unsigned-integer maximum (masked pixels)."""
    if dtype.kind == "u":
        return 0.0, float(np.iinfo(dtype).max - 1)
    if dtype.kind == "i":
        return 0.0, float(np.iinfo(dtype).max)
    return 0.0, float(np.finfo(np.float64).max)


def _block_stats_py(x, k, lo, hi, sums, cnt):  # pragma: no cover - numba compiles it
    """One pass: k x k block sums/valid counts, max, valid pixels, pixels at the max."""
    H, W = x.shape
    vmax = -1.0
    n_valid = 0
    n_max = 0
    for i in range(H):
        bi = i // k
        for j in range(W):
            v = x[i, j]
            if (v >= lo) & (v <= hi):
                fv = float(v)
                bj = j // k
                sums[bi, bj] += fv
                cnt[bi, bj] += 1
                n_valid += 1
                if fv > vmax:
                    vmax = fv
                    n_max = 1
                elif fv == vmax:
                    n_max += 1
    return vmax, n_valid, n_max


_BLOCK_STATS = None


def _block_stats(x, k, lo, hi, sums, cnt):
    global _BLOCK_STATS
    if _BLOCK_STATS is None:
        import numba

        _BLOCK_STATS = numba.njit(nogil=True, cache=True)(_block_stats_py)
    return _BLOCK_STATS(x, k, x.dtype.type(lo) if x.dtype.kind in "iu" else lo,
                        x.dtype.type(hi) if x.dtype.kind in "iu" else hi, sums, cnt)


def profile_features(frame, beam_center=None) -> np.ndarray:
    """Radial/azimuthal profile features of one raw detector frame.

    Parameters
    ----------
    frame : array_like
        2-D frame in its detector dtype, with its sentinel values.
    beam_center : (x, y), optional
        Beam position in pixel coordinates (column, row); the image centre
        when not given.

    Returns
    -------
    numpy.ndarray
        ``(N_FEATURES,)`` float32.
    """
    frame = np.asarray(frame)
    if frame.ndim == 3 and frame.shape[0] == 1:
        frame = frame[0]
    if frame.dtype.kind == "b" or frame.dtype == np.float16:
        frame = frame.astype(np.float32)
    frame = np.ascontiguousarray(frame)
    H, W = frame.shape
    lo, hi = _valid_range(frame.dtype)
    k = max(1, math.ceil(max(H, W) / _MAX_SIDE))
    h, wd = -(-H // k), -(-W // k)
    sums = np.zeros((h, wd), np.float64)
    cnt = np.zeros((h, wd), np.int64)
    vmax, n_valid, n_max = _block_stats(frame, k, lo, hi, sums, cnt)
    vmax = max(vmax, 0.0)
    sat_frac = n_max / max(n_valid, 1) if (vmax >= 256 and n_max >= 4) else 0.0
    step = max(1, frame.size // 65536)  # percentiles from a strided sample (speed)
    sample = frame.ravel()[::step].astype(np.float64)
    vals = sample[(sample >= lo) & (sample <= hi)]
    if vals.size:
        pct = np.percentile(vals, [50, 90, 99])
        glob = [np.log1p(vals.mean()), *np.log1p(pct), np.log1p(vmax), (vals == 0).mean()]
    else:
        glob = [0.0] * 6
    glob += [1.0 - n_valid / frame.size, sat_frac, math.log(max(H, W)), H / W]
    # block area inside the frame (edge blocks may be partial)
    rows = np.minimum(np.arange(1, h + 1) * k, H) - np.arange(h) * k
    cols = np.minimum(np.arange(1, wd + 1) * k, W) - np.arange(wd) * k
    area = np.outer(rows, cols).astype(np.float64)
    mean = sums / np.maximum(cnt, 1)
    w = cnt / area

    cx, cy = ((W - 1) / 2, (H - 1) / 2) if beam_center is None else map(float, beam_center)
    cx, cy = (cx - (k - 1) / 2) / k, (cy - (k - 1) / 2) / k
    L = float(max(h, wd))
    lv = np.log1p(mean)
    yy, xx = np.mgrid[0:h, 0:wd]
    dx, dy = xx - cx, cy - yy
    r = np.hypot(dx, dy) / L
    chi = np.mod(np.arctan2(dy, dx), 2 * np.pi)
    rb = np.minimum((r / R_MAX * N_RADIAL).astype(np.int64), N_RADIAL)  # N_RADIAL: beyond
    cb = np.minimum((chi / (2 * np.pi) * N_CHI).astype(np.int64), N_CHI - 1)
    nb = N_RADIAL + 1
    wf, lvf, rbf = w.ravel(), lv.ravel(), rb.ravel()
    area = np.bincount(rbf, minlength=nb)[:N_RADIAL].astype(np.float64)
    wsum = np.bincount(rbf, wf, nb)[:N_RADIAL]
    s1 = np.bincount(rbf, wf * lvf, nb)[:N_RADIAL]
    s2 = np.bincount(rbf, wf * lvf * lvf, nb)[:N_RADIAL]
    rmean = s1 / np.maximum(wsum, 1e-9)
    rstd = np.sqrt(np.maximum(s2 / np.maximum(wsum, 1e-9) - rmean**2, 0.0))
    rmax = np.zeros(nb)
    np.maximum.at(rmax, rbf, np.where(wf > 0, lvf, 0.0))
    rmax = rmax[:N_RADIAL]
    masked = np.where(area > 0, 1.0 - wsum / np.maximum(area, 1e-9), 1.0)
    # azimuthal variation per band: spread of sector means
    cell = rbf * N_CHI + cb.ravel()
    cw = np.bincount(cell, wf, nb * N_CHI).reshape(nb, N_CHI)[:N_RADIAL]
    cs = np.bincount(cell, wf * lvf, nb * N_CHI).reshape(nb, N_CHI)[:N_RADIAL]
    has = cw > 0.5
    n_has = has.sum(1)
    cm = np.where(has, cs / np.maximum(cw, 1e-9), 0.0)
    mu = cm.sum(1) / np.maximum(n_has, 1)
    az_std = np.sqrt(np.maximum((has * (cm - mu[:, None]) ** 2).sum(1) / np.maximum(n_has, 1), 0))
    az_rng = np.where(has, cm, -np.inf).max(1) - np.where(has, cm, np.inf).min(1)
    az_std = np.where(n_has >= 2, az_std, 0.0)
    az_rng = np.where(n_has >= 2, az_rng, 0.0)
    # sharpness of the radial profile (rings) and of the row profile (horizon)
    filled = rmean[wsum > 0]  # bands that hold pixels (the profile ends at the frame edge)
    d2 = np.abs(np.diff(filled, 2)) if filled.size > 2 else np.zeros(1)
    row_w = w.sum(axis=1)
    row_m = (w * lv).sum(axis=1) / np.maximum(row_w, 1e-9)
    col_w = w.sum(axis=0)
    col_m = (w * lv).sum(axis=0) / np.maximum(col_w, 1e-9)

    def binned(p, wt):
        idx = np.minimum((np.arange(p.size) * N_ROWCOL) // max(p.size, 1), N_ROWCOL - 1)
        ws = np.bincount(idx, wt, N_ROWCOL)
        return np.bincount(idx, wt * p, N_ROWCOL) / np.maximum(ws, 1e-9)

    rows, cols = binned(row_m, row_w), binned(col_m, col_w)
    drow = np.abs(np.diff(row_m[row_w > 0])) if (row_w > 0).sum() > 1 else np.zeros(1)
    dcol = np.abs(np.diff(col_m[col_w > 0])) if (col_w > 0).sum() > 1 else np.zeros(1)
    sharp = [np.sort(d2)[-3:].sum(), d2.max(), drow.max(), np.sort(drow)[-3:].sum(),
             dcol.max(), np.abs(col_m - np.median(col_m)).max() if col_m.size else 0.0]
    feats = np.concatenate([rmean, rstd, rmax, masked, az_std, az_rng, rows, cols, sharp, glob])
    return np.nan_to_num(feats.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)


class ProfileBaseline:
    """Standardised features -> one logistic regression per tag.

    Parameters
    ----------
    C : float
        Inverse L2 regularisation strength of each logistic regression.
    max_iter : int

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 5)); y = np.stack([X[:, 0] > 0, X[:, 1] > 1], 1).astype(float)
    >>> y[:20, 1] = np.nan                  # unknown labels are skipped
    >>> probs = ProfileBaseline().fit(X, y).predict_proba(X)
    >>> probs.shape, bool(probs[X[:, 0] > 1, 0].mean() > 0.9)
    ((200, 2), True)
    """

    def __init__(self, *, C: float = 1.0, max_iter: int = 2000):
        self.C = C
        self.max_iter = max_iter
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None
        self.coef_: np.ndarray | None = None
        self.intercept_: np.ndarray | None = None

    def fit(self, X, y) -> ProfileBaseline:
        """Fit on features ``(N, F)`` and labels ``(N, T)`` (``NaN``: unknown)."""
        from sklearn.linear_model import LogisticRegression

        X = np.asarray(X, np.float64)
        y = np.asarray(y, np.float64)
        self.mean_ = X.mean(0)
        self.scale_ = X.std(0)
        self.scale_[self.scale_ < 1e-9] = 1.0
        Z = (X - self.mean_) / self.scale_
        T = y.shape[1]
        self.coef_ = np.zeros((T, X.shape[1]))
        self.intercept_ = np.zeros(T)
        for j in range(T):
            known = np.isfinite(y[:, j])
            yj = y[known, j] >= 0.5
            if yj.all() or not yj.any():  # one class only: a constant prior
                p = (yj.mean() if yj.size else 0.5) * 0.998 + 0.001
                self.intercept_[j] = math.log(p / (1 - p))
                continue
            clf = LogisticRegression(C=self.C, max_iter=self.max_iter)
            clf.fit(Z[known], yj)
            self.coef_[j] = clf.coef_[0]
            self.intercept_[j] = clf.intercept_[0]
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Per-tag probabilities ``(N, T)``."""
        if self.coef_ is None:
            raise RuntimeError("ProfileBaseline is not fitted; call fit() first")
        Z = (np.asarray(X, np.float64) - self.mean_) / self.scale_
        logits = Z @ self.coef_.T + self.intercept_
        return (1.0 / (1.0 + np.exp(-np.clip(logits, -50, 50)))).astype(np.float32)

    def save(self, path) -> Path:
        """Write the fitted parameters as JSON."""
        path = Path(path)
        path.write_text(json.dumps({k: getattr(self, k).tolist() for k in
                                    ("mean_", "scale_", "coef_", "intercept_")} | {"C": self.C}))
        return path
