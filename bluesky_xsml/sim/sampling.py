"""Sampling scenes: which features a frame asks for, and a scene that has them.

:func:`sample_scene` draws a scene; the state of a scene being drawn is a
:class:`~.sampler.Sampler`, the feature families it adds live in
:mod:`.features`, the labels it checks against in :mod:`.labels`. Part of the
synthetic generator; :mod:`bluesky_xsml.sim.generator` re-exports it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ..errors import ConfigurationError
from ..tags import TAG_NAMES
from . import physics as ph
from .features import (
    add_diffuse,
    add_gi_diffuse,
    add_halo,
    add_isolated,
    add_lattice,
    add_on_ring,
    add_rings,
    add_rods,
    add_saturation,
    add_specular,
    add_streaks,
    ensure_bright,
    feature_peak,
    scale_feature,
)
from .geometry import DetectorConfig, Footprint, SceneGeometry, resolve_detectors
from .labels import label_state, scene_labels
from .sampler import Regime, Sampler
from .scene import (
    WANT_P,
    complete_scene,
    jsonable,
)
from .variety import (
    CLASSIC,
    VarietyProfile,
    draw_readout,
    effective_read_counts,
    log_uniform,
    readout_cut,
    resolve_variety,
    uniform_in,
)


def _want(rng, tags: Mapping[str, bool] | None,
          prof: VarietyProfile = CLASSIC) -> dict[str, bool]:
    tags = dict(tags or {})
    unknown = set(tags) - set(WANT_P)
    if unknown:
        raise ConfigurationError(f"cannot ask for {sorted(unknown)}; known: {', '.join(WANT_P)}")
    u = rng.random(len(WANT_P))
    probs = {**WANT_P, **dict(prof.want_p)}
    want = {k: bool(ui < probs[k]) for k, ui in zip(WANT_P, u, strict=True)}
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
    if (prof.grazing_beamstop_p and want["grazing"] and not want["beam_off"]
            and not ({"beamstop_circular", "beamstop_linear"} & set(tags))
            and not (want["beamstop_circular"] or want["beamstop_linear"])
            and rng.random() < prof.grazing_beamstop_p):
        # GISAXS: the direct and specular beams mostly sit behind a stop
        want["beamstop_circular" if rng.random() < 0.6 else "beamstop_linear"] = True
    return want


def _bs_angle(rng) -> float:
    """Beamstop angle (degrees; its holder or its bar): mostly along a detector axis."""
    if rng.random() < 0.7:
        return float(90.0 * int(rng.integers(4)) + rng.uniform(-3, 3))
    return float(rng.uniform(0, 360))


def _ctx_for(sc: dict) -> SceneGeometry:
    tmp = dict(sc)
    tmp.setdefault("background", {"level": 0.0, "gradient": [0.0, 0.0]})
    tmp.setdefault("noise", {"dark": 0.0, "read_sigma": 0.0, "gain": 1.0, "offset": 0.0})
    tmp.setdefault("beamstop", None)
    tmp.setdefault("features", [])
    tmp.setdefault("grazing", None)
    return SceneGeometry(tmp)


def sample_scene(rng: np.random.Generator, detector=None, size: int | None = 256, *,
                 detectors=None, tags: Mapping[str, bool] | None = None,
                 variety: str | VarietyProfile | None = "classic") -> dict:
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
    variety : str or VarietyProfile, optional
        Generator profile (:data:`~bluesky_xsml.sim.variety.PROFILES`):
        ``"classic"`` (default; the shipped model's training distribution) or
        ``"wide"`` (more shape families, readouts and geometries).

    Returns
    -------
    dict
        A complete, JSON-serialisable scene.
    """
    if size is not None and (not isinstance(size, (int, np.integer)) or size < 16):
        raise ConfigurationError(f"size must be an int >= 16 or None, got {size!r}")
    prof = resolve_variety(variety)
    pool = resolve_detectors(detector if detector is not None else detectors)
    return sample_labelled(rng, pick_detector(rng, pool), size, tags, prof=prof)[0]


def pick_detector(rng, pool) -> DetectorConfig:
    """One detector of ``pool``, drawn by weight (no draw when there is only one)."""
    if len(pool) == 1:
        return pool[0]
    wts = np.array([d.weight for d in pool])
    return pool[int(rng.choice(len(pool), p=wts / wts.sum()))]


