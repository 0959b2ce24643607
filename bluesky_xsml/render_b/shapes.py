"""Pattern primitives of renderer B: radial and azimuthal profiles, spots and lines.

Everything here is a pure function of its arguments (no random numbers) that
returns float32 intensity in units of the component's own peak (1.0 at its
maximum), so that scenes set absolute amplitudes in one place.

Pixel ``(row i, column j)`` has its centre at ``x = j, y = i``; azimuth ``phi``
is measured from the +x axis towards +y (image rows grow downwards).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["Grid", "RADIAL_STEP", "AZIMUTH_BINS", "radial_peak", "azimuth_profile",
           "splat_spots", "line_distance", "line_profile", "diffuse_profile"]

#: Radial lookup tables are sampled every ``RADIAL_STEP`` pixels.
RADIAL_STEP = 0.25
#: Azimuthal lookup tables have this many bins over a full turn.
AZIMUTH_BINS = 1440


class Grid:
    """Pixel coordinates of one frame around a beam centre, computed lazily.

    Parameters
    ----------
    shape : tuple of int
        ``(H, W)`` of the frame.
    center : tuple of float
        Beam centre ``(x, y)`` in pixels (may lie off the frame).
    """

    def __init__(self, shape: tuple[int, int], center: tuple[float, float]):
        self.shape = (int(shape[0]), int(shape[1]))
        self.cx, self.cy = float(center[0]), float(center[1])
        self.dx = np.arange(self.shape[1], dtype=np.float32) - np.float32(self.cx)
        self.dy = np.arange(self.shape[0], dtype=np.float32) - np.float32(self.cy)
        self._r = self._phi = self._ri = self._pi = None

    @property
    def r(self) -> np.ndarray:
        """Distance of every pixel from the beam centre (float32, H x W)."""
        if self._r is None:
            self._r = np.sqrt(self.dy[:, None] ** 2 + self.dx[None, :] ** 2)
        return self._r

    @property
    def phi(self) -> np.ndarray:
        """Azimuth of every pixel in ``[-pi, pi]`` (float32, H x W)."""
        if self._phi is None:
            self._phi = np.arctan2(self.dy[:, None], self.dx[None, :])
        return self._phi

    @property
    def r_index(self) -> np.ndarray:
        """Index of every pixel into a radial table of step :data:`RADIAL_STEP`."""
        if self._ri is None:
            self._ri = (self.r * np.float32(1.0 / RADIAL_STEP) + np.float32(0.5)).astype(np.int32)
        return self._ri

    @property
    def phi_index(self) -> np.ndarray:
        """Index of every pixel into an azimuthal table of :data:`AZIMUTH_BINS` bins."""
        if self._pi is None:
            k = np.float32(AZIMUTH_BINS / (2 * math.pi))
            idx = ((self.phi + np.float32(math.pi)) * k).astype(np.int32)
            self._pi = np.minimum(idx, AZIMUTH_BINS - 1)
        return self._pi

    @property
    def r_max(self) -> float:
        """Largest distance from the centre to a frame corner."""
        h, w = self.shape
        return float(max(math.hypot(x - self.cx, y - self.cy)
                         for x in (0, w - 1) for y in (0, h - 1)))

    def radial_axis(self) -> np.ndarray:
        """Radii of the radial lookup table (covers every pixel)."""
        return np.arange(int(self.r_max / RADIAL_STEP) + 3, dtype=np.float32) * RADIAL_STEP

    def azimuth_axis(self) -> np.ndarray:
        """Azimuths of the centres of the azimuthal table's bins."""
        return (-math.pi + (np.arange(AZIMUTH_BINS, dtype=np.float32) + 0.5)
                * np.float32(2 * math.pi / AZIMUTH_BINS))


def radial_peak(r: np.ndarray, r0: float, fwhm: float, eta: float = 0.0) -> np.ndarray:
    """Pseudo-Voigt peak at radius ``r0``: ``eta`` Lorentzian + ``1 - eta`` Gaussian, peak 1."""
    d = (r - np.float32(r0)) / np.float32(max(fwhm, 1e-3) / 2)
    g = np.exp(np.float32(-math.log(2)) * d * d)
    if eta <= 0:
        return g
    return np.float32(1 - eta) * g + np.float32(eta) / (1 + d * d)


def azimuth_profile(phi: np.ndarray, form: str, *, fold: int = 2, phase: float = 0.0,
                    kappa: float = 4.0, power: int = 2, floor: float = 0.0,
                    arcs: tuple = ()) -> np.ndarray:
    """Azimuthal modulation in ``[floor, 1]``.

    Parameters
    ----------
    phi : numpy.ndarray
        Azimuths (radians).
    form : str
        ``"uniform"``; ``"cos"``: ``|cos(fold (phi - phase) / 2)| ** (2 power)``
        (``fold`` maxima per turn); ``"vonmises"``: ``exp(kappa (cos(fold (phi -
        phase)) - 1))``; ``"arcs"``: Gaussian arcs at the ``(centre, width)``
        pairs in ``arcs``; ``"ripple"``: ``1 - floor`` times a weak
        ``(1 + cos(fold (phi - phase))) / 2`` (used for almost-uniform rings).
    """
    phi = np.asarray(phi, np.float32)
    if form == "uniform":
        return np.ones_like(phi)
    if form == "cos":
        m = (np.abs(np.cos(np.float32(fold / 2) * (phi - np.float32(phase))))
             ** np.float32(2 * power))
    elif form == "vonmises":
        m = np.exp(np.float32(kappa) * (np.cos(np.float32(fold) * (phi - np.float32(phase))) - 1))
    elif form == "arcs":
        m = np.zeros_like(phi)
        for c, w in arcs:
            d = np.angle(np.exp(1j * (phi - c))).astype(np.float32)
            m = np.maximum(m, np.exp(-0.5 * (d / np.float32(w)) ** 2))
    elif form == "ripple":
        m = np.float32(0.5) * (1 + np.cos(np.float32(fold) * (phi - np.float32(phase))))
    else:
        raise ValueError(f"unknown azimuthal form {form!r}")
    return np.float32(floor) + np.float32(1 - floor) * m


