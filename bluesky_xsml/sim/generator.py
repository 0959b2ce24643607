"""Synthetic scattering scenes: sampling, rendering and labels.

A *scene* is a JSON-serialisable dict of physical parameters (detector,
geometry, sample features, instrument effects; documented in
``docs/synthetic-data.md``).  Three pure functions work on it:

* :func:`sample_scene` draws a scene from a random generator;
* :func:`render_scene` turns a scene (sampled or hand-written) into a frame in
  the detector's dtype, with its sentinels;
* :func:`scene_labels` derives the 23 tags (``TAG_NAMES`` order) from the
  parameters alone: a feature is tagged when it lands on the detector and its
  expected counts clear the noise of what lies under it.

:class:`SceneGenerator` ties them together with per-frame seeds derived from
``(seed, index)``, so frame ``i`` is the same whatever order or process
produced it.

Examples
--------
>>> import numpy as np
>>> from bluesky_xsml.sim.generator import SceneGenerator
>>> gen = SceneGenerator(seed=1, size=128)
>>> frame, labels, params = gen.one()
>>> frame.ndim, labels.shape, labels.dtype.name
(2, (23,), 'float32')
>>> again, labels2, _ = gen.frame_at(0)        # frame 0 again, from (seed, 0)
>>> bool(np.array_equal(again.view(np.uint8), frame.view(np.uint8)))
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ..errors import ConfigurationError
from ..tags import TAG_NAMES
from . import physics as ph
from .geometry import (
    DETECTORS,
    FAMILIES,
    DetectorConfig,
    Footprint,
    SceneGeometry,
    gap_ranges,
    q_from_r,
    render_shape,
    resolve_detectors,
    ring_points,
)

__all__ = [
    "SCENE_VERSION",
    "SceneGenerator",
    "complete_scene",
    "render_scene",
    "sample_scene",
    "scene_labels",
    "frame_seed",
]

SCENE_VERSION = 1
_TAG = {n: i for i, n in enumerate(TAG_NAMES)}
_R_E = 2.8179403262e-5  # classical electron radius, angstrom

#: Probability of asking for each feature when a scene is sampled (see
#: :func:`sample_scene`); grazing-incidence features are conditional on a
#: grazing geometry, ``many_rings`` on there being rings.
WANT_P: dict[str, float] = {
    "beam_off": 0.09, "grazing": 0.32, "weak_scattering": 0.17, "high_background": 0.22,
    "ring_isotropic": 0.24, "ring_oriented": 0.20, "ring_textured": 0.19, "many_rings": 0.30,
    "higher_orders": 0.24, "halo_isotropic": 0.19, "halo_anisotropic": 0.18,
    "diffuse_low_q": 0.28, "peaks_isolated": 0.20, "peaks_lattice": 0.20, "peaks_on_ring": 0.27,
    "horizon": 0.78, "yoneda": 0.55, "specular_rod": 0.58, "bragg_rods": 0.60,
    "beamstop_circular": 0.33, "beamstop_linear": 0.31, "saturation": 0.24, "streaks": 0.22,
}

# Label rules (see docs/synthetic-data.md).  The sampler keeps a margin of 2x
# over these thresholds, so rendered features are either clearly visible or absent.
WEAK_MAX_COUNTS = 50.0      # weak_scattering: brightest feature at most this many counts
HIGH_BG_RATIO = 0.5         # high_background: background >= this x median feature amplitude
SHARP_MAX_REL = 0.05        # a ring is sharp when FWHM <= 5 % of its radius
HALO_MIN_REL = 0.08         # a halo has FWHM >= 8 % of its q
ISO_MAX_KAPPA = 0.35        # azimuth min/max >= 0.5: isotropic
ORIENT_MIN_KAPPA = 0.8      # azimuth min/max <= 0.2: oriented
MIN_SAT_AREA = 4.0          # saturated pixels needed for the saturation tag
GAP_FRACTION = 0.25         # oriented rings / anisotropic halos vanish over >= 25 % of azimuths
DIFFUSE_DECAY = 5.0         # diffuse_low_q: falls >= 5x over 0.3 L from its inner edge
HIGH_MODE_MAX = 1.6         # sampler: high-background features stay below 1.6 x background


# ---------------------------------------------------------------------------
# Small helpers


def _g(x: float) -> float:
    """Round to 6 significant digits (what the scene stores and renders)."""
    x = float(x)
    if x == 0.0 or not math.isfinite(x):
        return x
    return float(f"{x:.6g}")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if obj and all(type(v) is float for v in obj):
            return [_g(v) for v in obj]
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _g(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


def _logu(rng, lo, hi):
    return float(math.exp(rng.uniform(math.log(lo), math.log(max(hi, lo)))))


def _u(rng, lo, hi):
    """Uniform in [lo, hi] (``lo`` when the interval is empty)."""
    return float(rng.uniform(lo, hi)) if hi > lo else float(lo)


def frame_seed(seed: int, index: int) -> np.random.Generator:
    """The random generator of frame ``index`` in a run seeded with ``seed``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(index)])))


def _thr(kind: str, level, read: float = 0.0):
    """Smallest visible peak (counts above ``level``) of a feature of ``kind``.

    ``"ext"``: rings, arcs, halos, diffuse (many pixels); ``"spot"``: spots,
    grains, streaks, rods (few pixels).  A feature must clear an absolute floor,
    the Poisson/read noise of what lies under it and a fraction of that level
    (contrast on a log scale).
    """
    level = np.maximum(np.asarray(level, dtype=np.float64), 0.0)
    noise = np.sqrt(level + read * read)
    if kind == "ext":
        return np.maximum(np.maximum(4.0, 4.0 * noise), 0.2 * level)
    return np.maximum(np.maximum(8.0, 6.0 * noise), 0.35 * level)


# ---------------------------------------------------------------------------
# Scene completion


def _detector_entry(spec, size, rng=None, dtype=None) -> dict:
    if isinstance(spec, Mapping):
        d = dict(spec)
        name = d.get("name")
        base = DETECTORS.get(name) if name else None
    else:
        d, base = {}, resolve_detectors(spec)[0]
    if base is not None:
        d.setdefault("name", base.name)
        d.setdefault("family", base.family)
        d.setdefault("native_shape", list(base.shape))
        d.setdefault("native_pixel_size_m", base.pixel_size_m)
        if "shape" not in d:
            d["shape"] = list(render_shape(base, size))
        if "gaps" not in d:
            rows, cols = gap_ranges(base, tuple(d["shape"]))
            d["gaps"] = {"rows": rows, "cols": cols}
        d.setdefault("dtype", dtype or base.dtypes[0])
    for key in ("family", "shape"):
        if key not in d:
            raise ConfigurationError(f"scene detector needs {key!r} (or a known 'name'); got {d}")
    fam = FAMILIES.get(d["family"])
    if fam is None:
        raise ConfigurationError(
            f"unknown detector family {d['family']!r}; known: {', '.join(FAMILIES)}")
    d.setdefault("dtype", next(iter(fam)))
    if d["dtype"] not in fam:
        raise ConfigurationError(
            f"dtype {d['dtype']!r} is not used by {d['family']} detectors; use one of {list(fam)}")
    info = fam[d["dtype"]]
    if "count_cutoff" not in d:
        cut = info["cutoff"]
        d["count_cutoff"] = cut[int(rng.integers(len(cut)))] if rng is not None else cut[-1]
    ns = d.get("native_shape", d["shape"])
    d.setdefault("native_shape", list(ns))
    nps = d.get("native_pixel_size_m", 172e-6)
    d.setdefault("native_pixel_size_m", nps)
    d.setdefault("pixel_size_m", nps * max(ns) / max(d["shape"]))
    d.setdefault("gaps", {"rows": [], "cols": []})
    d.setdefault("bad_pixels", [])
    d["shape"] = [int(v) for v in d["shape"]]
    return d


_FEATURE_DEFAULTS: dict[str, dict] = {
    "rings": {"style": "isotropic", "fwhm_rel": 0.005, "kappa": 0.0, "orient_deg": 90.0,
              "grain_sigma_px": 0.0, "grains": None, "seed": 0, "amp": 1000.0, "orders": None},
    "halo": {"fwhm_rel": 0.3, "kappa": 0.0, "orient_deg": 90.0, "amp": 500.0},
    "diffuse": {"model": "guinier_porod", "rg_A": 50.0, "porod_exp": 4.0, "radius_A": 50.0,
                "polydispersity": 0.2, "xi_A": 50.0, "i0": 1e5, "kappa": 0.0, "orient_deg": 0.0},
    "spots": {"amp": 1000.0, "sigma_px": 1.0},
    "lattice": {"amp": 1000.0, "sigma_px": 1.0, "envelope_q": 1.0, "hk_max": 8, "seed": 0,
                "min_amp": 0.0},
    "on_ring": {"n_fold": 6, "orient_deg": 0.0, "amp": 1000.0, "sigma_px": 1.0, "seed": 0},
    "direct_beam": {"amp": 1e7, "sigma_px": 2.0},
    "streaks": {"angles_deg": [0.0, 90.0], "amp": 200.0, "r0_px": 5.0, "decay": 1.0,
                "width_px": 0.7},
    "gi_diffuse": {"amp": 200.0, "qy_hwhm": 0.01, "decay_deg": 0.3},
    "specular_rod": {"amp": 500.0, "decay_deg": 0.3, "width_px": 0.8, "peak_amp": 0.0},
    "bragg_rods": {"qy": 0.05, "n_orders": 2, "amp": 300.0, "decay_deg": 0.5, "width_px": 0.8},
}


