"""The sampler's feature families: diffuse, halos, rings, spots, rods, streaks, saturation.

Each ``add_*`` adds one family of features to a scene being sampled by
:mod:`.sampling`: it reads the :class:`~.sampler.Sampler` ``S`` (geometry,
radial window, intensity regime, profile) and appends to ``feats``, the
scene's feature list. Part of the synthetic
generator; :mod:`bluesky_xsml.sim.generator` re-exports it.
"""

from __future__ import annotations

import math

import numpy as np

from . import physics as ph
from .geometry import ring_points
from .labels import (
    diffuse_inner_radius,
    halo_flanks_seen,
    pixel_peak_factor,
    smooth_level,
    streak_peak_factor,
)
from .sampler import Sampler
from .scene import HIGH_MODE_MAX, WEAK_MAX_COUNTS, in_view, threshold, two_theta
from .variety import draw_azimuth, log_uniform, uniform_in


def _level(S: Sampler, r, exclude=None):
    sc = {**S.sc, "features": S.sc["features"]}
    return smooth_level(sc, S.ctx, r, exclude)


def _pick_amp(S: Sampler, thr, hi_extra: float = 1.0):
    """Amplitude for a feature whose visibility threshold is ``thr`` (None if impossible)."""
    rng = S.rng
    lo = 2.0 * float(thr)
    if S.regime.mode == "weak":
        hi = 40.0
        lo = max(lo, 5.0 * S.regime.background)
        return log_uniform(rng, lo, hi) if lo <= hi else None
    if S.regime.mode == "high":
        hi = HIGH_MODE_MAX * S.regime.background
        return log_uniform(rng, lo, hi) if lo <= hi else None
    lo = max(lo, 5.0 * S.regime.background)
    hi = S.regime.cap * hi_extra
    if lo > hi:
        return None
    return float(np.clip(S.regime.typical * 10 ** rng.uniform(*S.profile.amp_decades), lo, hi))


def add_diffuse(S: Sampler, feats: list[dict]) -> None:
    """Low-q diffuse scattering (spheres, Guinier-Porod, Debye-Bueche), strong at its inner edge."""
    rng, ctx, L = S.rng, S.ctx, S.L
    r_in = diffuse_inner_radius({**S.sc}, ctx)
    thr = float(threshold("ext", S.regime.background + ctx.dark, S.regime.read))
    for _ in range(6):
        model = ("spheres", "guinier_porod", "debye_bueche")[int(rng.integers(3))]
        r_knee = uniform_in(rng, max(0.3 * r_in, 2.0), r_in + 0.1 * L)
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
        if S.regime.mode == "high":
            hi = HIGH_MODE_MAX * S.regime.background * s0 / s1
        else:
            hi = 4.0 * S.regime.cap
            lo = max(lo, 5.0 * S.regime.background * s0 / s1)
            if S.regime.mode == "weak":
                hi = min(hi, WEAK_MAX_COUNTS)    # asked for with weak_scattering: keep it weak
        if lo > hi:
            continue
        if S.regime.mode != "normal":
            a0 = log_uniform(rng, lo, hi)
        else:
            a0 = float(np.clip(S.regime.typical * 10 ** rng.uniform(-0.5, 0.6), lo, hi))
        f["i0"] = a0 / s0
        feats.append(f)
        return