def diffuse_profile(r: np.ndarray, law: str, length: float, exponent: float) -> np.ndarray:
    """Small-angle intensity decaying from the beam, 1 at ``r = 0``.

    ``law``: ``"guinier"`` ``exp(-(r/length)^2 / 3)``; ``"lorentz"``
    (Ornstein-Zernike) ``1 / (1 + (r/length)^2)``; ``"debye_bueche"`` its
    square; ``"power"`` ``(1 + (r/length)^2) ** (-exponent / 2)`` (Porod-like
    at ``exponent = 4``); ``"sphere"`` the form factor of a sphere of radius
    ``length`` (in pixel units of ``1/q``) with a Porod envelope.
    """
    x = r / np.float32(length)
    if law == "guinier":
        return np.exp(-x * x / 3)
    if law == "lorentz":
        return 1 / (1 + x * x)
    if law == "debye_bueche":
        return 1 / (1 + x * x) ** 2
    if law == "power":
        return (1 + x * x) ** np.float32(-exponent / 2)
    if law == "sphere":
        u = np.maximum(x * np.float32(3.0), np.float32(1e-3))
        f = 3 * (np.sin(u) - u * np.cos(u)) / u ** 3
        smear = np.float32(0.15) / (1 + (u / 3) ** 4)  # polydispersity fills the minima
        return (f * f + smear * (1 - np.exp(-u * u / 10))).astype(np.float32)
    raise ValueError(f"unknown diffuse law {law!r}")


def splat_spots(out: np.ndarray, xs, ys, amps, sigmas, *, elong=None, angle=None,
                reach: float = 3.5) -> None:
    """Add 2-D Gaussian spots (peak ``amps``) into ``out`` in place.

    Spots are evaluated on a square window of ``reach`` sigmas around each
    centre, all at once (no Python loop over spots).  ``elong`` stretches a
    spot along ``angle`` (radians), for streaky or mosaic reflections.
    """
    xs = np.asarray(xs, np.float32).ravel()
    if xs.size == 0:
        return
    ys = np.asarray(ys, np.float32).ravel()
    amps = np.broadcast_to(np.asarray(amps, np.float32), xs.shape)
    sig = np.broadcast_to(np.asarray(sigmas, np.float32), xs.shape)
    el = np.broadcast_to(np.asarray(1.0 if elong is None else elong, np.float32), xs.shape)
    an = np.broadcast_to(np.asarray(0.0 if angle is None else angle, np.float32), xs.shape)
    h, w = out.shape
    half = int(math.ceil(reach * float((sig * el).max()))) + 1
    off = np.arange(-half, half + 1, dtype=np.int32)
    ox, oy = np.meshgrid(off, off)
    ox, oy = ox.ravel(), oy.ravel()
    ix = np.rint(xs).astype(np.int32)[:, None] + ox[None, :]
    iy = np.rint(ys).astype(np.int32)[:, None] + oy[None, :]
    dx = ix - xs[:, None]
    dy = iy - ys[:, None]
    c, s = np.cos(an)[:, None], np.sin(an)[:, None]
    u = (dx * c + dy * s) / (sig * el)[:, None]
    v = (-dx * s + dy * c) / sig[:, None]
    val = amps[:, None] * np.exp(-0.5 * (u * u + v * v))
    ok = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h) & (val > 1e-4 * amps[:, None])
    flat = (iy[ok].astype(np.int64) * w + ix[ok])
    out.reshape(-1)[:] += np.bincount(flat, weights=val[ok], minlength=h * w).astype(np.float32)


def line_distance(grid: Grid, angle: float, x0: float | None = None,
                  y0: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance across and along a straight line through ``(x0, y0)``.

    The line passes through the beam centre unless ``x0, y0`` are given and runs
    at ``angle`` (radians from +x).  Returns ``(across, along)``, float32 H x W.
    """
    x0 = grid.cx if x0 is None else x0
    y0 = grid.cy if y0 is None else y0
    dx = grid.dx + np.float32(grid.cx - x0)
    dy = grid.dy + np.float32(grid.cy - y0)
    c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    along = dx[None, :] * c + dy[:, None] * s
    across = -dx[None, :] * s + dy[:, None] * c
    return across, along


def line_profile(across: np.ndarray, width: float, kind: str = "gauss") -> np.ndarray:
    """Cross-section of a line of full width ``width`` pixels, peak 1.

    ``kind``: ``"gauss"`` (FWHM = width) or ``"box"`` (flat top of that width
    with half-pixel soft edges).
    """
    if kind == "box":
        return np.clip(np.float32(width / 2 + 0.5) - np.abs(across), 0, 1)
    k = np.float32(4 * math.log(2) / max(width, 0.3) ** 2)
    return np.exp(-k * across * across)
