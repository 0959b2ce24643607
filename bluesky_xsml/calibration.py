"""Per-tag probability calibration: a monotonic map applied to a tagger's outputs.

A :class:`Calibration` holds, per tag, the two numbers of a Platt map on the
logit, ``p' = sigmoid(a * logit(p) + b)`` with ``a > 0``. The map is strictly
increasing, so it changes no ranking (a tag's AP and ROC-AUC stay the same)
and a decision ``p >= t`` is the same as ``p' >= t'`` when the threshold is
mapped too (:meth:`Calibration.map_thresholds`).

Outputs are float32, and a map that compresses part of [0, 1] can round two
neighbouring float32 probabilities to the same output. So that no decision at
the thresholds the map was fitted with can change that way, the calibration
keeps those thresholds (``pinned``): an output whose input lies below a pinned
threshold stays below the mapped threshold, one at or above it stays at or
above (at most one float32 step of difference, and only for such ties).

The map is fitted by :mod:`bluesky_xsml.training.calibrate` (``xsml calibrate``)
and stored in the checkpoint; :class:`~bluesky_xsml.Tagger` applies it to every
probability it returns. This module needs only numpy.

Examples
--------
>>> import numpy as np
>>> cal = Calibration(a=[0.5, 1.0], b=[0.0, 1.0])
>>> [round(float(v), 4) for v in cal.apply(np.array([0.9, 0.5], np.float32))]
[0.75, 0.7311]
>>> [round(float(v), 4) for v in cal.invert(cal.apply(np.array([0.9, 0.5], np.float32)))]
[0.9, 0.5]
>>> Calibration.identity(2).is_identity()
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Calibration", "LOGIT_EPS", "logit", "sigmoid"]

#: Probabilities are clipped to ``[LOGIT_EPS, 1 - LOGIT_EPS]`` before the logit (only
#: exact 0 and 1 and values below 1e-9 are moved: every float32 below 1 is under 1 - 1e-9).
LOGIT_EPS = 1e-9


def logit(p) -> np.ndarray:
    """``log(p / (1 - p))`` in float64, with ``p`` clipped to ``[LOGIT_EPS, 1 - LOGIT_EPS]``."""
    q = np.clip(np.asarray(p, np.float64), LOGIT_EPS, 1.0 - LOGIT_EPS)
    return np.log(q) - np.log1p(-q)


def sigmoid(z) -> np.ndarray:
    """``1 / (1 + exp(-z))`` in float64, without overflow."""
    z = np.asarray(z, np.float64)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@dataclass
class Calibration:
    """Per-tag Platt maps ``p' = sigmoid(a * logit(p) + b)``.

    Parameters
    ----------
    a, b : array_like, shape (T,)
        Slope (> 0) and offset on the logit, per tag.
    pinned : array_like, shape (T,), optional
        Per tag, an input threshold whose decisions the map keeps exactly
        (``NaN``: none); normally the thresholds of the checkpoint it was fitted for.
    info : dict, optional
        Provenance (what it was fitted on, ECE before and after...), JSON-able.

    Raises
    ------
    ValueError
        Shapes differ, a value is not finite, or a slope is not positive.
    """

    a: Any
    b: Any
    pinned: Any = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.a = np.asarray(self.a, np.float64).reshape(-1)
        self.b = np.asarray(self.b, np.float64).reshape(-1)
        n = self.a.size
        self.pinned = (np.full(n, np.nan) if self.pinned is None
                       else np.asarray(self.pinned, np.float64).reshape(-1))
        if self.b.shape != (n,) or self.pinned.shape != (n,):
            raise ValueError(f"calibration needs one a, b and pinned value per tag; got "
                             f"{self.a.size}, {self.b.size} and {self.pinned.size}")
        if not (np.all(np.isfinite(self.a)) and np.all(np.isfinite(self.b))):
            raise ValueError("calibration slopes and offsets must be finite")
        if np.any(self.a <= 0):
            raise ValueError("calibration slopes must be > 0 (the map must be increasing)")
        pins = self.pinned[np.isfinite(self.pinned)]
        if np.any((pins <= 0) | (pins >= 1)):
            raise ValueError("pinned thresholds must lie strictly between 0 and 1")
        self.info = dict(self.info or {})

    @classmethod
    def identity(cls, n_tags: int) -> Calibration:
        """The map that changes nothing (``a = 1``, ``b = 0``)."""
        return cls(np.ones(n_tags), np.zeros(n_tags))

    @property
    def n_tags(self) -> int:
        """Number of tags (columns) the map is for."""
        return int(self.a.size)

    def is_identity(self) -> bool:
        """Whether every tag's map is ``a = 1, b = 0``."""
        return bool(np.all(self.a == 1.0) and np.all(self.b == 0.0))

    def _map(self, p: np.ndarray) -> np.ndarray:
        return sigmoid(self.a * logit(p) + self.b).astype(np.float32)

    def apply(self, probs) -> np.ndarray:
        """Calibrated float32 probabilities for ``(N, T)`` (or ``(T,)``) ``probs``."""
        p = np.asarray(probs, np.float32)
        if p.shape[-1:] != (self.n_tags,):
            raise ValueError(f"calibration is for {self.n_tags} tags; got shape {p.shape}")
        q = self._map(p)
        for j in np.flatnonzero(np.isfinite(self.pinned)):
            c = self._pin_output(j)
            below = p[..., j] < np.float32(self.pinned[j])
            q[..., j] = np.where(below, np.minimum(q[..., j], np.nextafter(c, np.float32(0))),
                                 np.maximum(q[..., j], c))
        return q

    def _pin_output(self, j: int) -> np.float32:
        """The mapped value of tag ``j``'s pinned threshold (as float32)."""
        row = np.zeros(self.n_tags, np.float32)
        row[j] = np.float32(self.pinned[j])
        return self._map(row)[j]

    def map_thresholds(self, thresholds) -> np.ndarray:
        """Per-tag thresholds ``(T,)`` on the calibrated scale (float32).

        A threshold equal to a pinned one maps to exactly what :meth:`apply`
        keeps decisions against.
        """
        t = np.asarray(thresholds, np.float32).reshape(-1)
        if t.shape != (self.n_tags,):
            raise ValueError(f"need {self.n_tags} thresholds, got shape {t.shape}")
        return self._map(t)

    def invert(self, probs) -> np.ndarray:
        """The inverse map (float32): calibrated probabilities back to the network's scale.

        Exact up to rounding; used to carry thresholds over to an uncalibrated model.
        """
        q = np.asarray(probs, np.float64)
        return sigmoid((logit(q) - self.b) / self.a).astype(np.float32)

    # -------------------------------------------------------------- storage
    def to_dict(self) -> dict:
        """Plain lists and a JSON-able ``info``: what a checkpoint stores."""
        return {"method": "platt", "a": [float(v) for v in self.a],
                "b": [float(v) for v in self.b],
                "pinned": [None if not np.isfinite(v) else float(v) for v in self.pinned],
                "info": self.info}

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        """Inverse of :meth:`to_dict`.

        Raises
        ------
        ValueError
            An unknown method or malformed values.
        """
        if not isinstance(d, dict) or d.get("method", "platt") != "platt":
            what = d.get("method") if isinstance(d, dict) else d
            raise ValueError(f"unknown calibration {what!r}")
        pinned = [np.nan if v is None else float(v) for v in d.get("pinned") or []] or None
        info = d.get("info") or {}
        if not isinstance(info, dict):
            raise ValueError("calibration info must be a mapping")
        return cls([float(v) for v in d["a"]], [float(v) for v in d["b"]], pinned, info)