def add_halo(S: Sampler, feats: list[dict], anisotropic, force=False) -> None:
    """A broad halo (correlation peak or amorphous halo); ``force``: add it even when dim."""
    rng, ctx = S.rng, S.ctx
    for _ in range(8):
        r0 = uniform_in(rng, max(S.r_lo, 0.12 * S.L), max(S.r_lo + 1, 0.7 * S.r_hi))
        q0 = float(ctx.q(r0))
        # correlation peak (SAXS) or amorphous halo (WAXS, d ~ 1.8-8 A)
        if not (0.004 <= q0 <= 0.5 or 0.8 <= q0 <= 3.5):
            continue
        f = {"type": "halo", "q0": q0, "fwhm_rel": rng.uniform(*S.profile.halo_fwhm_rel),
             "kappa": 0.0, "orient_deg": rng.uniform(0, 180)}
        if anisotropic:
            f["kappa"] = rng.uniform(1.0, 5.0)
        if S.profile.azimuth_p and rng.random() < S.profile.azimuth_p:
            f["azimuth"] = draw_azimuth(rng, S.profile, anisotropic)
            f["kappa"] = 0.0
        px, py = ring_points(ctx, [r0])
        cov = in_view(ctx, px[0], py[0])
        if not halo_flanks_seen(ctx, q0, f["fwhm_rel"], need=0.15):
            continue
        if anisotropic:
            strong = ph.feature_azimuth_weight(f, cov.size) >= 0.5
            if (cov & strong).mean() * 2 * np.pi * r0 < 0.08 * S.L:
                continue
        elif cov.mean() * 2 * np.pi * r0 < 0.35 * S.L:
            continue
        thr = float(threshold("ext", _level(S, r0), S.regime.read))
        amp = _pick_amp(S, thr)
        if amp is None and force:
            amp = max(2.0 * thr, 5.0 * S.regime.background)
        if amp is None:
            return
        f["amp"] = amp
        if anisotropic and not f.get("azimuth"):
            f["kappa"] = _gap_kappa(f["kappa"], [amp], [thr])
        feats.append(f)
        return


def add_gi_diffuse(S: Sampler, feats: list[dict]) -> None:
    """Grazing incidence: diffuse scattering above the horizon, visible across the width."""
    rng, ctx = S.rng, S.ctx
    hw_px = rng.uniform(0.2, 0.6) * S.w
    f = {"type": "gi_diffuse", "qy_hwhm": float(ctx.q(hw_px)),
         "decay_deg": math.degrees(max(ctx.alpha_c * rng.uniform(1.0, 4.0),
                                       math.atan(rng.uniform(0.1, 0.4) * S.h * ctx.p / ctx.D)))}
    thr = float(threshold("ext", S.regime.background + ctx.dark, S.regime.read))
    # visible across >= 40 % of the width: amp * C >= thr at |x - cx| = 0.2 w
    need = thr * (1 + (0.2 * S.w / hw_px) ** 2) / 0.7
    amp = _pick_amp(S, max(need, 2 * thr / 0.7) / 2.0 * 1.2)
    if amp is None:
        return
    f["amp"] = amp
    feats.append(f)


def _ring_candidates(S: Sampler, material, lamellar_many):
    """q (1/A) and relative intensities of a material's rings within the detector."""
    ctx, rng = S.ctx, S.rng
    q_lo, q_hi = float(ctx.q(max(S.r_lo, 30.0))), float(ctx.q(S.r_hi))
    if material in ph.CRYSTALS:
        q, inten, hkl = ph.crystal_reflections(material, q_hi)
        inten = inten * ph.lorentz_polarization(two_theta(q, ctx.lam))
        return q, inten, {"hkl": [list(v) for v in hkl]}
    if material == "AgBH":
        q, inten, n = ph.lamellar_orders(ph.LAMELLAR_D["AgBH"], q_hi, rng.uniform(0.0, 0.08))
        return q, inten, {"orders": [int(v) for v in n], "d_A": ph.LAMELLAR_D["AgBH"]}
    if material == "lamellar":
        n_want = int(rng.integers(6, 10)) if lamellar_many else int(rng.integers(3, 5))
        r_top = min(S.r_hi / (n_want + 0.3), float(ctx.r(2 * math.pi / 15.0)))  # d >= 15 A
        if r_top < max(S.r_lo, 30.0):
            return np.zeros(0), np.zeros(0), {}
        r1 = uniform_in(rng, max(S.r_lo, 30.0), r_top)
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


