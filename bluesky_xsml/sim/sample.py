"""A simulated combinatorial sample and a detector that looks at it.

A combinatorial film holds, side by side, regions of different structure; a
beamline maps it by moving the sample under the beam and taking a frame at each
position.  :class:`CombinatorialSample` is such a film, 10 mm x 10 mm by
default, laid out as (``x`` across, ``y`` up)::

    y 10 +--------------------------------------------+--+
         |  amorphous   :  textured powder | crystal  |b |
         |  (halo)      :  (grains on the  | (spot    |l |
         |             :    rings)         |  lattice)|a |
       5 |            :--------------------|          |n |
         |            :  isotropic powder  |----------|k |
         |             :  (rings)          | oriented |  |
         |              :                  | (arcs)   |  |
       0 +--------------------------------------------+--+
         0        ~3.5 (wavy)            6.4        9.2  10   x

The amorphous / crystalline boundary is wavy and about 0.3 mm wide (both
phases coexist there, so halo and rings are seen together); the other
boundaries are sharp.  The film thickness, and so the scattered intensity,
grows slowly along ``y``.  Past ``x = 9.2`` (and anywhere off the film) the
beam misses the sample: only dark counts (``beam_off``).

Every position maps to a hand-written scene (one detector and geometry for
the whole sample, as at a beamline) built with
:func:`~bluesky_xsml.sim.generator.complete_scene`; frames come from
:func:`~bluesky_xsml.sim.generator.render_scene` and the true tags from
:func:`~bluesky_xsml.sim.generator.scene_labels`.

Devices (ophyd v1 motors such as :class:`ophyd.sim.SynAxis` give the beam
position; their ``position`` is read when the detector is triggered):

:class:`SampleStageDetector`
    inline-array detector (frames in the events).
:func:`hdf5_stage_detector`
    area-detector-style HDF5 writer (``resource``/``datum``).
:func:`stream_stage_detector`
    ophyd-async HDF5 writer (``stream_resource``/``stream_datum``).
:func:`make_beamline`
    motors, sample and detector in one call.

Examples
--------
>>> from bluesky_xsml.sim.sample import CombinatorialSample
>>> s = CombinatorialSample(size=128)
>>> s.region_at(1.0, 2.0), s.region_at(5.0, 2.0), s.region_at(9.5, 5.0)
('amorphous', 'powder', 'blank')
>>> "halo_isotropic" in s.tags_at(1.0, 2.0), s.tags_at(9.5, 5.0)
(True, ['beam_off', 'detector_gaps'])
>>> s.frame_at(5.0, 2.0).shape
(128, 120)
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigurationError
from ..tags import TAG_NAMES
from .detectors import HDF5ResourceDetector, InlineImageDetector, StreamResourceDetector
from .generator import complete_scene, render_scene, scene_labels

__all__ = [
    "REGIONS",
    "CombinatorialSample",
    "SampleStageDetector",
    "SimulatedBeamline",
    "hdf5_stage_detector",
    "make_beamline",
    "position_frame_source",
    "stream_stage_detector",
]

#: Region name -> what the beam sees there (the tags the scene is built to show).
REGIONS: dict[str, str] = {
    "amorphous": "an amorphous film: one broad isotropic halo (halo_isotropic)",
    "mixed": "amorphous/crystalline coexistence: halo and powder rings together",
    "powder": "a fine isotropic powder: sharp CeO2 rings (ring_isotropic)",
    "textured": "a coarse powder: rings broken into grains (ring_textured)",
    "oriented": "an oriented phase: rings concentrated in arcs (ring_oriented)",
    "crystal": "a single-crystal domain: a 2-D lattice of spots (peaks_lattice)",
    "blank": "off the film: the beam hits nothing, only dark counts (beam_off)",
}

_MM = 1000  # positions are quantised to 1 um for the noise seed


class CombinatorialSample:
    """A film with regions of different structure over sample position.

    Parameters
    ----------
    seed : int
        Seed of the counting noise (and of grain / lattice details).
    size : int
        Longest side of the rendered frames in pixels (>= 64).
    detector : str
        Detector model name (see :data:`bluesky_xsml.sim.geometry.DETECTORS`).
    width, height : float
        Film extent in mm: ``0 <= x <= width``, ``0 <= y <= height``.  The
        layout scales with the extent.

    Notes
    -----
    All frames share one geometry: 0.2 m sample-detector distance, 1 A
    wavelength, beam at the frame centre, a circular beamstop.  Frame noise
    for the ``n``-th exposure at a position is a pure function of
    ``(seed, x, y, n)``, so a scan is reproducible.
    """

    def __init__(self, *, seed: int = 0, size: int = 256, detector: str = "pilatus_1m",
                 width: float = 10.0, height: float = 10.0):
        if not isinstance(size, (int, np.integer)) or size < 64:
            raise ConfigurationError(f"sample frames need size >= 64 pixels, got {size!r}")
        if not (width > 0 and height > 0):
            raise ConfigurationError(
                f"sample width and height must be > 0 mm, got {width!r} x {height!r}")
        self.seed = int(seed)
        self.size = int(size)
        self.detector = detector
        self.width = float(width)
        self.height = float(height)
        # the scene every position shares (validates the detector name)
        self._base = complete_scene({
            "detector": detector, "size": self.size,
            "geometry": {"distance_m": 0.2, "wavelength_A": 1.0},
            "background": {"level": 2.0},
            "beamstop": {"type": "circular", "radius_px": 0.045 * self.size,
                         "transmission": 1e-3},
            "features": [],
        })

    @property
    def beam_center(self) -> tuple[float, float]:
        """Where the direct beam hits the detector, ``(x, y)`` in pixels (all positions)."""
        x, y = self._base["geometry"]["beam_center"]
        return float(x), float(y)

    def __repr__(self) -> str:
        return (f"CombinatorialSample(seed={self.seed}, size={self.size}, "
                f"detector={self.detector!r}, width={self.width:g}, height={self.height:g})")

    # -- layout -------------------------------------------------------------

    def _unit(self, x: float, y: float) -> tuple[float, float]:
        """Position scaled to the default 10 mm x 10 mm layout."""
        return 10.0 * float(x) / self.width, 10.0 * float(y) / self.height

    def crystalline_fraction(self, x: float, y: float) -> float:
        """Fraction of crystalline material at ``(x, y)`` (0: amorphous, 1: crystalline)."""
        u, v = self._unit(x, y)
        boundary = 3.5 + 0.6 * math.sin(2 * math.pi * v / 10.0)
        return 1.0 / (1.0 + math.exp(-(u - boundary) / 0.08))

    def region_at(self, x: float, y: float) -> str:
        """Name of the region under the beam at ``(x, y)`` (a key of :data:`REGIONS`)."""
        u, v = self._unit(x, y)
        if not (0.0 <= u <= 10.0 and 0.0 <= v <= 10.0) or u > 9.2:
            return "blank"
        c = self.crystalline_fraction(x, y)
        if c < 0.05:
            return "amorphous"
        if c < 0.95:
            return "mixed"
        if u < 6.4:
            return "powder" if v < 5.0 else "textured"
        return "oriented" if v < 4.0 else "crystal"

    def regions(self) -> dict[str, str]:
        """The regions of this sample and what each shows (a copy of :data:`REGIONS`)."""
        return dict(REGIONS)

    # -- scenes -------------------------------------------------------------

    def scene_at(self, x: float, y: float) -> dict:
        """The complete scene (see ``docs/synthetic-data.md``) at position ``(x, y)``."""
        region = self.region_at(x, y)
        scene = {k: v for k, v in self._base.items() if k != "features"}
        scene["sample_region"] = region
        if region == "blank":
            scene.update(beam_on=False, background={"level": 0.0, "gradient": [0.0, 0.0]},
                         beamstop=None, features=[])
            return complete_scene(scene)
        u, v = self._unit(x, y)
        thick = 0.7 + 0.06 * v          # thicker film at larger y: more counts
        c = self.crystalline_fraction(x, y)
        feats: list[dict[str, Any]] = []
        if c < 0.95:
            feats.append({"type": "halo", "q0": 1.45, "fwhm_rel": 0.3,
                          "amp": 900.0 * thick * (1 - c)})
        if region in ("mixed", "powder"):
            feats.append({"type": "rings", "material": "CeO2", "style": "isotropic",
                          "fwhm_rel": 0.006, "amp": 4000.0 * thick * c})
        elif region == "textured":
            grains = int(round(60 - 3 * (v - 5.0)))   # coarser towards the top
            feats.append({"type": "rings", "material": "CeO2", "style": "textured",
                          "fwhm_rel": 0.006, "amp": 6000.0 * thick, "n_grains": grains,
                          "grain_sigma_px": max(0.7, 1.0 * self.size / 256),
                          "seed": self.seed * 7919 + 11})
        elif region == "oriented":
            feats.append({"type": "rings", "material": "CeO2", "style": "oriented",
                          "kappa": 6.0, "orient_deg": 90.0 + 8.0 * (u - 6.4),
                          "fwhm_rel": 0.006, "amp": 5000.0 * thick})
        elif region == "crystal":
            ang = math.radians(10.0 + 4.0 * (v - 4.0))
            a = 0.55
            feats.append({"type": "lattice",
                          "a_star": [a * math.cos(ang), a * math.sin(ang)],
                          "b_star": [-a * math.sin(ang), a * math.cos(ang)],
                          "amp": 5000.0 * thick, "envelope_q": 2.5,
                          "sigma_px": max(1.0, 1.2 * self.size / 256), "hk_max": 8,
                          "seed": self.seed * 104729 + 3, "min_amp": 300.0})
        scene["features"] = feats
        scene = complete_scene(scene)
        for f in scene["features"]:
            if "n_grains" in f:       # grains are given per ring: one count for every ring
                f["grains"] = [int(f.pop("n_grains"))] * len(f["q"])
        return scene

    def labels_at(self, x: float, y: float) -> np.ndarray:
        """True tags at ``(x, y)``: ``(23,)`` float32 0/1 in ``TAG_NAMES`` order."""
        return scene_labels(self.scene_at(x, y))

    def tags_at(self, x: float, y: float) -> list[str]:
        """Names of the true tags at ``(x, y)``, in ``TAG_NAMES`` order."""
        lab = self.labels_at(x, y)
        return [TAG_NAMES[i] for i in np.flatnonzero(lab)]

    def frame_at(self, x: float, y: float, *, shot: int = 0) -> np.ndarray:
        """Render exposure number ``shot`` at ``(x, y)`` (detector dtype, with sentinels)."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
            [self.seed, _quantise(x), _quantise(y), int(shot)])))
        return render_scene(self.scene_at(x, y), rng)


