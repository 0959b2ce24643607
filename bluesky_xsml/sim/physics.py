"""Scattering models and the per-pixel detector model of the synthetic generator.

Feature models (all intensities in expected counts per rendered pixel):

* powder rings of crystalline materials: allowed reflections of a crystal
  structure (:data:`CRYSTALS`: LaB6, CeO2, Si) with ``|F|^2`` from the atom
  positions, multiplicity, Lorentz-polarisation and Debye-Waller factors;
  lamellar stacks (silver behenate, ``d = 58.38 A``) with orders ``q_n = n q_1``;
  random lattices (:func:`lattice_reflections`);
* diffuse small-angle scattering: polydisperse spheres, Guinier-Porod
  (Beaucage) and Debye-Bueche models;
* amorphous halos (a broad peak of the structure factor);
* orientation distributions: Maier-Saupe ``exp(m cos^2(phi - phi0))``, written
  as a function of ``cos 2(phi - phi0)`` (centrosymmetric, Friedel's law);
* the Fresnel transmission ``|t(alpha_f)|^2`` of grazing incidence (Yoneda peak).

:func:`render_counts` turns 1-D radial/azimuthal profiles, separable terms and
a spot image into a frame: beamstop shadow, dark counts, Poisson counting
statistics, read noise, counter saturation and module gaps, in one numba pass.

Examples
--------
>>> q, inten, hkl = crystal_reflections("LaB6", 2.0)
>>> round(float(q[0]), 4), hkl[0]
(1.5115, (1, 0, 0))
"""

from __future__ import annotations

import math
from functools import lru_cache
from statistics import NormalDist

import numpy as np
from numba import njit

from ..errors import ConfigurationError
from .geometry import RADIAL_SAMPLING, SceneGeometry

__all__ = [
    "CRYSTALS",
    "LAMELLAR_D",
    "RADIAL_SAMPLING",
    "crystal_reflections",
    "lattice_reflections",
    "lamellar_orders",
    "lorentz_polarization",
    "sphere_intensity",
    "guinier_porod",
    "debye_bueche",
    "gaussian_peak",
    "maier_saupe_table",
    "fresnel_t2",
    "render_counts",
    "splat_spots",
    "draw_streaks",
    "azimuth_weight",
    "azimuth_form_table",
    "azimuth_form_weight",
    "feature_azimuth_weight",
    "gaussian_noise",
    "diffuse_shape",
    "feature_spots",
    "grazing_factor",
    "grazing_factor_rows",
    "grazing_terms",
    "lattice_spots",
    "on_ring_spots",
    "radial_profile",
    "ring_geometry",
    "ring_profile",
    "rod_positions",
    "textured_grains",
]

#: Points of the orientation tables over ``cos 2(phi - phi0)`` in [-1, 1].
ORIENT_TABLE = 2048

# Crystal structures: cubic lattice constant (A) and fractional atom positions.
_FCC = ((0, 0, 0), (0, 0.5, 0.5), (0.5, 0, 0.5), (0.5, 0.5, 0))
_X_B = 0.1975  # boron x in LaB6 (Pm-3m, 6f)
CRYSTALS: dict[str, dict] = {
    "LaB6": {"a": 4.1569, "atoms": [("La", (0, 0, 0))] + [
        ("B", p) for p in ((_X_B, .5, .5), (-_X_B, .5, .5), (.5, _X_B, .5), (.5, -_X_B, .5),
                           (.5, .5, _X_B), (.5, .5, -_X_B))]},
    "CeO2": {"a": 5.411, "atoms": [("Ce", f) for f in _FCC]
             + [("O", tuple(np.add(f, s) % 1))
                for f in _FCC for s in ((.25, .25, .25), (.75, .75, .75))]},
    "Si": {"a": 5.431, "atoms": [("Si", f) for f in _FCC]
           + [("Si", tuple(np.add(f, (.25, .25, .25)) % 1)) for f in _FCC]},
}
#: Lamellar calibrants: long period in angstrom.
LAMELLAR_D: dict[str, float] = {"AgBH": 58.38}
_Z = {"La": 57, "B": 5, "Ce": 58, "O": 8, "Si": 14}


def _form_factor(el: str, q: np.ndarray) -> np.ndarray:
    # Crude atomic form factor: Z exp(-a s^2), s = q / 4 pi, a ~ 3 A^2 (heavier atoms
    # fall off more slowly); adequate for relative ring intensities.
    s2 = (q / (4 * np.pi)) ** 2
    return _Z[el] * np.exp(-(2.0 + 30.0 / _Z[el]) * s2)


