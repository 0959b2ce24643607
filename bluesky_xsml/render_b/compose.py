"""Scene -> expected photons per pixel, with a visibility record per component.

:func:`expected_photons` renders the noiseless photon image of a scene drawn by
:class:`~bluesky_xsml.render_b.sampler.SceneSampler`.  Before drawing a
component it measures how bright the component is *where it can be seen* (on
the detector, outside gaps, through the beamstop and below the horizon's
attenuation) against the frame's noise.  A component clearly above the
detection threshold is drawn and recorded as visible; one clearly below it is
drawn and recorded as invisible; one in between is not drawn at all, so no
frame shows a feature its labels deny, or the reverse.
"""

from __future__ import annotations

import math

import numpy as np

from . import shapes as S
from .beamstops import shadow
from .detectors import detector, gap_mask

__all__ = ["Rendered", "expected_photons"]

#: A component is visible at this many noise sigmas (extended) ...
EXTENDED_SIGMAS = 1.5
#: ... or at this many for compact spots.
SPOT_SIGMAS = 4.0
#: Components between this fraction of their threshold and the threshold are left out.
AMBIGUOUS = 0.3


class Rendered:
    """Result of :func:`expected_photons`.

    Attributes
    ----------
    photons : numpy.ndarray
        Expected photons per pixel (float32, H x W).
    records : list of dict
        Per drawn component: ``kind``, ``visible`` and what labels need.
    beamstop : dict
        ``{"circular": bool, "linear": bool}``: which beamstop parts are visible.
    gaps : numpy.ndarray or None
        The detector's gap mask.
    noise : float
        The frame's noise level in photons (background and read noise).
    """

    def __init__(self, photons, records, beamstop, gaps, noise):
        self.photons, self.records, self.beamstop = photons, records, beamstop
        self.gaps, self.noise = gaps, noise


class _Ctx:
    def __init__(self, scene):
        self.det = detector(scene["detector"]["name"])
        self.H, self.W = self.det.shape
        self.grid = S.Grid(self.det.shape, scene["geometry"]["beam_center"])
        self.gaps = gap_mask(self.det)
        ex = scene["exposure"]
        self.scale = ex["peak"]
        self.noise = math.sqrt(ex["background"] + ex["read_noise_photons"] ** 2)
        self.thr_ext = max(1.5, EXTENDED_SIGMAS * self.noise)
        self.thr_spot = max(4.0, SPOT_SIGMAS * self.noise)
        self.T, self.rims = shadow(self.grid, scene["beamstop"])
        hz = next((c for c in scene["components"] if c["kind"] == "horizon"), None)
        self.horizon = hz
        if hz is not None:
            rows = np.arange(self.H, dtype=np.float32)
            f = np.clip((rows - np.float32(hz["row"])) / np.float32(hz["edge"]) + 0.5, 0, 1)
            self.row_att = (1 - f) + f * np.float32(hz["attenuation"])
        else:
            self.row_att = None

    def seen(self, xs, ys) -> np.ndarray:
        """Transmission at points (0 off the detector or in a gap)."""
        xs = np.rint(np.asarray(xs, float)).astype(np.int64)
        ys = np.rint(np.asarray(ys, float)).astype(np.int64)
        ok = (xs >= 0) & (xs < self.W) & (ys >= 0) & (ys < self.H)
        out = np.zeros(xs.shape, np.float32)
        xi, yi = xs[ok], ys[ok]
        v = np.ones(xi.shape, np.float32)
        if self.T is not None:
            v = v * self.T[yi, xi]
        if self.gaps is not None:
            v = v * ~self.gaps[yi, xi]
        if self.row_att is not None:
            v = v * self.row_att[yi]
        out[ok] = v
        return out

    def verdict(self, peak: float, thr: float) -> str:
        if peak >= thr:
            return "visible"
        if peak >= AMBIGUOUS * thr:
            return "skip"
        return "invisible"


def _azimuth(az: dict, phi) -> np.ndarray:
    kw = {k: az[k] for k in ("fold", "phase", "kappa", "power", "floor") if k in az}
    if "arcs" in az:
        kw["arcs"] = tuple(tuple(a) for a in az["arcs"])
    return S.azimuth_profile(phi, az["form"], **kw)


def _ring_points(ctx, r0, n=720):
    phi = np.linspace(-math.pi, math.pi, n, endpoint=False, dtype=np.float32)
    xs = ctx.grid.cx + r0 * np.cos(phi)
    ys = ctx.grid.cy + r0 * np.sin(phi)
    return phi, ctx.seen(xs, ys)