def add_rings(S: Sampler, feats: list[dict], style, material, many, lamellar) -> None:
    """Rings of ``material`` in ``style``; ``many``: six or more; ``lamellar``: orders in a row."""
    rng, ctx, L = S.rng, S.ctx, S.L
    q, inten, extra = _ring_candidates(S, material, many)
    if len(q) == 0:
        return
    r = ctx.r(q)
    fwhm_rel = log_uniform(rng, *S.profile.ring_fwhm_rel)
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
    if style != "textured" and S.profile.azimuth_p and rng.random() < S.profile.azimuth_p:
        f["azimuth"] = draw_azimuth(rng, S.profile, style == "oriented")
        f["kappa"] = 0.0
    if not sel.any():
        return
    cov = in_view(ctx, *ring_points(ctx, rr))
    if style == "oriented":
        strong = ph.feature_azimuth_weight(f, cov.shape[1]) >= 0.5
        arc = (cov & strong[None, :]).mean(axis=1) * 2 * np.pi * rr
        sel &= arc >= 0.05 * L
    else:
        arc = cov.mean(axis=1) * 2 * np.pi * rr
        sel &= arc >= 0.2 * L
    floor = 0.7 if S.profile.classic else 0.5
    gs = float(max(floor, float(np.nanmax(np.where(sel, sig, np.nan)))
                   * rng.uniform(*S.profile.grain_sigma_scale))) if sel.any() else 0.7
    if style == "textured":
        circ = 2 * np.pi * rr
        cov_frac = np.maximum(arc / np.maximum(circ, 1e-9), 1e-3)
        n_grains = np.maximum(np.round(rng.uniform(*S.profile.grain_fraction) * circ / (2.5 * gs)),
                              np.ceil(16.0 / cov_frac))
        sel &= (n_grains <= 500) & (n_grains * 2.5 * gs <= circ)
    idx = np.flatnonzero(sel)
    if idx.size == 0:
        return
    if lamellar and "orders" in extra:
        idx = idx[np.argsort(np.asarray(extra["orders"])[idx])]
    level = _level(S, rr)
    kind = "spot" if style == "textured" else "ext"
    thr = threshold(kind, level, S.regime.read) / (0.7 if style == "textured" else 1.0)
    # how many rings to keep: >= 6 for many_rings, else within the frame's ring budget
    first_order = int(extra["orders"][idx[0]]) if (lamellar and "orders" in extra) else 1
    if many and idx.size >= 6:
        n_min, n_max = 6, int(rng.integers(6, 13))
        cand = idx[: n_max + 4]
    else:
        n_min = (2 if first_order == 1 else 3) if lamellar else 1
        n_max = int(rng.integers(2, 4)) if lamellar else int(rng.integers(1, 5))
        n_max = max(min(n_max, S.ring_allowance()), 0)
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
    if style == "oriented" and not f.get("azimuth"):
        # narrow enough that the ring vanishes between the arcs (clear on a log scale)
        f["kappa"] = _gap_kappa(f["kappa"], amp[kept], thr[kept])
    S.spend_rings(int(kept.size))
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


def add_isolated(S: Sampler, feats: list[dict]) -> None:
    """A few isolated spots away from the rings (or the profile's spot family)."""
    if S.profile.spots is not None:
        _add_isolated_family(S, feats)
        return
    rng, ctx = S.rng, S.ctx
    n = int(rng.integers(1, 6))
    xy, amps, sigs, radii = [], [], [], []
    ring_r = _existing_ring_radii(S, feats)
    for _ in range(n * 8):
        if len(xy) >= n:
            break
        x, y = rng.uniform(2, S.w - 3), rng.uniform(2, S.h - 3)
        r = math.hypot(x - ctx.cx, y - ctx.cy)
        if r < S.r_lo or not in_view(ctx, x, y, pad=3.0):
            continue
        if any(abs(r - q) < 5 for q in radii + ring_r):
            continue
        if any(math.hypot(x - a, y - b) < 12 for a, b in xy):
            continue
        thr = float(threshold("spot", _level(S, r), S.regime.read))
        a = _pick_amp(S, thr)
        if a is None:
            continue
        xy.append([x, y])
        amps.append(a)
        sigs.append(rng.uniform(0.7, 1.8))
        radii.append(r)
    if xy:
        feats.append({"type": "spots", "kind": "isolated", "xy": xy, "amp": amps, "sigma_px": sigs})


