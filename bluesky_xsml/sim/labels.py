"""Scene labels: which of the 23 tags a scene's parameters earn.

A feature is tagged when it lands on the detector and its expected counts
clear the noise of what lies under it (see :func:`scene_labels`). Part of the
synthetic generator; :mod:`bluesky_xsml.sim.generator` re-exports it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ..tags import TAG_NAMES
from . import physics as ph
from .geometry import SceneGeometry, ring_points
from .scene import (
    DIFFUSE_DECAY,
    GAP_FRACTION,
    HALO_MIN_REL,
    HIGH_BG_RATIO,
    ISO_MAX_KAPPA,
    MIN_SAT_AREA,
    ORIENT_MIN_KAPPA,
    SHARP_MAX_REL,
    TAG_INDEX,
    WEAK_MAX_COUNTS,
    complete_scene,
    in_view,
    threshold,
)
from .variety import FORM_ANISO_MAX_CONTRAST, FORM_ISO_MIN_CONTRAST, gaps_visible, readout_cut


def smooth_level(sc: dict, ctx: SceneGeometry, r, exclude=None):
    """Expected counts under a feature at radii ``r``: background + diffuse + halos."""
    r = np.asarray(r, dtype=np.float64)
    level = ctx.B * np.cos(np.arctan(r * ctx.p / ctx.D)) ** 3 + ctx.dark
    for f in sc["features"]:
        if f is exclude or f["type"] not in ("diffuse", "halo"):
            continue
        level = level + ph.radial_profile(f, ctx, r)
    return level


class LabelState:
    """What the labelling of one scene found: tags, visible amplitudes, saturated area, ..."""

    def amp(self, peak: float, typical: float | None = None) -> None:
        self.amps.append((float(peak), float(peak if typical is None else typical)))

    def __init__(self):
        self.tags: set[str] = set()
        self.amps: list[tuple[float, float]] = []   # (peak, typical) counts of visible features
        self.sat_area = 0.0
        self.rings: list[tuple[float, float]] = []   # (radius, fwhm px) of visible sharp rings
        # (r, half width, kappa, orient, n-fold form or None) of visible rings and halos
        self.crossing: list[tuple[float, float, float, float, dict | None]] = []
        self.gi_seen = False    # grazing-incidence scattering seen above the horizon


#: Spots narrower than this (Gaussian sigma, px) are judged by their brightest
#: pixel, not their centre; streaks narrower than SUBPIXEL_STREAK_SIGMA by the
#: worst case (the line half-way between two pixel rows).  Every spot and
#: streak of the classic profile is at least this wide, so its labels do not
#: depend on it.
SUBPIXEL_SPOT_SIGMA = 0.7
SUBPIXEL_STREAK_SIGMA = 0.5


def pixel_peak_factor(x, y, s):
    """Brightest pixel of a Gaussian spot relative to its centre (1 for wide spots)."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    s = np.broadcast_to(np.asarray(s, float), x.shape)
    d2 = (x - np.round(x)) ** 2 + (y - np.round(y)) ** 2
    return np.where(s < SUBPIXEL_SPOT_SIGMA, np.exp(-d2 / (2 * np.maximum(s, 1e-3) ** 2)), 1.0)