def complete_scene(scene: Mapping) -> dict:
    """Fill in defaults and derived values of a (possibly hand-written) scene.

    Accepts the compact forms documented in ``docs/synthetic-data.md``, e.g.
    ``"detector": "pilatus_1m"`` with a top-level ``"size"``, or a ring set
    given by ``"material"`` and a single ``"amp"``.  Returns a new dict; the
    input is not modified.  Completing a complete scene returns an equal scene.

    Raises
    ------
    ConfigurationError
        If the scene names an unknown detector, family, dtype or feature type.
    """
    sc = dict(scene)  # nested dicts are copied below before they are changed
    size = sc.get("size", 256)
    sc["detector"] = _detector_entry(sc.get("detector", "pilatus_1m"), size)
    h, w = sc["detector"]["shape"]
    geo = dict(sc.get("geometry") or {})
    geo.setdefault("wavelength_A", 1.0)
    geo.setdefault("beam_center", [(w - 1) / 2, (h - 1) / 2])
    geo["beam_center"] = [float(v) for v in geo["beam_center"]]
    if "distance_m" not in geo:
        if "q_max" in geo:
            # the farthest detector corner sees q_max
            fp = Footprint((h, w), ([], []), geo["beam_center"])
            s_ = min(float(geo["q_max"]) * geo["wavelength_A"] / (4 * math.pi), 0.99)
            geo["distance_m"] = fp.farthest_radius() * sc["detector"]["pixel_size_m"] / \
                math.tan(2 * math.asin(s_))
        else:
            geo["distance_m"] = 1.0
    sc["geometry"] = geo
    sc.setdefault("version", SCENE_VERSION)
    sc.setdefault("beam_on", True)
    bg = dict(sc.get("background") or {})
    bg.setdefault("level", 0.0)
    bg.setdefault("gradient", [0.0, 0.0])
    sc["background"] = bg
    noise = dict(sc.get("noise") or {})
    ccd = sc["detector"]["family"] == "ccd"
    noise.setdefault("dark", 0.0)
    noise.setdefault("read_sigma", 1.5 if ccd else 0.0)
    noise.setdefault("gain", 1.0)
    noise.setdefault("offset", 10.0 if ccd else 0.0)
    sc["noise"] = noise
    gi = sc.get("grazing")
    if gi:
        gi = dict(gi)
        lam = geo["wavelength_A"]
        gi.setdefault("critical_deg", math.degrees(lam * math.sqrt(0.7 * _R_E / math.pi)))
        gi.setdefault("incidence_deg", 2 * gi["critical_deg"])
        gi.setdefault("beta_ratio", 0.02)
        gi.setdefault("below", 1e-3)
        gi.setdefault("yoneda", True)
        sc["grazing"] = gi
    else:
        sc["grazing"] = None
    bs = sc.get("beamstop")
    if bs:
        bs = dict(bs)
        L = max(h, w)
        if bs.get("type") not in ("circular", "linear"):
            raise ConfigurationError(
                f"beamstop type must be 'circular' or 'linear', got {bs.get('type')!r}")
        bs.setdefault("transmission", 1e-4)
        bs.setdefault("angle_deg", 90.0)
        bs.setdefault("edge_px", 1.0)
        if bs["type"] == "circular":
            bs.setdefault("radius_px", 0.04 * L)
            bs.setdefault("holder_width_px", 0.0)
        else:
            bs.setdefault("width_px", 0.04 * L)
        sc["beamstop"] = bs
    else:
        sc["beamstop"] = None
    feats = []
    for f in sc.get("features") or []:
        t = f.get("type")
        if t not in _FEATURE_DEFAULTS:
            raise ConfigurationError(
                f"unknown feature type {t!r}; known: {', '.join(_FEATURE_DEFAULTS)}")
        feats.append({**_FEATURE_DEFAULTS[t], **f})
    sc["features"] = feats
    ctx = None
    for f in feats:
        if f["type"] == "rings" and "q" not in f:
            ctx = ctx or SceneGeometry(sc)
            _complete_rings(f, ctx)
        elif f["type"] == "rings":
            f["q"] = [float(v) for v in np.atleast_1d(f["q"])]
            f["amp"] = [float(v) for v in np.broadcast_to(f["amp"], (len(f["q"]),))]
        if f["type"] == "spots":
            n = len(f["xy"])
            f["amp"] = [float(v) for v in np.broadcast_to(f["amp"], (n,))]
            f["sigma_px"] = [float(v) for v in np.broadcast_to(f["sigma_px"], (n,))]
        if f["type"] == "bragg_rods":
            f["amp"] = [float(v) for v in np.broadcast_to(f["amp"], (int(f["n_orders"]),))]
    return sc


def _two_theta(q, lam):
    return 2 * np.arcsin(np.clip(np.asarray(q) * lam / (4 * np.pi), 0, 1))


def _complete_rings(f: dict, ctx: "SceneGeometry") -> None:
    mat = f.get("material", "LaB6")
    q_max = float(q_from_r(ctx.r_far, ctx.p, ctx.D, ctx.lam))
    if mat in ph.CRYSTALS:
        q, inten, hkl = ph.crystal_reflections(mat, q_max)
        inten = inten * ph.lorentz_polarization(_two_theta(q, ctx.lam))
        f.setdefault("hkl", [list(v) for v in hkl])
    elif mat in ph.LAMELLAR_D or mat == "lamellar":
        d = ph.LAMELLAR_D.get(mat, f.get("d_A", 50.0))
        f["d_A"] = d
        q, inten, n = ph.lamellar_orders(d, q_max, f.get("disorder", 0.05))
        f["orders"] = [int(v) for v in n]
    else:
        raise ConfigurationError(
            f"ring material {mat!r} unknown; use one of {', '.join(ph.CRYSTALS)}, "
            f"{', '.join(ph.LAMELLAR_D)}, 'lamellar' (with d_A) or give 'q' explicitly")
    amp = f["amp"]
    if np.ndim(amp) == 0:
        amp = float(amp) * inten / max(inten.max(), 1e-30) if len(q) else []
    f["q"] = [float(v) for v in q]
    f["amp"] = [float(v) for v in amp]


# ---------------------------------------------------------------------------
# Derived geometry of a completed scene


def _seen_t(ctx: SceneGeometry, x, y, pad: float = 1.0):
    """Seen on the detector and not attenuated by the sample (factor >= 0.5)."""
    ok = ctx.fp.seen(x, y, pad)
    if ctx.gi:
        ok &= ph.grazing_factor(ctx, np.asarray(y, dtype=np.float64) + pad) >= 0.5
    return ok


# ---------------------------------------------------------------------------
# Rendering


_EMPTY2 = np.zeros((0, 1), np.float32)