def _add_isolated_family(S: Sampler, feats):
    """Isolated spots of the profile's :class:`~.variety.SpotFamily`: count, size, clusters."""
    rng, ctx, fam = S.rng, S.ctx, S.profile.spots
    n = int(round(log_uniform(rng, *fam.count)))
    centres = []
    if rng.random() < fam.cluster_p:
        rad = rng.uniform(*fam.cluster_radius_L) * S.L
        for _ in range(int(rng.integers(1, 4))):
            centres.append((rng.uniform(2, S.w - 3), rng.uniform(2, S.h - 3)))
    xy, amps, sigs, radii = [], [], [], []
    ring_r = _existing_ring_radii(S, feats)
    for _ in range(n * 8):
        if len(xy) >= n:
            break
        sig = rng.uniform(*fam.fwhm_px) / 2.3548
        if centres:
            x0, y0 = centres[int(rng.integers(len(centres)))]
            x, y = x0 + rng.normal(0.0, rad), y0 + rng.normal(0.0, rad)
        else:
            x, y = rng.uniform(2, S.w - 3), rng.uniform(2, S.h - 3)
        r = math.hypot(x - ctx.cx, y - ctx.cy)
        if r < S.r_lo or not in_view(ctx, x, y, pad=max(3.0, 2.5 * sig)):
            continue
        if any(abs(r - q) < 5 + 2 * sig for q in ring_r):
            continue
        if any(math.hypot(x - a, y - b) < max(fam.min_separation_px, 3 * (sig + s))
               for (a, b), s in zip(xy, sigs, strict=True)):
            continue
        thr = float(threshold("spot", _level(S, r), S.regime.read))
        a = _pick_amp(S, thr / float(pixel_peak_factor(x, y, sig)))   # its brightest pixel
        if a is None:
            continue
        xy.append([x, y])
        amps.append(a)
        sigs.append(sig)
        radii.append(r)
    if xy:
        feats.append({"type": "spots", "kind": "isolated", "xy": xy, "amp": amps, "sigma_px": sigs})


def _worst_pixel_factor(sigma: float) -> float:
    """Brightest pixel of a spot centred between four pixels, relative to its peak
    (1 for spots the labels judge by their centre)."""
    return float(pixel_peak_factor(0.5, 0.5, sigma))


def _existing_ring_radii(S: Sampler, feats):
    out = []
    for f in feats:
        if f["type"] == "rings":
            out += [float(v) for v in S.ctx.r(np.asarray(f["q"]))]
        elif f["type"] == "on_ring":
            out.append(float(S.ctx.r(f["q"])))
    return out


def add_lattice(S: Sampler, feats: list[dict]) -> None:
    """A 2-D lattice of spots (hexagonal, square or oblique), at least nine of them seen."""
    rng, ctx, L = S.rng, S.ctx, S.L
    sigma = rng.uniform(*S.profile.lattice_sigma_px)
    kind = rng.random()
    a_px = uniform_in(rng, max(9.0, 7 * sigma, 0.05 * L), max(10.0, 0.16 * L))
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
    thr = float(threshold("spot", _level(S, 0.3 * L), S.regime.read)) / _worst_pixel_factor(sigma)
    amp = _pick_amp(S, thr / 0.5)
    if amp is None:
        amp = _pick_amp(S, thr / 0.7)
        if amp is None:
            return
    f["amp"] = amp
    # spots below 2x threshold are not drawn: with the smooth envelope and mild
    # structure factors the drawn spots fill a disc of the lattice
    f["min_amp"] = 2.0 * thr
    x, y, a, _s = ph.lattice_spots(f, ctx)
    lv = _level(S, np.hypot(x - ctx.cx, y - ctx.cy))
    if int((in_view(ctx, x, y) & (a >= 2.0 * threshold("spot", lv, S.regime.read))).sum()) < 9:
        return
    feats.append(f)