@lru_cache(maxsize=32)
def _crystal_table(name: str, nmax: int):
    spec = CRYSTALS[name]
    a = spec["a"]
    rng = np.arange(-nmax, nmax + 1)
    h, k, l = (g.ravel() for g in np.meshgrid(rng, rng, rng, indexing="ij"))
    n2 = h * h + k * k + l * l
    keep = n2 > 0
    h, k, l, n2 = h[keep], k[keep], l[keep], n2[keep]
    q = 2 * np.pi * np.sqrt(n2) / a
    F = np.zeros(q.shape, complex)
    for el, (x, y, z) in spec["atoms"]:
        F += _form_factor(el, q) * np.exp(2j * np.pi * (h * x + k * y + l * z))
    f2 = np.abs(F) ** 2
    uniq, inv = np.unique(n2, return_inverse=True)
    tot = np.bincount(inv, weights=f2)
    qs = 2 * np.pi * np.sqrt(uniq) / a
    keep = tot > 1e-6 * tot.max()
    reps = []
    for n in uniq[keep]:
        i = np.flatnonzero(n2 == n)
        cand = sorted({tuple(sorted(np.abs([h[j], k[j], l[j]]), reverse=True)) for j in i})
        reps.append(tuple(int(v) for v in cand[0]))
    return qs[keep], tot[keep], tuple(reps)


def crystal_reflections(name: str, q_max: float):
    """Powder reflections of a cubic crystal up to ``q_max`` (1/A).

    Returns
    -------
    q : ndarray
        Distinct ``q = 2 pi sqrt(h^2 + k^2 + l^2) / a`` of allowed reflections.
    intensity : ndarray
        Summed ``|F|^2`` over each ``{hkl}`` family (includes multiplicity).
    hkl : tuple of tuple
        One representative ``(h, k, l)`` per ring.
    """
    if name not in CRYSTALS:
        raise KeyError(f"unknown crystal {name!r}; known: {', '.join(CRYSTALS)}")
    q, f2, hkl = _crystal_table(name, 14)
    m = q <= q_max
    return q[m], f2[m], tuple(h for h, keep in zip(hkl, m, strict=True) if keep)


def lattice_reflections(kind: str, a: float, c: float, q_max: float, rng: np.random.Generator):
    """Distinct reflections of a generic lattice with random structure factors.

    Parameters
    ----------
    kind : str
        ``"cubic_P"``, ``"cubic_I"``, ``"cubic_F"``, ``"tetragonal"`` or
        ``"hexagonal"``.
    a, c : float
        Lattice constants in angstrom (``c`` unused for cubic lattices).
    q_max : float
        Largest ``q`` (1/A) to return.
    rng : numpy.random.Generator
        Draws the ``|F|^2`` of each family (exponential, Wilson statistics).

    Returns
    -------
    q, intensity : ndarray
        Sorted distinct ``q`` and relative intensities (multiplicity included).
    """
    h, k, l = _hkl_grid(kind)
    if kind == "hexagonal":
        inv_d2 = 4.0 / 3.0 * (h * h + h * k + k * k) / a**2 + l * l / c**2
    elif kind == "tetragonal":
        inv_d2 = (h * h + k * k) / a**2 + l * l / c**2
    else:
        inv_d2 = (h * h + k * k + l * l) / a**2
    q = 2 * np.pi * np.sqrt(inv_d2)
    keyq = np.round(q, 4)
    uniq, counts = np.unique(keyq[q <= q_max], return_counts=True)
    f2 = rng.exponential(1.0, uniq.size) + 0.05
    return uniq, counts * f2


def lamellar_orders(d: float, q_max: float, disorder: float = 0.0):
    """Orders ``q_n = 2 pi n / d`` of a lamellar stack and their relative intensity.

    Intensity falls as ``n^-2 exp(-(n * disorder)^2)`` (form factor envelope
    and paracrystalline disorder).
    """
    n = np.arange(1, int(q_max * d / (2 * np.pi)) + 1)
    q = 2 * np.pi * n / d
    return q, n.astype(float) ** -2 * np.exp(-(n * disorder) ** 2), n


def lorentz_polarization(two_theta):
    """Powder Lorentz-polarisation factor ``(1 + cos^2 2t) / (sin^2 t cos t)``, unpolarised."""
    t = 0.5 * np.asarray(two_theta, dtype=np.float64)
    return (1 + np.cos(2 * t) ** 2) / np.maximum(np.sin(t) ** 2 * np.cos(t), 1e-12)


@lru_cache(maxsize=1)
def _hermite_nodes():
    return np.polynomial.hermite_e.hermegauss(15)


@lru_cache(maxsize=8)
def _hkl_grid(kind: str, nmax: int = 6):
    r = np.arange(-nmax, nmax + 1)
    h, k, l = (g.ravel() for g in np.meshgrid(r, r, r, indexing="ij"))
    nz = (h != 0) | (k != 0) | (l != 0)
    h, k, l = h[nz], k[nz], l[nz]
    if kind == "cubic_I":
        ok = (h + k + l) % 2 == 0
    elif kind == "cubic_F":
        ok = ((h % 2) == (k % 2)) & ((k % 2) == (l % 2))
    else:
        ok = np.ones(h.shape, bool)
    return h[ok], k[ok], l[ok]