def expected_photons(scene: dict, rng: np.random.Generator) -> Rendered:
    """Render the noiseless photon image of ``scene`` (see the module docstring)."""
    ctx = _Ctx(scene)
    H, W = ctx.H, ctx.W
    g = ctx.grid
    ex = scene["exposure"]
    records: list[dict] = []
    if scene["beam_off"]:
        return Rendered(np.zeros((H, W), np.float32), records,
                        {"circular": False, "linear": False}, ctx.gaps, ctx.noise)
    radial = np.zeros(g.radial_axis().size, np.float32)  # isotropic radial parts
    img = np.zeros((H, W), np.float32)  # everything else (relative units)
    r_ax = g.radial_axis()
    for c in scene["components"]:
        k = c["kind"]
        amp = float(c.get("amp", 1.0))
        if k in ("ring", "halo"):
            phi, t = _ring_points(ctx, c["r0"])
            arc = float((t > 0.5).mean())
            if k == "ring" and c["texture"] == "spotty":
                rec = _spotty_ring(ctx, c, amp, img, rng)
                rec["arc_fraction"] = arc
                records.append(rec)
                continue
            az = _azimuth(c["azimuth"], phi)
            peak = ctx.scale * amp * float((t * az).max())
            v = ctx.verdict(peak, ctx.thr_ext)
            if k == "ring" and arc < 0.05:
                v = "invisible" if v == "invisible" else "skip"
            records.append({"kind": k, "texture": c["texture"], "visible": v == "visible",
                            "group": c.get("group"), "r0": c["r0"], "arc_fraction": arc,
                            "peak": peak})
            if v == "skip":
                records[-1]["skipped"] = True
                continue
            prof = S.radial_peak(r_ax, c["r0"], c["fwhm"], c.get("eta", 0.0)) * np.float32(amp)
            if c["azimuth"]["form"] == "uniform":
                radial += prof
            else:
                table = _azimuth(c["azimuth"], g.azimuth_axis())
                img += prof[g.r_index] * table[g.phi_index]
        elif k == "diffuse":
            R = scene["beamstop"].get("radius", 0.0) if scene["beamstop"]["shape"] != "none" else 0
            prof = S.diffuse_profile(r_ax, c["law"], c["length"], c["exponent"])
            ref = min(int((R + 4) / S.RADIAL_STEP), prof.size - 1)
            peak = ctx.scale * amp * float(prof[ref])
            strong = peak >= 10 * ctx.thr_ext
            v = "visible" if strong else ("skip" if peak >= AMBIGUOUS * ctx.thr_ext else
                                          "invisible")
            records.append({"kind": k, "visible": strong, "peak": peak})
            if v == "skip":
                records[-1]["skipped"] = True
                continue
            if "stretch" in c:
                across, along = S.line_distance(g, c["angle"])
                rr = np.sqrt((along / np.float32(c["stretch"])) ** 2
                             + (across * np.float32(c["stretch"])) ** 2)
                img += np.float32(amp) * S.diffuse_profile(rr, c["law"], c["length"],
                                                            c["exponent"])
            else:
                radial += np.float32(amp) * prof
        elif k == "spots":
            records.append(_spots(ctx, c, amp, img))
        elif k == "lattice":
            records.append(_lattice(ctx, c, amp, img))
        elif k == "spots_on_ring":
            n = c["fold"]
            a = c["phase"] + 2 * math.pi * np.arange(n) / n
            xs, ys = g.cx + c["r0"] * np.cos(a), g.cy + c["r0"] * np.sin(a)
            t = ctx.seen(xs, ys)
            nvis = int((ctx.scale * amp * t >= ctx.thr_spot).sum())
            namb = int((ctx.scale * amp * t >= AMBIGUOUS * ctx.thr_spot).sum())
            vis = nvis >= 3
            records.append({"kind": k, "visible": vis, "n_visible": nvis, "fold": n})
            if not vis and namb > 0:
                records[-1]["skipped"] = True
                continue
            S.splat_spots(img, xs, ys, amp, c["sigma"])
        elif k == "streak":
            records.append(_streak(ctx, c, amp, img, scene))
        elif k == "horizon":
            continue  # applied as a row attenuation below
        elif k in ("yoneda", "specular_rod", "bragg_rods"):
            records.append(_grazing_part(ctx, c, img, scene, radial))
        else:
            raise ValueError(f"unknown component kind {k!r}")
    sig = img
    if radial.any():
        sig = sig + radial[g.r_index]
    photons = np.float32(ctx.scale) * sig
    if ctx.horizon is not None:
        records.append(_horizon_record(ctx, scene))
        photons *= ctx.row_att[:, None]
    if ctx.T is not None:
        photons *= ctx.T
    # direct beam (through the stop, or unstopped and attenuated)
    bs = scene["beamstop"]
    on = scene["geometry"]["on_detector"]
    t_c = float(ctx.T[int(round(g.cy)), int(round(g.cx))]) if (on and ctx.T is not None) else 1.0
    sat_ph = ex["saturation_photons"]
    if on and (ex["saturate"] or ex["direct_beam"]):
        level = ex["overflow"] * sat_ph if ex["saturate"] else min(
            0.4 * sat_ph, ex["peak"] * 3) * (1.0 if bs["shape"] == "none" else t_c)
        amp_db = level / max(t_c, 1e-9)
        db = np.zeros((H, W), np.float32)
        S.splat_spots(db, [g.cx], [g.cy], amp_db, 1.2 + 0.15 * ex["overflow"] ** 0.5)
        photons += db * (ctx.T if ctx.T is not None else 1)
    elif ex["saturate"]:  # centre off the frame: one over-bright reflection saturates
        spot = {"kind": "spots", "x": [float(rng.uniform(0.2, 0.8) * W)],
                "y": [float(rng.uniform(0.2, 0.8) * H)], "sigma": [2.5], "elong": [1.0],
                "angle": [0.0], "rel": [1.0], "cluster": False}
        bright = np.zeros((H, W), np.float32)
        rec = _spots(ctx, spot, ex["overflow"] * sat_ph / ctx.scale, bright)
        photons += np.float32(ctx.scale) * bright * (ctx.T if ctx.T is not None else 1)
        records.append(rec)
    # background: flat plus slow gradient and broad air scatter
    bg = ex["background"]
    if bg > 0:
        gx, gy = ex["gradient"]
        L = np.float32(ex["air_radius_frac"] * min(H, W))
        ramp = 1 + np.float32(gx) * (g.dx[None, :] / np.float32(W)) + np.float32(gy) * (
            g.dy[:, None] / np.float32(H))
        air = 1 / (1 + (g.r / L) ** 2)
        back = np.float32(bg) * (np.float32(0.7) * ramp + np.float32(0.6) * air)
        if ctx.T is not None:
            back *= ctx.T
        photons += back
    # cap non-saturating frames below the ceiling
    if not ex["saturate"]:
        top = float(photons.max())
        if top > 0.6 * sat_ph:
            f = 0.6 * sat_ph / top
            photons *= np.float32(f)
            for r in records:
                if "peak" in r:
                    r["peak"] *= f
    if ctx.gaps is not None:
        photons[ctx.gaps] = 0
    np.maximum(photons, 0, out=photons)
    # beamstop visibility: lit surroundings of each part
    lit = photons if ctx.T is None else photons / np.maximum(ctx.T, 1e-6)
    bvis = {}
    for part in ("circular", "linear"):
        rim = ctx.rims.get(part)
        if rim is None or not on:
            bvis[part] = False
            continue
        vals = lit[rim if ctx.gaps is None else rim & ~ctx.gaps]
        bvis[part] = bool(vals.size >= 20 and np.median(vals) >= max(0.5, 0.5 * ctx.noise))
    return Rendered(photons, records, bvis, ctx.gaps, ctx.noise)


