"""Labels of renderer B, from what was drawn and how it was read out.

Every rule below restates a definition of ``docs/tags.md`` in terms of the
visibility records of :mod:`~bluesky_xsml.render_b.compose` and the stored
frame.  Only components recorded as visible (and not skipped) count.
"""

from __future__ import annotations

import numpy as np

from ..tags import TAG_NAMES

__all__ = ["MIN_SATURATED", "frame_labels"]

#: Pixels clipped at the ceiling needed for ``saturation`` (a plateau, not a hot pixel).
MIN_SATURATED = 3


def _visible(records, kind, **match):
    return [r for r in records if r["kind"] == kind and r.get("visible") and not r.get("skipped")
            and all(r.get(k) == v for k, v in match.items())]


def gaps_visible(frame: np.ndarray, gaps, conv: dict) -> bool:
    """Whether unfilled gap stripes differ from the active pixels beside them.

    NaN, negative or other non-zero sentinels always do; a 0 stripe does
    where at least 50 pixels (and 5%) of the 3 px beside the gaps hold counts.
    """
    if gaps is None or conv.get("gap_fill") == "interpolate":
        return False
    fill = conv.get("gap_fill")
    if fill == "nan" or (isinstance(fill, (int, float)) and fill != 0):
        return True
    # a 0 stripe shows where it cuts through counts: look at the 3 px beside the gaps
    near = np.zeros_like(gaps)
    for k in range(1, 4):
        near[k:] |= gaps[:-k]
        near[:-k] |= gaps[k:]
        near[:, k:] |= gaps[:, :-k]
        near[:, :-k] |= gaps[:, k:]
    near &= ~gaps
    lit = np.count_nonzero(frame[near])
    return bool(lit >= max(50, 0.05 * np.count_nonzero(near)))


def frame_labels(scene: dict, records: list, beamstop: dict, frame: np.ndarray, gaps,
                 n_saturated: int) -> np.ndarray:
    """The ``(23,)`` float32 label vector of one frame in ``TAG_NAMES`` order."""
    y = dict.fromkeys(TAG_NAMES, 0.0)
    rings = _visible(records, "ring")
    y["ring_isotropic"] = any(r["texture"] == "uniform" and r.get("arc_fraction", 1) >= 0.1
                              for r in rings)
    y["ring_oriented"] = any(r["texture"] == "oriented" for r in rings)
    y["ring_textured"] = any(r["texture"] == "spotty" for r in rings)
    y["many_rings"] = len(rings) >= 5
    orders = {r.get("r0") for r in rings if r.get("group") == "lamellar"}
    y["higher_orders"] = len(orders) >= 2
    halos = _visible(records, "halo")
    y["halo_isotropic"] = any(h["texture"] == "uniform" for h in halos)
    y["halo_anisotropic"] = any(h["texture"] == "oriented" for h in halos)
    y["diffuse_low_q"] = bool(_visible(records, "diffuse"))
    spots = _visible(records, "spots")
    y["peaks_isolated"] = bool(spots)
    y["peaks_lattice"] = bool(_visible(records, "lattice"))
    y["peaks_on_ring"] = bool(_visible(records, "spots_on_ring"))
    for tag in ("horizon", "yoneda", "specular_rod", "bragg_rods"):
        y[tag] = bool(_visible(records, tag))
    scattering = any(r.get("visible") and not r.get("skipped") and r["kind"] != "horizon"
                     for r in records)
    ex = scene["exposure"]
    # nothing of the sample can be seen over a dark, low background: as good as beam off
    dark = not scattering and not ex.get("high_background") and ex.get("background", 0) < 0.5
    y["beam_off"] = bool(scene["beam_off"] or dark)
    y["weak_scattering"] = bool(ex.get("weak") and scattering)
    y["high_background"] = bool(ex.get("high_background") and not scene["beam_off"])
    y["beamstop_circular"] = bool(beamstop.get("circular"))
    y["beamstop_linear"] = bool(beamstop.get("linear"))
    y["detector_gaps"] = gaps_visible(frame, gaps, scene["detector"]["convention"])
    y["saturation"] = n_saturated >= MIN_SATURATED
    y["streaks"] = bool(_visible(records, "streak"))
    return np.array([float(y[t]) for t in TAG_NAMES], np.float32)