def sphere_intensity(q, radius: float, polydispersity: float):
    """Form factor of polydisperse homogeneous spheres, 1 at ``q = 0``.

    ``P(x) = [3 (sin x - x cos x) / x^3]^2`` averaged over a Gaussian size
    distribution (relative width ``polydispersity``) weighted by ``V^2``.
    """
    q = np.asarray(q, dtype=np.float64)
    nodes, weights = _hermite_nodes()
    radii = radius * np.clip(1 + polydispersity * nodes, 0.05, None)
    w = weights * radii**6
    w = w / w.sum()
    out = np.zeros_like(q)
    for rad, wi in zip(radii, w, strict=True):
        x = np.maximum(q * rad, 1e-6)
        p = 3 * (np.sin(x) - x * np.cos(x)) / x**3
        out += wi * p * p
    return out


def guinier_porod(q, rg: float, porod_exp: float):
    """Beaucage unified Guinier-Porod model, 1 at ``q = 0``."""
    from scipy.special import erf, gamma

    q = np.maximum(np.asarray(q, dtype=np.float64), 1e-9)
    P = porod_exp
    B = P / rg**P * gamma(P / 2)
    return np.exp(-(q * rg) ** 2 / 3) + B * (erf(q * rg / math.sqrt(6)) ** 3 / q) ** P


def debye_bueche(q, xi: float):
    """Debye-Bueche random two-phase medium ``1 / (1 + q^2 xi^2)^2``."""
    q = np.asarray(q, dtype=np.float64)
    return 1.0 / (1.0 + (q * xi) ** 2) ** 2


def gaussian_peak(q, q0: float, fwhm: float):
    """Gaussian peak of unit height at ``q0`` with full width ``fwhm``."""
    s = fwhm / 2.3548200450309493
    return np.exp(-0.5 * ((np.asarray(q, dtype=np.float64) - q0) / s) ** 2)


def maier_saupe_table(kappa: float, n: int = ORIENT_TABLE) -> np.ndarray:
    """Orientation distribution ``exp(kappa (cos 2 dphi - 1))`` tabulated over ``cos 2 dphi``.

    Maximum 1 along the director (``dphi = 0, 180 deg``), minimum ``exp(-2 kappa)``.
    Entry ``i`` holds the value at ``cos 2 dphi = -1 + 2 i / (n - 1)``.
    """
    c = np.linspace(-1.0, 1.0, n)
    return np.exp(kappa * (c - 1.0)).astype(np.float32)


def fresnel_t2(alpha_f, alpha_c: float, beta_ratio: float = 0.02):
    """Fresnel transmission ``|t(alpha_f)|^2`` of a flat substrate (angles in rad).

    Peaks near the critical angle ``alpha_c`` (the Yoneda peak) and vanishes at
    the horizon; ``beta_ratio`` is ``beta / delta`` of the refractive index.
    """
    a = np.asarray(alpha_f, dtype=np.float64)
    sa = np.sin(np.maximum(a, 0.0))
    sc2 = math.sin(alpha_c) ** 2
    kz = np.sqrt(sa * sa - sc2 + 1j * beta_ratio * sc2)
    t = 2 * sa / (sa + kz + 1e-30)
    return np.where(a > 0, np.abs(t) ** 2, 0.0)


# ---------------------------------------------------------------------------
# Features of a scene: where they fall and how bright they are (shared by the
# renderer and the label rules).  ``ctx`` is a
# :class:`~bluesky_xsml.sim.geometry.SceneGeometry`.


def ring_geometry(f: dict, ctx: SceneGeometry):
    """Radii (px), Gaussian sigmas (px) and amplitudes of a ring set."""
    q = np.asarray(f["q"], dtype=np.float64)
    amp = np.asarray(f["amp"], dtype=np.float64)
    r = ctx.r(q)
    rel = float(f["fwhm_rel"])
    dr = ctx.r(q * (1 + 0.5 * rel)) - ctx.r(q * (1 - 0.5 * rel))
    sig = np.maximum(np.nan_to_num(dr, nan=1.0, posinf=1.0) / 2.3548, 0.5)
    return r, sig, amp


def textured_grains(f: dict, ctx: SceneGeometry, r, sig, amp):
    """Grain spots of a textured ring set: x, y, amp, sigma, ring index."""
    grains = f.get("grains")
    if grains is None:
        grains = [60] * len(r)
    rng = np.random.Generator(np.random.PCG64(int(f.get("seed", 0))))
    gs = float(f.get("grain_sigma_px") or 0.0)
    xs, ys, amps, sigs, idx = [], [], [], [], []
    for k, (rk, sk, ak, nk) in enumerate(zip(r, sig, amp, grains, strict=False)):
        nk = int(nk)
        phi = rng.uniform(0, 2 * np.pi, nk)
        rr = rk + rng.normal(0, 0.25 * sk, nk)
        a = ak * np.clip(rng.lognormal(0.0, 0.3, nk), 0.7, 1.5)
        s = max(gs, sk, 0.6)
        if not math.isfinite(rk):
            continue
        xs.append(ctx.cx + rr * np.cos(phi))
        ys.append(ctx.cy - rr * np.sin(phi))
        amps.append(a)
        sigs.append(np.full(nk, s))
        idx.append(np.full(nk, k))
    if not xs:
        e = np.zeros(0)
        return e, e, e, e, np.zeros(0, int)
    return (np.concatenate(xs), np.concatenate(ys), np.concatenate(amps), np.concatenate(sigs),
            np.concatenate(idx))


