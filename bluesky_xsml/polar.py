"""A polar view of model inputs around the beam centre, and the head that reads it.

A calibrated beamline knows where its direct beam hits the detector. Around
that point, "spots sharing one radius with 4- or 6-fold symmetry", "a ring
whose intensity sits in arcs" and "a ring made of grains" become direct
questions about the azimuthal profile at one radius, which a convolution over
the image can only answer by relating positions far apart.

:func:`polar_features` remaps channels of the preprocessed input (by default
the block maxima, dilated so that small spots are not missed between samples,
and the relative mean intensity) onto ``radial_bins`` radii by ``angles`` azimuths
around the beam centre. Each radius is described by the magnitudes of the
low azimuthal harmonics of its profile (invariant to rotations and
reflections about the beam) and its maximum. :class:`PolarHead` reads them,
together with the CNN's pooled features, and adds a correction to the CNN's
logits. Its last layer starts at zero, and frames whose beam centre is not
known get no correction, so a network with the head gives exactly the CNN's
outputs until the head is trained, and for frames without a centre.

Examples
--------
>>> import numpy as np
>>> from bluesky_xsml.polar import input_centers
>>> shapes = np.array([[1024, 1024], [40, 50]])     # (H, W): read in 8x8 blocks; doubled
>>> input_centers(shapes, np.array([[511.5, 511.5], [0.0, 0.0]]), 128)
array([[63.5, 63.5],
       [14.5, 24.5]])
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .preprocess import frame_layout

__all__ = ["PolarConfig", "PolarHead", "input_centers", "polar_features"]


@dataclass(frozen=True)
class PolarConfig:
    """Shape of the polar view and its head; saved in checkpoints that have one.

    Parameters
    ----------
    radial_bins : int
        Radii sampled, evenly from 0 to ``reach`` input pixels.
    angles : int
        Azimuths sampled per radius.
    harmonics : int
        Azimuthal harmonics kept per radius (0 to ``harmonics``).
    reach : float
        Largest radius, as a multiple of the input side.
    dilate : int
        Side of the max filter applied to the block maxima before sampling.
    views : tuple of str
        What is sampled: ``"peaks"`` (block maxima, dilated), ``"relative"``
        (the relative mean) and ``"sharpness"`` (block maximum minus block
        mean, dilated: high for spots narrower than a block).
    width : int
        Channels of the head's radial convolutions and hidden layer.
    fill_unseen : bool
        Replace the samples that fall where the detector saw nothing (outside
        the detector or the input, masked pixels, module gaps) by the mean of
        the seen samples at the same radius, before the harmonics are taken.
        Without it the frame's edges and gaps cut every ring at the same
        azimuths, which reads as structure along the ring: a beam at the
        centre of a square frame meets all four edges at one radius and gives
        a strong four-fold harmonic there. ``False`` (the default) keeps the
        features of heads trained before this option existed.
    """

    radial_bins: int = 96
    angles: int = 128
    harmonics: int = 16
    reach: float = 1.5
    dilate: int = 5
    views: tuple[str, ...] = ("peaks", "relative")
    width: int = 64
    fill_unseen: bool = False

    def __post_init__(self):
        object.__setattr__(self, "views", tuple(self.views))
        unknown = set(self.views) - set(_VIEWS)
        if unknown or not self.views:
            raise ValueError(f"polar views must be some of {_VIEWS}, got {self.views!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["views"] = list(self.views)
        if not self.fill_unseen:   # as written before the option existed: same checkpoint ids
            del d["fill_unseen"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PolarConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @property
    def channels(self) -> int:
        """Features per radius: views x (harmonics + 1 magnitudes, and the maximum)."""
        return len(self.views) * (self.harmonics + 2)


_VIEWS = ("peaks", "relative", "sharpness")


def input_centers(shapes, centers, size: int) -> np.ndarray:
    """Beam centres in raw-frame pixels -> positions on the model input.

    Follows :mod:`bluesky_xsml.preprocess`: frames smaller than ``size`` are
    enlarged by whole-pixel repetition, then centred on a square canvas of
    ``size * k`` pixels read in ``k x k`` blocks. Pixel centres are at integer
    coordinates in both frames of reference.

    Parameters
    ----------
    shapes : array_like, shape (N, 2)
        ``(H, W)`` of each raw frame.
    centers : array_like, shape (N, 2)
        ``(x, y)`` beam centre (column, row) in raw pixels; ``NaN`` if unknown.
    size : int
        Side of the model input.

    Returns
    -------
    numpy.ndarray
        ``(N, 2)`` float64 ``(x, y)`` on the input, ``NaN`` where unknown.
    """
    shapes = np.asarray(shapes, np.int64).reshape(-1, 2)
    c = np.asarray(centers, np.float64).reshape(-1, 2)
    out = np.empty_like(c)
    for i, (h, w) in enumerate(shapes):
        longest = max(h, w)
        rep = max(size // longest, 1) if longest < size else 1  # as preprocess enlarges
        k, oy, ox = frame_layout((h * rep, w * rep), size)
        out[i, 0] = ((c[i, 0] + 0.5) * rep + ox) / k - 0.5  # pixel centres at integers
        out[i, 1] = ((c[i, 1] + 0.5) * rep + oy) / k - 0.5
    return out


def _sampling_grid(centers: torch.Tensor, size: int, config: PolarConfig) -> torch.Tensor:
    """``(N, R, A, 2)`` grid_sample coordinates of the polar samples."""
    R, A = config.radial_bins, config.angles
    dr = config.reach * size / R
    r = (torch.arange(R, dtype=centers.dtype, device=centers.device) + 0.5) * dr
    t = torch.arange(A, dtype=centers.dtype, device=centers.device) * (2 * math.pi / A)
    px = centers[:, 0, None, None] + r[None, :, None] * torch.cos(t)[None, None, :]
    py = centers[:, 1, None, None] + r[None, :, None] * torch.sin(t)[None, None, :]
    # align_corners=False: input pixel i spans [-1 + 2i/S, -1 + 2(i+1)/S]
    return torch.stack([(2 * px + 1) / size - 1, (2 * py + 1) / size - 1], -1)


def _dilate(m: torch.Tensor, k: int) -> torch.Tensor:
    """``k x k`` max filter (stride 1, same size), as maxima of shifted copies.

    Equal to ``F.max_pool2d(m, k, 1, k // 2)`` for odd ``k``, and several times
    faster on CPUs for single-channel maps.
    """
    r = k // 2
    H, W = m.shape[-2:]
    p = F.pad(m, (r, r, r, r), value=float("-inf"))
    rows = p[..., 0:H, :]
    for i in range(1, k):
        rows = torch.maximum(rows, p[..., i:i + H, :])
    out = rows[..., 0:W]
    for j in range(1, k):
        out = torch.maximum(out, rows[..., j:j + W])
    return out


def polar_features(x: torch.Tensor, centers: torch.Tensor,
                   config: PolarConfig = PolarConfig()) -> torch.Tensor:
    """Azimuthal-harmonic description of each radius around the beam centre.

    Parameters
    ----------
    x : torch.Tensor
        ``(N, C, S, S)`` preprocessed inputs (channel 1 the block maxima,
        channel 2 the relative mean, channels 3 and 4 the masked and outside
        fractions, as in :data:`bluesky_xsml.preprocess.CHANNELS`).
    centers : torch.Tensor
        ``(N, 2)`` beam centres on the input (:func:`input_centers`); rows
        that are not finite give zeros.
    config : PolarConfig

    Returns
    -------
    torch.Tensor
        ``(N, config.channels, radial_bins)`` float32.
    """
    S = x.shape[-1]
    inputs = x
    x = x[:, :3].float().contiguous()  # log_mean, log_max, relative (contiguous: faster below)
    known = torch.isfinite(centers).all(1)
    c = torch.where(known[:, None], centers.float(), torch.zeros_like(centers, dtype=torch.float32))
    maps = []
    for view in config.views:
        if view == "peaks":
            maps.append(_dilate(x[:, 1:2], config.dilate))
        elif view == "relative":
            maps.append(x[:, 2:3])
        else:  # sharpness
            maps.append(_dilate(x[:, 1:2] - x[:, 0:1], config.dilate))
    if config.fill_unseen:
        # what the detector saw: not masked, not outside it (zero beyond the input)
        maps.append(1 - (inputs[:, 3:4].float() + inputs[:, 4:5].float()).clamp(0, 1))
    views = torch.cat(maps, 1)                                            # (N, V, S, S)
    grid = _sampling_grid(c, S, config)
    polar = F.grid_sample(views, grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False)                            # (N, V, R, A)
    if config.fill_unseen:
        polar, seen = polar[:, :-1], (polar[:, -1:] > 0.5).to(polar.dtype)
        n_seen = seen.sum(-1, keepdim=True)
        ring_mean = (polar * seen).sum(-1, keepdim=True) / n_seen.clamp(min=1)
        polar = torch.where(seen > 0, polar, ring_mean)
    spectrum = torch.fft.rfft(polar, dim=-1)[..., : config.harmonics + 1].abs()
    spectrum = spectrum / config.angles
    top = polar.amax(-1, keepdim=True)
    feats = torch.cat([spectrum, top], -1)                                # (N, V, R, H + 2)
    feats = feats.permute(0, 1, 3, 2).reshape(x.shape[0], config.channels,
                                              config.radial_bins)
    return feats * known[:, None, None].to(feats.dtype)


class PolarHead(nn.Module):
    """Reads the polar features and the CNN's pooled features; returns logit corrections.

    Two radial convolutions over the per-radius features (so a pattern is
    recognised at whatever radius it sits), mean and max pooling over radius,
    then a hidden layer shared with the CNN's pooled features. The output
    layer starts at zero, and rows without a beam centre get zero.
    """

    def __init__(self, config: PolarConfig, cnn_features: int, n_tags: int):
        super().__init__()
        self.config = config
        w = config.width
        self.radial = nn.Sequential(
            nn.Conv1d(config.channels, w, 3, padding=1), nn.ReLU(),
            nn.Conv1d(w, w, 3, padding=1), nn.ReLU(),
        )
        self.hidden = nn.Sequential(nn.Linear(2 * w + cnn_features, 2 * w), nn.ReLU())
        self.out = nn.Linear(2 * w, n_tags)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, feats: torch.Tensor, pooled: torch.Tensor,
                known: torch.Tensor) -> torch.Tensor:
        """Logit corrections ``(N, n_tags)`` from polar and pooled features.

        ``feats`` is :func:`polar_features` output, ``pooled`` the CNN's pooled
        features and ``known`` a ``(N,)`` boolean mask of frames with a centre.
        """
        dtype = self.out.weight.dtype
        h = self.radial(torch.log1p(feats.float().clamp(min=0) * 16).to(dtype))
        z = torch.cat([h.mean(-1), h.amax(-1), pooled.to(dtype)], 1)
        return self.out(self.hidden(z)) * known[:, None].to(dtype)