def _quantise(pos: float) -> int:
    """A non-negative integer for a position in mm (1 um steps), for seeding."""
    value = float(pos)
    if not math.isfinite(value):
        raise ValueError(f"sample position must be finite, got {pos!r}")
    return int(round(value * _MM)) % (2**63)


# ---------------------------------------------------------------------------
# Devices


def _position_reader(motor) -> Callable[[], float]:
    if motor is None:
        return lambda: 0.0
    if isinstance(motor, (int, float)):
        value = float(motor)
        return lambda: value
    if callable(motor) and not hasattr(motor, "position"):
        return lambda: float(motor())
    if not hasattr(motor, "position"):
        raise TypeError(
            f"a sample motor must have a 'position' (an ophyd v1 positioner such as "
            f"ophyd.sim.SynAxis), be a callable returning mm, a number or None; got {motor!r}")
    return lambda: float(motor.position)


def position_frame_source(sample: CombinatorialSample, x_motor, y_motor=None
                          ) -> Callable[[], np.ndarray]:
    """A ``frame_source`` for the simulated detectors that looks where the motors put the beam.

    Parameters
    ----------
    sample : CombinatorialSample
        What is under the beam.
    x_motor, y_motor
        ophyd v1 positioners (their ``position`` is read at each frame), a
        callable returning mm, a fixed number, or ``None`` (0 mm).

    Returns
    -------
    callable
        ``source() -> ndarray``; successive calls at the same position are
        successive exposures (independent noise).  ``source.last_position``
        holds the ``(x, y)`` of the latest frame.

    Examples
    --------
    >>> from ophyd.sim import SynAxis
    >>> x = SynAxis(name="x")
    >>> src = position_frame_source(CombinatorialSample(size=64), x, 5.0)
    >>> _ = x.set(9.6)
    >>> int(src().max()) <= 0, src.last_position     # blank edge: dark frame
    (True, (9.6, 5.0))
    """
    read_x, read_y = _position_reader(x_motor), _position_reader(y_motor)
    shots = itertools.count()

    def source() -> np.ndarray:
        x, y = read_x(), read_y()
        source.last_position = (x, y)
        return sample.frame_at(x, y, shot=next(shots))

    source.last_position = None
    return source