def lattice_spots(f: dict, ctx: SceneGeometry):
    """Spots of a 2-D reciprocal lattice: x, y, amp, sigma."""
    a = np.asarray(f["a_star"], dtype=np.float64)
    b = np.asarray(f["b_star"], dtype=np.float64)
    n = int(f["hk_max"])
    hh, kk = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    hh, kk = hh.ravel(), kk.ravel()
    keep = (hh != 0) | (kk != 0)
    hh, kk = hh[keep], kk[keep]
    qv = hh[:, None] * a[None, :] + kk[:, None] * b[None, :]
    qn = np.hypot(qv[:, 0], qv[:, 1])
    rng = np.random.Generator(np.random.PCG64(int(f["seed"])))
    fhk = rng.uniform(0.7, 1.0, qn.size)
    amp = float(f["amp"]) * np.exp(-0.5 * (qn / float(f["envelope_q"])) ** 2) * fhk
    r = ctx.r(qn)
    ok = np.isfinite(r) & (amp >= float(f["min_amp"]))
    r, qv, amp = r[ok], qv[ok], amp[ok]
    phi = np.arctan2(qv[:, 1], qv[:, 0])
    x = ctx.cx + r * np.cos(phi)
    y = ctx.cy - r * np.sin(phi)
    return x, y, amp, np.full(amp.size, float(f["sigma_px"]))


def on_ring_spots(f: dict, ctx: SceneGeometry):
    n = int(f["n_fold"])
    r = float(ctx.r(float(f["q"])))
    phi = np.radians(float(f["orient_deg"])) + 2 * np.pi * np.arange(n) / n
    rng = np.random.Generator(np.random.PCG64(int(f["seed"])))
    amp = float(f["amp"]) * rng.uniform(0.9, 1.1, n)
    x = ctx.cx + r * np.cos(phi)
    y = ctx.cy - r * np.sin(phi)
    return x, y, amp, np.full(n, float(f["sigma_px"]))


def feature_spots(f: dict, ctx: SceneGeometry):
    """All Gaussian spots a feature draws: x, y, amp, sigma (arrays)."""
    t = f["type"]
    if t == "rings" and f["style"] == "textured":
        r, sig, amp = ring_geometry(f, ctx)
        return textured_grains(f, ctx, r, sig, amp)[:4]
    if t == "spots":
        xy = np.asarray(f["xy"], dtype=np.float64).reshape(-1, 2)
        return xy[:, 0], xy[:, 1], np.asarray(f["amp"], float), np.asarray(f["sigma_px"], float)
    if t == "lattice":
        return lattice_spots(f, ctx)
    if t == "on_ring":
        return on_ring_spots(f, ctx)
    if t == "direct_beam":
        return (np.array([ctx.cx]), np.array([ctx.cy]), np.array([float(f["amp"])]),
                np.array([float(f["sigma_px"])]))
    if t == "specular_rod" and float(f["peak_amp"]) > 0 and ctx.gi:
        y = float(ctx.rows_for_alpha(ctx.alpha_i))
        return (np.array([ctx.cx]), np.array([y]), np.array([float(f["peak_amp"])]),
                np.array([max(float(f["width_px"]), 1.0)]))
    return None


def diffuse_shape(f: dict, q):
    m = f["model"]
    if m == "spheres":
        return sphere_intensity(q, float(f["radius_A"]), float(f["polydispersity"]))
    if m == "guinier_porod":
        return guinier_porod(q, float(f["rg_A"]), float(f["porod_exp"]))
    if m == "debye_bueche":
        return debye_bueche(q, float(f["xi_A"]))
    raise ConfigurationError(
        f"unknown diffuse model {m!r}; use spheres, guinier_porod or debye_bueche")


def radial_profile(f: dict, ctx: SceneGeometry, r=None):
    """Radial intensity of a smooth feature (diffuse, halo) at radii ``r`` (default: grid)."""
    if r is None:
        q, cos3 = ctx.q_grid, ctx.cos3
    else:
        r = np.asarray(r, dtype=np.float64)
        q = ctx.q(r)
        cos3 = np.cos(np.arctan(r * ctx.p / ctx.D)) ** 3
    if f["type"] == "diffuse":
        return float(f["i0"]) * diffuse_shape(f, q) * cos3
    q0 = float(f["q0"])
    return float(f["amp"]) * gaussian_peak(q, q0, float(f["fwhm_rel"]) * q0)


