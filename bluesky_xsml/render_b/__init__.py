"""Renderer B: an independent renderer of labelled x-ray scattering frames.

Written from the tag definitions alone (``docs/tags.md``), without the
project's generator (``bluesky_xsml.sim``), so that a model trained on one
renderer can be scored on the other.  See ``docs/render-b.md``.

>>> from bluesky_xsml.render_b import render_scene
>>> frame, labels, scene = render_scene(0, 3)
>>> labels.shape, frame.shape == tuple(scene["detector"]["shape"])
((23,), True)
"""

from __future__ import annotations

import json

import numpy as np

from .sampler import SceneSampler

__all__ = ["RENDERER_VERSION", "SceneSampler", "frame_rng", "render_dataset", "render_scene"]

#: Recorded with every frame; bumped whenever the frames of a seed change.
RENDERER_VERSION = 1


def frame_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of frame ``index`` of dataset ``seed`` (independent of workers)."""
    return np.random.default_rng(np.random.SeedSequence([0x5B, int(seed), int(index)]))


def render_scene(seed: int, index: int = 0, sampler: SceneSampler | None = None,
                 detector: str | None = None):
    """Render frame ``index`` of dataset ``seed``.

    Parameters
    ----------
    seed, index : int
        Which frame; the same pair always gives the same bytes.
    sampler : SceneSampler, optional
        The scene distributions (default ``SceneSampler()``).
    detector : str, optional
        Force this detector (a name from :data:`~bluesky_xsml.render_b.detectors.DETECTORS`).

    Returns
    -------
    frame : numpy.ndarray
        The stored frame (int32, uint32, uint16 or float32, with sentinels).
    labels : numpy.ndarray
        ``(23,)`` float32 in ``TAG_NAMES`` order.
    scene : dict
        The JSON-serialisable scene, with ``geometry.beam_center`` ``[x, y]``
        (column, row) and ``detector.name``, plus what was visible.
    """
    from dataclasses import replace

    from .compose import expected_photons
    from .detectors import detector as get_detector
    from .detectors import read_out
    from .labels import frame_labels

    sampler = sampler or SceneSampler()
    if detector is not None:
        get_detector(detector)
        sampler = replace(sampler, detectors=(detector,))
    rng = frame_rng(seed, index)
    scene = sampler.sample(rng)
    r = expected_photons(scene, rng)
    det = get_detector(scene["detector"]["name"])
    frame, n_sat = read_out(rng, r.photons, det, scene["detector"]["convention"])
    labels = frame_labels(scene, r.records, r.beamstop, frame, r.gaps, n_sat)
    scene["renderer_version"] = RENDERER_VERSION
    scene["seed"] = [int(seed), int(index)]
    scene["visible"] = {"records": r.records, "beamstop": r.beamstop,
                        "n_saturated": n_sat, "noise_photons": r.noise}
    json.dumps(scene)  # fail here, not in the writer, if something is not serialisable
    return frame, labels, scene


def render_dataset(path, n: int, *, seed: int = 0, workers: int = 1, block: int = 16,
                   sampler: SceneSampler | None = None, progress: bool = False) -> int:
    """Write ``n`` frames of renderer B to a zarr store in the ``xsml synth`` format.

    See :func:`bluesky_xsml.render_b.store.write` (this is a thin wrapper).
    """
    from .store import write

    return write(path, n, seed=seed, workers=workers, block=block, sampler=sampler,
                 progress=progress)