class SampleStageDetector(InlineImageDetector):
    """Inline-array detector whose frames show the sample where the motors put the beam.

    Parameters
    ----------
    name : str
        Device name; the data key is ``f"{name}_image"``.
    x_motor, y_motor
        ophyd v1 positioners (e.g. :class:`ophyd.sim.SynAxis`), callables
        returning mm, numbers, or ``None``.
    sample : CombinatorialSample
        The sample; default ``CombinatorialSample()`` (256-pixel frames).
    **kwargs
        Passed to :class:`~bluesky_xsml.sim.detectors.InlineImageDetector`
        (e.g. ``frames_per_event``).

    Examples
    --------
    >>> from bluesky import RunEngine
    >>> from bluesky.plans import grid_scan
    >>> from ophyd.sim import SynAxis
    >>> x, y = SynAxis(name="x"), SynAxis(name="y")
    >>> det = SampleStageDetector("saxs", x, y, CombinatorialSample(size=64))
    >>> RE = RunEngine()
    >>> seen = []
    >>> def keep(name, doc):
    ...     if name == "event":
    ...         seen.append(det.sample.region_at(doc["data"]["x"], doc["data"]["y"]))
    >>> RE(grid_scan([det], y, 2, 2, 1, x, 1, 9.5, 2), keep)  # doctest: +ELLIPSIS
    (...)
    >>> seen
    ['amorphous', 'blank']
    """

    def __init__(self, name: str, x_motor, y_motor=None,
                 sample: CombinatorialSample | None = None, **kwargs):
        self.sample = sample if sample is not None else CombinatorialSample()
        self.frame_source = position_frame_source(self.sample, x_motor, y_motor)
        super().__init__(name, self.frame_source, **kwargs)

    def _expected_value(self):
        # describe() before any trigger: a frame of the right shape and dtype,
        # without drawing (and so without shifting) the exposure sequence
        frame = self.sample.frame_at(-1.0, -1.0)   # off the film: a cheap dark frame
        if self.frames_per_event is None:
            return frame
        return np.empty((self.frames_per_event, *frame.shape), frame.dtype)