def grazing_terms(f: dict, ctx: SceneGeometry):
    """Row and column factors (rank-1) of a grazing-incidence feature."""
    rows = np.arange(ctx.h)
    af = np.maximum(ctx.alpha_f(rows), 0.0)
    cols = np.arange(ctx.w, dtype=np.float64)
    t = f["type"]
    if t == "gi_diffuse":
        R = float(f["amp"]) * np.exp(-af / math.radians(float(f["decay_deg"])))
        qx = ctx.q(np.abs(cols - ctx.cx))
        C = 1.0 / (1.0 + (qx / float(f["qy_hwhm"])) ** 2)
    elif t == "specular_rod":
        R = float(f["amp"]) * np.exp(-af / math.radians(float(f["decay_deg"])))
        s = float(f["width_px"])
        C = np.exp(-0.5 * ((cols - ctx.cx) / s) ** 2)
    else:  # bragg_rods
        R = np.exp(-af / math.radians(float(f["decay_deg"])))
        C = np.zeros(ctx.w)
        s = float(f["width_px"])
        for xpos, a in rod_positions(f, ctx):
            C += a * np.exp(-0.5 * ((cols - xpos) / s) ** 2)
    return R, C


def rod_positions(f: dict, ctx: SceneGeometry):
    out = []
    for n, a in enumerate(f["amp"], start=1):
        dx = float(ctx.r(n * float(f["qy"])))
        if math.isfinite(dx):
            out += [(ctx.cx - dx, a), (ctx.cx + dx, a)]
    return out


def grazing_factor(ctx: SceneGeometry, y):
    """Grazing-incidence factor at rows ``y``: Fresnel transmission |t(alpha_f)|^2
    above the horizon (1 without a Yoneda peak), ``below`` under it."""
    y = np.asarray(y, dtype=np.float64)
    gi = ctx.gi
    if not gi:
        return np.ones(y.shape)
    af = ctx.alpha_f(y)
    if gi.get("yoneda", True):
        above = fresnel_t2(af, ctx.alpha_c, float(gi["beta_ratio"]))
    else:
        above = np.ones(y.shape)
    frac = np.clip(ctx.horizon - y + 0.5, 0.0, 1.0)
    below = float(gi["below"])
    return below + (1.0 - below) * frac * above


def grazing_factor_rows(ctx: SceneGeometry):
    """Grazing-incidence factor of every image row (float32)."""
    return grazing_factor(ctx, np.arange(ctx.h, dtype=np.float64)).astype(np.float32)


def ring_profile(nr: int, r, sig, amp) -> np.ndarray:
    prof = np.zeros(nr, np.float64)
    for rk, sk, ak in zip(r, sig, amp, strict=False):
        if not math.isfinite(rk) or ak <= 0:
            continue
        half = 5.0 * sk + 1.0
        lo = max(0, int((rk - half) * RADIAL_SAMPLING))
        hi = min(nr, int((rk + half) * RADIAL_SAMPLING) + 2)
        if lo >= hi:
            continue
        rr = np.arange(lo, hi) / RADIAL_SAMPLING
        prof[lo:hi] += ak * np.exp(-0.5 * ((rr - rk) / sk) ** 2)
    return prof


def azimuth_weight(kappa: float, orient_deg: float, n: int = 180):
    phi = (np.arange(n) + 0.5) * (2 * np.pi / n)
    return np.exp(kappa * (np.cos(2 * (phi - math.radians(orient_deg))) - 1.0))


def _fold_shape(az: dict, cos_n):
    """``g`` in [0, 1] of an n-fold azimuthal form, given ``cos(n dphi)``."""
    form = az["form"]
    if form == "cos_n":
        # ((1 + cos n dphi) / 2)^p = cos^(2p)(n dphi / 2): p = 1 is the smooth cos^2 form
        return (0.5 * (1.0 + cos_n)) ** float(az["p"])
    if form == "von_mises":
        return np.exp(float(az["kappa"]) * (cos_n - 1.0))
    raise ConfigurationError(f"unknown azimuthal form {form!r}; use 'cos_n' or 'von_mises'")


def azimuth_form_weight(az: dict, orient_deg: float, phi):
    """Weight ``1 - depth + depth * g(n (phi - phi0))`` of an n-fold form at azimuths ``phi`` (rad).

    ``az`` = ``{"form": "cos_n", "n": 2|4|6, "p": power, "depth": d}`` or
    ``{"form": "von_mises", "n": ..., "kappa": k, "depth": d}``; maximum 1 along
    ``orient_deg`` (and every ``360/n`` degrees), minimum about ``1 - depth``.
    """
    n = int(az["n"])
    cos_n = np.cos(n * (np.asarray(phi, dtype=np.float64) - math.radians(orient_deg)))
    d = float(az["depth"])
    return 1.0 - d + d * _fold_shape(az, cos_n)