def _spotty_ring(ctx, c, amp, img, rng) -> dict:
    g = ctx.grid
    n = c["grains"]
    ph = rng.uniform(-math.pi, math.pi, n)
    rr = c["r0"] + rng.normal(0, c["fwhm"] / 4, n)
    xs, ys = g.cx + rr * np.cos(ph), g.cy + rr * np.sin(ph)
    w = rng.exponential(1.0, n)
    w = (w / w.max()).astype(np.float32)
    t = ctx.seen(xs, ys)
    bright = ctx.scale * amp * w * t
    nvis = int((bright >= ctx.thr_spot).sum())
    vis = nvis >= 8
    rec = {"kind": "ring", "texture": "spotty", "visible": vis, "group": c.get("group"),
           "r0": c["r0"], "n_visible": nvis}
    if not vis and (bright >= AMBIGUOUS * ctx.thr_spot).sum() >= 3:
        rec["skipped"] = True
        return rec
    S.splat_spots(img, xs, ys, amp * w, c["grain_sigma"])
    if c.get("continuum", 0) > 0:
        prof = S.radial_peak(g.radial_axis(), c["r0"], c["fwhm"]) * np.float32(
            amp * c["continuum"] * 0.3)
        img += prof[g.r_index]
    return rec


def _spots(ctx, c, amp, img) -> dict:
    xs, ys = np.asarray(c["x"]), np.asarray(c["y"])
    a = amp * np.asarray(c["rel"], np.float32)
    t = ctx.seen(xs, ys)
    bright = ctx.scale * a * t
    vis = bright >= ctx.thr_spot
    keep = vis | (bright < AMBIGUOUS * ctx.thr_spot)
    S.splat_spots(img, xs[keep], ys[keep], a[keep], np.asarray(c["sigma"])[keep],
                  elong=np.asarray(c["elong"])[keep], angle=np.asarray(c["angle"])[keep])
    return {"kind": "spots", "visible": bool(vis.any()), "n_visible": int(vis.sum()),
            "cluster": c["cluster"]}