def render_scene(scene: Mapping, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Render one noisy frame of ``scene``.

    Parameters
    ----------
    scene : dict
        A sampled or hand-written scene (see ``docs/synthetic-data.md``).
    rng : numpy.random.Generator or int, optional
        Source of the counting noise; the frame is a deterministic function
        of the scene and the generator state (or integer seed).

    Returns
    -------
    numpy.ndarray
        ``(height, width)`` in the detector dtype: counts clipped at the
        counter cut-off, module gaps and bad pixels holding the family's
        sentinels (Pilatus ``-1``/``-2``, Eiger the dtype maximum, CCD NaN).
    """
    sc = complete_scene(scene)
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    seed = int(rng.integers(0, 2**63 - 1))
    ctx = SceneGeometry(sc)
    det = sc["detector"]
    info = FAMILIES[det["family"]][det["dtype"]]
    h, w = ctx.h, ctx.w
    out = np.empty((h, w), dtype=np.dtype(det["dtype"]))
    nr = ctx.nr
    p_iso = np.zeros(nr, np.float64)
    mods: list[tuple[np.ndarray, float, float]] = []
    rows_l, cols_l = [], []
    spots = []
    streaks = []
    if sc["beam_on"]:
        for f in sc["features"]:
            t = f["type"]
            if t == "rings":
                if f["style"] == "textured":
                    spots.append(ph.feature_spots(f, ctx))
                    continue
                r, sig, amp = ph.ring_geometry(f, ctx)
                prof = ph.ring_profile(nr, r, sig, amp)
                if float(f["kappa"]) > 0:
                    mods.append((prof, float(f["kappa"]), float(f["orient_deg"])))
                else:
                    p_iso += prof
            elif t in ("halo", "diffuse"):
                prof = ph.radial_profile(f, ctx)
                if float(f["kappa"]) > 0:
                    mods.append((prof, float(f["kappa"]), float(f["orient_deg"])))
                else:
                    p_iso += prof
            elif t in ("gi_diffuse", "specular_rod", "bragg_rods"):
                if ctx.gi:
                    R, C = ph.grazing_terms(f, ctx)
                    rows_l.append(R)
                    cols_l.append(C)
                s = ph.feature_spots(f, ctx)
                if s is not None:
                    spots.append(s)
            elif t == "streaks":
                streaks.append(f)
            else:
                spots.append(ph.feature_spots(f, ctx))
    p_iso = p_iso.astype(np.float32)
    K = len(mods)
    pk = np.zeros((K, nr), np.float32)
    ktab = np.zeros((K, ph.ORIENT_TABLE), np.float32)
    kcs = np.zeros((K, 2), np.float64)
    for k, (prof, kappa, ang) in enumerate(mods):
        pk[k] = prof
        ktab[k] = ph.maier_saupe_table(kappa)
        a2 = 2 * math.radians(ang)
        kcs[k] = (math.cos(a2), math.sin(a2))
    if rows_l:
        rows = np.asarray(rows_l, np.float32)
        cols = np.asarray(cols_l, np.float32)
    else:
        rows = np.zeros((0, h), np.float32)
        cols = np.zeros((0, w), np.float32)
    t_row = ph.grazing_factor_rows(ctx) if (ctx.gi and sc["beam_on"]) else np.zeros(0, np.float32)
    spot_buf = _EMPTY2
    if spots or streaks:
        spot_buf = np.zeros((h, w), np.float32)
        for x, y, a, s in spots:
            if len(x):
                ph.splat_spots(spot_buf, x, y, a, s)
        for f in streaks:
            ph.draw_streaks(spot_buf, ctx.cx, ctx.cy, f["angles_deg"], float(f["amp"]),
                            float(f["r0_px"]), float(f["decay"]), float(f["width_px"]))
    bgd = sc["background"]
    if sc["beam_on"] and ctx.B > 0:
        bg_rad = (ctx.B * ctx.cos3).astype(np.float32)
    else:
        bg_rad = np.zeros(nr, np.float32)
    gx, gy = (float(v) for v in bgd.get("gradient", (0.0, 0.0)))
    bg_col = (1.0 + gx * (np.arange(w) - 0.5 * (w - 1)) / ctx.L).astype(np.float32)
    bg_row = (gy * (0.5 * (h - 1) - np.arange(h)) / ctx.L).astype(np.float32)
    bs = np.zeros(7, np.float64)
    b = sc["beamstop"]
    if b and sc["beam_on"]:
        ang = math.radians(float(b["angle_deg"]))
        if b["type"] == "circular":
            bs[:3] = (1, float(b["radius_px"]), 0.5 * float(b["holder_width_px"]))
        else:
            bs[:3] = (2, 0.0, 0.5 * float(b["width_px"]))
        bs[3:] = (math.cos(ang), -math.sin(ang), float(b["transmission"]),
                  max(float(b["edge_px"]), 0.05))
    noise = sc["noise"]
    ccd = np.array([float(noise["gain"]), float(noise["offset"]), float(noise["read_sigma"]),
                    1.0 if det["family"] == "ccd" else 0.0])
    gap_row = np.zeros(h, np.bool_)
    gap_col = np.zeros(w, np.bool_)
    for a_, z in ctx.gaps[0]:
        gap_row[a_:z] = True
    for a_, z in ctx.gaps[1]:
        gap_col[a_:z] = True
    ph.render_counts(out, center=(ctx.cx, ctx.cy), p_iso=p_iso, pk=pk, ktab=ktab, kcs=kcs,
                     rows=rows, cols=cols, t_row=t_row, bg_rad=bg_rad, bg_row=bg_row,
                     bg_col=bg_col, spots=spot_buf, beamstop=bs, dark=float(noise["dark"]),
                     ccd=ccd, cutoff=float(det["count_cutoff"]), gap_row=gap_row,
                     gap_col=gap_col, mask_value=float(info["mask"]), seed=seed)
    bad = det.get("bad_pixels") or []
    if len(bad):
        bp = np.asarray(bad, dtype=np.intp).reshape(-1, 2)
        ok = (bp[:, 0] >= 0) & (bp[:, 0] < h) & (bp[:, 1] >= 0) & (bp[:, 1] < w)
        bp = bp[ok]
        bp = bp[~gap_row[bp[:, 0]] & ~gap_col[bp[:, 1]]]   # gaps keep the gap value
        out[bp[:, 0], bp[:, 1]] = info["bad"]
    return out


# ---------------------------------------------------------------------------
# Labels


def _smooth_level(sc: dict, ctx: SceneGeometry, r, exclude=None):
    """Expected counts under a feature at radii ``r``: background + diffuse + halos."""
    r = np.asarray(r, dtype=np.float64)
    level = ctx.B * np.cos(np.arctan(r * ctx.p / ctx.D)) ** 3 + ctx.dark
    for f in sc["features"]:
        if f is exclude or f["type"] not in ("diffuse", "halo"):
            continue
        level = level + ph.radial_profile(f, ctx, r)
    return level


class _LabelState:
    def amp(self, peak: float, typical: float | None = None) -> None:
        self.amps.append((float(peak), float(peak if typical is None else typical)))

    def __init__(self):
        self.tags: set[str] = set()
        self.amps: list[tuple[float, float]] = []   # (peak, typical) counts of visible features
        self.sat_area = 0.0
        self.rings: list[tuple[float, float]] = []   # (radius, fwhm px) of visible sharp rings
        # (r, half width, kappa, orient) of visible rings and halos
        self.crossing: list[tuple[float, float, float, float]] = []
        self.gi_seen = False    # grazing-incidence scattering seen above the horizon


_DISC = np.array([(u, v) for u in np.linspace(-1, 1, 9) for v in np.linspace(-1, 1, 9)
                  if u * u + v * v <= 1.0])


def _sat_area_spots(ctx, x, y, a, s, cut, t=1.0):
    """Seen pixels above ``cut`` of Gaussian spots (peak ``a * t``, width ``s`` px)."""
    a = np.broadcast_to(np.asarray(a, float) * t, np.shape(x))
    s = np.broadcast_to(np.asarray(s, float), np.shape(x))
    over = np.flatnonzero(a > cut)
    if over.size == 0:
        return 0.0
    r_sat = s[over] * np.sqrt(2 * np.log(a[over] / cut))
    px = np.asarray(x, float)[over, None] + r_sat[:, None] * _DISC[None, :, 0]
    py = np.asarray(y, float)[over, None] + r_sat[:, None] * _DISC[None, :, 1]
    frac = ctx.fp.seen(px, py, pad=0.0).mean(axis=1)
    return float(np.sum(np.pi * r_sat**2 * frac))


def _label_rings(f, sc, ctx, st, cut):
    r, sig, amp = ph.ring_geometry(f, ctx)
    if len(r) == 0:
        return
    L = ctx.L
    kappa = float(f["kappa"])
    fwhm = 2.3548 * sig
    level = _smooth_level(sc, ctx, np.where(np.isfinite(r), r, 0.0))
    if f["style"] == "textured":
        x, y, a, s, idx = ph.textured_grains(f, ctx, r, sig, amp)
        lv = _smooth_level(sc, ctx, np.hypot(x - ctx.cx, y - ctx.cy))
        vis = ctx.fp.seen(x, y) & (a * ph.grazing_factor(ctx, y) >= _thr("spot", lv, ctx.read))
        st.sat_area += _sat_area_spots(ctx, x, y, a, s, cut, ph.grazing_factor(ctx, y))
        grains = f.get("grains") or [60] * len(r)
        n_vis = np.bincount(idx[vis], minlength=len(r)) if len(idx) else np.zeros(len(r), int)
        any_tex = False
        for k in range(len(r)):
            gs = max(float(f.get("grain_sigma_px") or 0.0), sig[k], 0.6)
            distinct = int(grains[k]) * 2.5 * gs <= 2 * np.pi * r[k]
            if n_vis[k] >= 10 and distinct:
                any_tex = True
                st.rings.append((float(r[k]), float(max(fwhm[k], 2 * gs))))
                st.amp(float(np.max(a[(idx == k) & vis])))
        if any_tex:
            st.tags.add("ring_textured")
        return
    px, py = ring_points(ctx, r)
    wgt = ph.azimuth_weight(kappa, float(f["orient_deg"]), px.shape[1])
    thr = _thr("ext", level, ctx.read)
    expected = amp[:, None] * wgt[None, :] * ph.grazing_factor(ctx, py)
    cov = ctx.fp.seen(px, py) & (expected >= thr[:, None])
    sharp = fwhm <= SHARP_MAX_REL * r
    circ = 2 * np.pi * r
    present = np.zeros(len(r), bool)
    if kappa <= ISO_MAX_KAPPA:
        arc = cov.mean(axis=1) * circ
        present = sharp & (arc >= 0.15 * L)
        if present.any():
            st.tags.add("ring_isotropic")
    else:
        arc = (cov & (wgt >= 0.5)[None, :]).mean(axis=1) * circ
        present = sharp & (arc >= 0.03 * L)
        # arcs: the ring must also vanish over part of the azimuths where it is on the detector
        on = ctx.fp.seen(px, py)
        gaps = (on & ~cov).sum(axis=1) >= GAP_FRACTION * np.maximum(on.sum(axis=1), 1)
        if kappa >= ORIENT_MIN_KAPPA and (present & gaps).any():
            st.tags.add("ring_oriented")
    for k in np.flatnonzero(present):
        st.rings.append((float(r[k]), float(fwhm[k])))
        st.amp(float(amp[k]))
        st.crossing.append((float(r[k]), float(fwhm[k]), kappa, float(f["orient_deg"])))
    for k in np.flatnonzero(present & (amp > cut)):
        n_az = cov.shape[1]
        v = amp[k] * wgt * ph.grazing_factor(ctx, py[k])
        over = cov[k] & (v > cut)
        if over.any():
            width = 2 * sig[k] * np.sqrt(2 * np.log(v[over] / cut))
            st.sat_area += float(np.sum(width) * circ[k] / n_az)
    orders = f.get("orders")
    if orders:
        pres = {int(n) for n, ok in zip(orders, present) if ok}
        if len(pres) >= 3 or {1, 2} <= pres:
            st.tags.add("higher_orders")


def _label_halo(f, sc, ctx, st, cut):
    q0, rel = float(f["q0"]), float(f["fwhm_rel"])
    r0 = float(ctx.r(q0))
    if not math.isfinite(r0) or rel < HALO_MIN_REL:
        return
    amp = float(f["amp"])
    thr = float(_thr("ext", _smooth_level(sc, ctx, r0, exclude=f), ctx.read))
    px, py = ring_points(ctx, [r0])
    px, py = px[0], py[0]
    cov = ctx.fp.seen(px, py) & (amp * ph.grazing_factor(ctx, py) >= thr)
    kappa = float(f["kappa"])
    circ = 2 * np.pi * r0
    if not _halo_flanks_seen(ctx, q0, rel):
        return
    if kappa <= ISO_MAX_KAPPA:
        if cov.mean() * circ >= 0.25 * ctx.L:
            st.tags.add("halo_isotropic")
            st.amp(amp)
            st.crossing.append((r0, 0.5 * rel * r0, kappa, float(f["orient_deg"])))
    elif kappa >= ORIENT_MIN_KAPPA:
        wgt = ph.azimuth_weight(kappa, float(f["orient_deg"]), cov.size)
        lit = ctx.fp.seen(px, py) & (amp * wgt * ph.grazing_factor(ctx, py) >= thr)
        on = ctx.fp.seen(px, py)
        gaps = (on & ~lit).sum() >= GAP_FRACTION * max(on.sum(), 1)
        if (lit & (wgt >= 0.5)).mean() * circ >= 0.05 * ctx.L and gaps:
            st.tags.add("halo_anisotropic")
            st.amp(amp)


def _halo_flanks_seen(ctx, q0: float, rel: float, need: float = 0.1) -> bool:
    """A halo reads as a ring when both its flanks (0.6 FWHM either side) are on the detector."""
    r_in, r_out = ctx.r(q0 * (1 - 0.6 * rel)), ctx.r(q0 * (1 + 0.6 * rel))
    if not (math.isfinite(r_in) and math.isfinite(r_out)):
        return False
    x, y = ring_points(ctx, [r_in, r_out], n=120)
    arc = ctx.fp.on_detector(x, y).mean(axis=1) * 2 * np.pi * np.array([r_in, r_out])
    return bool((arc >= need * ctx.L).all())


def _diffuse_inner_radius(sc, ctx):
    r_lo = ctx.r_near
    bs = sc["beamstop"]
    if bs and bs["type"] == "circular":
        r_lo = max(r_lo, float(bs["radius_px"]) + 1.0)
    if ctx.horizon is not None:
        r_lo = max(r_lo, ctx.cy - ctx.horizon + 1.0)
    return max(r_lo, 2.0)


def _label_diffuse(f, sc, ctx, st, cut):
    r_lo = _diffuse_inner_radius(sc, ctx)
    span = np.linspace(r_lo, r_lo + 0.5 * ctx.L, 64)
    prof = ph.radial_profile(f, ctx, span)
    lvl = ctx.B * np.cos(np.arctan(span * ctx.p / ctx.D)) ** 3 + ctx.dark
    vis = prof >= _thr("ext", lvl, ctx.read)
    if not vis[0] or prof[0] < 3 * _thr("ext", lvl[0], ctx.read):
        return
    n_vis = int(np.argmin(vis)) if not vis.all() else len(vis)
    extent = span[n_vis - 1] - r_lo
    cx_, cy_ = ring_points(ctx, [r_lo + 0.05 * ctx.L], n=90)
    cov = _seen_t(ctx, cx_[0], cy_[0])
    decays = prof[0] >= DIFFUSE_DECAY * float(ph.radial_profile(f, ctx, r_lo + 0.3 * ctx.L))
    if extent >= 0.1 * ctx.L and cov.mean() >= 0.1 and decays:
        st.tags.add("diffuse_low_q")
        st.amp(float(prof[0]), float(ph.radial_profile(f, ctx, r_lo + 0.1 * ctx.L)))
    if prof[0] > cut:
        rr = np.linspace(r_lo, r_lo + 0.5 * ctx.L, 96)
        phi = (np.arange(128) + 0.5) * (2 * np.pi / 128)
        x = ctx.cx + rr[:, None] * np.cos(phi)[None, :]
        y = ctx.cy - rr[:, None] * np.sin(phi)[None, :]
        v = ph.radial_profile(f, ctx, rr)[:, None] * ph.grazing_factor(ctx, y)
        if float(f["kappa"]) > 0:
            v = v * ph.azimuth_weight(float(f["kappa"]), float(f["orient_deg"]), 128)[None, :]
        over = (v > cut) & ctx.fp.seen(x, y, pad=0.0)
        st.sat_area += float(np.sum(over * rr[:, None]) * (rr[1] - rr[0]) * (2 * np.pi / 128))


def _label_spots(f, sc, ctx, st, cut):
    x, y, a, s = ph.feature_spots(f, ctx)
    if len(x) == 0:
        return
    t_y = ph.grazing_factor(ctx, y)
    st.sat_area += _sat_area_spots(ctx, x, y, a, s, cut, t_y)
    lv = _smooth_level(sc, ctx, np.hypot(x - ctx.cx, y - ctx.cy))
    vis_all = ctx.fp.seen(x, y) & (a * t_y >= _thr("spot", lv, ctx.read))
    vis = vis_all & (a * t_y <= cut)
    t = f["type"]
    n = int(vis_all.sum())
    if t == "spots" and n >= 1:
        st.tags.add("peaks_isolated")
    elif t == "lattice" and n >= 6:
        st.tags.add("peaks_lattice")
    elif t == "on_ring" and n >= (3 if int(f["n_fold"]) == 4 else 4):
        st.tags.add("peaks_on_ring")
    else:
        return
    if vis.any():
        st.amp(float(np.max(a[vis])))


def _label_streaks(f, sc, ctx, st, cut):
    r0 = float(f["r0_px"])
    s = np.arange(1.0, ctx.r_far + 1.0, 1.0)
    amp = float(f["amp"]) * np.where(s <= r0, 1.0, (r0 / s) ** float(f["decay"]))
    thr_s = _thr("spot", _smooth_level(sc, ctx, s), ctx.read)
    length = 0.0
    first = None
    for ang in f["angles_deg"]:
        a = math.radians(float(ang))
        for sign in (1.0, -1.0):
            x = ctx.cx + sign * s * math.cos(a)
            y = ctx.cy - sign * s * math.sin(a)
            vis = ctx.fp.seen(x, y) & (amp * ph.grazing_factor(ctx, y) >= thr_s)
            length += float(vis.sum())
            if vis.any():
                i0 = int(np.argmax(vis))
                first = amp[i0] if first is None else max(first, amp[i0])
    if length >= 0.15 * ctx.L:
        st.tags.add("streaks")
        st.amp(float(first))


def _label_gi(f, sc, ctx, st, cut):
    if not ctx.gi:
        return
    t = f["type"]
    hzn = ctx.horizon
    rows = np.arange(ctx.h, dtype=np.float64)
    t_rows = ph.grazing_factor(ctx, rows)
    R, C = ph.grazing_terms(f, ctx)
    lv = ctx.B + ctx.dark
    if t == "gi_diffuse":
        amp = 0.7 * float(f["amp"])
        thr = float(_thr("ext", lv, ctx.read))
        if amp < 2 * thr:
            return
        cols_ok = (amp * C >= thr) & ~ctx.fp.gap_col[: ctx.w]
        if cols_ok.mean() < 0.3:
            return
        st.amp(float(f["amp"]))
        st.gi_seen = True
        gi = ctx.gi
        if gi.get("yoneda", True):
            yy = float(ctx.rows_for_alpha(ctx.alpha_c))
            if 0.03 * ctx.h <= yy <= 0.97 * ctx.h and hzn - yy >= 3.0:
                st.tags.add("yoneda")
        return
    thr = float(_thr("spot", lv, ctx.read))
    if t == "specular_rod":
        col = ctx.cx
        if not (1.0 <= col <= ctx.w - 2.0) or ctx.fp.gap_col[int(round(col))]:
            return
        x = np.full(ctx.h, col)
        n_rows = int((ctx.fp.seen(x, rows) & (R * t_rows >= thr)).sum())
        if n_rows >= 0.15 * ctx.h:
            st.tags.add("specular_rod")
            st.amp(float(f["amp"]))
            st.gi_seen = True
        return
    # bragg rods
    n_ok = 0
    for xpos, a in ph.rod_positions(f, ctx):
        if not (1.0 <= xpos <= ctx.w - 2.0) or ctx.fp.gap_col[int(round(xpos))]:
            continue
        if abs(xpos - ctx.cx) < 5.0:
            continue
        x = np.full(ctx.h, xpos)
        if int((ctx.fp.seen(x, rows) & (a * R * t_rows >= thr)).sum()) >= 0.15 * ctx.h:
            n_ok += 1
    if n_ok >= 2:
        st.tags.add("bragg_rods")
        st.amp(float(max(f["amp"])))
        st.gi_seen = True


def _crosses_horizon(ctx, st) -> bool:
    """Whether a visible ring or halo meets the horizon on the detector."""
    dy = ctx.cy - ctx.horizon
    for r, _, kappa, orient in st.crossing:
        if r <= dy + 1.0:
            continue
        dx = math.sqrt(r * r - dy * dy)
        for x in (ctx.cx - dx, ctx.cx + dx):
            phi = math.atan2(dy, x - ctx.cx)
            wgt = math.exp(kappa * (math.cos(2 * (phi - math.radians(orient))) - 1.0))
            xi = int(round(x))
            if 2 <= x <= ctx.w - 3 and not ctx.fp.gap_col[xi] and wgt >= 0.5:
                return True
    return False


def _label_beamstop(sc, ctx, st, beam_level):
    bs = sc["beamstop"]
    if not bs:
        return
    rim_thr = max(1.5, 2.0 * ctx.read)
    if bs["type"] == "circular":
        R = float(bs["radius_px"])
        g = np.linspace(-1, 1, 9)
        gx, gy = np.meshgrid(g, g)
        inside = gx**2 + gy**2 <= 1
        on = ctx.fp.on_detector(ctx.cx + R * gx[inside], ctx.cy + R * gy[inside])
        if on.mean() < 0.5 or R < 2.0:
            return
        if beam_level(R + 1.5) >= rim_thr:
            st.tags.add("beamstop_circular")
    else:
        a = math.radians(float(bs["angle_deg"]))
        s = np.arange(0.0, ctx.r_far, 1.0)
        x = ctx.cx + s * math.cos(a)
        y = ctx.cy - s * math.sin(a)
        on = ctx.fp.on_detector(x, y)
        if on.sum() >= 0.15 * ctx.L and float(bs["width_px"]) >= 2.0:
            s_on = s[on]
            visible = beam_level(float(np.median(s_on))) >= rim_thr
            # or the rod's shadow cuts a visible ring or halo
            for rk, hw, kappa, orient in st.crossing:
                k = min(int(rk), len(on) - 1)
                wgt = math.exp(kappa * (math.cos(2 * (a - math.radians(orient))) - 1.0))
                if rk > 0.5 * float(bs["width_px"]) and on[k] and wgt >= 0.5:
                    visible = True
            if visible:
                st.tags.add("beamstop_linear")


def scene_labels(scene: Mapping) -> np.ndarray:
    """The 23 tags of a scene, from its parameters alone.

    Returns
    -------
    numpy.ndarray
        ``(23,)`` float32 of 0/1 in :data:`~bluesky_xsml.tags.TAG_NAMES` order.
    """
    return _label_state(complete_scene(scene))[0]


def _label_state(sc: dict) -> tuple[np.ndarray, "_LabelState | None"]:
    ctx = SceneGeometry(sc)
    lab = np.zeros(len(TAG_NAMES), np.float32)
    det = sc["detector"]
    if det["gaps"]["rows"] or det["gaps"]["cols"]:
        lab[_TAG["detector_gaps"]] = 1
    if not sc["beam_on"]:
        lab[_TAG["beam_off"]] = 1
        return lab, None
    noise = sc["noise"]
    cut = float(det["count_cutoff"])
    if det["family"] == "ccd":
        cut = (cut - float(noise["offset"])) / max(float(noise["gain"]), 1e-9)
    st = _LabelState()
    for f in sc["features"]:
        t = f["type"]
        if t == "rings":
            _label_rings(f, sc, ctx, st, cut)
        elif t == "halo":
            _label_halo(f, sc, ctx, st, cut)
        elif t == "diffuse":
            _label_diffuse(f, sc, ctx, st, cut)
        elif t in ("spots", "lattice", "on_ring"):
            _label_spots(f, sc, ctx, st, cut)
        elif t == "direct_beam":
            x, y, a, s = ph.feature_spots(f, ctx)
            st.sat_area += _sat_area_spots(ctx, x, y, a, s, cut)
        elif t == "streaks":
            _label_streaks(f, sc, ctx, st, cut)
        elif t in ("gi_diffuse", "specular_rod", "bragg_rods"):
            _label_gi(f, sc, ctx, st, cut)
            if t == "specular_rod" and ctx.gi and float(f["peak_amp"]) > cut:
                x, y, a, s = ph.feature_spots(f, ctx)
                st.sat_area += _sat_area_spots(ctx, x, y, a, s, cut, ph.grazing_factor(ctx, y))
    # many rings: distinct sharp rings (closer than 3 FWHM merge)
    if st.rings:
        rr = sorted(st.rings)
        n, last = 1, rr[0]
        for r, fw in rr[1:]:
            if r - last[0] > 3 * max(fw, last[1], 1.0):
                n += 1
                last = (r, fw)
        if n >= 5:
            st.tags.add("many_rings")

    def beam_level(r):
        lvl = ctx.B * float(np.cos(np.arctan(r * ctx.p / ctx.D)) ** 3)
        if ctx.horizon is None or ctx.cy - r < ctx.horizon:
            for f in sc["features"]:
                if f["type"] == "diffuse" and float(f["kappa"]) <= ISO_MAX_KAPPA:
                    lvl += float(ph.radial_profile(f, ctx, r))
        return lvl

    _label_beamstop(sc, ctx, st, beam_level)
    if ctx.horizon is not None and 0.04 * ctx.h <= ctx.horizon <= 0.96 * ctx.h:
        if st.gi_seen or "diffuse_low_q" in st.tags or _crosses_horizon(ctx, st):
            st.tags.add("horizon")
    if st.sat_area >= MIN_SAT_AREA:
        st.tags.add("saturation")
    if st.amps:
        peak, typical = np.asarray(st.amps).T
        normal = typical[peak <= cut]
        if "saturation" not in st.tags and peak.max() <= WEAK_MAX_COUNTS:
            st.tags.add("weak_scattering")
        if normal.size and ctx.B >= HIGH_BG_RATIO * float(np.median(normal)):
            st.tags.add("high_background")
    for t in st.tags:
        lab[_TAG[t]] = 1
    return lab, st


# ---------------------------------------------------------------------------
# Sampling


def _want(rng, tags: Mapping[str, bool] | None) -> dict[str, bool]:
    tags = dict(tags or {})
    unknown = set(tags) - set(WANT_P)
    if unknown:
        raise ConfigurationError(f"cannot ask for {sorted(unknown)}; known: {', '.join(WANT_P)}")
    u = rng.random(len(WANT_P))
    want = {k: bool(ui < p) for (k, p), ui in zip(WANT_P.items(), u)}
    if any(tags.get(k) for k in ("horizon", "yoneda", "specular_rod", "bragg_rods")):
        want["grazing"] = True
    want.update(tags)
    if tags.get("beam_off") is None and any(v for k, v in tags.items() if k != "detector_gaps"):
        want["beam_off"] = False
    if want["weak_scattering"]:
        want["high_background"] = want["saturation"] = want["diffuse_low_q"] = False
        want.update({k: v for k, v in tags.items() if k in ("high_background", "saturation",
                                                            "diffuse_low_q")})
    if want["beamstop_circular"] and want["beamstop_linear"]:
        if "beamstop_linear" not in tags or ("beamstop_circular" in tags and rng.random() < 0.5):
            want["beamstop_linear"] = False
        else:
            want["beamstop_circular"] = False
    if not want["grazing"]:
        for k in ("horizon", "yoneda", "specular_rod", "bragg_rods"):
            want[k] = False
    elif "peaks_on_ring" not in tags:
        want["peaks_on_ring"] = False   # the ring would be cut by the horizon
    return want


class _Sampler:
    """State of one scene being sampled."""

    def __init__(self, rng, det: DetectorConfig, size, want):
        self.rng = rng
        self.det = det
        self.want = want
        dtype = det.dtypes[0] if len(det.dtypes) == 1 else (
            det.dtypes[0] if rng.random() < 0.6 else det.dtypes[1])
        self.d = _detector_entry(det.name, size, rng, dtype)
        self.h, self.w = self.d["shape"]
        self.L = max(self.h, self.w)
        self.p = self.d["pixel_size_m"]
        self.sc: dict = {"version": SCENE_VERSION, "detector": self.d}

    # -- geometry --------------------------------------------------------
    def geometry(self):
        rng, h, w, L, want = self.rng, self.h, self.w, self.L, self.want
        lam = rng.uniform(0.6, 1.7)
        self.lam = lam
        D = None
        gi = None
        if want["grazing"]:
            cx = rng.uniform(0.15, 0.85) * w
            if want["horizon"]:
                yh = rng.uniform(0.35, 0.9) * h
            elif want["yoneda"]:
                yh = h - 0.5 + rng.uniform(0.5, 0.06 * h + 1.5)
            else:
                yh = h - 0.5 + rng.uniform(1.0, 0.3 * h + 2.0)
            rho = rng.uniform(0.3, 2.0)
            ac = lam * math.sqrt(rho * _R_E / math.pi)
            if want["yoneda"]:
                off = _u(rng, max(4.0, 0.04 * h), max(6.0, 0.16 * h))
                D = float(np.clip(off * self.p / math.tan(ac), 0.1, 15.0))
            else:
                D = self._distance_from_q(lam, cx, yh + 5)
            ai = float(np.clip(ac * rng.uniform(0.8, 3.0), math.radians(0.03), math.radians(1.0)))
            cy = yh + D * math.tan(ai) / self.p
            gi = {"incidence_deg": math.degrees(ai), "critical_deg": math.degrees(ac),
                  "beta_ratio": _logu(rng, 0.005, 0.05), "below": _logu(rng, 1e-4, 3e-3),
                  "yoneda": bool(want["yoneda"])}
        else:
            mode = rng.random()
            if want["beamstop_circular"] or want["beamstop_linear"]:
                mode *= 0.87
            if mode < 0.55:
                cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
            elif mode < 0.87:
                cx, cy = rng.uniform(0.05, 0.95) * w, rng.uniform(0.05, 0.95) * h
            else:
                cx, cy = rng.uniform(0.0, 1.0) * w, rng.uniform(0.0, 1.0) * h
                off = rng.uniform(0.0, 0.25) * L
                side = int(rng.integers(4))
                if side == 0:
                    cx = -off
                elif side == 1:
                    cx = w - 1 + off
                elif side == 2:
                    cy = -off
                else:
                    cy = h - 1 + off
        self.cx, self.cy = float(cx), float(cy)
        self.gi = gi
        self.D = D
        self.sc["grazing"] = gi

    def _distance_from_q(self, lam, cx, cy):
        fp = Footprint((self.h, self.w), ([], []), (cx, cy))
        r_far = fp.farthest_radius()
        q_far = _logu(self.rng, 0.03, 1.2 if self.want["higher_orders"] else 6.0)
        s = min(q_far * lam / (4 * math.pi), math.sin(math.radians(32.0)))
        tth = 2 * math.asin(s)
        return float(np.clip(r_far * self.p / math.tan(tth), 0.05, 15.0))

    def finish_geometry(self):
        if self.D is None:
            self.D = self._distance_from_q(self.lam, self.cx, self.cy)
        self.sc["geometry"] = {"distance_m": self.D, "wavelength_A": self.lam,
                               "beam_center": [self.cx, self.cy]}

    def set_distance_for(self, q1, r1):
        """Choose the distance (and keep the wavelength) so that ``q1`` lands at ``r1`` px."""
        s = q1 * self.lam / (4 * math.pi)
        tth = 2 * math.asin(min(s, 0.99))
        if tth >= math.radians(65):
            self.lam *= math.sin(math.radians(30)) / s
            tth = math.radians(60)
        self.D = float(np.clip(r1 * self.p / math.tan(tth), 0.05, 15.0))


def _ctx_for(sc: dict) -> SceneGeometry:
    tmp = dict(sc)
    tmp.setdefault("background", {"level": 0.0, "gradient": [0.0, 0.0]})
    tmp.setdefault("noise", {"dark": 0.0, "read_sigma": 0.0, "gain": 1.0, "offset": 0.0})
    tmp.setdefault("beamstop", None)
    tmp.setdefault("features", [])
    tmp.setdefault("grazing", None)
    return SceneGeometry(tmp)


def sample_scene(rng: np.random.Generator, detector=None, size: int | None = 256, *,
                 detectors=None, tags: Mapping[str, bool] | None = None) -> dict:
    """Draw one random scene.

    Parameters
    ----------
    rng : numpy.random.Generator
        All randomness of the scene comes from here.
    detector : str, tuple or DetectorConfig, optional
        Use this detector; otherwise one is drawn from ``detectors``.
    size : int or None
        Longest side of the rendered frame (``None``: native resolution).
    detectors : optional
        Selection to draw from (see :func:`~bluesky_xsml.sim.geometry.resolve_detectors`);
        default: the training set.
    tags : dict of str -> bool, optional
        Force features on or off by tag name (and ``"grazing"``), e.g.
        ``{"ring_isotropic": True, "beam_off": False}``.  Forced features are
        attempted; the returned labels (:func:`scene_labels`) say what is seen.

    Returns
    -------
    dict
        A complete, JSON-serialisable scene.
    """
    if size is not None and (not isinstance(size, (int, np.integer)) or size < 16):
        raise ConfigurationError(f"size must be an int >= 16 or None, got {size!r}")
    pool = resolve_detectors(detector if detector is not None else detectors)
    return _sample(rng, _pick_detector(rng, pool), size, tags)[0]


def _pick_detector(rng, pool) -> DetectorConfig:
    if len(pool) == 1:
        return pool[0]
    wts = np.array([d.weight for d in pool])
    return pool[int(rng.choice(len(pool), p=wts / wts.sum()))]


_SEEN_TAGS = [i for i, t in enumerate(TAG_NAMES) if t not in (
    "beam_off", "detector_gaps", "beamstop_circular", "beamstop_linear", "high_background")]


def _sample(rng, det, size, tags, attempts: int = 4) -> tuple[dict, np.ndarray]:
    """A scene and its labels; beam-on scenes in which nothing would be seen are redrawn."""
    for _ in range(attempts):
        scene = _sample_once(rng, det, size, tags)
        labels = scene_labels(scene)
        if not scene["beam_on"] or labels[_SEEN_TAGS].any():
            break
    return scene, labels


def _sample_once(rng, det, size, tags) -> dict:
    want = _want(rng, tags)
    S = _Sampler(rng, det, size, want)
    d = S.d
    # dead / hot pixels
    n_bad = int(rng.poisson(6e-5 * S.h * S.w))
    d["bad_pixels"] = np.stack([rng.integers(0, S.h, n_bad),
                                rng.integers(0, S.w, n_bad)], 1).tolist()
    ccd = det.family == "ccd"
    read = rng.uniform(0.5, 1.0 if want["weak_scattering"] else 3.0) if ccd else 0.0
    S.sc["noise"] = {"dark": _logu(rng, 1e-4, 1e-2), "read_sigma": read, "gain": 1.0,
                     "offset": rng.uniform(5.0, 60.0) if ccd else 0.0}
    if want["beam_off"]:
        S.geometry()
        S.finish_geometry()
        S.sc.update(beam_on=False, background={"level": 0.0, "gradient": [0.0, 0.0]},
                    beamstop=None, features=[], grazing=None)
        return _jsonable(S.sc)
    _sample_beam_on(S)
    return _jsonable(S.sc)


def _sample_beam_on(S: _Sampler) -> None:
    rng, want, L = S.rng, S.want, S.L
    S.geometry()
    # a calibrant powder anchors the distance
    ring_styles = []
    for tag, style in (("ring_isotropic", "isotropic"), ("ring_oriented", "oriented"),
                       ("ring_textured", "textured")):
        if want[tag]:
            ring_styles.append(style)
    if want["higher_orders"] and not ({"isotropic", "oriented"} & set(ring_styles)):
        ring_styles.append("isotropic" if rng.random() < 0.5 else "oriented")
    if want["many_rings"] and not ring_styles:
        ring_styles.append(("isotropic", "isotropic", "oriented", "textured")[int(rng.integers(4))])
    materials = {}
    lam_style = None
    if want["higher_orders"]:
        cands = [s for s in ring_styles if s in ("isotropic", "oriented")]
        lam_style = cands[int(rng.integers(len(cands)))]
        materials[lam_style] = "AgBH" if (not S.gi and rng.random() < 0.4) else "lamellar"
    many_style = None
    if ring_styles and want["many_rings"]:
        many_style = lam_style if lam_style and rng.random() < 0.35 else \
            ring_styles[int(rng.integers(len(ring_styles)))]
    for s in ring_styles:
        if s not in materials:
            if not S.gi and S.D is None and rng.random() < 0.5:
                materials[s] = ("LaB6", "CeO2", "Si")[int(rng.integers(3))]
            else:
                materials[s] = "powder"
    # beamstop (needs the beam on the detector)
    on_det = bool(Footprint((S.h, S.w), ([], []), (S.cx, S.cy)).on_detector(
        S.cx, S.cy, margin=0.02 * L))
    bs = None
    if want["beamstop_circular"] and on_det:
        R = max(4.0, rng.uniform(0.025, 0.07) * L)
        bs = {"type": "circular", "radius_px": R, "transmission": _logu(rng, 1e-5, 1e-2),
              "edge_px": rng.uniform(0.5, 1.5), "angle_deg": _bs_angle(rng),
              "holder_width_px": 2 * R * rng.uniform(0.2, 0.4) if rng.random() < 0.5 else 0.0}
    elif want["beamstop_linear"] and on_det:
        bs = {"type": "linear", "width_px": max(4.0, rng.uniform(0.025, 0.06) * L),
              "transmission": _logu(rng, 1e-5, 1e-2), "edge_px": rng.uniform(0.5, 1.5),
              "angle_deg": _bs_angle(rng)}
    S.sc["beamstop"] = bs
    # calibrant anchor
    anchor = None
    if S.D is None:
        for s, m in materials.items():
            if m in ("LaB6", "CeO2", "Si", "AgBH"):
                anchor = (s, m)
                break
    fp0 = Footprint((S.h, S.w), ([], []), (S.cx, S.cy))
    r_far = fp0.farthest_radius()
    r_near = fp0.nearest_radius()
    r_lo = max(r_near, (bs["radius_px"] + 3) if bs and bs["type"] == "circular" else 0.0,
               0.06 * L, 6.0)
    if anchor:
        s, m = anchor
        q1 = 2 * math.pi / ph.LAMELLAR_D["AgBH"] if m == "AgBH" else \
            float(ph.crystal_reflections(m, 10.0)[0][0])
        if s == many_style:
            top = (0.3 if m != "AgBH" else 0.12) * r_far
        elif m == "AgBH":
            top = 0.9 * r_far / 3.3
        else:
            top = 0.55 * r_far
        r1 = _u(rng, max(r_lo, 30.0), max(r_lo + 1, 30.0, top))
        S.set_distance_for(q1, r1)
    S.finish_geometry()
    S.sc.update(beam_on=True, background={"level": 0.0, "gradient": [0.0, 0.0]}, features=[])
    ctx = _ctx_for(S.sc)
    S.ctx = ctx
    r_hi = 0.95 * ctx.r_far
    if ctx.horizon is not None:
        r_lo = max(r_lo, ctx.cy - ctx.horizon + 3.0)
    S.r_lo, S.r_hi = r_lo, r_hi
    # intensity regime
    mode = "weak" if want["weak_scattering"] else ("high" if want["high_background"] else "normal")
    S.mode = mode
    cut = float(S.d["count_cutoff"])
    if ccd := (S.det.family == "ccd"):
        cut -= S.sc["noise"]["offset"]
    S.cut = cut
    read = S.sc["noise"]["read_sigma"]
    S.read = read
    rim = max(1.5, 2.0 * read) * 1.4
    need_rim = bs is not None
    if mode == "weak":
        if need_rim:
            B = rng.uniform(rim, max(1.15 * rim, 2.6))
        else:
            B = 0.0 if (not ccd and rng.random() < 0.3) else _logu(rng, 0.02, 2.0)
    elif mode == "high":
        B = _logu(rng, 200.0, max(300.0, min(2e4, 0.02 * cut)))
    else:
        B = 0.0 if (not ccd and not need_rim and rng.random() < 0.15) else _logu(rng, 0.01, 30.0)
        if need_rim:
            B = max(B, rim)
    if need_rim:
        cos3_far = math.cos(math.atan(ctx.r_far * ctx.p / ctx.D)) ** 3
        B = max(B, rim / max(cos3_far, 0.2))
    S.B = B
    grad = [rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4)] if rng.random() < 0.5 else [0.0, 0.0]
    S.sc["background"] = {"level": B, "gradient": grad}
    ctx.B = B
    ctx.read = read
    ctx.dark = S.sc["noise"]["dark"]
    n_planned = sum(bool(want[k]) for k in (
        "halo_isotropic", "halo_anisotropic", "diffuse_low_q", "peaks_isolated", "peaks_lattice",
        "peaks_on_ring", "streaks", "specular_rod", "bragg_rods")) + len(ring_styles) + \
        (1 if (want["horizon"] or want["yoneda"]) else 0)
    S.cap = 0.5 * cut / (n_planned + 2) / 1.5
    S.E = _logu(rng, 200.0, max(250.0, S.cap)) if mode == "normal" else None
    feats = S.sc["features"]
    # smooth features first (they set the level under sharp ones)
    if want["diffuse_low_q"]:
        _add_diffuse(S, feats)
    for tag, kappa in (("halo_isotropic", 0.0), ("halo_anisotropic", 1.0)):
        if want[tag]:
            _add_halo(S, feats, anisotropic=kappa > 0)
    if S.gi and (want["horizon"] or want["yoneda"]):
        _add_gi_diffuse(S, feats)
    S.ring_budget = 10**6 if many_style else 4
    order = sorted(ring_styles, key=lambda s: (s != many_style, s != lam_style))
    for k, style in enumerate(order):
        S.rings_left = len(order) - k - 1
        _add_rings(S, feats, style, materials[style], many=(style == many_style),
                   lamellar=(style == lam_style))
    if want["peaks_isolated"]:
        _add_isolated(S, feats)
    if want["peaks_lattice"]:
        _add_lattice(S, feats)
    if want["peaks_on_ring"]:
        _add_on_ring(S, feats)
    if S.gi and want["specular_rod"]:
        _add_specular(S, feats)
    if S.gi and want["bragg_rods"]:
        _add_rods(S, feats)
    if want["streaks"]:
        _add_streaks(S, feats)
    if not feats:
        _add_halo(S, feats, anisotropic=False, force=True)
    if mode == "normal":
        _ensure_bright(S, feats)
    total = sum(_feature_peak(f, ctx, S.sc) for f in feats) + 1.5 * B + ctx.dark
    if S.gi:
        total *= float(ph.grazing_factor_rows(ctx).max())
    if total > 0.5 * cut:
        for f in feats:
            _scale_feature(f, 0.5 * cut / total)
        total = 0.5 * cut
    if S.gi:
        # "strongly attenuated": below the horizon nothing reaches 1 count
        S.gi["below"] = float(min(S.gi["below"], 1.0 / max(total, 1.0)))
    if want["saturation"]:
        before = [dict(f, **{k: list(v) for k, v in f.items() if isinstance(v, list)})
                  for f in feats]
        _add_saturation(S, feats)
        # keep it only if it clips a clear region (no borderline partial clipping)
        _, st = _label_state(complete_scene(S.sc))
        if st is None or st.sat_area < 12.0:
            feats[:] = before


def _bs_angle(rng):
    if rng.random() < 0.7:
        return float(90.0 * int(rng.integers(4)) + rng.uniform(-3, 3))
    return float(rng.uniform(0, 360))


def _level(S, r, exclude=None):
    sc = {**S.sc, "features": S.sc["features"]}
    return _smooth_level(sc, S.ctx, r, exclude)


def _pick_amp(S, thr, hi_extra: float = 1.0):
    """Amplitude for a feature whose visibility threshold is ``thr`` (None if impossible)."""
    rng = S.rng
    lo = 2.0 * float(thr)
    if S.mode == "weak":
        hi = 40.0
        lo = max(lo, 5.0 * S.B)
        return _logu(rng, lo, hi) if lo <= hi else None
    if S.mode == "high":
        hi = HIGH_MODE_MAX * S.B
        return _logu(rng, lo, hi) if lo <= hi else None
    lo = max(lo, 5.0 * S.B)
    hi = S.cap * hi_extra
    if lo > hi:
        return None
    return float(np.clip(S.E * 10 ** rng.uniform(-1.3, 0.0), lo, hi))


def _add_diffuse(S, feats):
    rng, ctx, L = S.rng, S.ctx, S.L
    r_in = _diffuse_inner_radius({**S.sc}, ctx)
    thr = float(_thr("ext", S.B + ctx.dark, S.read))
    for _ in range(6):
        model = ("spheres", "guinier_porod", "debye_bueche")[int(rng.integers(3))]
        r_knee = _u(rng, max(0.3 * r_in, 2.0), r_in + 0.1 * L)
        qk = float(ctx.q(r_knee))
        f = {"type": "diffuse", "model": model, "kappa": 0.0, "orient_deg": 0.0}
        if model == "spheres":
            f.update(radius_A=max(2.0 / qk, 5.0), polydispersity=rng.uniform(0.25, 0.4))
        elif model == "guinier_porod":
            f.update(rg_A=max(1.7 / qk, 5.0), porod_exp=rng.uniform(3.0, 4.0))
        else:
            f.update(xi_A=max(1.0 / qk, 5.0))
        if rng.random() < 0.3:
            f.update(kappa=rng.uniform(0.15, 0.3), orient_deg=rng.uniform(0, 180))
        f["i0"] = 1.0
        s0, s1, s2, s3 = ph.radial_profile(f, ctx, [r_in, r_in + 0.1 * L, r_in + 0.15 * L,
                                                  r_in + 0.3 * L])
        if s0 <= 0 or s2 <= 0 or s0 < 10.0 * s3:
            continue
        # strong at the inner edge (>= 6 thr), visible over >= 0.15 L (>= 2 thr there)
        lo = max(6.0 * thr, 2.0 * thr * s0 / s2)
        if S.mode == "high":
            hi = HIGH_MODE_MAX * S.B * s0 / s1
        else:
            hi = 4.0 * S.cap
            lo = max(lo, 5.0 * S.B * s0 / s1)
        if lo > hi:
            continue
        if S.mode == "high":
            a0 = _logu(rng, lo, hi)
        else:
            a0 = float(np.clip(S.E * 10 ** rng.uniform(-0.5, 0.6), lo, hi))
        f["i0"] = a0 / s0
        feats.append(f)
        return


def _add_halo(S, feats, anisotropic, force=False):
    rng, ctx = S.rng, S.ctx
    for _ in range(8):
        r0 = _u(rng, max(S.r_lo, 0.12 * S.L), max(S.r_lo + 1, 0.7 * S.r_hi))
        q0 = float(ctx.q(r0))
        # correlation peak (SAXS) or amorphous halo (WAXS, d ~ 1.8-8 A)
        if not (0.004 <= q0 <= 0.5 or 0.8 <= q0 <= 3.5):
            continue
        f = {"type": "halo", "q0": q0, "fwhm_rel": rng.uniform(0.15, 0.45), "kappa": 0.0,
             "orient_deg": rng.uniform(0, 180)}
        if anisotropic:
            f["kappa"] = rng.uniform(1.0, 5.0)
        px, py = ring_points(ctx, [r0])
        cov = _seen_t(ctx, px[0], py[0])
        if not _halo_flanks_seen(ctx, q0, f["fwhm_rel"], need=0.15):
            continue
        if anisotropic:
            strong = ph.azimuth_weight(f["kappa"], f["orient_deg"], cov.size) >= 0.5
            if (cov & strong).mean() * 2 * np.pi * r0 < 0.08 * S.L:
                continue
        elif cov.mean() * 2 * np.pi * r0 < 0.35 * S.L:
            continue
        thr = float(_thr("ext", _level(S, r0), S.read))
        amp = _pick_amp(S, thr)
        if amp is None and force:
            amp = max(2.0 * thr, 5.0 * S.B)
        if amp is None:
            return
        f["amp"] = amp
        if anisotropic:
            f["kappa"] = _gap_kappa(f["kappa"], [amp], [thr])
        feats.append(f)
        return


def _add_gi_diffuse(S, feats):
    rng, ctx = S.rng, S.ctx
    hw_px = rng.uniform(0.2, 0.6) * S.w
    f = {"type": "gi_diffuse", "qy_hwhm": float(ctx.q(hw_px)),
         "decay_deg": math.degrees(max(ctx.alpha_c * rng.uniform(1.0, 4.0),
                                       math.atan(rng.uniform(0.1, 0.4) * S.h * ctx.p / ctx.D)))}
    thr = float(_thr("ext", S.B + ctx.dark, S.read))
    # visible across >= 40 % of the width: amp * C >= thr at |x - cx| = 0.2 w
    need = thr * (1 + (0.2 * S.w / hw_px) ** 2) / 0.7
    amp = _pick_amp(S, max(need, 2 * thr / 0.7) / 2.0 * 1.2)
    if amp is None:
        return
    f["amp"] = amp
    feats.append(f)


def _ring_candidates(S, material, lamellar_many):
    """q (1/A) and relative intensities of a material's rings within the detector."""
    ctx, rng = S.ctx, S.rng
    q_lo, q_hi = float(ctx.q(max(S.r_lo, 30.0))), float(ctx.q(S.r_hi))
    if material in ph.CRYSTALS:
        q, inten, hkl = ph.crystal_reflections(material, q_hi)
        inten = inten * ph.lorentz_polarization(_two_theta(q, ctx.lam))
        return q, inten, {"hkl": [list(v) for v in hkl]}
    if material == "AgBH":
        q, inten, n = ph.lamellar_orders(ph.LAMELLAR_D["AgBH"], q_hi, rng.uniform(0.0, 0.08))
        return q, inten, {"orders": [int(v) for v in n], "d_A": ph.LAMELLAR_D["AgBH"]}
    if material == "lamellar":
        n_want = int(rng.integers(6, 10)) if lamellar_many else int(rng.integers(3, 5))
        r_top = min(S.r_hi / (n_want + 0.3), float(ctx.r(2 * math.pi / 15.0)))  # d >= 15 A
        if r_top < max(S.r_lo, 30.0):
            return np.zeros(0), np.zeros(0), {}
        r1 = _u(rng, max(S.r_lo, 30.0), r_top)
        q1 = float(ctx.q(r1))
        d = 2 * math.pi / q1
        q, inten, n = ph.lamellar_orders(d, q_hi, rng.uniform(0.0, 0.1))
        return q, inten, {"orders": [int(v) for v in n], "d_A": d}
    # generic powder: a random lattice scaled so its first ring lands on the detector
    kind = ("cubic_P", "cubic_I", "cubic_F", "tetragonal", "hexagonal")[int(rng.integers(5))]
    c_ratio = rng.uniform(0.6, 1.8)
    q0, _ = ph.lattice_reflections(kind, 1.0, c_ratio, 40.0, np.random.default_rng(0))
    span = q_hi / max(q_lo, 1e-9)
    first = rng.uniform(q_lo, q_lo * max(1.0001, min(span, 2.5) ** 0.5))
    a = float(q0[0] / first)
    q, inten = ph.lattice_reflections(kind, a, c_ratio * a, q_hi, rng)
    return q, inten, {"lattice": kind, "a_A": a, "c_A": c_ratio * a}


def _add_rings(S, feats, style, material, many, lamellar):
    rng, ctx, L = S.rng, S.ctx, S.L
    q, inten, extra = _ring_candidates(S, material, many)
    if len(q) == 0:
        return
    r = ctx.r(q)
    fwhm_rel = _logu(rng, 0.002, 0.012)
    f = {"type": "rings", "material": material, "style": style, "fwhm_rel": fwhm_rel,
         "kappa": 0.0, "orient_deg": rng.uniform(0, 180), **extra}
    sel = np.isfinite(r) & (r >= max(S.r_lo, 30.0)) & (r <= S.r_hi)
    tmp = {**f, "q": q, "amp": np.ones_like(q)}
    rr, sig, _ = ph.ring_geometry(tmp, ctx)
    sel &= 2.3548 * sig <= 0.035 * rr
    if style == "oriented":
        r_min = float(rr[sel].min()) if sel.any() else 50.0
        fw_arc = min(math.radians(60), max(0.06 * L / r_min, 6 * 2.3548 * 0.5 / r_min,
                                           math.radians(rng.uniform(8, 40))))
        # FWHM of exp(k (cos 2x - 1)) = 2x with cos 2x = 1 - ln2 / k
        f["kappa"] = float(max(1.2, math.log(2) / (1 - math.cos(fw_arc))))
    if not sel.any():
        return
    cov = _seen_t(ctx, *ring_points(ctx, rr))
    if style == "oriented":
        strong = ph.azimuth_weight(f["kappa"], f["orient_deg"], cov.shape[1]) >= 0.5
        arc = (cov & strong[None, :]).mean(axis=1) * 2 * np.pi * rr
        sel &= arc >= 0.05 * L
    else:
        arc = cov.mean(axis=1) * 2 * np.pi * rr
        sel &= arc >= 0.2 * L
    gs = float(max(0.7, float(np.nanmax(np.where(sel, sig, np.nan))) * rng.uniform(1.0, 1.5))) \
        if sel.any() else 0.7
    if style == "textured":
        circ = 2 * np.pi * rr
        cov_frac = np.maximum(arc / np.maximum(circ, 1e-9), 1e-3)
        n_grains = np.maximum(np.round(rng.uniform(0.12, 0.4) * circ / (2.5 * gs)),
                              np.ceil(16.0 / cov_frac))
        sel &= (n_grains <= 500) & (n_grains * 2.5 * gs <= circ)
    idx = np.flatnonzero(sel)
    if idx.size == 0:
        return
    if lamellar and "orders" in extra:
        idx = idx[np.argsort(np.asarray(extra["orders"])[idx])]
    level = _level(S, rr)
    kind = "spot" if style == "textured" else "ext"
    thr = _thr(kind, level, S.read) / (0.7 if style == "textured" else 1.0)
    # how many rings to keep: >= 6 for many_rings, else within the frame's ring budget
    first_order = int(extra["orders"][idx[0]]) if (lamellar and "orders" in extra) else 1
    if many and idx.size >= 6:
        n_min, n_max = 6, int(rng.integers(6, 13))
        cand = idx[: n_max + 4]
    else:
        n_min = (2 if first_order == 1 else 3) if lamellar else 1
        n_max = int(rng.integers(2, 4)) if lamellar else int(rng.integers(1, 5))
        n_max = max(min(n_max, S.ring_budget - S.rings_left), 0)
        if n_max < n_min:
            return
        cand = idx[: n_max + 1]
    if cand.size < n_min:
        return
    gamma = rng.uniform(0.3, 0.8)
    rel = (inten / inten[cand].max()) ** gamma
    need = thr[cand] / rel[cand]
    # lamellar orders must be consecutive from the first visible one
    base = need[:n_min].max() if lamellar else np.sort(need)[n_min - 1]
    peak = _pick_amp(S, float(base))
    if peak is None:
        return
    amp = peak * rel
    kept = cand[amp[cand] >= 2.0 * thr[cand]][:n_max]
    if kept.size < n_min:
        return
    if lamellar and "orders" in extra:
        orders = set(np.asarray(extra["orders"])[kept].tolist())
        if not ({1, 2} <= orders or len(orders) >= 3):
            return
    kept = np.sort(kept)
    if style == "oriented":
        # narrow enough that the ring vanishes between the arcs (clear on a log scale)
        f["kappa"] = _gap_kappa(f["kappa"], amp[kept], thr[kept])
    S.ring_budget -= int(kept.size)
    f["q"] = [float(v) for v in q[kept]]
    f["amp"] = [float(v) for v in amp[kept]]
    if "hkl" in extra:
        f["hkl"] = [extra["hkl"][i] for i in kept]
    if "orders" in extra:
        f["orders"] = [int(extra["orders"][i]) for i in kept]
    if style == "textured":
        f["grains"] = [int(v) for v in n_grains[kept]]
        f["grain_sigma_px"] = gs
        f["seed"] = int(rng.integers(2**31))
    feats.append(f)


def _gap_kappa(kappa: float, amp, thr) -> float:
    """Smallest concentration >= ``kappa`` leaving ``amp * exp(-2 kappa) <= thr / 2``."""
    need = 0.5 * np.log(np.maximum(2.0 * np.asarray(amp, float) / np.asarray(thr, float), 1.0))
    return float(max(kappa, float(np.max(need)) if np.size(need) else kappa))


def _add_isolated(S, feats):
    rng, ctx = S.rng, S.ctx
    n = int(rng.integers(1, 6))
    xy, amps, sigs, radii = [], [], [], []
    ring_r = _existing_ring_radii(S, feats)
    for _ in range(n * 8):
        if len(xy) >= n:
            break
        x, y = rng.uniform(2, S.w - 3), rng.uniform(2, S.h - 3)
        r = math.hypot(x - ctx.cx, y - ctx.cy)
        if r < S.r_lo or not _seen_t(ctx, x, y, pad=3.0):
            continue
        if any(abs(r - q) < 5 for q in radii + ring_r):
            continue
        if any(math.hypot(x - a, y - b) < 12 for a, b in xy):
            continue
        thr = float(_thr("spot", _level(S, r), S.read))
        a = _pick_amp(S, thr)
        if a is None:
            continue
        xy.append([x, y])
        amps.append(a)
        sigs.append(rng.uniform(0.7, 1.8))
        radii.append(r)
    if xy:
        feats.append({"type": "spots", "kind": "isolated", "xy": xy, "amp": amps, "sigma_px": sigs})


def _existing_ring_radii(S, feats):
    out = []
    for f in feats:
        if f["type"] == "rings":
            out += [float(v) for v in S.ctx.r(np.asarray(f["q"]))]
        elif f["type"] == "on_ring":
            out.append(float(S.ctx.r(f["q"])))
    return out


def _add_lattice(S, feats):
    rng, ctx, L = S.rng, S.ctx, S.L
    sigma = rng.uniform(0.7, 1.6)
    kind = rng.random()
    a_px = _u(rng, max(9.0, 7 * sigma, 0.05 * L), max(10.0, 0.16 * L))
    if kind < 0.4:      # hexagonal
        gamma, b_rel = math.radians(60.0), 1.0
    elif kind < 0.7:    # square / rectangular
        gamma, b_rel = math.radians(90.0), rng.choice([1.0, rng.uniform(0.6, 1.5)])
    else:               # oblique
        gamma, b_rel = math.radians(rng.uniform(65, 115)), rng.uniform(0.7, 1.4)
    th = rng.uniform(0, 2 * np.pi)
    if S.gi:
        th = 0.0 if rng.random() < 0.7 else th
    qa = float(ctx.q(a_px))
    qb = float(ctx.q(a_px * b_rel))
    f = {"type": "lattice", "a_star": [qa * math.cos(th), qa * math.sin(th)],
         "b_star": [qb * math.cos(th + gamma), qb * math.sin(th + gamma)],
         "sigma_px": sigma, "seed": int(rng.integers(2**31)),
         "envelope_q": float(ctx.q(rng.uniform(0.3, 0.8) * ctx.r_far))}
    cell = a_px * min(1.0, b_rel) * math.sin(gamma)
    f["hk_max"] = int(min(14, math.ceil(ctx.r_far / cell) + 1))
    thr = float(_thr("spot", _level(S, 0.3 * L), S.read))
    amp = _pick_amp(S, thr / 0.5)
    if amp is None:
        amp = _pick_amp(S, thr / 0.7)
        if amp is None:
            return
    f["amp"] = amp
    # spots below 2x threshold are not drawn: with the smooth envelope and mild
    # structure factors the drawn spots fill a disc of the lattice
    f["min_amp"] = 2.0 * thr
    x, y, a, s = ph.lattice_spots(f, ctx)
    lv = _level(S, np.hypot(x - ctx.cx, y - ctx.cy))
    if int((_seen_t(ctx, x, y) & (a >= 2.0 * _thr("spot", lv, S.read))).sum()) < 9:
        return
    feats.append(f)


def _add_on_ring(S, feats):
    rng, ctx, L = S.rng, S.ctx, S.L
    n = 4 if rng.random() < 0.5 else 6
    sigma = rng.uniform(0.8, 1.8)
    r_min = max(S.r_lo, 0.08 * L, 8 * sigma * n / (2 * np.pi))
    for _ in range(20):
        r0 = _u(rng, r_min, 0.8 * S.r_hi)
        phi0 = rng.uniform(0, 360)
        phis = np.radians(phi0) + 2 * np.pi * np.arange(n) / n
        x = ctx.cx + r0 * np.cos(phis)
        y = ctx.cy - r0 * np.sin(phis)
        if _seen_t(ctx, x, y, pad=2.0).sum() < (4 if n == 4 else 5):
            continue
        thr = float(_thr("spot", _level(S, r0), S.read))
        amp = _pick_amp(S, thr / 0.9)
        if amp is None:
            return
        feats.append({"type": "on_ring", "q": float(ctx.q(r0)), "n_fold": n, "orient_deg": phi0,
                      "amp": amp, "sigma_px": sigma, "seed": int(rng.integers(2**31))})
        return


def _add_specular(S, feats):
    rng, ctx = S.rng, S.ctx
    if not (3 <= ctx.cx <= S.w - 4) or ctx.fp.gap_col[int(round(ctx.cx))]:
        return
    rows_decay = rng.uniform(0.25, 0.8) * S.h
    f = {"type": "specular_rod", "width_px": rng.uniform(0.6, 1.3),
         "decay_deg": math.degrees(math.atan(rows_decay * ctx.p / ctx.D)), "peak_amp": 0.0}
    thr = float(_thr("spot", S.B + ctx.dark, S.read))
    amp = _pick_amp(S, thr * 1.3)
    if amp is None:
        return
    f["amp"] = amp
    if rng.random() < 0.5:
        f["peak_amp"] = min(amp * rng.uniform(2, 8), S.cap * 1.4) if S.mode == "normal" else amp
    feats.append(f)


def _add_rods(S, feats):
    rng, ctx = S.rng, S.ctx
    n = int(rng.integers(1, 4))
    dx1 = _u(rng, max(8.0, 0.06 * S.w), max(9.0, 0.4 * S.w / n))
    rows_decay = rng.uniform(0.3, 1.0) * S.h
    thr = float(_thr("spot", S.B + ctx.dark, S.read))
    a1 = _pick_amp(S, thr * 1.3)
    if a1 is None:
        return
    amps = [max(a1 * rng.uniform(0.5, 1.0) ** k, 2 * thr * 1.3) for k in range(n)]
    if S.mode == "high":
        amps = [min(a, HIGH_MODE_MAX * S.B) for a in amps]
    f = {"type": "bragg_rods", "qy": float(ctx.q(dx1)), "n_orders": n, "amp": amps,
         "decay_deg": math.degrees(math.atan(rows_decay * ctx.p / ctx.D)),
         "width_px": rng.uniform(0.6, 1.4)}
    feats.append(f)


def _add_streaks(S, feats):
    rng, ctx, L = S.rng, S.ctx, S.L
    n = int(rng.integers(1, 4))
    angs = []
    for _ in range(n):
        if rng.random() < 0.6:
            a = 90.0 * int(rng.integers(2)) + rng.uniform(-2, 2)
        else:
            a = rng.uniform(0, 180)
        if S.gi and abs(((a % 180) - 90)) < 25:
            a += 45.0
        a = float(a % 180)
        if all(min(abs(a - b), 180 - abs(a - b)) >= 20.0 for b in angs):
            angs.append(a)
    bs = S.sc["beamstop"]
    r0 = max(3.0, (bs["radius_px"] if bs and bs["type"] == "circular" else 0.0) + 1.0,
             ctx.r_near + 1.0)
    far = r0 + 0.2 * L
    thr = float(_thr("spot", _level(S, far), S.read))
    amp = None
    for p in (rng.uniform(0.3, 1.0), 0.25, 0.1):
        need = 2.0 * thr * (far / r0) ** p
        amp = _pick_amp(S, need / 2.0, hi_extra=3.0)
        if amp is not None:
            break
    if amp is None:
        return
    feats.append({"type": "streaks", "angles_deg": angs, "amp": amp, "r0_px": r0, "decay": p,
                  "width_px": rng.uniform(0.5, 0.9)})


def _feature_peak(f, ctx, sc):
    """Upper bound of the expected counts a feature adds to any pixel."""
    t = f["type"]
    if t == "rings":
        return max(f["amp"]) * (1.5 if f["style"] == "textured" else 1.0)
    if t in ("halo", "gi_diffuse", "on_ring", "lattice", "streaks", "direct_beam"):
        return float(f["amp"]) * (1.1 if t == "on_ring" else 1.0)
    if t == "diffuse":
        peak = float(ph.radial_profile(f, ctx, _diffuse_inner_radius(sc, ctx)))
        bs = sc.get("beamstop")
        if bs:
            peak = max(peak, float(f["i0"]) * float(bs["transmission"]))
        return peak
    if t == "spots":
        return max(f["amp"])
    if t == "specular_rod":
        return max(float(f["amp"]), float(f["peak_amp"]))
    if t == "bragg_rods":
        return max(f["amp"])
    return 0.0


def _scale_feature(f, k):
    for key in ("amp", "i0", "peak_amp", "min_amp"):
        if key in f:
            v = f[key]
            f[key] = [x * k for x in v] if isinstance(v, list) else v * k


def _ensure_bright(S, feats):
    """Normal regime: the brightest feature reaches at least 200 counts."""
    peaks = [(_feature_peak(f, S.ctx, S.sc), i) for i, f in enumerate(feats)]
    if not peaks:
        return
    best, i = max(peaks)
    if best < 200.0 and best > 0:
        k = min(200.0 / best * S.rng.uniform(1.0, 3.0), S.cap * 1.4 / best)
        if k > 1:
            _scale_feature(feats[i], k)


def _add_saturation(S, feats):
    rng, ctx, cut = S.rng, S.ctx, S.cut
    opts = []
    bs = S.sc["beamstop"]
    if not bs and not S.gi and ctx.fp.on_detector(ctx.cx, ctx.cy, margin=5.0):
        opts.append("direct")
    for i, f in enumerate(feats):
        if f["type"] == "rings" and f["style"] != "textured":
            opts.append(("ring", i))
        elif f["type"] in ("spots", "lattice", "on_ring"):
            opts.append(("spot", i))
        elif f["type"] == "specular_rod":
            opts.append(("spec", i))
        elif f["type"] == "diffuse":
            opts.append(("diffuse", i))
    if not opts:
        return
    o = opts[int(rng.integers(len(opts)))]
    area = max(12.0, 3e-4 * S.h * S.w)
    if o == "direct":
        s = rng.uniform(1.5, 3.0)
        ratio = math.exp(max(area / (2 * np.pi * s * s), math.log(5.0))) * rng.uniform(1, 20)
        feats.append({"type": "direct_beam", "amp": cut * ratio, "sigma_px": s})
        return
    kind, i = o
    f = feats[i]
    if kind == "diffuse":
        r_in = _diffuse_inner_radius(S.sc, ctx)
        # saturate an annulus of width ~area / (2 pi r_in) outside the inner edge
        width = max(3.0, area / (2 * np.pi * max(r_in, 3.0)) * 3.0)
        s0, s1 = ph.radial_profile(f, ctx, [r_in, r_in + width])
        if s1 <= 0:
            return
        f["i0"] = float(f["i0"]) * cut * _logu(rng, 1.2, 5.0) / s1
    elif kind == "ring":
        r, sig, amp = ph.ring_geometry(f, ctx)
        k = int(np.argmax(amp))
        ratio = _logu(rng, 3.0, 30.0)
        old = f["amp"][k]
        f["amp"][k] = cut * ratio
        if float(f["kappa"]) > 0:
            f["kappa"] = float(f["kappa"]) + 0.5 * math.log(f["amp"][k] / old)
    elif kind == "spec":
        s = max(float(f["width_px"]), 1.0)
        ratio = math.exp(max(area / (2 * np.pi * s * s), math.log(5.0))) * rng.uniform(1, 10)
        f["peak_amp"] = cut * min(ratio, 1e4)
    else:
        if f["type"] == "spots":
            j = int(rng.integers(len(f["amp"])))
            f["sigma_px"][j] = max(f["sigma_px"][j], 1.4)
            s = f["sigma_px"][j]
            ratio = math.exp(max(area / (2 * np.pi * s * s), math.log(5.0))) * rng.uniform(1, 10)
            f["amp"][j] = cut * min(ratio, 1e4)
        else:
            f["sigma_px"] = max(float(f["sigma_px"]), 1.4)
            s = f["sigma_px"]
            ratio = math.exp(max(area / (6 * np.pi * s * s), math.log(5.0))) * rng.uniform(1, 10)
            k = cut * min(ratio, 1e4) / float(f["amp"])
            f["amp"] = float(f["amp"]) * k
            if f["type"] == "lattice":
                f["min_amp"] = float(f["min_amp"])


# ---------------------------------------------------------------------------
# Generator


class SceneGenerator:
    """Reproducible stream of synthetic frames, labels and scene parameters.

    Parameters
    ----------
    seed : int
        Run seed; frame ``i`` uses :func:`frame_seed(seed, i) <frame_seed>`.
    size : int or None
        Longest side of rendered frames (``None``: native detector size).
    detectors : optional
        Detectors to draw from (names, ``"HxW"`` shapes, families,
        ``"train"``/``"heldout"``/``"all"``); ``None``: the training set.
    tags : dict of str -> bool, optional
        Force features on/off in every scene (see :func:`sample_scene`).
    """

    def __init__(self, seed: int = 0, size: int | None = 256, detectors=None,
                 tags: Mapping[str, bool] | None = None):
        if size is not None and (not isinstance(size, (int, np.integer)) or size < 16):
            raise ConfigurationError(f"size must be an int >= 16 or None, got {size!r}")
        self.seed = int(seed)
        self.size = None if size is None else int(size)
        self.detectors = resolve_detectors(detectors)
        self.tags = dict(tags or {})
        unknown = set(self.tags) - set(WANT_P)
        if unknown:
            raise ConfigurationError(
                f"cannot ask for {sorted(unknown)}; known: {', '.join(WANT_P)}")
        self.index = 0

    def scene_at(self, index: int) -> tuple[dict, np.ndarray, np.random.Generator]:
        """Scene and labels of frame ``index``, and the generator state to render it with."""
        rng = frame_seed(self.seed, index)
        scene, labels = _sample(rng, _pick_detector(rng, self.detectors), self.size, self.tags)
        return scene, labels, rng

    def frame_at(self, index: int) -> tuple[np.ndarray, np.ndarray, dict]:
        """Frame, labels and scene of frame ``index`` (independent of the stream position)."""
        scene, labels, rng = self.scene_at(index)
        return render_scene(scene, rng), labels, scene

    def one(self) -> tuple[np.ndarray, np.ndarray, dict]:
        """The next frame: ``(frame, labels (23,) float32, params dict)``."""
        out = self.frame_at(self.index)
        self.index += 1
        return out

    def batch(self, n: int) -> tuple[list[np.ndarray], np.ndarray, list[dict]]:
        """The next ``n`` frames: list of frames, ``(n, 23)`` float32 labels, list of dicts."""
        frames, labels, params = [], [], []
        for _ in range(int(n)):
            f, l, p = self.one()
            frames.append(f)
            labels.append(l)
            params.append(p)
        lab = np.stack(labels) if labels else np.zeros((0, len(TAG_NAMES)), np.float32)
        return frames, lab.astype(np.float32), params

    def __iter__(self):
        while True:
            yield self.one()
