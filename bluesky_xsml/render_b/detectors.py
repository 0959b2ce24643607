"""Detector geometries and readouts of renderer B.

A :class:`DetectorModel` is a frame shape, a tiling into modules separated by
inactive gaps, and a readout family:

``counting``
    hybrid photon-counting pixels (Pilatus-, Eiger-, Timepix-like): Poisson
    counts, no read noise, a counter or count-rate ceiling.
``integrating``
    CCD/CMOS analogue readout in ADU: ``offset + gain * photons + read noise``,
    quantised and clipped at the ADC's ``2**bits - 1``.
``float``
    frames already corrected by a pipeline (dark subtracted, flat-fielded,
    possibly normalised): float32, masked pixels are NaN, negative values occur.

The readout's sentinel convention (which value means masked, which means
saturated) is chosen per frame in :mod:`~bluesky_xsml.render_b.sampler` and
recorded in each frame's metadata under ``detector.convention``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DETECTORS", "DetectorModel", "detector", "gap_mask", "read_out"]


@dataclass(frozen=True)
class DetectorModel:
    """Shape, module tiling and readout family of one detector.

    Parameters
    ----------
    name : str
        Identifier recorded in each frame's metadata.
    family : str
        ``pilatus``, ``eiger``, ``timepix``, ``ccd`` or ``cmos``.
    readout : str
        ``counting``, ``integrating`` or ``float``.
    module : tuple of int
        ``(rows, cols)`` of one module in pixels.
    tiling : tuple of int
        Modules per column and per row ``(n_rows, n_cols)``.
    gap : tuple of int
        Inactive pixels between module rows and between module columns.
    """

    name: str
    family: str
    readout: str
    module: tuple[int, int]
    tiling: tuple[int, int] = (1, 1)
    gap: tuple[int, int] = (0, 0)

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of a frame."""
        (mh, mw), (nr, nc), (gr, gc) = self.module, self.tiling, self.gap
        return (nr * mh + (nr - 1) * gr, nc * mw + (nc - 1) * gc)

    @property
    def modular(self) -> bool:
        """Whether the frame has inactive gaps between modules."""
        return (self.tiling[0] > 1 and self.gap[0] > 0) or (self.tiling[1] > 1 and self.gap[1] > 0)


#: The detectors renderer B draws from (longest sides 256-1500 pixels).
DETECTORS: tuple[DetectorModel, ...] = (
    # Pilatus-like: 487 x 195 modules, 7-pixel column gaps, 17-pixel row gaps
    DetectorModel("b_pilatus_300k", "pilatus", "counting", (195, 487), (3, 1), (17, 7)),
    DetectorModel("b_pilatus_1m", "pilatus", "counting", (195, 487), (5, 2), (17, 7)),
    DetectorModel("b_pilatus_200k_wide", "pilatus", "counting", (195, 487), (1, 3), (17, 7)),
    # Eiger-like modules binned 2x2: 257 x 515, 19-row and 5-column gaps
    DetectorModel("b_eiger_1m_bin2", "eiger", "counting", (257, 515), (2, 1), (19, 5)),
    DetectorModel("b_eiger_4m_bin2", "eiger", "counting", (257, 515), (4, 2), (19, 5)),
    DetectorModel("b_eiger_500k", "eiger", "counting", (514, 1030)),
    # Timepix/Medipix-like: 256 x 256 chips
    DetectorModel("b_timepix_single", "timepix", "counting", (256, 256)),
    DetectorModel("b_timepix_quad", "timepix", "counting", (256, 256), (2, 2), (4, 4)),
    DetectorModel("b_timepix_strip", "timepix", "counting", (256, 256), (1, 4), (3, 3)),
    # CCDs (integrating), square and not, one tiled
    DetectorModel("b_ccd_512", "ccd", "integrating", (512, 512)),
    DetectorModel("b_ccd_1024", "ccd", "integrating", (1024, 1024)),
    DetectorModel("b_ccd_1340x1300", "ccd", "integrating", (1300, 1340)),
    DetectorModel("b_ccd_768x1024", "ccd", "integrating", (768, 1024)),
    DetectorModel("b_ccd_tiled_3x3", "ccd", "integrating", (400, 400), (3, 3), (6, 6)),
    # pipeline-corrected float frames
    DetectorModel("b_cmos_float", "cmos", "float", (1100, 1400)),
    DetectorModel("b_cmos_float_small", "cmos", "float", (600, 800)),
    DetectorModel("b_pilatus_1m_float", "pilatus", "float", (195, 487), (5, 2), (17, 7)),
)

_BY_NAME = {d.name: d for d in DETECTORS}