_SEEN_TAGS = [i for i, t in enumerate(TAG_NAMES) if t not in (
    "beam_off", "detector_gaps", "beamstop_circular", "beamstop_linear", "high_background")]


def sample_labelled(rng, det, size, tags, attempts: int = 4,
                    prof: VarietyProfile = CLASSIC) -> tuple[dict, np.ndarray]:
    """A scene and its labels; beam-on scenes in which nothing would be seen are redrawn."""
    for _ in range(attempts):
        scene = _sample_once(rng, det, size, tags, prof)
        labels = scene_labels(scene)
        if not scene["beam_on"] or labels[_SEEN_TAGS].any():
            break
    return scene, labels


def _sample_once(rng, det, size, tags, prof: VarietyProfile = CLASSIC) -> dict:
    want = _want(rng, tags, prof)
    S = Sampler.start(rng, det, size, want, prof)
    d = S.detector
    # dead / hot pixels
    n_bad = int(rng.poisson(6e-5 * S.h * S.w))
    d["bad_pixels"] = np.stack([rng.integers(0, S.h, n_bad),
                                rng.integers(0, S.w, n_bad)], 1).tolist()
    ccd = det.family == "ccd"
    read = rng.uniform(0.5, 1.0 if want["weak_scattering"] else 3.0) if ccd else 0.0
    S.sc["noise"] = {"dark": log_uniform(rng, 1e-4, 1e-2), "read_sigma": read, "gain": 1.0,
                     "offset": rng.uniform(5.0, 60.0) if ccd else 0.0}
    if not prof.classic:
        S.sc["variety"] = prof.name
    if prof.readouts:
        gaps = d["gaps"]
        ro = draw_readout(rng, prof, det.family, bool(gaps["rows"] or gaps["cols"]))
        if ro is not None:
            S.sc["readout"] = ro
            eff = effective_read_counts(ro)
            if eff is not None:
                S.sc["noise"]["read_sigma"] = eff
    if want["beam_off"]:
        S.draw_geometry()
        S.finish_geometry()
        S.sc.update(beam_on=False, background={"level": 0.0, "gradient": [0.0, 0.0]},
                    beamstop=None, features=[], grazing=None)
        return jsonable(S.sc)
    _sample_beam_on(S)
    return jsonable(S.sc)


