"""The declared scene sampler of renderer B.

A :class:`SceneSampler` is a frozen dataclass whose fields are the
distributions every scene is drawn from; change a distribution by building a
new sampler (``dataclasses.replace(SceneSampler(), p_grazing=0.5)``), never by
setting attributes.  :meth:`SceneSampler.sample` turns one random stream into
one JSON-serialisable scene: the detector and its sentinel convention, the beam
geometry, the beamstop, the exposure and the list of scattering components.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from .detectors import DETECTORS, DetectorModel, detector

__all__ = ["Choice", "LogUniform", "SceneSampler", "Uniform"]


@dataclass(frozen=True)
class Uniform:
    """Uniform on ``[lo, hi]``."""

    lo: float
    hi: float

    def draw(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(self.lo, self.hi))


@dataclass(frozen=True)
class LogUniform:
    """Log-uniform on ``[lo, hi]`` (``0 < lo <= hi``)."""

    lo: float
    hi: float

    def draw(self, rng: np.random.Generator) -> float:
        return float(math.exp(rng.uniform(math.log(self.lo), math.log(self.hi))))


@dataclass(frozen=True)
class Choice:
    """One of ``options`` with probabilities proportional to ``weights``."""

    options: tuple
    weights: tuple | None = None

    def draw(self, rng: np.random.Generator):
        w = None
        if self.weights is not None:
            w = np.asarray(self.weights, float)
            w = w / w.sum()
        return self.options[int(rng.choice(len(self.options), p=w))]


def _ln(lo, hi):
    return LogUniform(lo, hi)


@dataclass(frozen=True)
class SceneSampler:
    """Distributions of renderer B's scenes (all fields have defaults).

    Probabilities are per frame; ``*_texture`` and ``*_form`` choices pick the
    azimuthal character of rings and halos.  Lengths are in pixels unless a
    name says ``frac`` (a fraction of the frame's shorter side or of a radius).
    """

    detectors: tuple[str, ...] = tuple(d.name for d in DETECTORS)
    # what kind of frame
    p_beam_off: float = 0.06
    p_grazing: float = 0.2
    p_center_off: float = 0.1
    p_weak: float = 0.12
    p_high_background: float = 0.15
    p_saturation: float = 0.2
    p_gaps_filled: float = 0.25
    # transmission components
    p_rings: float = 0.35
    p_powder: float = 0.15
    p_lamellar: float = 0.15
    p_halo: float = 0.35
    p_diffuse: float = 0.4
    p_spots: float = 0.15
    p_lattice: float = 0.1
    p_spots_on_ring: float = 0.12
    p_streaks: float = 0.15
    # grazing components
    p_yoneda: float = 0.7
    p_specular: float = 0.6
    p_bragg_rods: float = 0.4
    p_gi_rings: float = 0.2
    # shapes
    ring_count: Choice = Choice((1, 2, 3, 4), (4, 3, 2, 1))
    powder_count: Choice = Choice(tuple(range(5, 13)))
    lamellar_orders: Choice = Choice((3, 4, 5, 6), (4, 3, 2, 1))
    ring_texture: Choice = Choice(("uniform", "oriented", "spotty"), (0.45, 0.35, 0.2))
    ring_rel_fwhm: LogUniform = field(default_factory=lambda: _ln(0.004, 0.028))
    halo_rel_fwhm: Uniform = Uniform(0.15, 0.6)
    oriented_form: Choice = Choice(("vonmises", "cos", "arcs"), (0.45, 0.35, 0.2))
    fold: Choice = Choice((2, 4, 6), (0.6, 0.2, 0.2))
    vonmises_kappa: LogUniform = field(default_factory=lambda: _ln(2.0, 30.0))
    grains: LogUniform = field(default_factory=lambda: _ln(25, 400))
    spot_sigma: Uniform = Uniform(0.6, 3.0)
    spot_count: Choice = Choice((1, 2, 3, 4, 5, 6), (3, 3, 2, 2, 1, 1))
    p_spot_cluster: float = 0.35
    lattice_kind: Choice = Choice(("square", "hexagonal", "oblique", "rectangular"))
    diffuse_law: Choice = Choice(("guinier", "lorentz", "debye_bueche", "power", "sphere"))
    streak_width: Uniform = Uniform(1.0, 5.0)
    streak_count: Choice = Choice((1, 2, 3), (4, 4, 1))
    # exposure (photons)
    background: LogUniform = field(default_factory=lambda: _ln(1e-3, 0.5))
    high_background_ratio: LogUniform = field(default_factory=lambda: _ln(0.6, 4.0))
    overflow: LogUniform = field(default_factory=lambda: _ln(2.0, 100.0))
    relative_amp: LogUniform = field(default_factory=lambda: _ln(0.05, 1.0))
    # beamstops
    transmission_beamstop: Choice = Choice(("none", "disc", "disc_arm", "rod", "pin"),
                                           (0.15, 0.35, 0.25, 0.2, 0.05))
    grazing_beamstop: Choice = Choice(("none", "disc", "rod", "bar", "pin"),
                                      (0.15, 0.3, 0.2, 0.2, 0.15))
    beamstop_transmission: LogUniform = field(default_factory=lambda: _ln(1e-4, 3e-2))

    # ------------------------------------------------------------------
    def sample(self, rng: np.random.Generator) -> dict:
        """Draw one scene (a JSON-serialisable dict)."""
        det = detector(Choice(self.detectors).draw(rng))
        H, W = det.shape
        conv = self._convention(rng, det)
        beam_off = rng.random() < self.p_beam_off
        grazing = (not beam_off) and rng.random() < self.p_grazing
        geom = self._geometry(rng, det, grazing)
        scene = {"renderer": "render_b", "detector": {"name": det.name, "shape": [H, W],
                                                      "family": det.family,
                                                      "readout": det.readout,
                                                      "convention": conv},
                 "geometry": geom, "beam_off": bool(beam_off), "components": [],
                 "beamstop": {"shape": "none"}}
        scene["exposure"] = self._exposure(rng, det, conv, beam_off)
        if beam_off:
            return scene
        if geom["on_detector"]:
            scene["beamstop"] = self._beamstop(rng, det, geom, grazing)
        comps = self._grazing(rng, det, geom) if grazing else self._transmission(rng, det, geom)
        scene["components"] = comps
        return scene

    # ------------------------------------------------------------------
    def _convention(self, rng, det: DetectorModel) -> dict:
        """Readout settings and the sentinel convention of one frame."""
        fill_gaps = det.modular and rng.random() < self.p_gaps_filled
        n_dead = int(rng.integers(0, 40))
        H, W = det.shape
        dead = [[int(rng.integers(0, H)), int(rng.integers(0, W))] for _ in range(n_dead)]
        if det.family == "pilatus" and det.readout == "counting":
            c = {"dtype": "int32", "masked": -2, "saturated": 2 ** 20 - 1,
                 "gap_fill": -1, "rule": "gaps -1, dead -2, 20-bit counter saturates at 2^20-1"}
        elif det.family == "eiger":
            dt = str(Choice(("uint32", "uint16"), (0.6, 0.4)).draw(rng))
            top = np.iinfo(dt).max
            cut = int(rng.integers(100_000, 2_000_000)) if dt == "uint32" else int(
                rng.integers(30_000, 65_534))
            c = {"dtype": dt, "masked": int(top), "saturated": cut, "gap_fill": int(top),
                 "rule": "2^n-1 marks masked pixels and gaps; the count-rate cutoff saturates"}
        elif det.family == "timepix":
            bits = int(Choice((12, 14)).draw(rng))
            masked_gaps = rng.random() < 0.5
            c = {"dtype": "uint16", "masked": 65535, "saturated": 2 ** bits - 1,
                 "gap_fill": 65535 if masked_gaps else 0,
                 "rule": f"{bits}-bit counter saturates at 2^{bits}-1; 65535 masked"}
        elif det.readout == "integrating":
            bits = int(Choice((8, 12, 14, 16, 18), (0.15, 0.15, 0.2, 0.35, 0.15)).draw(rng))
            dt = "int32" if bits > 16 or rng.random() < 0.2 else "uint16"
            full = 2 ** bits - 1
            gain = LogUniform(0.02, 0.4).draw(rng) if bits == 8 else LogUniform(
                0.3, 8.0).draw(rng) * 2 ** (bits - 16)
            c = {"dtype": dt, "bits": bits, "masked": 0, "saturated": full,
                 "offset": float(rng.uniform(0, 0.05) * full), "gain": float(gain),
                 "read_noise": float(rng.uniform(0.5, 12.0) * max(gain, 0.25)),
                 "gap_fill": 0, "rule": f"{bits}-bit ADC saturates at 2^{bits}-1 (not masked)"}
        else:  # float corrected
            scale = LogUniform(1e-3, 10.0).draw(rng)
            c = {"dtype": "float32", "masked": "nan", "saturated": float(np.float32(
                LogUniform(2e4, 2e6).draw(rng) * scale)), "scale": float(scale),
                 "read_noise": float(rng.uniform(0.0, 3.0)), "gap_fill": "nan",
                 "flat_ripple": float(rng.uniform(0, 0.05)),
                 "rule": "NaN masked, dark subtracted (negatives occur), clipped pixels "
                         "hold the saturation value"}
        if fill_gaps:
            c["gap_fill"] = "interpolate"
        c["dead"] = dead
        n_hot = int(rng.integers(0, 6))
        c["hot"] = [[int(rng.integers(0, H)), int(rng.integers(0, W)),
                     float(rng.uniform(50, 500))] for _ in range(n_hot)]
        return c

    def _geometry(self, rng, det: DetectorModel, grazing: bool) -> dict:
        H, W = det.shape
        g = {"mode": "grazing" if grazing else "transmission", "image_up": "row 0",
             "pixel_centres": "integer (x = column, y = row)"}
        if grazing:
            x = rng.uniform(0.3, 0.7) * W
            dh = rng.uniform(6, max(8, 0.18 * H))
            yh = rng.uniform(0.45, 0.92) * H
            y = yh + dh
            g.update(horizon_row=float(yh), specular_row=float(yh - dh))
        elif rng.random() < self.p_center_off:
            side = int(rng.integers(0, 4))
            out = rng.uniform(0.02, 0.4)
            if side == 0:
                x, y = -out * W, rng.uniform(0, H)
            elif side == 1:
                x, y = W - 1 + out * W, rng.uniform(0, H)
            elif side == 2:
                x, y = rng.uniform(0, W), -out * H
            else:
                x, y = rng.uniform(0, W), H - 1 + out * H
        else:
            x = rng.uniform(0.2, 0.8) * W
            y = rng.uniform(0.2, 0.8) * H
        g["beam_center"] = [float(x), float(y)]
        g["on_detector"] = bool(0 <= x <= W - 1 and 0 <= y <= H - 1)
        return g

    def _exposure(self, rng, det, conv, beam_off) -> dict:
        if det.readout == "counting":
            sat_ph, read_ph = float(conv["saturated"]), 0.0
        elif det.readout == "integrating":
            sat_ph = (conv["saturated"] - conv["offset"]) / conv["gain"]
            read_ph = conv["read_noise"] / conv["gain"]
        else:
            sat_ph = conv["saturated"] / conv["scale"]
            read_ph = conv["read_noise"]
        e = {"saturation_photons": float(sat_ph), "read_noise_photons": float(read_ph)}
        bg = self.background.draw(rng)
        noise = math.sqrt(bg + read_ph ** 2)
        weak = (not beam_off) and rng.random() < self.p_weak
        high = (not beam_off) and rng.random() < self.p_high_background
        if weak:
            peak = rng.uniform(2.5, 7.0) * max(1.0, noise)
        else:
            lo = max(10.0, 25 * max(1.0, noise))
            peak = LogUniform(lo, max(lo * 1.5, 0.5 * sat_ph)).draw(rng)
        if high:
            bg = self.high_background_ratio.draw(rng) * peak
            if weak:  # a few counts above a high background
                peak = max(peak, 3.0 * math.sqrt(bg))
            bg = min(bg, 0.3 * sat_ph)
        e.update(background=float(bg), gradient=[float(v) for v in rng.uniform(-0.4, 0.4, 2)],
                 air_radius_frac=float(rng.uniform(0.3, 1.5)), peak=float(peak),
                 weak=bool(weak), high_background=bool(high),
                 saturate=bool((not beam_off) and rng.random() < self.p_saturation),
                 overflow=float(self.overflow.draw(rng)),
                 direct_beam=bool(rng.random() < 0.5))
        return e

    def _beamstop(self, rng, det, geom, grazing) -> dict:
        H, W = det.shape
        shape = (self.grazing_beamstop if grazing else self.transmission_beamstop).draw(rng)
        if shape == "none":
            return {"shape": "none"}
        m = min(H, W)
        radius = max(4.0, rng.uniform(0.015, 0.06) * m)
        cx, cy = geom["beam_center"]
        j = rng.uniform(0, 0.25) * radius
        a = rng.uniform(0, 2 * math.pi)
        b = {"shape": shape, "center": [float(cx + j * math.cos(a)), float(cy + j * math.sin(a))],
             "radius": float(radius), "transmission": self.beamstop_transmission.draw(rng),
             "edge": float(rng.uniform(0.4, 2.0))}
        if shape in ("disc_arm", "rod", "bar"):
            if shape == "bar":
                ang = float(Choice((0.0, math.pi)).draw(rng))
            elif grazing:
                ang = math.pi / 2  # down to the bottom edge, clear of the scattering
            else:
                ang = float(Choice((math.pi / 2, -math.pi / 2, 0.0, math.pi, None),
                                   (0.3, 0.2, 0.15, 0.15, 0.2)).draw(rng)
                            or rng.uniform(-math.pi, math.pi))
            width = rng.uniform(3.0, max(4.0, 0.8 * radius)) if shape == "disc_arm" else \
                rng.uniform(4.0, max(5.0, 0.05 * m))
            b.update(angle=float(ang + rng.normal(0, 0.02)), width=float(width))
        if shape == "pin":
            b["angle"] = float(rng.uniform(0, math.pi / 2))
            b["radius"] = float(min(radius, 12.0))
        return b

    # ------------------------------------------------------------------
    def _radius_range(self, det, geom, inner=10.0) -> tuple[float, float]:
        H, W = det.shape
        cx, cy = geom["beam_center"]
        far = max(math.hypot(x - cx, y - cy) for x in (0, W - 1) for y in (0, H - 1))
        near = 0.0
        if not geom["on_detector"]:
            near = math.hypot(max(0 - cx, 0, cx - (W - 1)), max(0 - cy, 0, cy - (H - 1)))
        return max(inner, near + 8), 0.92 * far

    def _azimuth(self, rng, texture: str, halo: bool = False) -> dict:
        if texture == "uniform":
            if rng.random() < 0.5:
                return {"form": "uniform"}
            return {"form": "ripple", "fold": 2, "phase": float(rng.uniform(0, math.pi)),
                    "floor": float(rng.uniform(0.88, 0.98))}
        form = self.oriented_form.draw(rng)
        fold = int(self.fold.draw(rng))
        phase = float(rng.uniform(0, 2 * math.pi))
        if halo:
            form = "vonmises" if form == "arcs" else form
        if form == "vonmises":
            kappa = self.vonmises_kappa.draw(rng) if not halo else rng.uniform(1.5, 6)
            return {"form": form, "fold": fold, "phase": phase, "kappa": float(kappa),
                    "floor": float(rng.uniform(0, 0.15 if not halo else 0.3))}
        if form == "cos":
            return {"form": form, "fold": fold, "phase": phase, "power": int(rng.integers(1, 5)),
                    "floor": float(rng.uniform(0, 0.15 if not halo else 0.3))}
        n = int(rng.integers(1, 5))
        arcs = [[float(rng.uniform(-math.pi, math.pi)), float(rng.uniform(0.08, 0.45))]
                for _ in range(n)]
        return {"form": "arcs", "arcs": arcs, "floor": float(rng.uniform(0, 0.1))}

    def _ring(self, rng, r0, texture, rel_fwhm=None) -> dict:
        rel = rel_fwhm if rel_fwhm is not None else self.ring_rel_fwhm.draw(rng)
        fwhm = max(0.8, rel * r0)
        c = {"kind": "ring", "r0": float(r0), "fwhm": float(fwhm),
             "eta": float(rng.uniform(0, 0.6)), "texture": texture,
             "amp": self.relative_amp.draw(rng)}
        if texture == "spotty":
            c.update(grains=int(self.grains.draw(rng)),
                     grain_sigma=float(rng.uniform(0.6, 2.0)),
                     continuum=float(rng.uniform(0, 0.12)))
        else:
            c["azimuth"] = self._azimuth(rng, texture)
        return c

    def _radii(self, rng, n, lo, hi, min_sep) -> list[float]:
        """``n`` radii in ``[lo, hi]``, apart by ``min_sep`` and with no pair near 1:2 or 1:3."""
        for _ in range(50):
            rs = sorted(float(v) for v in rng.uniform(lo, hi, n))
            ok = all(b - a >= max(min_sep, 0.04 * b) for a, b in itertools.pairwise(rs))
            ok = ok and not any(abs(b / a - k) < 0.04 for a in rs for b in rs if b > a
                                for k in (2, 3, 4))
            if ok:
                return rs
        return []

    def _transmission(self, rng, det, geom) -> list[dict]:
        H, W = det.shape
        m = min(H, W)
        lo, hi = self._radius_range(det, geom, inner=max(28.0, 0.06 * m))
        comps: list[dict] = []
        for _ in range(20):
            if rng.random() < self.p_rings and hi > lo + 10:
                n = int(self.ring_count.draw(rng))
                for r in self._radii(rng, n, lo, hi, 12):
                    comps.append(self._ring(rng, r, self.ring_texture.draw(rng)))
            if rng.random() < self.p_powder and hi > lo + 60:
                n = int(self.powder_count.draw(rng))
                tex = self.ring_texture.draw(rng)
                for r in self._radii(rng, n, lo, hi, 6):
                    c = self._ring(rng, r, tex)
                    c["group"] = "powder"
                    comps.append(c)
            if rng.random() < self.p_lamellar:
                n = int(self.lamellar_orders.draw(rng))
                r1 = rng.uniform(lo, max(lo + 1, hi / 2.2))
                tex = "uniform" if rng.random() < 0.5 else "oriented"
                az = self._azimuth(rng, tex)
                rel = self.ring_rel_fwhm.draw(rng)
                decay = rng.uniform(0.25, 0.8)
                for k in range(1, n + 1):
                    if k * r1 > hi:
                        break
                    c = self._ring(rng, k * r1, tex, rel)
                    c.update(azimuth=az, amp=float(decay ** (k - 1)), group="lamellar", order=k,
                             fwhm=float(max(0.8, rel * r1 * (1 + 0.15 * (k - 1)))))
                    comps.append(c)
            if rng.random() < self.p_halo:
                for _ in range(int(rng.integers(1, 3))):
                    r0 = rng.uniform(max(30.0, lo), max(31.0, 0.8 * hi))
                    tex = "uniform" if rng.random() < 0.55 else "oriented"
                    comps.append({"kind": "halo", "r0": float(r0),
                                  "fwhm": float(self.halo_rel_fwhm.draw(rng) * r0),
                                  "texture": tex, "azimuth": self._azimuth(rng, tex, halo=True),
                                  "amp": self.relative_amp.draw(rng)})
            if rng.random() < self.p_diffuse and geom["on_detector"]:
                comps.append(self._diffuse(rng, m))
            if rng.random() < self.p_spots:
                comps.append(self._spots(rng, det, geom))
            lattice = rng.random() < self.p_lattice
            if lattice:
                comps.append(self._lattice(rng, m))
            if not lattice and rng.random() < self.p_spots_on_ring and hi > lo + 5:
                comps.append({"kind": "spots_on_ring", "fold": int(Choice((4, 6)).draw(rng)),
                              "r0": float(rng.uniform(lo, min(hi, lo + 0.6 * m))),
                              "phase": float(rng.uniform(0, math.pi)),
                              "sigma": self.spot_sigma.draw(rng) * 0.8,
                              "amp": self.relative_amp.draw(rng)})
            if rng.random() < self.p_streaks and geom["on_detector"]:
                comps.extend(self._streaks(rng))
            if any(c["kind"] != "streak" for c in comps):
                break
        self._set_main(rng, comps)
        return comps

    def _set_main(self, rng, comps):
        main = [c for c in comps if c["kind"] != "streak"]
        if main:
            main[int(rng.integers(0, len(main)))]["amp"] = 1.0

    def _diffuse(self, rng, m) -> dict:
        law = self.diffuse_law.draw(rng)
        c = {"kind": "diffuse", "law": law, "length": float(rng.uniform(0.01, 0.12) * m),
             "exponent": float(rng.uniform(2.0, 4.2)), "amp": float(rng.uniform(0.3, 1.0))}
        if law == "sphere":
            c["length"] = float(rng.uniform(0.03, 0.15) * m)
        if rng.random() < 0.3:
            c["stretch"] = float(rng.uniform(1.3, 3.0))
            c["angle"] = float(rng.uniform(0, math.pi))
        return c

    def _spots(self, rng, det, geom) -> dict:
        H, W = det.shape
        n = int(self.spot_count.draw(rng))
        if rng.random() < self.p_spot_cluster:
            cx, cy = rng.uniform(0.15, 0.85) * W, rng.uniform(0.15, 0.85) * H
            rad = rng.uniform(15, 60)
            xs = cx + rng.uniform(-rad, rad, n)
            ys = cy + rng.uniform(-rad, rad, n)
            cluster = True
        else:
            xs = rng.uniform(0.05, 0.95, n) * W
            ys = rng.uniform(0.05, 0.95, n) * H
            cluster = False
        el = rng.uniform(1.0, 3.0, n) if rng.random() < 0.3 else np.ones(n)
        return {"kind": "spots", "x": [float(v) for v in xs], "y": [float(v) for v in ys],
                "sigma": [self.spot_sigma.draw(rng) for _ in range(n)],
                "elong": [float(v) for v in el],
                "angle": [float(v) for v in rng.uniform(0, math.pi, n)],
                "rel": [float(v) for v in rng.uniform(0.3, 1.0, n)], "cluster": cluster,
                "amp": self.relative_amp.draw(rng)}

    def _lattice(self, rng, m) -> dict:
        kind = self.lattice_kind.draw(rng)
        a = rng.uniform(14, max(15, 0.12 * m))
        gamma = {"square": 90.0, "hexagonal": 60.0, "rectangular": 90.0}.get(
            kind, rng.uniform(65, 115))
        b = a if kind in ("square", "hexagonal") else a * rng.uniform(0.7, 1.4)
        return {"kind": "lattice", "lattice": kind, "a": float(a), "b": float(b),
                "gamma_deg": float(gamma), "rotation": float(rng.uniform(0, math.pi)),
                "sigma": self.spot_sigma.draw(rng) * 0.8,
                "debye_waller": float(rng.uniform(3, 12) * a),
                "structure_seed": int(rng.integers(0, 2**31)),
                "amp": self.relative_amp.draw(rng)}

    def _streaks(self, rng) -> list[dict]:
        n = int(self.streak_count.draw(rng))
        base = float(Choice((0.0, math.pi / 2, None), (0.4, 0.3, 0.3)).draw(rng)
                     or rng.uniform(0, math.pi))
        out = []
        for k in range(n):
            ang = base + (k * math.pi / 2 if k < 2 else rng.uniform(0, math.pi))
            out.append({"kind": "streak", "angle": float(ang + rng.normal(0, 0.03)),
                        "width": self.streak_width.draw(rng),
                        "profile": str(Choice(("gauss", "box")).draw(rng)),
                        "decay_length": float(rng.uniform(5, 40)),
                        "decay_power": float(rng.uniform(0.5, 2.0)),
                        "two_sided": bool(rng.random() < 0.7),
                        "amp": float(rng.uniform(0.1, 1.0))})
        return out

    def _grazing(self, rng, det, geom) -> list[dict]:
        H, W = det.shape
        m = min(H, W)
        yh = geom["horizon_row"]
        comps = [{"kind": "horizon", "row": float(yh),
                  "attenuation": float(Choice((LogUniform(1e-4, 1e-2), Uniform(0.02, 0.3)),
                                              (0.7, 0.3)).draw(rng).draw(rng)),
                  "edge": float(rng.uniform(0.5, 2.5))}]
        d = self._diffuse(rng, m)
        d["amp"] = 1.0
        comps.append(d)
        if rng.random() < self.p_yoneda:
            comps.append({"kind": "yoneda", "offset": float(rng.uniform(2, 20)),
                          "width": float(rng.uniform(1.0, 5.0)),
                          "gain": float(rng.uniform(1.0, 6.0))})
        if rng.random() < self.p_specular:
            comps.append({"kind": "specular_rod", "width": float(rng.uniform(1.0, 4.0)),
                          "decay_length": float(rng.uniform(5, 60)),
                          "decay_power": float(rng.uniform(1.0, 3.0)),
                          "amp": float(rng.uniform(0.3, 1.5)),
                          "spot_amp": float(rng.uniform(0, 3))})
        if rng.random() < self.p_bragg_rods:
            comps.append({"kind": "bragg_rods", "spacing": float(rng.uniform(15, 0.2 * W)),
                          "orders": int(rng.integers(1, 4)),
                          "width": float(rng.uniform(1.5, 5.0)),
                          "decay_length": float(rng.uniform(0.1, 0.6) * H),
                          "fringe": float(rng.uniform(10, 80)),
                          "amp": float(rng.uniform(0.3, 1.0))})
        if rng.random() < self.p_gi_rings:
            lo, hi = self._radius_range(det, geom, inner=max(28.0, 0.06 * m))
            for r in self._radii(rng, int(self.ring_count.draw(rng)), lo, hi, 12):
                comps.append(self._ring(rng, r, self.ring_texture.draw(rng)))
        if rng.random() < 0.1:
            comps.extend(self._streaks(rng)[:1])
        return comps