def detector(name: str) -> DetectorModel:
    """The detector called ``name`` (``KeyError`` listing the names otherwise)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown detector {name!r}; known: {', '.join(_BY_NAME)}") from None


def gap_mask(det: DetectorModel) -> np.ndarray | None:
    """Boolean H x W mask of the inactive pixels between modules (``None`` if none)."""
    if not det.modular:
        return None
    h, w = det.shape
    mask = np.zeros((h, w), bool)
    (mh, mw), (nr, nc), (gr, gc) = det.module, det.tiling, det.gap
    for k in range(1, nr):
        a = k * mh + (k - 1) * gr
        mask[a:a + gr, :] = True
    for k in range(1, nc):
        a = k * mw + (k - 1) * gc
        mask[:, a:a + gc] = True
    return mask


def _interpolate_gaps(frame: np.ndarray, det: DetectorModel) -> None:
    """Fill the gaps in place by linear interpolation across them (float frame)."""
    (mh, mw), (nr, nc), (gr, gc) = det.module, det.tiling, det.gap
    _h, _w = frame.shape
    for k in range(1, nc):
        a = k * mw + (k - 1) * gc
        left, right = frame[:, a - 1], frame[:, a + gc]
        t = (np.arange(1, gc + 1, dtype=np.float32) / (gc + 1))[None, :]
        frame[:, a:a + gc] = left[:, None] * (1 - t) + right[:, None] * t
    for k in range(1, nr):
        a = k * mh + (k - 1) * gr
        top, bottom = frame[a - 1, :], frame[a + gr, :]
        t = (np.arange(1, gr + 1, dtype=np.float32) / (gr + 1))[:, None]
        frame[a:a + gr, :] = top[None, :] * (1 - t) + bottom[None, :] * t


def _poisson(rng: np.random.Generator, lam: np.ndarray) -> np.ndarray:
    """Poisson counts (float32); a rounded normal stands in where ``lam > 60``."""
    lam = np.maximum(lam, 0, dtype=np.float32)
    big = lam > 60
    if not big.any():
        return rng.poisson(lam).astype(np.float32)
    out = np.empty_like(lam)
    small = ~big
    out[small] = rng.poisson(lam[small])
    lb = lam[big]
    out[big] = np.maximum(np.rint(lb + np.sqrt(lb) * rng.standard_normal(lb.size,
                                                                          dtype=np.float32)), 0)
    return out


def read_out(rng: np.random.Generator, photons: np.ndarray, det: DetectorModel,
             conv: dict) -> tuple[np.ndarray, int]:
    """Turn expected photons per pixel into a stored frame.

    Parameters
    ----------
    rng : numpy.random.Generator
        The frame's random stream.
    photons : numpy.ndarray
        Expected photons per pixel (float32, H x W); gaps already hold 0.
    det : DetectorModel
        The detector.
    conv : dict
        The readout settings and sentinel convention drawn by the sampler
        (``dtype``, ``saturated``, ``masked``, ``gap_fill``, ``gain``, ...).

    Returns
    -------
    frame : numpy.ndarray
        The stored frame in ``conv["dtype"]``.
    n_saturated : int
        Active pixels clipped at the saturation value.
    """
    gaps = gap_mask(det)
    kind = det.readout
    if kind == "counting":
        sig = _poisson(rng, photons)
        level = float(conv["saturated"])
        sat = sig >= level
        sig[sat] = level
    elif kind == "integrating":
        e = _poisson(rng, photons)
        adu = (np.float32(conv["offset"]) + np.float32(conv["gain"]) * e
               + np.float32(conv["read_noise"]) * rng.standard_normal(e.shape, dtype=np.float32))
        sig = np.clip(np.rint(adu), 0, None)
        level = float(conv["saturated"])
        sat = sig >= level
        sig[sat] = level
    else:  # float, pipeline corrected
        e = _poisson(rng, photons)
        dark = np.float32(conv["read_noise"]) * rng.standard_normal(e.shape, dtype=np.float32)
        sig = (e + dark) * np.float32(conv["scale"])
        flat = conv.get("flat_ripple", 0.0)
        if flat:
            h, w = sig.shape
            yy = np.linspace(0, 6.28, h, dtype=np.float32)[:, None]
            xx = np.linspace(0, 6.28, w, dtype=np.float32)[None, :]
            sig *= 1 + np.float32(flat) * np.sin(yy * 1.3 + 0.4) * np.cos(xx * 0.7)
        level = float(conv["saturated"])
        sat = sig >= level
        sig[sat] = level
    if gaps is not None:
        sat &= ~gaps
    n_sat = int(sat.sum())
    for (r, c, v) in conv.get("hot", ()):
        sig[r, c] = min(float(v) + sig[r, c], level)
    fill = conv.get("gap_fill")
    if gaps is not None and fill == "interpolate":
        sig = sig.astype(np.float32)
        _interpolate_gaps(sig, det)
        if kind != "float":
            sig = np.rint(sig)
    dtype = np.dtype(conv["dtype"])
    if dtype.kind == "f":
        out = sig.astype(dtype)
    else:  # counts stay below the dtype's maximum where that is the masked sentinel
        info = np.iinfo(dtype)
        top = float(info.max) - (1.0 if conv["masked"] == info.max else 0.0)
        out = np.clip(sig.astype(np.float64), info.min, top).astype(dtype)
    masked = np.nan if conv["masked"] == "nan" else conv["masked"]
    for (r, c) in conv.get("dead", ()):
        if gaps is None or not gaps[r, c]:
            out[r, c] = masked
    if gaps is not None and fill != "interpolate":
        out[gaps] = np.nan if fill == "nan" else fill
    return out, n_sat