def streak_peak_factor(sigma: float) -> float:
    """Worst-case brightest pixel across a thin streak relative to its line."""
    if sigma >= SUBPIXEL_STREAK_SIGMA:
        return 1.0
    return float(math.exp(-0.25 / (2 * max(sigma, 1e-3) ** 2)))


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
    level = smooth_level(sc, ctx, np.where(np.isfinite(r), r, 0.0))
    if f["style"] == "textured":
        x, y, a, s, idx = ph.textured_grains(f, ctx, r, sig, amp)
        lv = smooth_level(sc, ctx, np.hypot(x - ctx.cx, y - ctx.cy))
        vis = ctx.fp.seen(x, y) & (a * ph.grazing_factor(ctx, y) * pixel_peak_factor(x, y, s)
                                   >= threshold("spot", lv, ctx.read))
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
    wgt = ph.feature_azimuth_weight(f, px.shape[1])
    thr = threshold("ext", level, ctx.read)
    expected = amp[:, None] * wgt[None, :] * ph.grazing_factor(ctx, py)
    cov = ctx.fp.seen(px, py) & (expected >= thr[:, None])
    sharp = fwhm <= SHARP_MAX_REL * r
    circ = 2 * np.pi * r
    present = np.zeros(len(r), bool)
    az = f.get("azimuth")
    if az:
        # n-fold forms: the modulation seen on the detector decides
        on = ctx.fp.seen(px, py)
        contrast = _form_contrast(wgt, on)
        if (contrast >= FORM_ISO_MIN_CONTRAST).any():
            arc = cov.mean(axis=1) * circ
            present = sharp & (arc >= 0.15 * L) & (contrast >= FORM_ISO_MIN_CONTRAST)
            if present.any():
                st.tags.add("ring_isotropic")
        lit = (cov & (wgt >= 0.5)[None, :]).mean(axis=1) * circ
        oriented = sharp & (lit >= 0.03 * L) & (contrast <= FORM_ANISO_MAX_CONTRAST)
        if oriented.any():
            st.tags.add("ring_oriented")
        present = present | oriented
    elif kappa <= ISO_MAX_KAPPA:
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
        st.crossing.append((float(r[k]), float(fwhm[k]), kappa, float(f["orient_deg"]), az))
    for k in np.flatnonzero(present & (amp > cut)):
        n_az = cov.shape[1]
        v = amp[k] * wgt * ph.grazing_factor(ctx, py[k])
        over = cov[k] & (v > cut)
        if over.any():
            width = 2 * sig[k] * np.sqrt(2 * np.log(v[over] / cut))
            st.sat_area += float(np.sum(width) * circ[k] / n_az)
    orders = f.get("orders")
    if orders:
        pres = {int(n) for n, ok in zip(orders, present, strict=False) if ok}
        if len(pres) >= 3 or {1, 2} <= pres:
            st.tags.add("higher_orders")


def _label_halo(f, sc, ctx, st, cut):
    q0, rel = float(f["q0"]), float(f["fwhm_rel"])
    r0 = float(ctx.r(q0))
    if not math.isfinite(r0) or rel < HALO_MIN_REL:
        return
    amp = float(f["amp"])
    thr = float(threshold("ext", smooth_level(sc, ctx, r0, exclude=f), ctx.read))
    px, py = ring_points(ctx, [r0])
    px, py = px[0], py[0]
    cov = ctx.fp.seen(px, py) & (amp * ph.grazing_factor(ctx, py) >= thr)
    kappa = float(f["kappa"])
    circ = 2 * np.pi * r0
    if not halo_flanks_seen(ctx, q0, rel):
        return
    az = f.get("azimuth")
    if az:
        wgt = ph.feature_azimuth_weight(f, cov.size)
        on = ctx.fp.seen(px, py)
        lit = on & (amp * wgt * ph.grazing_factor(ctx, py) >= thr)
        contrast = float(_form_contrast(wgt, on[None, :])[0])
        if contrast >= FORM_ISO_MIN_CONTRAST and lit.mean() * circ >= 0.25 * ctx.L:
            st.tags.add("halo_isotropic")
            st.amp(amp)
            st.crossing.append((r0, 0.5 * rel * r0, 0.0, float(f["orient_deg"]), az))
        elif contrast <= FORM_ANISO_MAX_CONTRAST and \
                (lit & (wgt >= 0.5)).mean() * circ >= 0.05 * ctx.L:
            st.tags.add("halo_anisotropic")
            st.amp(amp)
    elif kappa <= ISO_MAX_KAPPA:
        if cov.mean() * circ >= 0.25 * ctx.L:
            st.tags.add("halo_isotropic")
            st.amp(amp)
            st.crossing.append((r0, 0.5 * rel * r0, kappa, float(f["orient_deg"]), None))
    elif kappa >= ORIENT_MIN_KAPPA:
        wgt = ph.feature_azimuth_weight(f, cov.size)
        lit = ctx.fp.seen(px, py) & (amp * wgt * ph.grazing_factor(ctx, py) >= thr)
        on = ctx.fp.seen(px, py)
        gaps = (on & ~lit).sum() >= GAP_FRACTION * max(on.sum(), 1)
        if (lit & (wgt >= 0.5)).mean() * circ >= 0.05 * ctx.L and gaps:
            st.tags.add("halo_anisotropic")
            st.amp(amp)


