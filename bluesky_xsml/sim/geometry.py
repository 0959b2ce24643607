"""Detector families and scattering geometry for the synthetic generator.

A :class:`DetectorConfig` describes one real detector model: its modules, the
gaps between them, its pixel size and the dtypes and sentinel values its
frames carry.  :func:`resolve_detectors` turns user input (names, ``"HxW"``
shapes, family names, ``"train"``/``"heldout"``/``"all"``) into configs, so
training can exclude detector configurations that a test set then uses.

Conventions
-----------
Pixel coordinates are those of the *rendered* frame: ``x`` is the column,
``y`` the row (pointing down), pixel ``(row, col)`` is centred on
``(y, x) = (row, col)``.  Azimuths are in degrees, counter-clockwise from
``+x`` with ``y`` pointing *up* on the displayed image (90 deg points towards
row 0).  Scattering vectors are in inverse angstrom, distances in metres.

Examples
--------
>>> from bluesky_xsml.sim.geometry import DETECTORS, render_shape, resolve_detectors
>>> DETECTORS["pilatus_1m"].shape
(1043, 981)
>>> render_shape(DETECTORS["pilatus_300kw"], 256)
(34, 256)
>>> [d.name for d in resolve_detectors(["619x1475"])]
['pilatus_900k']
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..errors import ConfigurationError

__all__ = [
    "RADIAL_SAMPLING",
    "SceneGeometry",
    "ring_points",
    "DetectorConfig",
    "DETECTORS",
    "FAMILIES",
    "HELDOUT",
    "TRAINING",
    "Footprint",
    "gap_ranges",
    "q_from_r",
    "r_from_q",
    "render_shape",
    "resolve_detectors",
]

#: Radial profiles are sampled at this many points per pixel.
RADIAL_SAMPLING = 4

#: Per family and dtype: masked-pixel value, bad-pixel value and counter maximum
#: (``count_cutoff``; a tuple means one is drawn per frame).
FAMILIES: dict[str, dict[str, dict]] = {
    # PILATUS: 20-bit counters, int32 frames, gaps -1, bad pixels -2.
    "pilatus": {"int32": {"mask": -1, "bad": -2, "cutoff": (1048575,)}},
    # EIGER: masked pixels hold the dtype's maximum; the count cut-off of the
    # rate correction is below it.
    "eiger": {
        "uint32": {"mask": 2**32 - 1, "bad": 2**32 - 1, "cutoff": (65534, 262143, 1048575)},
        "uint16": {"mask": 2**16 - 1, "bad": 2**16 - 1, "cutoff": (65534,)},
    },
    # CCD / flat panel: integrating, float32 after dark correction, NaN masked,
    # 16-bit ADC full scale.
    "ccd": {"float32": {"mask": float("nan"), "bad": float("nan"), "cutoff": (65535.0,)}},
}


@dataclass(frozen=True)
class DetectorConfig:
    """One detector model.

    Parameters
    ----------
    name : str
        Registry key, e.g. ``"pilatus_1m"``.
    family : str
        ``"pilatus"``, ``"eiger"`` or ``"ccd"`` (see :data:`FAMILIES`).
    modules : tuple of int
        Module rows and module columns.
    module_shape : tuple of int
        ``(height, width)`` of one module in pixels.
    gap : tuple of int
        Dead pixel rows between module rows and dead columns between module
        columns.
    pixel_size_m : float
        Native pixel size in metres.
    dtypes : tuple of str
        Frame dtypes this detector writes (one is drawn per frame).
    weight : float
        Relative probability of drawing this detector.
    """

    name: str
    family: str
    modules: tuple[int, int]
    module_shape: tuple[int, int]
    gap: tuple[int, int]
    pixel_size_m: float
    dtypes: tuple[str, ...]
    weight: float = 1.0

    @property
    def shape(self) -> tuple[int, int]:
        """Native ``(height, width)`` including gaps."""
        (mr, mc), (mh, mw), (gr, gc) = self.modules, self.module_shape, self.gap
        return mr * mh + (mr - 1) * gr, mc * mw + (mc - 1) * gc

    @property
    def has_gaps(self) -> bool:
        """Whether frames of this detector have dead rows/columns between modules."""
        (mr, mc), (gr, gc) = self.modules, self.gap
        return (mr > 1 and gr > 0) or (mc > 1 and gc > 0)

    @property
    def shape_str(self) -> str:
        return "{}x{}".format(*self.shape)


def _pilatus(name, rows, cols, weight):
    return DetectorConfig(name, "pilatus", (rows, cols), (195, 487), (17, 7), 172e-6,
                          ("int32",), weight)


def _eiger(name, rows, cols, weight):
    return DetectorConfig(name, "eiger", (rows, cols), (514, 1030), (37, 10), 75e-6,
                          ("uint32", "uint16"), weight)


def _ccd(name, h, w, pixel, weight, tiles=(1, 1), seam=0):
    th, tw = (h - (tiles[0] - 1) * seam) // tiles[0], (w - (tiles[1] - 1) * seam) // tiles[1]
    return DetectorConfig(name, "ccd", tiles, (th, tw), (seam, seam), pixel, ("float32",), weight)


#: All known detector models, by name.  Weights balance families and keep
#: frames with module gaps at roughly a third of the training set.
DETECTORS: dict[str, DetectorConfig] = {d.name: d for d in (
    _pilatus("pilatus_100k", 1, 1, 1.5),
    _pilatus("pilatus_200k", 2, 1, 0.4),
    _pilatus("pilatus_300k", 3, 1, 0.5),
    _pilatus("pilatus_300kw", 1, 3, 0.5),
    _pilatus("pilatus_900k", 3, 3, 0.6),
    _pilatus("pilatus_1m", 5, 2, 0.5),
    _pilatus("pilatus_2m", 8, 3, 0.45),
    _pilatus("pilatus_6m", 12, 5, 0.4),
    _eiger("eiger_500k", 1, 1, 1.6),
    _eiger("eiger_1m", 2, 1, 0.5),
    _eiger("eiger_4m", 4, 2, 0.6),
    _eiger("eiger_9m", 6, 3, 0.4),
    _eiger("eiger_16m", 8, 4, 0.3),
    _ccd("ccd_1k", 1024, 1024, 158e-6, 1.2),
    _ccd("ccd_2k", 2048, 2048, 79e-6, 1.0),
    _ccd("ccd_3k", 3072, 3072, 73e-6, 0.8),
    _ccd("ccd_1300x1340", 1300, 1340, 20e-6, 0.8),
    _ccd("flatpanel_2k", 2048, 2048, 200e-6, 0.8),
    _ccd("adsc_q210", 2048, 2048, 102e-6, 0.35, tiles=(2, 2), seam=6),
)}

#: Detector configurations kept out of the default training set (test-only).
HELDOUT: tuple[str, ...] = ("pilatus_900k", "eiger_4m")
#: The default training set: every detector not in :data:`HELDOUT`.
TRAINING: tuple[str, ...] = tuple(n for n in DETECTORS if n not in HELDOUT)


def resolve_detectors(spec: str | Iterable | None) -> tuple[DetectorConfig, ...]:
    """Turn a detector selection into configs.

    Parameters
    ----------
    spec : None, str or iterable
        ``None`` or ``"train"``: :data:`TRAINING`; ``"heldout"``; ``"all"``;
        a registry name (``"eiger_1m"``); a family (``"pilatus"``); a native
        shape ``"HxW"`` or ``(H, W)``; a :class:`DetectorConfig`; or an
        iterable of any of these (duplicates are dropped).

    Raises
    ------
    ConfigurationError
        For an entry that matches nothing; the message lists valid choices.
    """
    if spec is None:
        spec = ["train"]
    elif isinstance(spec, (str, DetectorConfig)) or (
        isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(v, int) for v in spec)
    ):
        spec = [spec]
    out: list[DetectorConfig] = []
    for item in spec:
        out.extend(_resolve_one(item))
    if not out:
        raise ConfigurationError("the detector selection is empty")
    seen: dict[str, DetectorConfig] = {}
    for d in out:
        seen.setdefault(d.name, d)
    return tuple(seen.values())


def _resolve_one(item) -> list[DetectorConfig]:
    if isinstance(item, DetectorConfig):
        return [item]
    if isinstance(item, (tuple, list)) and len(item) == 2:
        item = f"{int(item[0])}x{int(item[1])}"
    if not isinstance(item, str):
        raise ConfigurationError(f"cannot interpret detector {item!r}")
    key = item.strip().lower()
    if key in ("train", "training"):
        return [DETECTORS[n] for n in TRAINING]
    if key == "heldout":
        return [DETECTORS[n] for n in HELDOUT]
    if key == "all":
        return list(DETECTORS.values())
    if key in DETECTORS:
        return [DETECTORS[key]]
    if key in FAMILIES:
        return [d for d in DETECTORS.values() if d.family == key]
    if "x" in key:
        hits = [d for d in DETECTORS.values() if d.shape_str == key]
        if hits:
            return hits
    shapes = ", ".join(sorted({d.shape_str for d in DETECTORS.values()}))
    raise ConfigurationError(
        f"unknown detector {item!r}; use a name ({', '.join(DETECTORS)}), a family "
        f"({', '.join(FAMILIES)}), a native shape HxW ({shapes}) or one of "
        "'train', 'heldout', 'all'"
    )


def render_shape(det: DetectorConfig, size: int | None) -> tuple[int, int]:
    """Shape of a frame rendered with longest side ``size`` (``None``: native).

    The aspect ratio is kept; each side is at least 8 pixels.
    """
    h, w = det.shape
    if size is None:
        return h, w
    s = size / max(h, w)
    return max(8, int(round(h * s))), max(8, int(round(w * s)))


def gap_ranges(det: DetectorConfig, shape: tuple[int, int]
               ) -> tuple[list[list[int]], list[list[int]]]:
    """Dead row and column ranges ``[start, stop)`` of ``det`` rendered at ``shape``.

    Gaps are scaled with the frame but stay at least one pixel wide.
    """
    (mr, mc), (mh, mw), (gr, gc) = det.modules, det.module_shape, det.gap
    nh, nw = det.shape
    rows, cols = [], []
    for n_mod, m_len, g, native, out, length in (
        (mr, mh, gr, nh, rows, shape[0]), (mc, mw, gc, nw, cols, shape[1])
    ):
        if g <= 0:
            continue
        s = length / native
        for b in range(n_mod - 1):
            start = (b + 1) * m_len + b * g
            a = int(math.floor(start * s))
            z = max(a + 1, int(round((start + g) * s)))
            out.append([a, min(z, length)])
    return rows, cols


def q_from_r(r_px, pixel_m: float, distance_m: float, wavelength_a: float):
    """Momentum transfer ``q = 4 pi sin(theta) / lambda`` (1/A) at radius ``r_px``.

    ``2 theta = atan(r * pixel / distance)`` on a flat detector normal to the beam.
    """
    tth = np.arctan(np.asarray(r_px, dtype=np.float64) * (pixel_m / distance_m))
    return 4.0 * np.pi * np.sin(0.5 * tth) / wavelength_a


def r_from_q(q, pixel_m: float, distance_m: float, wavelength_a: float):
    """Radius in pixels of scattering vector ``q`` (1/A); ``inf`` beyond 2 theta = 90 deg."""
    s = np.asarray(q, dtype=np.float64) * (wavelength_a / (4.0 * np.pi))
    tth = 2.0 * np.arcsin(np.minimum(np.maximum(s, 0.0), 1.0))
    return np.where(tth < 0.5 * np.pi - 1e-6, np.tan(tth) * (distance_m / pixel_m), np.inf)


class Footprint:
    """Where on a rendered frame scattering can be seen.

    A point is *seen* when it lies on the detector, outside module gaps,
    outside the beamstop shadow and (grazing incidence) above the sample
    horizon.  Used by the label rules; it evaluates geometry only.

    Parameters
    ----------
    shape : tuple of int
        Rendered ``(height, width)``.
    gaps : tuple of lists
        Row and column gap ranges (see :func:`gap_ranges`).
    beam_center : tuple of float
        ``(x, y)`` of the direct beam in pixels (may be off the detector).
    beamstop : dict or None
        The scene's beamstop entry.
    horizon_row : float or None
        Row of the sample horizon (grazing incidence); rows below it are shadowed.
    """

    def __init__(self, shape, gaps, beam_center, beamstop=None, horizon_row=None):
        self.h, self.w = int(shape[0]), int(shape[1])
        self.cx, self.cy = float(beam_center[0]), float(beam_center[1])
        self.gap_row = np.zeros(self.h + 1, bool)
        self.gap_col = np.zeros(self.w + 1, bool)
        for a, b in gaps[0]:
            self.gap_row[a:b] = True
        for a, b in gaps[1]:
            self.gap_col[a:b] = True
        self.beamstop = beamstop
        self.horizon_row = horizon_row
        self.L = max(self.h, self.w)

    def on_detector(self, x, y, margin: float = 0.0):
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        return (x >= -0.5 + margin) & (x <= self.w - 0.5 - margin) & \
               (y >= -0.5 + margin) & (y <= self.h - 0.5 - margin)

    def shadowed(self, x, y, pad: float = 0.0):
        """True where the beamstop covers ``(x, y)`` (grown by ``pad`` pixels)."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        bs = self.beamstop
        if not bs:
            return np.zeros(np.broadcast(x, y).shape, bool)
        dx, dy = x - self.cx, y - self.cy
        ang = math.radians(bs.get("angle_deg", 0.0))
        ux, uy = math.cos(ang), -math.sin(ang)
        along = dx * ux + dy * uy
        perp = np.abs(dx * uy - dy * ux)
        r = np.hypot(dx, dy)
        if bs["type"] == "circular":
            out = r <= bs["radius_px"] + pad
            hw = 0.5 * bs.get("holder_width_px", 0.0)
            if hw > 0:
                out |= (along >= 0) & (perp <= hw + pad)
            return out
        hw = 0.5 * bs["width_px"]
        return np.where(along >= 0, perp <= hw + pad, r <= hw + pad)

    def seen(self, x, y, pad: float = 1.0):
        """True where a feature at ``(x, y)`` would be visible (see class doc)."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        ok = self.on_detector(x, y)
        xi = np.minimum(np.maximum(np.rint(x), 0), self.w).astype(np.intp)
        yi = np.minimum(np.maximum(np.rint(y), 0), self.h).astype(np.intp)
        ok &= ~self.gap_row[yi] & ~self.gap_col[xi]
        ok &= ~self.shadowed(x, y, pad)
        if self.horizon_row is not None:
            ok &= y <= self.horizon_row - pad
        return ok

    def ring_coverage(self, radii, n: int = 180):
        """Boolean ``(len(radii), n)``: which of ``n`` azimuths of each ring are seen.

        Azimuth sample ``k`` is at ``360 * (k + 0.5) / n`` degrees.
        """
        radii = np.atleast_1d(np.asarray(radii, dtype=np.float64))
        phi = (np.arange(n) + 0.5) * (2 * np.pi / n)
        x = self.cx + radii[:, None] * np.cos(phi)[None, :]
        y = self.cy - radii[:, None] * np.sin(phi)[None, :]
        return self.seen(x, y)

    def nearest_radius(self) -> float:
        """Distance from the beam to the nearest detector pixel (0 when the beam is on it)."""
        dx = max(-0.5 - self.cx, 0.0, self.cx - (self.w - 0.5))
        dy = max(-0.5 - self.cy, 0.0, self.cy - (self.h - 0.5))
        return math.hypot(dx, dy)

    def farthest_radius(self) -> float:
        """Distance from the beam to the farthest detector corner."""
        xs = (-0.5 - self.cx, self.w - 0.5 - self.cx)
        ys = (-0.5 - self.cy, self.h - 0.5 - self.cy)
        return max(math.hypot(a, b) for a in xs for b in ys)


class SceneGeometry:
    """Derived geometry of a completed scene.

    Parameters
    ----------
    sc : dict
        A scene completed by :func:`~bluesky_xsml.sim.generator.complete_scene`.

    Attributes
    ----------
    h, w, L : int
        Rendered height, width and longest side.
    p, D, lam : float
        Rendered pixel size (m), distance (m), wavelength (A).
    cx, cy : float
        Beam centre (px).
    horizon : float or None
        Row of the sample horizon (grazing incidence).
    fp : Footprint
        Detector area, gaps and beamstop shadow.
    nr, r_grid, q_grid, cos3
        The radial grid of profiles (``RADIAL_SAMPLING`` points per pixel),
        its ``q`` and the flat-detector solid-angle factor ``cos^3 2 theta``.
    B, read, dark : float
        Background level, read noise (counts) and dark counts per pixel.
    """

    def __init__(self, sc: dict):
        det, geo = sc["detector"], sc["geometry"]
        self.h, self.w = det["shape"]
        self.L = max(self.h, self.w)
        self.p = float(det["pixel_size_m"])
        self.D = float(geo["distance_m"])
        self.lam = float(geo["wavelength_A"])
        self.cx, self.cy = geo["beam_center"]
        gi = sc.get("grazing")
        self.gi = gi
        self.horizon = None
        if gi:
            self.alpha_i = math.radians(gi["incidence_deg"])
            self.alpha_c = math.radians(gi["critical_deg"])
            self.horizon = self.cy - self.D * math.tan(self.alpha_i) / self.p
        gaps = det["gaps"]
        self.gaps = (gaps["rows"], gaps["cols"])
        # geometry only; the grazing-incidence factor enters through
        # physics.grazing_factor (labels weigh expected counts by it)
        self.fp = Footprint((self.h, self.w), self.gaps, (self.cx, self.cy), sc.get("beamstop"))
        self.r_far = self.fp.farthest_radius()
        self.r_near = self.fp.nearest_radius()
        self.nr = int(math.ceil((self.r_far + 2.0) * RADIAL_SAMPLING)) + 2
        self.B = float(sc["background"]["level"])
        noise = sc["noise"]
        self.read = float(noise.get("read_sigma", 0.0)) / max(noise.get("gain", 1.0), 1e-9)
        self.dark = float(sc["noise"].get("dark", 0.0))

    @cached_property
    def r_grid(self):
        return np.arange(self.nr) / RADIAL_SAMPLING

    @cached_property
    def q_grid(self):
        return q_from_r(self.r_grid, self.p, self.D, self.lam)

    @cached_property
    def cos3(self):
        return np.cos(np.arctan(self.r_grid * self.p / self.D)) ** 3

    def q(self, r):
        """``q`` (1/A) at radius ``r`` (px)."""
        return q_from_r(r, self.p, self.D, self.lam)

    def r(self, q):
        """Radius (px) of ``q`` (1/A)."""
        return r_from_q(q, self.p, self.D, self.lam)

    def alpha_f(self, rows):
        """Exit angle (rad) of image rows (grazing incidence)."""
        dy = self.cy - np.asarray(rows, dtype=np.float64)
        return np.arctan(dy * self.p / self.D) - self.alpha_i

    def rows_for_alpha(self, alpha):
        """Image row of exit angle ``alpha`` (rad)."""
        return self.cy - self.D * np.tan(np.asarray(alpha) + self.alpha_i) / self.p


def ring_points(ctx: SceneGeometry, radii, n: int = 180):
    """Points of each ring at ``n`` azimuths: x, y arrays of shape (len(radii), n)."""
    radii = np.atleast_1d(np.asarray(radii, dtype=np.float64))
    radii = np.where(np.isfinite(radii), radii, 1e9)
    phi = (np.arange(n) + 0.5) * (2 * np.pi / n)
    return (ctx.cx + radii[:, None] * np.cos(phi)[None, :],
            ctx.cy - radii[:, None] * np.sin(phi)[None, :])
