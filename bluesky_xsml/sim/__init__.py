"""Simulation: physics-based synthetic scattering frames and simulated detectors.

Modules (imported only when used; ``import bluesky_xsml.sim`` loads nothing
heavy):

``geometry``   detector families (Pilatus, Eiger, CCD-like) and q <-> pixel geometry
``physics``    scattering models and the per-pixel detector model (numba)
``generator``  scene sampling, rendering and labels (:class:`SceneGenerator`)
``dataset``    zarr datasets and the ``xsml synth`` command
``detectors``  ophyd / ophyd-async simulated detectors
``sample``     a combinatorial sample and detectors whose frames follow the motors

The generator's main names are available lazily from here, e.g.
``from bluesky_xsml.sim import SceneGenerator``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_LAZY = {
    "SceneGenerator": "bluesky_xsml.sim.generator",
    "sample_scene": "bluesky_xsml.sim.generator",
    "render_scene": "bluesky_xsml.sim.generator",
    "scene_labels": "bluesky_xsml.sim.generator",
    "complete_scene": "bluesky_xsml.sim.generator",
    "open_dataset": "bluesky_xsml.sim.dataset",
    "write_dataset": "bluesky_xsml.sim.dataset",
    "DETECTORS": "bluesky_xsml.sim.geometry",
    "CombinatorialSample": "bluesky_xsml.sim.sample",
    "SampleStageDetector": "bluesky_xsml.sim.sample",
    "hdf5_stage_detector": "bluesky_xsml.sim.sample",
    "stream_stage_detector": "bluesky_xsml.sim.sample",
    "make_beamline": "bluesky_xsml.sim.sample",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover - `name as name`: re-exported for type checkers
    from .dataset import open_dataset as open_dataset
    from .dataset import write_dataset as write_dataset
    from .generator import SceneGenerator as SceneGenerator
    from .generator import complete_scene as complete_scene
    from .generator import render_scene as render_scene
    from .generator import sample_scene as sample_scene
    from .generator import scene_labels as scene_labels
    from .geometry import DETECTORS as DETECTORS
    from .sample import CombinatorialSample as CombinatorialSample
    from .sample import SampleStageDetector as SampleStageDetector
    from .sample import hdf5_stage_detector as hdf5_stage_detector
    from .sample import make_beamline as make_beamline
    from .sample import stream_stage_detector as stream_stage_detector


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bluesky_xsml.sim' has no attribute {name!r}")


def __dir__():
    return __all__
