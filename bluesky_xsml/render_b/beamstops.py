"""Beamstop shadows of renderer B.

:func:`shadow` turns a scene's ``beamstop`` entry into a transmission map (1
in the open, the stop's transmission in its shadow, soft edges of ``edge``
pixels) and, for labelling, the pixels just outside each part of the shadow
(``rims``): a part is visible only where something lights its surroundings.

Shapes: ``disc`` (round stop), ``disc_arm`` (round stop on a holder arm running
to the frame edge), ``rod`` and ``bar`` (a strip from the beam to the edge with
a rounded end), ``pin`` (a small square; neither round nor rod-shaped).
"""

from __future__ import annotations

import math

import numpy as np

from .shapes import Grid, line_distance

__all__ = ["shadow"]


def _ramp(d: np.ndarray, edge: float) -> np.ndarray:
    """0 inside (d < 0), 1 outside, linear over ``edge`` pixels around d = 0."""
    return np.clip(d / np.float32(max(edge, 1e-3)) + np.float32(0.5), 0, 1)


def shadow(grid: Grid, bs: dict) -> tuple[np.ndarray | None, dict]:
    """Transmission map and rim masks of a beamstop.

    Returns
    -------
    T : numpy.ndarray or None
        float32 H x W transmission (``None`` for no beamstop).
    rims : dict
        ``{"circular": mask, "linear": mask}`` for the parts present: boolean
        masks of the open pixels 2-8 px outside that part of the shadow.
    """
    shape = bs.get("shape", "none")
    if shape == "none":
        return None, {}
    sx, sy = bs["center"]
    R, t, edge = bs["radius"], bs["transmission"], bs["edge"]
    dx = grid.dx + np.float32(grid.cx - sx)
    dy = grid.dy + np.float32(grid.cy - sy)
    rims: dict = {}
    open_ = np.ones(grid.shape, np.float32)
    if shape in ("disc", "disc_arm"):
        d = np.sqrt(dy[:, None] ** 2 + dx[None, :] ** 2) - np.float32(R)
        open_ = np.minimum(open_, _ramp(d, edge))
        rims["circular"] = (d > 2) & (d < 8)
    if shape in ("disc_arm", "rod", "bar"):
        ang, w = bs["angle"], bs["width"]
        across, along = line_distance(grid, ang, sx, sy)
        start = 0.0 if shape == "disc_arm" else -w / 2
        # distance outside a half-infinite strip with a rounded start
        da = np.abs(across) - np.float32(w / 2)
        behind = np.float32(start) - along
        d = np.where(behind > 0, np.sqrt(np.maximum(da + np.float32(w / 2), 0) ** 2
                                         + behind ** 2) - np.float32(w / 2), da)
        open_ = np.minimum(open_, _ramp(d, edge))
        rim = (d > 2) & (d < 8) & (along > np.float32(R + 4))
        rims["linear"] = rim
        if "circular" in rims:
            rims["circular"] &= np.abs(across) > np.float32(w / 2 + 2)
    if shape == "pin":
        c, s = math.cos(bs["angle"]), math.sin(bs["angle"])
        u = np.abs(dx[None, :] * np.float32(c) + dy[:, None] * np.float32(s))
        v = np.abs(-dx[None, :] * np.float32(s) + dy[:, None] * np.float32(c))
        d = np.maximum(u, v) - np.float32(R)
        open_ = np.minimum(open_, _ramp(d, edge))
    T = np.float32(t) + np.float32(1 - t) * open_
    return T.astype(np.float32), rims
