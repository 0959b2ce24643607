"""Novelty scores and compact embeddings from the tagger's pooled features.

A tagger always answers with some of its tags, even for a frame unlike any it
was trained on (a phase no tag describes, a misaligned beam, a detector
fault). :class:`NoveltyModel` measures how far a frame's pooled features (the
input of the network's linear head, :meth:`bluesky_xsml.model.TaggerNet.features`)
lie from the features of in-distribution frames, and gives every frame a
compact embedding for "find frames like this one".

Fitted once on in-distribution frames (``xsml novelty-fit``), it holds:

* a ``bank`` of reference frames: the L2-normalised features of up to
  :data:`BANK_SIZE` fit frames. The score (``kind="knn"``) is the cosine
  distance to the nearest of them (Sun et al. 2022, "Out-of-distribution
  detection with deep nearest neighbors") plus :data:`NORM_WEIGHT` times how
  much lower than usual the feature norm is (unfamiliar content activates the
  features less; a higher norm takes nothing off), both standardised on
  held-out in-distribution frames (``calibration``), so
  0 is a typical frame and the unit is one in-distribution standard deviation;
* ``mean`` and a shrunk pooled ``precision`` matrix of the features, for the
  version 1 score (``kind="mahalanobis"``, :meth:`NoveltyModel.mahalanobis`),
  the distance to one Gaussian of all training frames. Training frames form
  separate groups (empty frames, ring patterns, grazing-incidence frames...);
  a frame between the groups is near their common mean and scores low, which
  is why it is no longer the default;
* the top principal directions of the centred features. The embedding joins
  the (unit) projection onto the first of them, weighted by
  :data:`PCA_WEIGHT`, and the (unit) centred tag probabilities ``p - 0.5``,
  so that neighbours look alike *and* carry the same tags; it is
  L2-normalised and stored as float16, ``embedding_dim`` values in all
  (``embedding_dim - T`` principal directions for ``T`` tags, at least 8).
  ``docs/novelty.md`` compares it with either part alone;
* ``threshold``: the score above which a frame is ``novel``, the
  ``1 - fpr`` quantile of the scores of held-out in-distribution frames.

Only numpy is needed here (no torch): the tagger hands in features.

Examples
--------
Two groups of training frames and a new kind of frame halfway between them:

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> def frames(n, a):  # non-negative features; pattern A with weight a, B with 1 - a
...     x = np.abs(rng.normal(0.2, 0.1, size=(n, 16)))
...     x[:, :8] += a
...     x[:, 8:] += 1 - a
...     return x
>>> train = np.vstack([frames(300, 1), frames(300, 0)])
>>> val = np.vstack([frames(150, 1), frames(150, 0)])
>>> new = frames(20, 0.5)
>>> model = NoveltyModel.fit(train, val, embedding_dim=8, fpr=0.01)
>>> bool(model.is_novel(model.score(new)).all())
True
>>> old = NoveltyModel.fit(train, val, embedding_dim=8, fpr=0.01, score="mahalanobis")
>>> bool(old.is_novel(old.score(new)).any())  # near the mean of all training frames
False
>>> model.embed(train[:3]).shape, model.embed(train[:3]).dtype
((3, 8), dtype('float16'))
>>> model.embed(train[:3], probs=np.full((3, 2), 0.9)).shape  # 8 directions (the least) + 2
(3, 10)
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BANK_SIZE", "KNN_K", "NORM_WEIGHT", "SCORES", "FrameAnalysis", "NoveltyModel",
           "auroc", "decode_embedding", "encode_embedding", "energy_novelty", "sidecar_path"]

#: Scores a :class:`NoveltyModel` can be fitted to give (:attr:`NoveltyModel.kind`).
SCORES = ("knn", "mahalanobis")

#: Sidecar/checkpoint format: 1 had the Mahalanobis score only; 2 adds ``kind``, ``bank``,
#: ``k`` and ``calibration``.
_VERSION = 2

#: Reference frames a ``knn`` model keeps (a random subsample of the fit frames).
BANK_SIZE = 4096
#: Which nearest reference frame the ``knn`` score measures the distance to (chosen on the
#: development family of ``experiments/novelty_layers.py``, see docs/novelty.md).
KNN_K = 1
#: Weight of the (standardised) low-feature-norm term against the (standardised) kNN
#: distance in the ``knn`` score (chosen the same way).
NORM_WEIGHT = 2.0

#: Weight of the feature part of an embedding against its probability part.
PCA_WEIGHT = 0.5
#: Fewest principal directions an embedding keeps beside the probabilities.
MIN_PCA_DIMS = 8


def sidecar_path(checkpoint: str | Path) -> Path:
    """Where the novelty statistics of ``checkpoint`` live when not inside it.

    >>> sidecar_path("models/default.pt").name
    'default.novelty.npz'
    """
    p = Path(checkpoint)
    return p.with_name(p.stem + ".novelty.npz")


@dataclass
class FrameAnalysis:
    """What :meth:`bluesky_xsml.Tagger.analyse` returns for ``N`` frames.

    Attributes
    ----------
    probs : numpy.ndarray
        ``(N, T)`` float32 tag probabilities (as :meth:`~bluesky_xsml.Tagger.predict`).
    novelty : numpy.ndarray
        ``(N,)`` float32 novelty scores; NaN when the tagger has no fitted
        novelty statistics.
    novel : numpy.ndarray
        ``(N,)`` bool, ``novelty > threshold`` (False where the score is NaN).
    embedding : numpy.ndarray or None
        ``(N, D)`` float16 L2-normalised embeddings; ``None`` without statistics.
    features : numpy.ndarray or None
        ``(N, F)`` float32 pooled features (kept only when asked for).
    """

    probs: np.ndarray
    novelty: np.ndarray
    novel: np.ndarray
    embedding: np.ndarray | None = None
    features: np.ndarray | None = None


def energy_novelty(probs: np.ndarray) -> np.ndarray:
    """Negative joint energy of multi-label sigmoid outputs (higher: more novel).

    The joint energy of Wang et al. (2021) is ``sum_j log(1 + exp(logit_j))``,
    which is ``-sum_j log(1 - p_j)``; in-distribution frames with confident
    tags have a high energy. Compared with the Mahalanobis score in
    docs/novelty.md; it needs no fitted statistics.
    """
    p = np.clip(np.asarray(probs, np.float64), 0.0, 1.0 - 1e-7)
    return (np.log1p(-p).sum(axis=1)).astype(np.float32)  # = -energy


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of a score separating ``positives`` (higher) from ``negatives``.

    Ties count one half. NaN when either side is empty.

    >>> auroc(np.array([0., 1.]), np.array([2., 3.]))
    1.0
    >>> auroc(np.array([1., 1.]), np.array([1.]))
    0.5
    """
    neg = np.asarray(negatives, np.float64).ravel()
    pos = np.asarray(positives, np.float64).ravel()
    if not len(neg) or not len(pos):
        return math.nan
    allv = np.concatenate([neg, pos])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv), np.float64)
    sorted_v = allv[order]
    # average ranks for ties
    i = 0
    while i < len(sorted_v):
        j = i
        while j + 1 < len(sorted_v) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    r_pos = ranks[len(neg):].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, np.float32))


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class NoveltyModel:
    """Feature statistics of in-distribution frames: novelty scores and embeddings.

    Build with :meth:`fit`; see the module docstring.

    Parameters
    ----------
    mean : (F,) array
    precision : (F, F) array
        Inverse of the shrunk pooled covariance of the features.
    components : (D, F) array
        Principal directions of the centred features (rows, unit length).
    threshold : float
        Scores above it are ``novel``.
    fpr : float
        The in-distribution false-positive rate the threshold was set for.
    info : dict
        Provenance (data, frame counts, checkpoint id the features came from).
    kind : {"knn", "mahalanobis"}
        What :meth:`score` computes (see :meth:`fit`).
    bank : (M, F) array or None
        L2-normalised features of ``M`` reference frames (``kind="knn"`` only),
        stored as float16.
    k : int
        The ``knn`` distance is the cosine distance to the ``k``-th nearest row of ``bank``.
    calibration : (5,) array or None
        ``knn`` only: median and standard deviation of the kNN distance, median
        and standard deviation of the negative log feature norm (on the frames
        the threshold was set on), and the weight of the norm term.
    """

    mean: np.ndarray
    precision: np.ndarray
    components: np.ndarray
    threshold: float
    fpr: float = 0.01
    info: dict = field(default_factory=dict)
    kind: str = "mahalanobis"
    bank: np.ndarray | None = None
    k: int = KNN_K
    calibration: np.ndarray | None = None

    def __post_init__(self):
        self.mean = _f32(self.mean).ravel()
        self.precision = _f32(self.precision)
        self.components = _f32(self.components)
        f = self.mean.shape[0]
        if self.precision.shape != (f, f) or self.components.ndim != 2 or \
                self.components.shape[1] != f:
            raise ValueError(f"novelty statistics do not fit together: mean {self.mean.shape}, "
                             f"precision {self.precision.shape}, components "
                             f"{self.components.shape}")
        self.kind = str(self.kind)
        if self.kind not in SCORES:
            raise ValueError(f"unknown novelty score {self.kind!r}; known: {', '.join(SCORES)}")
        self.k = int(self.k)
        if self.kind == "knn":
            if self.bank is None:
                raise ValueError("a knn novelty model needs a reference bank")
            self.bank = np.ascontiguousarray(np.asarray(self.bank, np.float16))
            if self.bank.ndim != 2 or self.bank.shape[1] != f or \
                    not 1 <= self.k <= self.bank.shape[0]:
                raise ValueError(f"reference bank {self.bank.shape} does not fit {f} features "
                                 f"and k={self.k}")
            # scoring reads a float32 copy (float16 products are slow in numpy)
            self._bank32 = self.bank.astype(np.float32)
            cal = np.zeros(5) if self.calibration is None else self.calibration
            self.calibration = np.asarray(cal, np.float64).ravel()
            if self.calibration.shape != (5,) or not np.isfinite(self.calibration).all():
                raise ValueError(f"knn calibration must be 5 finite numbers, got "
                                 f"{self.calibration!r}")
        else:
            self.bank = None
            self.calibration = None
        self.threshold = float(self.threshold)
        self.fpr = float(self.fpr)

    # ---------------------------------------------------------------- fitting
    @classmethod
    def fit(cls, features: np.ndarray, val_features: np.ndarray | None = None, *,
            embedding_dim: int = 64, fpr: float = 0.01, shrinkage: float = 0.05,
            info: Mapping[str, Any] | None = None, score: str = "knn", k: int = KNN_K,
            bank_size: int = BANK_SIZE, norm_weight: float = NORM_WEIGHT,
            seed: int = 0) -> NoveltyModel:
        """Fit on in-distribution features; set the threshold on ``val_features``.

        Parameters
        ----------
        features : (N, F) array
            Pooled features of training frames.
        val_features : (M, F) array, optional
            Features of held-out in-distribution frames; the threshold is their
            ``1 - fpr`` score quantile. Without them the training scores are
            used (optimistic: a lower threshold than held-out frames need; for
            ``knn`` each training frame's own row is skipped).
        embedding_dim : int
            Principal directions kept for the embedding (at most ``F``).
        fpr : float
            Wanted rate of in-distribution frames flagged novel, in (0, 1).
        shrinkage : float
            Covariance shrinkage toward ``trace/F`` times the identity, in [0, 1).
        score : {"knn", "mahalanobis"}
            ``knn`` (the default): the cosine distance of the features to the
            ``k``-th nearest of up to ``bank_size`` fit frames (drawn at random
            with ``seed``) plus ``norm_weight`` times the negative log of the
            feature norm, each standardised by its median and standard
            deviation on the threshold frames (the norm term counts only
            where it is positive: weaker features than usual). ``mahalanobis``: the distance to
            the one Gaussian of all fit frames (the version 1 score; it fails
            when the training frames form separate groups, see docs/novelty.md).
        k, bank_size, norm_weight, seed
            Options of the ``knn`` score (defaults :data:`KNN_K`,
            :data:`BANK_SIZE`, :data:`NORM_WEIGHT`).
        """
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"need (N >= 2, F) features, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or infinity")
        if not 0.0 < fpr < 1.0:
            raise ValueError(f"fpr must be in (0, 1), got {fpr!r}")
        if not 0.0 <= shrinkage < 1.0:
            raise ValueError(f"shrinkage must be in [0, 1), got {shrinkage!r}")
        if score not in SCORES:
            raise ValueError(f"unknown novelty score {score!r}; known: {', '.join(SCORES)}")
        n, f = x.shape
        mean = x.mean(axis=0)
        xc = x - mean
        cov = xc.T @ xc / max(n - 1, 1)
        target = np.trace(cov) / f
        cov = (1.0 - shrinkage) * cov + shrinkage * target * np.eye(f)
        precision = np.linalg.inv(cov)
        _evals, evecs = np.linalg.eigh(cov)
        d = int(min(max(1, embedding_dim), f))
        components = evecs[:, ::-1][:, :d].T
        bank, rows = None, None
        if score == "knn":
            rows = np.sort(np.random.default_rng(seed).permutation(n)[:max(2, int(bank_size))])
            if val_features is None and len(rows) < 2:
                raise ValueError("knn scores without held-out frames need at least 2 fit frames")
            bank = _unit(x[rows])
            k = int(min(max(1, k), len(rows) - (1 if val_features is None else 0)))
        model = cls(mean=mean, precision=precision, components=components, threshold=math.inf,
                    fpr=fpr, info=dict(info or {}), kind=score, bank=bank, k=k)
        ref = x if val_features is None else np.asarray(val_features, np.float64)
        if val_features is not None and (ref.ndim != 2 or ref.shape[1] != f or len(ref) < 2):
            raise ValueError(f"need (M >= 2, {f}) held-out features, got shape {ref.shape}")
        if score == "knn":
            # without held-out frames a bank row is its own nearest neighbour: skip it
            dist = model._knn(ref, skip_rows=rows if val_features is None else None)
            lnorm = model._log_inv_norm(ref)
            model.calibration = np.array([np.median(dist), max(dist.std(), 1e-6),
                                          np.median(lnorm), max(lnorm.std(), 1e-6),
                                          float(norm_weight)])
            scores = model._combine(dist, lnorm)
        else:
            scores = model.score(ref)
        model.threshold = float(np.quantile(scores, 1.0 - fpr))
        model.info.update({"n_fit": int(n), "n_threshold": int(len(ref)),
                           "threshold_on": "train" if val_features is None else "validation",
                           "shrinkage": float(shrinkage), "score": score})
        if score == "knn":
            model.info.update({"k": model.k, "bank_size": int(len(bank)),
                               "norm_weight": float(norm_weight)})
        return model

    # ---------------------------------------------------------------- scoring
    @property
    def feature_dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def embedding_dim(self) -> int:
        return int(self.components.shape[0])

    def _check(self, features) -> np.ndarray:
        x = np.asarray(features, np.float32)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            raise ValueError(f"expected (N, {self.feature_dim}) features, got shape {x.shape}")
        return x

    def score(self, features: np.ndarray) -> np.ndarray:
        """Novelty score of each row, ``(N,)`` float32 (higher: less like the fit frames).

        ``knn``: ``(d - d_med) / d_sd + w * max(0, (m - m_med) / m_sd)`` with ``d`` the
        cosine distance (``1 - cos``) between the row's features and its
        ``k``-th nearest reference frame, ``m = -log |features|`` and the
        medians, deviations and ``w`` in :attr:`calibration`; 0 is a typical
        in-distribution frame. ``mahalanobis``: :meth:`mahalanobis`.
        """
        if self.kind == "knn":
            x = self._check(features)
            return self._combine(self._knn(x), self._log_inv_norm(x))
        return self.mahalanobis(features)

    def knn_distance(self, features: np.ndarray) -> np.ndarray:
        """Cosine distance to the ``k``-th nearest reference frame (``knn`` models only)."""
        if self.kind != "knn":
            raise ValueError("this novelty model keeps no reference frames")
        return self._knn(self._check(features))

    @staticmethod
    def _log_inv_norm(x: np.ndarray) -> np.ndarray:
        return -np.log(np.maximum(np.linalg.norm(np.asarray(x, np.float32), axis=1), 1e-12))

    def _combine(self, dist: np.ndarray, lnorm: np.ndarray) -> np.ndarray:
        d_med, d_sd, m_med, m_sd, w = self.calibration
        # a weaker response than usual adds to the score; a stronger one takes nothing off
        # (else a frame far brighter than any training frame would look familiar)
        return ((dist - d_med) / d_sd + w * np.maximum((lnorm - m_med) / m_sd, 0.0)
                ).astype(np.float32)

    def mahalanobis(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row to the fitted mean, ``(N,)`` float32."""
        xc = self._check(features) - self.mean
        d2 = np.einsum("nf,nf->n", xc @ self.precision, xc)
        return np.sqrt(np.maximum(d2, 0.0)).astype(np.float32)

    def _knn(self, x: np.ndarray, skip_rows: np.ndarray | None = None) -> np.ndarray:
        """Cosine distance to the ``k``-th nearest bank row (``skip_rows[i]``: row i's own)."""
        xn = _unit(np.asarray(x, np.float32)).astype(np.float32)
        out = np.empty(len(xn), np.float32)
        pos = None
        if skip_rows is not None:  # where each input row sits in the bank, or -1
            pos = np.full(len(xn), -1)
            pos[skip_rows] = np.arange(len(skip_rows))
        for a in range(0, len(xn), 256):
            sims = xn[a:a + 256] @ self._bank32.T
            if pos is not None:
                own = pos[a:a + 256]
                hit = np.flatnonzero(own >= 0)
                sims[hit, own[hit]] = -np.inf
            kth = np.partition(sims, sims.shape[1] - self.k, axis=1)[:, sims.shape[1] - self.k]
            out[a:a + 256] = 1.0 - kth
        return out

    def residual(self, features: np.ndarray) -> np.ndarray:
        """Norm of the part of each centred row outside the principal directions."""
        xc = self._check(features) - self.mean
        proj = xc @ self.components.T
        return np.sqrt(np.maximum((xc * xc).sum(1) - (proj * proj).sum(1), 0.0)
                       ).astype(np.float32)

    def is_novel(self, scores: np.ndarray) -> np.ndarray:
        """``scores > threshold`` (NaN scores are not novel)."""
        s = np.asarray(scores, np.float32)
        with np.errstate(invalid="ignore"):
            return np.nan_to_num(s, nan=-np.inf) > self.threshold

    def pca_dims(self, n_tags: int | None) -> int:
        """Principal directions an embedding uses beside ``n_tags`` probabilities."""
        if not n_tags:
            return self.embedding_dim
        return max(min(MIN_PCA_DIMS, self.embedding_dim), self.embedding_dim - int(n_tags))

    def output_dim(self, n_tags: int | None) -> int:
        """Length of the embeddings of a tagger with ``n_tags`` tags."""
        return self.pca_dims(n_tags) + (int(n_tags) if n_tags else 0)

    def embed(self, features: np.ndarray, probs: np.ndarray | None = None) -> np.ndarray:
        """Compact embeddings, L2-normalised float16 (cosine similarity is their dot product).

        Without ``probs``: the projections on the principal directions
        (``embedding_dim`` values). With ``probs`` (``(N, T)``): the unit
        projection on the first :meth:`pca_dims` directions times
        :data:`PCA_WEIGHT`, then the unit ``probs - 0.5``.
        """
        x = self._check(features) - self.mean
        n_tags = None if probs is None else np.shape(probs)[1]
        z = x @ self.components[:self.pca_dims(n_tags)].T
        z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
        if probs is not None:
            p = np.asarray(probs, np.float32) - 0.5
            if p.shape[0] != z.shape[0]:
                raise ValueError(f"{p.shape[0]} probability rows for {z.shape[0]} feature rows")
            p /= np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
            z = np.hstack([PCA_WEIGHT * z, p])
            z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
        return z.astype(np.float16)

    def with_threshold(self, threshold: float) -> NoveltyModel:
        """A copy with another threshold (e.g. set at a beamline)."""
        if not math.isfinite(float(threshold)):
            raise ValueError(f"threshold must be finite, got {threshold!r}")
        return replace(self, threshold=float(threshold),
                       info={**self.info, "threshold_set": "by hand"})

    # ---------------------------------------------------------------- storage
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (what checkpoints and sidecar files hold)."""
        out = {"version": np.asarray(_VERSION, np.int64), "mean": self.mean,
               "precision": self.precision, "components": self.components,
               "threshold": np.asarray(self.threshold, np.float64),
               "fpr": np.asarray(self.fpr, np.float64),
               "info": np.asarray(json.dumps(self.info, sort_keys=True, default=str)),
               "kind": np.asarray(self.kind), "k": np.asarray(self.k, np.int64)}
        if self.bank is not None:
            out["bank"] = self.bank
            out["calibration"] = np.asarray(self.calibration, np.float64)
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> NoveltyModel:
        """Inverse of :meth:`to_arrays` (accepts numpy arrays or torch tensors).

        Raises
        ------
        ValueError
            A field is missing or malformed, or the version is newer than this code.
        """
        def arr(key):
            v = arrays[key]
            return np.asarray(v.numpy() if hasattr(v, "numpy") else v)

        try:
            version = int(arr("version"))
            if version > _VERSION:
                raise ValueError(f"novelty statistics version {version}; this code reads up to "
                                 f"{_VERSION}")
            info = arrays.get("info", "{}")
            info = json.loads(str(info if isinstance(info, str) else np.asarray(info)))
            extra = {}
            if version >= 2:  # version 1 files are Mahalanobis models
                kind = arrays["kind"]
                extra = {"kind": str(kind if isinstance(kind, str) else np.asarray(kind)),
                         "k": int(arr("k")),
                         "bank": arr("bank") if "bank" in arrays else None,
                         "calibration": arr("calibration") if "calibration" in arrays
                         else None}
            return cls(mean=arr("mean"), precision=arr("precision"),
                       components=arr("components"), threshold=float(arr("threshold")),
                       fpr=float(arr("fpr")), info=info, **extra)
        except KeyError as err:
            raise ValueError(f"novelty statistics lack {err}") from None

    def digest(self) -> str:
        """sha256 (12 hex) of the statistics and threshold."""
        h = hashlib.sha256()
        for k, v in sorted(self.to_arrays().items()):
            if k != "info":
                h.update(k.encode())
                h.update(np.ascontiguousarray(v).tobytes())
        return h.hexdigest()[:12]

    def save(self, path: str | Path, *, checkpoint_id: str) -> Path:
        """Write a sidecar ``.npz`` (no pickle) for the checkpoint ``checkpoint_id``."""
        import os
        import tempfile

        path = Path(path)
        arrays = self.to_arrays()
        arrays["checkpoint_id"] = np.asarray(str(checkpoint_id))
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> tuple[NoveltyModel, str]:
        """Read a sidecar written by :meth:`save`: ``(model, checkpoint_id)``."""
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return cls.from_arrays(arrays), str(arrays.get("checkpoint_id", ""))


def encode_embedding(vector: np.ndarray | None) -> str:
    """A float16 embedding as base64 text (what the tag stream stores); ``""`` for None.

    >>> v = np.array([0.6, 0.8], np.float16)
    >>> decode_embedding(encode_embedding(v)).tolist()
    [0.60009765625, 0.7998046875]
    """
    import base64

    if vector is None:
        return ""
    return base64.b64encode(np.asarray(vector, "<f2").tobytes()).decode("ascii")


def decode_embedding(text: str, dim: int | None = None) -> np.ndarray | None:
    """Inverse of :func:`encode_embedding`; ``None`` for ``""`` or a wrong length."""
    import base64
    import binascii

    if not text:
        return None
    try:
        raw = base64.b64decode(str(text), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) % 2 or (dim is not None and len(raw) != 2 * dim):
        return None
    return np.frombuffer(raw, "<f2").copy()