def _lattice(ctx, c, amp, img) -> dict:
    g = ctx.grid
    gam = math.radians(c["gamma_deg"])
    rot = c["rotation"]
    a1 = np.array([math.cos(rot), math.sin(rot)]) * c["a"]
    a2 = np.array([math.cos(rot + gam), math.sin(rot + gam)]) * c["b"]
    reach = math.hypot(ctx.H, ctx.W) + abs(g.cx) + abs(g.cy)
    nmax = int(reach / (min(c["a"], c["b"]) * max(math.sin(gam), 0.3))) + 2
    nmax = min(nmax, 120)
    i, j = np.meshgrid(np.arange(-nmax, nmax + 1), np.arange(-nmax, nmax + 1))
    i, j = i.ravel(), j.ravel()
    xs = g.cx + i * a1[0] + j * a2[0]
    ys = g.cy + i * a1[1] + j * a2[1]
    on = (xs > -5) & (xs < ctx.W + 5) & (ys > -5) & (ys < ctx.H + 5) & ((i != 0) | (j != 0))
    xs, ys, i, j = xs[on], ys[on], i[on], j[on]
    q = np.hypot(xs - g.cx, ys - g.cy)
    srng = np.random.default_rng(c["structure_seed"])
    fs = srng.uniform(0.25, 1.0, 64)[(i * 7 + j * 13) % 64]  # a fixed structure factor
    a = (amp * fs * np.exp(-(q / c["debye_waller"]) ** 2)).astype(np.float32)
    t = ctx.seen(xs, ys)
    bright = ctx.scale * a * t
    nvis = int((bright >= ctx.thr_spot).sum())
    vis = nvis >= 8
    rec = {"kind": "lattice", "visible": vis, "n_visible": nvis}
    if not vis and (bright >= AMBIGUOUS * ctx.thr_spot).sum() >= 1:
        rec["skipped"] = True
        return rec
    keep = a > 1e-4
    if keep.any():
        S.splat_spots(img, xs[keep], ys[keep], a[keep], c["sigma"])
    return rec


def _streak(ctx, c, amp, img, scene) -> dict:
    g = ctx.grid
    bs = scene["beamstop"]
    R = bs.get("radius", 0.0) if bs["shape"] != "none" else 0.0
    s = np.arange(0, 2 * max(ctx.H, ctx.W), dtype=np.float32)
    dirs = (1, -1) if c["two_sided"] else (1,)
    decay = (1 + s / np.float32(c["decay_length"])) ** np.float32(-c["decay_power"])
    longest = 0
    for d in dirs:
        xs = g.cx + d * s * math.cos(c["angle"])
        ys = g.cy + d * s * math.sin(c["angle"])
        val = ctx.scale * amp * decay * ctx.seen(xs, ys)
        longest = max(longest, int(((val >= ctx.thr_ext) & (s > R + 2)).sum()))
    vis = longest >= 20
    amb = not vis and longest > 0
    rec = {"kind": "streak", "visible": vis, "length": longest, "width": c["width"]}
    if amb:
        rec["skipped"] = True
        return rec
    across, along = S.line_distance(g, c["angle"])
    if not c["two_sided"]:
        side = np.clip(along + np.float32(0.5), 0, 1)
    else:
        side = np.float32(1)
    prof = S.line_profile(across, c["width"], c["profile"])
    img += np.float32(amp) * prof * side * (1 + np.abs(along) / np.float32(c["decay_length"])) ** \
        np.float32(-c["decay_power"])
    return rec


def _diffuse_row(ctx, scene, row) -> np.ndarray:
    """Relative diffuse intensity along one row (grazing frames)."""
    g = ctx.grid
    d = next((c for c in scene["components"] if c["kind"] == "diffuse"), None)
    if d is None:
        return np.zeros(ctx.W, np.float32)
    r = np.sqrt(g.dx ** 2 + np.float32(row - g.cy) ** 2)
    return np.float32(d["amp"]) * S.diffuse_profile(r, d["law"], d["length"], d["exponent"])


