"""The declared state of one scene being sampled: :class:`Sampler` and its :class:`Regime`.

:mod:`.sampling` makes a :class:`Sampler` (:meth:`Sampler.start`) and walks it
through the geometry, the intensity regime and the feature families of
:mod:`.features`, which read its fields; what changes while a scene is
sampled changes through its methods. Part of the synthetic generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .geometry import DetectorConfig, Footprint, SceneGeometry
from .scene import R_E, SCENE_VERSION, detector_entry
from .variety import CLASSIC, VarietyProfile, log_uniform, uniform_in

__all__ = ["Regime", "Sampler"]


@dataclass(frozen=True, slots=True)
class Regime:
    """Intensity regime of a beam-on scene: what feature amplitudes are drawn against.

    Levels are expected counts per pixel (photons of a counting detector; for a
    CCD, counts above its offset), after the readout's own range
    (:func:`~.variety.readout_cut`).
    """

    #: ``"weak"`` (``weak_scattering``), ``"high"`` (``high_background``) or ``"normal"``.
    mode: str
    #: Counts at which a pixel saturates, less a CCD's offset.
    cut: float
    #: Read-noise sigma (counts; 0 for photon counting).
    read: float
    #: Flat background level (counts per pixel, before the gradient).
    background: float
    #: Most that one feature should add to a pixel (counts): half the cut, shared by the
    #: planned features, with a margin.
    cap: float
    #: Normal regime: the typical amplitude (counts) that feature amplitudes spread around
    #: (:attr:`.VarietyProfile.amp_decades`); ``None`` in the weak and high regimes.
    typical: float | None


@dataclass(slots=True, eq=False)
class Sampler:
    """State of one scene being sampled; made by :meth:`start`.

    The fields fixed at the start are the draw's inputs; the geometry fields are
    set by :meth:`draw_geometry`, :meth:`set_distance_for` and
    :meth:`finish_geometry`; the beam-on fields by :meth:`set_window`,
    :meth:`set_regime` and the ring budget's methods. The feature families of
    :mod:`.features` read these fields and add features to ``sc["features"]``.
    Lengths are in pixels of the rendered frame unless a name says otherwise.
    """

    #: All randomness of the scene; the order of the draws fixes the frames.
    rng: np.random.Generator
    #: Generator profile (shape families, ranges, probabilities).
    profile: VarietyProfile
    #: The detector drawn for this scene.
    det: DetectorConfig
    #: Features asked for, by tag name (and ``"grazing"``): drawn, or forced by the caller.
    want: dict[str, bool]
    #: The scene's ``detector`` entry (shape, pixel size, gaps, dtype, cut-off, ...).
    detector: dict
    #: Rendered height (px).
    h: int = field(init=False)
    #: Rendered width (px).
    w: int = field(init=False)
    #: Longest side (px): the scale of most lengths the sampler draws.
    L: int = field(init=False)
    #: Rendered pixel size (m).
    p: float = field(init=False)
    #: The scene being built (JSON-like dict; :func:`~.scene.jsonable` at the end).
    sc: dict = field(init=False)
    # -- geometry
    #: Wavelength (A).
    lam: float = math.nan
    #: Sample-detector distance (m); ``None`` until chosen.
    D: float | None = None
    #: Beam centre, column (px; may lie off the detector).
    cx: float = math.nan
    #: Beam centre, row (px; may lie off the detector).
    cy: float = math.nan
    #: Grazing incidence: the scene's ``grazing`` entry (angles in degrees, ``beta_ratio``,
    #: ``below``: attenuation under the horizon, ``yoneda``); ``None`` in transmission.
    gi: dict | None = None
    # -- beam on
    #: Geometry of the scene as drawn, before features (:meth:`set_window`).
    ctx: SceneGeometry | None = None
    #: Smallest radius (px) features are placed at: on the detector (a beam centre off
    #: it is that far from its nearest pixel), clear of the beamstop and the horizon.
    r_lo: float = math.nan
    #: Largest radius (px) features are placed at: inside the detector's far corner.
    r_hi: float = math.nan
    #: Intensity regime (:meth:`set_regime`).
    regime: Regime | None = None
    #: Rings still allowed in the frame (:meth:`plan_rings`, :meth:`spend_rings`).
    ring_budget: int = 0
    #: Ring styles still to come after the one being drawn, each keeping room for a
    #: ring (:meth:`begin_ring_style`, :meth:`ring_allowance`).
    rings_left: int = 0

    def __post_init__(self):
        self.h, self.w = self.detector["shape"]
        self.L = max(self.h, self.w)
        self.p = self.detector["pixel_size_m"]
        self.sc = {"version": SCENE_VERSION, "detector": self.detector}

    @classmethod
    def start(cls, rng: np.random.Generator, det: DetectorConfig, size: int | None,
              want: dict[str, bool], profile: VarietyProfile = CLASSIC) -> Sampler:
        """A sampler for a scene on ``det`` rendered at ``size``; draws the frame's dtype."""
        dtype = det.dtypes[0] if len(det.dtypes) == 1 else (
            det.dtypes[0] if rng.random() < 0.6 else det.dtypes[1])
        return cls(rng, profile, det, want, detector_entry(det.name, size, rng, dtype))

    # -- geometry --------------------------------------------------------
    def draw_geometry(self) -> None:
        """Draw the wavelength, the beam centre and (grazing incidence) the distance."""
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
            ac = lam * math.sqrt(rho * R_E / math.pi)
            if want["yoneda"]:
                off = uniform_in(rng, max(4.0, 0.04 * h), max(6.0, 0.16 * h))
                D = float(np.clip(off * self.p / math.tan(ac), 0.1, 15.0))
            else:
                D = self._distance_from_q(lam, cx, yh + 5)
            ai = float(np.clip(ac * rng.uniform(0.8, 3.0), math.radians(0.03), math.radians(1.0)))
            cy = yh + D * math.tan(ai) / self.p
            gi = {"incidence_deg": math.degrees(ai), "critical_deg": math.degrees(ac),
                  "beta_ratio": log_uniform(rng, 0.005, 0.05),
                  "below": log_uniform(rng, 1e-4, 3e-3),
                  "yoneda": bool(want["yoneda"])}
        else:
            mode = rng.random()
            if want["beamstop_circular"] or want["beamstop_linear"]:
                mode *= 0.87
            near, anywhere = self.profile.center_split
            if mode < near:
                cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
            elif mode < anywhere:
                cx, cy = rng.uniform(0.05, 0.95) * w, rng.uniform(0.05, 0.95) * h
            else:
                cx, cy = rng.uniform(0.0, 1.0) * w, rng.uniform(0.0, 1.0) * h
                off = rng.uniform(0.0, self.profile.off_detector_max) * L
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
        q_far = log_uniform(self.rng, 0.03, 1.2 if self.want["higher_orders"] else 6.0)
        s = min(q_far * lam / (4 * math.pi), math.sin(math.radians(32.0)))
        tth = 2 * math.asin(s)
        return float(np.clip(r_far * self.p / math.tan(tth), 0.05, 15.0))

    def finish_geometry(self) -> None:
        """Draw the distance if none was chosen, and write the scene's ``geometry``."""
        if self.D is None:
            self.D = self._distance_from_q(self.lam, self.cx, self.cy)
        self.sc["geometry"] = {"distance_m": self.D, "wavelength_A": self.lam,
                               "beam_center": [self.cx, self.cy]}

    def set_distance_for(self, q1: float, r1: float) -> None:
        """Choose the distance (and keep the wavelength) so that ``q1`` (1/A) lands at ``r1`` px."""
        s = q1 * self.lam / (4 * math.pi)
        tth = 2 * math.asin(min(s, 0.99))
        if tth >= math.radians(65):
            self.lam *= math.sin(math.radians(30)) / s
            tth = math.radians(60)
        self.D = float(np.clip(r1 * self.p / math.tan(tth), 0.05, 15.0))

    # -- beam on ---------------------------------------------------------
    def set_window(self, ctx: SceneGeometry, r_lo: float, r_hi: float) -> None:
        """The geometry is final: its :class:`SceneGeometry` and the radial window (px)."""
        self.ctx = ctx
        self.r_lo, self.r_hi = r_lo, r_hi

    def set_regime(self, regime: Regime, dark: float) -> None:
        """Fix the intensity regime; the geometry's levels follow (``dark``: counts per pixel)."""
        self.regime = regime
        self.ctx.B = regime.background
        self.ctx.read = regime.read
        self.ctx.dark = dark

    def plan_rings(self, budget: int) -> None:
        """Allow ``budget`` rings in the whole frame."""
        self.ring_budget = budget

    def begin_ring_style(self, styles_after: int) -> None:
        """A ring style is drawn next; ``styles_after`` more follow it."""
        self.rings_left = styles_after

    def ring_allowance(self) -> int:
        """Rings the style being drawn may keep, leaving one for each style after it."""
        return self.ring_budget - self.rings_left

    def spend_rings(self, n: int) -> None:
        """``n`` rings were kept."""
        self.ring_budget -= n

    def set_horizon_attenuation(self, below: float) -> None:
        """Grazing incidence: the factor on what lies below the sample horizon."""
        self.gi["below"] = below