def azimuth_form_table(az: dict, n: int = ORIENT_TABLE) -> np.ndarray:
    """The form of :func:`azimuth_form_weight` tabulated over ``c = cos 2 dphi``.

    Even folds are polynomials of ``c`` (Chebyshev: ``cos 4x = 2c^2 - 1``,
    ``cos 6x = 4c^3 - 3c``), so the renderer's orientation tables hold them.
    """
    fold = int(az["n"])
    if fold not in (2, 4, 6):
        raise ConfigurationError(f"azimuthal fold must be 2, 4 or 6, got {fold}")
    c = np.linspace(-1.0, 1.0, n)
    cos_n = np.polynomial.chebyshev.chebval(c, [0.0] * (fold // 2) + [1.0])
    d = float(az["depth"])
    return (1.0 - d + d * _fold_shape(az, cos_n)).astype(np.float32)


def feature_azimuth_weight(f: dict, n: int = 180):
    """Azimuthal weight of a ring/halo/diffuse feature at ``n`` azimuths.

    The feature's ``azimuth`` form when it has one, else Maier-Saupe ``kappa``.
    """
    az = f.get("azimuth")
    if az:
        phi = (np.arange(n) + 0.5) * (2 * np.pi / n)
        return azimuth_form_weight(az, float(f["orient_deg"]), phi)
    return azimuth_weight(float(f["kappa"]), float(f["orient_deg"]), n)


# ---------------------------------------------------------------------------
# Detector model: numba kernels

_POIS_STEP = 32           # lambda grid of the Poisson CDF table: 1/32
_POIS_LMAX = 16.0         # exact (tabulated) below, normal approximation above
_POIS_KMAX = 64


@lru_cache(maxsize=1)
def _tables():
    """Normal quantiles, Poisson CDFs on a lambda grid and their inverse over u."""
    nd = NormalDist()
    p = np.clip(np.arange(4097) / 4096.0, 0.25 / 4096, 1 - 0.25 / 4096)
    ztab = np.array([nd.inv_cdf(float(v)) for v in p])
    lam = np.arange(int(_POIS_LMAX * _POIS_STEP) + 2) / _POIS_STEP
    k = np.arange(_POIS_KMAX)
    logf = np.cumsum(np.log(np.maximum(k, 1)))
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = k[None, :] * np.log(lam[:, None]) - lam[:, None] - logf[None, :]
    pmf = np.exp(logp)
    pmf[0, :] = 0.0
    pmf[0, 0] = 1.0
    cdf = np.minimum(np.cumsum(pmf, axis=1), 1.0)
    cdf[:, -1] = 1.0
    # inv[row, b]: smallest k with cdf[row, k] >= b / 1024 (a lower bound for u in bin b)
    edges = np.arange(1024) / 1024.0
    inv = np.empty((lam.size, 1024), np.uint8)
    for r in range(lam.size):
        inv[r] = np.searchsorted(cdf[r], edges, side="left")
    return ztab, cdf, inv


_U64_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_U64_MIX2 = np.uint64(0x94D049BB133111EB)
_U64_GOLD = np.uint64(0x9E3779B97F4A7C15)


@njit(inline="always")
def _mix64(z):
    z = (z ^ (z >> np.uint64(30))) * _U64_MIX1
    z = (z ^ (z >> np.uint64(27))) * _U64_MIX2
    return z ^ (z >> np.uint64(31))


@njit(inline="always")
def _ztab(ztab, u):
    t = u * 4096.0
    i = int(t)
    if i > 4095:
        i = 4095
    f = t - i
    return ztab[i] + f * (ztab[i + 1] - ztab[i])


@njit(nogil=True, cache=True, error_model="numpy")
def _expected_kernel(lam, cx, cy, rs, p_iso, pk, ktab, kcs, rows, cols, t_row,
                     bg_rad, bg_row, bg_col, spots, bs, dark):
    # Pass 1: expected counts of every pixel, row by row with the column loop
    # innermost (vectorised by LLVM).
    h, w = lam.shape
    nr = p_iso.shape[0]
    K = pk.shape[0]
    nt = ktab.shape[1]
    M = rows.shape[0]
    use_t = t_row.shape[0] == h
    use_spots = spots.shape[0] == h and spots.shape[1] == w
    bs_type = int(bs[0])
    bs_r, bs_hw, bs_ux, bs_uy, bs_t, bs_edge = bs[1], bs[2], bs[3], bs[4], bs[5], bs[6]
    inv_edge = 1.0 / max(bs_edge, 1e-6)
    tscale = (nt - 1) * 0.5
    rb = np.empty(w, np.int64)
    rr = np.empty(w, np.float64)
    c2 = np.empty(w, np.float64)
    s2 = np.empty(w, np.float64)
    srow = np.empty(w, np.float64)
    for i in range(h):
        dy = i - cy
        for j in range(w):
            dx = j - cx
            r = math.sqrt(dx * dx + dy * dy)
            rr[j] = r
            b = min(int(r * rs + 0.5), nr - 1)
            rb[j] = b
            srow[j] = p_iso[b]
        if K > 0:
            for j in range(w):
                dx = j - cx
                inv = 1.0 / max(dx * dx + dy * dy, 1e-12)
                c2[j] = (dx * dx - dy * dy) * inv      # cos 2 phi
                s2[j] = -2.0 * dx * dy * inv           # sin 2 phi (y up)
        for k in range(K):
            ck = kcs[k, 0]
            sk = kcs[k, 1]
            for j in range(w):
                c = c2[j] * ck + s2[j] * sk
                srow[j] += pk[k, rb[j]] * ktab[k, int((c + 1.0) * tscale + 0.5)]
        for m in range(M):
            rm = rows[m, i]
            for j in range(w):
                srow[j] += rm * cols[m, j]
        if use_spots:
            for j in range(w):
                srow[j] += spots[i, j]
        ti = t_row[i] if use_t else 1.0
        bri = bg_row[i]
        for j in range(w):
            srow[j] = srow[j] * ti + bg_rad[rb[j]] * (bg_col[j] + bri)
        if bs_type > 0:
            for j in range(w):
                dx = j - cx
                along = dx * bs_ux + dy * bs_uy
                perp = abs(dx * bs_uy - dy * bs_ux) - bs_hw
                if bs_type == 1:
                    d = rr[j] - bs_r
                    if bs_hw > 0.0 and along > 0.0:
                        d = min(d, perp)
                else:
                    d = perp if along >= 0.0 else rr[j] - bs_hw
                f = min(max(d * inv_edge + 0.5, 0.0), 1.0)
                srow[j] *= bs_t + (1.0 - bs_t) * f
        for j in range(w):
            lam[i, j] = srow[j] + dark


@njit(nogil=True, cache=True, error_model="numpy")
def _count_kernel(out, lam, ccd, cutoff, gap_row, gap_col, mask_value, seed, cdf, inv, ztab):
    # Pass 2: Poisson counts (exact below 16 via tabulated inverse CDFs, rounded
    # skew-corrected normal above), read noise, cut-off, gaps, final dtype.
    h, w = out.shape
    gain, offset, read_sigma, is_ccd = ccd[0], ccd[1], ccd[2], ccd[3] > 0.5
    sd = np.uint64(seed)
    for i in range(h):
        grow = gap_row[i]
        base = np.uint64(i * w)
        for j in range(w):
            if grow or gap_col[j]:
                out[i, j] = mask_value
                continue
            lm = lam[i, j]
            hsh = _mix64(sd + (base + np.uint64(j)) * _U64_GOLD)
            hi32 = np.int64(hsh >> np.uint64(32))
            if lm <= 0.0:
                k_cnt = 0.0
            elif lm < 16.0:
                x = lm * 32.0
                row = int(x)
                if float(np.int64(hsh & np.uint64(0xFFFF))) * 1.52587890625e-05 < x - row:
                    row += 1
                u = float(hi32) * 2.3283064365386963e-10
                kk = int(inv[row, hi32 >> 22])
                while kk < 63 and u > cdf[row, kk]:
                    kk += 1
                k_cnt = float(kk)
            else:
                z = _ztab(ztab, float(hi32) * 2.3283064365386963e-10)
                k_cnt = math.floor(lm + math.sqrt(lm) * z + (z * z - 1.0) / 6.0 + 0.5)
                if k_cnt < 0.0:
                    k_cnt = 0.0
            if is_ccd:
                # read noise: normal quantile of 12 further random bits
                kz = np.int64((hsh >> np.uint64(20)) & np.uint64(0xFFF))
                z2 = 0.5 * (ztab[kz] + ztab[kz + 1])
                v = gain * k_cnt + offset + read_sigma * z2
                # ADC-like quantisation to 1/16 count keeps frames compressible
                out[i, j] = min(max(math.floor(v * 16.0 + 0.5) * 0.0625, 0.0), cutoff)
            else:
                out[i, j] = min(k_cnt, cutoff)


@njit(nogil=True, cache=True, error_model="numpy")
def _splat_kernel(buf, xs, ys, amps, sig):
    h, w = buf.shape
    for n in range(xs.shape[0]):
        a = amps[n]
        if a <= 0:
            continue
        s = sig[n]
        rad = int(s * math.sqrt(2.0 * math.log(max(a, 1.0) / 1e-3)) + 1.5)
        x0 = xs[n]
        y0 = ys[n]
        i0 = max(0, int(math.floor(y0)) - rad)
        i1 = min(h, int(math.floor(y0)) + rad + 2)
        j0 = max(0, int(math.floor(x0)) - rad)
        j1 = min(w, int(math.floor(x0)) + rad + 2)
        if i0 >= i1 or j0 >= j1:
            continue
        inv = 0.5 / (s * s)
        for i in range(i0, i1):
            dy = i - y0
            ey = a * math.exp(-dy * dy * inv)
            for j in range(j0, j1):
                dx = j - x0
                buf[i, j] += ey * math.exp(-dx * dx * inv)


@njit(nogil=True, cache=True, error_model="numpy")
def _streak_kernel(buf, cx, cy, angle, amp, r0, p, sigma):
    # A line through (cx, cy) at `angle` (rad, y up); intensity amp * min(1, r0 / s)^p
    # at distance s from the beam; Gaussian cross-section of width sigma.
    h, w = buf.shape
    ux = math.cos(angle)
    uy = -math.sin(angle)  # image rows point down
    half = int(3.0 * sigma + 1.5)
    inv = 0.5 / (sigma * sigma)
    if abs(ux) >= abs(uy):
        for j in range(w):
            t = (j - cx) / ux
            yl = cy + t * uy
            s = abs(t)
            a = amp if s <= r0 else amp * (r0 / s) ** p
            ic = int(math.floor(yl + 0.5))
            for i in range(max(0, ic - half), min(h, ic + half + 1)):
                d = (i - yl) * ux
                buf[i, j] += a * math.exp(-d * d * inv)
    else:
        for i in range(h):
            t = (i - cy) / uy
            xl = cx + t * ux
            s = abs(t)
            a = amp if s <= r0 else amp * (r0 / s) ** p
            jc = int(math.floor(xl + 0.5))
            for j in range(max(0, jc - half), min(w, jc + half + 1)):
                d = (j - xl) * uy
                buf[i, j] += a * math.exp(-d * d * inv)


@njit(nogil=True, cache=True, error_model="numpy")
def _gauss_kernel(v, sigma, seed, ztab, multiply):
    # Per-pixel normal deviates from the pixel index and seed (as in _count_kernel).
    h, w = v.shape
    sd = np.uint64(seed)
    for i in range(h):
        base = np.uint64(i * w)
        for j in range(w):
            hsh = _mix64(sd + (base + np.uint64(j)) * _U64_GOLD)
            z = _ztab(ztab, float(np.int64(hsh >> np.uint64(32))) * 2.3283064365386963e-10)
            if multiply:
                v[i, j] *= 1.0 + sigma * z
            else:
                v[i, j] += sigma * z


def gaussian_noise(v: np.ndarray, sigma: float, seed: int, multiply: bool = False) -> None:
    """Add ``sigma`` x N(0, 1) to ``v`` (or multiply it by ``1 + sigma`` x N(0, 1)) in place.

    The deviate of each pixel is a pure function of ``seed`` and its index.
    """
    ztab = _tables()[0]
    _gauss_kernel(v, float(sigma), int(seed) & 0x7FFFFFFFFFFFFFFF, ztab, bool(multiply))


def splat_spots(buf: np.ndarray, xs, ys, amps, sigmas) -> None:
    """Add Gaussian spots (peak ``amps`` counts, width ``sigmas`` px) to ``buf`` in place."""
    f8 = np.float64
    _splat_kernel(buf, np.ascontiguousarray(xs, f8), np.ascontiguousarray(ys, f8),
                  np.ascontiguousarray(amps, f8), np.ascontiguousarray(sigmas, f8))


def draw_streaks(buf: np.ndarray, cx: float, cy: float, angles_deg, amp: float, r0: float,
                 decay: float, width: float) -> None:
    """Add straight streaks through ``(cx, cy)`` to ``buf`` in place.

    Each streak has peak ``amp`` counts within ``r0`` pixels of the beam and
    falls as ``(r0 / s)^decay`` beyond; ``width`` is the Gaussian sigma (px).
    """
    for a in angles_deg:
        _streak_kernel(buf, float(cx), float(cy), math.radians(float(a)), float(amp),
                       float(max(r0, 0.5)), float(decay), float(max(width, 0.3)))


def render_counts(out: np.ndarray, *, center, p_iso, pk, ktab, kcs, rows, cols, t_row,
                  bg_rad, bg_row, bg_col, spots, beamstop, dark: float, ccd, cutoff: float,
                  gap_row, gap_col, mask_value: float, seed: int) -> np.ndarray:
    """Fill ``out`` (the frame, in its final dtype) with one noisy realisation.

    The expected counts of pixel ``(i, j)`` at radius ``r`` are::

        lam = (p_iso[r] + sum_k pk[k, r] ktab[k, cos 2(phi - phi_k)]
               + sum_m rows[m, i] cols[m, j] + spots[i, j]) * t_row[i]
              + bg_rad[r] (bg_col[j] + bg_row[i])

    times the beamstop transmission, plus ``dark``.  Counts are Poisson
    (exact below 16, rounded skew-corrected normal above); CCD frames
    (``ccd = (gain, offset, read_sigma, 1)``) get ``gain * counts + offset`` plus
    Gaussian read noise, quantised to 1/16 and clipped to ``[0, cutoff]``;
    counting detectors clip at
    ``cutoff``.  Gap pixels get ``mask_value``.  The draw is a pure function of
    ``seed`` and the pixel index.
    """
    ztab, cdf, inv = _tables()
    lam = np.empty(out.shape, np.float32)
    _expected_kernel(lam, float(center[0]), float(center[1]), float(RADIAL_SAMPLING), p_iso, pk,
                     ktab, kcs, rows, cols, t_row, bg_rad, bg_row, bg_col, spots, beamstop,
                     float(dark))
    _count_kernel(out, lam, ccd, float(cutoff), gap_row, gap_col, float(mask_value),
                  int(seed) & 0x7FFFFFFFFFFFFFFF, cdf, inv, ztab)
    return out