def _sample_beam_on(S: Sampler) -> None:
    rng, want, L = S.rng, S.want, S.L
    S.draw_geometry()
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
        R = max(4.0 if S.profile.classic else 2.0,
                rng.uniform(*S.profile.beamstop_circular_L) * L)
        bs = {"type": "circular", "radius_px": R, "transmission": log_uniform(rng, 1e-5, 1e-2),
              "edge_px": rng.uniform(0.5, 1.5), "angle_deg": _bs_angle(rng),
              "holder_width_px": 2 * R * rng.uniform(0.2, 0.4) if rng.random() < 0.5 else 0.0}
    elif want["beamstop_linear"] and on_det:
        bs = {"type": "linear",
              "width_px": max(4.0 if S.profile.classic else 2.5,
                              rng.uniform(*S.profile.beamstop_linear_L) * L),
              "transmission": log_uniform(rng, 1e-5, 1e-2), "edge_px": rng.uniform(0.5, 1.5),
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
        r1 = uniform_in(rng, max(r_lo, 30.0), max(r_lo + 1, 30.0, top))
        S.set_distance_for(q1, r1)
    S.finish_geometry()
    S.sc.update(beam_on=True, background={"level": 0.0, "gradient": [0.0, 0.0]}, features=[])
    ctx = _ctx_for(S.sc)
    r_hi = 0.95 * ctx.r_far
    if ctx.horizon is not None:
        r_lo = max(r_lo, ctx.cy - ctx.horizon + 3.0)
    S.set_window(ctx, r_lo, r_hi)
    # intensity regime
    mode = "weak" if want["weak_scattering"] else ("high" if want["high_background"] else "normal")
    cut = float(S.detector["count_cutoff"])
    if ccd := (S.det.family == "ccd"):
        cut -= S.sc["noise"]["offset"]
    cut = readout_cut(S.sc, cut)
    read = S.sc["noise"]["read_sigma"]
    rim = max(1.5, 2.0 * read) * 1.4
    need_rim = bs is not None
    if mode == "weak":
        if need_rim:
            B = rng.uniform(rim, max(1.15 * rim, 2.6))
        else:
            B = 0.0 if (not ccd and rng.random() < 0.3) else log_uniform(rng, 0.02, 2.0)
    elif mode == "high":
        B = log_uniform(rng, 200.0, max(300.0, min(2e4, 0.02 * cut)))
        if not S.profile.classic:
            B = min(B, 0.25 * cut)     # a readout with a small range (8-bit ADU)
    else:
        B = 0.0 if (not ccd and not need_rim and rng.random() < 0.15) else \
            log_uniform(rng, 0.01, 30.0)
        if need_rim:
            B = max(B, rim)
    if need_rim:
        cos3_far = math.cos(math.atan(ctx.r_far * ctx.p / ctx.D)) ** 3
        B = max(B, rim / max(cos3_far, 0.2))
    grad = [rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4)] if rng.random() < 0.5 else [0.0, 0.0]
    S.sc["background"] = {"level": B, "gradient": grad}
    n_planned = sum(bool(want[k]) for k in (
        "halo_isotropic", "halo_anisotropic", "diffuse_low_q", "peaks_isolated", "peaks_lattice",
        "peaks_on_ring", "streaks", "specular_rod", "bragg_rods")) + len(ring_styles) + \
        (1 if (want["horizon"] or want["yoneda"]) else 0)
    cap = 0.5 * cut / (n_planned + 2) / 1.5
    typical = log_uniform(rng, 200.0, max(250.0, cap)) if mode == "normal" else None
    S.set_regime(Regime(mode=mode, cut=cut, read=read, background=B, cap=cap, typical=typical),
                 dark=S.sc["noise"]["dark"])
    feats = S.sc["features"]
    # smooth features first (they set the level under sharp ones)
    if want["diffuse_low_q"]:
        add_diffuse(S, feats)
    for tag, kappa in (("halo_isotropic", 0.0), ("halo_anisotropic", 1.0)):
        if want[tag]:
            add_halo(S, feats, anisotropic=kappa > 0)
    if S.gi and (want["horizon"] or want["yoneda"]):
        add_gi_diffuse(S, feats)
    S.plan_rings(10**6 if many_style else 4)
    order = sorted(ring_styles, key=lambda s: (s != many_style, s != lam_style))
    for k, style in enumerate(order):
        S.begin_ring_style(len(order) - k - 1)
        add_rings(S, feats, style, materials[style], many=(style == many_style),
                   lamellar=(style == lam_style))
    if want["peaks_isolated"]:
        add_isolated(S, feats)
    if want["peaks_lattice"]:
        add_lattice(S, feats)
    if want["peaks_on_ring"]:
        add_on_ring(S, feats)
    if S.gi and want["specular_rod"]:
        add_specular(S, feats)
    if S.gi and want["bragg_rods"]:
        add_rods(S, feats)
    if want["streaks"]:
        add_streaks(S, feats)
    if not feats:
        add_halo(S, feats, anisotropic=False, force=True)
    if mode == "normal":
        ensure_bright(S, feats)
    total = sum(feature_peak(f, ctx, S.sc) for f in feats) + 1.5 * B + ctx.dark
    if S.gi:
        total *= float(ph.grazing_factor_rows(ctx).max())
    if total > 0.5 * cut:
        for f in feats:
            scale_feature(f, 0.5 * cut / total)
        total = 0.5 * cut
    if S.gi:
        if S.profile.low_contrast_horizon_p and rng.random() < S.profile.low_contrast_horizon_p:
            # a low-contrast sample shadow: attenuated 3-50x, still an edge
            S.set_horizon_attenuation(log_uniform(rng, *S.profile.low_contrast_below))
        else:
            # "strongly attenuated": below the horizon nothing reaches 1 count
            S.set_horizon_attenuation(float(min(S.gi["below"], 1.0 / max(total, 1.0))))
    if want["saturation"]:
        before = [dict(f, **{k: list(v) for k, v in f.items() if isinstance(v, list)})
                  for f in feats]
        add_saturation(S, feats)
        # keep it only if it clips a clear region (no borderline partial clipping)
        _, st = label_state(complete_scene(S.sc))
        if st is None or st.sat_area < 12.0:
            feats[:] = before