def halo_flanks_seen(ctx, q0: float, rel: float, need: float = 0.1) -> bool:
    """A halo reads as a ring when both its flanks (0.6 FWHM either side) are on the detector."""
    r_in, r_out = ctx.r(q0 * (1 - 0.6 * rel)), ctx.r(q0 * (1 + 0.6 * rel))
    if not (math.isfinite(r_in) and math.isfinite(r_out)):
        return False
    x, y = ring_points(ctx, [r_in, r_out], n=120)
    arc = ctx.fp.on_detector(x, y).mean(axis=1) * 2 * np.pi * np.array([r_in, r_out])
    return bool((arc >= need * ctx.L).all())


def diffuse_inner_radius(sc, ctx):
    r_lo = ctx.r_near
    bs = sc["beamstop"]
    if bs and bs["type"] == "circular":
        r_lo = max(r_lo, float(bs["radius_px"]) + 1.0)
    if ctx.horizon is not None:
        r_lo = max(r_lo, ctx.cy - ctx.horizon + 1.0)
    return max(r_lo, 2.0)


def _label_diffuse(f, sc, ctx, st, cut):
    r_lo = diffuse_inner_radius(sc, ctx)
    span = np.linspace(r_lo, r_lo + 0.5 * ctx.L, 64)
    prof = ph.radial_profile(f, ctx, span)
    lvl = ctx.B * np.cos(np.arctan(span * ctx.p / ctx.D)) ** 3 + ctx.dark
    vis = prof >= threshold("ext", lvl, ctx.read)
    if not vis[0] or prof[0] < 3 * threshold("ext", lvl[0], ctx.read):
        return
    n_vis = int(np.argmin(vis)) if not vis.all() else len(vis)
    extent = span[n_vis - 1] - r_lo
    cx_, cy_ = ring_points(ctx, [r_lo + 0.05 * ctx.L], n=90)
    cov = in_view(ctx, cx_[0], cy_[0])
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
        if float(f["kappa"]) > 0 or f.get("azimuth"):
            v = v * ph.feature_azimuth_weight(f, 128)[None, :]
        over = (v > cut) & ctx.fp.seen(x, y, pad=0.0)
        st.sat_area += float(np.sum(over * rr[:, None]) * (rr[1] - rr[0]) * (2 * np.pi / 128))


def _label_spots(f, sc, ctx, st, cut):
    x, y, a, s = ph.feature_spots(f, ctx)
    if len(x) == 0:
        return
    t_y = ph.grazing_factor(ctx, y)
    st.sat_area += _sat_area_spots(ctx, x, y, a, s, cut, t_y)
    lv = smooth_level(sc, ctx, np.hypot(x - ctx.cx, y - ctx.cy))
    vis_all = ctx.fp.seen(x, y) & (a * t_y * pixel_peak_factor(x, y, s)
                                   >= threshold("spot", lv, ctx.read))
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
    amp = amp * streak_peak_factor(float(f["width_px"]))
    thr_s = threshold("spot", smooth_level(sc, ctx, s), ctx.read)
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
        thr = float(threshold("ext", lv, ctx.read))
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
    thr = float(threshold("spot", lv, ctx.read))
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


def _form_contrast(wgt, on) -> np.ndarray:
    """Per ring: min / max of the azimuthal weight over the azimuths on the detector."""
    w = np.broadcast_to(wgt[None, :], np.shape(on))
    hi = np.where(on, w, -np.inf).max(axis=1)
    lo = np.where(on, w, np.inf).min(axis=1)
    return np.where(np.isfinite(hi) & (hi > 0), lo / np.where(hi > 0, hi, 1.0), 1.0)


