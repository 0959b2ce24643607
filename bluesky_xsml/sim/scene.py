"""Scenes: constants, small helpers, completion and rendering.

The bottom of the synthetic generator (:mod:`bluesky_xsml.sim.generator`
re-exports everything here). A scene is a JSON-serialisable dict of physical
parameters; :func:`complete_scene` fills its defaults and :func:`render_scene`
turns it into a frame. The labelling thresholds live here because the labels
(:mod:`.labels`) and the sampler (:mod:`.sampling`, :mod:`.features`) both
read them. Underscored names are private to :mod:`bluesky_xsml.sim`.
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
    Footprint,
    SceneGeometry,
    gap_ranges,
    q_from_r,
    render_shape,
    resolve_detectors,
)
from .variety import apply_readout

SCENE_VERSION = 1
TAG_INDEX = {n: i for i, n in enumerate(TAG_NAMES)}
R_E = 2.8179403262e-5  # classical electron radius, angstrom

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


def jsonable(obj):
    """``obj`` as plain JSON types, floats rounded as :func:`_g` (what a scene stores)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if obj and all(type(v) is float for v in obj):
            return [_g(v) for v in obj]
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _g(obj)
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    return obj


def frame_seed(seed: int, index: int) -> np.random.Generator:
    """The random generator of frame ``index`` in a run seeded with ``seed``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(index)])))


def threshold(kind: str, level, read: float = 0.0):
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


def detector_entry(spec, size, rng=None, dtype=None) -> dict:
    """The scene's ``detector`` entry for ``spec`` (a name or a dict) rendered at ``size``."""
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
    sc["detector"] = detector_entry(sc.get("detector", "pilatus_1m"), size)
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
        gi.setdefault("critical_deg", math.degrees(lam * math.sqrt(0.7 * R_E / math.pi)))
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


def two_theta(q, lam):
    """Scattering angle 2 theta (radians) of ``q`` (1/A) at wavelength ``lam`` (A)."""
    return 2 * np.arcsin(np.clip(np.asarray(q) * lam / (4 * np.pi), 0, 1))


def _complete_rings(f: dict, ctx: SceneGeometry) -> None:
    mat = f.get("material", "LaB6")
    q_max = float(q_from_r(ctx.r_far, ctx.p, ctx.D, ctx.lam))
    if mat in ph.CRYSTALS:
        q, inten, hkl = ph.crystal_reflections(mat, q_max)
        inten = inten * ph.lorentz_polarization(two_theta(q, ctx.lam))
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


def in_view(ctx: SceneGeometry, x, y, pad: float = 1.0):
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
        sentinels (Pilatus ``-1``/``-2``, Eiger the dtype maximum, CCD NaN);
        or, when the scene has a ``readout`` (the wide profile), what that
        readout stores (:func:`~bluesky_xsml.sim.variety.apply_readout`).
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
    mods: list[tuple[np.ndarray, float | dict, float]] = []
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
                if f.get("azimuth"):
                    mods.append((prof, f["azimuth"], float(f["orient_deg"])))
                elif float(f["kappa"]) > 0:
                    mods.append((prof, float(f["kappa"]), float(f["orient_deg"])))
                else:
                    p_iso += prof
            elif t in ("halo", "diffuse"):
                prof = ph.radial_profile(f, ctx)
                if f.get("azimuth"):
                    mods.append((prof, f["azimuth"], float(f["orient_deg"])))
                elif float(f["kappa"]) > 0:
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
        ktab[k] = ph.azimuth_form_table(kappa) if isinstance(kappa, Mapping) else \
            ph.maier_saupe_table(kappa)
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
    if sc.get("readout"):
        out = apply_readout(out, sc, seed)
    return out
