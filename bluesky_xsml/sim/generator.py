"""Synthetic scattering scenes: sampling, rendering and labels.

A *scene* is a JSON-serialisable dict of physical parameters (detector,
geometry, sample features, instrument effects; documented in
``docs/synthetic-data.md``).  Three pure functions work on it:

* :func:`sample_scene` draws a scene from a random generator;
* :func:`render_scene` turns a scene (sampled or hand-written) into a frame in
  the detector's dtype, with its sentinels;
* :func:`scene_labels` derives the 23 tags (``TAG_NAMES`` order) from the
  parameters alone: a feature is tagged when it lands on the detector and its
  expected counts clear the noise of what lies under it.

:class:`SceneGenerator` ties them together with per-frame seeds derived from
``(seed, index)``, so frame ``i`` is the same whatever order or process
produced it.

The pieces live in :mod:`.scene` (constants, completion, rendering),
:mod:`.labels`, :mod:`.sampling` and :mod:`.features` (the sampler's feature
families); this module re-exports their public names (the sim package's own
helpers among them), so ``generator.X`` works for any of those.

Examples
--------
>>> import numpy as np
>>> from bluesky_xsml.sim.generator import SceneGenerator
>>> gen = SceneGenerator(seed=1, size=128)
>>> frame, labels, params = gen.one()
>>> frame.ndim, labels.shape, labels.dtype.name
(2, (23,), 'float32')
>>> again, labels2, _ = gen.frame_at(0)        # frame 0 again, from (seed, 0)
>>> bool(np.array_equal(again.view(np.uint8), frame.view(np.uint8)))
True
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import ConfigurationError
from ..tags import TAG_NAMES
from . import physics as ph  # noqa: F401 (re-exported)
from .features import (  # noqa: F401 (re-exported)
    add_diffuse,
    add_gi_diffuse,
    add_halo,
    add_isolated,
    add_lattice,
    add_on_ring,
    add_rings,
    add_rods,
    add_saturation,
    add_specular,
    add_streaks,
    ensure_bright,
    feature_peak,
    scale_feature,
)
from .geometry import (  # noqa: F401 (re-exported)
    DETECTORS,
    FAMILIES,
    DetectorConfig,
    Footprint,
    SceneGeometry,
    gap_ranges,
    q_from_r,
    render_shape,
    resolve_detectors,
    ring_points,
)
from .labels import (  # noqa: F401 (re-exported)
    diffuse_inner_radius,
    halo_flanks_seen,
    label_state,
    pixel_peak_factor,
    scene_labels,
    smooth_level,
    streak_peak_factor,
)
from .sampling import (  # noqa: F401 (re-exported)
    Sampler,
    pick_detector,
    sample_labelled,
    sample_scene,
)
from .scene import (  # noqa: F401 (re-exported)
    DIFFUSE_DECAY,
    GAP_FRACTION,
    HALO_MIN_REL,
    HIGH_BG_RATIO,
    HIGH_MODE_MAX,
    ISO_MAX_KAPPA,
    MIN_SAT_AREA,
    ORIENT_MIN_KAPPA,
    R_E,
    SCENE_VERSION,
    SHARP_MAX_REL,
    TAG_INDEX,
    WANT_P,
    WEAK_MAX_COUNTS,
    complete_scene,
    detector_entry,
    frame_seed,
    in_view,
    jsonable,
    render_scene,
    threshold,
    two_theta,
)
from .variety import (  # noqa: F401 (re-exported)
    PROFILES,
    VarietyProfile,
    log_uniform,
    resolve_variety,
    uniform_in,
)

__all__ = [
    "SCENE_VERSION",
    "SceneGenerator",
    "complete_scene",
    "render_scene",
    "sample_scene",
    "scene_labels",
    "frame_seed",
]


# ---------------------------------------------------------------------------
# Generator


class SceneGenerator:
    """Reproducible stream of synthetic frames, labels and scene parameters.

    Parameters
    ----------
    seed : int
        Run seed; frame ``i`` uses :func:`frame_seed(seed, i) <frame_seed>`.
    size : int or None
        Longest side of rendered frames (``None``: native detector size).
    detectors : optional
        Detectors to draw from (names, ``"HxW"`` shapes, families,
        ``"train"``/``"heldout"``/``"all"``); ``None``: the training set.
    tags : dict of str -> bool, optional
        Force features on/off in every scene (see :func:`sample_scene`).
    variety : str or VarietyProfile, optional
        Generator profile: ``"classic"`` (default; the frames the shipped model
        was trained and measured on, unchanged) or ``"wide"`` (the declared
        families of :data:`~bluesky_xsml.sim.variety.WIDE`; see
        ``docs/synthetic-data.md``).
    """

    def __init__(self, seed: int = 0, size: int | None = 256, detectors=None,
                 tags: Mapping[str, bool] | None = None,
                 variety: str | VarietyProfile | None = "classic"):
        if size is not None and (not isinstance(size, (int, np.integer)) or size < 16):
            raise ConfigurationError(f"size must be an int >= 16 or None, got {size!r}")
        self.seed = int(seed)
        self.size = None if size is None else int(size)
        self.detectors = resolve_detectors(detectors)
        self.tags = dict(tags or {})
        self.profile = resolve_variety(variety)
        self.variety = self.profile.name
        unknown = set(self.tags) - set(WANT_P)
        if unknown:
            raise ConfigurationError(
                f"cannot ask for {sorted(unknown)}; known: {', '.join(WANT_P)}")
        self.index = 0

    def scene_at(self, index: int) -> tuple[dict, np.ndarray, np.random.Generator]:
        """Scene and labels of frame ``index``, and the generator state to render it with."""
        rng = frame_seed(self.seed, index)
        det = pick_detector(rng, self.detectors)
        scene, labels = sample_labelled(rng, det, self.size, self.tags, prof=self.profile)
        return scene, labels, rng

    def frame_at(self, index: int) -> tuple[np.ndarray, np.ndarray, dict]:
        """Frame, labels and scene of frame ``index`` (independent of the stream position)."""
        scene, labels, rng = self.scene_at(index)
        return render_scene(scene, rng), labels, scene

    def one(self) -> tuple[np.ndarray, np.ndarray, dict]:
        """The next frame: ``(frame, labels (23,) float32, params dict)``."""
        out = self.frame_at(self.index)
        self.index += 1
        return out

    def batch(self, n: int) -> tuple[list[np.ndarray], np.ndarray, list[dict]]:
        """The next ``n`` frames: list of frames, ``(n, 23)`` float32 labels, list of dicts."""
        frames, labels, params = [], [], []
        for _ in range(int(n)):
            f, y, p = self.one()
            frames.append(f)
            labels.append(y)
            params.append(p)
        lab = np.stack(labels) if labels else np.zeros((0, len(TAG_NAMES)), np.float32)
        return frames, lab.astype(np.float32), params

    def __iter__(self):
        while True:
            yield self.one()
