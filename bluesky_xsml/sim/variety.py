"""Generator profiles: the declared families and parameter ranges a scene is drawn from.

A profile is a frozen :class:`VarietyProfile`; :data:`PROFILES` holds the two
that exist:

* ``classic`` — the generator's ranges as they were when the shipped model was
  trained (``docs/model-card.md`` is measured on it). Its frames are
  bit-identical to those of the generator before profiles existed, so every
  ``synth:`` figure stays reproducible.
* ``wide`` — the same scene families with wider ranges and the families the
  classic profile lacks (``docs/synthetic-data.md``, "The wide profile"):
  2-, 4- and 6-fold ``cos^n`` and von Mises azimuthal forms, streaks 1-5 px
  wide, 1-6 px spots in varied counts and clusters, varied ring widths and
  grains, beam centres far off the detector, small GISAXS beamstops and
  low-contrast horizons, and detector *readouts* (photon counting, float
  corrected frames with NaN masks, integrating detectors in ADU with gain,
  offset and read noise at 8, 16 or 32 bit, 16-bit CCD frames, module gaps
  interpolated).

The sampler (:mod:`.sampling`, :mod:`.features`) reads its ranges from the
profile it was given; nothing is set on it from outside. A profile's extra
draws happen only where the profile has the family, so ``classic`` consumes
the random stream exactly as before.

This module also applies a scene's readout to a rendered frame
(:func:`apply_readout`) and tells the labels what a readout changes
(:func:`readout_cut`, :func:`gaps_visible`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigurationError
from .physics import gaussian_noise

__all__ = ["AZIMUTH_FORMS", "PROFILES", "READOUTS", "AzimuthFamily", "ReadoutFamily",
           "SpotFamily", "VarietyProfile", "apply_readout", "draw_azimuth", "draw_readout",
           "gaps_visible", "readout_cut", "resolve_variety"]

#: Azimuthal contrast (min / max of the weight over the azimuths on the detector)
#: at or above which a ring or halo with an n-fold form is isotropic ...
FORM_ISO_MIN_CONTRAST = 0.5
#: ... and at or below which it is oriented / anisotropic (between: neither tag).
FORM_ANISO_MAX_CONTRAST = 0.2


@dataclass(frozen=True)
class AzimuthFamily:
    """An n-fold azimuthal form ``w = 1 - depth + depth * g(n (phi - phi0))``.

    ``cos_n``: ``g = ((1 + cos n dphi) / 2)^p`` (``p = 1``: the smooth
    ``cos^2``-like form); ``von_mises``: ``g = exp(kappa (cos n dphi - 1))``.
    ``sharpness`` is the range of ``p`` or ``kappa`` (log-uniform).
    """

    form: str
    folds: tuple[int, ...]
    sharpness: tuple[float, float]
    weight: float = 1.0


#: The n-fold forms of the wide profile.
AZIMUTH_FORMS: tuple[AzimuthFamily, ...] = (
    AzimuthFamily("cos_n", (2, 4, 6), (1.0, 12.0)),
    AzimuthFamily("von_mises", (2, 4, 6), (1.5, 12.0)),
)


@dataclass(frozen=True)
class SpotFamily:
    """Isolated spots: how many, how large (FWHM px) and how clustered."""

    count: tuple[int, int] = (1, 20)            # log-uniform
    fwhm_px: tuple[float, float] = (1.0, 6.0)
    cluster_p: float = 0.4                      # spots grouped around 1-3 centres
    cluster_radius_L: tuple[float, float] = (0.02, 0.12)
    min_separation_px: float = 4.0              # and >= 3 sigma of either spot


@dataclass(frozen=True)
class ReadoutFamily:
    """How counts become the stored frame.

    Parameters
    ----------
    name : str
        ``counting`` (the detector's own dtype and sentinels),
        ``float_corrected`` (float32 = counts x scale x flat field, NaN masks),
        ``integrating_adu`` (``gain (counts + read noise) + offset`` rounded
        and clipped to the ADC range of ``dtype``), ``ccd_16bit`` (a CCD's ADU
        as uint16: a saturated region reads 65535).
    families : tuple of str
        Detector families it applies to.
    weight : float
        Relative probability among the families that apply.
    dtypes : tuple of str
        Stored dtypes (one drawn).
    gain, offset, read_counts, scale : tuple of float
        Ranges: ADU per count (log), ADU offset, read noise in counts,
        float scale (log).
    gap_fill : tuple of str
        What module gaps and bad pixels hold: ``sentinel`` (the family's own or
        NaN), ``zero``, ``max`` (the dtype's maximum) or ``interpolated``
        (filled from the neighbouring rows/columns: no gaps seen).
    """

    name: str
    families: tuple[str, ...]
    weight: float
    dtypes: tuple[str, ...] = ()
    gain: tuple[float, float] = (1.0, 1.0)
    offset: tuple[float, float] = (0.0, 0.0)
    read_counts: tuple[float, float] = (0.0, 0.0)
    scale: tuple[float, float] = (1.0, 1.0)
    gap_fill: tuple[str, ...] = ("sentinel",)


#: Readouts of the wide profile.
READOUTS: tuple[ReadoutFamily, ...] = (
    ReadoutFamily("counting", ("pilatus", "eiger"), 0.4,
                  gap_fill=("sentinel", "sentinel", "interpolated")),
    ReadoutFamily("float_corrected", ("pilatus", "eiger"), 0.25, ("float32",),
                  scale=(1e-3, 1e3), gap_fill=("sentinel", "sentinel", "interpolated")),
    ReadoutFamily("integrating_adu", ("pilatus", "eiger"), 0.35, ("uint16", "int32", "uint8"),
                  gain=(0.5, 20.0), offset=(10.0, 200.0), read_counts=(0.3, 3.0),
                  gap_fill=("zero", "max", "interpolated")),
    ReadoutFamily("counting", ("ccd",), 0.4, gap_fill=("sentinel", "sentinel", "interpolated")),
    ReadoutFamily("ccd_16bit", ("ccd",), 0.6, ("uint16",), gap_fill=("zero", "interpolated")),
)
#: 8-bit integrating readouts use these instead (255 ADU must hold a useful range).
ADU8_GAIN = (0.01, 0.2)
ADU8_OFFSET = (4.0, 12.0)
_ADC_MAX = {"uint8": 255.0, "uint16": 65535.0, "int32": float(2**31 - 1), "float32": math.inf}


@dataclass(frozen=True)
class VarietyProfile:
    """The declared ranges of one generator profile (see the module docstring).

    Ranges are ``(lo, hi)``; ``*_p`` are probabilities. A family with
    probability 0 (or an empty table) is not drawn and consumes no random numbers.
    """

    name: str
    # probabilities of asking for a feature that differ from scene.WANT_P
    want_p: tuple[tuple[str, float], ...] = ()
    # geometry: beam centre near the middle below center_split[0], anywhere on the
    # detector below center_split[1], else off it by up to off_detector_max x L
    center_split: tuple[float, float] = (0.55, 0.87)
    off_detector_max: float = 0.25
    beamstop_circular_L: tuple[float, float] = (0.025, 0.07)
    beamstop_linear_L: tuple[float, float] = (0.025, 0.06)
    # intensities: normal-regime amplitudes E x 10^U(amp_decades)
    amp_decades: tuple[float, float] = (-1.3, 0.0)
    # shapes
    halo_fwhm_rel: tuple[float, float] = (0.15, 0.45)
    ring_fwhm_rel: tuple[float, float] = (0.002, 0.012)        # log-uniform
    grain_sigma_scale: tuple[float, float] = (1.0, 1.5)        # x the ring's radial sigma
    grain_fraction: tuple[float, float] = (0.12, 0.4)          # of the ring's capacity
    streak_sigma_px: tuple[float, float] = (0.5, 0.9)
    lattice_sigma_px: tuple[float, float] = (0.7, 1.6)
    on_ring_sigma_px: tuple[float, float] = (0.8, 1.8)
    # families the classic profile lacks
    azimuth_p: float = 0.0                 # a ring/halo gets an n-fold form
    azimuth_forms: tuple[AzimuthFamily, ...] = ()
    aniso_depth: tuple[float, float] = (0.88, 1.0)
    iso_depth: tuple[float, float] = (0.0, 0.35)
    spots: SpotFamily | None = None        # None: the classic 1-5 spots
    streak_count: tuple[int, int] = (1, 3)
    grazing_beamstop_p: float = 0.0       # GISAXS scenes without one ask for a beamstop
    low_contrast_horizon_p: float = 0.0
    low_contrast_below: tuple[float, float] = (0.02, 0.3)
    readouts: tuple[ReadoutFamily, ...] = field(default=())

    @property
    def classic(self) -> bool:
        return self.name == "classic"


CLASSIC = VarietyProfile("classic")
WIDE = VarietyProfile(
    "wide",
    # 4-/6-fold spots need the beam near the detector: asked for more often
    want_p=(("peaks_on_ring", 0.36),),
    center_split=(0.45, 0.72), off_detector_max=0.9,
    beamstop_circular_L=(0.008, 0.07), beamstop_linear_L=(0.01, 0.06),
    amp_decades=(-2.5, 0.0),
    halo_fwhm_rel=(0.1, 0.6), ring_fwhm_rel=(0.001, 0.03),
    grain_sigma_scale=(0.6, 2.5), grain_fraction=(0.05, 0.45),
    streak_sigma_px=(1.0 / 2.3548, 5.0 / 2.3548),            # FWHM 1-5 px
    lattice_sigma_px=(0.42, 2.5), on_ring_sigma_px=(0.5, 2.5),
    azimuth_p=0.6, azimuth_forms=AZIMUTH_FORMS,
    spots=SpotFamily(), streak_count=(1, 4),
    grazing_beamstop_p=0.5, low_contrast_horizon_p=0.4,
    readouts=READOUTS,
)
#: Profiles by name (``variety=`` of ``SceneGenerator``, ``sample_scene`` and ``synth:`` specs).
PROFILES: dict[str, VarietyProfile] = {"classic": CLASSIC, "wide": WIDE}


def resolve_variety(variety: str | VarietyProfile | None) -> VarietyProfile:
    """The profile named ``variety`` (``None``: ``classic``)."""
    if variety is None:
        return CLASSIC
    if isinstance(variety, VarietyProfile):
        return variety
    prof = PROFILES.get(str(variety))
    if prof is None:
        raise ConfigurationError(
            f"unknown generator variety {variety!r}; known: {', '.join(PROFILES)}")
    return prof


# ---------------------------------------------------------------------------
# Draws


def log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Log-uniform in [lo, hi] (``lo`` when ``hi <= lo``; one number is drawn either way)."""
    return float(math.exp(rng.uniform(math.log(lo), math.log(max(hi, lo)))))


def uniform_in(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Uniform in [lo, hi] (``lo``, drawing nothing, when ``hi <= lo``)."""
    return float(rng.uniform(lo, hi)) if hi > lo else float(lo)


def draw_azimuth(rng: np.random.Generator, prof: VarietyProfile, anisotropic: bool) -> dict:
    """An n-fold azimuthal form: clearly anisotropic or clearly isotropic by the label rule."""
    fams = prof.azimuth_forms
    wts = np.array([f.weight for f in fams], float)
    fam = fams[int(rng.choice(len(fams), p=wts / wts.sum()))]
    n = int(fam.folds[int(rng.integers(len(fam.folds)))])
    sharp = log_uniform(rng, *fam.sharpness)
    lo, hi = prof.aniso_depth if anisotropic else prof.iso_depth
    az = {"form": fam.form, "n": n, "depth": float(rng.uniform(lo, hi))}
    az["p" if fam.form == "cos_n" else "kappa"] = sharp
    return az


def draw_readout(rng: np.random.Generator, prof: VarietyProfile, family: str,
                 has_gaps: bool) -> dict | None:
    """A readout for a detector of ``family`` (``None`` when the profile has none)."""
    fams = [r for r in prof.readouts if family in r.families]
    if not fams:
        return None
    wts = np.array([r.weight for r in fams], float)
    ro = fams[int(rng.choice(len(fams), p=wts / wts.sum()))]
    out: dict = {"kind": ro.name}
    if ro.dtypes:
        out["dtype"] = ro.dtypes[int(rng.integers(len(ro.dtypes)))]
    if ro.name == "float_corrected":
        out["scale"] = log_uniform(rng, *ro.scale)
        out["flat_sigma"] = float(rng.uniform(0.0, 0.03))
    elif ro.name == "integrating_adu":
        eight = out["dtype"] == "uint8"
        out["gain"] = log_uniform(rng, *(ADU8_GAIN if eight else ro.gain))
        out["offset"] = float(rng.uniform(*(ADU8_OFFSET if eight else ro.offset)))
        out["read_counts"] = float(rng.uniform(*ro.read_counts))
    fill = ro.gap_fill[int(rng.integers(len(ro.gap_fill)))]
    out["gaps"] = fill if has_gaps or fill != "interpolated" else ro.gap_fill[0]
    return out


def effective_read_counts(readout: dict | None) -> float | None:
    """Read noise in counts an integrating readout adds (with ADC quantisation), else None."""
    if not readout or readout.get("kind") != "integrating_adu":
        return None
    g = float(readout["gain"])
    return math.sqrt(float(readout["read_counts"]) ** 2 + 1.0 / (12.0 * g * g))


# ---------------------------------------------------------------------------
# What a readout changes for the labels


def readout_cut(sc: dict, cut: float) -> float:
    """Counts at which a pixel saturates, given the counter's ``cut`` and the scene's readout."""
    ro = sc.get("readout")
    if not ro or ro.get("kind") != "integrating_adu":
        return cut
    top = (_ADC_MAX[ro["dtype"]] - float(ro["offset"])) / float(ro["gain"])
    return float(min(cut, top))


def gaps_visible(sc: dict) -> bool:
    """Whether module gaps show in the stored frame (not when they were interpolated)."""
    gaps = sc["detector"]["gaps"]
    if not (gaps["rows"] or gaps["cols"]):
        return False
    ro = sc.get("readout")
    return not (ro and ro.get("gaps") == "interpolated")


# ---------------------------------------------------------------------------
# Applying a readout to a rendered frame


def _masks(sc: dict, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    h, w = shape
    det = sc["detector"]
    grow = np.zeros(h, bool)
    gcol = np.zeros(w, bool)
    for a, z in det["gaps"]["rows"]:
        grow[a:z] = True
    for a, z in det["gaps"]["cols"]:
        gcol[a:z] = True
    bad = np.asarray(det.get("bad_pixels") or [], dtype=np.intp).reshape(-1, 2)
    if bad.size:
        ok = (bad[:, 0] >= 0) & (bad[:, 0] < h) & (bad[:, 1] >= 0) & (bad[:, 1] < w)
        bad = bad[ok]
        bad = bad[~grow[bad[:, 0]] & ~gcol[bad[:, 1]]]
    return grow, gcol, bad


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1), strict=True))


def _interpolate(v: np.ndarray, grow, gcol, bad) -> None:
    """Fill bad pixels by the mean of their valid 4-neighbours, then gap columns and
    gap rows linearly from their neighbours (in place, float array with NaN where
    masked; anything left without a valid neighbour becomes 0)."""
    h, w = v.shape
    if len(bad):
        isbad = np.zeros((h, w), bool)
        isbad[bad[:, 0], bad[:, 1]] = True
        acc = np.zeros(len(bad))
        cnt = np.zeros(len(bad))
        for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            i = bad[:, 0] + di
            j = bad[:, 1] + dj
            ok = (i >= 0) & (i < h) & (j >= 0) & (j < w)
            i, j = np.where(ok, i, 0), np.where(ok, j, 0)
            ok &= ~isbad[i, j] & np.isfinite(v[i, j])
            acc += np.where(ok, v[i, j], 0.0)
            cnt += ok
        v[bad[:, 0], bad[:, 1]] = acc / np.maximum(cnt, 1)
    for a, z in _runs(gcol):
        left = v[:, a - 1] if a > 0 else v[:, min(z, w - 1)]
        right = v[:, z] if z < w else left
        t = (np.arange(a, z) - a + 1.0) / (z - a + 1.0)
        v[:, a:z] = left[:, None] * (1 - t)[None, :] + right[:, None] * t[None, :]
    for a, z in _runs(grow):
        up = v[a - 1] if a > 0 else v[min(z, h - 1)]
        down = v[z] if z < h else up
        t = (np.arange(a, z) - a + 1.0) / (z - a + 1.0)
        v[a:z] = up[None, :] * (1 - t)[:, None] + down[None, :] * t[:, None]
    np.nan_to_num(v, copy=False, nan=0.0)


def apply_readout(frame: np.ndarray, sc: dict, seed: int) -> np.ndarray:
    """The stored frame of a rendered one under the scene's ``readout``.

    ``frame`` is what the detector family produces (counts with sentinels, or a
    CCD's float ADU with NaN); ``seed`` makes the readout's own noise (read
    noise, flat field) a pure function of the render. Works in place on one
    float32 copy (a 1024 x 1024 frame costs a few passes over 4 MB).
    """
    ro = sc.get("readout")
    if not ro:
        return frame
    kind = ro.get("kind", "counting")
    fill = ro.get("gaps", "sentinel")
    if kind == "counting" and fill == "sentinel":
        return frame
    grow, gcol, bad = _masks(sc, frame.shape)
    nseed = (int(seed) * 6364136223846793005 + 1442695040888963407) & 0x7FFFFFFFFFFFFFFF
    f4 = np.float32
    v = frame.astype(f4)
    if kind in ("counting", "ccd_16bit"):
        dtype = np.dtype(ro.get("dtype", frame.dtype))
    elif kind == "float_corrected":
        sat = _saturated(frame, sc)
        v *= f4(ro["scale"])
        sig = float(ro.get("flat_sigma", 0.0))
        if sig > 0:
            gaussian_noise(v, sig, nseed, multiply=True)      # flat-field error
        if sat is not None:   # clipped pixels stay one plateau (no flat field on them)
            v[sat] = f4(float(sc["detector"]["count_cutoff"]) * float(ro["scale"]))
        dtype = np.dtype("float32")
    elif kind == "integrating_adu":
        sat = _saturated(frame, sc)
        gaussian_noise(v, float(ro["read_counts"]), nseed)  # read noise, in counts
        v *= f4(ro["gain"])
        v += f4(ro["offset"])
        if sat is not None:   # the well is full: one value, no read noise
            v[sat] = f4(float(sc["detector"]["count_cutoff"]) * float(ro["gain"])
                        + float(ro["offset"]))
        dtype = np.dtype(ro["dtype"])
    else:
        raise ConfigurationError(f"unknown readout kind {kind!r}")
    integer = dtype.kind in "iu"
    if integer and frame.dtype.kind == "f":
        np.nan_to_num(v, copy=False, nan=0.0)      # CCD masks; set again below
    if integer:
        top = _ADC_MAX.get(dtype.name, float(np.iinfo(dtype).max))
        np.rint(v, out=v)
        np.clip(v, 0.0, min(top, 2.0**31 - 128), out=v)
    if fill == "interpolated":
        _mask_set(v, grow, gcol, bad, np.nan)
        _interpolate(v, grow, gcol, bad)
        if integer:
            np.rint(v, out=v)
        return v.astype(dtype)
    out = v.astype(dtype)
    if not integer:
        _mask_set(out, grow, gcol, bad, np.nan)
    elif fill == "sentinel" and kind == "counting":
        _mask_copy(out, frame, grow, gcol, bad)
    elif fill == "max":
        _mask_set(out, grow, gcol, bad, -1 if dtype.kind == "i" else np.iinfo(dtype).max)
    else:
        _mask_set(out, grow, gcol, bad, 0)
    return out


def _saturated(frame: np.ndarray, sc: dict) -> np.ndarray | None:
    """Pixels of a counting frame at the counter's cut-off (None when there are none)."""
    cut = sc["detector"].get("count_cutoff")
    if cut is None or frame.dtype.kind not in "iu":
        return None
    sat = frame >= cut
    if frame.dtype.kind == "u":     # the unsigned maximum is Eiger's mask, not a count
        sat &= frame != np.iinfo(frame.dtype).max
    return sat if sat.any() else None


def _mask_set(a: np.ndarray, grow, gcol, bad, value) -> None:
    a[grow, :] = value
    a[:, gcol] = value
    if len(bad):
        a[bad[:, 0], bad[:, 1]] = value


def _mask_copy(a: np.ndarray, src: np.ndarray, grow, gcol, bad) -> None:
    a[grow, :] = src[grow, :]
    a[:, gcol] = src[:, gcol]
    if len(bad):
        a[bad[:, 0], bad[:, 1]] = src[bad[:, 0], bad[:, 1]]