def _horizon_record(ctx, scene) -> dict:
    hz = ctx.horizon
    row = hz["row"]
    if not 3 <= row <= ctx.H - 4:
        return {"kind": "horizon", "visible": False}
    above = int(math.floor(row - 3))
    prof = _diffuse_row(ctx, scene, above) * ctx.seen(np.arange(ctx.W), np.full(ctx.W, above))
    contrast = ctx.scale * float(prof.max()) * (1 - hz["attenuation"])
    return {"kind": "horizon", "visible": contrast >= 3 * ctx.thr_ext, "peak": contrast}


def _grazing_part(ctx, c, img, scene, radial) -> dict:
    g = ctx.grid
    H, W = ctx.H, ctx.W
    yh = ctx.horizon["row"]
    k = c["kind"]
    rows = np.arange(H, dtype=np.float32)
    if k == "yoneda":
        yy = yh - c["offset"]
        band = np.exp(-0.5 * ((rows - np.float32(yy)) / np.float32(c["width"])) ** 2)
        row = int(round(yy))
        if not 0 <= row < H:
            return {"kind": k, "visible": False}
        base = _diffuse_row(ctx, scene, row) * ctx.seen(np.arange(W), np.full(W, row))
        peak = ctx.scale * float(base.max()) * c["gain"]
        v = ctx.verdict(peak, 2 * ctx.thr_ext)
        if v != "skip":
            d = next(cc for cc in scene["components"] if cc["kind"] == "diffuse")
            prof = S.diffuse_profile(g.radial_axis(), d["law"], d["length"], d["exponent"])
            img += (np.float32(c["gain"] * d["amp"]) * band[:, None]) * prof[g.r_index]
        return {"kind": k, "visible": v == "visible", "peak": peak, "skipped": v == "skip"}
    if k == "specular_rod":
        ys_ = np.arange(int(yh) - 1, -1, -1)
        dist = (yh - ys_).astype(np.float32)
        decay = (1 + dist / np.float32(c["decay_length"])) ** np.float32(-c["decay_power"])
        val = ctx.scale * c["amp"] * decay * ctx.seen(np.full(ys_.size, g.cx), ys_)
        n = int((val >= ctx.thr_ext).sum())
        vis = n >= 10
        if not vis and n > 0:
            return {"kind": k, "visible": False, "skipped": True}
        prof = S.line_profile(g.dx[None, :], c["width"])
        dd = np.clip(np.float32(yh) - rows, 0, None)[:, None]
        above = (rows < yh).astype(np.float32)[:, None]
        img += np.float32(c["amp"]) * prof * above * (
            1 + dd / np.float32(c["decay_length"])) ** np.float32(-c["decay_power"])
        ys0 = scene["geometry"].get("specular_row", yh)
        if c.get("spot_amp", 0) > 0:
            S.splat_spots(img, [g.cx], [ys0], c["amp"] * c["spot_amp"], 1.5)
        return {"kind": k, "visible": vis, "n_rows": n}
    # Bragg rods at +-spacing * n from the beam's column
    xs0 = [g.cx + s * c["spacing"] * n for n in range(1, c["orders"] + 1) for s in (1, -1)]
    ys_ = np.arange(int(yh) - 1, -1, -1)
    dist = (yh - ys_).astype(np.float32)
    env = np.exp(-dist / np.float32(c["decay_length"])) * (
        0.55 + 0.45 * np.cos(2 * np.pi * dist / np.float32(c["fringe"])) ** 2)
    nvis = 0
    for n, x0 in enumerate(xs0):
        val = ctx.scale * c["amp"] * env * ctx.seen(np.full(ys_.size, x0), ys_) / (1 + n // 2)
        if int((val >= ctx.thr_ext).sum()) >= 20:
            nvis += 1
    vis = nvis >= 1
    dd = np.clip(np.float32(yh) - rows, 0, None)
    env_img = (np.exp(-dd / np.float32(c["decay_length"])) * (
        0.55 + 0.45 * np.cos(2 * np.pi * dd / np.float32(c["fringe"])) ** 2)
        * (rows < yh))[:, None].astype(np.float32)
    for n, x0 in enumerate(xs0):
        across = (np.arange(W, dtype=np.float32) - np.float32(x0))[None, :]
        img += np.float32(c["amp"] / (1 + n // 2)) * S.line_profile(across, c["width"]) * env_img
    return {"kind": k, "visible": vis, "n_visible": nvis}