def add_on_ring(S: Sampler, feats: list[dict]) -> None:
    """Four or six spots on a ring, evenly spaced in azimuth."""
    rng, ctx, L = S.rng, S.ctx, S.L
    n = 4 if rng.random() < 0.5 else 6
    sigma = rng.uniform(*S.profile.on_ring_sigma_px)
    r_min = max(S.r_lo, 0.08 * L, 8 * sigma * n / (2 * np.pi))
    for _ in range(20):
        r0 = uniform_in(rng, r_min, 0.8 * S.r_hi)
        phi0 = rng.uniform(0, 360)
        phis = np.radians(phi0) + 2 * np.pi * np.arange(n) / n
        x = ctx.cx + r0 * np.cos(phis)
        y = ctx.cy - r0 * np.sin(phis)
        if in_view(ctx, x, y, pad=2.0).sum() < (4 if n == 4 else 5):
            continue
        thr = float(threshold("spot", _level(S, r0), S.regime.read)) / _worst_pixel_factor(sigma)
        amp = _pick_amp(S, thr / 0.9)
        if amp is None:
            return
        feats.append({"type": "on_ring", "q": float(ctx.q(r0)), "n_fold": n, "orient_deg": phi0,
                      "amp": amp, "sigma_px": sigma, "seed": int(rng.integers(2**31))})
        return


def add_specular(S: Sampler, feats: list[dict]) -> None:
    """Grazing incidence: the specular rod above the beam."""
    rng, ctx = S.rng, S.ctx
    if not (3 <= ctx.cx <= S.w - 4) or ctx.fp.gap_col[int(round(ctx.cx))]:
        return
    rows_decay = rng.uniform(0.25, 0.8) * S.h
    f = {"type": "specular_rod", "width_px": rng.uniform(0.6, 1.3),
         "decay_deg": math.degrees(math.atan(rows_decay * ctx.p / ctx.D)), "peak_amp": 0.0}
    thr = float(threshold("spot", S.regime.background + ctx.dark, S.regime.read))
    amp = _pick_amp(S, thr * 1.3)
    if amp is None:
        return
    f["amp"] = amp
    if rng.random() < 0.5:
        f["peak_amp"] = (min(amp * rng.uniform(2, 8), S.regime.cap * 1.4)
                         if S.regime.mode == "normal" else amp)
    feats.append(f)


def add_rods(S: Sampler, feats: list[dict]) -> None:
    """Grazing incidence: one to three orders of Bragg rods."""
    rng, ctx = S.rng, S.ctx
    n = int(rng.integers(1, 4))
    dx1 = uniform_in(rng, max(8.0, 0.06 * S.w), max(9.0, 0.4 * S.w / n))
    rows_decay = rng.uniform(0.3, 1.0) * S.h
    thr = float(threshold("spot", S.regime.background + ctx.dark, S.regime.read))
    a1 = _pick_amp(S, thr * 1.3)
    if a1 is None:
        return
    amps = [max(a1 * rng.uniform(0.5, 1.0) ** k, 2 * thr * 1.3) for k in range(n)]
    if S.regime.mode == "high":
        amps = [min(a, HIGH_MODE_MAX * S.regime.background) for a in amps]
    f = {"type": "bragg_rods", "qy": float(ctx.q(dx1)), "n_orders": n, "amp": amps,
         "decay_deg": math.degrees(math.atan(rows_decay * ctx.p / ctx.D)),
         "width_px": rng.uniform(0.6, 1.4)}
    feats.append(f)