def hdf5_stage_detector(name: str, x_motor, y_motor=None,
                        sample: CombinatorialSample | None = None, *,
                        root_dir: str | os.PathLike, **kwargs):
    """An area-detector-style HDF5 detector (``resource``/``datum``) looking at ``sample``.

    Returns a :class:`~bluesky_xsml.sim.detectors.HDF5ResourceDetector` whose
    ``frame_source`` is :func:`position_frame_source`; ``kwargs`` go to it
    (``frames_per_point``, ``spec``).  ``det.sample`` is the sample.

    Examples
    --------
    >>> import tempfile
    >>> from ophyd.sim import SynAxis
    >>> det = hdf5_stage_detector("waxs", SynAxis(name="x"), None,
    ...                           CombinatorialSample(size=64), root_dir=tempfile.mkdtemp())
    >>> det.describe()["waxs_image"]["external"]
    'FILESTORE:'
    """
    sample = sample if sample is not None else CombinatorialSample()
    det = _StageHDF5Detector(
        name, position_frame_source(sample, x_motor, y_motor), root_dir, **kwargs)
    det.sample = sample
    return det


class _StageHDF5Detector(HDF5ResourceDetector):
    """HDF5ResourceDetector that does not keep the frame it drew at ``stage``.

    ``stage`` draws a frame to learn shape and dtype, before the plan has moved
    the motors; kept, it would become the first exposure and show the wrong
    position.  Every position renders the same shape and dtype, so it is dropped.
    """

    def stage(self):
        staged = super().stage()
        self._drawer._pending = None
        return staged


def stream_stage_detector(name: str, x_motor, y_motor=None,
                          sample: CombinatorialSample | None = None, *,
                          root_dir: str | os.PathLike, **kwargs):
    """An ophyd-async HDF5 detector (``stream_resource``/``stream_datum``) looking at ``sample``.

    Returns a :class:`~bluesky_xsml.sim.detectors.StreamResourceDetector`
    named ``name``; create the RunEngine first (it owns the event loop) and
    connect the device (``init_devices`` or ``det.connect()`` in the
    RunEngine's loop) before use.  ``kwargs`` go to the detector
    (``path_provider``, ``config_sigs``).  ``det.sample`` is the sample.
    """
    sample = sample if sample is not None else CombinatorialSample()
    det = StreamResourceDetector(
        position_frame_source(sample, x_motor, y_motor), root_dir, name=name, **kwargs)
    det.sample = sample
    return det


@dataclass
class SimulatedBeamline:
    """Motors, sample and detector of a simulated mapping beamline.

    Attributes
    ----------
    sample_x, sample_y : ophyd.sim.SynAxis
        Sample stage motors (mm).
    sample : CombinatorialSample
    det : SampleStageDetector
        Inline-array detector named ``"saxs"`` (data key ``saxs_image``).
    """

    sample_x: Any
    sample_y: Any
    sample: CombinatorialSample
    det: Any

    def devices(self) -> dict[str, Any]:
        """Name -> device, e.g. to put into a profile's namespace."""
        return {"sample_x": self.sample_x, "sample_y": self.sample_y, "det": self.det}


def make_beamline(*, seed: int = 0, size: int = 256, detector_name: str = "saxs",
                  sample: CombinatorialSample | None = None) -> SimulatedBeamline:
    """Build a simulated mapping beamline: two ``SynAxis`` motors and a stage detector.

    Examples
    --------
    >>> bl = make_beamline(size=64)
    >>> sorted(bl.devices()), bl.det.name
    (['det', 'sample_x', 'sample_y'], 'saxs')
    """
    from ophyd.sim import SynAxis

    sample = sample if sample is not None else CombinatorialSample(seed=seed, size=size)
    x = SynAxis(name="sample_x", labels={"motors"})
    y = SynAxis(name="sample_y", labels={"motors"})
    det = SampleStageDetector(detector_name, x, y, sample, labels={"detectors"})
    return SimulatedBeamline(sample_x=x, sample_y=y, sample=sample, det=det)