def _weight_at(kappa: float, orient: float, az: dict | None, phi: float) -> float:
    if az:
        return float(ph.azimuth_form_weight(az, orient, phi))
    return math.exp(kappa * (math.cos(2 * (phi - math.radians(orient))) - 1.0))


def _crosses_horizon(ctx, st) -> bool:
    """Whether a visible ring or halo meets the horizon on the detector."""
    dy = ctx.cy - ctx.horizon
    for r, _, kappa, orient, az in st.crossing:
        if r <= dy + 1.0:
            continue
        dx = math.sqrt(r * r - dy * dy)
        for x in (ctx.cx - dx, ctx.cx + dx):
            phi = math.atan2(dy, x - ctx.cx)
            wgt = _weight_at(kappa, orient, az, phi)
            xi = int(round(x))
            if 2 <= x <= ctx.w - 3 and not ctx.fp.gap_col[xi] and wgt >= 0.5:
                return True
    return False


def _sat_area_smooth(sc, ctx, cut, n: int = 64) -> float:
    """Seen pixels the background and halos alone push above ``cut`` (an n x n grid).

    Only evaluated when they could reach it: the sampler keeps the sum of all
    intensities below half the cut, so this adds nothing to sampled scenes
    except where a readout's smaller range (8-bit ADU) is exceeded.
    """
    halos = [f for f in sc["features"] if f["type"] == "halo"]
    bound = ctx.B * (1.0 + sum(abs(float(g)) for g in sc["background"]["gradient"])) + \
        ctx.dark + sum(float(f["amp"]) for f in halos)
    if bound <= cut:
        return 0.0
    y, x = np.meshgrid((np.arange(n) + 0.5) * ctx.h / n - 0.5,
                       (np.arange(n) + 0.5) * ctx.w / n - 0.5, indexing="ij")
    r = np.hypot(x - ctx.cx, y - ctx.cy)
    phi = np.arctan2(ctx.cy - y, x - ctx.cx)
    gx, gy = (float(g) for g in sc["background"]["gradient"])
    bg = ctx.B * np.cos(np.arctan(r * ctx.p / ctx.D)) ** 3 * (
        1.0 + gx * (x - 0.5 * (ctx.w - 1)) / ctx.L + gy * (0.5 * (ctx.h - 1) - y) / ctx.L)
    sample = np.zeros_like(r)
    for f in halos:
        v = ph.radial_profile(f, ctx, r)
        if f.get("azimuth"):
            v = v * ph.azimuth_form_weight(f["azimuth"], float(f["orient_deg"]), phi)
        elif float(f["kappa"]) > 0:
            v = v * np.exp(float(f["kappa"]) * (np.cos(2 * (phi - math.radians(
                float(f["orient_deg"])))) - 1.0))
        sample += v
    level = bg + ctx.dark + sample * ph.grazing_factor(ctx, y)
    over = (level > cut) & ctx.fp.seen(x, y, pad=0.0)
    return float(over.mean() * ctx.h * ctx.w)


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
            for rk, _hw, kappa, orient, az in st.crossing:
                k = min(int(rk), len(on) - 1)
                wgt = _weight_at(kappa, orient, az, a)
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
    return label_state(complete_scene(scene))[0]


def label_state(sc: dict) -> tuple[np.ndarray, LabelState | None]:
    """Labels of a completed scene, and the state behind them (``None`` with the beam off)."""
    ctx = SceneGeometry(sc)
    lab = np.zeros(len(TAG_NAMES), np.float32)
    det = sc["detector"]
    if gaps_visible(sc):
        lab[TAG_INDEX["detector_gaps"]] = 1
    if not sc["beam_on"]:
        lab[TAG_INDEX["beam_off"]] = 1
        return lab, None
    noise = sc["noise"]
    cut = float(det["count_cutoff"])
    if det["family"] == "ccd":
        cut = (cut - float(noise["offset"])) / max(float(noise["gain"]), 1e-9)
    cut = readout_cut(sc, cut)
    st = LabelState()
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
    if st.sat_area < MIN_SAT_AREA:
        st.sat_area += _sat_area_smooth(sc, ctx, cut)
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
        lab[TAG_INDEX[t]] = 1
    return lab, st