def add_streaks(S: Sampler, feats: list[dict]) -> None:
    """Streaks from the beam centre, at least 20 degrees apart."""
    rng, ctx, L = S.rng, S.ctx, S.L
    n = int(rng.integers(S.profile.streak_count[0], S.profile.streak_count[1] + 1))
    angs = []
    for _ in range(n):
        if rng.random() < 0.6:
            a = 90.0 * int(rng.integers(2)) + rng.uniform(-2, 2)
        else:
            a = rng.uniform(0, 180)
        if S.gi and abs((a % 180) - 90) < 25:
            a += 45.0
        a = float(a % 180)
        if all(min(abs(a - b), 180 - abs(a - b)) >= 20.0 for b in angs):
            angs.append(a)
    bs = S.sc["beamstop"]
    r0 = max(3.0, (bs["radius_px"] if bs and bs["type"] == "circular" else 0.0) + 1.0,
             ctx.r_near + 1.0)
    far = r0 + 0.2 * L
    width = rng.uniform(*S.profile.streak_sigma_px) if not S.profile.classic else None
    thr = float(threshold("spot", _level(S, far), S.regime.read))
    if width is not None:
        thr /= streak_peak_factor(width)
    amp = None
    for p in (rng.uniform(0.3, 1.0), 0.25, 0.1):
        need = 2.0 * thr * (far / r0) ** p
        amp = _pick_amp(S, need / 2.0, hi_extra=3.0)
        if amp is not None:
            break
    if amp is None:
        return
    feats.append({"type": "streaks", "angles_deg": angs, "amp": amp, "r0_px": r0, "decay": p,
                  "width_px": (width if width is not None
                               else rng.uniform(*S.profile.streak_sigma_px))})


def feature_peak(f, ctx, sc):
    """Upper bound of the expected counts a feature adds to any pixel."""
    t = f["type"]
    if t == "rings":
        return max(f["amp"]) * (1.5 if f["style"] == "textured" else 1.0)
    if t in ("halo", "gi_diffuse", "on_ring", "lattice", "streaks", "direct_beam"):
        return float(f["amp"]) * (1.1 if t == "on_ring" else 1.0)
    if t == "diffuse":
        peak = float(ph.radial_profile(f, ctx, diffuse_inner_radius(sc, ctx)))
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


def scale_feature(f, k) -> None:
    """Multiply a feature's amplitudes by ``k`` in place."""
    for key in ("amp", "i0", "peak_amp", "min_amp"):
        if key in f:
            v = f[key]
            f[key] = [x * k for x in v] if isinstance(v, list) else v * k


def ensure_bright(S: Sampler, feats):
    """Normal regime: the brightest feature reaches at least 200 counts."""
    peaks = [(feature_peak(f, S.ctx, S.sc), i) for i, f in enumerate(feats)]
    if not peaks:
        return
    best, i = max(peaks)
    if best < 200.0 and best > 0:
        k = min(200.0 / best * S.rng.uniform(1.0, 3.0), S.regime.cap * 1.4 / best)
        if k > 1:
            scale_feature(feats[i], k)


def add_saturation(S: Sampler, feats: list[dict]) -> None:
    """Saturate one feature (or add a direct beam) over a clear region."""
    rng, ctx, cut = S.rng, S.ctx, S.regime.cut
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
        r_in = diffuse_inner_radius(S.sc, ctx)
        # saturate an annulus of width ~area / (2 pi r_in) outside the inner edge
        width = max(3.0, area / (2 * np.pi * max(r_in, 3.0)) * 3.0)
        _s0, s1 = ph.radial_profile(f, ctx, [r_in, r_in + width])
        if s1 <= 0:
            return
        f["i0"] = float(f["i0"]) * cut * log_uniform(rng, 1.2, 5.0) / s1
    elif kind == "ring":
        _r, _sig, amp = ph.ring_geometry(f, ctx)
        k = int(np.argmax(amp))
        ratio = log_uniform(rng, 3.0, 30.0)
        old = f["amp"][k]
        f["amp"][k] = cut * ratio
        if float(f["kappa"]) > 0 and not f.get("azimuth"):
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
